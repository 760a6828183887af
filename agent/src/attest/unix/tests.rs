use std::process::{Child, Command};
use std::sync::Mutex;

use super::*;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes).as_ref())
}

fn value<'a>(selectors: &'a [Selector], prefix: &str) -> Option<&'a str> {
    selectors.iter().find_map(|s| s.value.strip_prefix(prefix))
}

fn stat_line(pid: i32, start: u64) -> String {
    // A command name with spaces and parentheses, as a process may choose.
    format!(
        "{pid} (evil) (name S) S 1 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 10\n"
    )
}

/// A procfs of one process, as the kernel lays it out, in a temp dir.
struct FakeProc {
    dir: tempfile::TempDir,
    pid: i32,
    binary: PathBuf,
}

impl FakeProc {
    fn new(pid: i32, start: u64, uid: u32, gid: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let proc_dir = dir.path().join("proc").join(pid.to_string());
        std::fs::create_dir_all(&proc_dir).unwrap();
        std::fs::write(proc_dir.join("stat"), stat_line(pid, start)).unwrap();
        std::fs::write(
            proc_dir.join("status"),
            format!(
                "Name:\tfake\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\n"
            ),
        )
        .unwrap();
        let binary = dir.path().join("bin-fake");
        std::fs::write(&binary, b"first version of the binary").unwrap();
        std::os::unix::fs::symlink(&binary, proc_dir.join("exe")).unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            format!("# comment\nroot:x:0:0::/root:/bin/sh\nfake-user:x:{uid}:{gid}::/:/bin/sh\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("group"),
            format!("root:x:0:\nfake-group:x:{gid}:\n"),
        )
        .unwrap();
        Self { dir, pid, binary }
    }

    fn attestor(&self) -> UnixAttestor {
        UnixAttestor::with_paths(
            self.dir.path().join("proc"),
            self.dir.path().join("passwd"),
            self.dir.path().join("group"),
        )
    }

    fn set_start(&self, start: u64) {
        let stat = self
            .dir
            .path()
            .join("proc")
            .join(self.pid.to_string())
            .join("stat");
        std::fs::write(stat, stat_line(self.pid, start)).unwrap();
    }
}

#[tokio::test]
async fn attests_the_test_process_itself() {
    // SO_PEERCRED on a socket pair tells who we are without going through procfs.
    let (a, _b) = tokio::net::UnixStream::pair().unwrap();
    let ours = a.peer_cred().unwrap();
    let (pid, uid, gid) = (ours.pid().unwrap(), ours.uid(), ours.gid());
    let attestor = UnixAttestor::new();
    let selectors = attestor.attest(pid).await.unwrap();

    assert!(selectors.iter().all(|s| s.kind == "unix"), "{selectors:?}");
    assert_eq!(value(&selectors, "uid:"), Some(uid.to_string().as_str()));
    assert_eq!(value(&selectors, "gid:"), Some(gid.to_string().as_str()));
    let exe = std::env::current_exe().unwrap();
    assert_eq!(value(&selectors, "path:"), Some(exe.to_str().unwrap()));
    let expected = sha256_hex(&std::fs::read(&exe).unwrap());
    assert_eq!(value(&selectors, "sha256:"), Some(expected.as_str()));
    if let Some(name) = name_of(Path::new("/etc/passwd"), uid) {
        assert_eq!(value(&selectors, "user:"), Some(name.as_str()));
    }
    if let Some(name) = name_of(Path::new("/etc/group"), gid) {
        assert_eq!(value(&selectors, "group:"), Some(name.as_str()));
    }
    // The second time the hash comes from the cache, keyed by the binary's file version.
    assert_eq!(attestor.attest_blocking(pid).unwrap(), selectors);
    assert_eq!(attestor.cache().len(), 1);
}

fn spawn_sleeper() -> Child {
    Command::new("sleep").arg("30").spawn().unwrap()
}

#[test]
fn a_process_that_exits_mid_attestation_is_gone() {
    let child = Mutex::new(spawn_sleeper());
    let pid = i32::try_from(child.lock().unwrap().id()).unwrap();
    let attestor = UnixAttestor::new();
    let err = attestor
        .attest_between(pid, Wanted::ALL, &|| {
            let mut child = child.lock().unwrap();
            child.kill().unwrap();
            // Reaped, so /proc/<pid> is gone (a zombie would still have a stat file).
            child.wait().unwrap();
        })
        .unwrap_err();
    assert!(
        matches!(err, AttestError::ProcessGone(p) if p == pid),
        "{err:?}"
    );
}

#[test]
fn a_process_that_is_already_gone_is_gone() {
    let mut child = spawn_sleeper();
    let pid = i32::try_from(child.id()).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let err = UnixAttestor::new().attest_blocking(pid).unwrap_err();
    assert!(
        matches!(err, AttestError::ProcessGone(p) if p == pid),
        "{err:?}"
    );
}

#[test]
fn a_live_child_is_attested_with_its_own_binary() {
    let mut child = spawn_sleeper();
    let pid = i32::try_from(child.id()).unwrap();
    let selectors = UnixAttestor::new().attest_blocking(pid);
    child.kill().unwrap();
    child.wait().unwrap();
    let selectors = selectors.unwrap();
    let path = value(&selectors, "path:").unwrap().to_owned();
    assert!(path.ends_with("sleep"), "{path}");
    let expected = sha256_hex(&std::fs::read(&path).unwrap());
    assert_eq!(value(&selectors, "sha256:"), Some(expected.as_str()));
}

#[test]
fn a_pid_reused_mid_attestation_is_refused() {
    let fake = FakeProc::new(4242, 1_000, 1234, 5678);
    let attestor = fake.attestor();
    let err = attestor
        .attest_between(fake.pid, Wanted::ALL, &|| fake.set_start(2_000))
        .unwrap_err();
    assert!(matches!(err, AttestError::PidReused(4242)), "{err:?}");

    // Unchanged start time: the same process, attested from the fake files.
    let selectors = attestor.attest_blocking(fake.pid).unwrap();
    let shown: Vec<String> = selectors.iter().map(ToString::to_string).collect();
    assert!(shown.contains(&"unix:uid:1234".to_owned()), "{shown:?}");
    assert!(shown.contains(&"unix:gid:5678".to_owned()), "{shown:?}");
    assert!(
        shown.contains(&"unix:user:fake-user".to_owned()),
        "{shown:?}"
    );
    assert!(
        shown.contains(&"unix:group:fake-group".to_owned()),
        "{shown:?}"
    );
    assert!(
        shown.contains(&format!("unix:path:{}", fake.binary.display())),
        "{shown:?}"
    );
}

#[test]
fn a_rewritten_binary_is_hashed_again() {
    let fake = FakeProc::new(7, 1, 0, 0);
    let attestor = fake.attestor();
    let first = attestor.attest_blocking(fake.pid).unwrap();
    assert_eq!(
        value(&first, "sha256:"),
        Some(sha256_hex(b"first version of the binary").as_str())
    );
    std::fs::write(&fake.binary, b"second, longer version of the binary").unwrap();
    let second = attestor.attest_blocking(fake.pid).unwrap();
    assert_eq!(
        value(&second, "sha256:"),
        Some(sha256_hex(b"second, longer version of the binary").as_str())
    );
}

#[test]
fn ids_without_names_give_no_name_selectors() {
    let fake = FakeProc::new(8, 1, 4_000_000, 4_000_001);
    std::fs::write(fake.dir.path().join("passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    std::fs::remove_file(fake.dir.path().join("group")).unwrap();
    let selectors = fake.attestor().attest_blocking(fake.pid).unwrap();
    assert_eq!(value(&selectors, "user:"), None);
    assert_eq!(value(&selectors, "group:"), None);
    assert_eq!(value(&selectors, "uid:"), Some("4000000"));
}

#[test]
fn malformed_proc_files_are_refused_by_name() {
    let fake = FakeProc::new(9, 1, 0, 0);
    let proc_dir = fake.dir.path().join("proc").join("9");
    std::fs::write(proc_dir.join("status"), "Name:\tx\nUid:\t0\n").unwrap();
    let err = fake.attestor().attest_blocking(9).unwrap_err();
    match err {
        AttestError::Malformed {
            pid: 9,
            path,
            reason,
        } => {
            assert!(path.ends_with("status"), "{}", path.display());
            assert!(reason.contains("effective"), "{reason}");
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
    std::fs::write(proc_dir.join("stat"), "9 (x) S 1 2 3\n").unwrap();
    let err = fake.attestor().attest_blocking(9).unwrap_err();
    assert!(matches!(err, AttestError::Malformed { .. }), "{err:?}");
}

#[test]
fn stat_start_time_is_counted_from_the_last_parenthesis() {
    assert_eq!(parse_start_time(&stat_line(1, 987_654)), Ok(987_654));
    assert!(
        parse_start_time("1 no-parens S 1")
            .unwrap_err()
            .contains("`)`")
    );
    assert!(
        parse_start_time("1 (x) S 1 2")
            .unwrap_err()
            .contains("fewer than 22")
    );
    let bad = stat_line(1, 5).replace(" 5 1000", " five 1000");
    assert!(parse_start_time(&bad).unwrap_err().contains("`five`"));
}

#[test]
fn status_gives_the_effective_ids() {
    let status = "Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\n";
    assert_eq!(parse_effective_ids(status), Ok((2, 6)));
    assert!(
        parse_effective_ids("Uid:\t1\t2\n")
            .unwrap_err()
            .contains("`Gid:`")
    );
    assert!(
        parse_effective_ids("Uid:\t1\tx\nGid:\t1\t1\n")
            .unwrap_err()
            .contains("`x`")
    );
}

#[test]
fn names_come_from_passwd_format_lines() {
    let passwd = "# c\nbroken\nroot:x:0:0::/:/bin/sh\n:x:5:5::/:\nalice:x:1000:1000::/:/bin/sh\n";
    assert_eq!(find_name(passwd, 1000).as_deref(), Some("alice"));
    assert_eq!(find_name(passwd, 0).as_deref(), Some("root"));
    assert_eq!(find_name(passwd, 5), None);
    assert_eq!(find_name(passwd, 42), None);
}

#[test]
fn the_binary_is_hashed_only_when_wanted_and_then_once() {
    let fake = FakeProc::new(9, 1, 0, 0);
    let attestor = fake.attestor();

    let cheap = attestor
        .attest_blocking_wanted(fake.pid, Wanted::CHEAP)
        .unwrap();
    assert_eq!(value(&cheap, "sha256:"), None, "{cheap:?}");
    assert!(value(&cheap, "path:").is_some(), "{cheap:?}");
    assert_eq!(attestor.binaries_hashed(), 0);
    assert!(attestor.cache().is_empty());

    let all = attestor
        .attest_blocking_wanted(fake.pid, Wanted::ALL)
        .unwrap();
    let expected = sha256_hex(b"first version of the binary");
    assert_eq!(value(&all, "sha256:"), Some(expected.as_str()));
    assert_eq!(attestor.binaries_hashed(), 1);
    // A clone shares the cache: the same file version is not read again.
    let again = attestor.clone().attest_blocking(fake.pid).unwrap();
    assert_eq!(again, all);
    assert_eq!(attestor.binaries_hashed(), 1);
    // Without the hash wanted, the selectors are the same minus `sha256:`.
    let cheap_again = attestor
        .attest_blocking_wanted(fake.pid, Wanted::CHEAP)
        .unwrap();
    let mut without: Vec<Selector> = all
        .into_iter()
        .filter(|s| !s.value.starts_with(SHA256_PREFIX))
        .collect();
    without.sort();
    let mut cheap_sorted = cheap_again;
    cheap_sorted.sort();
    assert_eq!(cheap_sorted, without);
}

#[test]
fn a_pid_reused_mid_attestation_is_refused_without_the_hash_too() {
    let fake = FakeProc::new(4243, 1_000, 1234, 5678);
    let attestor = fake.attestor();
    let err = attestor
        .attest_between(fake.pid, Wanted::CHEAP, &|| fake.set_start(2_000))
        .unwrap_err();
    assert!(matches!(err, AttestError::PidReused(4243)), "{err:?}");
    assert_eq!(attestor.binaries_hashed(), 0);
}
