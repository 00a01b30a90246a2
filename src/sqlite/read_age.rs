//! A cap on the age of the layer's read transactions ([`Options::max_read_age`]).
//!
//! A read transaction pins the WAL for as long as it stays open, whether its closure is
//! running a statement or not: only ending the transaction frees it. So a watchdog thread
//! (one per process, started by the first capped read) ends a read that outlives its limit,
//! on the connection's handle, while the closure still holds the connection
//! ([`ReadState::expire`], the part that calls SQLite). The read then returns
//! [`Error::ReadTooLong`](crate::Error::ReadTooLong), whatever the closure returned.
//!
//! [`Options::max_read_age`]: crate::Options::max_read_age

use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

pub(crate) use crate::sqlite::ffi::read_gate::ReadState;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A read being watched; [`Watched::finish`] says whether the watchdog ended it.
pub(crate) struct Watched {
    state: Arc<ReadState>,
}

impl Watched {
    /// Whether the watchdog ended the read. Afterwards the connection takes statements
    /// again.
    pub(crate) fn finish(self) -> bool {
        self.state.finish()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // After `finish`, or a read that unwinds: stop watching it, and let the connection
        // take statements again (turning query_only off first of all).
        self.state.finish();
    }
}

/// Watches a read on the connection with `state`, to be ended `limit` from now. `None` if the
/// watchdog thread cannot run (the thread limit), logged.
pub(crate) fn watch(state: &Arc<ReadState>, limit: Duration) -> Option<Watched> {
    let watchdog = watchdog()?;
    let deadline = Instant::now().checked_add(limit)?;
    state.begin(deadline);
    let mut reads = lock(&watchdog.reads);
    if !reads.iter().any(|r| Arc::ptr_eq(r, state)) {
        reads.push(Arc::clone(state));
    }
    watchdog.wake.notify_one();
    Some(Watched {
        state: Arc::clone(state),
    })
}

#[derive(Default)]
struct Watchdog {
    /// Connections with a capped read, active or recently finished.
    reads: Mutex<Vec<Arc<ReadState>>>,
    wake: Condvar,
}

fn watchdog() -> Option<&'static Watchdog> {
    static WATCHDOG: OnceLock<Option<&'static Watchdog>> = OnceLock::new();
    *WATCHDOG.get_or_init(|| {
        let watchdog: &'static Watchdog = Box::leak(Box::default());
        match std::thread::Builder::new()
            .name("sqlite-persistence-read-age".into())
            .spawn(move || watchdog.run())
        {
            Ok(_) => Some(watchdog),
            Err(error) => {
                tracing::warn!(
                    error = %crate::escaped::Escaped::new(&error.to_string()),
                    "cannot start the read-age watchdog thread: reads are not capped"
                );
                None
            }
        }
    })
}

impl Watchdog {
    fn run(&self) {
        let mut reads = lock(&self.reads);
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            reads.retain(|read| {
                let mut active = read.active();
                match *active {
                    None => false,
                    Some(deadline) if deadline <= now => {
                        read.expire(&mut active);
                        false
                    }
                    Some(deadline) => {
                        next = Some(next.map_or(deadline, |n| n.min(deadline)));
                        true
                    }
                }
            });
            reads = match next {
                Some(next) => {
                    let wait = next.saturating_duration_since(Instant::now());
                    self.wake
                        .wait_timeout(reads, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .wake
                    .wait(reads)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}
