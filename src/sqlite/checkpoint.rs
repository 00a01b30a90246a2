//! The layer's own WAL checkpoints, and a warning naming the reader that keeps the WAL from
//! being checkpointed.
//!
//! SQLite's automatic checkpoint runs a PASSIVE checkpoint after every commit once the WAL
//! holds 1000 frames. While a read transaction pins an old snapshot, none of them can pass
//! it, so every commit repeats a futile attempt, the WAL grows without bound and nothing says
//! why. Each pooled connection gets this hook instead (Diesel's `on_wal`, SQLite's WAL hook,
//! which replaces the automatic checkpoint):
//! - at 1000 frames, a PASSIVE checkpoint after the commit, as SQLite's would: it never waits
//!   for readers or writers, and one that finds another checkpointer at work steps aside;
//! - an attempt that copies no frame the one before it had not (in the same WAL) leaves the
//!   WAL alone on this connection for 5 ms, doubling at each such attempt in a row up to
//!   [`PINNED_RETRY`], instead of trying at every commit: a reader pinning the WAL soon
//!   costs the writers one attempt every 250 ms. Attempts left incomplete by other writers'
//!   transactions (each copies more than the one before) try again at the next commit, as
//!   SQLite's would, so that writers who bypass the write queue (an application's own pool,
//!   a plain process) still find the moment to start the WAL over;
//! - the WAL counts as pinned once the attempts have copied nothing new for
//!   [`PINNED_AFTER`];
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

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::sql_types::BigInt;
use diesel::sqlite::BorrowedSqliteConnection;
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};

use crate::operation::DB_SYSTEM;
use crate::sqlite::ffi::shm::{self, WalIndex};
use crate::sqlite::lock_table::pinning_readers_of;

/// SQLite's automatic checkpoint threshold, kept.
const CHECKPOINT_FRAMES: u32 = 1000;
/// How long the attempts of a connection must copy nothing new before it takes the WAL for
/// pinned by a reader (a writer racing it holds it back for a transaction, not this long),
/// and may warn.
pub(crate) const PINNED_AFTER: Duration = Duration::from_millis(100);
/// How long a connection leaves the WAL alone after an attempt that copied nothing new; it
/// doubles at each such attempt in a row, up to [`PINNED_RETRY`].
const FIRST_QUIET: Duration = Duration::from_millis(5);
/// The longest a connection leaves a stalled WAL alone before trying again.
pub(crate) const PINNED_RETRY: Duration = Duration::from_millis(250);
/// At most one size warning per connection this often.
pub(crate) const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// One connection's checkpoint state, owned by its WAL hook.
struct Checkpoints {
    /// The connection's main database file, if it has one.
    file: Option<PathBuf>,
    /// Its device and inode, to find the write turn this thread holds for it.
    file_id: Option<(u64, u64)>,
    /// Warn when a pinned WAL holds at least this many bytes.
    warn_bytes: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// No attempt before this (set while a reader pins the WAL).
    quiet_until: Option<Instant>,
    last_warning: Option<Instant>,
    /// Whether the last attempt was pinned, to log when the pin is gone.
    pinned: bool,
    /// What the last incomplete attempt found: the WAL's frames and those checkpointed.
    last: Option<(u32, u32)>,
    /// Since when the attempts have copied nothing new, and how many in a row.
    stalled_since: Option<Instant>,
    stalls: u32,
    /// The database's page size, read the first time the WAL is found pinned (sizes matter
    /// only then, so opening a connection reads nothing for it).
    page_size: Option<u32>,
}

/// No instrumentation: the hook's connection sees no application code.
struct Silent;

impl Instrumentation for Silent {
    fn on_connection_event(&mut self, _event: InstrumentationEvent<'_>) {}
}

/// What `PRAGMA wal_checkpoint` returns.
#[derive(QueryableByName)]
struct Outcome {
    #[diesel(sql_type = BigInt)]
    busy: i64,
    #[diesel(sql_type = BigInt)]
    log: i64,
    #[diesel(sql_type = BigInt)]
    checkpointed: i64,
}

impl Checkpoints {
    fn after_commit(&self, conn: &mut BorrowedSqliteConnection, schema: &str, frames: u32) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.quiet_until.is_some_and(|until| now < until) {
            return;
        }
        // A write's turn goes back first, and the next holder finishes what this one
        // leaves (see `queue::release_before_checkpoint`); once the WAL has doubled past
        // the threshold anyway, this one runs under the turn.
        let mut finishing = false;
        let released = match (self.file_id, schema) {
            (Some(file), "main") if frames < 2 * CHECKPOINT_FRAMES => {
                if crate::sqlite::queue::take_finish(file) {
                    // This holder finishes, under its turn, the checkpoint run after another
                    // write gave the turn back: what was committed since is copied, and the
                    // next transaction starts the WAL over.
                    finishing = true;
                    None
                } else if shm::in_wal_hook(conn).is_some_and(|index| index.checkpointed > 0) {
                    // Part of this WAL is checkpointed already, and the finish is named: a
                    // checkpoint at every commit meanwhile would end every streak and sync
                    // for nothing.
                    return;
                } else {
                    use crate::sqlite::queue::BeforeCheckpoint;
                    match crate::sqlite::queue::release_before_checkpoint(file) {
                        BeforeCheckpoint::Released(released) => Some(released),
                        // Another process runs one outside its turn: it sees to this WAL.
                        BeforeCheckpoint::Skip => return,
                        BeforeCheckpoint::NotHeld => None,
                    }
                }
            }
            _ => None,
        };
        // The layer's own statement, kept from the application's default instrumentation
        // (which Diesel gives the hook's connection): one that panics on it, or fails, must
        // not keep the WAL from being checkpointed.
        conn.set_instrumentation(Silent);
        // A pragma statement: no table or view in the file can stand in for it.
        let sql = format!(
            "PRAGMA \"{}\".wal_checkpoint(PASSIVE)",
            schema.replace('"', "\"\"")
        );
        let Ok(outcome) = diesel::sql_query(sql).get_result::<Outcome>(conn) else {
            return;
        };
        let (Ok(log), Ok(done)) = (
            u32::try_from(outcome.log),
            u32::try_from(outcome.checkpointed),
        ) else {
            return;
        };
        if outcome.busy != 0 {
            // Another connection is checkpointing; it does the work, and the finish is left
            // to the next holder.
            if let (true, Some(file)) = (finishing, self.file_id) {
                crate::sqlite::queue::finish_later(file);
            }
            return;
        }
        if let Some(released) = released {
            released.checkpointed();
        }
        let file = self.file.as_deref().filter(|_| schema == "main");
        if done >= log {
            state.last = None;
            state.stalls = 0;
            state.stalled_since = None;
            state.quiet_until = None;
            if let Some(file) = file {
                crate::sqlite::queue::sidecar::record_checkpoint(file);
            }
            if std::mem::take(&mut state.pinned) {
                tracing::info!(
                    db.system.name = DB_SYSTEM,
                    frames = log,
                    "the WAL is checkpointed again: the read transaction that pinned it ended"
                );
            }
            return;
        }
        // Progress since the last incomplete attempt: more frames copied, or a WAL started
        // over since.
        let progressed = state
            .last
            .is_none_or(|(last_log, last_done)| log < last_log || done > last_done);
        state.last = Some((log, done));
        if progressed {
            // Other writers' new frames were left: try again at the next commit.
            state.stalls = 0;
            state.stalled_since = None;
            return;
        }
        // Nothing new copied: leave the WAL alone a while, longer at each such attempt.
        state.stalls = state.stalls.saturating_add(1);
        let backoff = FIRST_QUIET
            .saturating_mul(1 << (state.stalls - 1).min(16))
            .min(PINNED_RETRY);
        state.quiet_until = Some(now + backoff);
        let stalled_since = *state.stalled_since.get_or_insert(now);
        if now.saturating_duration_since(stalled_since) < PINNED_AFTER {
            return;
        }
        state.pinned = true;
        let due = state
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= WARNING_INTERVAL);
        let page_size = *state.page_size.get_or_insert_with(|| page_size(conn));
        let frame = u64::from(page_size.max(512)) + 24;
        let warn_frames = u32::try_from(self.warn_bytes / frame).unwrap_or(u32::MAX);
        if let (true, true, Some(file)) = (log >= warn_frames, due, file) {
            state.last_warning = Some(now);
            drop(state);
            let index = shm::in_wal_hook(conn);
            warn(file, index, log, done, page_size);
        }
    }
}

/// The page size of `conn`'s database (`PRAGMA page_size`, a statement no table or view
/// stands in for); SQLite's default if it cannot be read.
fn page_size(conn: &mut BorrowedSqliteConnection) -> u32 {
    #[derive(QueryableByName)]
    struct PageSize {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        page_size: i32,
    }
    diesel::sql_query("PRAGMA page_size")
        .get_result::<PageSize>(conn)
        .ok()
        .and_then(|p| u32::try_from(p.page_size).ok())
        .unwrap_or(4096)
}

/// The `warn` event naming the readers that pin `database`'s WAL.
fn warn(database: &Path, index: Option<WalIndex>, log: u32, done: u32, page_size: u32) {
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
    let bytes = u64::from(log) * (u64::from(page_size) + 24) + 32;
    tracing::warn!(
        db.system.name = DB_SYSTEM,
        db.namespace = %crate::escaped::Escaped::path(database),
        wal_bytes = bytes,
        wal_frames = log,
        checkpointed_frames = done,
        pinned_by = %pinned_by,
        "the WAL keeps growing: a read transaction keeps it from being checkpointed \
         (end long read transactions; the pinning one: {pinned_by})"
    );
}

/// Installs the layer's checkpoint hook on `conn`, warning once a pinned WAL holds
/// `warn_bytes`.
pub(crate) fn install(conn: &mut SqliteConnection, warn_bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let file = crate::sqlite::ffi::RawDb::of(conn).main_file();
    let file_id = file
        .as_deref()
        .and_then(|file| std::fs::metadata(file).ok())
        .map(|meta| (meta.dev(), meta.ino()));
    let checkpoints = Checkpoints {
        file,
        file_id,
        warn_bytes,
        state: Mutex::new(State::default()),
    };
    conn.on_wal(move |conn, schema, frames| {
        if frames < CHECKPOINT_FRAMES {
            return;
        }
        // A panic must not reach Diesel's hook, which aborts the process.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            checkpoints.after_commit(conn, schema, frames)
        }));
    });
}
