//! The Workload API over the agent's real unix socket, against a real CA: refusals, identities,
//! JWTs, streams through rotation, garbage on the socket, shutdown.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::Duration;

use meshward_identity::bundle::BundleSet;
use meshward_identity::jwt::JwtBundle;
use meshward_identity::proto::ca as ca_pb;
use meshward_identity::verify::{PeerRole, PeerVerifier};
use rustls_pki_types::UnixTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use super::client::{self, parse_x509_response};
use super::*;
use crate::test_ca::{TD, TestCa};
use crate::{RunningAgent, start};

type Client = spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel>;
use meshward_identity::proto::workload::spiffe_workload_api_client;

pub(crate) const HOUR: Duration = Duration::from_secs(3_600);
/// No test waits longer than this for anything.
pub(crate) const PATIENCE: Duration = Duration::from_secs(40);

/// A running agent of a test CA, stopped on drop.
pub(crate) struct Agent {
    pub running: Option<RunningAgent>,
    pub socket: PathBuf,
    pub shutdown: CancellationToken,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Agent {
    /// Starts an agent for `node` of `ca`, refusing unknown callers after `identity_wait`.
    pub(crate) async fn start(ca: &TestCa, node: &str, identity_wait: Duration) -> Self {
        let mut config = ca.agent_config(node).await;
        config.identity_wait = identity_wait;
        config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        let shutdown = CancellationToken::new();
        let running = start(config, shutdown.clone()).await.unwrap();
        Self {
            socket: running.socket.clone(),
            running: Some(running),
            shutdown,
        }
    }

    pub(crate) async fn client(&self) -> Client {
        client::connect(&self.socket).await.unwrap()
    }

    pub(crate) async fn channel(&self) -> Channel {
        client::channel(&self.socket).await.unwrap()
    }

    pub(crate) async fn metrics(&self) -> String {
        let addr = self.running.as_ref().unwrap().admin_http_addr.unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    }

    /// Stops the agent and waits for it.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        let running = self.running.take().unwrap();
        tokio::time::timeout(PATIENCE, running.wait())
            .await
            .unwrap()
            .unwrap();
    }
}

/// The `unix:path:` selector of this test process.
pub(crate) fn me() -> String {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    format!("unix:path:{}", exe.display())
}

/// The `unix:uid:` selector of this test process.
pub(crate) fn my_uid() -> String {
    format!(
        "unix:uid:{}",
        std::fs::metadata("/proc/self").unwrap().uid()
    )
}

pub(crate) fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/{path}")).unwrap()
}

async fn first_x509(client: &mut Client) -> pb::X509svidResponse {
    let mut stream = client
        .fetch_x509svid(client::request(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap()
}

fn verifier(bundle: &meshward_identity::bundle::TrustBundle) -> PeerVerifier {
    let mut set = BundleSet::new();
    set.insert(bundle.clone());
    PeerVerifier::new(Arc::new(set), [bundle.trust_domain().clone()])
}

async fn next_within<T>(stream: &mut tonic::Streaming<T>, within: Duration) -> Option<T> {
    tokio::time::timeout(within, stream.message())
        .await
        .ok()
        .map(|m| m.unwrap().unwrap())
}

#[tokio::test]
async fn calls_without_the_security_header_are_invalid_argument() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("me", "node-hdr", &[&me()]).await;
    let agent = Agent::start(&ca, "node-hdr", Duration::from_secs(5)).await;
    let mut client = agent.client().await;

    let err = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("workload.spiffe.io"), "{err:?}");
    let err = client
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client
        .fetch_jwt_bundles(pb::JwtBundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: "x.y.z".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // A header that is present but not `true` is no header.
    let mut request = tonic::Request::new(pb::X509svidRequest {});
    request
        .metadata_mut()
        .insert(SECURITY_HEADER, "false".parse().unwrap());
    let err = client.fetch_x509svid(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // The same call with the header succeeds: the refusal was about the header only.
    let response = first_x509(&mut client).await;
    assert_eq!(response.svids.len(), 1);
    let metrics = agent.metrics().await;
    assert!(
        metrics.contains(
            "meshward_agent_socket_calls_total{method=\"FetchX509SVID\",code=\"invalid_argument\"} 2"
        ),
        "{metrics}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn an_unregistered_process_is_denied_within_the_bounded_wait() {
    let ca = TestCa::start(HOUR, HOUR).await;
    // Someone else is registered on this node; this process matches nothing.
    ca.entry("other", "node-deny", &["unix:uid:4242"]).await;
    let wait = Duration::from_secs(1);
    let agent = Agent::start(&ca, "node-deny", wait).await;
    let mut client = agent.client().await;

    let started = std::time::Instant::now();
    let err = client
        .fetch_x509svid(client::request(pb::X509svidRequest {}))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no identity issued"), "{err:?}");
    assert!(
        err.message().contains(&my_uid()),
        "names the caller's selectors: {err:?}"
    );
    assert!(took >= wait, "waited for a late entry first: {took:?}");
    assert!(took < wait + Duration::from_secs(3), "bounded: {took:?}");

    for code in [
        client
            .fetch_x509_bundles(client::request(pb::X509BundlesRequest {}))
            .await
            .unwrap_err()
            .code(),
        client
            .fetch_jwtsvid(client::request(pb::JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err()
            .code(),
        client
            .fetch_jwt_bundles(client::request(pb::JwtBundlesRequest {}))
            .await
            .unwrap_err()
            .code(),
    ] {
        assert_eq!(code, Code::PermissionDenied);
    }
    // Asking for someone else's JWT is refused as well.
    let err = client
        .fetch_jwtsvid(client::request(pb::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: id("other").to_string(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    agent.stop().await;
}

#[tokio::test]
async fn an_entry_created_while_a_workload_waits_is_served_at_once() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("other", "node-late", &["unix:uid:4242"]).await;
    let agent = Agent::start(&ca, "node-late", Duration::from_secs(10)).await;
    let mut client = agent.client().await;
    let call = tokio::spawn(async move { first_x509(&mut client).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ca.entry("late", "node-late", &[&me()]).await;
    let response = tokio::time::timeout(PATIENCE, call).await.unwrap().unwrap();
    assert_eq!(response.svids[0].spiffe_id, id("late").to_string());
    agent.stop().await;
}

#[tokio::test]
async fn a_registered_workload_gets_its_svid_bundle_and_jwts() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("web", "node-ok", &[&me()]).await;
    ca.entry("web-admin", "node-ok", &[&my_uid(), &me()]).await;
    ca.entry("not-me", "node-ok", &["unix:uid:4242"]).await;
    let agent = Agent::start(&ca, "node-ok", Duration::from_secs(10)).await;
    let mut client = agent.client().await;

    // Called at once: the agent may still be minting, and the call waits for it.
    let response = first_x509(&mut client).await;
    let svids = parse_x509_response(&response).unwrap();
    let ids: Vec<String> = svids
        .iter()
        .map(|s| s.svid.spiffe_id().to_string())
        .collect();
    // In entry order (oldest first; entries made in the same second are ordered by entry ID).
    let order = entry_order(&agent);
    assert_eq!(ids, order[..2], "{order:?}");
    assert!(ids.contains(&id("web").to_string()) && ids.contains(&id("web-admin").to_string()));
    assert_eq!(
        svids[0].hint,
        format!(
            "hint-{}",
            svids[0].svid.spiffe_id().path().trim_start_matches('/')
        )
    );
    assert!(response.federated_bundles.is_empty());
    for fetched in &svids {
        assert!(fetched.is_current());
        let (leaf, intermediates) = fetched.svid.chain().split_first().unwrap();
        verifier(&fetched.bundle)
            .verify(leaf, intermediates, PeerRole::Client, UnixTime::now())
            .unwrap();
    }

    let mut bundles = client
        .fetch_x509_bundles(client::request(pb::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let bundles = bundles.message().await.unwrap().unwrap().bundles;
    assert_eq!(bundles.len(), 1);
    assert_eq!(
        bundles[&format!("spiffe://{TD}")],
        svids[0].bundle.to_der_concat()
    );

    let mut jwks = client
        .fetch_jwt_bundles(client::request(pb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let jwks = jwks.message().await.unwrap().unwrap().bundles;
    let jwt_bundle =
        JwtBundle::from_jwks_json(TD.parse().unwrap(), &jwks[&format!("spiffe://{TD}")]).unwrap();
    assert!(!jwt_bundle.is_empty());

    // JWT-SVIDs: every identity by default (default first), or one asked for.
    let all = client
        .fetch_jwtsvid(client::request(pb::JwtsvidRequest {
            audience: vec!["db".into(), "cache".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids;
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].spiffe_id, ids[0]);
    let one = client
        .fetch_jwtsvid(client::request(pb::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: id("web-admin").to_string(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].spiffe_id, id("web-admin").to_string());
    assert_eq!(one[0].hint, "hint-web-admin");
    let token = one[0].svid.clone();

    let valid = client
        .validate_jwtsvid(client::request(pb::ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: token.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(valid.spiffe_id, id("web-admin").to_string());
    let claims = valid.claims.unwrap().fields;
    assert_eq!(
        claims["sub"].kind,
        Some(prost_types::value::Kind::StringValue(
            id("web-admin").to_string()
        ))
    );
    assert!(
        matches!(claims["exp"].kind, Some(prost_types::value::Kind::NumberValue(n)) if n > 0.0)
    );

    // Refusals, each for its reason.
    let validate = |audience: &str, svid: String| {
        let mut client = client.clone();
        let audience = audience.to_owned();
        async move {
            client
                .validate_jwtsvid(client::request(pb::ValidateJwtsvidRequest {
                    audience,
                    svid,
                }))
                .await
                .unwrap_err()
        }
    };
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let err = validate("db", String::from_utf8(tampered).unwrap()).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("signature"), "{err:?}");
    let err = validate("elsewhere", token.clone()).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("audience"), "{err:?}");
    let err = validate("", token.clone()).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = validate("db", String::new()).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let fetch_jwt = |audience: Vec<String>, spiffe_id: String| {
        let mut client = client.clone();
        async move {
            client
                .fetch_jwtsvid(client::request(pb::JwtsvidRequest {
                    audience,
                    spiffe_id,
                }))
                .await
                .unwrap_err()
        }
    };
    let err = fetch_jwt(Vec::new(), String::new()).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("audience"), "{err:?}");
    let err = fetch_jwt(vec!["db".into()], "not a spiffe id".into()).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = fetch_jwt(vec!["db".into()], id("not-me").to_string()).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not-me"), "{err:?}");

    let metrics = agent.metrics().await;
    for needle in [
        "meshward_agent_socket_calls_total{method=\"FetchX509SVID\",code=\"ok\"} 1",
        "meshward_agent_socket_calls_total{method=\"ValidateJWTSVID\",code=\"ok\"} 1",
        "meshward_agent_stream_pushes_total{method=\"FetchX509SVID\"} 1",
        "meshward_agent_attestations_total{result=\"ok\"}",
    ] {
        assert!(metrics.contains(needle), "missing `{needle}` in {metrics}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn streams_carry_rotated_svids_and_a_prepared_root_without_breaking() {
    // 30s SVIDs: renewed after ~13.5-15s.
    let ca = TestCa::start(Duration::from_secs(30), HOUR).await;
    ca.entry("rotating", "node-rot", &[&me()]).await;
    let agent = Agent::start(&ca, "node-rot", Duration::from_secs(10)).await;
    let mut client = agent.client().await;

    let mut svids = client
        .fetch_x509svid(client::request(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = parse_x509_response(&svids.message().await.unwrap().unwrap()).unwrap();
    let first_serial = first[0].svid.serial().to_owned();
    assert_eq!(first[0].bundle.len(), 1);
    let mut bundles = client
        .fetch_x509_bundles(client::request(pb::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(bundles.message().await.unwrap().is_some());
    let mut jwks = client
        .fetch_jwt_bundles(client::request(pb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first_jwks = jwks.message().await.unwrap().unwrap();

    ca.admin()
        .await
        .prepare_root(ca_pb::RotateRequest {
            danger_force: false,
        })
        .await
        .unwrap();
    // The bundle stream gets old + new root.
    let rotated = next_within(&mut bundles, PATIENCE).await.unwrap();
    let roots = meshward_identity::bundle::TrustBundle::from_der_concat(
        TD.parse().unwrap(),
        &rotated.bundles[&format!("spiffe://{TD}")],
    )
    .unwrap();
    assert_eq!(roots.len(), 2);
    // The SVID stream gets the same SVID with the new bundle.
    let with_new_bundle =
        parse_x509_response(&next_within(&mut svids, PATIENCE).await.unwrap()).unwrap();
    assert_eq!(with_new_bundle[0].bundle.len(), 2);
    assert_eq!(with_new_bundle[0].svid.serial(), first_serial);

    // Then a renewed SVID arrives on the same stream.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let message = next_within(&mut svids, left).await.expect("a rotated svid");
        let svid = parse_x509_response(&message).unwrap().remove(0);
        if svid.svid.serial() != first_serial {
            assert!(svid.svid.not_after() > first[0].svid.not_after());
            break;
        }
    }
    // The JWT bundle stream stayed open (a root rotation leaves JWT keys alone, so it may have
    // nothing new); it still answers after everything above.
    drop(first_jwks);
    let pushes = agent.metrics().await;
    assert!(
        pushes.contains("meshward_agent_stream_pushes_total{method=\"FetchX509Bundles\"} 2"),
        "{pushes}"
    );

    // Shutdown ends every open stream (clients reconnect to the next agent) instead of leaving
    // them hanging.
    agent.stop().await;
    tokio::time::timeout(PATIENCE, async {
        ends(&mut svids).await;
        ends(&mut bundles).await;
        ends(&mut jwks).await;
    })
    .await
    .expect("every stream ends on shutdown");
}

/// Reads `stream` until it ends (cleanly or with a broken connection).
async fn ends<T>(stream: &mut tonic::Streaming<T>) {
    while let Ok(Some(_)) = stream.message().await {}
}

/// The SPIFFE IDs of the agent's entries that this process matches, in entry order.
pub(crate) fn entry_order(agent: &Agent) -> Vec<String> {
    let snapshot = agent.running.as_ref().unwrap().cache.current();
    let mine: Vec<Selector> = vec![me().parse().unwrap(), my_uid().parse().unwrap()];
    snapshot
        .entries
        .iter()
        .filter(|e| e.selectors.iter().all(|s| mine.contains(s)))
        .map(|e| e.spiffe_id.to_string())
        .collect()
}

#[tokio::test]
async fn a_deleted_entry_ends_its_streams_with_permission_denied() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let entry = ca.entry("short-lived", "node-del", &[&me()]).await;
    let agent = Agent::start(&ca, "node-del", Duration::from_secs(10)).await;
    let mut client = agent.client().await;
    let mut svids = client
        .fetch_x509svid(client::request(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(svids.message().await.unwrap().is_some());
    let mut jwks = client
        .fetch_jwt_bundles(client::request(pb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(jwks.message().await.unwrap().is_some());

    ca.admin()
        .await
        .delete_entry(ca_pb::DeleteEntryRequest { id: entry })
        .await
        .unwrap();
    for ended in [
        tokio::time::timeout(PATIENCE, svids.message())
            .await
            .unwrap(),
        tokio::time::timeout(PATIENCE, jwks.message())
            .await
            .unwrap()
            .map(|_| None),
    ] {
        let err = ended.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn garbage_on_the_socket_does_not_stop_the_agent() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("me", "node-garbage", &[&me()]).await;
    let agent = Agent::start(&ca, "node-garbage", Duration::from_secs(10)).await;

    let garbage: [&[u8]; 4] = [
        b"\x00\x01\x02garbage\xff\xfe",
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        // A valid HTTP/2 preface, then a frame header claiming 16 MiB of a bogus frame type.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x42\x00\x00\x00\x00\x01rest",
        // A preface, an empty SETTINGS, then HEADERS on stream 1 with an undecodable HPACK block.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x03\x01\x05\x00\x00\x00\x01\xff\xff\xff",
    ];
    for bytes in garbage {
        let mut raw = tokio::net::UnixStream::connect(&agent.socket)
            .await
            .unwrap();
        let _ = raw.write_all(bytes).await;
        let mut sink = Vec::new();
        // The agent answers (or not) and closes; it must not hang or fall over.
        let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    }
    // A well-formed gRPC call whose message is not a protobuf: refused, and the server stays.
    let status = raw_grpc_call(
        &agent.socket,
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        b"\x00\x00\x00\x00\x05\xff\xff\xff\xff\xff",
    )
    .await;
    assert!(status.as_deref().is_some_and(|s| s != "0"), "{status:?}");
    let mut client = agent.client().await;
    let response = first_x509(&mut client).await;
    assert_eq!(response.svids.len(), 1);
    agent.stop().await;
}

/// Sends one gRPC request with `body` as its raw (framed) message over HTTP/2; returns the
/// `grpc-status` of the answer.
async fn raw_grpc_call(
    socket: &std::path::Path,
    path: &str,
    body: &'static [u8],
) -> Option<String> {
    use http_body_util::{BodyExt as _, Full};
    let io = hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await.unwrap());
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(SECURITY_HEADER, "true")
        .body(Full::new(body))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let in_headers = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let collected = response.into_body().collect().await.unwrap();
    in_headers.or_else(|| {
        collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
    })
}

#[test]
fn the_security_header_must_say_true() {
    let mut metadata = MetadataMap::new();
    assert!(!has_security_header(&metadata));
    metadata.insert(SECURITY_HEADER, "1".parse().unwrap());
    assert!(!has_security_header(&metadata));
    metadata.insert(SECURITY_HEADER, "true".parse().unwrap());
    assert!(has_security_header(&metadata));
    metadata.insert(SECURITY_HEADER, "TRUE".parse().unwrap());
    assert!(has_security_header(&metadata));
}

#[test]
fn claims_become_a_protobuf_struct() {
    let claims: serde_json::Value = serde_json::json!({
        "sub": "spiffe://td/a", "aud": ["x", "y"], "exp": 1_700_000_000, "n": null,
        "ok": true, "nested": {"k": 1.5}
    });
    let serde_json::Value::Object(map) = claims else {
        unreachable!()
    };
    let fields = json_struct(map).fields;
    use prost_types::value::Kind;
    assert_eq!(
        fields["sub"].kind,
        Some(Kind::StringValue("spiffe://td/a".into()))
    );
    assert_eq!(fields["exp"].kind, Some(Kind::NumberValue(1_700_000_000.0)));
    assert_eq!(fields["n"].kind, Some(Kind::NullValue(0)));
    assert_eq!(fields["ok"].kind, Some(Kind::BoolValue(true)));
    let Some(Kind::ListValue(aud)) = &fields["aud"].kind else {
        panic!("aud is a list")
    };
    assert_eq!(aud.values.len(), 2);
    let Some(Kind::StructValue(nested)) = &fields["nested"].kind else {
        panic!("nested is a struct")
    };
    assert_eq!(nested.fields["k"].kind, Some(Kind::NumberValue(1.5)));
}

#[test]
fn every_error_maps_to_its_code() {
    let cases = [
        (WorkloadApiError::MissingHeader, Code::InvalidArgument),
        (
            WorkloadApiError::Caller(CallerError::Unidentified("x")),
            Code::PermissionDenied,
        ),
        (
            WorkloadApiError::Caller(CallerError::Attest(AttestError::ProcessGone(7))),
            Code::PermissionDenied,
        ),
        (
            WorkloadApiError::NoIdentity {
                selectors: String::new(),
            },
            Code::PermissionDenied,
        ),
        (WorkloadApiError::NoAudience, Code::InvalidArgument),
        (
            WorkloadApiError::NotEntitled(id("a")),
            Code::PermissionDenied,
        ),
        (WorkloadApiError::NoToken, Code::InvalidArgument),
        (
            WorkloadApiError::InvalidJwt(JwtError::MissingKeyId),
            Code::InvalidArgument,
        ),
        (
            WorkloadApiError::Mint(CacheError::UnknownIdentity(id("a"))),
            Code::PermissionDenied,
        ),
        (
            WorkloadApiError::Mint(CacheError::NoAudience),
            Code::InvalidArgument,
        ),
        (WorkloadApiError::NoJwtBundle, Code::Unavailable),
    ];
    for (error, code) in cases {
        assert_eq!(error.to_status().code(), code, "{error}");
    }
    // Attestation details stay in the log.
    let status = WorkloadApiError::Caller(CallerError::Attest(AttestError::Io {
        pid: 7,
        path: "/proc/7/exe".into(),
        source: std::io::Error::other("secret detail"),
    }))
    .to_status();
    assert!(!status.message().contains("secret detail"), "{status:?}");
}
