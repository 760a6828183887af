//! A test PKI made at run time with rcgen: a root, an intermediate, SVIDs, and deliberately bad leaves.
//!
//! Compiled for this crate's tests and, with the `test-util` feature, for other crates' tests.
//! Every constructor panics on failure: a test PKI that cannot be built is a broken test, not an input
//! to handle.
//!
//! ```ignore
//! let pki = TestPki::new("example.org");
//! let (svid, key) = pki.svid("spiffe://example.org/ns/a/sa/b"); // chain: leaf, intermediate
//! let (chain, key) = pki.leaf_with_two_uri_sans("spiffe://example.org/a", "spiffe://example.org/b");
//! ```

// Test helpers fail loudly: a panic here points at the test that misused them.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::x509::{
    Authority, DEFAULT_SVID_TTL, NOT_BEFORE_BACKDATE, SvidKey, X509Svid, certs_to_pem, leaf_params,
    random_serial,
};

/// Lifetime of the test root and intermediate: long enough for any test's clock games.
pub const TEST_AUTHORITY_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A certificate chain (leaf first) and the leaf's key, for leaves [`X509Svid`] would refuse.
pub type RawSvid = (Vec<CertificateDer<'static>>, SvidKey);

/// A root, and an intermediate signed by it, for one trust domain.
#[derive(Debug)]
pub struct TestPki {
    root: Authority,
    intermediate: Authority,
}

/// Overrides for [`TestPki::svid_with`]; `None` means the normal value (backdated now, now + 1h).
///
/// The window is written as given, unclamped, so expired and not-yet-valid SVIDs are easy to make.
#[derive(Debug, Clone, Default)]
pub struct SvidOptions {
    /// The leaf's `notBefore`.
    pub not_before: Option<SystemTime>,
    /// The leaf's `notAfter`.
    pub not_after: Option<SystemTime>,
    /// Sign with the root instead of the intermediate (the chain is then the leaf alone).
    pub signed_by_root: bool,
}

impl TestPki {
    /// A fresh root and intermediate for `trust_domain` (e.g. `example.org`), valid from now for a year.
    pub fn new(trust_domain: &str) -> Self {
        Self::new_at(trust_domain, SystemTime::now())
    }

    /// Like [`TestPki::new`] with the clock at `now`.
    pub fn new_at(trust_domain: &str, now: SystemTime) -> Self {
        let td: TrustDomain = trust_domain
            .parse()
            .unwrap_or_else(|e| panic!("test pki trust domain `{trust_domain}`: {e}"));
        let root = Authority::new_root(&td, TEST_AUTHORITY_TTL, now).expect("test root");
        let key = SvidKey::generate().expect("intermediate key");
        let signed = root
            .sign_intermediate(&key.public_key_der(), TEST_AUTHORITY_TTL, now)
            .expect("test intermediate");
        let intermediate =
            Authority::from_parts(vec![signed.cert], key).expect("load test intermediate");
        Self { root, intermediate }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.root.trust_domain()
    }

    /// The root authority.
    pub fn root(&self) -> &Authority {
        &self.root
    }

    /// The intermediate authority (signs the SVIDs).
    pub fn intermediate(&self) -> &Authority {
        &self.intermediate
    }

    /// The root certificate (what goes in a trust bundle).
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.certificate().clone()
    }

    /// The intermediate certificate.
    pub fn intermediate_der(&self) -> CertificateDer<'static> {
        self.intermediate.certificate().clone()
    }

    /// The root as PEM (a one-root `bundle.pem`).
    pub fn root_pem(&self) -> String {
        certs_to_pem(&[self.root_der()])
    }

    /// A valid SVID for `id` signed by the intermediate (chain: leaf, intermediate), valid for an hour.
    pub fn svid(&self, id: &str) -> (X509Svid, SvidKey) {
        let id = parse_id(id);
        let key = SvidKey::generate().expect("svid key");
        let signed = self
            .intermediate
            .sign_svid(
                &key.public_key_der(),
                &id,
                DEFAULT_SVID_TTL,
                SystemTime::now(),
            )
            .unwrap_or_else(|e| panic!("test svid for `{id}`: {e}"));
        let svid = X509Svid::parse_chain(signed.chain).expect("test svid parses");
        (svid, key)
    }

    /// An SVID for `id` with the given validity window or signer, bypassing the authority's clamping.
    pub fn svid_with(&self, id: &str, options: SvidOptions) -> (X509Svid, SvidKey) {
        let id = parse_id(id);
        let now = SystemTime::now();
        let not_before = options.not_before.unwrap_or(now - NOT_BEFORE_BACKDATE);
        let not_after = options.not_after.unwrap_or(now + DEFAULT_SVID_TTL);
        let params = leaf_params(
            &id,
            not_before,
            not_after,
            &random_serial().expect("serial"),
        )
        .expect("leaf template");
        let signer = if options.signed_by_root {
            &self.root
        } else {
            &self.intermediate
        };
        let (chain, key) = sign_raw(signer, &params);
        let svid = X509Svid::parse_chain(chain).expect("test svid parses");
        (svid, key)
    }

    /// A valid-looking SVID for `id` from another, unrelated root of the same trust domain name.
    pub fn foreign_svid(&self, id: &str) -> (X509Svid, SvidKey) {
        TestPki::new(self.trust_domain().as_str()).svid(id)
    }

    /// A valid SVID for `id` whose signature is corrupted (one byte of it flipped).
    pub fn bad_signature_svid(&self, id: &str) -> RawSvid {
        let (svid, key) = self.svid(id);
        let mut chain = svid.into_chain();
        let mut leaf = chain.remove(0).to_vec();
        // The certificate ends with the signature BIT STRING, and an ECDSA signature ends with the last
        // byte of `s`: flipping it keeps the DER valid and breaks only the signature.
        let last = leaf.last_mut().expect("leaf is not empty");
        *last ^= 0x01;
        chain.insert(0, CertificateDer::from(leaf));
        (chain, key)
    }

    /// A leaf with two URI SANs (otherwise a normal SVID template).
    pub fn leaf_with_two_uri_sans(&self, first: &str, second: &str) -> RawSvid {
        self.leaf_with_sans(vec![uri_san(first), uri_san(second)])
    }

    /// A leaf with no subjectAltName extension at all.
    pub fn leaf_without_san(&self) -> RawSvid {
        self.leaf_with_sans(Vec::new())
    }

    /// A leaf whose only SAN is a DNS name.
    pub fn leaf_with_dns_san(&self, dns: &str) -> RawSvid {
        self.leaf_with_sans(vec![SanType::DnsName(
            dns.try_into().expect("dns san is ascii"),
        )])
    }

    /// A leaf whose only URI SAN is `uri`, written as is: e.g. `https://example.org/x`, an invalid
    /// `spiffe://` URI such as `spiffe://Example.org/a`, or a trust domain ID with no path.
    pub fn leaf_with_uri_san(&self, uri: &str) -> RawSvid {
        self.leaf_with_sans(vec![uri_san(uri)])
    }

    /// A CA certificate (`CA:true`, keyCertSign) with URI SAN `id`, signed by the intermediate and
    /// presented as a leaf.
    pub fn ca_as_leaf(&self, id: &str) -> RawSvid {
        let mut params = self.template(id);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages = Vec::new();
        sign_raw(&self.intermediate, &params)
    }

    /// A leaf for `id` whose keyUsage is `keyEncipherment` only (no `digitalSignature`).
    pub fn leaf_without_digital_signature(&self, id: &str) -> RawSvid {
        let mut params = self.template(id);
        params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        sign_raw(&self.intermediate, &params)
    }

    /// A leaf for `id` with no keyUsage extension at all.
    pub fn leaf_without_key_usage(&self, id: &str) -> RawSvid {
        let mut params = self.template(id);
        params.key_usages = Vec::new();
        sign_raw(&self.intermediate, &params)
    }

    /// A leaf for `id` (`CA:false`) whose keyUsage also allows `keyCertSign`.
    pub fn leaf_with_key_cert_sign(&self, id: &str) -> RawSvid {
        let mut params = self.template(id);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        sign_raw(&self.intermediate, &params)
    }

    /// A leaf for `id` (`CA:false`) whose keyUsage also allows `cRLSign`.
    pub fn leaf_with_crl_sign(&self, id: &str) -> RawSvid {
        let mut params = self.template(id);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        sign_raw(&self.intermediate, &params)
    }

    /// The normal leaf template for `id`, valid now for an hour.
    fn template(&self, id: &str) -> CertificateParams {
        let now = SystemTime::now();
        leaf_params(
            &parse_id(id),
            now - NOT_BEFORE_BACKDATE,
            now + DEFAULT_SVID_TTL,
            &random_serial().expect("serial"),
        )
        .expect("leaf template")
    }

    /// The normal leaf template with `sans` instead of its URI SAN; a subject is added when `sans` is
    /// empty, so the certificate is still well formed.
    fn leaf_with_sans(&self, sans: Vec<SanType>) -> RawSvid {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        if sans.is_empty() {
            let mut dn = DistinguishedName::new();
            dn.push(rcgen::DnType::CommonName, "no san");
            params.distinguished_name = dn;
        } else {
            params.distinguished_name = DistinguishedName::new();
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&random_serial().expect("serial")));
        params.not_before = OffsetDateTime::from(now - NOT_BEFORE_BACKDATE);
        params.not_after = OffsetDateTime::from(now + DEFAULT_SVID_TTL);
        sign_raw(&self.intermediate, &params)
    }
}

/// Signs `params` over a fresh key with `signer`; the chain is the leaf plus the signer's issued chain.
fn sign_raw(signer: &Authority, params: &CertificateParams) -> RawSvid {
    let key = SvidKey::generate().expect("leaf key");
    let leaf = params
        .signed_by(&key, signer.issuer())
        .expect("sign test leaf");
    let mut chain = vec![leaf.der().clone()];
    chain.extend(signer.issued_tail().iter().cloned());
    (chain, key)
}

fn parse_id(id: &str) -> SpiffeId {
    SpiffeId::parse(id).unwrap_or_else(|e| panic!("test spiffe id `{id}`: {e}"))
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("uri san is ascii"))
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::x509::certs_from_pem;

    const TD: &str = "example.org";
    const ID: &str = "spiffe://example.org/ns/a/sa/b";

    fn pki() -> TestPki {
        TestPki::new(TD)
    }

    fn id() -> SpiffeId {
        SpiffeId::parse(ID).unwrap()
    }

    #[test]
    fn test_pki_chain_is_root_intermediate_leaf() {
        let pki = pki();
        let (svid, _) = pki.svid(ID);
        assert!(pki.root().is_root());
        assert!(!pki.intermediate().is_root());
        assert_eq!(pki.trust_domain().as_str(), TD);
        let leaf = X509Certificate::from_der(svid.leaf()).unwrap().1;
        let inter_der = pki.intermediate_der();
        let inter = X509Certificate::from_der(&inter_der).unwrap().1;
        let root_der = pki.root_der();
        let root = X509Certificate::from_der(&root_der).unwrap().1;
        leaf.verify_signature(Some(inter.public_key())).unwrap();
        inter.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(
            certs_from_pem(&pki.root_pem()).unwrap(),
            vec![root_der.clone()]
        );
    }

    #[test]
    fn test_pki_key_matches_the_svid() {
        let (svid, key) = pki().svid(ID);
        let leaf = X509Certificate::from_der(svid.leaf()).unwrap().1;
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_point()
        );
    }

    #[test]
    fn test_pki_validity_options_are_written_as_given() {
        let pki = pki();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let (expired, _) = pki.svid_with(
            ID,
            SvidOptions {
                not_before: Some(now - 2 * hour),
                not_after: Some(now - hour),
                ..SvidOptions::default()
            },
        );
        assert!(!expired.is_valid_at(now));
        assert!(expired.not_after() < now);
        let (future, _) = pki.svid_with(
            ID,
            SvidOptions {
                not_before: Some(now + hour),
                ..SvidOptions::default()
            },
        );
        assert!(!future.is_valid_at(now));
        assert!(future.not_before() > now);
        let (by_root, _) = pki.svid_with(
            ID,
            SvidOptions {
                signed_by_root: true,
                ..SvidOptions::default()
            },
        );
        assert_eq!(by_root.chain().len(), 1);
    }

    #[test]
    fn test_pki_foreign_svid_does_not_chain_to_this_root() {
        let pki = pki();
        let (foreign, _) = pki.foreign_svid(ID);
        assert_eq!(foreign.spiffe_id(), &id());
        let foreign_inter = X509Certificate::from_der(&foreign.chain()[1]).unwrap().1;
        let root_der = pki.root_der();
        let root = X509Certificate::from_der(&root_der).unwrap().1;
        assert!(
            foreign_inter
                .verify_signature(Some(root.public_key()))
                .is_err()
        );
    }

    #[test]
    fn test_pki_bad_signature_svid_keeps_its_shape_but_not_its_signature() {
        let pki = pki();
        let (chain, _) = pki.bad_signature_svid(ID);
        let svid = X509Svid::parse_chain(chain).unwrap();
        let leaf = X509Certificate::from_der(svid.leaf()).unwrap().1;
        let inter_der = pki.intermediate_der();
        let inter = X509Certificate::from_der(&inter_der).unwrap().1;
        assert!(leaf.verify_signature(Some(inter.public_key())).is_err());
    }
}
