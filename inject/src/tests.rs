use super::document::{self, Value};
use super::*;

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
  namespace: shop
spec:
  selector:
    matchLabels: {app: orders}
  template:
    metadata:
      labels: {app: orders}
    spec:
      containers:
      - name: app
        image: orders:1
        ports:
        - containerPort: 8080
";

fn inject_default(input: &str) -> Result<String, InjectError> {
    inject(input, &InjectOptions::default())
}

fn parse_one(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap()
}

fn pod_spec(value: &Value) -> &Value {
    value
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("spec"))
        .unwrap()
}

fn names(list: Option<&Value>) -> Vec<String> {
    match list {
        Some(Value::Seq(items)) => items
            .iter()
            .map(|i| i.get("name").and_then(Value::as_str).unwrap().to_owned())
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn split_keeps_every_byte_and_finds_markers_only_at_column_zero() {
    let input = "# lead\n---\na: 1\n--- # second\nb: |\n  ---\n  x\n...\n---\n";
    let docs = document::split(input);
    let joined: String = docs
        .iter()
        .map(|d| format!("{}{}", d.marker, d.body))
        .collect();
    assert_eq!(joined, input);
    assert_eq!(docs.len(), 5);
    assert!(docs[0].is_empty());
    assert_eq!(docs[1].body, "a: 1\n");
    assert_eq!(docs[1].first_line, 3);
    assert_eq!(docs[2].body, "b: |\n  ---\n  x\n");
    assert!(docs[3].is_empty());
    assert!(docs[4].is_empty());
}

#[test]
fn a_node_on_the_marker_line_is_part_of_the_document() {
    let docs = document::split("--- {kind: Service}\n");
    assert!(!docs[1].is_empty());
    assert_eq!(
        parse_one(&docs[1].source()).get("kind").unwrap().as_str(),
        Some("Service")
    );
}

#[test]
fn value_keeps_key_order_and_rejects_duplicates() {
    let value = parse_one("z: 1\na: [x, 2]\nm: {k: null}\n");
    let Value::Map(entries) = &value else {
        panic!()
    };
    let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["z", "a", "m"]);
    assert!(serde_saphyr::from_str::<Value>("a: 1\na: 2\n").is_err());
}

#[test]
fn a_deployment_gets_one_native_sidecar_first() {
    let out = inject_default(DEPLOYMENT).unwrap();
    let value = parse_one(&out);
    let spec = pod_spec(&value);
    assert_eq!(names(spec.get("initContainers")), ["meshward-proxy"]);
    assert_eq!(names(spec.get("containers")), ["app"]);
    assert_eq!(
        names(spec.get("volumes")),
        ["meshward-socket", "meshward-policies", "meshward-audit"]
    );
    let Some(Value::Seq(init)) = spec.get("initContainers") else {
        panic!()
    };
    let proxy = &init[0];
    assert_eq!(proxy.get("restartPolicy").unwrap().as_str(), Some("Always"));
    let strings = |key: &str| -> Vec<&str> {
        match proxy.get(key) {
            Some(Value::Seq(items)) => items.iter().map(|a| a.as_str().unwrap()).collect(),
            _ => panic!("no {key}"),
        }
    };
    assert_eq!(strings("command"), ["/usr/local/bin/meshward-proxy"]);
    let args = strings("args");
    assert_eq!(args[0], "run");
    assert!(
        args.windows(2)
            .any(|w| w == ["--inbound", "0.0.0.0:15006=127.0.0.1:8080"])
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--socket", "/run/meshward/agent.sock"])
    );
    // The user's keys keep their order.
    let Value::Map(top) = &value else { panic!() };
    let keys: Vec<&str> = top.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["apiVersion", "kind", "metadata", "spec"]);
}

#[test]
fn injecting_twice_changes_nothing() {
    let once = inject_default(DEPLOYMENT).unwrap();
    assert_ne!(once, DEPLOYMENT);
    assert_eq!(inject_default(&once).unwrap(), once);
}

#[test]
fn other_kinds_and_foreign_groups_pass_through_byte_for_byte() {
    let input = "# a comment\napiVersion: v1\nkind: Service\nmetadata: {name: s}  # inline\nspec:\n  ports: [{port: 80}]\n---\napiVersion: example.com/v1\nkind: Deployment\nspec: {template: {spec: {containers: []}}}\n";
    assert_eq!(inject_default(input).unwrap(), input);
}

#[test]
fn every_workload_kind_is_injected() {
    let template =
        "{metadata: {}, spec: {containers: [{name: a, image: i, ports: [{containerPort: 80}]}]}}";
    let cases = [
        ("v1", "Pod", None),
        ("apps/v1", "StatefulSet", Some("spec.template")),
        ("apps/v1", "DaemonSet", Some("spec.template")),
        ("apps/v1", "ReplicaSet", Some("spec.template")),
        ("v1", "ReplicationController", Some("spec.template")),
        ("batch/v1", "Job", Some("spec.template")),
        (
            "batch/v1",
            "CronJob",
            Some("spec.jobTemplate.spec.template"),
        ),
        ("v1", "PodTemplate", Some("template")),
    ];
    for (api, kind, path) in cases {
        let input = match (kind, path) {
            ("Pod", _) => format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: p}}\nspec: {{containers: [{{name: a, image: i, ports: [{{containerPort: 80}}]}}]}}\n"
            ),
            ("CronJob", _) => format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: c}}\nspec: {{schedule: '* * * * *', jobTemplate: {{spec: {{template: {template}}}}}}}\n"
            ),
            ("PodTemplate", _) => format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: t}}\ntemplate: {template}\n"
            ),
            _ => format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: w}}\nspec: {{template: {template}}}\n"
            ),
        };
        let out = inject_default(&input).unwrap();
        let mut node = &parse_one(&out);
        for key in path
            .map(|p| p.split('.').collect::<Vec<_>>())
            .unwrap_or_default()
        {
            node = node.get(key).unwrap();
        }
        let spec = node.get("spec").unwrap();
        assert_eq!(
            names(spec.get("initContainers")),
            ["meshward-proxy"],
            "{kind}"
        );
    }
}

#[test]
fn list_items_are_injected() {
    let input = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n- {{apiVersion: v1, kind: ConfigMap, metadata: {{name: c}}}}\n",
        serde_json::to_string(&serde_json::to_value(parse_one(DEPLOYMENT)).unwrap()).unwrap()
    );
    let value = parse_one(&inject_default(&input).unwrap());
    let Some(Value::Seq(items)) = value.get("items") else {
        panic!()
    };
    assert_eq!(
        names(pod_spec(&items[0]).get("initContainers")),
        ["meshward-proxy"]
    );
    assert_eq!(items[1].get("kind").unwrap().as_str(), Some("ConfigMap"));
}

#[test]
fn annotations_set_the_listeners() {
    let input = DEPLOYMENT.replace(
        "      labels: {app: orders}\n",
        "      labels: {app: orders}\n      annotations:\n        meshward.io/inbound: \"8443=127.0.0.1:8080;9000=127.0.0.1:9001,tcp\"\n        meshward.io/outbound: \"15001=payments.shop.svc:15006,spiffe://example.org/ns/shop/sa/payments\"\n",
    );
    let out = inject_default(&input).unwrap();
    assert!(out.contains("0.0.0.0:8443=127.0.0.1:8080"), "{out}");
    assert!(out.contains("0.0.0.0:9000=127.0.0.1:9001,tcp"), "{out}");
    assert!(
        out.contains(
            "127.0.0.1:15001=payments.shop.svc:15006,spiffe://example.org/ns/shop/sa/payments"
        ),
        "{out}"
    );
    assert!(!out.contains("15006=127.0.0.1:8080"), "{out}");
}

#[test]
fn a_bad_listener_annotation_is_refused() {
    for (key, value) in [
        ("meshward.io/inbound", "8443"),
        ("meshward.io/inbound", "8443=nohost"),
        ("meshward.io/outbound", "15001=up:1,spiffe://example.org"),
        ("meshward.io/outbound", "15001=up:1,not-an-id"),
        ("meshward.io/inject", "maybe"),
    ] {
        let input = DEPLOYMENT.replace(
            "  name: orders\n",
            &format!("  name: orders\n  annotations: {{{key}: \"{value}\"}}\n"),
        );
        let err = inject_default(&input).unwrap_err();
        assert!(
            matches!(&err, InjectError::Annotation { key: k, value: v, .. } if *k == key && v == value),
            "{key}={value}: {err}"
        );
    }
}

#[test]
fn opt_out_on_the_template_or_the_workload_is_respected() {
    let on_owner = DEPLOYMENT.replace(
        "  name: orders\n",
        "  name: orders\n  annotations: {meshward.io/inject: \"false\"}\n",
    );
    assert_eq!(inject_default(&on_owner).unwrap(), on_owner);
    let on_template = DEPLOYMENT.replace(
        "      labels: {app: orders}\n",
        "      labels: {app: orders}\n      annotations: {meshward.io/inject: \"false\"}\n",
    );
    assert_eq!(inject_default(&on_template).unwrap(), on_template);
    // The template wins over the owner.
    let both = on_owner.replace(
        "      labels: {app: orders}\n",
        "      labels: {app: orders}\n      annotations: {meshward.io/inject: \"true\"}\n",
    );
    assert_ne!(inject_default(&both).unwrap(), both);
}

#[test]
fn host_network_is_refused_unless_allowed() {
    let input = DEPLOYMENT.replace(
        "      containers:\n",
        "      hostNetwork: true\n      containers:\n",
    );
    let err = inject_default(&input).unwrap_err();
    assert!(matches!(err, InjectError::HostNetwork { .. }), "{err}");
    assert!(
        err.to_string().contains("Deployment `shop/orders`"),
        "{err}"
    );
    let allowed = InjectOptions {
        allow_host_network: true,
        ..InjectOptions::default()
    };
    assert!(inject(&input, &allowed).is_ok());
}

#[test]
fn no_port_and_no_annotation_is_refused() {
    let input = DEPLOYMENT.replace("        ports:\n        - containerPort: 8080\n", "");
    let err = inject_default(&input).unwrap_err();
    assert!(matches!(err, InjectError::NoListener { .. }), "{err}");
}

#[test]
fn collisions_with_the_proxy_are_refused() {
    for (from, to, what) in [
        ("containerPort: 8080", "containerPort: 15020", "port"),
        (
            "containerPort: 8080",
            "{containerPort: 8080, name: mw-admin}",
            "port name",
        ),
    ] {
        let input = DEPLOYMENT.replace(from, to);
        let err = inject_default(&input).unwrap_err();
        assert!(
            matches!(&err, InjectError::Conflict { what: w, .. } if *w == what),
            "{err}"
        );
    }
    let input = DEPLOYMENT.replace(
        "      containers:\n",
        "      volumes: [{name: meshward-socket, emptyDir: {}}]\n      containers:\n",
    );
    let err = inject_default(&input).unwrap_err();
    assert!(
        matches!(
            &err,
            InjectError::Conflict {
                what: "volume name",
                ..
            }
        ),
        "{err}"
    );
    let two = DEPLOYMENT.replace(
        "      labels: {app: orders}\n",
        "      labels: {app: orders}\n      annotations: {meshward.io/inbound: \"9000=127.0.0.1:1;9000=127.0.0.1:2\"}\n",
    );
    let err = inject_default(&two).unwrap_err();
    assert!(
        matches!(
            &err,
            InjectError::Conflict {
                what: "proxy port",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn invalid_yaml_names_the_document_and_line() {
    let input = "apiVersion: v1\nkind: Service\n---\nkind: Deployment\nmetadata: [unclosed\n";
    let err = inject_default(input).unwrap_err();
    let InjectError::Yaml { document, line, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*document, 2);
    assert!((4..=6).contains(line), "{err}");
    assert!(!err.to_string().contains('\n'));
}

#[test]
fn a_malformed_pod_template_is_refused_with_its_field() {
    let input = DEPLOYMENT.replace("containerPort: 8080", "containerPort: eighty");
    let err = inject_default(&input).unwrap_err();
    let InjectError::Template { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(reason.contains("spec.template.spec"), "{err}");
    let input = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n";
    let err = inject_default(input).unwrap_err();
    assert!(
        err.to_string()
            .contains("no pod template at `spec.template`"),
        "{err}"
    );
}

#[test]
fn an_existing_init_container_runs_after_the_proxy() {
    let input = DEPLOYMENT.replace(
        "      containers:\n",
        "      initContainers:\n      - {name: migrate, image: m}\n      containers:\n",
    );
    let value = parse_one(&inject_default(&input).unwrap());
    assert_eq!(
        names(pod_spec(&value).get("initContainers")),
        ["meshward-proxy", "migrate"]
    );
}

#[test]
fn options_reach_the_sidecar() {
    let options = InjectOptions {
        image: "registry.local/meshward:dev".to_owned(),
        policies_config_map: "shop-policies".to_owned(),
        socket_dir: "/var/run/mw".to_owned(),
        allow_host_network: false,
    };
    let out = inject(DEPLOYMENT, &options).unwrap();
    assert!(out.contains("image: registry.local/meshward:dev"), "{out}");
    assert!(out.contains("name: shop-policies"), "{out}");
    assert!(out.contains("/var/run/mw/agent.sock"), "{out}");
    assert!(out.contains("path: /var/run/mw"), "{out}");
}

#[test]
fn flag_values_are_checked() {
    assert!(check_socket_dir("relative").is_err());
    assert!(check_socket_dir("/").is_err());
    assert_eq!(check_socket_dir("/run/meshward/").unwrap(), "/run/meshward");
    assert!(check_config_map_name("Policies").is_err());
    assert!(check_config_map_name("-x").is_err());
    assert!(check_config_map_name("meshward-policies").is_ok());
    assert!(check_image("a b").is_err());
    assert!(check_image("").is_err());
}
