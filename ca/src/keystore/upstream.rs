//! Upstream mode: the CA signs with an intermediate that another CA (a corporate PKI, Istio's
//! `cacerts` secret) issued, and the trust bundle is that upstream root.
//!
//! Files, as Istio's `cacerts`: `ca-cert.pem` (the intermediate) or `cert-chain.pem` (the intermediate
//! first, then any further intermediates, optionally the root), `ca-key.pem` (PKCS#8 P-256) and
//! `root-cert.pem` (one or more roots). Every check runs before the CA signs anything: the key belongs
//! to the certificate, the certificate is a signing CA for the configured trust domain, and it chains
//! to a root in `root-cert.pem`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use meshward_identity::TrustDomain;
use meshward_identity::x509::{Authority, AuthorityError, KeyError, SvidKey, certs_from_pem};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::KeystoreError;
use super::files::read_text;

/// Where the upstream-signed signing certificate, its key and the upstream root are (Istio `cacerts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCa {
    /// The CA's certificate first, then any intermediates up to (optionally including) the root:
    /// `cert-chain.pem`, or `ca-cert.pem` when there is no chain file.
    pub cert_chain: PathBuf,
    /// The CA's private key, PKCS#8 ECDSA P-256 PEM (`ca-key.pem`).
    pub key: PathBuf,
    /// The upstream root certificate(s) (`root-cert.pem`); they become the trust bundle.
    pub root: PathBuf,
}

impl UpstreamCa {
    /// The files of an Istio-style `cacerts` directory: `cert-chain.pem` if present, else
    /// `ca-cert.pem`; `ca-key.pem`; `root-cert.pem`.
    pub fn from_dir(dir: &Path) -> Self {
        let chain = dir.join("cert-chain.pem");
        let cert_chain = if chain.exists() {
            chain
        } else {
            dir.join("ca-cert.pem")
        };
        Self {
            cert_chain,
            key: dir.join("ca-key.pem"),
            root: dir.join("root-cert.pem"),
        }
    }
}

/// Why the upstream CA files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A PEM file holds no usable certificate.
    #[error("`{}` holds no usable certificate: {reason}", path.display())]
    Certificates {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        reason: String,
    },
    /// The key file is not a PKCS#8 ECDSA P-256 key.
    #[error("`{}` is not a usable ca key: {source}{hint}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        source: KeyError,
        /// How to fix a common case (a SEC1 or RSA key).
        hint: &'static str,
    },
    /// The key does not belong to the certificate.
    #[error("ca key `{}` does not match the certificate in `{}`; put the matching pair in place", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The certificate is not a signing CA.
    #[error("certificate in `{}` is not a ca that may sign certificates: {source}", path.display())]
    NotCa {
        /// The certificate file.
        path: PathBuf,
        /// What is missing.
        source: AuthorityError,
    },
    /// The certificate cannot be a signing authority for another reason.
    #[error("certificate chain in `{}` cannot sign svids: {source}", path.display())]
    Unusable {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        source: AuthorityError,
    },
    /// The chain does not lead to any root of the root file.
    #[error("certificate chain in `{}` does not chain to a root in `{}`; check that both come from the same upstream ca", chain.display(), root.display())]
    NotChainedToRoot {
        /// The chain file.
        chain: PathBuf,
        /// The root file.
        root: PathBuf,
    },
    /// The certificate is for another trust domain.
    #[error(
        "upstream ca certificate is for trust domain `{found}`, but the ca runs for `{expected}`; issue it with uri san `spiffe://{expected}`"
    )]
    WrongTrustDomain {
        /// The trust domain in the certificate.
        found: TrustDomain,
        /// The configured trust domain.
        expected: TrustDomain,
    },
    /// The certificate has expired.
    #[error("upstream ca certificate in `{}` has expired; put a renewed one in place", path.display())]
    Expired {
        /// The certificate file.
        path: PathBuf,
    },
}

/// A loaded, checked upstream CA.
pub(super) struct LoadedUpstream {
    /// Signs SVIDs.
    pub(super) authority: Authority,
    /// The roots of the root file: the trust bundle.
    pub(super) roots: Vec<CertificateDer<'static>>,
}

/// Reads and checks the upstream files for trust domain `td`.
pub(super) fn load(
    files: &UpstreamCa,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<LoadedUpstream, KeystoreError> {
    let chain = read_certs(&files.cert_chain)?;
    let roots = read_certs(&files.root)?;
    let key = read_key(&files.key)?;

    let authority = Authority::from_parts(chain.clone(), key).map_err(|source| match source {
        AuthorityError::KeyMismatch => UpstreamError::KeyMismatch {
            key: files.key.clone(),
            cert: files.cert_chain.clone(),
        },
        AuthorityError::NotCa | AuthorityError::MissingKeyCertSign => UpstreamError::NotCa {
            path: files.cert_chain.clone(),
            source,
        },
        source => UpstreamError::Unusable {
            path: files.cert_chain.clone(),
            source,
        },
    })?;
    if authority.trust_domain() != td {
        return Err(UpstreamError::WrongTrustDomain {
            found: authority.trust_domain().clone(),
            expected: td.clone(),
        }
        .into());
    }
    if authority.not_after() <= now {
        return Err(UpstreamError::Expired {
            path: files.cert_chain.clone(),
        }
        .into());
    }
    // `from_parts` proved each certificate is signed by the next; the last one must be a given root or
    // be signed by one.
    let top = chain.last().ok_or_else(|| UpstreamError::Certificates {
        path: files.cert_chain.clone(),
        reason: "empty".to_owned(),
    })?;
    if !chains_to(top, &roots) {
        return Err(UpstreamError::NotChainedToRoot {
            chain: files.cert_chain.clone(),
            root: files.root.clone(),
        }
        .into());
    }
    Ok(LoadedUpstream { authority, roots })
}

/// Whether `cert` is one of `roots`, or is signed by one of them (matching issuer name and signature).
fn chains_to(cert: &CertificateDer<'_>, roots: &[CertificateDer<'static>]) -> bool {
    if roots.iter().any(|r| r.as_ref() == cert.as_ref()) {
        return true;
    }
    let Ok((_, child)) = X509Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    roots.iter().any(|root| {
        X509Certificate::from_der(root.as_ref()).is_ok_and(|(_, root)| {
            root.subject().as_raw() == child.issuer().as_raw()
                && root.is_ca()
                && child.verify_signature(Some(root.public_key())).is_ok()
        })
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, KeystoreError> {
    let text = read_text(path, "read upstream ca certificate")?;
    certs_from_pem(&text).map_err(|e| {
        UpstreamError::Certificates {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
        .into()
    })
}

fn read_key(path: &Path) -> Result<SvidKey, KeystoreError> {
    // Not `read_secret`: the cacerts files are the operator's (often a mounted Secret with its own
    // mode), and refusing a group-readable mount would only push people to copy the key around.
    let text = read_text(path, "read upstream ca key")?;
    SvidKey::from_pkcs8_pem(&text).map_err(|source| {
        let hint = if text.contains("BEGIN EC PRIVATE KEY") {
            " (a sec1 `EC PRIVATE KEY`; convert it with `openssl pkcs8 -topk8 -nocrypt -in ca-key.pem`)"
        } else if text.contains("BEGIN RSA PRIVATE KEY") {
            " (an rsa key; meshward signs with ecdsa p-256 only: issue a p-256 intermediate)"
        } else {
            ""
        };
        UpstreamError::Key {
            path: path.to_path_buf(),
            source,
            hint,
        }
        .into()
    })
}
