//! The `unix` attestor: what the kernel says about a process, read from procfs.
//!
//! Selectors (all of kind `unix`): `uid:<n>`, `gid:<n>` (effective ids, as `SO_PEERCRED` reports
//! them), `user:<name>`, `group:<name>` (from `/etc/passwd` and `/etc/group`, when the id has a
//! name), `path:<binary>` (`/proc/<pid>/exe`), `sha256:<hex>` (of the binary the process runs).
//!
//! `sha256:` is the one costly selector: it is produced only when [`Wanted::binary_hash`] says an
//! entry of the node selects on it, and each version of a binary (device, inode, size, mtime,
//! ctime) is hashed once, then taken from a cache.
//!
//! Pid reuse: a pid from the socket's credentials may belong to another process by the time it is
//! read. The process's start time (`/proc/<pid>/stat` field 22) is read before everything else and
//! again after; if it changed, the pid was reused and attestation fails ([`AttestError::PidReused`]);
//! if the process vanished, it fails with [`AttestError::ProcessGone`]. The binary is hashed through
//! `/proc/<pid>/exe` itself, so the hash is of what the process runs even if the file at its path
//! was replaced.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ring::digest;

use super::{AttestError, AttestFuture, Attestor, Selector, Wanted};

/// The selector kind of this attestor.
pub const KIND: &str = "unix";

/// How the value of the binary-hash selector starts (`unix:sha256:<hex>`).
pub const SHA256_PREFIX: &str = "sha256:";

/// Hashes kept at most; past this the cache starts over (binaries on a node are few).
const MAX_CACHED_HASHES: usize = 4_096;

/// Read size when hashing a binary: large reads keep a 100 MB binary at ~100 syscalls.
const HASH_BUFFER: usize = 1024 * 1024;

/// Attests processes from procfs; cheap to clone (the hash cache is shared).
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    passwd: PathBuf,
    group: PathBuf,
    hashes: Arc<Mutex<HashMap<FileKey, String>>>,
    hashed: Arc<AtomicU64>,
}

/// Identifies one version of a file: a rewrite changes `ctime` (which, unlike `mtime`, a user cannot
/// set back), a replacement changes the inode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: (i64, i64),
    ctime_ns: (i64, i64),
}

impl UnixAttestor {
    /// The attestor on the real `/proc`, `/etc/passwd` and `/etc/group`.
    pub fn new() -> Self {
        Self::with_paths("/proc", "/etc/passwd", "/etc/group")
    }

    /// The attestor on other files (a procfs mounted elsewhere, a container's `/etc`).
    pub fn with_paths(
        proc_root: impl Into<PathBuf>,
        passwd: impl Into<PathBuf>,
        group: impl Into<PathBuf>,
    ) -> Self {
        Self {
            proc_root: proc_root.into(),
            passwd: passwd.into(),
            group: group.into(),
            hashes: Arc::new(Mutex::new(HashMap::new())),
            hashed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Attests `pid` on the calling thread (it reads files and may hash a large binary).
    pub fn attest_blocking(&self, pid: i32) -> Result<Vec<Selector>, AttestError> {
        self.attest_blocking_wanted(pid, Wanted::ALL)
    }

    /// As [`Self::attest_blocking`], with `sha256:` only if `wanted` asks for it.
    pub fn attest_blocking_wanted(
        &self,
        pid: i32,
        wanted: Wanted,
    ) -> Result<Vec<Selector>, AttestError> {
        self.attest_between(pid, wanted, &|| {})
    }

    /// How many binaries this attestor (and its clones) read and hashed: cache hits and
    /// attestations that did not want the hash do not count.
    pub fn binaries_hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// As [`Self::attest_blocking_wanted`], calling `between` after the first start-time read:
    /// tests use it to make the process exit, or its pid be reused, in the middle of an attestation.
    fn attest_between(
        &self,
        pid: i32,
        wanted: Wanted,
        between: &dyn Fn(),
    ) -> Result<Vec<Selector>, AttestError> {
        if pid <= 0 {
            return Err(AttestError::BadPid(pid));
        }
        let dir = self.proc_root.join(pid.to_string());
        let started = start_time(pid, &dir)?;
        between();

        let (uid, gid) = effective_ids(pid, &dir)?;
        let exe_link = dir.join("exe");
        let path = std::fs::read_link(&exe_link).map_err(|e| io_error(pid, &exe_link, e))?;
        let sha256 = if wanted.binary_hash() {
            Some(self.binary_sha256(pid, &exe_link)?)
        } else {
            None
        };

        // INVARIANT: everything above describes the process that started at `started`; if the pid
        // now names another process (or none), none of it may be used.
        if start_time(pid, &dir)? != started {
            return Err(AttestError::PidReused(pid));
        }

        let mut selectors = vec![
            Selector::new(KIND, format!("uid:{uid}")),
            Selector::new(KIND, format!("gid:{gid}")),
            Selector::new(KIND, format!("path:{}", path.display())),
        ];
        if let Some(sha256) = sha256 {
            selectors.push(Selector::new(KIND, format!("{SHA256_PREFIX}{sha256}")));
        }
        if let Some(user) = name_of(&self.passwd, uid) {
            selectors.push(Selector::new(KIND, format!("user:{user}")));
        }
        if let Some(group) = name_of(&self.group, gid) {
            selectors.push(Selector::new(KIND, format!("group:{group}")));
        }
        Ok(selectors)
    }

    /// The hex SHA-256 of the file behind `exe_link`, from the cache when this version was seen.
    fn binary_sha256(&self, pid: i32, exe_link: &Path) -> Result<String, AttestError> {
        let mut file = File::open(exe_link).map_err(|e| io_error(pid, exe_link, e))?;
        let meta = file.metadata().map_err(|e| io_error(pid, exe_link, e))?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: (meta.mtime(), meta.mtime_nsec()),
            ctime_ns: (meta.ctime(), meta.ctime_nsec()),
        };
        if let Some(hit) = self.cache().get(&key) {
            return Ok(hit.clone());
        }
        let mut context = digest::Context::new(&digest::SHA256);
        let mut buffer = vec![0_u8; HASH_BUFFER];
        loop {
            let n = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(pid, exe_link, e)),
            };
            context.update(buffer.get(..n).unwrap_or_default());
        }
        let hex = hex::encode(context.finish().as_ref());
        self.hashed.fetch_add(1, Ordering::Relaxed);
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED_HASHES {
            cache.clear();
        }
        cache.insert(key, hex.clone());
        Ok(hex)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, String>> {
        // A panic while holding the lock cannot leave the map inconsistent (inserts are atomic).
        self.hashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::new()
    }
}

impl Attestor for UnixAttestor {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn attest(&self, pid: i32) -> AttestFuture<'_> {
        self.attest_wanted(pid, Wanted::ALL)
    }

    fn attest_wanted(&self, pid: i32, wanted: Wanted) -> AttestFuture<'_> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.attest_blocking_wanted(pid, wanted))
                .await
                .map_err(|e| AttestError::Internal {
                    pid,
                    reason: e.to_string(),
                })?
        })
    }
}

/// The process's start time in clock ticks after boot: `/proc/<pid>/stat` field 22.
pub(crate) fn start_time(pid: i32, dir: &Path) -> Result<u64, AttestError> {
    let path = dir.join("stat");
    let text = std::fs::read_to_string(&path).map_err(|e| io_error(pid, &path, e))?;
    parse_start_time(&text).map_err(|reason| AttestError::Malformed { pid, path, reason })
}

/// Field 22 of a `stat` line. The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the *last* `)`.
fn parse_start_time(stat: &str) -> Result<u64, String> {
    let (_, after_comm) = stat
        .rsplit_once(')')
        .ok_or_else(|| "no `)` after the command name".to_owned())?;
    // After the `)` come fields 3 (state) onwards, so field 22 is the 20th.
    let field = after_comm
        .split_whitespace()
        .nth(19)
        .ok_or_else(|| "fewer than 22 fields".to_owned())?;
    field
        .parse()
        .map_err(|_| format!("start time `{field}` is not a number"))
}

/// The effective uid and gid from `/proc/<pid>/status` (`Uid:`/`Gid:` lines: real, effective,
/// saved, filesystem).
fn effective_ids(pid: i32, dir: &Path) -> Result<(u32, u32), AttestError> {
    let path = dir.join("status");
    let text = std::fs::read_to_string(&path).map_err(|e| io_error(pid, &path, e))?;
    parse_effective_ids(&text).map_err(|reason| AttestError::Malformed { pid, path, reason })
}

fn parse_effective_ids(status: &str) -> Result<(u32, u32), String> {
    let effective = |label: &str| -> Result<u32, String> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .ok_or_else(|| format!("no `{label}` line"))?;
        let field = line
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| format!("`{label}` line has no effective id"))?;
        field
            .parse()
            .map_err(|_| format!("`{label}` effective id `{field}` is not a number"))
    };
    Ok((effective("Uid:")?, effective("Gid:")?))
}

/// The name of `id` in a passwd- or group-format file (`name:x:id:...`); `None` when the file or
/// the id is missing: a name is an extra selector, never required.
fn name_of(file: &Path, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    find_name(&text, id)
}

fn find_name(text: &str, id: u32) -> Option<String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let _password = fields.next()?;
            let line_id: u32 = fields.next()?.parse().ok()?;
            (line_id == id && !name.is_empty()).then(|| name.to_owned())
        })
}

/// A vanished process shows up as `ENOENT` (or `ESRCH` from some procfs files).
fn io_error(pid: i32, path: &Path, source: io::Error) -> AttestError {
    const ESRCH: i32 = 3;
    if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(ESRCH) {
        return AttestError::ProcessGone(pid);
    }
    AttestError::Io {
        pid,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;
