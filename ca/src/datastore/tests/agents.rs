//! Attested agents: recording, minting checks, renewal and the eviction rule.

use super::*;

const AGENT: &str = "spiffe://td/meshward/agent/join/n1";

/// A join-token admission for `node`, from a token created now.
fn grant(ds: &Datastore, node: &str) -> JoinGrant {
    let token = ds.create_join_token(node, secs(600), now()).unwrap();
    ds.consume_join_token(token.token.expose(), now()).unwrap()
}

fn attested(admission: Admission, serial: &str) -> NewAgent {
    NewAgent {
        spiffe_id: id(AGENT),
        admission,
        serial: serial.into(),
        expires_at: now() + secs(3600),
    }
}

fn attest(ds: &Datastore, serial: &str) -> Agent {
    let admission = Admission::JoinToken(grant(ds, "n1"));
    ds.record_attested_agent(&attested(admission, serial), now())
        .unwrap()
}

#[test]
fn an_attested_agent_may_mint_for_its_node() {
    let (_dir, ds) = store();
    let agent = attest(&ds, "01ab");
    assert_eq!(
        agent,
        Agent {
            spiffe_id: id(AGENT),
            node: "n1".into(),
            attestation: AttestationMethod::JoinToken,
            serial: "01ab".into(),
            expires_at: now() + secs(3600),
            pending: None,
            evicted: false,
            attested_at: now(),
        }
    );
    assert_eq!(ds.agent(&id(AGENT)).unwrap(), Some(agent.clone()));
    assert_eq!(ds.list_agents().unwrap(), vec![agent]);
    assert_eq!(
        ds.agent_may_mint(&id(AGENT), "01ab", now() + secs(3599))
            .unwrap(),
        "n1"
    );
    assert_eq!(AttestationMethod::JoinToken.as_str(), "join_token");
    assert_eq!(AttestationMethod::K8sPsat.to_string(), "k8s_psat");
}

#[test]
fn k8s_agents_are_recorded_with_their_method() {
    let (_dir, ds) = store();
    let spiffe_id = id("spiffe://td/meshward/agent/k8s_psat/prod/node-7");
    let agent = ds
        .record_attested_agent(
            &NewAgent {
                spiffe_id: spiffe_id.clone(),
                admission: Admission::K8sPsat {
                    node: "node-7".into(),
                },
                serial: "ff".into(),
                expires_at: now() + secs(60),
            },
            now(),
        )
        .unwrap();
    assert_eq!(agent.attestation, AttestationMethod::K8sPsat);
    assert_eq!(agent.node, "node-7");
    assert_eq!(
        ds.agent_may_mint(&spiffe_id, "ff", now()).unwrap(),
        "node-7"
    );
}

#[test]
fn minting_is_refused_for_unknown_stale_expired_and_evicted_agents() {
    let (_dir, ds) = store();
    let err = ds.agent_may_mint(&id(AGENT), "01", now()).unwrap_err();
    assert!(
        matches!(&err, AgentError::Unknown { spiffe_id } if spiffe_id == AGENT),
        "{err}"
    );

    attest(&ds, "01");
    let err = ds.agent_may_mint(&id(AGENT), "02", now()).unwrap_err();
    assert!(
        matches!(&err, AgentError::StaleSerial { serial, .. } if serial == "02"),
        "{err}"
    );
    for later in [3600, 7200] {
        let err = ds
            .agent_may_mint(&id(AGENT), "01", now() + secs(later))
            .unwrap_err();
        assert!(
            matches!(err, AgentError::Expired { expired_at, .. } if expired_at == 1_700_003_600),
            "{err}"
        );
    }
    ds.evict_agent(&id(AGENT), now()).unwrap();
    let err = ds.agent_may_mint(&id(AGENT), "01", now()).unwrap_err();
    assert!(matches!(err, AgentError::Evicted { .. }), "{err}");
    assert!(ds.agent(&id(AGENT)).unwrap().unwrap().evicted);
    assert!(
        err.to_string()
            .contains("join token created after the eviction"),
        "{err}"
    );
}

fn pending(serial: &str, expires_at: SystemTime) -> Option<PendingSvid> {
    Some(PendingSvid {
        serial: serial.into(),
        expires_at,
    })
}

#[test]
fn a_renewed_svid_becomes_current_when_the_agent_first_presents_it() {
    let (_dir, ds) = store();
    attest(&ds, "01");
    let renewed = ds
        .renew_agent(
            &id(AGENT),
            "01",
            "02",
            now() + secs(7200),
            now() + secs(1800),
        )
        .unwrap();
    assert_eq!(renewed.serial, "01", "the old svid stays current");
    assert_eq!(renewed.pending, pending("02", now() + secs(7200)));
    assert_eq!(renewed.attested_at, now(), "renewal is not attestation");
    assert_eq!(ds.agent(&id(AGENT)).unwrap(), Some(renewed));

    // Until the agent uses the new SVID, the old one works (the answer may not have reached it).
    assert_eq!(ds.agent_may_mint(&id(AGENT), "01", now()).unwrap(), "n1");
    assert_eq!(ds.agent(&id(AGENT)).unwrap().unwrap().serial, "01");

    // The first call with the new SVID makes it current: from then on the old one is stale.
    assert_eq!(
        ds.agent_may_mint(&id(AGENT), "02", now() + secs(5000))
            .unwrap(),
        "n1"
    );
    let agent = ds.agent(&id(AGENT)).unwrap().unwrap();
    assert_eq!(agent.serial, "02");
    assert_eq!(agent.expires_at, now() + secs(7200));
    assert_eq!(agent.pending, None);
    let err = ds.agent_may_mint(&id(AGENT), "01", now()).unwrap_err();
    assert!(matches!(err, AgentError::StaleSerial { .. }), "{err}");
    assert!(err.to_string().contains("no longer valid"), "{err}");
    let err = ds
        .renew_agent(&id(AGENT), "01", "03", now() + secs(7200), now())
        .unwrap_err();
    assert!(matches!(err, AgentError::StaleSerial { .. }), "{err}");
    assert_eq!(
        ds.agent(&id(AGENT)).unwrap(),
        Some(agent),
        "nothing changed"
    );
}

#[test]
fn renewing_again_with_the_previous_svid_drops_the_unused_renewal() {
    let (_dir, ds) = store();
    attest(&ds, "01");
    ds.renew_agent(&id(AGENT), "01", "02", now() + secs(7200), now())
        .unwrap();
    // The answer with "02" was lost: the agent renews again with "01".
    let agent = ds
        .renew_agent(&id(AGENT), "01", "03", now() + secs(7300), now())
        .unwrap();
    assert_eq!(agent.serial, "01");
    assert_eq!(agent.pending, pending("03", now() + secs(7300)));
    // "02" was never used and never works now; "03" does, and makes "01" stale.
    let err = ds.agent_may_mint(&id(AGENT), "02", now()).unwrap_err();
    assert!(matches!(err, AgentError::StaleSerial { .. }), "{err}");
    ds.agent_may_mint(&id(AGENT), "03", now()).unwrap();
    for stale in ["01", "02"] {
        let err = ds.agent_may_mint(&id(AGENT), stale, now()).unwrap_err();
        assert!(
            matches!(err, AgentError::StaleSerial { .. }),
            "{stale}: {err}"
        );
    }
}

#[test]
fn renewing_with_the_pending_svid_makes_it_current_and_pends_the_next() {
    let (_dir, ds) = store();
    attest(&ds, "01");
    ds.renew_agent(&id(AGENT), "01", "02", now() + secs(7200), now())
        .unwrap();
    let agent = ds
        .renew_agent(&id(AGENT), "02", "03", now() + secs(9000), now())
        .unwrap();
    assert_eq!(agent.serial, "02");
    assert_eq!(agent.expires_at, now() + secs(7200));
    assert_eq!(agent.pending, pending("03", now() + secs(9000)));
    let err = ds.agent_may_mint(&id(AGENT), "01", now()).unwrap_err();
    assert!(matches!(err, AgentError::StaleSerial { .. }), "{err}");
}

#[test]
fn renewal_refuses_a_bad_serial_an_expired_an_evicted_and_an_unknown_agent() {
    let (_dir, ds) = store();
    attest(&ds, "01");
    let before = ds.agent(&id(AGENT)).unwrap();

    let err = ds
        .renew_agent(&id(AGENT), "01", "XYZ", now() + secs(7200), now())
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::BadSerial { serial } if serial == "XYZ"),
        "{err}"
    );
    let err = ds
        .renew_agent(
            &id(AGENT),
            "01",
            "04",
            now() + secs(9000),
            now() + secs(3600),
        )
        .unwrap_err();
    assert!(matches!(err, AgentError::Expired { .. }), "{err}");
    assert_eq!(ds.agent(&id(AGENT)).unwrap(), before, "nothing pending");

    // A pending SVID that expired unused is refused too (its own notAfter counts).
    ds.renew_agent(&id(AGENT), "01", "02", now() + secs(60), now())
        .unwrap();
    let err = ds
        .agent_may_mint(&id(AGENT), "02", now() + secs(60))
        .unwrap_err();
    assert!(matches!(err, AgentError::Expired { .. }), "{err}");
    assert_eq!(
        ds.agent(&id(AGENT)).unwrap().unwrap().serial,
        "01",
        "not made current"
    );

    ds.evict_agent(&id(AGENT), now()).unwrap();
    for serial in ["01", "02"] {
        let err = ds
            .renew_agent(&id(AGENT), serial, "04", now() + secs(9000), now())
            .unwrap_err();
        assert!(matches!(err, AgentError::Evicted { .. }), "{err}");
        let err = ds.agent_may_mint(&id(AGENT), serial, now()).unwrap_err();
        assert!(matches!(err, AgentError::Evicted { .. }), "{err}");
    }
    let evicted = ds.agent(&id(AGENT)).unwrap().unwrap();
    assert_eq!(
        evicted.pending,
        pending("02", now() + secs(60)),
        "nothing renewed"
    );

    let err = ds
        .renew_agent(
            &id("spiffe://td/meshward/agent/join/n9"),
            "02",
            "04",
            now(),
            now(),
        )
        .unwrap_err();
    assert!(matches!(err, AgentError::Unknown { .. }), "{err}");
}

#[test]
fn re_attestation_replaces_the_serial_and_any_pending_one() {
    let (_dir, ds) = store();
    attest(&ds, "01");
    ds.renew_agent(&id(AGENT), "01", "0a", now() + secs(7200), now())
        .unwrap();
    let agent = attest(&ds, "02");
    assert_eq!(agent.pending, None);
    assert_eq!(ds.agent(&id(AGENT)).unwrap(), Some(agent));
    for stale in ["01", "0a"] {
        let err = ds.agent_may_mint(&id(AGENT), stale, now()).unwrap_err();
        assert!(
            matches!(err, AgentError::StaleSerial { .. }),
            "{stale}: {err}"
        );
    }
    assert_eq!(ds.list_agents().unwrap().len(), 1);
}

#[test]
fn an_evicted_agent_is_readmitted_only_by_a_token_created_after_the_eviction() {
    let (_dir, ds) = store();
    // The operator made two tokens; the second one leaked.
    let leaked = ds.create_join_token("n1", secs(600), now()).unwrap();
    attest(&ds, "01");
    ds.evict_agent(&id(AGENT), now()).unwrap();

    // Re-attesting with the old serial, the leaked (older) token, or a PSAT: still evicted.
    let old_grant = ds.consume_join_token(leaked.token.expose(), now()).unwrap();
    for admission in [
        Admission::JoinToken(old_grant),
        Admission::K8sPsat { node: "n1".into() },
    ] {
        for serial in ["01", "02"] {
            let err = ds
                .record_attested_agent(&attested(admission.clone(), serial), now())
                .unwrap_err();
            assert!(matches!(err, AgentError::Evicted { .. }), "{err}");
        }
    }
    assert!(ds.agent(&id(AGENT)).unwrap().unwrap().evicted);

    // A token created after the eviction re-admits it.
    let agent = attest(&ds, "03");
    assert!(!agent.evicted);
    assert_eq!(ds.agent(&id(AGENT)).unwrap(), Some(agent));
    ds.agent_may_mint(&id(AGENT), "03", now()).unwrap();
}

#[test]
fn eviction_survives_purging_the_tokens_it_was_measured_against() {
    let (_dir, ds) = store();
    let spare = ds.create_join_token("n1", secs(600), now()).unwrap();
    attest(&ds, "01");
    ds.evict_agent(&id(AGENT), now()).unwrap();
    let spare = ds.consume_join_token(spare.token.expose(), now()).unwrap();
    // Every token row is purged; sequence numbers still are not reused, so the spare stays "older".
    let much_later = now() + secs(700) + crate::datastore::tokens::TOKEN_RETENTION;
    ds.purge_join_tokens(much_later).unwrap();
    let count: i64 = raw(&ds)
        .query_row("SELECT COUNT(*) FROM join_tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 0);
    let err = ds
        .record_attested_agent(&attested(Admission::JoinToken(spare), "02"), now())
        .unwrap_err();
    assert!(matches!(err, AgentError::Evicted { .. }), "{err}");
}

#[test]
fn evicting_an_unknown_agent_is_an_error() {
    let (_dir, ds) = store();
    let err = ds.evict_agent(&id(AGENT), now()).unwrap_err();
    assert!(
        matches!(&err, AgentError::Unknown { spiffe_id } if spiffe_id == AGENT),
        "{err}"
    );
}

#[test]
fn the_agent_id_must_name_the_admitted_node() {
    let (_dir, ds) = store();
    for wrong in [
        "spiffe://td/meshward/agent/join/n2",
        "spiffe://td/ns/x/sa/n1",
        "spiffe://td/meshward/ca/n1",
        "spiffe://td/meshward/agent/n1",
    ] {
        let admission = Admission::K8sPsat { node: "n1".into() };
        let err = ds
            .record_attested_agent(
                &NewAgent {
                    spiffe_id: id(wrong),
                    ..attested(admission, "01")
                },
                now(),
            )
            .unwrap_err();
        assert!(
            matches!(&err, AgentError::NotAgentIdForNode { spiffe_id, node }
                if spiffe_id == wrong && node == "n1"),
            "{err}"
        );
    }
    let admission = Admission::K8sPsat { node: "a/b".into() };
    let err = ds
        .record_attested_agent(&attested(admission, "01"), now())
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Datastore(DatastoreError::BadNodeName { .. })
        ),
        "{err}"
    );
    assert!(ds.list_agents().unwrap().is_empty());
}

#[test]
fn serials_must_be_lower_case_hex() {
    let (_dir, ds) = store();
    let long = "a".repeat(65);
    for bad in ["", "0A", "0x01", "g1", " 01", long.as_str()] {
        let admission = Admission::K8sPsat { node: "n1".into() };
        let err = ds
            .record_attested_agent(&attested(admission, bad), now())
            .unwrap_err();
        assert!(
            matches!(&err, AgentError::BadSerial { serial } if serial == bad),
            "{err}"
        );
    }
}
