//! Inbound HTTP over real sockets: mTLS, a Cedar decision per request, forwarding, audit.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use meshward_identity::test_util::{SvidOptions, TestPki};

#[tokio::test]
async fn an_allowed_call_reaches_the_app_with_the_normalized_path_and_our_xfcc_and_is_audited() {
    let h = Harness::http().await;
    let web = h.client(WEB);
    let response = web
        .raw(
            h.inbound(),
            b"GET /api/./v1//items/%7Euser?q=%2F#frag HTTP/1.1\r\nhost: api.shop\r\nx-forwarded-client-cert: By=spiffe://a.org/ns/shop/sa/api;URI=spiffe://a.org/ns/kube-system/sa/admin\r\nx-forwarded-client-cert: URI=spiffe://evil\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(status(&response), 200, "{response}");
    assert!(
        response.ends_with("app saw /api/v1/items/~user"),
        "{response}"
    );

    let seen = h.app.seen();
    assert_eq!(seen.len(), 1);
    // The normalized path is forwarded; the query is kept as sent.
    assert_eq!(seen[0].uri, "/api/v1/items/~user?q=%2F");
    // The caller's XFCC values are gone; exactly ours is there.
    let xfcc: Vec<_> = seen[0]
        .headers
        .get_all("x-forwarded-client-cert")
        .iter()
        .collect();
    assert_eq!(xfcc.len(), 1, "{xfcc:?}");
    let xfcc = xfcc[0].to_str().unwrap();
    assert!(xfcc.starts_with(&format!("By={API};Hash=")), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={WEB}")), "{xfcc}");

    let records = h.audit(1).await;
    let r = &records[0];
    assert_eq!(r["decision"], "allow");
    assert_eq!(r["principal"], WEB);
    assert_eq!(r["resource"], API);
    assert_eq!(r["action"], "GET");
    assert_eq!(r["mode"], "enforce");
    assert_eq!(r["policies"][0], "web-calls-api");
    assert_eq!(r["context"]["path"], "/api/v1/items/~user");
    assert_eq!(r["context"]["host"], "api.shop");
    assert_eq!(r["context"]["sourceIp"], "127.0.0.1");
    assert_eq!(r["context"]["tls"]["version"], "TLSv1.3");
    assert_eq!(r["context"]["tls"]["alpn"], "http/1.1");
    assert!(h.metrics().contains(
        r#"meshward_proxy_decisions_total{action="GET",decision="allow",mode="enforce"} 1"#
    ));
}

#[tokio::test]
async fn a_denied_call_is_403_naming_the_decision_and_the_app_sees_nothing() {
    let h = Harness::http().await;
    // No policy permits the intruder.
    let response = h
        .client(INTRUDER)
        .get(h.inbound(), "/api/items")
        .await
        .unwrap();
    assert_eq!(status(&response), 403, "{response}");
    assert!(response.contains("denied: no policy permits"), "{response}");
    // A forbid is named.
    let forbidden = h
        .client(WEB)
        .get(h.inbound(), "/admin/users")
        .await
        .unwrap();
    assert_eq!(status(&forbidden), 403, "{forbidden}");
    assert!(forbidden.contains("denied by `no-admin`"), "{forbidden}");
    assert!(h.app.seen().is_empty());

    let records = h.audit(2).await;
    assert_eq!(records[0]["decision"], "deny");
    assert_eq!(records[0]["principal"], INTRUDER);
    assert_eq!(records[0]["policies"].as_array().unwrap().len(), 0);
    // The 403 names the record's id.
    let id = records[0]["id"].as_str().unwrap();
    assert!(response.contains(&format!("(decision {id})")), "{response}");
    assert_eq!(records[1]["policies"][0], "no-admin");
    assert!(forbidden.contains(records[1]["id"].as_str().unwrap()));
}

#[tokio::test]
async fn path_bypass_vectors_are_normalized_then_decided_or_refused() {
    let h = Harness::http().await;
    let web = h.client(WEB);
    // (raw path, expected status, what the app must see if anything)
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("/api/../admin", 403, None),
        ("/api/%2e%2e/admin", 403, None),
        ("/api/%2E%2E/admin", 403, None),
        ("/api/..%2fadmin", 400, None),
        ("/api%2fadmin", 400, None),
        ("/api/%2F..%2Fadmin", 400, None),
        ("/api/%5c..%5cadmin", 400, None),
        ("/api/x%00", 400, None),
        ("//admin", 403, None),
        ("/api/./../admin", 403, None),
        ("/api/..;/admin", 400, None),
        ("/api/%C0%AF", 400, None),
        ("/api/ok#../../admin", 200, Some("/api/ok")),
        ("/api/%61%62c", 200, Some("/api/abc")),
        ("/api/../api/ok", 200, Some("/api/ok")),
    ];
    for (path, want, app_sees) in cases {
        let before = h.app.seen().len();
        let response = web.get(h.inbound(), path).await.unwrap();
        assert_eq!(status(&response), *want, "{path}: {response}");
        let seen = h.app.paths();
        match app_sees {
            Some(p) => assert_eq!(seen.last().map(String::as_str), Some(*p), "{path}"),
            None => assert_eq!(seen.len(), before, "{path} reached the app: {seen:?}"),
        }
    }
    assert!(
        h.app
            .paths()
            .iter()
            .all(|p| !p.contains("admin") && !p.contains(".."))
    );
    // Refused paths are audited as denies carrying the path error.
    let records = h.audit(cases.len()).await;
    let encoded_slash = records
        .iter()
        .find(|r| r["context"]["path"] == "/api/..%2fadmin")
        .unwrap();
    assert_eq!(encoded_slash["decision"], "deny");
    assert!(
        encoded_slash["errors"][0]
            .as_str()
            .unwrap()
            .contains("encoded `/`"),
        "{encoded_slash}"
    );
}

#[tokio::test]
async fn the_host_is_decided_lower_case_without_port() {
    let h = Harness::http().await;
    let web = h.client(WEB);
    let ok = web
        .raw(
            h.inbound(),
            b"GET /api/host HTTP/1.1\r\nhost: API.Shop:8443\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(status(&ok), 200, "{ok}");
    let other = web
        .raw(
            h.inbound(),
            b"GET /api/host HTTP/1.1\r\nhost: EVIL.shop\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(status(&other), 403, "{other}");
    assert!(other.contains("host-must-be-api-shop"), "{other}");
    let bad = web
        .raw(
            h.inbound(),
            b"GET /api/x HTTP/1.1\r\nhost: a b\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(status(&bad), 400, "{bad}");
    let records = h.audit(2).await;
    assert_eq!(records[0]["context"]["host"], "api.shop");
}

#[tokio::test]
async fn an_evaluation_error_denies_and_says_so() {
    let h = Harness::http().await;
    let response = h.client(WEB).get(h.inbound(), "/api/broken").await.unwrap();
    assert_eq!(status(&response), 403, "{response}");
    assert!(
        response.contains("evaluation error, failing closed"),
        "{response}"
    );
    assert!(h.app.seen().is_empty());
    let records = h.audit(1).await;
    assert_eq!(records[0]["decision"], "deny");
    assert!(
        records[0]["errors"][0]
            .as_str()
            .unwrap()
            .contains("broken-forbid")
    );
}

#[tokio::test]
async fn a_method_outside_the_schema_is_denied() {
    let h = Harness::http().await;
    let response = h
        .client(WEB)
        .raw(
            h.inbound(),
            b"TRACE /api/x HTTP/1.1\r\nhost: api.shop\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(status(&response), 403, "{response}");
    assert!(response.contains("`TRACE` is not an action"), "{response}");
    assert!(h.app.seen().is_empty());
    assert!(h.metrics().contains(
        r#"meshward_proxy_decisions_total{action="other",decision="deny",mode="enforce"} 1"#
    ));
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_in_the_handshake() {
    let h = Harness::http().await;
    // rustls client with no client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(h.pki.root_der()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(meshward_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(
            meshward_identity::verify::PeerVerifier::new(
                std::sync::Arc::new(
                    [meshward_identity::bundle::TrustBundle::from_pem(
                        h.pki.trust_domain().clone(),
                        &h.pki.root_pem(),
                    )
                    .unwrap()]
                    .into_iter()
                    .collect(),
                ),
                [h.pki.trust_domain().clone()],
            ),
        ))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(h.inbound()).await.unwrap();
    let outcome = async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tls = connector
            .connect(
                rustls_pki_types::ServerName::try_from("api.shop").unwrap(),
                tcp,
            )
            .await?;
        tls.write_all(b"GET /api/x HTTP/1.1\r\nhost: a\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    }
    .await;
    // TLS 1.3: the client may finish first, but the server's alert ends it before any response.
    match outcome {
        Err(_) => {}
        Ok(bytes) => assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes)),
    }
    assert!(h.app.seen().is_empty());
    eventually(Duration::from_secs(5), "tls failure counted", || {
        h.metrics()
            .contains(r#"meshward_proxy_tls_failures_total{reason="no_certificate"} 1"#)
    })
    .await;
}

async fn refused_with(h: &Harness, client: Client, reason: &str) {
    let response = client.get(h.inbound(), "/api/x").await;
    match response {
        Err(_) => {}
        Ok(text) => assert!(text.is_empty(), "{reason}: got a response {text}"),
    }
    assert!(h.app.seen().is_empty(), "{reason}: reached the app");
    let metrics_line = format!(r#"meshward_proxy_tls_failures_total{{reason="{reason}"}} 1"#);
    eventually(Duration::from_secs(5), reason, || {
        h.metrics().contains(&metrics_line)
    })
    .await;
}

#[tokio::test]
async fn a_foreign_trust_domain_is_refused() {
    let h = Harness::http().await;
    let evil = TestPki::new("evil.org");
    let (svid, key) = evil.svid("spiffe://evil.org/ns/shop/sa/web");
    refused_with(
        &h,
        Client::new(&h.pki, svid.into_chain(), key, &[]),
        "unknown_trust_domain",
    )
    .await;
}

#[tokio::test]
async fn a_same_name_root_we_do_not_trust_is_refused() {
    let h = Harness::http().await;
    let (svid, key) = h.pki.foreign_svid(WEB);
    refused_with(
        &h,
        Client::new(&h.pki, svid.into_chain(), key, &[]),
        "untrusted",
    )
    .await;
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let h = Harness::http().await;
    let now = SystemTime::now();
    let (svid, key) = h.pki.svid_with(
        WEB,
        SvidOptions {
            not_before: Some(now - Duration::from_secs(7200)),
            not_after: Some(now - Duration::from_secs(3600)),
            ..SvidOptions::default()
        },
    );
    refused_with(
        &h,
        Client::new(&h.pki, svid.into_chain(), key, &[]),
        "expired",
    )
    .await;
}

#[tokio::test]
async fn a_leaf_with_two_uri_sans_is_refused() {
    let h = Harness::http().await;
    let (chain, key) = h.pki.leaf_with_two_uri_sans(WEB, INTRUDER);
    refused_with(&h, Client::new(&h.pki, chain, key, &[]), "bad_certificate").await;
}

#[tokio::test]
async fn http2_requests_are_decided_one_by_one_on_one_connection() {
    let h = Harness::http().await;
    let (svid, key) = h.pki.svid(WEB);
    let client = Client::new(&h.pki, svid.into_chain(), key, &[b"h2", b"http/1.1"]);
    let mut send = client.h2(h.inbound()).await;
    assert_eq!(
        h2_get(&mut send, "/api/a").await,
        (200, "app saw /api/a".to_owned())
    );
    let (status, body) = h2_get(&mut send, "/admin").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(h2_get(&mut send, "/api/../api/b").await.0, 200);
    assert_eq!(h.app.paths(), ["/api/a", "/api/b"]);
    let seen = h.app.seen();
    // The app gets HTTP/1.1 with a Host header carrying the caller's authority.
    assert_eq!(seen[0].headers["host"], "api.shop");
    let records = h.audit(3).await;
    assert_eq!(records[0]["context"]["tls"]["alpn"], "h2");
}

#[tokio::test]
async fn a_dry_run_set_is_audited_and_counted_but_never_enforced() {
    let h = Harness::with(|config, dir| {
        let dry = dir.join("dry-run");
        std::fs::create_dir_all(&dry).unwrap();
        std::fs::write(
            dry.join("strict.cedar"),
            r#"@id("nobody-deletes") forbid (principal, action == Action::"DELETE", resource);
               @id("reads-only") permit (principal, action in Action::"read", resource);"#,
        )
        .unwrap();
        config.dry_run_policies = Some(dry);
    })
    .await;
    let web = h.client(WEB);
    let response = web
        .raw(
            h.inbound(),
            b"DELETE /api/items/1 HTTP/1.1\r\nhost: api.shop\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    // Enforced set allows; the dry-run's deny changes nothing.
    assert_eq!(status(&response), 200, "{response}");
    assert_eq!(h.app.paths(), ["/api/items/1"]);
    let records = h.audit(2).await;
    assert_eq!(records[0]["mode"], "enforce");
    assert_eq!(records[0]["decision"], "allow");
    assert_eq!(records[1]["mode"], "dry-run");
    assert_eq!(records[1]["decision"], "deny");
    assert_eq!(records[1]["policies"][0], "nobody-deletes");
    let metrics = h.metrics();
    assert!(
        metrics.contains(
            r#"meshward_proxy_decisions_total{action="DELETE",decision="deny",mode="dry-run"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_broken_policy_change_is_refused_and_the_old_set_stays() {
    let h = Harness::http().await;
    let web = h.client(WEB);
    let policies = h.config.policies.clone();
    std::fs::write(
        policies.join("broken.cedar"),
        "permit (principal, action, resource) when { nonsense };",
    )
    .unwrap();
    eventually(Duration::from_secs(5), "reload failure counted", || {
        h.metrics()
            .contains("meshward_proxy_policy_reload_failures_total 1")
    })
    .await;
    assert_eq!(status(&web.get(h.inbound(), "/api/x").await.unwrap()), 200);
    // A good change is picked up: without the permit, web is denied.
    std::fs::remove_file(policies.join("broken.cedar")).unwrap();
    std::fs::write(
        policies.join("test.cedar"),
        r#"@id("no-admin") forbid (principal, action, resource) when { context.path like "/admin*" };"#,
    )
    .unwrap();
    eventually(Duration::from_secs(5), "reload", || {
        h.metrics()
            .contains("meshward_proxy_policy_reloads_total 1")
    })
    .await;
    let denied = web.get(h.inbound(), "/api/x").await.unwrap();
    assert_eq!(status(&denied), 403, "{denied}");
}
