//! Node attestation and agent authorization against a real `meshward ca run` process: a join token
//! buys one agent SVID, once, before it expires; evicted agents, expired agent SVIDs and certificates
//! from another trust domain get nothing. Every refusal is checked for its clear error and for
//! nothing issued (no SVID in the response, no journal row, no `issued` audit record).

// Helpers outside `#[test]` functions fail loudly too: a broken scenario is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshward_identity::bundle::BundleSet;
use meshward_identity::proto::ca as pb;
use meshward_identity::test_util::TestPki;
use meshward_identity::verify::{PeerRole, PeerVerifier};
use meshward_identity::x509::{SvidKey, make_csr};
use meshward_tests::{
    CaOptions, CaProcess, agent_id, attest_request, trust_domain, workload_request,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::Value;
use tonic::Code;

const NODE: &str = "node-1";
const WEB: &str = "spiffe://example.org/ns/shop/sa/web";

fn ca() -> CaProcess {
    CaProcess::start(CaOptions::new(env!("CARGO_BIN_EXE_meshward")))
}

/// Attests `node` with `token` over a fresh key; the gRPC outcome.
async fn attest_with(
    ca: &CaProcess,
    token: &str,
    node: &str,
) -> Result<pb::AttestResponse, tonic::Status> {
    let key = SvidKey::generate().unwrap();
    let csr = make_csr(&key, &agent_id(node)).unwrap();
    ca.anonymous()
        .await
        .attest(attest_request(token, csr))
        .await
        .map(tonic::Response::into_inner)
}

fn assert_join_token_refused(status: &tonic::Status) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("join token refused")
            && status.message().contains("meshward ca token create"),
        "{status:?}"
    );
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// What the client sees when the CA refuses its certificate during the handshake, and the CA's log
/// line saying why.
async fn refused_at_handshake(
    ca: &CaProcess,
    chain: Vec<CertificateDer<'static>>,
    key: &SvidKey,
) -> String {
    let client = ca.with_client_cert(chain, key).await;
    let client_error = match client {
        Err(e) => format!("{e:?}"),
        // TLS 1.3: the client finishes its side before the server has checked its certificate, so
        // the refusal (an alert) arrives on the first call.
        Ok(mut client) => {
            let err = client
                .mint_x509_svids(pb::MintX509SvidsRequest {
                    requests: vec![workload_request(WEB)],
                })
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{err:?}"
            );
            format!("{err:?}")
        }
    };
    // The client can see the refusal before the CA has written its log line: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = ca.log();
        if let Some(line) = log.lines().find(|l| l.contains("tls handshake failed")) {
            break line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ca logs the refused handshake; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    format!("client: {client_error}\nca: {line}")
}

#[tokio::test]
async fn a_join_token_attests_an_agent() {
    let ca = ca();
    let journal = ca.journal_count();
    let token = ca.create_token(NODE, "10m");
    let key = SvidKey::generate().unwrap();
    let id = agent_id(NODE);
    let response = ca
        .anonymous()
        .await
        .attest(attest_request(&token, make_csr(&key, &id).unwrap()))
        .await
        .unwrap()
        .into_inner();
    let svid = response.svid.unwrap();
    assert_eq!(svid.spiffe_id, id.as_str());

    // The agent SVID chains to the bundle the CA publishes, and that bundle came with it.
    let bundle = ca.bundle();
    let sent = response.bundle.unwrap();
    assert_eq!(sent.x509_authorities.len(), bundle.len());
    for root in bundle.authorities() {
        assert!(sent.x509_authorities.contains(&root.to_vec()));
    }
    let mut set = BundleSet::new();
    set.insert(bundle);
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let verified = PeerVerifier::new(Arc::new(set), [trust_domain()])
        .verify(&chain[0], &chain[1..], PeerRole::Client, UnixTime::now())
        .unwrap();
    assert_eq!(verified, id);

    assert_eq!(ca.journal_count(), journal + 1);
    ca.wait_audit("the agent svid", |a| a.issued(id.as_str()) == 1);
    let agents: Value =
        serde_json::from_str(&ca.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(agents[0]["spiffe_id"], id.as_str());
    assert_eq!(agents[0]["node"], NODE);
    assert_eq!(agents[0]["serial"], svid.serial.as_str());
    assert_eq!(agents[0]["evicted"], false);
}

#[tokio::test]
async fn a_join_token_works_only_once() {
    let ca = ca();
    let token = ca.create_token(NODE, "10m");
    attest_with(&ca, &token, NODE).await.unwrap();
    let journal = ca.journal_count();

    let err = attest_with(&ca, &token, NODE).await.unwrap_err();
    assert_join_token_refused(&err);
    let id = agent_id(NODE);
    let audit = ca.wait_audit("the reused token", |a| {
        a.refused(id.as_str(), "bad_join_token") == 1
    });
    // Only the first use issued anything.
    assert_eq!(audit.issued(id.as_str()), 1, "{}", audit.dump());
    assert_eq!(ca.journal_count(), journal);
}

#[tokio::test]
async fn an_expired_join_token_is_refused() {
    let ca = ca();
    let token = ca.create_token(NODE, "1s");
    // Expiry is kept in whole seconds: two seconds later it is past for sure.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let journal = ca.journal_count();
    let err = attest_with(&ca, &token, NODE).await.unwrap_err();
    assert_join_token_refused(&err);
    ca.assert_refused(agent_id(NODE).as_str(), "bad_join_token", journal);
}

#[tokio::test]
async fn an_unknown_join_token_is_refused() {
    let ca = ca();
    // One real token exists; a different one of the same shape is still unknown.
    let real = ca.create_token(NODE, "10m");
    let unknown: String = real
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    let journal = ca.journal_count();
    let err = attest_with(&ca, &unknown, NODE).await.unwrap_err();
    assert_join_token_refused(&err);
    // The node is unknown too, so the refusal names no identity.
    ca.assert_refused("", "bad_join_token", journal);
    assert_eq!(ca.audit().issued(agent_id(NODE).as_str()), 0);
    // The real token is untouched by the failed guess.
    attest_with(&ca, &real, NODE).await.unwrap();
}

/// A renewal answer lost on the way (the agent never got the SVID the CA signed) does not lock the
/// agent out: its SVID works until it presents a newer one, so it renews again. `ca agent list`
/// shows the pending SVID (in JSON, and as the text output's state); the one never used is
/// refused.
#[tokio::test]
async fn a_lost_renewal_answer_does_not_lock_the_agent_out() {
    let ca = ca();
    ca.create_entry(WEB, NODE);
    let agent = ca.attest(NODE).await;
    let journal = ca.journal_count();
    let lost = ca.renew_agent(&agent).await;
    let renewed = ca.renew_agent(&agent).await;
    assert_eq!(
        ca.journal_count(),
        journal + 2,
        "both renewals are journaled"
    );
    let listed = |ca: &CaProcess| -> Value {
        let agents: Value =
            serde_json::from_str(&ca.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
        agents[0].clone()
    };
    let row = listed(&ca);
    assert_eq!(row["serial"], agent.serial.as_str());
    assert_eq!(row["pending_serial"], renewed.serial.as_str());
    assert_eq!(row["pending_expires_at"], renewed.expires_at);
    let text = ca.cli_ok(&["agent", "list"]);
    assert!(text.contains("active, renewed SVID not yet used"), "{text}");

    // The lost SVID was replaced before it was ever used: it gets nothing.
    let journal = ca.journal_count();
    let err = ca
        .as_agent(&lost)
        .await
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![workload_request(WEB)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    ca.assert_nothing_issued(WEB, journal);

    // The renewed one works and becomes current; from then on the first SVID gets nothing.
    ca.as_agent(&renewed)
        .await
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![workload_request(WEB)],
        })
        .await
        .unwrap();
    let row = listed(&ca);
    assert_eq!(row["serial"], renewed.serial.as_str());
    assert_eq!(row["expires_at"], renewed.expires_at);
    assert_eq!(row["pending_serial"], Value::Null);
    let text = ca.cli_ok(&["agent", "list"]);
    assert!(
        text.contains("  active\n") && !text.contains("renewed SVID"),
        "{text}"
    );
    let journal = ca.journal_count();
    let err = ca
        .as_agent(&agent)
        .await
        .sync_entries(pb::SyncEntriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("stale_agent_svid"), "{err:?}");
    assert_eq!(ca.journal_count(), journal);
}

#[tokio::test]
async fn an_evicted_agent_gets_nothing() {
    const AFTER: &str = "spiffe://example.org/ns/shop/sa/after-eviction";
    let ca = ca();
    ca.create_entry(WEB, NODE);
    ca.create_entry(AFTER, NODE);
    let agent = ca.attest(NODE).await;
    let mut client = ca.as_agent(&agent).await;
    client
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![workload_request(WEB)],
        })
        .await
        .unwrap();

    let out = ca.cli(&["agent", "evict", agent.id.as_str()]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    let agents: Value =
        serde_json::from_str(&ca.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(agents[0]["evicted"], true);

    let journal = ca.journal_count();
    let err = client
        .mint_x509_svids(pb::MintX509SvidsRequest {
            requests: vec![workload_request(AFTER)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), "refused: agent_evicted");
    ca.assert_nothing_issued(AFTER, journal);

    // Nor may it renew itself back into service.
    let new_key = SvidKey::generate().unwrap();
    let err = client
        .renew_agent(pb::RenewAgentRequest {
            csr: make_csr(&new_key, &agent.id).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(ca.journal_count(), journal);
}

#[tokio::test]
async fn an_expired_agent_svid_gets_nothing() {
    // The shortest agent SVID lifetime the CA allows.
    let ca = CaProcess::start(
        CaOptions::new(env!("CARGO_BIN_EXE_meshward")).arg("--agent-svid-ttl", "30s"),
    );
    ca.create_entry(WEB, NODE);
    let agent = ca.attest(NODE).await;
    let ttl = agent.expires_at - unix_now();
    assert!((25..=30).contains(&ttl), "agent svid ttl {ttl}s");
    // Works while valid.
    ca.as_agent(&agent)
        .await
        .sync_entries(pb::SyncEntriesRequest {})
        .await
        .unwrap();

    let wait = u64::try_from(agent.expires_at - unix_now() + 2).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let journal = ca.journal_count();
    let seen = refused_at_handshake(&ca, agent.chain.clone(), &agent.key).await;
    assert!(
        seen.contains("xpired"),
        "the refusal says the svid expired:\n{seen}"
    );
    ca.assert_nothing_issued(WEB, journal);
}

#[tokio::test]
async fn a_client_cert_from_another_trust_domain_gets_nothing() {
    let ca = ca();
    ca.create_entry(WEB, NODE);
    let journal = ca.journal_count();

    // An agent SVID of another trust domain, from that domain's own CA.
    let other = TestPki::new("other.test");
    let (svid, key) = other.svid("spiffe://other.test/meshward/agent/join/node-1");
    let seen = refused_at_handshake(&ca, svid.chain().to_vec(), &key).await;
    assert!(seen.contains("tls handshake failed"), "{seen}");

    // An SVID that claims this trust domain but chains to a root the CA never published.
    let impostor = TestPki::new("example.org");
    let (svid, key) = impostor.svid(agent_id(NODE).as_str());
    refused_at_handshake(&ca, svid.chain().to_vec(), &key).await;

    ca.assert_nothing_issued(WEB, journal);
    ca.assert_nothing_issued(agent_id(NODE).as_str(), journal);
}
