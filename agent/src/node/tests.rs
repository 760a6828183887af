use std::os::unix::fs::PermissionsExt as _;

use meshward_identity::proto::ca as pb;
use meshward_identity::test_util::TestPki;
use meshward_identity::x509::certs_to_pem;

use super::*;
use crate::test_ca::{TD, TestCa, eventually};

const HOUR: Duration = Duration::from_secs(3_600);

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn attests_once_then_resumes_after_a_restart_without_a_token() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let config = ca.agent_config("node-a").await;

    let first = NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap();
    let state = first.current();
    assert_eq!(
        state.svid.spiffe_id().as_str(),
        format!("spiffe://{TD}/meshward/agent/join/node-a")
    );
    assert_eq!(first.node_name(), "node-a");
    assert_eq!(mode(&config.data_dir), 0o700);
    assert_eq!(mode(&config.data_dir.join(KEY_FILE)), 0o600);
    assert!(leaf_matches_key(&state.svid, &state.key));
    assert!(!state.bundle.is_empty());
    drop(first);

    // A restart: no token at all.
    let mut restarted = config.clone();
    restarted.join_token = None;
    let resumed = NodeIdentity::establish(&restarted, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(resumed.current().svid.serial(), state.svid.serial());
    assert_eq!(
        resumed.current().bundle.authorities(),
        state.bundle.authorities()
    );

    // A restart with the (spent) token still configured resumes too, without spending anything.
    let again = NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(again.current().svid.serial(), state.svid.serial());

    // The resumed identity talks mTLS to the CA.
    let client = CaClient::new(config.ca_addr.clone(), again.subscribe(), config.ca_timeout);
    client.sync_entries().await.unwrap();
}

#[tokio::test]
async fn an_svid_that_expired_while_down_asks_for_a_new_join_token() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let mut config = ca.agent_config("node-b").await;
    let node = NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap();
    let not_after = node.current().svid.not_after();
    let later = not_after + Duration::from_secs(1);

    let spent = config.join_token.take();
    let err = NodeIdentity::establish(&config, later).await.unwrap_err();
    assert!(
        matches!(err, NodeError::ExpiredWhileDown { ref node, .. } if node == "node-b"),
        "{err:?}"
    );
    let message = err.to_string();
    assert_eq!(
        message,
        format!(
            "the agent svid in `{}` expired at {}: create a new join token for node `node-b` with `meshward ca token create --node node-b` and start the agent with `--join-token`",
            config.data_dir.display(),
            rfc3339(not_after)
        )
    );

    // The spent token still in the config is refused by the CA: the expiry is what is reported.
    config.join_token = spent;
    let err = NodeIdentity::establish(&config, later).await.unwrap_err();
    assert!(matches!(err, NodeError::ExpiredWhileDown { .. }), "{err:?}");

    // A new token for the node gets a new identity.
    config.join_token = Some(ca.token("node-b").await);
    let fresh = NodeIdentity::establish(&config, later).await.unwrap();
    assert_ne!(fresh.current().svid.serial(), node.current().svid.serial());
    assert_eq!(fresh.node_name(), "node-b");
}

#[tokio::test]
async fn no_identity_and_no_token_is_refused_by_name() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let mut config = ca.agent_config("node-c").await;
    config.join_token = None;
    let err = NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::NoJoinToken { .. }), "{err:?}");
    assert!(err.to_string().contains("--join-token"), "{err}");
}

#[tokio::test]
async fn a_refused_token_is_an_attestation_error() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let mut config = ca.agent_config("node-d").await;
    config.join_token = Some(crate::config::JoinToken::new("not-a-real-token").unwrap());
    let err = NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap_err();
    match err {
        NodeError::Attest(e) => assert!(e.is_refusal(), "{e}"),
        other => panic!("expected Attest, got {other:?}"),
    }
    assert!(!config.data_dir.join(SVID_FILE).exists());
}

#[tokio::test]
async fn a_ca_outside_the_bootstrap_bundle_is_not_trusted() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let config = ca.agent_config("node-e").await;
    // Roots of the same trust domain, but not this CA's.
    let impostor = TestPki::new(TD);
    fs::write(&config.trust_bundle, impostor.root_pem()).unwrap();
    let err = NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap_err();
    match &err {
        NodeError::Attest(CaClientError::Connect { reason, .. }) => {
            assert!(reason.contains("certificate"), "{reason}");
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

/// A CA issuing 30 s agent SVIDs, and an agent `name` attested to it: the renewal tests' start.
async fn established_with_30s_svid(name: &str) -> (TestCa, AgentConfig, NodeIdentity) {
    let ca = TestCa::start(HOUR, Duration::from_secs(30)).await;
    let config = ca.agent_config(name).await;
    let node = NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap();
    (ca, config, node)
}

#[tokio::test]
async fn the_agent_svid_is_renewed_at_half_life_and_kept_on_disk() {
    let (_ca, config, node) = established_with_30s_svid("node-f").await;
    let first = node.current();
    let renew_at = half_life(&first.svid);
    let lifetime = lifetime(&first.svid);
    assert!(
        lifetime <= Duration::from_secs(31) && lifetime >= Duration::from_secs(29),
        "{lifetime:?}"
    );

    let client = CaClient::new(config.ca_addr.clone(), node.subscribe(), config.ca_timeout);
    let stop = CancellationToken::new();
    let worker = tokio::spawn(node.clone().renew(
        client.clone(),
        AgentMetrics::new(),
        stop.clone(),
    ));
    eventually(Duration::from_secs(25), "agent svid renewal", || {
        node.current().svid.serial() != first.svid.serial()
    })
    .await;
    assert!(
        SystemTime::now() + Duration::from_secs(1) >= renew_at,
        "renewed too early"
    );
    let renewed = node.current();
    assert!(renewed.svid.not_after() > first.svid.not_after());
    assert!(!Arc::ptr_eq(&renewed.key, &first.key));

    // On disk, for the next restart.
    let on_disk = NodeStore::open(&config.data_dir)
        .unwrap()
        .load(None)
        .unwrap()
        .unwrap();
    assert_eq!(on_disk.svid.serial(), renewed.svid.serial());
    // The CA refuses the old SVID now; the client moved to the new one by itself.
    client.sync_entries().await.unwrap();

    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// A root rotation while the renewal loop waits for half-life: the CA's answer is signed by the
/// new root, which the agent learned of (`set_bundle`, as on `WatchBundle`) after the loop began
/// to wait. The answer must be checked against the bundle of that moment. Checked against the
/// one read before the wait, it was refused ("does not chain"); and while the CA still made the
/// old SVID stale at once on renewal, every later call was refused as `stale_agent_svid` until the
/// agent's SVID expired and the agent stopped (the next test covers that side).
#[tokio::test]
async fn a_renewal_after_a_root_rotation_is_checked_against_the_current_bundle() {
    let (ca, config, node) = established_with_30s_svid("node-r").await;
    let first = node.current();
    assert_eq!(first.bundle.len(), 1);
    let client = CaClient::new(config.ca_addr.clone(), node.subscribe(), config.ca_timeout);
    let stop = CancellationToken::new();
    let worker = tokio::spawn(node.clone().renew(
        client.clone(),
        AgentMetrics::new(),
        stop.clone(),
    ));
    // Let the loop start waiting with the one-root bundle.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut admin = ca.admin().await;
    admin
        .prepare_root(pb::RotateRequest::default())
        .await
        .unwrap();
    let shown = admin
        .show_bundle(pb::ShowBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let (bundle, _jwt) =
        crate::ca_client::bundle_from_proto("ShowBundle", &first.trust_domain, &shown).unwrap();
    assert_eq!(bundle.len(), 2, "the prepared root is in the bundle");
    assert!(node.set_bundle(bundle).unwrap());
    admin
        .activate_root(pb::RotateRequest::default())
        .await
        .unwrap();

    eventually(
        Duration::from_secs(25),
        "agent svid renewal under the new root",
        || node.current().svid.serial() != first.svid.serial(),
    )
    .await;
    let renewed = node.current();
    assert!(renewed.svid.not_after() > first.svid.not_after());
    assert_eq!(renewed.bundle.len(), 2);
    // The CA takes the renewed SVID: the agent is not locked out.
    client.sync_entries().await.unwrap();

    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// A renewal whose answer never reached the agent (a connection dropped after the CA signed): the
/// CA keeps the agent's SVID working until the agent presents a newer one, so the agent goes on
/// with the SVID it holds and its next renewal succeeds. When the CA made the old SVID stale as
/// soon as it signed the new one, such a lost answer locked the agent out until its SVID expired.
#[tokio::test]
async fn a_renewal_answer_the_agent_never_received_does_not_lock_it_out() {
    let (_ca, config, node) = established_with_30s_svid("node-l").await;
    let first = node.current();
    let client = CaClient::new(config.ca_addr.clone(), node.subscribe(), config.ca_timeout);

    // The CA signs a renewal; the agent never sees the answer.
    let key = SvidKey::generate().unwrap();
    let csr = make_csr(&key, first.svid.spiffe_id()).unwrap();
    let lost = client.renew_agent(csr).await.unwrap();
    drop(lost);

    // The agent goes on with the SVID it holds, and renews with it.
    client.sync_entries().await.unwrap();
    node.renew_once(&client, &first).await.unwrap();
    let renewed = node.current();
    assert_ne!(renewed.svid.serial(), first.svid.serial());
    // Its first call with the renewed SVID makes that one current ...
    client.sync_entries().await.unwrap();
    // ... and from then on the first SVID (say, a copy of its key) gets nothing.
    let (_old_tx, old_state) = watch::channel(Arc::clone(&first));
    let old = CaClient::new(config.ca_addr.clone(), old_state, config.ca_timeout);
    let err = old.sync_entries().await.unwrap_err().to_string();
    assert!(err.contains("stale_agent_svid"), "{err}");
    client.sync_entries().await.unwrap();
}

/// An agent evicted while running: every renewal is refused until its SVID expires, and then the
/// loop stops with an error that says why the renewals failed and what to do, not "unreachable".
#[tokio::test]
async fn an_svid_that_expires_because_renewals_were_refused_says_why() {
    let (ca, config, node) = established_with_30s_svid("node-e").await;
    let first = node.current();
    let mut admin = ca.admin().await;
    admin
        .evict_agent(pb::EvictAgentRequest {
            spiffe_id: first.svid.spiffe_id().to_string(),
        })
        .await
        .unwrap();

    let client = CaClient::new(config.ca_addr.clone(), node.subscribe(), config.ca_timeout);
    let outcome = tokio::time::timeout(
        Duration::from_secs(40),
        node.clone()
            .renew(client, AgentMetrics::new(), CancellationToken::new()),
    )
    .await
    .expect("the loop ends when the svid expires");
    let err = outcome.unwrap_err();
    assert!(matches!(err, NodeError::Expired { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("evicted"), "{message}");
    assert!(!message.contains("unreachable"), "{message}");
    assert!(
        message.contains("meshward ca token create --node node-e"),
        "{message}"
    );
    // Nothing was renewed: the SVID in use is still the first one.
    assert_eq!(node.current().svid.serial(), first.svid.serial());
}

#[test]
fn unusable_files_in_the_data_dir_are_refused_by_name() {
    let pki = TestPki::new(TD);
    let (svid, _key) = pki.svid(&format!("spiffe://{TD}/meshward/agent/join/n"));
    let other_key = SvidKey::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(dir.path()).unwrap();
    assert!(store.load(None).unwrap().is_none());

    // Only the SVID.
    fs::write(dir.path().join(SVID_FILE), svid.to_pem()).unwrap();
    let err = store.load(None).unwrap_err();
    assert!(matches!(err, NodeError::BadFile { .. }), "{err:?}");

    // A key that is not the SVID's.
    fs::write(dir.path().join(KEY_FILE), other_key.to_pkcs8_pem()).unwrap();
    let err = store.load(None).unwrap_err();
    assert!(
        matches!(&err, NodeError::BadFile { path, .. } if path.ends_with(KEY_FILE)),
        "{err:?}"
    );

    // Garbage instead of a key.
    fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
    assert!(matches!(
        store.load(None).unwrap_err(),
        NodeError::BadFile { .. }
    ));
}

#[test]
fn a_persisted_identity_of_another_trust_domain_is_refused() {
    let pki = TestPki::new(TD);
    let (svid, key) = pki.svid(&format!("spiffe://{TD}/meshward/agent/join/n"));
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(dir.path()).unwrap();
    store.save_svid(&svid, &key).unwrap();
    fs::write(dir.path().join(BUNDLE_FILE), pki.root_pem()).unwrap();
    assert!(store.load(None).unwrap().is_some());
    let other: TrustDomain = "other.test".parse().unwrap();
    let err = store.load(Some(&other)).unwrap_err();
    assert!(matches!(err, NodeError::TrustDomain(_)), "{err:?}");

    // A workload SVID is not an agent identity.
    let (workload, key) = pki.svid(&format!("spiffe://{TD}/web"));
    store.save_svid(&workload, &key).unwrap();
    let err = store.load(None).unwrap_err();
    assert!(matches!(err, NodeError::BadFile { .. }), "{err:?}");
}

#[test]
fn the_bootstrap_bundle_names_its_trust_domain() {
    let pki = TestPki::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.pem");
    fs::write(&path, pki.root_pem()).unwrap();
    let bundle = bootstrap_bundle(&path, None).unwrap();
    assert_eq!(bundle.trust_domain().as_str(), TD);

    // Two trust domains in one file: the operator must say which.
    let other = TestPki::new("other.test");
    fs::write(&path, format!("{}{}", pki.root_pem(), other.root_pem())).unwrap();
    assert!(matches!(
        bootstrap_bundle(&path, None),
        Err(NodeError::TrustDomain(_))
    ));
    let td: TrustDomain = TD.parse().unwrap();
    assert_eq!(bootstrap_bundle(&path, Some(&td)).unwrap().len(), 2);

    // Not PEM; missing.
    fs::write(&path, "garbage").unwrap();
    assert!(matches!(
        bootstrap_bundle(&path, None),
        Err(NodeError::BadFile { .. })
    ));
    assert!(matches!(
        bootstrap_bundle(&dir.path().join("missing.pem"), None),
        Err(NodeError::Io { .. })
    ));
    // A leaf is no root.
    let (leaf, _) = pki.svid(&format!("spiffe://{TD}/x"));
    fs::write(&path, certs_to_pem(&leaf.chain()[..1])).unwrap();
    assert!(matches!(
        bootstrap_bundle(&path, Some(&td)),
        Err(NodeError::BadFile { .. })
    ));
}

#[test]
fn half_life_ignores_the_backdated_not_before() {
    let pki = TestPki::new(TD);
    let now = SystemTime::now();
    let (svid, _) = pki.svid_with(
        &format!("spiffe://{TD}/x"),
        meshward_identity::test_util::SvidOptions {
            not_before: Some(now - NOT_BEFORE_BACKDATE),
            not_after: Some(now + Duration::from_secs(60)),
            signed_by_root: false,
        },
    );
    let renew = half_life(&svid);
    let expected = now + Duration::from_secs(30);
    let skew = renew
        .duration_since(expected)
        .unwrap_or_else(|e| e.duration());
    assert!(skew <= Duration::from_secs(1), "{skew:?}");
    assert_eq!(until(now, now + Duration::from_secs(5)), Duration::ZERO);
}

fn k8s_mode(config: &AgentConfig, token_file: &Path) -> AgentConfig {
    let mut k8s = config.clone();
    k8s.join_token = None;
    k8s.k8s = Some(crate::config::K8sAgentConfig {
        node_name: "node-a".into(),
        psat_token_file: token_file.to_path_buf(),
        kubeconfig: None,
    });
    k8s
}

#[test]
fn the_service_account_token_is_read_fresh_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    fs::write(&file, "first-token\n").unwrap();
    assert_eq!(read_psat_token(&file).unwrap(), "first-token");
    // The kubelet rotates the token by replacing the file.
    fs::write(&file, "second-token").unwrap();
    assert_eq!(read_psat_token(&file).unwrap(), "second-token");

    fs::write(&file, " \n").unwrap();
    let err = read_psat_token(&file).unwrap_err();
    assert!(matches!(err, NodeError::BadFile { .. }), "{err:?}");
    let missing = dir.path().join("absent");
    let err = read_psat_token(&missing).unwrap_err();
    assert!(
        matches!(&err, NodeError::Io { what: "read the service-account token", path, .. } if *path == missing),
        "{err:?}"
    );
}

#[tokio::test]
async fn k8s_mode_without_its_token_file_says_which_file() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let config = ca.agent_config("node-a").await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("token");
    let err = NodeIdentity::establish(&k8s_mode(&config, &missing), SystemTime::now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NodeError::Io { path, .. } if *path == missing),
        "{err:?}"
    );
}

#[tokio::test]
async fn k8s_mode_attests_again_instead_of_asking_for_a_join_token() {
    let ca = TestCa::start(HOUR, HOUR).await;
    let config = ca.agent_config("node-a").await;
    NodeIdentity::establish(&config, SystemTime::now())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    fs::write(&token, "not-a-real-service-account-token").unwrap();
    let k8s = k8s_mode(&config, &token);
    let later = SystemTime::now() + 3 * HOUR;
    // The persisted SVID has expired by `later`: standalone mode stops for a new join token, k8s
    // mode presents the service-account token to the CA (which refuses this one).
    let err = NodeIdentity::establish(&k8s, later).await.unwrap_err();
    assert!(matches!(err, NodeError::Attest(_)), "{err:?}");
    let mut standalone = config.clone();
    standalone.join_token = None;
    let err = NodeIdentity::establish(&standalone, later)
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::ExpiredWhileDown { .. }), "{err:?}");
}
