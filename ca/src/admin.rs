//! The operator-facing `meshward.ca.v1.Admin` service, on a unix socket only (`D/admin.sock`, 0600).
//!
//! Whoever can open the socket is the CA's operator: file permissions are the authentication, as for
//! SPIRE's server socket. The socket is created 0600 inside a private (0700) scratch directory and
//! then renamed into place, so there is no moment at which it exists with wider permissions. A stale
//! socket file left by a crashed CA is removed, but only after checking that nothing answers on it.
//!
//! Operators get full error detail (they are trusted, and need to know what to fix); errors map to
//! statuses in one function, [`admin_status`].

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::admin_client::AdminClient;
use meshward_identity::proto::ca::admin_server::{Admin, AdminServer};
use meshward_identity::{SpiffeId, TrustDomain};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::datastore::{
    self, AgentError, Datastore, DatastoreError, NewEntry, NodeScope, Selector,
};
use crate::keystore::{AuthorityInfo, Keystore, KeystoreError};
use crate::service::{blocking, bundle_to_proto, entry_to_proto, unix_seconds};

/// Lifetime of a join token when the request gives none.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(10 * 60);

/// The `Admin` service; cheap to clone.
#[derive(Clone)]
pub struct AdminService {
    datastore: Datastore,
    keystore: Keystore,
    trust_domain: TrustDomain,
}

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    /// Another process answers on the socket.
    #[error("admin socket `{}` is in use by another process; is another `meshward ca run` using this data dir?", .0.display())]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("`{}` exists and is not a socket; remove it or choose another `--admin-socket`", .0.display())]
    NotASocket(PathBuf),
    /// A file system call failed.
    #[error("could not {doing} `{}`: {source}", path.display())]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// An admin client on the admin socket at `path` (HTTP/2 over the unix stream), for the CLI and tests.
///
/// Fails when nothing listens there: the caller says which CA it meant and what to check.
pub async fn connect(path: &Path) -> Result<AdminClient<Channel>, tonic::transport::Error> {
    let path = path.to_path_buf();
    // tonic requires a URI but the connector ignores it and opens the socket.
    let channel = Endpoint::from_static("http://admin.sock.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(AdminClient::new(channel))
}

/// Removes the admin socket when the server stops, if it is still the one this process made.
#[derive(Debug)]
pub struct AdminSocketGuard {
    path: PathBuf,
    inode: u64,
}

/// What an admin call failed on, before it becomes a status.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    #[error("{0}")]
    BadRequest(String),
}

impl AdminService {
    /// The service over the CA's state.
    pub fn new(datastore: Datastore, keystore: Keystore, trust_domain: TrustDomain) -> Self {
        Self {
            datastore,
            keystore,
            trust_domain,
        }
    }

    /// Serves the service on `listener` until `shutdown` fires.
    pub async fn serve(
        self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(self))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
    }
}

/// Creates the admin socket at `path`, 0600, replacing a stale one that nothing listens on.
///
/// Must be called inside a tokio runtime.
pub fn bind_admin_socket(
    path: &Path,
) -> Result<(UnixListener, AdminSocketGuard), AdminSocketError> {
    let io_err = |doing, path: &Path| {
        let path = path.to_path_buf();
        move |source| AdminSocketError::Io {
            doing,
            path,
            source,
        }
    };
    remove_stale_socket(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Bind inside a 0700 scratch directory, tighten to 0600, then rename into place: nobody can
    // connect during the moment the socket has the umask's permissions.
    let scratch = parent.join(format!(".mw{:x}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    DirBuilder::new()
        .mode(0o700)
        .create(&scratch)
        .map_err(io_err("create a scratch directory", &scratch))?;
    let temp = scratch.join("s");
    let bound = std::os::unix::net::UnixListener::bind(&temp)
        .map_err(io_err("bind the admin socket", &temp))
        .and_then(|listener| {
            fs::set_permissions(&temp, Permissions::from_mode(0o600))
                .map_err(io_err("restrict the admin socket to 0600", &temp))?;
            fs::rename(&temp, path).map_err(io_err("move the admin socket into place", path))?;
            Ok(listener)
        });
    let _ = fs::remove_dir_all(&scratch);
    let listener = bound?;
    let inode = fs::symlink_metadata(path)
        .map_err(io_err("inspect the admin socket", path))?
        .ino();
    listener
        .set_nonblocking(true)
        .map_err(io_err("configure the admin socket", path))?;
    let listener =
        UnixListener::from_std(listener).map_err(io_err("register the admin socket", path))?;
    Ok((
        listener,
        AdminSocketGuard {
            path: path.to_path_buf(),
            inode,
        },
    ))
}

impl Drop for AdminSocketGuard {
    fn drop(&mut self) {
        // Only our own socket: a newer CA may have replaced it already.
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), AdminSocketError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(AdminSocketError::Io {
                doing: "inspect the admin socket",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(AdminSocketError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(AdminSocketError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale admin socket");
            fs::remove_file(path).map_err(|source| AdminSocketError::Io {
                doing: "remove the stale admin socket",
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(AdminSocketError::Io {
            doing: "check the existing admin socket",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let pb::CreateJoinTokenRequest { node, ttl_seconds } = request.into_inner();
        let ttl = match u64::try_from(ttl_seconds) {
            Ok(0) => DEFAULT_JOIN_TOKEN_TTL,
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                return Err(admin_status(AdminError::BadRequest(format!(
                    "join token ttl `{ttl_seconds}s` is negative"
                ))));
            }
        };
        let ds = self.datastore.clone();
        let token = blocking(move || ds.create_join_token(&node, ttl, SystemTime::now()))
            .await?
            .map_err(|e| admin_status(e.into()))?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: token.token.expose().to_owned(),
            expires_at: unix_seconds(token.expires_at),
        }))
    }

    async fn create_entry(
        &self,
        request: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let r = request.into_inner();
        let new = new_entry(r, &self.trust_domain).map_err(admin_status)?;
        let ds = self.datastore.clone();
        let entry = blocking(move || ds.create_entry(&new, SystemTime::now()))
            .await?
            .map_err(|e| admin_status(e.into()))?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn list_entries(
        &self,
        _request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let ds = self.datastore.clone();
        let entries = blocking(move || ds.list_entries())
            .await?
            .map_err(|e| admin_status(e.into()))?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
        }))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let id = request.into_inner().id;
        let ds = self.datastore.clone();
        blocking(move || ds.delete_entry(&id))
            .await?
            .map_err(|e| admin_status(e.into()))?;
        Ok(Response::new(pb::DeleteEntryResponse {}))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let ds = self.datastore.clone();
        let agents = blocking(move || ds.list_agents())
            .await?
            .map_err(|e| admin_status(e.into()))?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent_to_proto).collect(),
        }))
    }

    async fn evict_agent(
        &self,
        request: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let text = request.into_inner().spiffe_id;
        let id = SpiffeId::parse(&text).map_err(|e| {
            admin_status(AdminError::BadRequest(format!(
                "agent id `{text}` is not a spiffe id: {e}"
            )))
        })?;
        let ds = self.datastore.clone();
        blocking(move || ds.evict_agent(&id, SystemTime::now()))
            .await?
            .map_err(|e| admin_status(e.into()))?;
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn show_bundle(
        &self,
        _request: Request<pb::ShowBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        Ok(Response::new(bundle_to_proto(&self.keystore.current())))
    }

    async fn list_authorities(
        &self,
        _request: Request<pb::ListAuthoritiesRequest>,
    ) -> Result<Response<pb::ListAuthoritiesResponse>, Status> {
        let ks = self.keystore.clone();
        let authorities = blocking(move || ks.authorities())
            .await?
            .map_err(|e| admin_status(e.into()))?;
        Ok(Response::new(pb::ListAuthoritiesResponse {
            authorities: authorities.iter().map(authority_to_proto).collect(),
        }))
    }

    async fn prepare_root(
        &self,
        _request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::Authority>, Status> {
        let ks = self.keystore.clone();
        let info = blocking(move || ks.prepare(SystemTime::now()))
            .await?
            .map_err(|e| admin_status(e.into()))?;
        tracing::info!(authority = %info.id, "root prepared");
        Ok(Response::new(authority_to_proto(&info)))
    }

    async fn activate_root(
        &self,
        _request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::Authority>, Status> {
        let ks = self.keystore.clone();
        let info = blocking(move || ks.activate(SystemTime::now()))
            .await?
            .map_err(|e| admin_status(e.into()))?;
        tracing::info!(authority = %info.id, "root activated");
        Ok(Response::new(authority_to_proto(&info)))
    }

    async fn retire_root(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::Authority>, Status> {
        let force = request.into_inner().danger_force;
        let ks = self.keystore.clone();
        let info = blocking(move || ks.retire(SystemTime::now(), force))
            .await?
            .map_err(|e| admin_status(e.into()))?;
        tracing::info!(authority = %info.id, forced = force, "root retired");
        Ok(Response::new(authority_to_proto(&info)))
    }
}

/// THE mapping from admin errors to statuses; the operator gets the whole message.
fn admin_status(err: AdminError) -> Status {
    use DatastoreError as D;
    let message = err.to_string();
    let code = match &err {
        AdminError::BadRequest(_) => tonic::Code::InvalidArgument,
        AdminError::Datastore(e) | AdminError::Agent(AgentError::Datastore(e)) => match e {
            D::BadNodeName { .. }
            | D::BadTokenTtl { .. }
            | D::BadSelector { .. }
            | D::NoSelectors { .. }
            | D::BadScope { .. }
            | D::BadEntryTtl { .. }
            | D::BadHint { .. }
            | D::NotWorkloadId { .. } => tonic::Code::InvalidArgument,
            D::DuplicateEntry { .. } => tonic::Code::AlreadyExists,
            D::UnknownEntry { .. } => tonic::Code::NotFound,
            _ => tonic::Code::Internal,
        },
        AdminError::Agent(AgentError::Unknown { .. }) => tonic::Code::NotFound,
        AdminError::Agent(_) => tonic::Code::FailedPrecondition,
        AdminError::Keystore(e) => keystore_code(e),
    };
    if code == tonic::Code::Internal {
        tracing::warn!(error = %message, "admin call failed");
    } else {
        tracing::debug!(error = %message, "admin call refused");
    }
    Status::new(code, message)
}

/// Rotation refusals are the operator asking for a step out of order; anything else is internal.
fn keystore_code(err: &KeystoreError) -> tonic::Code {
    use datastore::AuthorityError as A;
    match err {
        KeystoreError::Rotation(A::Datastore(_)) => tonic::Code::Internal,
        KeystoreError::Rotation(A::Unknown { .. }) => tonic::Code::NotFound,
        KeystoreError::Rotation(_)
        | KeystoreError::UpstreamManaged { .. }
        | KeystoreError::BadKeySecret { .. }
        | KeystoreError::NoActiveAuthority => tonic::Code::FailedPrecondition,
        // Another replica is rotating (Kubernetes mode): the operator retries once it is done.
        KeystoreError::RotationLeaseHeld { .. } => tonic::Code::Aborted,
        KeystoreError::Cluster(_) => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    }
}

fn new_entry(r: pb::CreateEntryRequest, td: &TrustDomain) -> Result<NewEntry, AdminError> {
    let spiffe_id = SpiffeId::parse(&r.spiffe_id).map_err(|e| {
        AdminError::BadRequest(format!("`{}` is not a spiffe id: {e}", r.spiffe_id))
    })?;
    if !spiffe_id.is_member_of(td) {
        return Err(AdminError::BadRequest(format!(
            "spiffe id `{spiffe_id}` is outside trust domain `{td}`; this ca signs only for `{td}`"
        )));
    }
    let selectors = r
        .selectors
        .iter()
        .map(|s| Selector::new(&s.r#type, &s.value))
        .collect::<Result<Vec<_>, _>>()?;
    let scope = NodeScope::from_parts(&r.node, r.any_node)?;
    Ok(NewEntry {
        spiffe_id,
        selectors,
        scope,
        ttl_seconds: r.ttl_seconds,
        hint: r.hint,
    })
}

fn agent_to_proto(agent: &datastore::Agent) -> pb::Agent {
    pb::Agent {
        spiffe_id: agent.spiffe_id.to_string(),
        node: agent.node.clone(),
        attestation: agent.attestation.as_str().to_owned(),
        serial: agent.serial.clone(),
        expires_at: unix_seconds(agent.expires_at),
        evicted: agent.evicted,
        attested_at: unix_seconds(agent.attested_at),
        pending_serial: agent
            .pending
            .as_ref()
            .map(|p| p.serial.clone())
            .unwrap_or_default(),
        pending_expires_at: agent
            .pending
            .as_ref()
            .map_or(0, |p| unix_seconds(p.expires_at)),
    }
}

fn authority_to_proto(info: &AuthorityInfo) -> pb::Authority {
    pb::Authority {
        id: info.id.clone(),
        state: info.state.as_str().to_owned(),
        not_before: unix_seconds(info.not_before),
        not_after: unix_seconds(info.not_after),
        signed_until: unix_seconds(info.signed_until),
        certificate: info.certificate.clone(),
    }
}

#[cfg(test)]
mod tests;
