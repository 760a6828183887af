//! Stalls: the server sidecar stopped (SIGSTOP) for a moment every two seconds during a
//! fixed-rate phase, as a busy node or a paused VM stops it. Measures how long requests wait once
//! it resumes (the phase's p99.9 and max) and how many connections the client sidecar holds to the
//! server sidecar as it catches up (sampled from `/proc/net/tcp` every 20 ms).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// Time between two stalls.
pub const EVERY: Duration = Duration::from_secs(2);
const SAMPLE: Duration = Duration::from_millis(20);

/// Stalls under way; [`Stalls::finish`] ends them.
pub struct Stalls {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Observed>,
}

/// What the stalls did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    /// Stalls made.
    pub stalls: u32,
    /// Connections to the server sidecar when the phase started.
    pub conns_before: usize,
    /// The most connections to the server sidecar seen.
    pub conns_max: usize,
}

/// Stops process `pid` for `length` every [`EVERY`], the first after `first`, and counts the
/// established connections to `port` on loopback.
pub fn start(pid: u32, port: u16, first: Duration, length: Duration) -> anyhow::Result<Stalls> {
    let pid = Pid::from_raw(i32::try_from(pid)?)
        .ok_or_else(|| anyhow::anyhow!("process id 0 cannot be stalled"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        let before = established_to(port);
        let mut seen = Observed {
            stalls: 0,
            conns_before: before,
            conns_max: before,
        };
        let mut next = Instant::now() + first;
        while !stopping.load(Ordering::SeqCst) {
            if Instant::now() >= next {
                let _ = kill_process(pid, Signal::STOP);
                std::thread::sleep(length);
                let _ = kill_process(pid, Signal::CONT);
                seen.stalls += 1;
                next += EVERY;
            }
            std::thread::sleep(SAMPLE);
            seen.conns_max = seen.conns_max.max(established_to(port));
        }
        seen
    });
    Ok(Stalls { stop, thread })
}

impl Stalls {
    /// Ends the stalls (the process is running again) and reports them.
    pub fn finish(self) -> Observed {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

/// Established IPv4 connections whose remote port is `port` (`/proc/net/tcp`, state `01`).
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let remote = fields.nth(2).unwrap_or("");
            let state = fields.next().unwrap_or("");
            state == "01" && remote.ends_with(&port)
        })
        .count()
}
