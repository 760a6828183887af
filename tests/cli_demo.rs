//! `meshward demo` as a newcomer runs it: the real binary, which starts the real CA, agent and
//! proxies as its children; every audit file it leaves must verify, and no child may outlive it.

// A test crate: clippy's `allow-unwrap-in-tests` covers `#[test]` fns but not the helpers beside them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

fn meshward() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshward"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHWARD_") {
            command.env_remove(key);
        }
    }
    command
}

/// A temp dir on the binary's file system, so the demo hard-links rather than copies it.
fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes (other than us) whose binary lives under `dir` or whose command line names it.
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let exe = std::fs::read_link(entry.path().join("exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if exe.starts_with(&needle) || cmdline.contains(&needle) {
            found.push(format!("pid {name}: exe {exe}, cmdline {cmdline}"));
        }
    }
    found
}

/// Waits (briefly: children are reaped by the demo, so this is only a grace for /proc) until no
/// process refers to `dir`.
fn assert_nothing_left(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = processes_under(dir);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("processes outlived the demo:\n{}", left.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number after `label` on the first line that has it.
fn number_after(text: &str, label: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no `{label}` in:\n{text}"));
    let rest = &line[line.find(label).unwrap() + label.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|n| n.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("no number after `{label}` in `{line}`"))
}

/// The summary part of the demo's output.
fn summary_of(text: &str) -> &str {
    let start = text
        .find("== meshward demo: summary ==")
        .unwrap_or_else(|| panic!("no summary in:\n{text}"));
    &text[start..]
}

fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "audit.jsonl") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn run_to_end(args: &[&str], timeout: Duration) -> Output {
    let mut child = meshward()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes in threads so a full pipe never stalls the demo.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut s).unwrap();
        s
    });
    let Some(status) = wait_timeout(&mut child, timeout) else {
        let _ = kill_process(Pid::from_child(&child), Signal::INT);
        let _ = wait_timeout(&mut child, Duration::from_secs(30));
        panic!(
            "the demo did not finish within {timeout:?}; stdout:\n{}",
            String::from_utf8_lossy(&out.join().unwrap())
        );
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[test]
fn demo_shows_allow_deny_rotation_and_leaves_verifiable_audit_files() {
    let temp = temp_dir();
    let out_dir = temp.path().join("out");
    let output = run_to_end(
        &[
            "demo",
            "--duration",
            "40s",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed ({}):\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let summary = summary_of(&stdout);
    assert!(number_after(summary, "allowed:") > 0, "{stdout}");
    assert!(number_after(summary, "denied:") > 0, "{stdout}");
    assert_eq!(number_after(summary, "failed:"), 0, "{stdout}");
    assert_eq!(
        number_after(summary, "failed allowed requests:"),
        0,
        "{stdout}"
    );
    assert_eq!(
        number_after(summary, "denied calls that got through:"),
        0,
        "{stdout}"
    );
    assert!(number_after(summary, "rotations seen:") >= 1, "{stdout}");
    // The agent's SVID and one per service, at least.
    assert!(
        number_after(summary, "issuance (CA audit):") >= 5,
        "{stdout}"
    );
    // The forbid that keeps reports away from payments is named, with its count.
    let denies =
        &stdout[stdout.find("denies by policy").unwrap()..stdout.find("allows by policy").unwrap()];
    assert!(
        denies.contains("demo-reports-never-call-payments"),
        "{stdout}"
    );
    assert!(denies.contains("(no policy permits)"), "{stdout}");
    // Plain lines, not a terminal table.
    assert!(
        !stdout.contains("\x1b["),
        "escape codes on a non-terminal stdout"
    );
    assert!(stdout.contains("rotation: "), "{stdout}");
    // Identities came from attestation with distinct selectors.
    assert!(stdout.contains("unix:path:"), "{stdout}");

    let out_dir = out_dir.canonicalize().unwrap();
    let files = audit_files(&out_dir);
    assert!(files.len() >= 5, "CA + 4 proxies: {files:?}");
    for file in &files {
        assert!(
            stdout.contains(&file.display().to_string()),
            "{file:?} not named:\n{stdout}"
        );
        let verify = meshward()
            .args(["audit", "verify", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    // The commands it prints work on what it left.
    let payments = out_dir.join("payments").join("audit.jsonl");
    let deny = meshward()
        .args([
            "audit",
            "query",
            payments.to_str().unwrap(),
            "--decision",
            "deny",
        ])
        .output()
        .unwrap();
    assert!(deny.status.success());
    let deny = String::from_utf8(deny.stdout).unwrap();
    assert!(deny.contains("demo-reports-never-call-payments"), "{deny}");
    assert!(!deny.lines().any(|l| l.contains(" allow ")), "{deny}");
    assert_nothing_left(&out_dir);
}

#[test]
fn sigint_stops_everything_prints_a_summary_and_removes_the_temp_dir() {
    let mut child = meshward()
        .args(["demo", "--duration", "5m"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first line names the data dir; wait for traffic, then ~10 s in all.
    let first = lines.recv_timeout(Duration::from_secs(30)).unwrap();
    let data_dir = PathBuf::from(first.rsplit("data dir ").next().unwrap().trim());
    assert!(data_dir.is_absolute(), "{first}");
    let started = Instant::now();
    let mut seen = vec![first];
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("all parts up")),
        "not up after 10 s:\n{}",
        seen.join("\n")
    );
    kill_process(Pid::from_child(&child), Signal::INT).unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(30))
        .expect("the demo exits promptly after SIGINT");
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        seen.push(line);
    }
    let text = seen.join("\n");
    assert_eq!(status.code(), Some(130), "{text}");
    let summary = summary_of(&text);
    assert!(summary.contains("stopped by SIGINT"), "{text}");
    assert_eq!(
        number_after(summary, "failed allowed requests:"),
        0,
        "{text}"
    );
    assert!(
        !data_dir.exists(),
        "without --out the data dir is removed: {}",
        data_dir.display()
    );
    assert_nothing_left(&data_dir);
}

#[test]
fn out_dir_must_be_new_or_empty() {
    let temp = temp_dir();
    std::fs::write(temp.path().join("keep-me"), "x").unwrap();
    let output = meshward()
        .args(["demo", "--out", temp.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("is not empty"), "{stderr}");
    assert!(temp.path().join("keep-me").exists());
}

#[test]
fn bad_duration_is_a_usage_error() {
    let output = meshward()
        .args(["demo", "--duration", "soon"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
}
