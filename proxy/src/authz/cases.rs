//! Policy cases: example requests with the decision a set must give (`policies/cases/*.json`).
//!
//! ```json
//! { "set": "demo",
//!   "cases": [ { "name": "frontend reads the catalog",
//!                "principal": "spiffe://demo.meshward/ns/shop/sa/frontend", "action": "GET",
//!                "resource": "spiffe://demo.meshward/ns/shop/sa/catalog", "path": "/items/42",
//!                "expect": "allow", "policies": ["demo-frontend-reads-catalog"] } ] }
//! ```
//! `set` is the policy directory relative to the parent of `cases/`. `path`, `host` and
//! `source_ip` are optional; paths and hosts are normalized exactly as the proxy does.
//! `policies`, when present, must equal the decision's determining policy ids.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use meshward_identity::SpiffeId;
use serde::Deserialize;

use super::{Action, AuthzRequest, Decision};
use crate::normalize::{NormalizedPath, normalize_host, normalize_path};

/// A case file: which set, and its cases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// The policy directory, relative to the parent of the `cases/` directory.
    pub set: String,
    /// The cases.
    pub cases: Vec<Case>,
}

/// One example request and the decision expected for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows.
    pub name: String,
    /// The caller's SPIFFE ID.
    pub principal: String,
    /// The method, or `connect`.
    pub action: String,
    /// The callee's SPIFFE ID.
    pub resource: String,
    /// The raw request path (normalized before deciding); `/` when absent (not for `connect`).
    #[serde(default)]
    pub path: Option<String>,
    /// The raw host (normalized before deciding); empty when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// The caller's address; `127.0.0.1` when absent.
    #[serde(default)]
    pub source_ip: Option<IpAddr>,
    /// The expected outcome.
    pub expect: Expect,
    /// The expected determining policy ids, if the case checks them.
    #[serde(default)]
    pub policies: Option<Vec<String>>,
}

/// An expected outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The request must be allowed.
    Allow,
    /// The request must be denied.
    Deny,
}

/// Why a case file or case cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    /// The file cannot be read.
    #[error("cannot read case file `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a case file.
    #[error("case file `{path}` is not valid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What serde said.
        source: serde_json::Error,
    },
    /// A field of a case does not parse.
    #[error("case `{case}`: {message}")]
    BadRequest {
        /// The case's name.
        case: String,
        /// What is wrong.
        message: String,
    },
}

impl CaseFile {
    /// Reads a case file.
    pub fn load(path: &Path) -> Result<Self, CaseError> {
        let text = std::fs::read_to_string(path).map_err(|source| CaseError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| CaseError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The policy directory this file's cases are for, given the file's own path.
    pub fn set_dir(&self, case_file: &Path) -> PathBuf {
        let cases_dir = case_file.parent().unwrap_or(Path::new("."));
        let root = cases_dir.parent().unwrap_or(Path::new("."));
        root.join(&self.set)
    }
}

impl Case {
    /// The request this case describes, normalized as the proxy would.
    pub fn request(&self) -> Result<AuthzRequest, CaseError> {
        let bad = |message: String| CaseError::BadRequest {
            case: self.name.clone(),
            message,
        };
        build_request(
            &self.principal,
            &self.action,
            &self.resource,
            self.path.as_deref(),
            self.host.as_deref(),
            self.source_ip,
        )
        .map_err(bad)
    }

    /// `None` if `decision` is what the case expects, else what differs.
    pub fn mismatch(&self, decision: &Decision) -> Option<String> {
        let expected_allow = self.expect == Expect::Allow;
        if decision.allowed != expected_allow {
            return Some(format!(
                "expected {}, got {}",
                if expected_allow { "allow" } else { "deny" },
                decision.reason()
            ));
        }
        match &self.policies {
            Some(ids) => {
                let mut want = ids.clone();
                want.sort();
                (want != decision.policies).then(|| {
                    format!(
                        "expected deciding policies {want:?}, got {:?} ({})",
                        decision.policies,
                        decision.reason()
                    )
                })
            }
            None => None,
        }
    }
}

/// Builds a request from the strings a person types (the CLI, case files).
pub fn build_request(
    principal: &str,
    action: &str,
    resource: &str,
    path: Option<&str>,
    host: Option<&str>,
    source_ip: Option<IpAddr>,
) -> Result<AuthzRequest, String> {
    let principal = SpiffeId::parse(principal).map_err(|e| format!("principal: {e}"))?;
    let resource = SpiffeId::parse(resource).map_err(|e| format!("resource: {e}"))?;
    let action = Action::from_str(action).map_err(|e| e.to_string())?;
    let host = match host {
        Some(h) => normalize_host(h).map_err(|e| e.to_string())?,
        None => String::new(),
    };
    let source_ip = source_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    if action == Action::Connect {
        if path.is_some() {
            return Err("`connect` (plain TCP) has no path".to_owned());
        }
        return Ok(AuthzRequest::connect(principal, resource, host, source_ip));
    }
    let path: NormalizedPath = match path {
        Some(p) => normalize_path(p.as_bytes()).map_err(|e| e.to_string())?,
        None => NormalizedPath::root(),
    };
    Ok(AuthzRequest::http(
        principal, resource, action, path, host, source_ip,
    ))
}
