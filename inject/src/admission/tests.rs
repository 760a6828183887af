use super::*;
use crate::inject;

const POD: &str = "\
apiVersion: v1
kind: Pod
metadata:
  generateName: orders-
  namespace: shop
  labels: {app: orders}
spec:
  initContainers:
  - name: migrate
    image: orders-migrate:1
  containers:
  - name: app
    image: orders:1
    ports:
    - containerPort: 8080
  volumes:
  - name: data
    emptyDir: {}
";

fn yaml(text: &str) -> Json {
    serde_saphyr::from_str(text).unwrap()
}

fn review_for(pod: &Json) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
            "dryRun": false,
        }
    }))
    .unwrap()
}

fn answer(body: &[u8]) -> AdmissionResponse {
    review(body, &InjectOptions::default()).unwrap().response
}

/// The pod as the CLI injects it, read back as JSON.
fn cli_injected(pod_yaml: &str) -> Json {
    yaml(&inject(pod_yaml, &InjectOptions::default()).unwrap())
}

fn apply(pod: &Json, response: &AdmissionResponse) -> Json {
    let operations = response.patch_operations().unwrap();
    let patch: json_patch::Patch = serde_json::from_value(Json::Array(operations)).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    patched
}

#[test]
fn the_patch_gives_exactly_the_cli_injection() {
    let pod = yaml(POD);
    let response = answer(&review_for(&pod));
    assert!(response.allowed);
    assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response.patch_type, Some("JSONPatch"));
    assert_eq!(apply(&pod, &response), cli_injected(POD));
    // Inserted, not replaced: the pod's own init container and volume stay where the API
    // server has them.
    let paths: Vec<_> = response
        .patch_operations()
        .unwrap()
        .iter()
        .map(|op| (op["op"].clone(), op["path"].clone()))
        .collect();
    assert_eq!(
        paths,
        [
            (json!("add"), json!("/spec/initContainers/0")),
            (json!("add"), json!("/spec/volumes/1")),
            (json!("add"), json!("/spec/volumes/2")),
            (json!("add"), json!("/spec/volumes/3")),
        ]
    );
}

#[test]
fn a_pod_without_init_containers_or_volumes_gets_both_lists() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n  - name: app\n    image: web:1\n    ports: [{containerPort: 80}]\n";
    let pod = yaml(text);
    let response = answer(&review_for(&pod));
    let patched = apply(&pod, &response);
    assert_eq!(patched, cli_injected(text));
    let init = &patched["spec"]["initContainers"][0];
    assert_eq!(init["name"], "meshward-proxy");
    assert_eq!(init["restartPolicy"], "Always");
    assert_eq!(init["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(
        patched["spec"]["volumes"][0]["hostPath"]["path"],
        "/run/meshward"
    );
}

#[test]
fn an_injected_pod_is_allowed_without_a_patch() {
    let injected = cli_injected(POD);
    let response = answer(&review_for(&injected));
    assert!(response.allowed);
    assert_eq!(response.patch, None);
    assert_eq!(response.patch_type, None);
    assert_eq!(response.status, None);
}

#[test]
fn an_opted_out_pod_is_allowed_without_a_patch() {
    let mut pod = yaml(POD);
    pod["metadata"]["annotations"] = json!({"meshward.io/inject": "false"});
    let response = answer(&review_for(&pod));
    assert!(response.allowed);
    assert_eq!(response.patch, None);
}

#[test]
fn a_pod_the_injector_refuses_is_denied_with_its_message() {
    let mut pod = yaml(POD);
    pod["spec"]["hostNetwork"] = json!(true);
    let response = answer(&review_for(&pod));
    assert!(!response.allowed);
    assert_eq!(response.patch, None);
    let status = response.status.unwrap();
    assert_eq!(status.code, 400);
    assert!(
        status
            .message
            .starts_with("Pod `shop/orders-` uses `hostNetwork: true`"),
        "{}",
        status.message
    );

    let mut pod = yaml(POD);
    pod["metadata"]["annotations"] = json!({"meshward.io/inbound": "8443"});
    let response = answer(&review_for(&pod));
    assert!(!response.allowed);
    let message = response.status.unwrap().message;
    assert!(
        message.contains("annotation `meshward.io/inbound: 8443` is invalid"),
        "{message}"
    );

    let mut pod = yaml(POD);
    pod["spec"]["containers"] = json!("not a list");
    let response = answer(&review_for(&pod));
    assert!(!response.allowed);
    let message = response.status.unwrap().message;
    assert!(message.contains("`spec` is invalid"), "{message}");
}

#[test]
fn a_request_without_an_object_is_denied() {
    let mut body: Json = serde_json::from_slice(&review_for(&yaml(POD))).unwrap();
    body["request"].as_object_mut().unwrap().remove("object");
    let response = answer(&serde_json::to_vec(&body).unwrap());
    assert!(!response.allowed);
    assert_eq!(response.patch, None);
    assert!(response.status.unwrap().message.contains("no `object`"));

    body["request"]["object"] = json!([1, 2]);
    let response = answer(&serde_json::to_vec(&body).unwrap());
    assert!(!response.allowed);
    assert!(
        response
            .status
            .unwrap()
            .message
            .contains("not a JSON object")
    );
}

#[test]
fn other_kinds_and_operations_pass_unchanged() {
    let mut body: Json = serde_json::from_slice(&review_for(&yaml(POD))).unwrap();
    body["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let response = answer(&serde_json::to_vec(&body).unwrap());
    assert!(response.allowed);
    assert_eq!(response.patch, None);
    assert_eq!(response.warnings.len(), 1);
    assert!(
        response.warnings[0].contains("`apps/v1/Deployment`"),
        "{:?}",
        response.warnings
    );

    let mut body: Json = serde_json::from_slice(&review_for(&yaml(POD))).unwrap();
    body["request"]["subResource"] = json!("status");
    let response = answer(&serde_json::to_vec(&body).unwrap());
    assert!(response.allowed);
    assert_eq!(response.patch, None);

    let mut body: Json = serde_json::from_slice(&review_for(&yaml(POD))).unwrap();
    body["request"]["operation"] = json!("UPDATE");
    let response = answer(&serde_json::to_vec(&body).unwrap());
    assert!(response.allowed);
    assert_eq!(response.patch, None);
    assert!(response.warnings.is_empty());
}

#[test]
fn malformed_reviews_are_errors_not_answers() {
    let options = InjectOptions::default();
    let err = review(b"{not json", &options).unwrap_err();
    assert!(matches!(err, ReviewError::Json(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("the body is not an AdmissionReview: ")
    );
    assert!(matches!(review(b"", &options), Err(ReviewError::Json(_))));
    assert!(matches!(
        review(b"[1]", &options),
        Err(ReviewError::Json(_))
    ));
    // A field of the wrong type is named.
    let err = review(br#"{"apiVersion": 1}"#, &options).unwrap_err();
    assert!(matches!(err, ReviewError::Json(_)), "{err}");

    let err = review(
        br#"{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}"#,
        &options,
    )
    .unwrap_err();
    assert_eq!(
        err,
        ReviewError::Version {
            api_version: "admission.k8s.io/v1beta1".to_owned(),
            kind: "AdmissionReview".to_owned()
        }
    );
    assert!(err.to_string().contains("admissionReviewVersions: [v1]"));

    let err = review(
        br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
        &options,
    )
    .unwrap_err();
    assert_eq!(err, ReviewError::NoRequest);

    let mut body: Json = serde_json::from_slice(&review_for(&yaml(POD))).unwrap();
    body["request"].as_object_mut().unwrap().remove("uid");
    let err = review(&serde_json::to_vec(&body).unwrap(), &options).unwrap_err();
    assert_eq!(err, ReviewError::NoUid);
    body["request"]["uid"] = json!("");
    let err = review(&serde_json::to_vec(&body).unwrap(), &options).unwrap_err();
    assert_eq!(err, ReviewError::NoUid);
}

#[test]
fn the_answer_is_a_v1_admission_review() {
    let pod = yaml(POD);
    let answered = review(&review_for(&pod), &InjectOptions::default()).unwrap();
    let json = serde_json::to_value(&answered).unwrap();
    assert_eq!(json["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(json["kind"], "AdmissionReview");
    assert_eq!(
        json["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(json["response"]["allowed"], true);
    assert_eq!(json["response"]["patchType"], "JSONPatch");
    assert!(json["response"]["patch"].is_string());
    assert!(json["response"].get("status").is_none());
    assert!(json["response"].get("warnings").is_none());
}

#[test]
fn array_operations_insert_or_replace() {
    let mut ops = Vec::new();
    array_operations("/a", Some(&json!([1, 2])), &json!([0, 1, 9, 2]), &mut ops);
    // Not one insertion: the whole array.
    assert_eq!(
        ops,
        [json!({"op": "add", "path": "/a", "value": [0, 1, 9, 2]})]
    );
    ops.clear();
    array_operations("/a", Some(&json!([1, 2])), &json!([1, 2]), &mut ops);
    assert!(ops.is_empty());
    array_operations("/a", Some(&Json::Null), &json!([1]), &mut ops);
    assert_eq!(ops, [json!({"op": "add", "path": "/a", "value": [1]})]);
    ops.clear();
    array_operations("/a", Some(&json!([1, 1])), &json!([1, 1, 1]), &mut ops);
    assert_eq!(ops, [json!({"op": "add", "path": "/a/2", "value": 1})]);
}
