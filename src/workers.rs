//! Worker threads: one single-threaded tokio runtime per thread, each serving the client
//! connections handed to it, with its own upstream pool, so that a request, its upstream
//! connection and its response stay on one thread (no work stealing, no cross-thread wake-ups
//! on the request path). Worker 0 is the runtime the gateway was started on; the others are
//! threads started here. The accept loop (on worker 0) hands each new connection to the worker
//! with the fewest open connections. Shared state (metrics, limiter, drain bookkeeping) is
//! thread-safe and shared by all workers. Measured in bench/RESULTS.md (issue 9).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How long stopping waits for each worker thread to end once asked, in seconds.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The worker runtimes of one gateway.
#[derive(Debug)]
pub struct Workers {
    /// Worker 1.. (worker 0 is the caller's runtime): handle, stop signal, thread.
    extra: Vec<Extra>,
    /// Open connections per worker, worker 0 first.
    load: Arc<[AtomicUsize]>,
}

#[derive(Debug)]
struct Extra {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A connection's place on a worker: decrements the worker's open-connection count when dropped.
#[derive(Debug)]
pub struct Assigned {
    /// The worker's index (0 = the runtime the gateway was started on).
    pub index: usize,
    load: Arc<[AtomicUsize]>,
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.load[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Only the caller's runtime: every connection is served where it was accepted.
    pub fn local() -> Self {
        Workers {
            extra: Vec::new(),
            load: Arc::from(vec![AtomicUsize::new(0)]),
        }
    }

    /// `count` workers in all (at least 1): the caller's runtime and `count - 1` new threads
    /// named `oag-worker-N`, each running a single-threaded runtime with I/O and timers.
    ///
    /// # Errors
    /// The I/O error when a thread or a runtime cannot be created; threads already started are
    /// stopped.
    pub fn start(count: usize) -> io::Result<Self> {
        let count = count.max(1);
        let mut workers = Workers {
            extra: Vec::with_capacity(count - 1),
            load: Arc::from((0..count).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>()),
        };
        for index in 1..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("oag-worker-{index}"))
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            // Workers log where the starting thread logs: the global subscriber in production,
            // a test's thread-local capture in tests. (tracing offers no way to tell the two
            // apart, and a scoped default anywhere costs every event a thread-local lookup.)
            let dispatch = tracing::dispatcher::get_default(Clone::clone);
            let thread = std::thread::Builder::new()
                .name(format!("oag-worker-{index}"))
                .spawn(move || {
                    let _logs = tracing::dispatcher::set_default(&dispatch);
                    // A current-thread runtime runs its tasks only while `block_on` runs.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Dropping the runtime cancels what is left; the drain has ended by now.
                    runtime.shutdown_timeout(STOP_WAIT);
                })?;
            workers.extra.push(Extra {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(workers)
    }

    /// How many workers there are, worker 0 included.
    pub fn count(&self) -> usize {
        self.load.len()
    }

    /// Picks the worker with the fewest open connections for a new connection, and counts it
    /// there until the returned [`Assigned`] is dropped.
    pub fn assign(&self) -> Assigned {
        // Ties go away from worker 0, which also accepts and serves the admin listener; a
        // worker whose thread ended (not expected: tokio catches task panics) gets nothing.
        let index = self
            .load
            .iter()
            .enumerate()
            .rev()
            .filter(|(i, _)| {
                i.checked_sub(1)
                    .and_then(|e| self.extra.get(e))
                    .and_then(|e| e.thread.as_ref())
                    .is_none_or(|t| !t.is_finished())
            })
            .min_by_key(|(_, open)| open.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i);
        self.load[index].fetch_add(1, Ordering::Relaxed);
        Assigned {
            index,
            load: self.load.clone(),
        }
    }

    /// Runs `task` on worker `index`: on the caller's runtime for 0, on that worker's thread
    /// otherwise. Must be called from within worker 0's runtime.
    pub fn spawn<F>(&self, index: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match index.checked_sub(1).and_then(|i| self.extra.get(i)) {
            Some(extra) => {
                extra.handle.spawn(task);
            }
            None => {
                tokio::spawn(task);
            }
        }
    }

    /// Stops the worker threads (what still runs on them is cancelled) and waits up to 5 s for
    /// each to end. Worker 0 is the caller's and is left alone.
    pub async fn stop(mut self) {
        for extra in &mut self.extra {
            if let Some(stop) = extra.stop.take() {
                let _ = stop.send(());
            }
        }
        let threads: Vec<_> = self
            .extra
            .iter_mut()
            .filter_map(|e| e.thread.take())
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::warn!("a worker thread panicked");
                }
            }
        });
        // Each thread's runtime waits STOP_WAIT at most for its blocking tasks.
        let bound = STOP_WAIT + STOP_WAIT;
        if tokio::time::timeout(bound, joined).await.is_err() {
            tracing::warn!("worker threads did not stop in time");
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Stopped without `stop` (an error path): signal the threads and let them end alone.
        for extra in &mut self.extra {
            if let Some(stop) = extra.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

/// The number of workers when `server.worker_threads` is not set: one per CPU this process may
/// run on (its affinity mask and cgroup quota, as `std::thread::available_parallelism` reads
/// them), at most 64; 1 when that cannot be read.
pub fn default_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_DEFAULT_WORKERS)
}

/// Most workers started when `server.worker_threads` is not set (each has its own upstream
/// pool and, to an HTTP/2 upstream, its own connection).
const MAX_DEFAULT_WORKERS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigns_to_the_least_loaded_worker_and_releases() {
        let w = Workers {
            extra: Vec::new(),
            load: Arc::from((0..3).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>()),
        };
        let a = w.assign();
        let b = w.assign();
        let c = w.assign();
        let mut got = [a.index, b.index, c.index];
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2], "one connection each before any gets two");
        let freed = b.index;
        drop(b);
        let d = w.assign();
        assert_eq!(
            d.index, freed,
            "the worker that lost a connection gets the next"
        );
        let loads: Vec<_> = w.load.iter().map(|l| l.load(Ordering::Relaxed)).collect();
        assert_eq!(loads, vec![1, 1, 1]);
        drop((a, c, d));
        assert!(w.load.iter().all(|l| l.load(Ordering::Relaxed) == 0));
    }

    #[tokio::test]
    async fn tasks_run_on_the_worker_threads_and_stop_ends_them() {
        let workers = Workers::start(3).expect("threads start");
        assert_eq!(workers.count(), 3);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for index in 0..3 {
            let tx = tx.clone();
            workers.spawn(index, async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send((index, name));
            });
        }
        drop(tx);
        let mut seen = Vec::new();
        while let Some(x) = rx.recv().await {
            seen.push(x);
        }
        seen.sort();
        assert_eq!(seen[1].1.as_deref(), Some("oag-worker-1"));
        assert_eq!(seen[2].1.as_deref(), Some("oag-worker-2"));
        assert_ne!(seen[0].1.as_deref(), Some("oag-worker-1"));
        workers.stop().await;
    }
}
