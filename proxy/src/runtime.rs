//! The async runtime the proxy runs on, sized by [`ProxyConfig::worker_threads`].
//!
//! One worker gets tokio's current-thread scheduler, more get the multi-thread one. The reason
//! is write batching on HTTP/2: the multi-thread scheduler runs a task woken by the running task
//! next (its "LIFO slot"), so when a stream task queues its response the HTTP/2 connection task
//! runs right after it and flushes that one response: one TLS record and one `writev` per
//! request. The current-thread scheduler runs woken tasks in FIFO order, so every stream that
//! became ready in the same I/O batch queues its frames first and the connection task flushes
//! them together (measured in docs/benchmarks.md, "Proxy pair vs Envoy pair").
//!
//! [`ProxyConfig::worker_threads`]: crate::config::ProxyConfig::worker_threads

use std::io;

use tokio::runtime::{Builder, Runtime};

/// Builds the runtime for `worker_threads` (`None`: the multi-thread scheduler, one worker per
/// CPU; `Some(1)`: the current-thread scheduler; `Some(n)`: the multi-thread one with `n`).
///
/// With one worker the proxy runs on the thread that calls [`Runtime::block_on`]; blocking work
/// (`spawn_blocking`) still gets its own threads.
pub fn runtime(worker_threads: Option<usize>) -> io::Result<Runtime> {
    let mut builder = match worker_threads {
        Some(1) => Builder::new_current_thread(),
        Some(n) => {
            let mut builder = Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        let rt = runtime(Some(1)).unwrap();
        assert_eq!(
            rt.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        // Spawned tasks run (on the thread that blocks on the runtime).
        let answer = rt.block_on(async { tokio::spawn(async { 42 }).await.unwrap() });
        assert_eq!(answer, 42);
    }

    #[test]
    fn more_workers_or_the_default_are_the_multi_thread_scheduler() {
        for threads in [Some(2), None] {
            let rt = runtime(threads).unwrap();
            assert_eq!(
                rt.handle().runtime_flavor(),
                tokio::runtime::RuntimeFlavor::MultiThread
            );
        }
        let rt = runtime(Some(3)).unwrap();
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}
