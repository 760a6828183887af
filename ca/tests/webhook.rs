//! The injection webhook for real: the CA serving `POST /inject` over HTTPS (rustls, a test PKI
//! with an IP SAN), called by hand for every refusal, and called by the REAL kube-apiserver
//! through a MutatingWebhookConfiguration (skipped with a reason when no apiserver binary is
//! cached).
//!
//! The cached apiserver is 1.20, which predates native sidecars: it drops the init container's
//! `restartPolicy` and refuses probes on init containers. So a pod the webhook injected is refused
//! by the apiserver's own validation, naming exactly the proxy's probes at
//! `spec.initContainers[0]`: that, and nothing stored, is what these tests can observe of an
//! injection there. The patch itself is checked against `meshward inject` in
//! `inject/src/admission/tests.rs`; newer clusters store the pod as patched.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use meshward_ca::config::CaConfig;
use meshward_ca::webhook::{MAX_BODY_BYTES, WebhookConfig, WebhookServer};
use meshward_inject::InjectOptions;
use meshward_kube_fake::fixture::{create_namespace, unique_name};
use meshward_kube_fake::real::{RealApiServer, SKIP_MESSAGE};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

/// A test CA and a serving certificate for `localhost` and 127.0.0.1, written to `dir`.
struct TestPki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn test_pki(dir: &Path) -> TestPki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "meshward webhook test ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "webhook");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, leaf_cert.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().clone(),
        cert,
        key,
    }
}

fn webhook_config(pki: &TestPki, listen: &str) -> WebhookConfig {
    WebhookConfig {
        listen: listen.parse().unwrap(),
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        inject: InjectOptions {
            image: "registry.test/meshward:e2e".to_owned(),
            ..InjectOptions::default()
        },
    }
}

/// One HTTP/1.1 request over TLS, verified against the test CA; returns (status, body).
async fn call(
    addr: SocketAddr,
    pki: &TestPki,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    // A server may answer (413) before reading all of a large body; it then closes.
    let _ = tls.write_all(body).await;
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn pod(name: &str, extra_spec: Value, annotations: Value) -> Value {
    let mut spec = json!({
        "automountServiceAccountToken": false,
        "containers": [{"name": "app", "image": "orders:1", "ports": [{"containerPort": 8080}]}],
    });
    for (k, v) in extra_spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec,
    })
}

fn admission_review(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b0c7a4e-1111-4c3b-9d55-2f6d6f0d2a10",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn the_webhook_answers_only_json_admission_reviews_posted_to_inject() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki(dir.path());
    let server = WebhookServer::bind(&webhook_config(&pki, "127.0.0.1:0"))
        .await
        .unwrap();
    let addr = server.local_addr();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.serve(stop.clone()));
    let json = [("content-type", "application/json")];

    let review = admission_review(&pod("orders", json!({}), json!({})));
    let (status, body) = call(addr, &pki, "POST", "/inject", &json, &review).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(
        answer["response"]["uid"],
        "0b0c7a4e-1111-4c3b-9d55-2f6d6f0d2a10"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    // The configured image is what gets injected.
    let patch = meshward_ca_patch(&answer);
    assert_eq!(patch[0]["path"], "/spec/initContainers");
    assert_eq!(patch[0]["value"][0]["image"], "registry.test/meshward:e2e");

    // A media type with parameters is still JSON.
    let (status, _) = call(
        addr,
        &pki,
        "POST",
        "/inject",
        &[("content-type", "application/json; charset=utf-8")],
        &review,
    )
    .await;
    assert_eq!(status, 200);

    let (status, body) = call(addr, &pki, "GET", "/inject", &[], b"").await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body, "method `GET` is not allowed: send POST /inject\n");
    let (status, body) = call(addr, &pki, "POST", "/mutate", &json, &review).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("`/mutate`"), "{body}");
    let (status, body) = call(
        addr,
        &pki,
        "POST",
        "/inject",
        &[("content-type", "application/yaml")],
        &review,
    )
    .await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("`application/yaml`"), "{body}");
    let (status, _) = call(addr, &pki, "POST", "/inject", &[], &review).await;
    assert_eq!(status, 415);

    let huge = vec![b' '; MAX_BODY_BYTES + 1];
    let (status, body) = call(addr, &pki, "POST", "/inject", &json, &huge).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("over 1048576 bytes"), "{body}");

    let (status, body) = call(addr, &pki, "POST", "/inject", &json, b"{\"apiVersion\":").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.starts_with("the body is not an AdmissionReview: "),
        "{body}"
    );
    let (status, body) = call(
        addr,
        &pki,
        "POST",
        "/inject",
        &json,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body, "the AdmissionReview has no `request`\n");

    // A pod the injector refuses is denied, not let through without its proxy.
    let review = admission_review(&pod("host", json!({"hostNetwork": true}), json!({})));
    let (status, body) = call(addr, &pki, "POST", "/inject", &json, &review).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 400);
    assert!(answer["response"].get("patch").is_none());

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .unwrap()
        .unwrap();
}

fn meshward_ca_patch(answer: &Value) -> Vec<Value> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_bad_certificate_stops_the_ca_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki(dir.path());
    let mut config = CaConfig::new(
        dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        "example.org".parse().unwrap(),
    );
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let mut webhook = webhook_config(&pki, "127.0.0.1:0");
    webhook.key = pki.cert.clone();
    config.webhook = Some(webhook);
    let err = meshward_ca::server::start(config, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("the webhook key `")
            && err.to_string().contains("holds no PEM private key"),
        "{err}"
    );
}

/// What a test registers: a namespace selector on the injection label and this test's own label
/// (the apiserver may be shared with other tests), calling `url`.
async fn register(
    client: &kube::Client,
    test_label: &str,
    url: &str,
    ca_pem: &str,
    failure_policy: &str,
) -> String {
    use base64::Engine as _;
    let name = unique_name("meshward-inject-test");
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.meshward.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "Never",
            "timeoutSeconds": 10,
            "clientConfig": {
                "url": url,
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
            "namespaceSelector": {"matchExpressions": [
                {"key": "meshward.io/inject", "operator": "In", "values": ["enabled"]},
                {"key": "meshward.io/webhook-test", "operator": "In", "values": [test_label]},
            ]},
            "objectSelector": {"matchExpressions": [
                {"key": "meshward.io/inject", "operator": "NotIn", "values": ["false"]},
            ]},
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
        }],
    }))
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    name
}

async fn unregister(client: &kube::Client, name: &str) {
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
}

/// A fresh namespace, labelled for injection (and this test) or not.
async fn namespace(client: &kube::Client, labels: Option<&str>) -> String {
    let ns = create_namespace(client, "webhook").await.unwrap();
    if let Some(test_label) = labels {
        let patch = json!({"metadata": {"labels": {
            "meshward.io/inject": "enabled",
            "meshward.io/webhook-test": test_label,
        }}});
        Api::<Namespace>::all(client.clone())
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    ns
}

async fn create(client: &kube::Client, ns: &str, pod: &Value, dry_run: bool) -> kube::Result<Pod> {
    let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
    let params = PostParams {
        dry_run,
        ..PostParams::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&params, &pod)
        .await
}

async fn absent(client: &kube::Client, ns: &str, name: &str) -> bool {
    Api::<Pod>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .is_none()
}

/// Dry-runs `probe` until `done` says the webhook configuration is in effect: the apiserver
/// picks new configurations up asynchronously.
async fn until_in_effect(
    client: &kube::Client,
    ns: &str,
    probe: &Value,
    done: impl Fn(&kube::Result<Pod>) -> bool,
) {
    for _ in 0..300 {
        if done(&create(client, ns, probe, true).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the webhook configuration never took effect");
}

fn api_error(result: &kube::Result<Pod>) -> Option<&kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => Some(status),
        _ => None,
    }
}

#[tokio::test]
async fn the_real_apiserver_injects_pods_of_labelled_namespaces_only() {
    let Some(real) = RealApiServer::shared().unwrap() else {
        eprintln!("{SKIP_MESSAGE}");
        return;
    };
    let client = real.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki(dir.path());

    // The whole CA, as `meshward ca run --webhook-listen ...` starts it.
    let mut config = CaConfig::new(
        dir.path().join("ca"),
        "127.0.0.1:0".parse().unwrap(),
        "example.org".parse().unwrap(),
    );
    std::fs::create_dir_all(&config.data_dir).unwrap();
    config.webhook = Some(webhook_config(&pki, "127.0.0.1:0"));
    let stop = CancellationToken::new();
    let ca = meshward_ca::server::start(config, stop.clone())
        .await
        .unwrap();
    let addr = ca.webhook_addr.unwrap();

    let test_label = unique_name("t");
    let labelled = namespace(&client, Some(&test_label)).await;
    let plain = namespace(&client, None).await;
    let hook = register(
        &client,
        &test_label,
        &format!("https://127.0.0.1:{}/inject", addr.port()),
        &pki.ca_pem,
        "Fail",
    )
    .await;

    // The webhook's own denial comes back through the apiserver: it was called over TLS,
    // verified against the caBundle.
    let host = pod("host", json!({"hostNetwork": true}), json!({}));
    let denied_by_us = |r: &kube::Result<Pod>| {
        api_error(r).is_some_and(|e| e.message.contains("uses `hostNetwork: true`"))
    };
    until_in_effect(&client, &labelled, &host, denied_by_us).await;
    let result = create(&client, &labelled, &host, false).await;
    let status = api_error(&result).unwrap();
    assert!(
        status
            .message
            .starts_with("admission webhook \"inject.meshward.io\" denied the request: Pod `"),
        "{status:?}"
    );
    assert!(absent(&client, &labelled, "host").await);

    // An ordinary pod is patched: the apiserver validates the patched pod, and 1.20 refuses
    // exactly the proxy's probes on the new first init container (see the module doc).
    let orders = pod("orders", json!({}), json!({}));
    let result = create(&client, &labelled, &orders, false).await;
    match &result {
        Ok(stored) => {
            // A cluster with native sidecars stores the pod as patched.
            let spec = stored.spec.as_ref().unwrap();
            let init = &spec.init_containers.as_ref().unwrap()[0];
            assert_eq!(init.name, "meshward-proxy");
            assert_eq!(init.image.as_deref(), Some("registry.test/meshward:e2e"));
            let volumes = spec.volumes.as_ref().unwrap();
            assert!(volumes.iter().any(|v| v.name == "meshward-socket"));
        }
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.starts_with("Pod \"orders\" is invalid"),
                "{status:?}"
            );
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                assert!(
                    status
                        .message
                        .contains(&format!("spec.initContainers[0].{probe}: Invalid value")),
                    "{probe} missing from {status:?}"
                );
            }
            assert!(absent(&client, &labelled, "orders").await);
        }
        Err(other) => panic!("unexpected error: {other}"),
    }

    // Opted out by annotation: sent to the webhook, allowed untouched.
    let opted_out = pod(
        "opted-out",
        json!({}),
        json!({"meshward.io/inject": "false"}),
    );
    let stored = create(&client, &labelled, &opted_out, false).await.unwrap();
    assert_eq!(stored.spec.unwrap().init_containers, None);

    // Unlabelled namespace: never sent, stored untouched.
    let stored = create(&client, &plain, &orders, false).await.unwrap();
    let spec = stored.spec.unwrap();
    assert_eq!(spec.init_containers, None);
    assert_eq!(spec.volumes, None);
    assert_eq!(spec.containers.len(), 1);

    unregister(&client, &hook).await;
    stop.cancel();
    ca.wait().await.unwrap();
}

#[tokio::test]
async fn with_the_webhook_down_pods_of_labelled_namespaces_are_refused() {
    let Some(real) = RealApiServer::shared().unwrap() else {
        eprintln!("{SKIP_MESSAGE}");
        return;
    };
    let client = real.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki(dir.path());
    // A port that was bound and released: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };

    let test_label = unique_name("t");
    let labelled = namespace(&client, Some(&test_label)).await;
    let plain = namespace(&client, None).await;
    let hook = register(
        &client,
        &test_label,
        &format!("https://127.0.0.1:{port}/inject"),
        &pki.ca_pem,
        "Fail",
    )
    .await;

    let orders = pod("orders", json!({}), json!({}));
    let refused = |r: &kube::Result<Pod>| {
        api_error(r).is_some_and(|e| e.message.contains("failed calling webhook"))
    };
    until_in_effect(&client, &labelled, &orders, refused).await;
    let result = create(&client, &labelled, &orders, false).await;
    let status = api_error(&result).unwrap();
    assert!(
        status
            .message
            .contains("failed calling webhook \"inject.meshward.io\""),
        "{status:?}"
    );
    assert!(absent(&client, &labelled, "orders").await);

    // Only the labelled namespaces depend on the webhook.
    create(&client, &plain, &orders, false).await.unwrap();

    unregister(&client, &hook).await;
}
