//! Trust bundles: the X.509 authorities of one trust domain, and the set of bundles a workload trusts.
//!
//! A [`TrustBundle`] holds *several* root authorities at once so that root rotation never breaks
//! traffic: while a new root is prepared, the bundle carries old and new, and leaves from either chain.
//! Each authority's webpki [`TrustAnchor`] is computed once, when it is added, so a handshake only
//! borrows a slice ([`TrustBundle::trust_anchors`]). A [`BundleSet`] maps trust domains (our own and
//! federated ones) to their bundles; [`crate::verify::PeerVerifier`] picks the bundle by the peer's
//! trust domain, never trying one domain's roots on another domain's leaf.
//!
//! JWT keys live in [`crate::jwt`]; this module is about X.509 only.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, TrustAnchor};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

use crate::spiffe_id::TrustDomain;

/// Why certificates cannot become (or be read as) a trust bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The PEM text has no `CERTIFICATE` block at all.
    #[error("trust bundle PEM for `{0}` holds no `CERTIFICATE` block")]
    EmptyPem(TrustDomain),
    /// The concatenated DER is empty.
    #[error("trust bundle for `{0}` holds no certificate")]
    Empty(TrustDomain),
    /// The PEM text could not be read.
    #[error("trust bundle PEM for `{td}` is malformed: {reason}")]
    Pem {
        /// The bundle's trust domain.
        td: TrustDomain,
        /// What the PEM reader said.
        reason: String,
    },
    /// A certificate is not valid X.509 DER.
    #[error("certificate {index} of the trust bundle for `{td}` is not valid X.509 DER: {reason}")]
    Der {
        /// The bundle's trust domain.
        td: TrustDomain,
        /// Position of the certificate in its input, from 0.
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// The certificate is not a certificate authority, so it cannot anchor a chain.
    #[error("certificate `{subject}` cannot be an authority of trust domain `{td}`: {reason}")]
    NotCa {
        /// The bundle's trust domain.
        td: TrustDomain,
        /// The certificate's subject, for the operator.
        subject: String,
        /// Which CA property is missing.
        reason: &'static str,
    },
    /// webpki refused to make a trust anchor from the certificate.
    #[error("certificate `{subject}` cannot be a trust anchor of trust domain `{td}`: {reason}")]
    BadAnchor {
        /// The bundle's trust domain.
        td: TrustDomain,
        /// The certificate's subject, for the operator.
        subject: String,
        /// What webpki said.
        reason: String,
    },
}

/// The X.509 authorities of one trust domain, with a sequence number and an optional refresh hint.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    // INVARIANT: `authorities` and `anchors` have the same length and `anchors[i]` is the trust
    // anchor of `authorities[i]`; no two authorities have the same DER.
    authorities: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    sequence: u64,
    refresh_hint: Option<Duration>,
}

impl TrustBundle {
    /// An empty bundle for `trust_domain`, sequence 0; add authorities with [`Self::add_authority`].
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            authorities: Vec::new(),
            anchors: Vec::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// Reads every `CERTIFICATE` block of `pem` as an authority; other block types are skipped.
    ///
    /// Refuses PEM with no certificate, and any certificate that is not a CA.
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, BundleError> {
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(cert.map_err(|e| BundleError::Pem {
                td: trust_domain.clone(),
                reason: e.to_string(),
            })?);
        }
        if certs.is_empty() {
            return Err(BundleError::EmptyPem(trust_domain));
        }
        Self::from_certs(trust_domain, certs)
    }

    /// Reads concatenated DER certificates, the form of the Workload API's `bundle` fields.
    ///
    /// Refuses empty input, trailing bytes that are not a certificate, and non-CA certificates.
    pub fn from_der_concat(trust_domain: TrustDomain, der: &[u8]) -> Result<Self, BundleError> {
        if der.is_empty() {
            return Err(BundleError::Empty(trust_domain));
        }
        let mut certs = Vec::new();
        let mut rest = der;
        while !rest.is_empty() {
            let (after, _) = X509Certificate::from_der(rest).map_err(|e| BundleError::Der {
                td: trust_domain.clone(),
                index: certs.len(),
                reason: e.to_string(),
            })?;
            let len = rest.len() - after.len();
            let one = rest.get(..len).unwrap_or_default();
            certs.push(CertificateDer::from(one.to_vec()));
            rest = after;
        }
        Self::from_certs(trust_domain, certs)
    }

    /// The authorities as PEM `CERTIFICATE` blocks, in the order they were added.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for cert in &self.authorities {
            push_pem_block(&mut out, cert);
        }
        out
    }

    /// The authorities' DER, concatenated, as the Workload API sends bundles.
    pub fn to_der_concat(&self) -> Vec<u8> {
        self.authorities
            .iter()
            .flat_map(|c| c.as_ref().iter().copied())
            .collect()
    }

    /// Adds an authority; returns `false` (and changes nothing) if it is already present.
    ///
    /// Refuses a certificate that is not a CA (`basicConstraints` CA:true, and `keyCertSign`
    /// if it has a key usage extension), and one webpki cannot use as a trust anchor.
    pub fn add_authority(&mut self, cert: CertificateDer<'_>) -> Result<bool, BundleError> {
        if self.contains(&cert) {
            return Ok(false);
        }
        let cert = cert.into_owned();
        let anchor = self.check_authority(&cert, self.authorities.len())?;
        self.authorities.push(cert);
        self.anchors.push(anchor);
        self.bump();
        Ok(true)
    }

    /// Removes an authority (root retirement); returns whether it was present.
    pub fn remove_authority(&mut self, cert: &CertificateDer<'_>) -> bool {
        let Some(i) = self.position(cert) else {
            return false;
        };
        self.authorities.remove(i);
        self.anchors.remove(i);
        self.bump();
        true
    }

    /// Whether `cert` is one of the authorities.
    pub fn contains(&self, cert: &CertificateDer<'_>) -> bool {
        self.position(cert).is_some()
    }

    /// The authorities, in the order they were added.
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// The authorities as webpki trust anchors, computed when they were added.
    pub fn trust_anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The trust domain these authorities sign for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// How many authorities the bundle holds.
    pub fn len(&self) -> usize {
        self.authorities.len()
    }

    /// Whether the bundle holds no authority (and so verifies nothing).
    pub fn is_empty(&self) -> bool {
        self.authorities.is_empty()
    }

    /// The sequence number: it increases on every change, so a newer bundle is easy to spot.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Sets the sequence number, e.g. to the one a bundle endpoint published.
    pub fn set_sequence(&mut self, sequence: u64) {
        self.sequence = sequence;
    }

    /// How often a holder should refresh this bundle, if its publisher said.
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// Sets the refresh hint; a change increases the sequence number.
    pub fn set_refresh_hint(&mut self, hint: Option<Duration>) {
        if self.refresh_hint != hint {
            self.refresh_hint = hint;
            self.bump();
        }
    }

    fn from_certs(
        trust_domain: TrustDomain,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let mut bundle = Self::new(trust_domain);
        for (index, cert) in certs.into_iter().enumerate() {
            if bundle.contains(&cert) {
                continue;
            }
            let anchor = bundle.check_authority(&cert, index)?;
            bundle.authorities.push(cert);
            bundle.anchors.push(anchor);
        }
        // A freshly read bundle is version 0 of what this process knows; callers that carry a
        // publisher's sequence set it with `set_sequence`.
        Ok(bundle)
    }

    fn check_authority(
        &self,
        cert: &CertificateDer<'static>,
        index: usize,
    ) -> Result<TrustAnchor<'static>, BundleError> {
        let td = &self.trust_domain;
        let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| BundleError::Der {
            td: td.clone(),
            index,
            reason: e.to_string(),
        })?;
        let subject = parsed.subject().to_string();
        let not_ca = |reason| BundleError::NotCa {
            td: td.clone(),
            subject: subject.clone(),
            reason,
        };
        match parsed.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(not_ca(
                    "it is not a CA (basicConstraints CA:true is missing)",
                ));
            }
            Err(_) => return Err(not_ca("its basicConstraints extension is malformed")),
        }
        match parsed.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(not_ca("its key usage does not allow keyCertSign"));
            }
            Ok(_) => {}
            Err(_) => return Err(not_ca("its keyUsage extension is malformed")),
        }
        webpki::anchor_from_trusted_cert(cert)
            .map(|a| a.to_owned())
            .map_err(|e| BundleError::BadAnchor {
                td: td.clone(),
                subject,
                reason: e.to_string(),
            })
    }

    fn position(&self, cert: &CertificateDer<'_>) -> Option<usize> {
        self.authorities
            .iter()
            .position(|c| c.as_ref() == cert.as_ref())
    }

    fn bump(&mut self) {
        self.sequence = self.sequence.saturating_add(1);
    }
}

impl fmt::Debug for TrustBundle {
    // Whole certificates never go to logs: the trust domain, count and sequence say enough.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("authorities", &self.authorities.len())
            .field("sequence", &self.sequence)
            .field("refresh_hint", &self.refresh_hint)
            .finish()
    }
}

/// Trust bundles by trust domain: our own and every federated one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, TrustBundle>,
}

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bundle` under its trust domain, returning the bundle it replaces.
    pub fn insert(&mut self, bundle: TrustBundle) -> Option<TrustBundle> {
        self.bundles.insert(bundle.trust_domain().clone(), bundle)
    }

    /// The bundle of `trust_domain`, if the set has one.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&TrustBundle> {
        self.bundles.get(trust_domain)
    }

    /// Removes and returns the bundle of `trust_domain` (federation ended).
    pub fn remove(&mut self, trust_domain: &TrustDomain) -> Option<TrustBundle> {
        self.bundles.remove(trust_domain)
    }

    /// The bundles, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &TrustBundle> {
        self.bundles.values()
    }

    /// The trust domains that have a bundle, in order.
    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.bundles.keys()
    }

    /// How many trust domains have a bundle.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// Whether the set has no bundle.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl FromIterator<TrustBundle> for BundleSet {
    /// Later bundles of the same trust domain replace earlier ones.
    fn from_iter<I: IntoIterator<Item = TrustBundle>>(iter: I) -> Self {
        let mut set = Self::new();
        set.extend(iter);
        set
    }
}

impl Extend<TrustBundle> for BundleSet {
    fn extend<I: IntoIterator<Item = TrustBundle>>(&mut self, iter: I) {
        for bundle in iter {
            self.insert(bundle);
        }
    }
}

impl<'a> IntoIterator for &'a BundleSet {
    type Item = &'a TrustBundle;
    type IntoIter = std::collections::btree_map::Values<'a, TrustDomain, TrustBundle>;

    fn into_iter(self) -> Self::IntoIter {
        self.bundles.values()
    }
}

/// Appends one RFC 7468 `CERTIFICATE` block (base64 in 64-column lines).
fn push_pem_block(out: &mut String, cert: &CertificateDer<'_>) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    // Base64 output is ASCII, so splitting the bytes never splits a character.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

#[cfg(test)]
mod tests;
