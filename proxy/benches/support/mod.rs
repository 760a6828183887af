//! Policy sets and requests of the realistic shape, shared by the authorization benchmarks.
//!
//! Every policy is `principal == caller, action == GET, resource == service` with a path
//! condition: the per-pair allow-list a mesh-wide set grows into. One `forbid` with no scope
//! (the default baseline's cross-trust-domain rule) is evaluated for every request.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use meshward_identity::SpiffeId;
use meshward_proxy::authz::{Action, AuthzRequest, PolicySchema, PolicySet};
use meshward_proxy::normalize::normalize_path;

/// Policy counts measured.
pub const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

/// Distinct (principal, resource) pairs requests rotate through (below the slice cache's bound).
pub const PAIRS: usize = 1_000;

fn caller(i: usize) -> String {
    format!("spiffe://bench.meshward/ns/team{}/sa/caller{i}", i % 50)
}

fn service(i: usize) -> String {
    format!(
        "spiffe://bench.meshward/ns/team{}/sa/service{}",
        (i / 7) % 50,
        i / 3
    )
}

/// A set of `n` policies (`n - 1` scoped permits and one unscoped forbid).
pub fn policy_set(n: usize) -> PolicySet {
    let mut text = String::from(
        "@id(\"forbid-foreign\") forbid (principal, action, resource) \
         when { principal.trustDomain != resource.trustDomain };\n",
    );
    for i in 0..n.saturating_sub(1) {
        text.push_str(&format!(
            "@id(\"p{i}\") permit (principal == Workload::\"{}\", action == Action::\"GET\", \
             resource == Workload::\"{}\") when {{ context.path like \"/api/v{}/*\" }};\n",
            caller(i),
            service(i),
            i % 5
        ));
    }
    let schema = Arc::new(PolicySchema::builtin().expect("built-in schema"));
    PolicySet::from_sources("bench", &[("bench.cedar".to_owned(), text)], schema)
        .expect("bench policies validate")
}

/// Requests that each hit one policy of a set of `n` (half allowed, half denied by path).
pub fn requests(n: usize) -> Vec<AuthzRequest> {
    let permits = n.saturating_sub(1).max(1);
    (0..PAIRS)
        .map(|k| {
            let i = (k * 7919) % permits;
            let path = if k % 2 == 0 {
                format!("/api/v{}/items/{k}", i % 5)
            } else {
                format!("/admin/{k}")
            };
            AuthzRequest::http(
                SpiffeId::parse(&caller(i)).expect("caller id"),
                SpiffeId::parse(&service(i)).expect("service id"),
                Action::Get,
                normalize_path(path.as_bytes()).expect("path"),
                "service.bench",
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            )
        })
        .collect()
}
