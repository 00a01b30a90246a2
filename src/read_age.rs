//! A cap on the age of the layer's read transactions ([`Options::max_read_age`]).
//!
//! A read transaction pins the WAL for as long as it stays open, whether its closure is
//! running a statement or not: only ending the transaction frees it. So a watchdog thread
//! (one per process, started by the first capped read) ends a read that outlives its limit,
//! on the connection's handle, while the closure still holds the connection:
//! 1. it marks the connection's read expired, under the lock the read's owner takes to end
//!    it, so the connection is neither returned to the pool nor closed meanwhile;
//! 2. `sqlite3_interrupt` stops a statement that is running;
//! 3. setting the authorizer again expires every prepared statement, so each later statement
//!    of the closure is prepared again and refused by the authorizer ("not authorized"): the
//!    closure can never read on outside its snapshot without noticing;
//! 4. `ROLLBACK` ends the transaction, and the WAL can be checkpointed.
//!
//! SQLite serializes calls on one handle (the bundled library is built thread-safe, and
//! Diesel opens connections without `SQLITE_OPEN_NOMUTEX`), so these calls from the
//! watchdog's thread are safe beside the closure's. The read then returns
//! [`Error::ReadTooLong`](crate::Error::ReadTooLong), whatever the closure returned.
//!
//! [`Options::max_read_age`]: crate::Options::max_read_age

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use libsqlite3_sys as ffi;

/// One connection's read state, shared by its owner, the watchdog and SQLite (as the
/// authorizer's data, alive until the connection closes).
#[derive(Debug)]
pub(crate) struct ReadState {
    /// The connection's `sqlite3` handle; used by the watchdog only while a read is active,
    /// which keeps the connection open.
    handle: usize,
    /// Set when the watchdog ended the read; the authorizer then refuses all but
    /// transaction statements.
    expired: AtomicBool,
    /// The active read's deadline; `None` between reads and once the watchdog ended it.
    active: Mutex<Option<Instant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

unsafe extern "C" fn authorize(
    data: *mut c_void,
    action: c_int,
    _arg1: *const c_char,
    _arg2: *const c_char,
    _database: *const c_char,
    _trigger: *const c_char,
) -> c_int {
    // SAFETY: `data` is the connection's `ReadState`, alive until it closes.
    let state = unsafe { &*(data as *const ReadState) };
    if state.expired.load(Ordering::Acquire) && action != ffi::SQLITE_TRANSACTION {
        return ffi::SQLITE_DENY;
    }
    // The migration guard, which this authorizer replaces on the connection.
    crate::guard::during_migration(action)
}

unsafe extern "C" fn release(data: *mut c_void) {
    // SAFETY: the reference `install` gave SQLite, released once, when SQLite destroys the
    // function at close (or at once if registering failed).
    drop(unsafe { Arc::from_raw(data as *const ReadState) });
}

const OWNER_FUNCTION: &CStr = c"sqlite_persistence_read_state";

/// Gives the connection `db` a read state and the authorizer that enforces it.
///
/// # Safety
/// `db` must be an open connection's handle, used by the calling thread.
pub(crate) unsafe fn install(db: *mut ffi::sqlite3) -> Option<Arc<ReadState>> {
    let state = Arc::new(ReadState {
        handle: db as usize,
        expired: AtomicBool::new(false),
        active: Mutex::new(None),
    });
    let shared = Arc::into_raw(Arc::clone(&state)) as *mut c_void;
    // SAFETY: `db` is open; SQLite owns `shared` from here.
    unsafe {
        if !crate::owned::until_close(db, OWNER_FUNCTION, shared, release) {
            return None;
        }
        ffi::sqlite3_set_authorizer(db, Some(authorize), shared);
    }
    Some(state)
}

impl ReadState {
    /// Ends the read on the watchdog's behalf, if it is still active (called with `active`
    /// locked, so the owner cannot end it meanwhile).
    fn expire(&self, active: &mut Option<Instant>) {
        if active.take().is_none() {
            return;
        }
        self.expired.store(true, Ordering::Release);
        let db = self.handle as *mut ffi::sqlite3;
        let authorizer = self as *const ReadState as *mut c_void;
        // SAFETY: the read is active, so the owner holds the connection and it is open;
        // SQLite serializes these calls with the owner's.
        unsafe {
            ffi::sqlite3_interrupt(db);
            ffi::sqlite3_set_authorizer(db, Some(authorize), authorizer);
            ffi::sqlite3_exec(
                db,
                c"ROLLBACK".as_ptr(),
                None,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
    }
}

/// A read being watched; [`Watched::finish`] says whether the watchdog ended it.
pub(crate) struct Watched {
    state: Arc<ReadState>,
}

impl Watched {
    /// Whether the watchdog ended the read. Afterwards the connection takes statements
    /// again.
    pub(crate) fn finish(self) -> bool {
        let mut active = lock(&self.state.active);
        *active = None;
        self.state.expired.load(Ordering::Acquire)
        // Dropping `self` clears `expired`.
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // After `finish`, or a read that unwinds: stop watching it, and let the connection
        // take statements again (turning query_only off first of all).
        *lock(&self.state.active) = None;
        self.state.expired.store(false, Ordering::Release);
    }
}

/// Watches a read on the connection with `state`, to be ended `limit` from now. `None` if the
/// watchdog thread cannot run (the thread limit), logged.
pub(crate) fn watch(state: &Arc<ReadState>, limit: Duration) -> Option<Watched> {
    let watchdog = watchdog()?;
    let deadline = Instant::now().checked_add(limit)?;
    state.expired.store(false, Ordering::Release);
    *lock(&state.active) = Some(deadline);
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
                    error = %error,
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
                let mut active = lock(&read.active);
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
