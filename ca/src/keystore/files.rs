//! Key files in `D/keys/`: written atomically (temp file, `fsync`, rename, `fsync` of the directory),
//! created 0600 from the first byte, and never logged.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::KeystoreError;

/// Name of the key directory inside the data dir.
pub(super) const KEYS_DIR: &str = "keys";

/// Lock file serializing first starts (and upstream adoption) across CA processes on one data dir.
pub(super) const FIRST_START_LOCK: &str = ".first-start.lock";

/// The X.509 signing key of authority `id`.
pub(super) fn x509_key_path(keys_dir: &Path, id: &str) -> PathBuf {
    keys_dir.join(format!("{id}.key"))
}

/// The JWT signing key of authority `id`.
pub(super) fn jwt_key_path(keys_dir: &Path, id: &str) -> PathBuf {
    keys_dir.join(format!("{id}.jwt.key"))
}

/// Creates `dir` 0700 if missing, and refuses one that others can read (keys live there).
pub(super) fn ensure_private_dir(dir: &Path) -> Result<(), KeystoreError> {
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| io_error("create key dir", dir, source))?;
    }
    let mode = fs::metadata(dir)
        .map_err(|source| io_error("inspect key dir", dir, source))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        // Tightening is safe (only this user needs the keys) and better than refusing to start.
        tracing::warn!(path = %dir.display(), mode = format!("{:o}", mode & 0o777), "key dir was open to others; setting 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| io_error("restrict key dir to 0700", dir, source))?;
    }
    Ok(())
}

/// Writes `contents` to `path` atomically with mode 0600: a crash leaves either the old file or the new
/// one, never a torn key; a reader never sees a partial key.
pub(super) fn write_secret(path: &Path, contents: &[u8]) -> Result<(), KeystoreError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("key");
    // The pid keeps two CA processes writing into one dir from sharing a temp file.
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| io_error("create key file", &tmp, source))?;
        file.write_all(contents)
            .map_err(|source| io_error("write key file", &tmp, source))?;
        file.sync_all()
            .map_err(|source| io_error("sync key file", &tmp, source))?;
        fs::rename(&tmp, path)
            .map_err(|source| io_error("rename key file into place", path, source))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // Best effort: a leftover temp file holds key material.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Like [`write_secret`], but never replaces an existing file: of two processes creating the same key
/// at once, the first one's stays and the second one reads it. Returns whether this call created it.
pub(super) fn write_secret_new(path: &Path, contents: &[u8]) -> Result<bool, KeystoreError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("key");
    let tmp = dir.join(format!(".{file_name}.{}.new.tmp", std::process::id()));
    write_secret(&tmp, contents)?;
    // link(2) fails if the target exists, which rename(2) would silently replace.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(io_error("link key file into place", path, source)),
    }
}

/// Reads a key file, refusing one that others can read (a key that leaked to other users is not one to
/// keep signing with silently).
pub(super) fn read_secret(path: &Path) -> Result<Vec<u8>, KeystoreError> {
    let meta = fs::metadata(path).map_err(|source| io_error("read key file", path, source))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(KeystoreError::KeyFileMode {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    fs::read(path).map_err(|source| io_error("read key file", path, source))
}

/// An exclusive lock on a file in the key dir, held across processes until dropped.
pub(super) struct DirLock {
    _file: fs::File,
}

/// Takes an exclusive `flock` on `path` (created 0600 if missing), waiting for other holders.
///
/// Used where the datastore alone cannot make a check-then-act atomic across CA processes.
pub(super) fn lock_file(path: &Path) -> Result<DirLock, KeystoreError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| io_error("open lock file", path, source))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_error("lock", path, e.into()))?;
    Ok(DirLock { _file: file })
}

/// Removes a key file if it exists.
pub(super) fn remove_secret(path: &Path) -> Result<(), KeystoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(io_error("remove key file", path, source)),
    }
}

/// Reads a non-secret file (an upstream certificate) as text.
pub(super) fn read_text(path: &Path, doing: &'static str) -> Result<String, KeystoreError> {
    fs::read_to_string(path).map_err(|source| io_error(doing, path, source))
}

fn sync_dir(dir: &Path) -> Result<(), KeystoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io_error("sync key dir", dir, source))
}

pub(super) fn io_error(doing: &'static str, path: &Path, source: io::Error) -> KeystoreError {
    KeystoreError::Io {
        doing,
        path: path.to_path_buf(),
        source,
    }
}
