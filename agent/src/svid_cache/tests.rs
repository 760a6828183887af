use std::collections::HashSet;

use meshward_identity::bundle::BundleSet;

use super::*;
use crate::config::AgentConfig;
use crate::test_ca::{TD, TestCa};

const HOUR: Duration = Duration::from_secs(3_600);
const SHORT: Duration = Duration::from_secs(30);

struct Running {
    cache: SvidCache,
    node: NodeIdentity,
    config: AgentConfig,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

async fn run_cache(ca: &TestCa, node_name: &str) -> Running {
    let config = ca.agent_config(node_name).await;
    let node = NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap();
    let client = CaClient::new(config.ca_addr.clone(), node.subscribe(), config.ca_timeout);
    let (cache, worker) = SvidCache::new(
        node.clone(),
        client,
        AgentMetrics::new(),
        config.sync_interval,
    );
    let stop = CancellationToken::new();
    let worker = tokio::spawn(worker.run(stop.clone()));
    Running {
        cache,
        node,
        config,
        stop,
        worker,
    }
}

impl Running {
    async fn synced(&self) -> Arc<CacheSnapshot> {
        self.cache
            .wait_for(Duration::from_secs(10), |s| {
                s.synced.then(|| Arc::new(s.clone()))
            })
            .await
            .expect("cache synced")
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.worker.await.unwrap();
    }
}

fn serials(snapshot: &CacheSnapshot) -> Vec<String> {
    snapshot
        .entries
        .iter()
        .map(|e| {
            e.svid
                .as_ref()
                .map(|s| s.svid.serial().to_owned())
                .unwrap_or_default()
        })
        .collect()
}

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

#[tokio::test]
async fn entries_of_this_node_are_minted_before_anyone_asks() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let web = ca.entry("web", "node-1", &["unix:uid:1000"]).await;
    let db = ca
        .entry("db", "node-1", &["unix:uid:1000", "unix:path:/usr/bin/db"])
        .await;
    ca.entry("elsewhere", "node-2", &["unix:uid:1000"]).await;
    let running = run_cache(&ca, "node-1").await;
    let snapshot = running.synced().await;

    assert_eq!(snapshot.trust_domain.as_str(), TD);
    assert!(!snapshot.jwt_bundle.is_empty());
    let ids: HashSet<&str> = snapshot
        .entries
        .iter()
        .map(|e| e.entry_id.as_str())
        .collect();
    assert_eq!(ids, HashSet::from([web.as_str(), db.as_str()]));
    let mut bundles = BundleSet::new();
    bundles.insert(snapshot.bundle.clone());
    let verifier = PeerVerifier::new(Arc::new(bundles), [snapshot.trust_domain.clone()]);
    for entry in &snapshot.entries {
        let cached = entry.svid.as_ref().expect("minted");
        assert_eq!(cached.svid.spiffe_id(), &entry.spiffe_id);
        assert!(leaf_matches_key(&cached.svid, &cached.key));
        let (leaf, rest) = cached.svid.chain().split_first().unwrap();
        verifier
            .verify(leaf, rest, PeerRole::Server, UnixTime::now())
            .unwrap();
        assert_eq!(
            entry.hint,
            format!("hint-{}", entry.spiffe_id.path().trim_start_matches('/'))
        );
    }

    // Matching: every selector of an entry must be among the workload's.
    let uid_only = snapshot.matching(&[sel("unix:uid:1000"), sel("unix:gid:1")]);
    assert_eq!(uid_only.len(), 1);
    assert_eq!(uid_only[0].entry_id, web);
    let both = snapshot.matching(&[sel("unix:path:/usr/bin/db"), sel("unix:uid:1000")]);
    assert_eq!(both.len(), 2);
    assert!(snapshot.matching(&[sel("unix:uid:1001")]).is_empty());
    assert!(snapshot.matching(&[]).is_empty());

    // JWT-SVIDs for an identity of this node, cached until half-life.
    let web_id: SpiffeId = format!("spiffe://{TD}/web").parse().unwrap();
    let aud = vec!["api".to_owned()];
    let token = running.cache.mint_jwt(&web_id, &aud).await.unwrap();
    assert_eq!(running.cache.mint_jwt(&web_id, &aud).await.unwrap(), token);
    let bundles: meshward_identity::jwt::JwtBundleSet =
        [snapshot.jwt_bundle.clone()].into_iter().collect();
    let validated =
        meshward_identity::jwt::JwtSvid::validate(&token, "api", &bundles, SystemTime::now());
    assert!(validated.is_ok(), "{validated:?}");
    let elsewhere: SpiffeId = format!("spiffe://{TD}/elsewhere").parse().unwrap();
    assert!(matches!(
        running.cache.mint_jwt(&elsewhere, &aud).await,
        Err(CacheError::UnknownIdentity(_))
    ));
    assert!(matches!(
        running.cache.mint_jwt(&web_id, &[]).await,
        Err(CacheError::NoAudience)
    ));

    // A new entry shows up at the next sync; a deleted one disappears.
    let api = ca.entry("api", "node-1", &["unix:uid:7"]).await;
    running.cache.request_sync();
    let found = running
        .cache
        .wait_for(Duration::from_secs(5), |s| {
            s.entries
                .iter()
                .find(|e| e.entry_id == api)
                .and_then(|e| e.svid.clone())
        })
        .await;
    assert!(found.is_some());
    ca.admin()
        .await
        .delete_entry(pb::DeleteEntryRequest { id: web.clone() })
        .await
        .unwrap();
    let gone = running
        .cache
        .wait_for(Duration::from_secs(5), |s| {
            (!s.entries.iter().any(|e| e.entry_id == web)).then_some(())
        })
        .await;
    assert!(gone.is_some());
    running.shutdown().await;
}

#[tokio::test]
async fn svids_are_renewed_at_half_life() {
    let ca = TestCa::start(SHORT, HOUR).await;
    ca.entry("a", "node-r", &["unix:uid:1"]).await;
    ca.entry("b", "node-r", &["unix:uid:2"]).await;
    let running = run_cache(&ca, "node-r").await;
    let first = running.synced().await;
    let minted_at = SystemTime::now();
    let before = serials(&first);
    assert!(before.iter().all(|s| !s.is_empty()));

    let renewed = running
        .cache
        .wait_for(Duration::from_secs(25), |s| {
            let now = serials(s);
            now.iter()
                .zip(&before)
                .all(|(a, b)| !a.is_empty() && a != b)
                .then(|| Arc::new(s.clone()))
        })
        .await
        .expect("renewed");
    let took = minted_at.elapsed().unwrap();
    // Half of 30s, minus at most a tenth as jitter (and the batch window).
    assert!(took >= Duration::from_secs(7), "renewed after {took:?}");
    for (old, new) in first.entries.iter().zip(&renewed.entries) {
        let (old, new) = (old.svid.as_ref().unwrap(), new.svid.as_ref().unwrap());
        assert!(new.svid.not_after() > old.svid.not_after());
        assert!(!Arc::ptr_eq(&old.key, &new.key), "a renewal uses a new key");
    }
    running.shutdown().await;
}

#[tokio::test]
async fn a_ca_outage_shorter_than_half_a_ttl_is_invisible() {
    let mut ca = TestCa::start(SHORT, HOUR).await;
    ca.entry("svc", "node-o", &["unix:uid:1"]).await;
    let running = run_cache(&ca, "node-o").await;
    let first = running.synced().await;
    let minted = first.entries[0].svid.clone().unwrap();
    let renew_at = half_life(&minted.svid);

    // Every snapshot from here on must hold a valid SVID for the entry.
    let mut snapshots = running.cache.subscribe();
    let watcher = tokio::spawn(async move {
        let mut seen = 0_usize;
        while snapshots.changed().await.is_ok() {
            let s = snapshots.borrow_and_update().clone();
            let svid = s.entries[0].svid.clone().expect("an svid is always served");
            assert!(svid.svid.not_after() > SystemTime::now());
            seen += 1;
        }
        seen
    });

    // Down from well before the renewal time (which jitter may bring up to 3s early) until after it.
    tokio::time::sleep(until(renew_at - Duration::from_secs(6), SystemTime::now())).await;
    ca.stop().await;
    let stopped_at = SystemTime::now();
    // Past the renewal time, with the CA still down: the old SVID is still served.
    tokio::time::sleep(until(renew_at, SystemTime::now()) + Duration::from_secs(1)).await;
    let during = running.cache.current();
    let served = during.entries[0]
        .svid
        .clone()
        .expect("served during the outage");
    assert_eq!(served.svid.serial(), minted.svid.serial());
    assert!(served.svid.not_after() > SystemTime::now());

    ca.resume().await;
    let outage = stopped_at.elapsed().unwrap();
    assert!(outage < SHORT / 2, "the outage lasted {outage:?}");
    let renewed = running
        .cache
        .wait_for(Duration::from_secs(10), |s| {
            s.entries[0]
                .svid
                .clone()
                .filter(|c| c.svid.serial() != minted.svid.serial())
        })
        .await
        .expect("renewed once the ca is back");
    assert!(
        SystemTime::now() < minted.svid.not_after(),
        "renewed only after expiry"
    );
    assert!(renewed.svid.not_after() > minted.svid.not_after());

    running.shutdown().await;
    assert!(watcher.await.unwrap() >= 1);
}

#[tokio::test]
async fn a_prepared_root_reaches_the_snapshot_and_the_data_dir() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("svc", "node-b", &["unix:uid:1"]).await;
    let running = run_cache(&ca, "node-b").await;
    let before = running.synced().await;
    assert_eq!(before.bundle.len(), 1);

    let prepared = ca
        .admin()
        .await
        .prepare_root(pb::RotateRequest {
            danger_force: false,
        })
        .await
        .unwrap()
        .into_inner();
    let after = running
        .cache
        .wait_for(Duration::from_secs(10), |s| {
            (s.bundle.len() == 2).then(|| Arc::new(s.clone()))
        })
        .await
        .expect("the new root arrives");
    assert!(
        after
            .bundle
            .authorities()
            .iter()
            .any(|c| c.as_ref() == prepared.certificate.as_slice())
    );
    assert!(
        after.jwt_bundle.len() >= 2,
        "the new jwt key is published too"
    );
    // The node identity has it (for verifying the CA) and kept it for the next start.
    assert_eq!(running.node.current().bundle.len(), 2);
    let on_disk =
        std::fs::read_to_string(running.config.data_dir.join(crate::node::BUNDLE_FILE)).unwrap();
    assert_eq!(on_disk.matches("BEGIN CERTIFICATE").count(), 2);
    // The client reconnected with the new bundle and still works.
    running.cache.request_sync();
    let still = running
        .cache
        .wait_for(Duration::from_secs(5), |s| s.entries[0].svid.clone())
        .await;
    assert!(still.is_some());
    running.shutdown().await;
}

#[test]
fn an_entry_without_selectors_matches_nothing() {
    let td: TrustDomain = TD.parse().unwrap();
    let snapshot = CacheSnapshot {
        trust_domain: td.clone(),
        bundle: TrustBundle::new(td.clone()),
        jwt_bundle: JwtBundle::new(td),
        entries: vec![CachedEntry {
            entry_id: "e".into(),
            spiffe_id: format!("spiffe://{TD}/x").parse().unwrap(),
            selectors: Vec::new(),
            hint: String::new(),
            svid: None,
        }],
        synced: true,
        wanted: Wanted::CHEAP,
    };
    assert!(snapshot.matching(&[sel("unix:uid:0")]).is_empty());
}

#[test]
fn jitter_stays_below_its_bound() {
    let rng = SystemRandom::new();
    for _ in 0..100 {
        assert!(jitter(&rng, Duration::from_secs(3)) < Duration::from_secs(3));
    }
    assert_eq!(jitter(&rng, Duration::ZERO), Duration::ZERO);
}

/// This test process's selectors through the given attestor, matched against `snapshot` the way
/// the Workload API does it.
async fn attest_me(
    unix: &crate::attest::unix::UnixAttestor,
    snapshot: &CacheSnapshot,
) -> Vec<Selector> {
    let attestors = crate::attest::Attestors::new(vec![Arc::new(unix.clone())]);
    attestors
        .attest_for(i32::try_from(std::process::id()).unwrap(), snapshot)
        .await
        .unwrap()
}

fn my_uid_selector() -> String {
    use std::os::unix::fs::MetadataExt as _;
    format!(
        "unix:uid:{}",
        std::fs::metadata("/proc/self").unwrap().uid()
    )
}

#[tokio::test]
async fn a_sha256_entry_matches_the_right_binary_only() {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let right = hex::encode(
        ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&exe).unwrap()).as_ref(),
    );
    let wrong = "0".repeat(64);
    let uid = my_uid_selector();
    let ca = TestCa::start(HOUR, HOUR).await;
    let good = ca
        .entry("hashed", "node-1", &[&uid, &format!("unix:sha256:{right}")])
        .await;
    ca.entry(
        "wrong-hash",
        "node-1",
        &[&uid, &format!("unix:sha256:{wrong}")],
    )
    .await;
    let running = run_cache(&ca, "node-1").await;
    let snapshot = running.synced().await;
    assert_eq!(snapshot.wanted, Wanted::ALL);

    let unix = crate::attest::unix::UnixAttestor::new();
    let selectors = attest_me(&unix, &snapshot).await;
    let matched: Vec<&str> = snapshot
        .matching(&selectors)
        .iter()
        .map(|e| e.entry_id.as_str())
        .collect();
    assert_eq!(matched, vec![good.as_str()], "{selectors:?}");
    assert_eq!(unix.binaries_hashed(), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn without_a_sha256_entry_no_binary_is_hashed() {
    let uid = my_uid_selector();
    let ca = TestCa::start(HOUR, HOUR).await;
    let mine = ca.entry("by-uid", "node-1", &[&uid]).await;
    ca.entry(
        "other",
        "node-1",
        &["unix:uid:4000000", "unix:path:/usr/bin/x"],
    )
    .await;
    let running = run_cache(&ca, "node-1").await;
    // Before the entries are known anything may be needed.
    let before = running.cache.current();
    if !before.synced {
        assert_eq!(before.wanted, Wanted::ALL);
    }
    let snapshot = running.synced().await;
    assert_eq!(snapshot.wanted, Wanted::CHEAP);

    let unix = crate::attest::unix::UnixAttestor::new();
    let selectors = attest_me(&unix, &snapshot).await;
    assert!(
        !selectors.iter().any(|s| s.value.starts_with("sha256:")),
        "{selectors:?}"
    );
    let matched: Vec<&str> = snapshot
        .matching(&selectors)
        .iter()
        .map(|e| e.entry_id.as_str())
        .collect();
    assert_eq!(matched, vec![mine.as_str()]);
    assert_eq!(unix.binaries_hashed(), 0);
    running.shutdown().await;
}

#[tokio::test]
async fn a_caller_matching_nothing_is_attested_in_full() {
    // It may be waiting for an entry not synced yet, and that entry may select on the hash.
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("other", "node-1", &["unix:uid:4000000"]).await;
    let running = run_cache(&ca, "node-1").await;
    let snapshot = running.synced().await;
    assert_eq!(snapshot.wanted, Wanted::CHEAP);
    let unix = crate::attest::unix::UnixAttestor::new();
    let selectors = attest_me(&unix, &snapshot).await;
    assert!(
        selectors.iter().any(|s| s.value.starts_with("sha256:")),
        "{selectors:?}"
    );
    assert_eq!(unix.binaries_hashed(), 1);
    running.shutdown().await;
}

#[test]
fn early_renewals_ride_along_within_a_tenth_of_the_jitter_range() {
    // 30 s SVIDs: jitter over 3 s, so riding along is limited to 0.3 s (not the 5 s window,
    // which would gather a thousand SVIDs minted together into one batch at every renewal).
    assert_eq!(ride_along(SHORT), Duration::from_millis(300));
    assert!(ride_along(SHORT) <= SHORT / 10 / 10);
    // Long SVIDs: the window caps it.
    assert_eq!(ride_along(HOUR), RENEW_BATCH_WINDOW);
    assert_eq!(ride_along(Duration::ZERO), Duration::ZERO);
}
