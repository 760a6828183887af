//! Workload attestation: from a caller's pid (the socket's peer credentials) to the selectors that
//! registration entries are matched against.
//!
//! [`Attestor`] is the seam: the `unix` attestor ([`unix::UnixAttestor`]) now, the Kubernetes one
//! (pid -> cgroup -> pod) later. [`Attestors`] runs every configured attestor and unites their
//! selectors; any attestor failing fails the whole attestation, so a workload is never matched on a
//! partial view of itself.

pub mod cgroup;
pub mod k8s;
pub mod unix;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use crate::svid_cache::CacheSnapshot;

/// A property of a workload, `kind:value` (`unix:uid:1000`), as registration entries name them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// The attestor that vouches for it: `unix`, `k8s`.
    pub kind: String,
    /// What it says, e.g. `uid:1000`.
    pub value: String,
}

/// Why a selector does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// No `:` between kind and value.
    #[error("selector `{0}` is not `kind:value` (e.g. `unix:uid:1000`)")]
    NoKind(String),
    /// The kind or the value is empty.
    #[error("selector `{0}` has an empty kind or value")]
    Empty(String),
}

/// Why a process could not be attested. The Workload API refuses the call; it never guesses.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The process is gone (exited, or it is a zombie whose binary cannot be read anymore).
    #[error("process `{0}` exited during attestation")]
    ProcessGone(i32),
    /// The pid now belongs to another process than the one that was being read.
    #[error("pid `{0}` was reused by another process during attestation")]
    PidReused(i32),
    /// The pid is not a plausible process id.
    #[error("pid `{0}` is not a valid process id")]
    BadPid(i32),
    /// A file about the process could not be read.
    #[error("cannot read `{}` for pid `{pid}`: {source}", path.display())]
    Io {
        /// The process.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file about the process has an unexpected shape.
    #[error("cannot parse `{}` for pid `{pid}`: {reason}", path.display())]
    Malformed {
        /// The process.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The `k8s` attestor refused the process: not in a pod of this node.
    #[error("pid `{pid}`: {source}")]
    K8s {
        /// The process.
        pid: i32,
        /// Why.
        source: k8s::K8sError,
    },
    /// The attestor's blocking work could not run.
    #[error("attestation of pid `{pid}` failed: {reason}")]
    Internal {
        /// The process.
        pid: i32,
        /// What happened.
        reason: String,
    },
}

/// What an attestor's `attest` returns: boxed, so attestors can live behind `dyn`.
pub type AttestFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Selector>, AttestError>> + Send + 'a>>;

/// One way of learning about a process.
pub trait Attestor: Send + Sync {
    /// The selector kind it produces (`unix`).
    fn kind(&self) -> &'static str;

    /// The selectors of process `pid`; every selector's `kind` is [`Self::kind`].
    fn attest(&self, pid: i32) -> AttestFuture<'_>;

    /// As [`Self::attest`], leaving out the costly selectors `wanted` says no entry uses. The
    /// default produces everything (an attestor with no costly selector needs no other).
    fn attest_wanted(&self, pid: i32, wanted: Wanted) -> AttestFuture<'_> {
        let _everything_is_cheap = wanted;
        self.attest(pid)
    }
}

/// Which costly selectors an attestation must produce; the cheap ones are always produced.
///
/// The one costly selector today is `unix:sha256:<hex>`: hashing a binary the agent has not seen
/// reads all of it (~130 ms for a 136 MB binary), so it is only done when an entry of the node
/// selects on it. Leaving a selector out can only make a workload match *fewer* entries: every
/// selector of an entry must be among the workload's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    binary_hash: bool,
}

/// Every configured attestor; cheap to clone.
#[derive(Clone)]
pub struct Attestors {
    attestors: Vec<Arc<dyn Attestor>>,
}

impl AttestError {
    /// A stable short code, for metrics labels and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ProcessGone(_) => "process_gone",
            Self::PidReused(_) => "pid_reused",
            Self::BadPid(_) => "bad_pid",
            Self::Io { .. } => "io",
            Self::Malformed { .. } => "malformed",
            Self::K8s { .. } => "k8s",
            Self::Internal { .. } => "internal",
        }
    }
}

impl Wanted {
    /// Every selector: what to produce before the node's entries are known.
    pub const ALL: Self = Self { binary_hash: true };

    /// Only the cheap selectors.
    pub const CHEAP: Self = Self { binary_hash: false };

    /// What entries selecting on `selectors` can match on: the binary hash only if one of them is
    /// a `unix:sha256:` selector.
    pub fn by_selectors<'a>(selectors: impl IntoIterator<Item = &'a Selector>) -> Self {
        let binary_hash = selectors
            .into_iter()
            .any(|s| s.kind == unix::KIND && s.value.starts_with(unix::SHA256_PREFIX));
        Self { binary_hash }
    }

    /// Whether `unix:sha256:` must be produced.
    pub fn binary_hash(self) -> bool {
        self.binary_hash
    }
}

impl Selector {
    /// A selector from its parts.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    /// `unix:uid:1000` -> kind `unix`, value `uid:1000` (split at the first `:`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::NoKind(s.to_owned()))?;
        if kind.is_empty() || value.is_empty() {
            return Err(SelectorError::Empty(s.to_owned()));
        }
        Ok(Self::new(kind, value))
    }
}

impl Attestors {
    /// Runs these attestors, in order, on every call.
    pub fn new(attestors: Vec<Arc<dyn Attestor>>) -> Self {
        Self { attestors }
    }

    /// The standalone set: the `unix` attestor on the real `/proc`.
    pub fn standalone() -> Self {
        Self::new(vec![Arc::new(unix::UnixAttestor::new())])
    }

    /// The Kubernetes set: the `unix` attestor, then the `k8s` one (pid -> pod on this node).
    pub fn kubernetes(k8s: k8s::K8sAttestor) -> Self {
        Self::new(vec![Arc::new(unix::UnixAttestor::new()), Arc::new(k8s)])
    }

    /// Every attestor's selectors for `pid`, sorted and without duplicates.
    pub async fn attest(&self, pid: i32) -> Result<Vec<Selector>, AttestError> {
        self.attest_wanted(pid, Wanted::ALL).await
    }

    /// `pid`'s selectors for matching against `snapshot`: the costly ones only if an entry of
    /// the snapshot uses them ([`CacheSnapshot::wanted`]), or if the cheap ones match no entry
    /// (the caller may be waiting for an entry not synced yet, which may select on anything).
    pub async fn attest_for(
        &self,
        pid: i32,
        snapshot: &CacheSnapshot,
    ) -> Result<Vec<Selector>, AttestError> {
        let selectors = self.attest_wanted(pid, snapshot.wanted).await?;
        if snapshot.wanted != Wanted::ALL && snapshot.matching(&selectors).is_empty() {
            return self.attest_wanted(pid, Wanted::ALL).await;
        }
        Ok(selectors)
    }

    /// As [`Self::attest`], leaving out the costly selectors `wanted` says no entry uses.
    pub async fn attest_wanted(
        &self,
        pid: i32,
        wanted: Wanted,
    ) -> Result<Vec<Selector>, AttestError> {
        if pid <= 0 {
            return Err(AttestError::BadPid(pid));
        }
        let mut selectors = Vec::new();
        for attestor in &self.attestors {
            selectors.extend(attestor.attest_wanted(pid, wanted).await?);
        }
        selectors.sort();
        selectors.dedup();
        Ok(selectors)
    }
}

impl fmt::Debug for Attestors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.attestors.iter().map(|a| a.kind()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_at_the_first_colon_and_display_back() {
        let s: Selector = "unix:path:/usr/bin/a:b".parse().unwrap();
        assert_eq!(s.kind, "unix");
        assert_eq!(s.value, "path:/usr/bin/a:b");
        assert_eq!(s.to_string(), "unix:path:/usr/bin/a:b");
    }

    #[test]
    fn bad_selectors_are_refused() {
        assert_eq!(
            "unix".parse::<Selector>(),
            Err(SelectorError::NoKind("unix".into()))
        );
        assert_eq!(
            ":uid:1".parse::<Selector>(),
            Err(SelectorError::Empty(":uid:1".into()))
        );
        assert_eq!(
            "unix:".parse::<Selector>(),
            Err(SelectorError::Empty("unix:".into()))
        );
    }

    #[test]
    fn only_a_unix_sha256_selector_wants_the_binary_hash() {
        let parse =
            |list: &[&str]| -> Vec<Selector> { list.iter().map(|s| s.parse().unwrap()).collect() };
        let cheap = parse(&["unix:uid:0", "unix:path:/bin/sha256:x", "k8s:sha256:ab"]);
        assert_eq!(Wanted::by_selectors(&cheap), Wanted::CHEAP);
        assert!(!Wanted::by_selectors(&cheap).binary_hash());
        let hashed = parse(&["unix:uid:0", "unix:sha256:ab"]);
        assert_eq!(Wanted::by_selectors(&hashed), Wanted::ALL);
        assert_eq!(Wanted::by_selectors(&[]), Wanted::CHEAP);
    }

    #[tokio::test]
    async fn non_positive_pids_are_refused_before_any_attestor_runs() {
        let attestors = Attestors::standalone();
        for pid in [0, -1] {
            let err = attestors.attest(pid).await.unwrap_err();
            assert!(matches!(err, AttestError::BadPid(p) if p == pid), "{err:?}");
        }
    }
}
