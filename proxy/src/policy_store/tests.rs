use std::time::Duration;

use prometheus_client::encoding::text::encode;

use super::*;
use crate::authz::cases::build_request;

const WEB: &str = "spiffe://a.org/ns/shop/sa/web";
const API: &str = "spiffe://a.org/ns/shop/sa/api";

fn config(dir: &Path, dry_run: Option<&Path>) -> PolicyStoreConfig {
    PolicyStoreConfig {
        policies: dir.to_owned(),
        dry_run: dry_run.map(Path::to_owned),
        schema: Arc::new(PolicySchema::builtin().unwrap()),
        poll_interval: Duration::from_millis(20),
    }
}

fn allows_get(authorizer: &Authorizer) -> bool {
    let request = build_request(WEB, "GET", API, Some("/"), None, None).unwrap();
    authorizer.decide(&request).allowed
}

const PERMIT: &str = "@id(\"allow\") permit (principal, action, resource);";
const FORBID: &str = "@id(\"deny\") forbid (principal, action, resource);";

#[test]
fn a_good_change_is_swapped_in() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), FORBID).unwrap();
    let (store, mut watcher) =
        PolicyStore::load(config(dir.path(), None), PolicyMetrics::default()).unwrap();
    let mut rx = store.subscribe();
    assert!(!allows_get(&store.current()));
    assert!(watcher.poll().is_none(), "nothing changed yet");
    std::fs::write(dir.path().join("p.cedar"), PERMIT).unwrap();
    assert!(matches!(watcher.poll(), Some(Ok(()))));
    assert!(rx.has_changed().unwrap());
    assert!(allows_get(&rx.borrow_and_update()));
    assert!(allows_get(&store.current()));
    assert_eq!(store.metrics().reloads.get(), 1);
    assert_eq!(store.metrics().reload_failures.get(), 0);
    assert_eq!(store.metrics().policies.get(), 1);
}

#[test]
fn a_broken_file_keeps_the_old_set_and_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), PERMIT).unwrap();
    let (store, mut watcher) =
        PolicyStore::load(config(dir.path(), None), PolicyMetrics::default()).unwrap();
    let before = store.current();
    // Parses, but does not validate.
    std::fs::write(
        dir.path().join("q.cedar"),
        "@id(\"q\") forbid (principal, action, resource) when { principal.team == \"x\" };",
    )
    .unwrap();
    let refused = watcher.poll().unwrap().unwrap_err();
    assert!(refused.to_string().contains("q.cedar:1:"), "{refused}");
    assert!(
        Arc::ptr_eq(&before, &store.current()),
        "the last good set stays"
    );
    assert!(allows_get(&store.current()));
    assert_eq!(store.metrics().reload_failures.get(), 1);
    // The same broken content is not retried or counted again.
    assert!(watcher.poll().is_none());
    assert_eq!(store.metrics().reload_failures.get(), 1);
    // A different broken content is.
    std::fs::write(dir.path().join("q.cedar"), "@id(\"q\") forbid (").unwrap();
    assert!(matches!(
        watcher.poll(),
        Some(Err(PolicyLoadError::Invalid { .. }))
    ));
    assert_eq!(store.metrics().reload_failures.get(), 2);
    // Fixing it swaps the fixed set in.
    std::fs::write(dir.path().join("q.cedar"), FORBID).unwrap();
    assert!(matches!(watcher.poll(), Some(Ok(()))));
    assert!(!allows_get(&store.current()));
    assert_eq!(store.metrics().reloads.get(), 1);
}

#[test]
fn a_vanished_directory_keeps_the_old_set() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("p.cedar"), PERMIT).unwrap();
    let (store, mut watcher) =
        PolicyStore::load(config(&policies, None), PolicyMetrics::default()).unwrap();
    std::fs::remove_dir_all(&policies).unwrap();
    assert!(matches!(
        watcher.poll(),
        Some(Err(PolicyLoadError::ReadDir { .. }))
    ));
    assert!(allows_get(&store.current()));
    assert_eq!(store.metrics().reload_failures.get(), 1);
}

#[test]
fn a_bad_initial_set_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.cedar"),
        "permit (principal, action, resource);",
    )
    .unwrap();
    let err = PolicyStore::load(config(dir.path(), None), PolicyMetrics::default()).unwrap_err();
    assert!(err.to_string().contains("@id"), "{err}");
}

#[test]
fn the_dry_run_directory_is_watched_too() {
    let dir = tempfile::tempdir().unwrap();
    let (enforced, dry) = (dir.path().join("enforced"), dir.path().join("dry"));
    std::fs::create_dir(&enforced).unwrap();
    std::fs::create_dir(&dry).unwrap();
    std::fs::write(enforced.join("p.cedar"), FORBID).unwrap();
    std::fs::write(dry.join("p.cedar"), FORBID).unwrap();
    let (store, mut watcher) =
        PolicyStore::load(config(&enforced, Some(&dry)), PolicyMetrics::default()).unwrap();
    std::fs::write(dry.join("p.cedar"), PERMIT).unwrap();
    assert!(matches!(watcher.poll(), Some(Ok(()))));
    let request = build_request(WEB, "GET", API, Some("/"), None, None).unwrap();
    let current = store.current();
    assert!(!current.decide(&request).allowed);
    assert!(current.decide_dry_run(&request).unwrap().allowed);
}

#[tokio::test]
async fn the_watcher_task_reloads_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), FORBID).unwrap();
    let (store, watcher) =
        PolicyStore::load(config(dir.path(), None), PolicyMetrics::default()).unwrap();
    let mut rx = store.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(watcher.run(async {
        let _ = stopped.await;
    }));
    std::fs::write(dir.path().join("p.cedar"), PERMIT).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(allows_get(&rx.borrow()));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn metrics_are_exposed_with_their_names() {
    let metrics = PolicyMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    metrics.reload_failures.inc();
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("meshward_proxy_policy_reload_failures_total 1"),
        "{text}"
    );
    assert!(
        text.contains("meshward_proxy_policy_reloads_total 0"),
        "{text}"
    );
    assert!(text.contains("meshward_proxy_policies 0"), "{text}");
}
