use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::audit::{AuditDecision, AuditKind, AuditLog, AuditReader, AuditRecord};
use meshward_identity::bundle::BundleSet;
use meshward_identity::jwt::{JwtBundleSet, JwtError, JwtSvid};
use meshward_identity::verify::{PeerRole, PeerVerifier};
use meshward_identity::x509::{CsrError, KeyError, SvidKey, X509Svid, make_csr};
use meshward_identity::{SpiffeId, TrustDomain};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use rustls_pki_types::UnixTime;
use tempfile::TempDir;

use super::*;
use crate::datastore::{NewEntry, NodeScope, Selector, TokenError};
use crate::keystore::{DEFAULT_ROOT_TTL, Keystore};

const HOUR: Duration = Duration::from_secs(3600);
const WEB: &str = "spiffe://example.org/ns/shop/sa/web";
const DB: &str = "spiffe://example.org/ns/shop/sa/db";

struct Env {
    _dir: TempDir,
    audit_path: PathBuf,
    ds: Datastore,
    ks: Keystore,
    audit: Arc<AuditLog>,
    issuer: Issuer,
    now: SystemTime,
}

fn td() -> TrustDomain {
    "example.org".parse().unwrap()
}

fn env() -> Env {
    env_with(IssuerConfig::default(), DEFAULT_ROOT_TTL)
}

fn env_with(config: IssuerConfig, root_ttl: Duration) -> Env {
    let dir = TempDir::new().unwrap();
    // Whole seconds, as certificates hold them, so lifetimes compare exactly.
    let now = truncate_to_seconds(SystemTime::now());
    let ds = Datastore::open(dir.path()).unwrap();
    let ks = Keystore::open(dir.path(), ds.clone(), td(), None, root_ttl, now).unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let audit = Arc::new(AuditLog::open(&audit_path, "ca-test").unwrap());
    let issuer = Issuer::new(ks.clone(), ds.clone(), Arc::clone(&audit), config);
    Env {
        _dir: dir,
        audit_path,
        ds,
        ks,
        audit,
        issuer,
        now,
    }
}

impl Env {
    fn token(&self, node: &str) -> String {
        self.ds
            .create_join_token(node, Duration::from_secs(600), self.now)
            .unwrap()
            .token
            .expose()
            .to_owned()
    }

    /// Attests an agent for `node` and authorizes it as the mTLS layer would.
    fn agent(&self, node: &str) -> AgentIdentity {
        let svid = self
            .issuer
            .attest_join_token(
                &self.token(node),
                &csr_without_san(&SvidKey::generate().unwrap()),
                self.now,
            )
            .unwrap();
        self.issuer
            .authorize_agent(&svid.spiffe_id, &svid.serial, self.now)
            .unwrap()
    }

    fn entry(&self, id: &str, scope: NodeScope, ttl_seconds: i64) {
        self.ds
            .create_entry(
                &NewEntry {
                    spiffe_id: SpiffeId::parse(id).unwrap(),
                    selectors: vec!["unix:uid:1000".parse::<Selector>().unwrap()],
                    scope,
                    ttl_seconds,
                    hint: String::new(),
                },
                self.now,
            )
            .unwrap();
    }

    fn entry_on(&self, id: &str, node: &str) {
        self.entry(id, NodeScope::Node(node.to_owned()), 0);
    }

    fn journal(&self) -> u64 {
        self.ds.issued_count().unwrap()
    }

    fn records(&self) -> Vec<AuditRecord> {
        self.audit.sync().unwrap();
        AuditReader::open(&self.audit_path)
            .unwrap()
            .map(|r| r.unwrap().record)
            .collect()
    }

    fn count(&self, decision: AuditDecision) -> usize {
        self.records()
            .iter()
            .filter(|r| r.decision == decision)
            .count()
    }

    /// Checks `result` is a refusal with `code`, and that it left no trace but one refusal record.
    fn assert_refused_alone<T: std::fmt::Debug>(
        &self,
        before: Snapshot,
        result: Result<T, IssueError>,
        code: &str,
    ) {
        let err = result.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        let after = self.snapshot();
        assert_eq!(
            after.journal, before.journal,
            "journal changed on refusal `{err}`"
        );
        assert_eq!(
            after.issued, before.issued,
            "an issued record was written on refusal `{err}`"
        );
        assert_eq!(
            after.refused,
            before.refused + 1,
            "no refusal record for `{err}`"
        );
        let last = self.records().pop().unwrap();
        assert_eq!(last.kind, AuditKind::Issuance);
        assert_eq!(last.decision, AuditDecision::Refused);
        assert_eq!(
            last.context.get("code").and_then(|c| c.as_str()),
            Some(code)
        );
        assert_eq!(last.errors.len(), 1);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            journal: self.journal(),
            issued: self.count(AuditDecision::Issued),
            refused: self.count(AuditDecision::Refused),
        }
    }

    fn mint_one(&self, agent: &AgentIdentity, req: SvidRequest) -> Result<IssuedSvid, IssueError> {
        let mut results = self.issuer.mint_x509(agent, &[req], self.now);
        assert_eq!(results.len(), 1);
        results.remove(0)
    }

    /// Verifies `svid` chains to the current bundle, as a peer would.
    fn verify(&self, svid: &IssuedSvid) -> SpiffeId {
        let state = self.ks.current();
        let bundles: BundleSet = [state.bundle.clone()].into_iter().collect();
        let verifier = PeerVerifier::new(Arc::new(bundles), [td()]);
        let now =
            UnixTime::since_unix_epoch(self.now.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        verifier
            .verify(&svid.chain[0], &svid.chain[1..], PeerRole::Client, now)
            .unwrap()
    }
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    journal: u64,
    issued: usize,
    refused: usize,
}

fn request(id: &str) -> SvidRequest {
    request_with_csr(id, csr_for(id))
}

fn request_with_csr(id: &str, csr: Vec<u8>) -> SvidRequest {
    SvidRequest {
        spiffe_id: id.to_owned(),
        csr,
        ttl: None,
        pod_uid: None,
    }
}

fn csr_for(id: &str) -> Vec<u8> {
    make_csr(&SvidKey::generate().unwrap(), &SpiffeId::parse(id).unwrap()).unwrap()
}

fn csr_without_san(key: &SvidKey) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.serialize_request(key).unwrap().der().to_vec()
}

fn csr_with(params: &CertificateParams) -> Vec<u8> {
    params
        .serialize_request(&SvidKey::generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

fn uri_params(uris: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params
}

/// A CSR over an RSA public key. ring cannot generate RSA keys, so rcgen signs through a stand-in
/// signer; the CA must refuse the key by algorithm before it ever looks at the signature.
fn rsa_csr(id: &str) -> Vec<u8> {
    struct RsaStandIn(Vec<u8>);
    impl rcgen::PublicKeyData for RsaStandIn {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }
        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_RSA_SHA256
        }
    }
    impl rcgen::SigningKey for RsaStandIn {
        fn sign(&self, _msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
            Ok(vec![0x5a; 256])
        }
    }
    // RSAPublicKey ::= SEQUENCE { modulus INTEGER (2048 bits), publicExponent INTEGER 65537 }
    let mut der = vec![0x30, 0x82, 0x01, 0x0a, 0x02, 0x82, 0x01, 0x01, 0x00];
    der.extend(std::iter::repeat_n(0xc3, 256));
    der.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
    uri_params(&[id])
        .serialize_request(&RsaStandIn(der))
        .unwrap()
        .der()
        .to_vec()
}

fn p384_csr(id: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    uri_params(&[id])
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

// --- attestation ----------------------------------------------------------------------------------

#[test]
fn join_token_attestation_issues_an_agent_svid() {
    let env = env();
    let key = SvidKey::generate().unwrap();
    let before = env.snapshot();
    let svid = env
        .issuer
        .attest_join_token(&env.token("node-1"), &csr_without_san(&key), env.now)
        .unwrap();
    assert_eq!(
        svid.spiffe_id.as_str(),
        "spiffe://example.org/meshward/agent/join/node-1"
    );
    let parsed = X509Svid::parse_chain(svid.chain.clone()).unwrap();
    assert_eq!(parsed.spiffe_id(), &svid.spiffe_id);
    assert_eq!(parsed.serial(), svid.serial);
    assert_eq!(parsed.not_after(), svid.not_after);
    let ttl = svid.not_after.duration_since(env.now).unwrap();
    assert!(ttl <= DEFAULT_AGENT_SVID_TTL && ttl > DEFAULT_AGENT_SVID_TTL - Duration::from_secs(2));
    assert_eq!(env.verify(&svid), svid.spiffe_id);

    let agent = env
        .issuer
        .authorize_agent(&svid.spiffe_id, &svid.serial, env.now)
        .unwrap();
    assert_eq!(agent.node, "node-1");
    assert_eq!(env.journal(), before.journal + 1);
    let record = env.records().pop().unwrap();
    assert_eq!(record.decision, AuditDecision::Issued);
    assert_eq!(record.spiffe_id.as_deref(), Some(svid.spiffe_id.as_str()));
    assert_eq!(record.serial.as_deref(), Some(svid.serial.as_str()));
    assert!(record.not_after.is_some());
}

#[test]
fn an_agent_csr_may_carry_its_own_id() {
    let env = env();
    let id = "spiffe://example.org/meshward/agent/join/node-1";
    let svid = env
        .issuer
        .attest_join_token(&env.token("node-1"), &csr_for(id), env.now)
        .unwrap();
    assert_eq!(svid.spiffe_id.as_str(), id);
}

#[test]
fn agent_svid_ttl_is_configurable() {
    let config = IssuerConfig {
        agent_svid_ttl: Duration::from_secs(120),
        ..IssuerConfig::default()
    };
    let env = env_with(config, DEFAULT_ROOT_TTL);
    let svid = env
        .issuer
        .attest_join_token(
            &env.token("n"),
            &csr_without_san(&SvidKey::generate().unwrap()),
            env.now,
        )
        .unwrap();
    let ttl = svid.not_after.duration_since(env.now).unwrap();
    assert!(
        ttl <= Duration::from_secs(120) && ttl > Duration::from_secs(118),
        "{ttl:?}"
    );
}

#[test]
fn a_reused_join_token_is_refused() {
    let env = env();
    let token = env.token("node-1");
    let csr = csr_without_san(&SvidKey::generate().unwrap());
    env.issuer.attest_join_token(&token, &csr, env.now).unwrap();
    let before = env.snapshot();
    let result = env.issuer.attest_join_token(&token, &csr, env.now);
    assert!(matches!(
        result,
        Err(IssueError::BadJoinToken(TokenError::AlreadyUsed { .. }))
    ));
    env.assert_refused_alone(before, result, "bad_join_token");
}

#[test]
fn an_expired_join_token_is_refused() {
    let env = env();
    let token = env
        .ds
        .create_join_token("node-1", Duration::from_secs(1), env.now)
        .unwrap();
    let before = env.snapshot();
    let csr = csr_without_san(&SvidKey::generate().unwrap());
    let result = env.issuer.attest_join_token(
        token.token.expose(),
        &csr,
        env.now + Duration::from_secs(10),
    );
    assert!(matches!(
        result,
        Err(IssueError::BadJoinToken(TokenError::Expired { .. }))
    ));
    env.assert_refused_alone(before, result, "bad_join_token");
}

#[test]
fn an_unknown_join_token_is_refused() {
    let env = env();
    let before = env.snapshot();
    let csr = csr_without_san(&SvidKey::generate().unwrap());
    let result = env
        .issuer
        .attest_join_token(&"ab".repeat(32), &csr, env.now);
    assert!(matches!(
        result,
        Err(IssueError::BadJoinToken(TokenError::Unknown))
    ));
    env.assert_refused_alone(before, result, "bad_join_token");
}

#[test]
fn a_bad_attestation_csr_does_not_burn_the_token() {
    let env = env();
    let token = env.token("node-1");
    for csr in [
        b"not a csr".to_vec(),
        csr_with(&{
            let mut p = uri_params(&[]);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p
        }),
    ] {
        let err = env
            .issuer
            .attest_join_token(&token, &csr, env.now)
            .unwrap_err();
        assert_eq!(err.code(), "bad_csr", "{err}");
    }
    assert_eq!(env.journal(), 0);
    env.issuer
        .attest_join_token(
            &token,
            &csr_without_san(&SvidKey::generate().unwrap()),
            env.now,
        )
        .unwrap();
}

#[test]
fn an_attestation_csr_for_another_id_is_refused() {
    let env = env();
    let before = env.snapshot();
    let result = env
        .issuer
        .attest_join_token(&env.token("node-1"), &csr_for(WEB), env.now);
    assert!(matches!(
        result,
        Err(IssueError::BadCsr(CsrError::IdMismatch { .. }))
    ));
    env.assert_refused_alone(before, result, "bad_csr");
}

#[test]
fn an_evicted_agent_cannot_re_attest_with_an_old_token() {
    let env = env();
    let old_token = env.token("node-1");
    let agent = env.agent("node-1");
    env.ds.evict_agent(&agent.spiffe_id, env.now).unwrap();
    let before = env.snapshot();
    let csr = csr_without_san(&SvidKey::generate().unwrap());
    let result = env.issuer.attest_join_token(&old_token, &csr, env.now);
    env.assert_refused_alone(before, result, "agent_evicted");
    // A token made after the eviction re-admits it.
    env.issuer
        .attest_join_token(&env.token("node-1"), &csr, env.now)
        .unwrap();
}

// --- agent authorization and renewal --------------------------------------------------------------

#[test]
fn authorize_agent_checks_every_rule() {
    let env = env();
    let agent = env.agent("node-1");
    let id = &agent.spiffe_id;

    let workload = SpiffeId::parse(WEB).unwrap();
    assert_eq!(
        env.issuer
            .authorize_agent(&workload, &agent.serial, env.now)
            .unwrap_err()
            .code(),
        "not_agent"
    );
    let foreign = SpiffeId::parse("spiffe://other.org/meshward/agent/join/node-1").unwrap();
    assert_eq!(
        env.issuer
            .authorize_agent(&foreign, &agent.serial, env.now)
            .unwrap_err()
            .code(),
        "not_agent"
    );
    let unknown = SpiffeId::parse("spiffe://example.org/meshward/agent/join/node-9").unwrap();
    assert_eq!(
        env.issuer
            .authorize_agent(&unknown, &agent.serial, env.now)
            .unwrap_err()
            .code(),
        "unknown_agent"
    );
    assert_eq!(
        env.issuer
            .authorize_agent(id, "0abc", env.now)
            .unwrap_err()
            .code(),
        "stale_agent_svid"
    );
    assert_eq!(
        env.issuer
            .authorize_agent(id, "NOT-HEX", env.now)
            .unwrap_err()
            .code(),
        "stale_agent_svid"
    );
    let err = env
        .issuer
        .authorize_agent(id, &agent.serial, env.now + 2 * HOUR)
        .unwrap_err();
    assert!(matches!(err, IssueError::AgentExpired { .. }), "{err}");
    env.ds.evict_agent(id, env.now).unwrap();
    let err = env
        .issuer
        .authorize_agent(id, &agent.serial, env.now)
        .unwrap_err();
    assert!(matches!(err, IssueError::AgentEvicted { .. }), "{err}");
}

#[test]
fn a_renewed_agent_svid_replaces_the_old_one_once_the_agent_uses_it() {
    let env = env();
    let agent = env.agent("node-1");
    let before = env.snapshot();
    let renewed = env
        .issuer
        .renew_agent(
            &agent,
            &csr_for(agent.spiffe_id.as_str()),
            env.now + Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(renewed.spiffe_id, agent.spiffe_id);
    assert_ne!(renewed.serial, agent.serial);
    assert_eq!(env.journal(), before.journal + 1);
    assert_eq!(env.count(AuditDecision::Issued), before.issued + 1);
    // Until the agent presents the new SVID, the old one still works: the answer may be lost.
    env.issuer
        .authorize_agent(&agent.spiffe_id, &agent.serial, env.now)
        .unwrap();
    // The first call with the new one makes it current; the old one is stale from then on.
    env.issuer
        .authorize_agent(&agent.spiffe_id, &renewed.serial, env.now)
        .unwrap();
    let err = env
        .issuer
        .authorize_agent(&agent.spiffe_id, &agent.serial, env.now)
        .unwrap_err();
    assert!(matches!(err, IssueError::StaleAgentSvid { .. }), "{err}");
    // ... and renewing with the stale one gets nothing.
    let before = env.snapshot();
    let result = env
        .issuer
        .renew_agent(&agent, &csr_for(agent.spiffe_id.as_str()), env.now);
    assert_eq!(result.unwrap_err().code(), "stale_agent_svid");
    assert_eq!(env.journal(), before.journal);
}

#[test]
fn an_agent_that_lost_its_renewal_answer_renews_again_with_its_old_svid() {
    let env = env();
    let agent = env.agent("node-1");
    let lost = env
        .issuer
        .renew_agent(&agent, &csr_for(agent.spiffe_id.as_str()), env.now)
        .unwrap();
    let before = env.snapshot();
    let renewed = env
        .issuer
        .renew_agent(&agent, &csr_for(agent.spiffe_id.as_str()), env.now)
        .unwrap();
    assert_ne!(renewed.serial, lost.serial);
    assert_eq!(env.journal(), before.journal + 1);
    assert_eq!(env.count(AuditDecision::Issued), before.issued + 1);
    // The SVID of the lost answer never works; the new one does.
    let err = env
        .issuer
        .authorize_agent(&agent.spiffe_id, &lost.serial, env.now)
        .unwrap_err();
    assert!(matches!(err, IssueError::StaleAgentSvid { .. }), "{err}");
    env.issuer
        .authorize_agent(&agent.spiffe_id, &renewed.serial, env.now)
        .unwrap();
}

#[test]
fn renewal_refuses_a_csr_for_another_id() {
    let env = env();
    let agent = env.agent("node-1");
    let before = env.snapshot();
    let result = env.issuer.renew_agent(
        &agent,
        &csr_for("spiffe://example.org/meshward/agent/join/node-2"),
        env.now,
    );
    env.assert_refused_alone(before, result, "bad_csr");
    env.issuer
        .authorize_agent(&agent.spiffe_id, &agent.serial, env.now)
        .unwrap();
}

// --- workload X.509-SVIDs -------------------------------------------------------------------------

#[test]
fn an_entitled_request_is_issued() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    let before = env.snapshot();
    let mut req = request(WEB);
    req.pod_uid = Some("pod-123".into());
    let svid = env.mint_one(&agent, req).unwrap();

    let parsed = X509Svid::parse_chain(svid.chain.clone()).unwrap();
    assert_eq!(parsed.spiffe_id().as_str(), WEB);
    assert_eq!(parsed.serial(), svid.serial);
    let ttl = svid.not_after.duration_since(env.now).unwrap();
    assert!(
        ttl <= HOUR && ttl > HOUR - Duration::from_secs(2),
        "default svid ttl: {ttl:?}"
    );
    assert_eq!(env.verify(&svid).as_str(), WEB);

    assert_eq!(env.journal(), before.journal + 1);
    let record = env.records().pop().unwrap();
    assert_eq!(record.kind, AuditKind::Issuance);
    assert_eq!(record.decision, AuditDecision::Issued);
    assert_eq!(record.principal, agent.spiffe_id.as_str());
    assert_eq!(record.resource, WEB);
    assert_eq!(record.spiffe_id.as_deref(), Some(WEB));
    assert_eq!(record.serial.as_deref(), Some(svid.serial.as_str()));
    assert_eq!(record.agent.as_deref(), Some(agent.spiffe_id.as_str()));
    assert_eq!(record.pod.as_deref(), Some("pod-123"));
}

#[test]
fn a_csr_without_uri_san_is_fine() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    let svid = env
        .mint_one(
            &agent,
            request_with_csr(WEB, csr_without_san(&SvidKey::generate().unwrap())),
        )
        .unwrap();
    assert_eq!(svid.spiffe_id.as_str(), WEB);
}

#[test]
fn an_any_node_entry_entitles_every_node() {
    let env = env();
    env.entry(WEB, NodeScope::AnyNode, 0);
    for node in ["node-1", "node-2"] {
        let agent = env.agent(node);
        env.mint_one(&agent, request(WEB)).unwrap();
    }
    assert_eq!(env.journal(), 4);
}

#[test]
fn not_after_is_clamped_to_the_authority() {
    let env = env_with(IssuerConfig::default(), HOUR);
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    let mut req = request(WEB);
    req.ttl = Some(10 * HOUR);
    let svid = env.mint_one(&agent, req).unwrap();
    assert_eq!(svid.not_after, env.ks.current().authority.not_after());
}

#[test]
fn ttl_comes_from_the_request_then_the_entry_then_the_config() {
    let config = IssuerConfig {
        svid_ttl: 2 * HOUR,
        ..IssuerConfig::default()
    };
    let env = env_with(config, DEFAULT_ROOT_TTL);
    let agent = env.agent("node-1");
    env.entry(WEB, NodeScope::Node("node-1".into()), 600);
    env.entry_on(DB, "node-1");
    let ttl_of = |svid: IssuedSvid| svid.not_after.duration_since(env.now).unwrap().as_secs();

    assert_eq!(ttl_of(env.mint_one(&agent, request(WEB)).unwrap()), 600);
    assert_eq!(ttl_of(env.mint_one(&agent, request(DB)).unwrap()), 7200);
    let mut req = request(WEB);
    req.ttl = Some(Duration::from_secs(60));
    assert_eq!(ttl_of(env.mint_one(&agent, req).unwrap()), 60);

    for ttl in [Duration::from_secs(10), 25 * HOUR] {
        let before = env.snapshot();
        let mut req = request(WEB);
        req.ttl = Some(ttl);
        env.assert_refused_alone(before, env.mint_one(&agent, req), "bad_ttl");
    }
}

/// Every issuance rule refuses a request and leaves no trace but its refusal record.
#[test]
fn every_refused_request_issues_nothing() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    env.entry_on(DB, "node-2");
    let mut bad_signature = csr_for(WEB);
    *bad_signature.last_mut().unwrap() ^= 0x01;
    let ca_true = {
        let mut p = uri_params(&[WEB]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        csr_with(&p)
    };

    let cases: Vec<(&str, SvidRequest, &str)> = vec![
        (
            "malformed csr",
            request_with_csr(WEB, b"\x30\x03garbage".to_vec()),
            "bad_csr",
        ),
        ("empty csr", request_with_csr(WEB, Vec::new()), "bad_csr"),
        (
            "bad csr signature",
            request_with_csr(WEB, bad_signature),
            "bad_csr",
        ),
        ("rsa key", request_with_csr(WEB, rsa_csr(WEB)), "bad_csr"),
        ("p-384 key", request_with_csr(WEB, p384_csr(WEB)), "bad_csr"),
        ("csr asks for ca", request_with_csr(WEB, ca_true), "bad_csr"),
        (
            "two uri sans",
            request_with_csr(WEB, csr_with(&uri_params(&[WEB, DB]))),
            "bad_csr",
        ),
        (
            "csr uri is another id",
            request_with_csr(WEB, csr_for(DB)),
            "bad_csr",
        ),
        ("entry for another node", request(DB), "not_entitled"),
        (
            "no entry at all",
            request("spiffe://example.org/ns/shop/sa/none"),
            "not_entitled",
        ),
        (
            "reserved agent path",
            request("spiffe://example.org/meshward/agent/join/node-1"),
            "not_workload_id",
        ),
        (
            "reserved ca path",
            request("spiffe://example.org/meshward/ca"),
            "not_workload_id",
        ),
        (
            "trust domain id",
            request_with_csr(
                "spiffe://example.org",
                csr_without_san(&SvidKey::generate().unwrap()),
            ),
            "not_workload_id",
        ),
        (
            "foreign trust domain",
            request("spiffe://other.org/ns/shop/sa/web"),
            "outside_trust_domain",
        ),
        (
            "not a spiffe id",
            request_with_csr("https://example.org/web", csr_for(WEB)),
            "bad_spiffe_id",
        ),
        (
            "upper-case trust domain",
            request_with_csr("spiffe://Example.org/web", csr_for(WEB)),
            "bad_spiffe_id",
        ),
    ];
    for (name, req, code) in cases {
        let before = env.snapshot();
        let result = env.mint_one(&agent, req);
        if let Err(e) = &result {
            assert_eq!(e.code(), code, "case `{name}`: {e}");
        }
        env.assert_refused_alone(before, result, code);
    }
}

#[test]
fn csr_refusals_name_the_reason() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    let err = |csr: Vec<u8>| match env
        .mint_one(&agent, request_with_csr(WEB, csr))
        .unwrap_err()
    {
        IssueError::BadCsr(e) => e,
        other => panic!("expected bad_csr, got {other}"),
    };
    assert!(matches!(err(b"junk".to_vec()), CsrError::Malformed(_)));
    let mut bad_signature = csr_for(WEB);
    *bad_signature.last_mut().unwrap() ^= 0x01;
    assert_eq!(err(bad_signature), CsrError::BadSignature);
    match err(rsa_csr(WEB)) {
        CsrError::Key(KeyError::UnsupportedAlgorithm { algorithm }) => assert_eq!(algorithm, "rsa"),
        other => panic!("{other}"),
    }
    match err(p384_csr(WEB)) {
        CsrError::Key(KeyError::UnsupportedAlgorithm { algorithm }) => {
            assert_eq!(algorithm, "ecdsa p-384")
        }
        other => panic!("{other}"),
    }
    let mut ca = uri_params(&[WEB]);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    assert_eq!(err(csr_with(&ca)), CsrError::RequestsCa);
    assert!(matches!(
        err(csr_with(&uri_params(&[WEB, DB]))),
        CsrError::MultipleUriSans(_)
    ));
    assert!(matches!(err(csr_for(DB)), CsrError::IdMismatch { .. }));
}

#[test]
fn unauthorized_agents_get_nothing() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    let reqs = [request(WEB), request(WEB)];

    let check = |agent: &AgentIdentity, now: SystemTime, code: &str| {
        let before = env.snapshot();
        let results = env.issuer.mint_x509(agent, &reqs, now);
        assert_eq!(results.len(), 2);
        for r in &results {
            assert_eq!(r.as_ref().unwrap_err().code(), code);
        }
        let after = env.snapshot();
        assert_eq!(after.journal, before.journal);
        assert_eq!(after.issued, before.issued);
        assert_eq!(after.refused, before.refused + 2);
    };
    let stale = AgentIdentity {
        serial: "0def".into(),
        ..agent.clone()
    };
    check(&stale, env.now, "stale_agent_svid");
    check(&agent, env.now + 2 * HOUR, "agent_expired");
    // A forged identity for another node does not help: the node comes from the datastore.
    let forged = AgentIdentity {
        node: "node-2".into(),
        ..agent.clone()
    };
    env.entry_on(DB, "node-2");
    let results = env.issuer.mint_x509(&forged, &[request(DB)], env.now);
    assert_eq!(results[0].as_ref().unwrap_err().code(), "not_entitled");
    let unknown = AgentIdentity {
        spiffe_id: SpiffeId::parse("spiffe://example.org/meshward/agent/join/node-7").unwrap(),
        ..agent.clone()
    };
    check(&unknown, env.now, "unknown_agent");
    env.ds.evict_agent(&agent.spiffe_id, env.now).unwrap();
    check(&agent, env.now, "agent_evicted");
}

#[test]
fn a_batch_over_the_limit_is_refused_whole() {
    let config = IssuerConfig {
        max_batch: 2,
        ..IssuerConfig::default()
    };
    let env = env_with(config, DEFAULT_ROOT_TTL);
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    let before = env.snapshot();
    let results =
        env.issuer
            .mint_x509(&agent, &[request(WEB), request(WEB), request(WEB)], env.now);
    assert_eq!(results.len(), 3);
    for r in &results {
        assert!(matches!(
            r,
            Err(IssueError::TooManyRequests { count: 3, max: 2 })
        ));
    }
    assert_eq!(env.journal(), before.journal);
    assert_eq!(env.count(AuditDecision::Issued), before.issued);
    // At the limit it works.
    let results = env
        .issuer
        .mint_x509(&agent, &[request(WEB), request(WEB)], env.now);
    assert!(results.iter().all(Result::is_ok));
}

#[test]
fn a_mixed_batch_issues_exactly_the_good_requests() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    env.entry(DB, NodeScope::AnyNode, 0);
    let before = env.snapshot();
    let reqs = vec![
        request(WEB),
        request("spiffe://example.org/ns/shop/sa/other"),
        request(DB),
        request_with_csr(WEB, b"junk".to_vec()),
        request(WEB),
    ];
    let results = env.issuer.mint_x509(&agent, &reqs, env.now);
    let codes: Vec<&str> = results
        .iter()
        .map(|r| r.as_ref().map_or_else(IssueError::code, |_| "ok"))
        .collect();
    assert_eq!(codes, ["ok", "not_entitled", "ok", "bad_csr", "ok"]);
    let ids: Vec<&str> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|s| s.spiffe_id.as_str())
        .collect();
    assert_eq!(ids, [WEB, DB, WEB]);
    let after = env.snapshot();
    assert_eq!(after.journal, before.journal + 3);
    assert_eq!(after.issued, before.issued + 3);
    assert_eq!(after.refused, before.refused + 2);
    // Serials are unique.
    let mut serials: Vec<&str> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|s| s.serial.as_str())
        .collect();
    serials.sort_unstable();
    serials.dedup();
    assert_eq!(serials.len(), 3);
}

#[test]
fn after_root_rotation_new_svids_chain_to_the_new_root() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    let old_svid = env.mint_one(&agent, request(WEB)).unwrap();
    let prepared = env.ks.prepare(env.now).unwrap();
    env.ks.activate(env.now).unwrap();
    let new_svid = env.mint_one(&agent, request(WEB)).unwrap();
    assert_eq!(
        new_svid
            .not_after
            .duration_since(env.now)
            .unwrap()
            .as_secs(),
        HOUR.as_secs()
    );
    // Both verify against the bundle (old root still published); the new one only via the new root.
    env.verify(&old_svid);
    env.verify(&new_svid);
    let state = env.ks.current();
    let new_only: BundleSet =
        [
            meshward_identity::bundle::TrustBundle::from_der_concat(td(), &prepared.certificate)
                .unwrap(),
        ]
        .into_iter()
        .collect();
    let verifier = PeerVerifier::new(Arc::new(new_only), [td()]);
    let now = UnixTime::since_unix_epoch(env.now.duration_since(SystemTime::UNIX_EPOCH).unwrap());
    verifier
        .verify(&new_svid.chain[0], &[], PeerRole::Client, now)
        .unwrap();
    assert!(
        verifier
            .verify(&old_svid.chain[0], &[], PeerRole::Client, now)
            .is_err()
    );
    // The journal pins the old root until its SVIDs expire.
    let err = env.ks.retire(env.now, false).unwrap_err();
    assert!(
        err.to_string().contains("signed certificates valid until"),
        "{err}"
    );
    assert_eq!(state.authority_id, prepared.id);
}

// --- JWT-SVIDs ------------------------------------------------------------------------------------

#[test]
fn jwt_svids_validate_against_the_bundle_jwks() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    let audience = vec!["payments".to_owned()];
    let before = env.snapshot();
    let (token, expiry) = env
        .issuer
        .mint_jwt(&agent, WEB, &audience, None, env.now)
        .unwrap();
    let ttl = expiry.duration_since(env.now).unwrap();
    assert!(
        ttl <= DEFAULT_JWT_TTL && ttl > DEFAULT_JWT_TTL - Duration::from_secs(1),
        "{ttl:?}"
    );

    // Through the JWKS document, as a relying party gets it.
    let jwks = env.ks.current().jwt_bundle.to_jwks_json();
    let bundle = meshward_identity::jwt::JwtBundle::from_jwks_json(td(), &jwks).unwrap();
    let bundles: JwtBundleSet = [bundle].into_iter().collect();
    let validated = JwtSvid::validate(&token, "payments", &bundles, env.now).unwrap();
    assert_eq!(validated.spiffe_id.as_str(), WEB);
    assert_eq!(validated.expiry, expiry);
    assert!(matches!(
        JwtSvid::validate(&token, "other", &bundles, env.now),
        Err(JwtError::WrongAudience { .. })
    ));
    // JWTs are audited, not journaled (no serial).
    let after = env.snapshot();
    assert_eq!(after.journal, before.journal);
    assert_eq!(after.issued, before.issued + 1);
    let record = env.records().pop().unwrap();
    assert_eq!(
        record.context.get("svid").and_then(|v| v.as_str()),
        Some("jwt")
    );

    let (token, _) = env
        .issuer
        .mint_jwt(
            &agent,
            WEB,
            &audience,
            Some(Duration::from_secs(60)),
            env.now,
        )
        .unwrap();
    let claims = JwtSvid::parse_insecure(&token).unwrap().claims;
    let exp = claims["exp"].as_u64().unwrap();
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(exp - iat, 60);
}

#[test]
fn jwt_svids_follow_the_issuance_rules() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    env.entry_on(DB, "node-2");
    let aud = vec!["a".to_owned()];
    let cases: Vec<(&str, Vec<String>, Option<Duration>, &str)> = vec![
        (DB, aud.clone(), None, "not_entitled"),
        (
            "spiffe://example.org/meshward/ca",
            aud.clone(),
            None,
            "not_workload_id",
        ),
        (
            "spiffe://other.org/x",
            aud.clone(),
            None,
            "outside_trust_domain",
        ),
        ("nope", aud.clone(), None, "bad_spiffe_id"),
        (WEB, Vec::new(), None, "bad_audience"),
        (WEB, vec![String::new()], None, "bad_audience"),
        (WEB, aud.clone(), Some(Duration::from_secs(5)), "bad_ttl"),
    ];
    for (id, audience, ttl, code) in cases {
        let before = env.snapshot();
        let result = env.issuer.mint_jwt(&agent, id, &audience, ttl, env.now);
        env.assert_refused_alone(before, result, code);
    }
    env.ds.evict_agent(&agent.spiffe_id, env.now).unwrap();
    let before = env.snapshot();
    env.assert_refused_alone(
        before,
        env.issuer.mint_jwt(&agent, WEB, &aud, None, env.now),
        "agent_evicted",
    );
}

// --- entries --------------------------------------------------------------------------------------

#[test]
fn entries_for_returns_the_nodes_and_any_node_entries() {
    let env = env();
    let agent = env.agent("node-1");
    env.entry_on(WEB, "node-1");
    env.entry_on(DB, "node-2");
    env.entry("spiffe://example.org/everywhere", NodeScope::AnyNode, 0);
    let mut ids: Vec<String> = env
        .issuer
        .entries_for(&agent)
        .unwrap()
        .into_iter()
        .map(|e| e.spiffe_id.to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["spiffe://example.org/everywhere", WEB]);
}

#[test]
fn every_code_is_listed() {
    let errors = [
        IssueError::BadCsr(CsrError::BadSignature),
        IssueError::NotEntitled {
            id: String::new(),
            node: String::new(),
        },
        IssueError::NotAgent { id: String::new() },
        IssueError::UnknownAgent { id: String::new() },
        IssueError::AgentEvicted { id: String::new() },
        IssueError::AgentExpired { id: String::new() },
        IssueError::StaleAgentSvid {
            id: String::new(),
            serial: String::new(),
        },
        IssueError::BadJoinToken(TokenError::Unknown),
        IssueError::BadSpiffeId {
            id: String::new(),
            reason: String::new(),
        },
        IssueError::NotWorkloadId {
            id: String::new(),
            reason: "",
        },
        IssueError::OutsideTrustDomain {
            id: String::new(),
            trust_domain: td(),
        },
        IssueError::BadTtl {
            ttl: Duration::ZERO,
        },
        IssueError::BadAudience,
        IssueError::TooManyRequests { count: 0, max: 0 },
        IssueError::Internal {
            doing: "",
            reason: String::new(),
        },
    ];
    let codes: Vec<&str> = errors.iter().map(IssueError::code).collect();
    assert_eq!(codes, IssueError::CODES);
}
