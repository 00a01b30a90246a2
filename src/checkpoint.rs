//! The layer's own WAL checkpoints, and a warning naming the reader that keeps the WAL from
//! being checkpointed.
//!
//! SQLite's automatic checkpoint runs a PASSIVE checkpoint after every commit once the WAL
//! holds 1000 frames. While a read transaction pins an old snapshot, none of them can pass
//! it, so every commit repeats a futile attempt, the WAL grows without bound and nothing says
//! why. Each pooled connection gets this hook instead (`sqlite3_wal_hook`, which replaces the
//! automatic checkpoint):
//! - at 1000 frames, a PASSIVE checkpoint after the commit, as SQLite's would: it never waits
//!   for readers or writers, and one that finds another checkpointer at work steps aside;
//! - when a reader pins the WAL, no further attempt on this connection for
//!   [`PINNED_RETRY`], instead of one per commit;
//! - when the pinned WAL passes the warning size, a `warn` event (at most one per
//!   [`WARNING_INTERVAL`] per connection) naming the processes holding the pinning read
//!   marks, from the OS lock table (Linux; elsewhere "unknown").
//!
//! Once the reader ends, the next commit's checkpoint completes, and the next write after it
//! starts the WAL over, truncating the file to `journal_size_limit`: SQLite does that without
//! waiting for anyone, where a TRUNCATE checkpoint would wait for the readers.
//!
//! With [`Options::wal_shipping`](crate::Options::wal_shipping) the hook is not installed and
//! `wal_autocheckpoint` is 0: an external WAL shipper (Litestream, LiteFS) checkpoints.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use libsqlite3_sys as ffi;

use crate::holders::pinning_readers_of;
use crate::retry::DB_SYSTEM;
use crate::shm::WalIndex;

/// SQLite's automatic checkpoint threshold, kept.
const CHECKPOINT_FRAMES: c_int = 1000;
/// How long a connection leaves a pinned WAL alone before trying again.
pub(crate) const PINNED_RETRY: Duration = Duration::from_millis(250);
/// At most one size warning per connection this often.
pub(crate) const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// One connection's checkpoint state. Lives until SQLite closes the connection (it is the
/// user data of a function registered on it, which SQLite destroys at close).
struct Checkpoints {
    /// Warn when a pinned WAL holds at least this many frames.
    warn_frames: u32,
    page_size: u32,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// No attempt before this (set while a reader pins the WAL).
    quiet_until: Option<Instant>,
    last_warning: Option<Instant>,
    /// Whether the last attempt was pinned, to log when the pin is gone.
    pinned: bool,
}

unsafe extern "C" fn after_commit(
    data: *mut c_void,
    db: *mut ffi::sqlite3,
    name: *const c_char,
    frames: c_int,
) -> c_int {
    if frames < CHECKPOINT_FRAMES {
        return ffi::SQLITE_OK;
    }
    // SAFETY: `data` is the `Checkpoints` registered with this hook, alive until the
    // connection closes; `db` and `name` are SQLite's, valid during the call.
    let checkpoints = unsafe { &*(data as *const Checkpoints) };
    // A panic must not unwind into SQLite.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        checkpoints.after_commit(db, name)
    }));
    ffi::SQLITE_OK
}

impl Checkpoints {
    /// # Safety
    /// `db` and `name` as SQLite passes them to the WAL hook.
    unsafe fn after_commit(&self, db: *mut ffi::sqlite3, name: *const c_char) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.quiet_until.is_some_and(|until| now < until) {
            return;
        }
        let (mut log, mut done) = (0, 0);
        // SAFETY: as the caller promises.
        let rc = unsafe {
            ffi::sqlite3_wal_checkpoint_v2(
                db,
                name,
                ffi::SQLITE_CHECKPOINT_PASSIVE,
                &mut log,
                &mut done,
            )
        };
        if rc != ffi::SQLITE_OK || log < 0 || done < 0 {
            // SQLITE_BUSY: another connection is checkpointing; it does the work.
            return;
        }
        let (log, done) = (log as u32, done as u32);
        if done >= log {
            state.quiet_until = None;
            // SAFETY: as the caller promises; the string is copied at once.
            let file = unsafe { CStr::from_ptr(ffi::sqlite3_db_filename(db, name)) }
                .to_string_lossy()
                .into_owned();
            crate::holders::record_checkpoint(Path::new(&file));
            if std::mem::take(&mut state.pinned) {
                tracing::info!(
                    db.system.name = DB_SYSTEM,
                    frames = log,
                    "the WAL is checkpointed again: the read transaction that pinned it ended"
                );
            }
            return;
        }
        state.pinned = true;
        state.quiet_until = Some(now + PINNED_RETRY);
        let due = state
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= WARNING_INTERVAL);
        if log >= self.warn_frames && due {
            state.last_warning = Some(now);
            drop(state);
            // SAFETY: as the caller promises; the string is copied at once.
            let file = unsafe { CStr::from_ptr(ffi::sqlite3_db_filename(db, name)) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: `db` is this hook's connection, on its thread.
            let index = unsafe { crate::shm::wal_index(db) };
            self.warn(Path::new(&file), index, log, done);
        }
    }

    fn warn(&self, database: &Path, index: Option<WalIndex>, log: u32, done: u32) {
        let readers = index.map_or_else(Vec::new, |index| pinning_readers_of(database, &index));
        let pinned_by = if readers.is_empty() {
            "unknown".to_owned()
        } else {
            readers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let bytes = u64::from(log) * (u64::from(self.page_size) + 24) + 32;
        tracing::warn!(
            db.system.name = DB_SYSTEM,
            db.namespace = %database.display(),
            wal_bytes = bytes,
            wal_frames = log,
            checkpointed_frames = done,
            pinned_by = %pinned_by,
            "the WAL keeps growing: a read transaction keeps it from being checkpointed \
             (end long read transactions; the pinning one: {pinned_by})"
        );
    }
}

unsafe extern "C" fn release(data: *mut c_void) {
    // SAFETY: `data` is the `Box<Checkpoints>` leaked in `install`, released once, by SQLite
    // destroying the function at close.
    drop(unsafe { Box::from_raw(data as *mut Checkpoints) });
}

const OWNER_FUNCTION: &CStr = c"sqlite_persistence_checkpoints";

/// Installs the layer's checkpoint hook on the connection `db`, warning once a pinned WAL
/// holds `warn_bytes`. Returns whether it did (a failure leaves SQLite's automatic checkpoint).
///
/// # Safety
/// `db` must be an open connection's handle, used by the calling thread.
pub(crate) unsafe fn install(db: *mut ffi::sqlite3, page_size: u32, warn_bytes: u64) -> bool {
    let frame = u64::from(page_size.max(512)) + 24;
    let checkpoints = Box::into_raw(Box::new(Checkpoints {
        warn_frames: u32::try_from(warn_bytes / frame).unwrap_or(u32::MAX),
        page_size,
        state: Mutex::new(State::default()),
    }));
    // SAFETY: `db` is open; SQLite owns `checkpoints` from here and releases it at close (or
    // at once, if registering fails).
    unsafe {
        if !crate::owned::until_close(db, OWNER_FUNCTION, checkpoints as *mut c_void, release) {
            return false;
        }
        ffi::sqlite3_wal_hook(db, Some(after_commit), checkpoints as *mut c_void);
    }
    true
}
