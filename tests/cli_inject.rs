//! `meshward inject` as an operator runs it: the real binary, a manifest on stdin, the injected
//! manifest on stdout, exit codes and the one-line errors.

// A test crate: clippy's `allow-unwrap-in-tests` covers `#[test]` fns but not the helpers beside them.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn inject(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .arg("inject")
        .args(args)
        .env_remove("MESHWARD_INJECT_IMAGE")
        .env_remove("MESHWARD_INJECT_POLICIES_CONFIGMAP")
        .env_remove("MESHWARD_INJECT_SOCKET_DIR")
        .env_remove("MESHWARD_INJECT_ALLOW_HOST_NETWORK")
        .env_remove("MESHWARD_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Every document of a YAML stream, as JSON values (empty documents dropped).
fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn ok(args: &[&str], input: &str) -> String {
    let out = inject(args, input);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    stdout(&out)
}

/// Asserts a refusal: exit 1, one line on stderr containing `needle`, nothing on stdout.
fn refused(args: &[&str], input: &str, needle: &str) {
    let out = inject(args, input);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(&out));
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("meshward: "), "{err}");
    assert!(err.contains(needle), "`{needle}` not in: {err}");
}

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels:
      app: orders
  template:
    metadata:
      labels:
        app: orders
    spec:
      serviceAccountName: orders
      containers:
        - name: orders
          image: example/orders:1.0
          ports:
            - containerPort: 8080
";

const SERVICE: &str = "\
# The Service in front of the proxy's inbound port.
apiVersion: v1
kind: Service
metadata:
  name: orders   # stays as written
  namespace: shop
spec:
  selector: {app: orders}
  ports:
    - port: 443
      targetPort: mw-inbound
";

#[test]
fn a_deployment_gets_exactly_one_native_sidecar() {
    let docs = documents(&ok(&[], DEPLOYMENT));
    assert_eq!(docs.len(), 1);
    let spec = &docs[0]["spec"]["template"]["spec"];

    let init = spec["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 1);
    let proxy = &init[0];
    assert_eq!(proxy["name"], "meshward-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(
        proxy["image"],
        concat!("meshward:", env!("CARGO_PKG_VERSION"))
    );
    for probe in ["readinessProbe", "startupProbe"] {
        assert_eq!(proxy[probe]["httpGet"]["path"], "/ready", "{probe}");
        assert_eq!(proxy[probe]["httpGet"]["port"], 15020, "{probe}");
    }
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");

    // The app container is untouched and still the only one.
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0]["name"], "orders");
    assert_eq!(spec["serviceAccountName"], "orders");

    // The agent's socket directory from the node, read-only, at the same path.
    let volumes = spec["volumes"].as_array().unwrap();
    let socket = volumes
        .iter()
        .find(|v| v["name"] == "meshward-socket")
        .unwrap();
    assert_eq!(socket["hostPath"]["path"], "/run/meshward");
    assert_eq!(socket["hostPath"]["type"], "Directory");
    let mount = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "meshward-socket")
        .unwrap();
    assert_eq!(mount["mountPath"], "/run/meshward");
    assert_eq!(mount["readOnly"], true);
    let policies = volumes
        .iter()
        .find(|v| v["name"] == "meshward-policies")
        .unwrap();
    assert_eq!(policies["configMap"]["name"], "meshward-policies");

    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The image's sidecar-only binary, with `meshward proxy run`'s flags.
    assert_eq!(
        proxy["command"],
        serde_json::json!(["/usr/local/bin/meshward-proxy"])
    );
    assert_eq!(args[0], "run");
    assert!(
        args.windows(2)
            .any(|w| w == ["--socket", "/run/meshward/agent.sock"])
    );
    assert!(args.windows(2).any(|w| w == ["--admin", "0.0.0.0:15020"]));
    // In front of the first containerPort by default.
    assert!(
        args.windows(2)
            .any(|w| w == ["--inbound", "0.0.0.0:15006=127.0.0.1:8080"])
    );
}

#[test]
fn injecting_twice_gives_the_same_output() {
    let input = format!("{SERVICE}---\n{DEPLOYMENT}");
    let once = ok(&[], &input);
    let twice = ok(&[], &once);
    assert_eq!(once, twice);
    let docs = documents(&twice);
    let init = docs[1]["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap();
    assert_eq!(init.len(), 1);
}

#[test]
fn a_service_passes_through_byte_for_byte() {
    assert_eq!(ok(&[], SERVICE), SERVICE);
    let config_map = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  k: |\n    ---\n    not a marker\n...\n";
    assert_eq!(ok(&[], config_map), config_map);
}

#[test]
fn a_multi_document_stream_keeps_its_order_and_untouched_documents() {
    let input = format!(
        "{SERVICE}---\n{DEPLOYMENT}---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: orders, namespace: shop}}\n"
    );
    let out = ok(&[], &input);
    assert!(
        out.starts_with(&format!("{SERVICE}---\n")),
        "the Service changed:\n{out}"
    );
    assert!(out.ends_with(
        "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: orders, namespace: shop}\n"
    ));
    let kinds: Vec<String> = documents(&out)
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["Service", "Deployment", "ServiceAccount"]);
}

#[test]
fn invalid_yaml_is_refused_with_one_line_and_nothing_on_stdout() {
    let input = format!("{SERVICE}---\nkind: Deployment\nmetadata: {{name: [oops\n");
    refused(&[], &input, "document 2 is not valid YAML");
    refused(&[], "a: 1\na: 2\n", "duplicate mapping key `a`");
    refused(&[], "key: : value\n  - mixed\n", "not valid YAML");
}

#[test]
fn non_utf8_input_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args(["inject", "-"])
        .stdin(Stdio::from(
            std::fs::File::open(Path::new(env!("CARGO_BIN_EXE_meshward"))).unwrap(),
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("not UTF-8"), "{}", stderr(&out));
}

#[test]
fn host_network_is_refused_unless_allowed() {
    let input = DEPLOYMENT.replace(
        "      serviceAccountName: orders\n",
        "      serviceAccountName: orders\n      hostNetwork: true\n",
    );
    refused(
        &[],
        &input,
        "Deployment `shop/orders` uses `hostNetwork: true`",
    );
    let docs = documents(&ok(&["--allow-host-network"], &input));
    assert_eq!(
        docs[0]["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "meshward-proxy"
    );
}

#[test]
fn the_opt_out_annotation_is_respected() {
    let input = DEPLOYMENT.replace(
        "      labels:\n        app: orders\n",
        "      labels:\n        app: orders\n      annotations:\n        meshward.io/inject: \"false\"\n",
    );
    assert_eq!(ok(&[], &input), input);
}

#[test]
fn annotations_choose_the_listeners() {
    let input = DEPLOYMENT.replace(
        "      labels:\n        app: orders\n",
        "      labels:\n        app: orders\n      annotations:\n        meshward.io/inbound: \"8443=127.0.0.1:8080\"\n        meshward.io/outbound: \"15001=payments.shop.svc:8443,spiffe://example.org/ns/shop/sa/payments\"\n",
    );
    let docs = documents(&ok(&[], &input));
    let args = docs[0]["spec"]["template"]["spec"]["initContainers"][0]["args"].to_string();
    assert!(
        args.contains("\"--inbound\",\"0.0.0.0:8443=127.0.0.1:8080\""),
        "{args}"
    );
    assert!(args.contains("\"--outbound\",\"127.0.0.1:15001=payments.shop.svc:8443,spiffe://example.org/ns/shop/sa/payments\""), "{args}");

    let bad = input.replace("spiffe://example.org/ns/shop/sa/payments", "payments");
    refused(&[], &bad, "annotation `meshward.io/outbound");
}

#[test]
fn options_change_the_image_configmap_and_socket_dir() {
    let out = ok(
        &[
            "--image",
            "registry.example/meshward:test",
            "--policies-configmap",
            "shop-policies",
            "--socket-dir",
            "/var/run/meshward",
        ],
        DEPLOYMENT,
    );
    let docs = documents(&out);
    let spec = &docs[0]["spec"]["template"]["spec"];
    assert_eq!(
        spec["initContainers"][0]["image"],
        "registry.example/meshward:test"
    );
    let volumes = spec["volumes"].to_string();
    assert!(
        volumes.contains("\"path\":\"/var/run/meshward\""),
        "{volumes}"
    );
    assert!(volumes.contains("\"name\":\"shop-policies\""), "{volumes}");

    let out = inject(&["--socket-dir", "run/meshward"], DEPLOYMENT);
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty());
}

#[test]
fn the_shipped_example_injects_to_the_shipped_injected_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let app = std::fs::read_to_string(root.join("app.yaml")).unwrap();
    let injected = std::fs::read_to_string(root.join("app.injected.yaml")).unwrap();
    assert_eq!(
        ok(&[], &app),
        injected,
        "deploy/examples/app.injected.yaml is stale: regenerate it with `meshward inject < app.yaml`"
    );
}
