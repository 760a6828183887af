//! The Envoy pair's bootstrap configs: the same topology, certificates and backend as the
//! meshward pair.
//!
//! - client Envoy: a plain HTTP listener -> a cluster to the server Envoy with an
//!   `UpstreamTlsContext` (our SVID and key, the bundle as trusted CA, the server's SPIFFE ID as
//!   the only accepted URI SAN; ALPN and codec `h2` or `http/1.1`);
//! - server Envoy: a `DownstreamTlsContext` requiring a client certificate, the RBAC HTTP filter
//!   allowing exactly the caller's SPIFFE ID, XFCC set like meshward's, router to the backend.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::{Value, json};

use crate::load::Proto;

/// The client-side Envoy: plain in, mTLS out to `server`, which must be `server_id`.
pub fn client(
    listen: SocketAddr,
    server: SocketAddr,
    svid_dir: &Path,
    server_id: &str,
    proto: Proto,
) -> Value {
    let (alpn, options) = match proto {
        Proto::H1 => ("http/1.1", json!({ "http_protocol_options": {} })),
        Proto::H2 => ("h2", json!({ "http2_protocol_options": {} })),
    };
    json!({
        "static_resources": {
            "listeners": [listener("outbound", listen, None, vec![router()])],
            "clusters": [{
                "name": "upstream",
                "type": "STATIC",
                "connect_timeout": "5s",
                "load_assignment": endpoints("upstream", server),
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": options,
                    }
                },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "common_tls_context": {
                            "alpn_protocols": [alpn],
                            "tls_certificates": [certificate(svid_dir)],
                            "validation_context": {
                                "trusted_ca": { "filename": svid_dir.join("bundle.pem") },
                                "match_typed_subject_alt_names": [{
                                    "san_type": "URI",
                                    "matcher": { "exact": server_id },
                                }],
                            },
                        },
                    },
                },
            }],
        }
    })
}

/// The server-side Envoy: mTLS in (client certificate required), RBAC allowing `caller_id`,
/// then the backend.
pub fn server(listen: SocketAddr, backend: SocketAddr, svid_dir: &Path, caller_id: &str) -> Value {
    let tls = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [certificate(svid_dir)],
                "validation_context": {
                    "trusted_ca": { "filename": svid_dir.join("bundle.pem") },
                },
            },
        },
    });
    let rbac = json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "allow-caller": {
                        "permissions": [{ "any": true }],
                        "principals": [{ "authenticated": { "principal_name": { "exact": caller_id } } }],
                    }
                }
            }
        }
    });
    json!({
        "static_resources": {
            "listeners": [listener("inbound", listen, Some(tls), vec![rbac, router()])],
            "clusters": [{
                "name": "upstream",
                "type": "STATIC",
                "connect_timeout": "5s",
                "load_assignment": endpoints("upstream", backend),
            }],
        }
    })
}

fn listener(name: &str, listen: SocketAddr, tls: Option<Value>, http_filters: Vec<Value>) -> Value {
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [{
                "name": "all",
                "domains": ["*"],
                "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": "upstream" } }],
            }],
        },
        "http_filters": http_filters,
    });
    if tls.is_some()
        && let Some(map) = hcm.as_object_mut()
    {
        // What meshward does: drop any XFCC from outside, set one naming the caller.
        map.insert("forward_client_cert_details".into(), json!("SANITIZE_SET"));
        map.insert(
            "set_current_client_cert_details".into(),
            json!({ "uri": true }),
        );
    }
    let mut chain = json!({
        "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm,
        }],
    });
    if let (Some(tls), Some(map)) = (tls, chain.as_object_mut()) {
        map.insert("transport_socket".into(), tls);
    }
    json!({
        "name": name,
        "address": socket_address(listen),
        "filter_chains": [chain],
    })
}

fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
    })
}

fn certificate(svid_dir: &Path) -> Value {
    json!({
        "certificate_chain": { "filename": svid_dir.join("svid.pem") },
        "private_key": { "filename": svid_dir.join("svid.key") },
    })
}

fn endpoints(cluster: &str, addr: SocketAddr) -> Value {
    json!({
        "cluster_name": cluster,
        "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket_address(addr) } }] }],
    })
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({ "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() } })
}
