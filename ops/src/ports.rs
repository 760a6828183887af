//! Local ports for child processes: picked so that nothing else on the machine takes them first.

use std::collections::BTreeSet;
use std::io;
use std::net::TcpListener;
use std::sync::{Mutex, PoisonError};

/// Free 127.0.0.1 ports, all distinct (held until all are picked, then released).
///
/// The ports are handed to child processes that bind them a moment later. A port from the kernel's
/// ephemeral range (`bind(:0)`) can be taken in that moment by any outgoing connection on the
/// machine (it happened in CI, with tests running beside the demo, and in a benchmark), so they
/// are picked at random below that range, where only explicit binds go; `bind(:0)` is the
/// fallback.
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let (low, high) = below_ephemeral_range();
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(n);
    let mut seed = std::hash::BuildHasher::hash_one(
        &std::collections::hash_map::RandomState::new(),
        std::process::id(),
    );
    let mut attempts = 0;
    while listeners.len() < n && attempts < n * 50 && high > low {
        attempts += 1;
        // xorshift: cheap, and seeded per process so concurrent callers pick different ports.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let span = u64::from(high - low);
        let port = low + u16::try_from(seed % span).unwrap_or(0);
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(listener);
        }
    }
    while listeners.len() < n {
        listeners.push(TcpListener::bind("127.0.0.1:0")?);
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// One free port, as [`free_ports`] picks them, and never one this process was given before: for
/// callers that start their children one at a time.
pub fn free_port() -> io::Result<u16> {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in 0..100 {
        if let Some(&port) = free_ports(1)?.first()
            && given.insert(port)
        {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "found no free 127.0.0.1 port this process has not handed out already",
    ))
}

/// Ports `[low, high)` below the kernel's ephemeral range (`ip_local_port_range`), or an empty
/// range when that range starts too low to leave room.
fn below_ephemeral_range() -> (u16, u16) {
    const LOWEST: u16 = 10_000;
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if first_ephemeral > LOWEST + 1_000 {
        (LOWEST, first_ephemeral)
    } else {
        (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports = free_ports(40).unwrap();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 40, "{ports:?}");
        let (low, high) = below_ephemeral_range();
        for port in ports {
            if high > low {
                assert!((low..high).contains(&port), "{port} not in {low}..{high}");
            }
            // Released after picking: the child process can bind it.
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }

    #[test]
    fn free_port_never_hands_out_a_port_twice() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    }
}
