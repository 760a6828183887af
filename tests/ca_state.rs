//! The CA's state across process lifetimes: a restart keeps entries, agents and the root; a SIGKILL in
//! the middle of traffic loses nothing that was handed out and leaves a verifiable audit file; two CA
//! processes on one data dir share it without corrupting it.

// Helpers outside `#[test]` functions fail loudly too: a broken scenario is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use meshward_identity::proto::ca as pb;
use meshward_identity::proto::ca::ca_client::CaClient;
use meshward_tests::{AgentSvid, CaOptions, CaProcess, workload_request};
use serde_json::Value;
use tonic::transport::Channel;

const NODE: &str = "node-1";
const WEB: &str = "spiffe://example.org/ns/shop/sa/web";
const API: &str = "spiffe://example.org/ns/shop/sa/api";

fn options() -> CaOptions {
    CaOptions::new(env!("CARGO_BIN_EXE_meshward"))
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not json ({e}): {text}"))
}

/// Mints `n` SVIDs for `id`; all must be signed. Their serials.
async fn mint_ok(client: &mut CaClient<Channel>, id: &str, n: usize) -> Vec<String> {
    let results = client
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: (0..n).map(|_| workload_request(id)).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    results
        .into_iter()
        .map(|r| match r.result {
            Some(pb::svid_result::Result::Svid(svid)) => {
                assert_eq!(svid.spiffe_id, id);
                svid.serial
            }
            other => panic!("expected an svid, got {other:?}"),
        })
        .collect()
}

/// The authorities without `signed_until`, which moves with every SVID signed.
fn roots(authorities: &Value) -> Vec<(Value, Value, Value, Value)> {
    authorities
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].clone(),
                a["state"].clone(),
                a["not_after"].clone(),
                a["certificate_pem"].clone(),
            )
        })
        .collect()
}

/// `meshward audit verify FILE` exits 0.
fn assert_audit_verifies(ca: &CaProcess, file: &std::path::Path) {
    let out = ca.meshward(&["audit", "verify", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "audit verify {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a restart must keep, as the admin CLI shows it.
#[derive(Debug, PartialEq)]
struct Shown {
    bundle: String,
    entries: Value,
    agents: Value,
    authorities: Value,
}

fn shown(ca: &CaProcess) -> Shown {
    Shown {
        bundle: ca.cli_ok(&["bundle", "show"]),
        entries: json(&ca.cli_ok(&["entry", "list", "--output", "json"])),
        agents: json(&ca.cli_ok(&["agent", "list", "--output", "json"])),
        authorities: json(&ca.cli_ok(&["rotate", "list", "--output", "json"])),
    }
}

#[tokio::test]
async fn a_restart_keeps_entries_agents_and_the_root() {
    let mut ca = CaProcess::start(options());
    ca.create_entry(WEB, NODE);
    ca.create_entry(API, NODE);
    let agent = ca.attest(NODE).await;
    mint_ok(&mut ca.as_agent(&agent).await, WEB, 3).await;
    let before = shown(&ca);
    let journal = ca.journal_count();
    let old_addr = ca.addr();

    ca.restart();
    assert_ne!(ca.addr().port(), 0);
    let after = shown(&ca);
    assert_eq!(
        after, before,
        "restart changed the ca's state (old port {old_addr})"
    );
    assert_eq!(ca.journal_count(), journal);

    // The agent attested before the restart still mints with the SVID it has.
    let mut client = ca.as_agent(&agent).await;
    mint_ok(&mut client, API, 2).await;
    assert_eq!(ca.journal_count(), journal + 2);
    // The reopened audit file continues the same chain.
    ca.wait_audit("svids minted after the restart", |a| a.issued(API) == 2);
    assert_audit_verifies(&ca, &ca.audit_path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_traffic_loses_nothing_handed_out() {
    let mut ca = CaProcess::start(options());
    ca.create_entry(WEB, NODE);
    let agent = ca.attest(NODE).await;
    let before = shown(&ca);
    let journal = ca.journal_count();

    // Traffic: batches of 20 back to back until the CA goes away.
    let mut client = ca.as_agent(&agent).await;
    let stop = Arc::new(AtomicBool::new(false));
    // SVIDs the client has in hand; the crash waits for these, not for the CA's journal, because a
    // batch is journaled before its response reaches the client.
    let in_hand = Arc::new(AtomicUsize::new(0));
    let traffic = tokio::spawn({
        let stop = Arc::clone(&stop);
        let in_hand = Arc::clone(&in_hand);
        async move {
            let mut received = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let batch = pb::MintX509SvidsRequest {
                    requests: (0..20).map(|_| workload_request(WEB)).collect(),
                };
                match client.mint_x509_svids(batch).await {
                    Ok(response) => {
                        for r in response.into_inner().results {
                            match r.result {
                                Some(pb::svid_result::Result::Svid(svid)) => {
                                    received.push(svid.serial);
                                    in_hand.fetch_add(1, Ordering::Relaxed);
                                }
                                other => panic!("expected an svid, got {other:?}"),
                            }
                        }
                    }
                    Err(_) => break,
                }
            }
            received
        }
    });
    // Let some batches through, then crash the CA while calls are in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while in_hand.load(Ordering::Relaxed) < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "traffic did not flow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ca.kill();
    stop.store(true, Ordering::Relaxed);
    let received = traffic.await.unwrap();
    assert!(received.len() >= 100, "{} svids received", received.len());

    ca.start_again();
    // Everything handed out was journaled before it left (the journal may hold a batch more: signed,
    // committed, and lost with the connection).
    let journaled = ca.journal_count() - journal;
    assert!(
        journaled >= u64::try_from(received.len()).unwrap(),
        "{journaled} journaled < {} received",
        received.len()
    );
    let after = shown(&ca);
    assert_eq!(after.bundle, before.bundle);
    assert_eq!(after.entries, before.entries);
    assert_eq!(roots(&after.authorities), roots(&before.authorities));
    // What the root signed before the crash still counts against its retirement.
    assert!(
        after.authorities[0]["signed_until"].as_i64()
            >= before.authorities[0]["signed_until"].as_i64()
    );
    assert_eq!(after.agents, before.agents);
    // A crash may cut the audit file short by the records of its last unsynced batch (the writer's
    // documented window), but never breaks the chain: it verifies, and the restarted CA extends it.
    assert_audit_verifies(&ca, &ca.audit_path());
    let mut client = ca.as_agent(&agent).await;
    let more = mint_ok(&mut client, WEB, 5).await;
    let audit = ca.wait_audit("svids minted after the crash", |a| {
        let serials = a.issued_serials();
        more.iter().all(|s| serials.contains(s))
    });
    assert!(audit.issued(WEB) >= 5);
    assert_audit_verifies(&ca, &ca.audit_path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cas_on_one_data_dir_share_it_without_corruption() {
    let shared = tempfile::tempdir().unwrap();
    let data = shared.path().join("data");
    let replica = |name: &str| {
        options()
            .data_dir(&data)
            .admin_socket(shared.path().join(format!("{name}.sock")))
            .audit_file(shared.path().join(format!("{name}-audit.jsonl")))
    };
    // Both first-start at once on an empty data dir: exactly one root may come out of it.
    let mut cas = CaProcess::start_all([replica("a"), replica("b")]);
    let b = cas.pop().unwrap();
    let a = cas.pop().unwrap();
    let authorities = json(&a.cli_ok(&["rotate", "list", "--output", "json"]));
    assert_eq!(authorities.as_array().unwrap().len(), 1, "{authorities}");
    assert_eq!(authorities[0]["state"], "active");
    assert_eq!(
        roots(&json(&b.cli_ok(&["rotate", "list", "--output", "json"]))),
        roots(&authorities)
    );
    assert_eq!(a.cli_ok(&["bundle", "show"]), b.cli_ok(&["bundle", "show"]));

    // State written through one is seen through the other.
    a.create_entry(WEB, NODE);
    b.create_entry(API, NODE);
    let entries_a = json(&a.cli_ok(&["entry", "list", "--output", "json"]));
    assert_eq!(entries_a.as_array().unwrap().len(), 2);
    assert_eq!(
        json(&b.cli_ok(&["entry", "list", "--output", "json"])),
        entries_a
    );
    // A token made by b is spent at a; the agent a attested mints at b.
    let agent: AgentSvid = b.attest(NODE).await;
    let agent_a: AgentSvid = a.attest("node-2").await;
    assert_eq!(
        json(&a.cli_ok(&["agent", "list", "--output", "json"])),
        json(&b.cli_ok(&["agent", "list", "--output", "json"]))
    );

    // Both sign at once, on the same database.
    let journal = a.journal_count();
    let mut at_a = a.as_agent(&agent).await;
    let mut at_b = b.as_agent(&agent).await;
    let (from_a, from_b) = tokio::join!(
        async {
            let mut serials = Vec::new();
            for _ in 0..10 {
                serials.extend(mint_ok(&mut at_a, WEB, 20).await);
            }
            serials
        },
        async {
            let mut serials = Vec::new();
            for _ in 0..10 {
                serials.extend(mint_ok(&mut at_b, API, 20).await);
            }
            serials
        }
    );
    assert_eq!(from_a.len() + from_b.len(), 400);
    assert_eq!(a.journal_count(), journal + 400);
    assert_eq!(b.journal_count(), journal + 400);

    // Each replica audited what it signed, in its own intact chain.
    let audit_a = a.wait_audit("a's batches", |x| x.issued(WEB) == 200);
    let audit_b = b.wait_audit("b's batches", |x| x.issued(API) == 200);
    assert_eq!(audit_a.issued(API), 0);
    assert_eq!(audit_b.issued(WEB), 0);
    assert_audit_verifies(&a, &a.audit_path());
    assert_audit_verifies(&b, &b.audit_path());
    drop(agent_a);

    // The database is still sound for a fresh process: a third start on it sees everything.
    drop(a);
    drop(b);
    let c = CaProcess::start(replica("c"));
    assert_eq!(c.journal_count(), journal + 400);
    assert_eq!(
        json(&c.cli_ok(&["entry", "list", "--output", "json"])),
        entries_a
    );
    assert_eq!(
        roots(&json(&c.cli_ok(&["rotate", "list", "--output", "json"]))),
        roots(&authorities)
    );
}
