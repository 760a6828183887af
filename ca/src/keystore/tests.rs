use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use meshward_identity::jwt::{JwtBundleSet, JwtSvid};
use meshward_identity::test_util::TestPki;
use meshward_identity::x509::{SvidKey, X509Svid, certs_to_pem};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use tempfile::TempDir;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::datastore::{Datastore, Issued};

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    "example.org".parse().unwrap()
}

fn open(dir: &Path, now: SystemTime) -> Keystore {
    let ds = Datastore::open(dir).unwrap();
    Keystore::open(dir, ds, td(), None, DEFAULT_ROOT_TTL, now).unwrap()
}

fn open_upstream(dir: &Path, up: UpstreamCa, now: SystemTime) -> Result<Keystore, KeystoreError> {
    let ds = Datastore::open(dir).unwrap();
    Keystore::open(dir, ds, td(), Some(up), DEFAULT_ROOT_TTL, now)
}

/// The key files in the data dir's key dir (lock files aside).
fn key_files(dir: &Path) -> usize {
    fs::read_dir(dir.join("keys"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".key")
        })
        .count()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Signs a throwaway SVID with the current authority; returns its chain.
fn sign_one(ks: &Keystore, now: SystemTime) -> (Vec<CertificateDer<'static>>, SystemTime) {
    let key = SvidKey::generate().unwrap();
    let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let signed = ks
        .current()
        .authority
        .sign_svid(&key.public_key_der(), &id, HOUR, now)
        .unwrap();
    (signed.chain, signed.not_after)
}

/// Whether `cert` is signed by `issuer`'s key, with a matching issuer name.
fn signed_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).unwrap();
    let (_, issuer) = X509Certificate::from_der(issuer.as_ref()).unwrap();
    cert.issuer().as_raw() == issuer.subject().as_raw()
        && cert.verify_signature(Some(issuer.public_key())).is_ok()
}

#[test]
fn first_start_creates_a_root_and_private_key_files() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let ks = open(dir.path(), now);
    let state = ks.current();

    assert_eq!(state.trust_domain, td());
    assert!(state.authority.is_root());
    assert_eq!(state.authority.trust_domain(), &td());
    // A year by default, give or take the backdating.
    let ttl = state.authority.not_after().duration_since(now).unwrap();
    assert!(
        ttl <= DEFAULT_ROOT_TTL && ttl > DEFAULT_ROOT_TTL - Duration::from_secs(5),
        "{ttl:?}"
    );
    assert_eq!(
        state.bundle.authorities(),
        &[state.authority.certificate().clone()]
    );
    assert_eq!(state.jwt_bundle.len(), 1);
    assert!(state.jwt_bundle.get(state.jwt_key.kid()).is_some());
    assert_eq!(state.bundle.sequence(), state.sequence);

    let authorities = ks.authorities().unwrap();
    assert_eq!(authorities.len(), 1);
    assert_eq!(authorities[0].state, AuthorityState::Active);
    assert_eq!(authorities[0].id, state.authority_id);

    let keys = dir.path().join("keys");
    assert_eq!(mode(&keys), 0o700);
    let x509 = keys.join(format!("{}.key", state.authority_id));
    let jwt = keys.join(format!("{}.jwt.key", state.authority_id));
    assert_eq!(mode(&x509), 0o600);
    assert_eq!(mode(&jwt), 0o600);
    // No temp file left behind.
    assert_eq!(key_files(dir.path()), 2);
    assert!(
        fs::read_dir(&keys).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp"))
    );
}

#[test]
fn restart_loads_the_same_root_and_jwt_key() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let first = open(dir.path(), now).current();
    let second = open(dir.path(), now + HOUR).current();
    assert_eq!(first.authority_id, second.authority_id);
    assert_eq!(
        first.authority.certificate(),
        second.authority.certificate()
    );
    assert_eq!(first.jwt_key.kid(), second.jwt_key.kid());
    assert_eq!(first.jwt_key.public_jwk(), second.jwt_key.public_jwk());
    assert_eq!(first.sequence, second.sequence);
}

#[test]
fn root_ttl_is_configurable() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let ds = Datastore::open(dir.path()).unwrap();
    let ks = Keystore::open(dir.path(), ds, td(), None, 10 * HOUR, now).unwrap();
    let ttl = ks
        .current()
        .authority
        .not_after()
        .duration_since(now)
        .unwrap();
    assert!(
        ttl <= 10 * HOUR && ttl > 10 * HOUR - Duration::from_secs(5),
        "{ttl:?}"
    );
}

#[test]
fn reopening_with_another_trust_domain_is_refused() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    open(dir.path(), now);
    let ds = Datastore::open(dir.path()).unwrap();
    let err = Keystore::open(
        dir.path(),
        ds,
        "other.org".parse().unwrap(),
        None,
        DEFAULT_ROOT_TTL,
        now,
    )
    .unwrap_err();
    assert!(
        matches!(err, KeystoreError::WrongTrustDomain { .. }),
        "{err}"
    );
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let id = open(dir.path(), now).current().authority_id.clone();
    let key = dir.path().join("keys").join(format!("{id}.key"));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let ds = Datastore::open(dir.path()).unwrap();
    let err = Keystore::open(dir.path(), ds, td(), None, DEFAULT_ROOT_TTL, now).unwrap_err();
    assert!(
        matches!(err, KeystoreError::KeyFileMode { mode: 0o644, .. }),
        "{err}"
    );
}

#[test]
fn a_missing_key_file_is_an_error_not_a_new_root() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let id = open(dir.path(), now).current().authority_id.clone();
    fs::remove_file(dir.path().join("keys").join(format!("{id}.key"))).unwrap();
    let ds = Datastore::open(dir.path()).unwrap();
    let err = Keystore::open(dir.path(), ds, td(), None, DEFAULT_ROOT_TTL, now).unwrap_err();
    assert!(matches!(err, KeystoreError::Io { .. }), "{err}");
}

#[test]
fn two_processes_starting_at_once_agree_on_one_root() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| open(dir.path(), now).current().authority_id.clone()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let ds = Datastore::open(dir.path()).unwrap();
    let rows = ds.list_authorities().unwrap();
    let active: Vec<_> = rows
        .iter()
        .filter(|a| a.state == AuthorityState::Active)
        .collect();
    assert_eq!(active.len(), 1, "{rows:?}");
    assert!(
        rows.iter().all(|a| a.state == AuthorityState::Active),
        "{rows:?}"
    );
    // The losers cleaned up their keys: only the winner's two files remain.
    assert_eq!(key_files(dir.path()), 2);
}

#[test]
fn rotation_prepare_activate_retire() {
    let dir = TempDir::new().unwrap();
    let t0 = SystemTime::now();
    let ks = open(dir.path(), t0);
    let mut rx = ks.subscribe();
    rx.borrow_and_update();
    let first = ks.current();

    // Nothing to activate or retire yet.
    assert!(matches!(
        ks.activate(t0).unwrap_err(),
        KeystoreError::Rotation(AuthorityError::NoPrepared)
    ));
    assert!(matches!(
        ks.retire(t0, false).unwrap_err(),
        KeystoreError::Rotation(AuthorityError::NoOld)
    ));

    // prepare: published, not signing.
    let prepared = ks.prepare(t0).unwrap();
    assert_eq!(prepared.state, AuthorityState::Prepared);
    assert!(rx.has_changed().unwrap());
    let after_prepare = rx.borrow_and_update().clone();
    assert!(after_prepare.sequence > first.sequence);
    assert!(after_prepare.bundle.sequence() > first.bundle.sequence());
    assert_eq!(after_prepare.authority_id, first.authority_id);
    assert_eq!(after_prepare.bundle.len(), 2);
    assert!(
        after_prepare
            .bundle
            .contains(&CertificateDer::from(prepared.certificate.clone()))
    );
    assert_eq!(after_prepare.jwt_bundle.len(), 2);
    let (chain, _) = sign_one(&ks, t0);
    assert!(signed_by(&chain[0], first.authority.certificate()));
    assert!(matches!(
        ks.prepare(t0).unwrap_err(),
        KeystoreError::Rotation(AuthorityError::AlreadyPrepared { .. })
    ));

    // An SVID from the first root, journaled: it pins the first root until it expires.
    let (_, not_after) = sign_one(&ks, t0);
    let ds = Datastore::open(dir.path()).unwrap();
    ds.record_issued_batch(&[Issued {
        serial: "01".into(),
        spiffe_id: SpiffeId::parse("spiffe://example.org/w").unwrap(),
        agent: None,
        node: "n".into(),
        pod: None,
        authority: first.authority_id.clone(),
        not_after,
        issued_at: t0,
    }])
    .unwrap();

    // activate: the new root signs; the old one stays in the bundle.
    let activated = ks.activate(t0).unwrap();
    assert_eq!(activated.id, prepared.id);
    assert!(rx.has_changed().unwrap());
    let after_activate = rx.borrow_and_update().clone();
    assert!(after_activate.sequence > after_prepare.sequence);
    assert_eq!(after_activate.authority_id, prepared.id);
    assert_eq!(after_activate.bundle.len(), 2);
    assert!(
        after_activate
            .bundle
            .contains(first.authority.certificate())
    );
    let (chain, _) = sign_one(&ks, t0);
    assert!(signed_by(
        &chain[0],
        &CertificateDer::from(prepared.certificate.clone())
    ));
    assert!(!signed_by(&chain[0], first.authority.certificate()));
    assert_ne!(after_activate.jwt_key.kid(), first.jwt_key.kid());

    // retire: refused while the first root's SVID is valid, fine after.
    let err = ks.retire(t0 + Duration::from_secs(60), false).unwrap_err();
    assert!(
        matches!(
            err,
            KeystoreError::Rotation(AuthorityError::StillSigning { .. })
        ),
        "{err}"
    );
    assert!(!rx.has_changed().unwrap());
    let retired = ks
        .retire(not_after + Duration::from_secs(1), false)
        .unwrap();
    assert_eq!(retired.id, first.authority_id);
    let after_retire = rx.borrow_and_update().clone();
    assert!(after_retire.sequence > after_activate.sequence);
    assert_eq!(
        after_retire.bundle.authorities(),
        &[CertificateDer::from(prepared.certificate.clone())]
    );
    assert_eq!(after_retire.jwt_bundle.len(), 1);
    assert!(after_retire.jwt_bundle.get(first.jwt_key.kid()).is_none());
    let keys = dir.path().join("keys");
    assert!(!keys.join(format!("{}.key", first.authority_id)).exists());
    assert!(
        !keys
            .join(format!("{}.jwt.key", first.authority_id))
            .exists()
    );

    // A restart sees the same state.
    let reopened = open(dir.path(), t0).current();
    assert_eq!(reopened.authority_id, prepared.id);
    assert_eq!(reopened.bundle.len(), 1);
}

#[test]
fn retire_can_be_forced_before_signed_until() {
    let dir = TempDir::new().unwrap();
    let t0 = SystemTime::now();
    let ks = open(dir.path(), t0);
    let first = ks.current().authority_id.clone();
    let ds = Datastore::open(dir.path()).unwrap();
    ds.record_issued_batch(&[Issued {
        serial: "02".into(),
        spiffe_id: SpiffeId::parse("spiffe://example.org/w").unwrap(),
        agent: None,
        node: "n".into(),
        pod: None,
        authority: first.clone(),
        not_after: t0 + HOUR,
        issued_at: t0,
    }])
    .unwrap();
    ks.prepare(t0).unwrap();
    ks.activate(t0).unwrap();
    assert!(ks.retire(t0, false).is_err());
    assert_eq!(ks.retire(t0, true).unwrap().id, first);
    assert_eq!(ks.current().bundle.len(), 1);
}

#[test]
fn a_replica_picks_up_another_replicas_rotation_on_reload() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let a = open(dir.path(), now);
    let b = open(dir.path(), now);
    assert!(!b.reload(now).unwrap());
    let mut rx = b.subscribe();
    rx.borrow_and_update();

    let prepared = a.prepare(now).unwrap();
    assert!(b.reload(now).unwrap());
    assert!(rx.has_changed().unwrap());
    assert_eq!(b.current().bundle.len(), 2);
    assert_eq!(b.current().sequence, a.current().sequence);
    assert!(!b.reload(now).unwrap());

    a.activate(now).unwrap();
    assert!(b.reload(now).unwrap());
    assert_eq!(b.current().authority_id, prepared.id);
    assert_eq!(b.current().jwt_key.kid(), a.current().jwt_key.kid());
}

#[test]
fn jwt_keys_in_the_bundle_validate_minted_tokens() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let ks = open(dir.path(), now);
    let state = ks.current();
    let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let token = JwtSvid::mint(&state.jwt_key, &id, &["aud".to_owned()], HOUR, now).unwrap();
    let bundles: JwtBundleSet = [state.jwt_bundle.clone()].into_iter().collect();
    assert_eq!(
        JwtSvid::validate(&token, "aud", &bundles, now)
            .unwrap()
            .spiffe_id,
        id
    );
}

// --- upstream -------------------------------------------------------------------------------------

/// Writes Istio-style cacerts for `pki`'s intermediate into `dir`.
fn write_cacerts(dir: &Path, pki: &TestPki) -> UpstreamCa {
    fs::create_dir_all(dir).unwrap();
    fs::write(
        dir.join("ca-cert.pem"),
        certs_to_pem(&[pki.intermediate_der()]),
    )
    .unwrap();
    fs::write(
        dir.join("ca-key.pem"),
        pki.intermediate().key().to_pkcs8_pem(),
    )
    .unwrap();
    fs::write(dir.join("root-cert.pem"), pki.root_pem()).unwrap();
    UpstreamCa::from_dir(dir)
}

#[test]
fn upstream_cacerts_are_loaded_and_the_bundle_is_the_upstream_root() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new("example.org");
    let up = write_cacerts(&dir.path().join("cacerts"), &pki);
    assert!(up.cert_chain.ends_with("ca-cert.pem"));
    let now = SystemTime::now();
    let ks = open_upstream(dir.path(), up, now).unwrap();
    let state = ks.current();
    assert_eq!(state.authority.certificate(), &pki.intermediate_der());
    assert_eq!(state.bundle.authorities(), &[pki.root_der()]);
    assert_eq!(state.jwt_bundle.len(), 1);
    let (chain, _) = sign_one(&ks, now);
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], pki.intermediate_der());
    assert!(signed_by(&chain[0], &pki.intermediate_der()));
    assert!(signed_by(&chain[1], &pki.root_der()));
    X509Svid::parse_chain(chain).unwrap();
    // The JWT key is ours, 0600, and survives a restart.
    let jwt = dir
        .path()
        .join("keys")
        .join(format!("{}.jwt.key", state.authority_id));
    assert_eq!(mode(&jwt), 0o600);
    let again = open_upstream(
        dir.path(),
        UpstreamCa::from_dir(&dir.path().join("cacerts")),
        now,
    )
    .unwrap();
    assert_eq!(again.current().jwt_key.kid(), state.jwt_key.kid());
    assert_eq!(again.current().authority_id, state.authority_id);
}

#[test]
fn upstream_cert_chain_file_with_the_root_is_accepted() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new("example.org");
    let cacerts = dir.path().join("cacerts");
    write_cacerts(&cacerts, &pki);
    fs::write(
        cacerts.join("cert-chain.pem"),
        certs_to_pem(&[pki.intermediate_der(), pki.root_der()]),
    )
    .unwrap();
    let up = UpstreamCa::from_dir(&cacerts);
    assert!(up.cert_chain.ends_with("cert-chain.pem"));
    let ks = open_upstream(dir.path(), up, SystemTime::now()).unwrap();
    // The root is never handed out in an SVID chain: peers take it from the bundle.
    let (chain, _) = sign_one(&ks, SystemTime::now());
    assert_eq!(chain, vec![chain[0].clone(), pki.intermediate_der()]);
}

#[test]
fn upstream_key_not_matching_the_cert_is_refused() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new("example.org");
    let up = write_cacerts(&dir.path().join("cacerts"), &pki);
    fs::write(&up.key, SvidKey::generate().unwrap().to_pkcs8_pem()).unwrap();
    let err = open_upstream(dir.path(), up, SystemTime::now()).unwrap_err();
    assert!(
        matches!(
            err,
            KeystoreError::Upstream(UpstreamError::KeyMismatch { .. })
        ),
        "{err}"
    );
}

#[test]
fn upstream_sec1_key_is_refused_with_a_hint() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new("example.org");
    let up = write_cacerts(&dir.path().join("cacerts"), &pki);
    fs::write(
        &up.key,
        "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = open_upstream(dir.path(), up, SystemTime::now()).unwrap_err();
    assert!(
        matches!(err, KeystoreError::Upstream(UpstreamError::Key { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("openssl pkcs8 -topk8"), "{err}");
}

#[test]
fn upstream_non_ca_cert_is_refused() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new("example.org");
    let up = write_cacerts(&dir.path().join("cacerts"), &pki);
    // A workload SVID and its key, signed by the intermediate, presented as the CA.
    let (svid, key) = pki.svid("spiffe://example.org/w");
    fs::write(&up.cert_chain, certs_to_pem(svid.chain())).unwrap();
    fs::write(&up.key, key.to_pkcs8_pem()).unwrap();
    let err = open_upstream(dir.path(), up, SystemTime::now()).unwrap_err();
    assert!(
        matches!(err, KeystoreError::Upstream(UpstreamError::NotCa { .. })),
        "{err}"
    );
}

#[test]
fn upstream_chain_not_to_the_root_is_refused() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new("example.org");
    let other = TestPki::new("example.org");
    let up = write_cacerts(&dir.path().join("cacerts"), &pki);
    fs::write(&up.root, other.root_pem()).unwrap();
    let err = open_upstream(dir.path(), up, SystemTime::now()).unwrap_err();
    assert!(
        matches!(
            err,
            KeystoreError::Upstream(UpstreamError::NotChainedToRoot { .. })
        ),
        "{err}"
    );
}

#[test]
fn upstream_cert_for_another_trust_domain_is_refused() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new("other.org");
    let up = write_cacerts(&dir.path().join("cacerts"), &pki);
    let err = open_upstream(dir.path(), up, SystemTime::now()).unwrap_err();
    assert!(
        matches!(
            err,
            KeystoreError::Upstream(UpstreamError::WrongTrustDomain { .. })
        ),
        "{err}"
    );
}

#[test]
fn upstream_mode_refuses_rotation_and_reloads_replaced_files() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new("example.org");
    let cacerts = dir.path().join("cacerts");
    let up = write_cacerts(&cacerts, &pki);
    let now = SystemTime::now();
    let ks = open_upstream(dir.path(), up, now).unwrap();
    for err in [
        ks.prepare(now).unwrap_err(),
        ks.activate(now).unwrap_err(),
        ks.retire(now, true).unwrap_err(),
    ] {
        assert!(
            matches!(err, KeystoreError::UpstreamManaged { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("cacerts"), "{err}");
    }
    assert!(!ks.reload(now).unwrap());

    // The operator replaces the files with a new intermediate from the same root.
    let key = SvidKey::generate().unwrap();
    let cert = pki
        .root()
        .sign_intermediate(&key.public_key_der(), HOUR * 24, now)
        .unwrap()
        .cert;
    fs::write(
        cacerts.join("ca-cert.pem"),
        certs_to_pem(std::slice::from_ref(&cert)),
    )
    .unwrap();
    fs::write(cacerts.join("ca-key.pem"), key.to_pkcs8_pem()).unwrap();
    let before = ks.current();
    let mut rx = ks.subscribe();
    rx.borrow_and_update();
    assert!(ks.reload(now).unwrap());
    assert!(rx.has_changed().unwrap());
    let after = ks.current();
    assert_eq!(after.authority.certificate(), &cert);
    assert_ne!(after.authority_id, before.authority_id);
    assert!(after.sequence > before.sequence);
    assert_eq!(after.bundle.authorities(), &[pki.root_der()]);
    // The old intermediate's JWT key stays published: tokens it signed are still valid.
    assert_eq!(after.jwt_bundle.len(), 2);

    // A half-replaced pair (new key, old cert) is refused and the current state stays.
    fs::write(
        cacerts.join("ca-key.pem"),
        SvidKey::generate().unwrap().to_pkcs8_pem(),
    )
    .unwrap();
    assert!(ks.reload(now).is_err());
    assert_eq!(ks.current().authority_id, after.authority_id);
}
