use super::*;
use crate::selector::{FieldSelector, LabelSelector};

fn kind(resource: &str) -> &'static Kind {
    kind::core(resource).unwrap()
}

fn all(resource: &str, fields: &str) -> Filter {
    let k = kind(resource);
    Filter {
        kind: k,
        namespace: None,
        labels: LabelSelector::default(),
        fields: FieldSelector::parse(fields, k.field_labels).unwrap(),
    }
}

fn with_pod(store: &mut Store, name: &str, node: &str) -> Value {
    store
        .create(
            kind("serviceaccounts"),
            Some("default"),
            json!({"metadata": {"name": "default"}}),
        )
        .ok();
    let pod = json!({"metadata": {"name": name}, "spec": {"nodeName": node, "containers": [{"name": "c"}]}});
    store.create(kind("pods"), Some("default"), pod).unwrap()
}

fn drain(rx: &mut mpsc::UnboundedReceiver<String>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(line) = rx.try_recv() {
        out.push(serde_json::from_str(&line).unwrap());
    }
    out
}

#[test]
fn merge_patch_follows_rfc_7386() {
    let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
    merge_patch(
        &mut target,
        &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
    );
    assert_eq!(
        target,
        json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
    );
    let mut scalar = json!({"a": 1});
    merge_patch(&mut scalar, &json!("s"));
    assert_eq!(scalar, json!("s"));
}

#[test]
fn uids_are_version_4_uuids() {
    let uid = new_uid();
    let parts: Vec<&str> = uid.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12]
    );
    assert!(parts[2].starts_with('4'));
    assert_ne!(uid, new_uid());
}

#[test]
fn every_write_takes_the_next_global_revision() {
    let mut store = Store::new();
    let start = store.resource_version();
    let pod = with_pod(&mut store, "p", "n1");
    assert_eq!(pod["metadata"]["resourceVersion"], (start + 2).to_string());
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    assert_eq!(
        store
            .list(&all("pods", ""), None, None)
            .unwrap()
            .resource_version,
        start + 2
    );
}

#[test]
fn pod_with_missing_service_account_is_forbidden() {
    let mut store = Store::new();
    let pod = json!({"metadata": {"name": "p"}, "spec": {"serviceAccountName": "ghost", "containers": []}});
    let err = store
        .create(kind("pods"), Some("default"), pod)
        .unwrap_err();
    assert_eq!((err.code, err.reason), (403, "Forbidden"));
    assert!(
        err.message.contains("serviceaccount \"ghost\" not found"),
        "{}",
        err.message
    );
}

#[test]
fn create_in_missing_namespace_is_not_found() {
    let mut store = Store::new();
    let err = store
        .create(
            kind("configmaps"),
            Some("nowhere"),
            json!({"metadata": {"name": "c"}}),
        )
        .unwrap_err();
    assert_eq!(err, ApiError::not_found("namespaces", "nowhere"));
}

#[test]
fn malformed_body_is_a_bad_request() {
    let mut store = Store::new();
    let err = store
        .create(
            kind("configmaps"),
            Some("default"),
            json!({"metadata": {"name": "c"}, "data": 5}),
        )
        .unwrap_err();
    assert_eq!(err.code, 400);
}

#[test]
fn stale_update_conflicts_and_string_data_folds() {
    let mut store = Store::new();
    let secrets = kind("secrets");
    let created = store
        .create(
            secrets,
            Some("default"),
            json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}),
        )
        .unwrap();
    assert_eq!(created["data"]["k"], "dg==");
    assert!(created.get("stringData").is_none());
    store
        .update(secrets, Some("default"), "s", created.clone(), false)
        .unwrap();
    let err = store
        .update(secrets, Some("default"), "s", created, false)
        .unwrap_err();
    assert_eq!((err.code, err.reason), (409, "Conflict"));
}

#[test]
fn watch_replays_after_a_revision_and_410s_before_compaction() {
    let mut store = Store::new();
    with_pod(&mut store, "a", "n1");
    let rv = store.resource_version();
    with_pod(&mut store, "b", "n1");
    with_pod(&mut store, "c", "n2");
    let (_, mut rx) = store.watch(all("pods", "spec.nodeName=n1"), Some(rv), false);
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (
            events[0]["type"].as_str(),
            events[0]["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );

    store.compact();
    let (_, mut rx) = store.watch(all("pods", ""), Some(rv), false);
    let events = drain(&mut rx);
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);
    assert_eq!(events[0]["object"]["reason"], "Expired");
    assert!(
        rx.is_closed() || rx.try_recv().is_err(),
        "nothing after the error"
    );
}

#[test]
fn watch_from_zero_starts_with_synthetic_adds() {
    let mut store = Store::new();
    with_pod(&mut store, "a", "n1");
    let (_, mut rx) = store.watch(all("pods", ""), Some(0), false);
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "ADDED");
}

#[test]
fn garbage_continue_token_is_a_bad_request() {
    let store = Store::new();
    let err = store
        .list(&all("pods", ""), Some(1), Some("%%%"))
        .unwrap_err();
    assert_eq!(err.code, 400);
}
