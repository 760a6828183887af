//! What is asked: the typed request, and how it becomes Cedar entities and a Cedar context.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::RwLock;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression,
};
use meshward_identity::SpiffeId;

use super::plan::ContextNeeds;
use crate::normalize::NormalizedPath;

/// A Cedar action: an HTTP method, or `connect` for a plain TCP connection.
///
/// Only the methods in the schema exist; any other method (`TRACE`, `CONNECT`, extension
/// methods) fails to parse, and the proxy denies the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// `GET` (in `read`).
    Get,
    /// `HEAD` (in `read`).
    Head,
    /// `OPTIONS` (in `read`).
    Options,
    /// `POST` (in `write`).
    Post,
    /// `PUT` (in `write`).
    Put,
    /// `PATCH` (in `write`).
    Patch,
    /// `DELETE` (in `write`).
    Delete,
    /// A plain TCP connection.
    Connect,
}

/// An action name that is not in the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown action `{0}`: expected one of GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE, connect"
)]
pub struct UnknownActionError(pub String);

/// The TLS facts of the connection a request came over; empty strings when unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsFacts {
    /// Protocol version, e.g. `TLSv1.3`.
    pub version: String,
    /// Cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: String,
    /// Negotiated ALPN protocol, e.g. `h2`.
    pub alpn: String,
}

/// One authorization question: may `principal` do `action` on `resource`, in this context?
///
/// Built from typed, already-validated parts: a caller that is not a SPIFFE ID, a method
/// outside the schema or an un-normalized path cannot even be put into a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzRequest {
    /// The caller's workload (from its verified client certificate).
    pub principal: SpiffeId,
    /// The called workload (this proxy's own identity).
    pub resource: SpiffeId,
    /// The method, or `connect`.
    pub action: Action,
    /// The normalized path; `None` for `connect` (the context then has `path: ""`).
    pub path: Option<NormalizedPath>,
    /// The normalized host (see [`crate::normalize::normalize_host`]); empty when absent.
    pub host: String,
    /// The caller's address as the proxy saw it.
    pub source_ip: IpAddr,
    /// The TLS session's facts.
    pub tls: TlsFacts,
}

impl Action {
    /// Every action, in schema order.
    pub const ALL: [Action; 8] = [
        Action::Get,
        Action::Head,
        Action::Options,
        Action::Post,
        Action::Put,
        Action::Patch,
        Action::Delete,
        Action::Connect,
    ];

    /// The Cedar action id (`GET`, ..., `connect`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Get => "GET",
            Action::Head => "HEAD",
            Action::Options => "OPTIONS",
            Action::Post => "POST",
            Action::Put => "PUT",
            Action::Patch => "PATCH",
            Action::Delete => "DELETE",
            Action::Connect => "connect",
        }
    }

    /// The HTTP method for the context's `method`; empty for `connect`.
    pub fn method(self) -> &'static str {
        match self {
            Action::Connect => "",
            other => other.as_str(),
        }
    }
}

impl FromStr for Action {
    type Err = UnknownActionError;

    /// Parses a method exactly as sent (methods are case-sensitive, RFC 9110 §9.1), or `connect`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownActionError(s.to_owned()))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AuthzRequest {
    /// An HTTP request with the given method, normalized path and host; no TLS facts.
    pub fn http(
        principal: SpiffeId,
        resource: SpiffeId,
        action: Action,
        path: NormalizedPath,
        host: impl Into<String>,
        source_ip: IpAddr,
    ) -> Self {
        Self {
            principal,
            resource,
            action,
            path: Some(path),
            host: host.into(),
            source_ip,
            tls: TlsFacts::default(),
        }
    }

    /// A plain TCP connection (`connect`); `host` is the TLS server name or empty.
    pub fn connect(
        principal: SpiffeId,
        resource: SpiffeId,
        host: impl Into<String>,
        source_ip: IpAddr,
    ) -> Self {
        Self {
            principal,
            resource,
            action: Action::Connect,
            path: None,
            host: host.into(),
            source_ip,
            tls: TlsFacts::default(),
        }
    }

    /// The Cedar context record: `method`, `path`, `host`, `sourceIp`, `tls` — those of them
    /// `needs` names ([`ContextNeeds::ALL`] for all; see `plan.rs` for why fewer are enough).
    pub(crate) fn context(&self, ips: &IpCache, needs: &ContextNeeds) -> Result<Context, String> {
        let mut pairs = Vec::with_capacity(5);
        if needs.has("method") {
            pairs.push((
                "method".to_owned(),
                RestrictedExpression::new_string(self.action.method().to_owned()),
            ));
        }
        if needs.has("path") {
            let path = self.path.as_ref().map(NormalizedPath::as_str).unwrap_or("");
            pairs.push((
                "path".to_owned(),
                RestrictedExpression::new_string(path.to_owned()),
            ));
        }
        if needs.has("host") {
            pairs.push((
                "host".to_owned(),
                RestrictedExpression::new_string(self.host.clone()),
            ));
        }
        if needs.has("sourceIp") {
            pairs.push(("sourceIp".to_owned(), ips.expression(self.source_ip)));
        }
        if needs.has("tls") {
            let tls = RestrictedExpression::new_record([
                (
                    "version".to_owned(),
                    RestrictedExpression::new_string(self.tls.version.clone()),
                ),
                (
                    "cipher".to_owned(),
                    RestrictedExpression::new_string(self.tls.cipher.clone()),
                ),
                (
                    "alpn".to_owned(),
                    RestrictedExpression::new_string(self.tls.alpn.clone()),
                ),
            ])
            .map_err(|e| format!("cannot build the tls context record: {e}"))?;
            pairs.push(("tls".to_owned(), tls));
        }
        Context::from_pairs(pairs).map_err(|e| format!("cannot build the request context: {e}"))
    }
}

/// Most source addresses whose Cedar `ip(...)` expression is kept; then the cache starts over.
const IP_CACHE_CAPACITY: usize = 4096;

/// Cedar `ip("...")` expressions by address.
///
/// Building one parses the name `ip` with Cedar's full parser each time (microseconds, more
/// than the rest of a decision); a sidecar sees few distinct caller addresses, so keep them.
#[derive(Debug, Default)]
pub(crate) struct IpCache {
    expressions: RwLock<HashMap<IpAddr, RestrictedExpression>>,
}

impl IpCache {
    pub(crate) fn expression(&self, ip: IpAddr) -> RestrictedExpression {
        // A poisoned lock only means a panic elsewhere mid-insert; the map is still valid.
        if let Some(e) = self
            .expressions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
        {
            return e.clone();
        }
        let expression = RestrictedExpression::new_ip(ip.to_string());
        let mut expressions = self.expressions.write().unwrap_or_else(|e| e.into_inner());
        if expressions.len() >= IP_CACHE_CAPACITY {
            expressions.clear();
        }
        expressions.insert(ip, expression.clone());
        expression
    }
}

/// The Cedar entity types and action UIDs, parsed once.
#[derive(Debug)]
pub(crate) struct EntityTypes {
    workload: EntityTypeName,
    namespace: EntityTypeName,
    trust_domain: EntityTypeName,
    actions: Vec<(Action, EntityUid)>,
    pub(crate) ips: IpCache,
}

/// Where a workload sits in the hierarchy: its UID and its ancestors' UIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkloadPlace {
    pub(crate) uid: EntityUid,
    pub(crate) namespace: Option<EntityUid>,
    pub(crate) trust_domain: EntityUid,
    namespace_name: String,
    service_account: String,
    trust_domain_name: String,
}

impl EntityTypes {
    pub(crate) fn new() -> Result<Self, String> {
        let parse = |name: &str| {
            EntityTypeName::from_str(name).map_err(|e| format!("entity type `{name}`: {e}"))
        };
        let action_type = parse("Action")?;
        let actions = Action::ALL
            .into_iter()
            .map(|a| {
                (
                    a,
                    EntityUid::from_type_name_and_id(
                        action_type.clone(),
                        EntityId::new(a.as_str()),
                    ),
                )
            })
            .collect();
        Ok(Self {
            workload: parse("Workload")?,
            namespace: parse("Namespace")?,
            trust_domain: parse("TrustDomain")?,
            actions,
            ips: IpCache::default(),
        })
    }

    pub(crate) fn action_uid(&self, action: Action) -> Result<&EntityUid, String> {
        self.actions
            .iter()
            .find(|(a, _)| *a == action)
            .map(|(_, uid)| uid)
            .ok_or_else(|| format!("unknown action `{action}`"))
    }

    /// `spiffe://td/ns/<ns>/sa/<sa>` is in `Namespace::"<ns>"` and `TrustDomain::"<td>"`;
    /// any other ID is in its trust domain only.
    pub(crate) fn place(&self, id: &SpiffeId) -> WorkloadPlace {
        let segments: Vec<&str> = id.segments().collect();
        let (namespace_name, service_account) = match segments.as_slice() {
            ["ns", ns, "sa", sa] => ((*ns).to_owned(), (*sa).to_owned()),
            _ => (String::new(), String::new()),
        };
        let namespace = (!namespace_name.is_empty()).then(|| {
            EntityUid::from_type_name_and_id(self.namespace.clone(), EntityId::new(&namespace_name))
        });
        WorkloadPlace {
            uid: EntityUid::from_type_name_and_id(
                self.workload.clone(),
                EntityId::new(id.as_str()),
            ),
            namespace,
            trust_domain: EntityUid::from_type_name_and_id(
                self.trust_domain.clone(),
                EntityId::new(id.trust_domain_name()),
            ),
            namespace_name,
            service_account,
            trust_domain_name: id.trust_domain_name().to_owned(),
        }
    }

    /// The entity store for one (principal, resource) pair: both workloads, their namespaces
    /// and trust domains, and the schema's action entities (so `action in Action::"read"` works).
    pub(crate) fn entities(
        &self,
        principal: &WorkloadPlace,
        resource: &WorkloadPlace,
        schema: &cedar_policy::Schema,
    ) -> Result<Entities, String> {
        let mut entities: HashMap<EntityUid, Entity> = HashMap::new();
        for place in [principal, resource] {
            let mut parents = HashSet::from([place.trust_domain.clone()]);
            if let Some(ns) = &place.namespace {
                parents.insert(ns.clone());
                // INVARIANT: a namespace entity has no parents. Namespace names are not
                // qualified by trust domain, so giving `Namespace::"shop"` the parent
                // `TrustDomain::"a"` would make every `shop` workload of trust domain `b`
                // a member of `a` too.
                entities.insert(ns.clone(), Entity::new_no_attrs(ns.clone(), HashSet::new()));
            }
            entities.insert(
                place.trust_domain.clone(),
                Entity::new_no_attrs(place.trust_domain.clone(), HashSet::new()),
            );
            let attrs = HashMap::from([
                (
                    "trustDomain".to_owned(),
                    RestrictedExpression::new_string(place.trust_domain_name.clone()),
                ),
                (
                    "namespace".to_owned(),
                    RestrictedExpression::new_string(place.namespace_name.clone()),
                ),
                (
                    "serviceAccount".to_owned(),
                    RestrictedExpression::new_string(place.service_account.clone()),
                ),
            ]);
            let workload = Entity::new(place.uid.clone(), attrs, parents)
                .map_err(|e| format!("cannot build workload entity `{}`: {e}", place.uid))?;
            entities.insert(place.uid.clone(), workload);
        }
        // With the schema, Cedar checks these entities against it and adds the action entities.
        Entities::from_entities(entities.into_values(), Some(schema))
            .map_err(|e| format!("cannot build the entity store: {e}"))
    }
}
