//! Child processes: spawned with their output in a log file, read from `/proc`, stopped on drop
//! (SIGTERM, then SIGKILL after a grace period), and killed by the kernel if the bench itself dies
//! first (`setpriv --pdeathsig KILL`), so a bench stopped by a signal leaves no sidecar or Envoy
//! running to skew the next measurement.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::process::{Pid, Signal, kill_process};

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// A child process that is stopped when dropped.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

/// Memory and CPU of a process, from `/proc/<pid>/status` and `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// VmRSS.
    pub rss_kib: u64,
    /// VmHWM (peak RSS).
    pub hwm_kib: u64,
    /// RssAnon: the heap and stacks, without the binary's mapped pages.
    pub anon_kib: u64,
    /// RssFile: mapped file pages (the binary and its libraries) resident in this process.
    pub file_kib: u64,
    /// utime + stime.
    pub cpu_secs: f64,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `<dir>/<name>.log`.
    ///
    /// The program runs under `setpriv --pdeathsig KILL` (util-linux), which execs it: the pid is
    /// the program's, and the kernel kills it when the thread that spawned it exits. Callers spawn
    /// from the bench's main thread, which lives until the end of the run.
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = with_parent_death_signal(cmd)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {name} ({cmd:?}) under `setpriv` (util-linux)"))?;
        Ok(Self { child, log })
    }

    /// The process's memory and CPU now.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("process {pid} is gone; log:\n{}", self.log_tail()))?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14, stime 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Usage {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
            cpu_secs: (ticks(11) + ticks(12)) as f64 / TICKS_PER_SEC,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the process's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .get(lines.len().saturating_sub(20)..)
            .unwrap_or_default()
            .join("\n")
    }
}

/// `cmd` run by `setpriv --pdeathsig KILL --` (same arguments and environment).
fn with_parent_death_signal(cmd: &Command) -> Command {
    let mut wrapped = Command::new("setpriv");
    wrapped
        .args(["--pdeathsig", "KILL", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
