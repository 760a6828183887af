//! The CA keys Secret: two replicas starting together end with ONE key; concurrent updates both land
//! (409 -> re-read -> retry). Against the fake (with a delay that makes both replicas read "absent"
//! before either creates) and the real apiserver.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use meshward_ca::k8s::{Cluster, K8sError, KEYS_SECRET, KeyFiles, ServiceAccountRef};
use meshward_identity::x509::SvidKey;
use meshward_kube_fake::FakeApiServer;
use meshward_kube_fake::fixture::create_namespace;
use meshward_kube_fake::real::{RealApiServer, SKIP_MESSAGE};

/// A replica's view of the cluster through its own client.
fn replica(config: kube::Config) -> Cluster {
    let sa: ServiceAccountRef = "meshward:meshward-agent".parse().unwrap();
    Cluster::new(kube::Client::try_from(config).unwrap(), "c1", sa).unwrap()
}

/// Freshly generated root key material (a P-256 PKCS#8 key), different every call.
fn fresh_root() -> Result<KeyFiles, K8sError> {
    let key = SvidKey::generate().unwrap();
    Ok(KeyFiles::from([(
        "root-key.der".to_owned(),
        key.to_pkcs8_der().secret_pkcs8_der().to_vec(),
    )]))
}

async fn two_replicas_end_with_one_key(admin: kube::Client, a: Cluster, b: Cluster) {
    let ns = create_namespace(&admin, "ca-keys").await.unwrap();
    let (ra, rb) = tokio::join!(
        a.load_or_create_keys(&ns, fresh_root),
        b.load_or_create_keys(&ns, fresh_root)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.files, rb.files, "both replicas hold the same key");
    assert_eq!(
        usize::from(ra.created) + usize::from(rb.created),
        1,
        "exactly one replica created the secret"
    );
    let stored: Secret = Api::namespaced(admin.clone(), &ns)
        .get(KEYS_SECRET)
        .await
        .unwrap();
    assert_eq!(
        stored.data.unwrap()["root-key.der"].0,
        ra.files["root-key.der"]
    );
    // A later start adopts it, never generating anything.
    let again = a
        .load_or_create_keys(&ns, || -> Result<KeyFiles, K8sError> {
            panic!("must not generate when the secret exists")
        })
        .await
        .unwrap();
    assert_eq!(again.files, ra.files);
    assert!(!again.created);

    // Two concurrent updates: one conflicts, re-reads and re-applies; both land.
    let add = |name: &'static str| {
        move |files: &KeyFiles| {
            let mut files = files.clone();
            files.insert(name.to_owned(), name.as_bytes().to_vec());
            Ok::<_, K8sError>(files)
        }
    };
    let (ua, ub) = tokio::join!(
        a.update_keys(&ns, add("from-a")),
        b.update_keys(&ns, add("from-b"))
    );
    ua.unwrap();
    ub.unwrap();
    let last = b.load_or_create_keys(&ns, fresh_root).await.unwrap();
    assert!(last.files.contains_key("from-a") && last.files.contains_key("from-b"));
    assert_eq!(last.files["root-key.der"], ra.files["root-key.der"]);
}

#[tokio::test]
async fn fake_two_replicas_end_with_one_key() {
    let fake = FakeApiServer::start().await.unwrap();
    // Every answer waits: both replicas read "absent" before either create lands.
    fake.delay(Duration::from_millis(50));
    let a = replica(fake.config_for_token(fake.ca_token()).await.unwrap());
    let b = replica(fake.config_for_token(fake.ca_token()).await.unwrap());
    two_replicas_end_with_one_key(fake.client().await.unwrap(), a, b).await;
    let creates = fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/secrets"))
        .count();
    assert_eq!(
        creates, 2,
        "both replicas tried to create: the race really happened"
    );
}

#[tokio::test]
async fn real_two_replicas_end_with_one_key() {
    let Some(real) = RealApiServer::shared().unwrap() else {
        eprintln!("{SKIP_MESSAGE}");
        return;
    };
    let a = replica(real.ca_config().await.unwrap());
    let b = replica(real.ca_config().await.unwrap());
    two_replicas_end_with_one_key(real.client().await.unwrap(), a, b).await;
}

#[tokio::test]
async fn an_apiserver_failure_is_an_error_not_a_new_key() {
    let fake = FakeApiServer::start().await.unwrap();
    let admin = fake.client().await.unwrap();
    let ns = create_namespace(&admin, "ca-keys").await.unwrap();
    let a = replica(fake.config_for_token(fake.ca_token()).await.unwrap());
    fake.fail_next_matching(1, 500, "/secrets");
    let err = a
        .load_or_create_keys(&ns, || -> Result<KeyFiles, K8sError> {
            panic!("must not generate when the read failed")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, K8sError::Api { .. }), "{err:?}");
}

/// The bundle ConfigMap follows the keystore: published at once, again after a root is prepared.
async fn bundle_is_published_on_every_change(admin: kube::Client, cluster: Cluster) {
    use k8s_openapi::api::core::v1::ConfigMap;
    use meshward_ca::datastore::Datastore;
    use meshward_ca::k8s::{BUNDLE_CONFIGMAP, BUNDLE_PEM_KEY, JWKS_KEY};
    use meshward_ca::keystore::Keystore;
    use std::time::SystemTime;

    let ns = create_namespace(&admin, "ca-bundle").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ds = Datastore::open(dir.path()).unwrap();
    let ks = Keystore::open(
        dir.path(),
        ds,
        "example.org".parse().unwrap(),
        None,
        Duration::from_secs(30 * 24 * 3600),
        SystemTime::now(),
    )
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(cluster.publish_bundles(ns.clone(), ks.subscribe(), shutdown.clone()));
    let maps: Api<ConfigMap> = Api::namespaced(admin, &ns);
    let published = |want: String| {
        let maps = maps.clone();
        async move {
            for _ in 0..100 {
                if let Some(map) = maps.get_opt(BUNDLE_CONFIGMAP).await.unwrap() {
                    let data = map.data.unwrap_or_default();
                    if data.get(BUNDLE_PEM_KEY) == Some(&want) {
                        return data;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("bundle configmap never showed the expected bundle");
        }
    };
    let first = ks.current();
    let data = published(first.bundle.to_pem()).await;
    assert_eq!(
        data[JWKS_KEY].as_bytes(),
        first.jwt_bundle.to_jwks_json().as_slice()
    );
    ks.prepare(SystemTime::now()).unwrap();
    let second = ks.current();
    assert_ne!(second.bundle.to_pem(), first.bundle.to_pem());
    let data = published(second.bundle.to_pem()).await;
    assert_eq!(
        data[JWKS_KEY].as_bytes(),
        second.jwt_bundle.to_jwks_json().as_slice()
    );
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn fake_bundle_is_published_on_every_change() {
    let fake = FakeApiServer::start().await.unwrap();
    let cluster = replica(fake.config_for_token(fake.ca_token()).await.unwrap());
    bundle_is_published_on_every_change(fake.client().await.unwrap(), cluster).await;
}

#[tokio::test]
async fn real_bundle_is_published_on_every_change() {
    let Some(real) = RealApiServer::shared().unwrap() else {
        eprintln!("{SKIP_MESSAGE}");
        return;
    };
    let cluster = replica(real.ca_config().await.unwrap());
    bundle_is_published_on_every_change(real.client().await.unwrap(), cluster).await;
}

/// The rotation Lease: one holder at a time; renewals keep it; expiry or release hands it over.
async fn one_rotation_lease_holder(admin: kube::Client, a: Cluster, b: Cluster) {
    use std::time::SystemTime;
    let ns = create_namespace(&admin, "ca-lease").await.unwrap();
    let d = Duration::from_secs(15);
    let t0 = SystemTime::now();
    // Racing for a fresh lease: exactly one wins.
    let (ga, gb) = tokio::join!(
        a.acquire_rotation_lease(&ns, "replica-a", d, t0),
        b.acquire_rotation_lease(&ns, "replica-b", d, t0)
    );
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    assert!(ga ^ gb, "exactly one holder: a={ga} b={gb}");
    let (holder, other, holder_name, other_name) = if ga {
        (&a, &b, "replica-a", "replica-b")
    } else {
        (&b, &a, "replica-b", "replica-a")
    };
    // The holder renews; the other cannot take a live lease.
    let t1 = t0 + Duration::from_secs(5);
    assert!(
        holder
            .acquire_rotation_lease(&ns, holder_name, d, t1)
            .await
            .unwrap()
    );
    assert!(
        !other
            .acquire_rotation_lease(&ns, other_name, d, t1)
            .await
            .unwrap()
    );
    // Not renewed for longer than its duration: taken over.
    let t2 = t1 + d + Duration::from_secs(1);
    assert!(
        other
            .acquire_rotation_lease(&ns, other_name, d, t2)
            .await
            .unwrap()
    );
    assert!(
        !holder
            .acquire_rotation_lease(&ns, holder_name, d, t2)
            .await
            .unwrap()
    );
    // Released: the first one may take it at once.
    other.release_rotation_lease(&ns, other_name).await.unwrap();
    assert!(
        holder
            .acquire_rotation_lease(&ns, holder_name, d, t2)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn fake_one_rotation_lease_holder() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.delay(Duration::from_millis(50));
    let a = replica(fake.config_for_token(fake.ca_token()).await.unwrap());
    let b = replica(fake.config_for_token(fake.ca_token()).await.unwrap());
    one_rotation_lease_holder(fake.client().await.unwrap(), a, b).await;
}

#[tokio::test]
async fn real_one_rotation_lease_holder() {
    let Some(real) = RealApiServer::shared().unwrap() else {
        eprintln!("{SKIP_MESSAGE}");
        return;
    };
    let a = replica(real.ca_config().await.unwrap());
    let b = replica(real.ca_config().await.unwrap());
    one_rotation_lease_holder(real.client().await.unwrap(), a, b).await;
}

/// A write by another replica between `update_keys`' read and its write: the write gets 409, the
/// change is re-applied to what is there now, and both writes survive. The other write is made from
/// inside the change (on another thread, so the first attempt's read is certainly stale).
async fn a_conflicting_update_is_retried(admin: kube::Client, a: Cluster, b: Cluster) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let ns = create_namespace(&admin, "ca-conflict").await.unwrap();
    a.load_or_create_keys(&ns, fresh_root).await.unwrap();
    let calls = AtomicUsize::new(0);
    let handle = tokio::runtime::Handle::current();
    let written = a
        .update_keys(&ns, |files: &KeyFiles| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                let (b, ns, handle) = (b.clone(), ns.clone(), handle.clone());
                std::thread::spawn(move || {
                    handle.block_on(b.update_keys(&ns, |files: &KeyFiles| {
                        let mut files = files.clone();
                        files.insert("from-b".to_owned(), b"b".to_vec());
                        Ok::<_, K8sError>(files)
                    }))
                })
                .join()
                .unwrap()
                .unwrap();
            }
            let mut files = files.clone();
            files.insert("from-a".to_owned(), b"a".to_vec());
            Ok::<_, K8sError>(files)
        })
        .await
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the 409 made it re-read and re-apply"
    );
    assert!(written.files.contains_key("from-a") && written.files.contains_key("from-b"));
    let stored: Secret = Api::namespaced(admin, &ns).get(KEYS_SECRET).await.unwrap();
    let data = stored.data.unwrap();
    assert!(
        data.contains_key("from-a")
            && data.contains_key("from-b")
            && data.contains_key("root-key.der")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_a_conflicting_update_is_retried() {
    let fake = FakeApiServer::start().await.unwrap();
    let a = replica(fake.config_for_token(fake.ca_token()).await.unwrap());
    let b = replica(fake.config_for_token(fake.ca_token()).await.unwrap());
    a_conflicting_update_is_retried(fake.client().await.unwrap(), a, b).await;
    let puts = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.ends_with(KEYS_SECRET))
        .count();
    assert_eq!(puts, 3, "b's write, a's conflicting write, a's retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_conflicting_update_is_retried() {
    let Some(real) = RealApiServer::shared().unwrap() else {
        eprintln!("{SKIP_MESSAGE}");
        return;
    };
    let a = replica(real.ca_config().await.unwrap());
    let b = replica(real.ca_config().await.unwrap());
    a_conflicting_update_is_retried(real.client().await.unwrap(), a, b).await;
}

/// The chart names (and grants RBAC on) exactly the objects the CA uses; its schema pins them.
#[test]
fn the_chart_names_the_objects_the_ca_uses() {
    use meshward_ca::k8s::{BUNDLE_CONFIGMAP, ROTATION_LEASE};
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/meshward");
    let values = std::fs::read_to_string(chart.join("values.yaml")).unwrap();
    let schema = std::fs::read_to_string(chart.join("values.schema.json")).unwrap();
    for (key, name) in [
        ("keySecretName", KEYS_SECRET),
        ("bundleConfigMapName", BUNDLE_CONFIGMAP),
        ("rotationLeaseName", ROTATION_LEASE),
    ] {
        assert!(
            values.lines().any(|l| l.trim() == format!("{key}: {name}")),
            "values.yaml must set `ca.{key}: {name}`"
        );
        assert!(
            schema.contains(&format!("\"{key}\": {{\"const\": \"{name}\"")),
            "values.schema.json must pin `ca.{key}` to `{name}`"
        );
    }
}
