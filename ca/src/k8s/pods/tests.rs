use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::watcher::Event;

use super::*;

fn pod(name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "shop", "name": name, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
        "status": {"phase": phase},
    }))
    .unwrap()
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://example.org/ns/shop/sa/{sa}")).unwrap()
}

fn synced(pods: Vec<Pod>) -> PodIndex {
    let mut index = PodIndex::default();
    assert!(!index.apply(Event::Init));
    for pod in pods {
        assert!(!index.apply(Event::InitApply(pod)));
    }
    assert!(index.apply(Event::InitDone), "InitDone completes a list");
    index
}

#[test]
fn the_index_holds_running_pods_by_node_only() {
    let index = synced(vec![
        pod("web", "u1", "web", "node-a", "Running"),
        pod("db", "u2", "db", "node-b", "Running"),
        pod("new", "u3", "batch", "node-a", "Pending"),
        pod("done", "u4", "old", "node-a", "Succeeded"),
    ]);
    assert!(index.synced);
    let a = index.node("node-a");
    assert_eq!(a.node(), "node-a");
    assert!(a.entitles(&id("web"), None));
    assert!(a.entitles(&id("web"), Some("u1")));
    assert!(!a.entitles(&id("web"), Some("u2")), "another pod's uid");
    assert!(!a.entitles(&id("db"), None), "a pod of another node");
    assert!(!a.entitles(&id("batch"), None), "pending");
    assert!(!a.entitles(&id("old"), None), "finished");
    assert!(index.node("node-c").pods().is_empty());
}

#[test]
fn deletes_and_phase_changes_take_effect_at_once() {
    let mut index = synced(vec![pod("web", "u1", "web", "node-a", "Running")]);
    index.apply(Event::Apply(pod("new", "u3", "batch", "node-a", "Running")));
    assert!(index.node("node-a").entitles(&id("batch"), None));
    index.apply(Event::Apply(pod("new", "u3", "batch", "node-a", "Failed")));
    assert!(
        !index.node("node-a").entitles(&id("batch"), None),
        "left Running"
    );
    let mut terminating = pod("web", "u1", "web", "node-a", "Running");
    terminating.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    index.apply(Event::Apply(terminating));
    assert!(
        !index.node("node-a").entitles(&id("web"), None),
        "terminating"
    );
    index.apply(Event::Apply(pod("web2", "u5", "web", "node-a", "Running")));
    index.apply(Event::Delete(pod("web2", "u5", "web", "node-a", "Running")));
    assert!(index.node("node-a").pods().is_empty(), "deleted");
}

#[test]
fn a_relist_replaces_the_index_only_when_complete_and_clears_failing() {
    let mut index = synced(vec![
        pod("web", "u1", "web", "node-a", "Running"),
        pod("gone", "u2", "gone", "node-a", "Running"),
    ]);
    index.failing = true;
    index.apply(Event::Init);
    index.apply(Event::InitApply(pod(
        "web", "u1", "web", "node-a", "Running",
    )));
    assert!(
        index.failing,
        "a relist in progress does not vouch for the old index"
    );
    assert!(
        index.node("node-a").entitles(&id("gone"), None),
        "the old index stands until the relist completes"
    );
    assert!(index.apply(Event::InitDone));
    assert!(!index.failing);
    let a = index.node("node-a");
    assert!(a.entitles(&id("web"), None));
    assert!(
        !a.entitles(&id("gone"), None),
        "missing from the relist: deleted"
    );
}

#[test]
fn entitles_all_only_asks_about_pod_shaped_ids() {
    let index = synced(vec![pod("web", "u1", "web", "node-a", "Running")]);
    let a = index.node("node-a");
    assert!(a.entitles_all([("spiffe://example.org/ns/shop/sa/web", None)]));
    assert!(!a.entitles_all([
        ("spiffe://example.org/ns/shop/sa/web", None),
        ("spiffe://example.org/ns/shop/sa/other", None),
    ]));
    assert!(!a.entitles_all([("spiffe://example.org/ns/shop/sa/web", Some("u9"))]));
    // Entry-made identities and garbage are the issuer's to judge: no lookup for them.
    assert!(a.entitles_all([
        ("spiffe://example.org/app/billing", None),
        ("not an id", None)
    ]));
}
