//! Connection settings: every default in one place, every pragma value typed.

use std::time::Duration;

use crate::pragma::{JournalMode, Synchronous, TempStore};
use crate::retry::RetryPolicy;

/// How the layer opens a database: pragmas, journal mode, retries, migration checks, pool.
///
/// A consuming builder; all defaults are set in [`Options::new`]:
///
/// | setting | default | why |
/// |---|---|---|
/// | `busy_timeout` | 5 s | what sqlx, rusqlite, Django and Rails use |
/// | `journal_mode` | WAL | readers and the writer do not block each other |
/// | `synchronous` | NORMAL under WAL, EXTRA with DELETE, FULL otherwise | never corrupt; under WAL a power loss can take back the commits since the last checkpoint ([`Synchronous::Full`] makes each durable) |
/// | `foreign_keys` | on | constraints declared are constraints enforced |
/// | `journal_size_limit` | 64 MiB | a WAL that grew once is truncated back (Rails 8) |
/// | `cache_size` | 16 MiB per connection | |
/// | `temp_store` | memory | |
/// | `mmap_size` | 128 MiB | fewer read syscalls (Rails 8) |
/// | `retry` | [`RetryPolicy::new`]: 30 s deadline | |
/// | `allow_unknown_migrations` | no | a database migrated by a newer binary is refused |
/// | `allow_edited_migrations` | no | an applied migration whose SQL changed is refused |
/// | `allow_unmanaged_tables` | no | a file with tables but no migration history (another program's) is refused |
/// | `application_id` | none | set it to stamp your files and refuse other applications' |
/// | `create_mode` | `0o600` | a new database (and its `-wal`, `-shm`, `-lock`) is private |
/// | `create_if_missing` | `true` | a missing file is created (and migrated) |
/// | `migration_wait` | 10 min | an open waits this long for another process's migrations while that process is alive |
/// | `pool_size` | 8 | |
/// | `fair_queue` | on | writers queue on `<database>-lock` in arrival order |
/// | `group_commit` | off | concurrent writers of one process share a transaction and its sync |
/// | `max_read_age` | none | a cap on how long a `read` may keep its snapshot (and so the WAL) |
/// | `wal_shipping` | off | the layer checkpoints, and warns naming the reader that pins a growing WAL (turn it on beside Litestream) |
///
/// PostgreSQL (feature `postgres`) uses `retry`, the migration checks, `application_id` and
/// `pool_size` as above, and four settings of its own:
///
/// | setting | default | why |
/// |---|---|---|
/// | `statement_timeout` | 30 s | a runaway query of a `write` or `read` ends (migrations have none) |
/// | `lock_timeout` | 5 s, and never past the retry deadline | a wait for a row or table lock ends, and the transaction runs again |
/// | `idle_in_transaction_timeout` | 60 s | a transaction left open on a borrowed connection does not hold its locks forever |
/// | `lost_commit_lookup` | on | a write whose session is lost during `COMMIT` asks the server whether it committed |
/// | `transaction_pooling` | undeclared: checked at open | the URL leads to the server itself or a session pooler; a transaction pooler (PgBouncer) found at open is refused |
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use sqlite_persistence::{Options, RetryPolicy};
///
/// let options = Options::new()
///     .busy_timeout(Duration::from_secs(2))
///     .retry(RetryPolicy::new().max_elapsed(Duration::from_secs(60)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub(crate) busy_timeout: Duration,
    pub(crate) journal_mode: JournalMode,
    pub(crate) synchronous: Option<Synchronous>,
    pub(crate) foreign_keys: bool,
    pub(crate) journal_size_limit: Option<u64>,
    pub(crate) wal_shipping: bool,
    pub(crate) max_read_age: Option<Duration>,
    pub(crate) cache_size_kib: u32,
    pub(crate) temp_store: TempStore,
    pub(crate) mmap_size: u64,
    pub(crate) retry: RetryPolicy,
    pub(crate) allow_unknown_migrations: bool,
    pub(crate) allow_edited_migrations: bool,
    pub(crate) allow_unmanaged_tables: bool,
    pub(crate) application_id: Option<u32>,
    pub(crate) create_mode: u32,
    pub(crate) create_if_missing: bool,
    pub(crate) migration_wait: Duration,
    pub(crate) pool_size: u32,
    pub(crate) fair_queue: bool,
    pub(crate) group_commit: bool,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) lock_timeout: Duration,
    pub(crate) idle_in_transaction_timeout: Option<Duration>,
    pub(crate) lost_commit_lookup: bool,
    pub(crate) transaction_pooling: bool,
    pub(crate) pooler_declared: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self::new()
    }
}

impl Options {
    /// The defaults listed above.
    pub fn new() -> Self {
        Self {
            busy_timeout: Duration::from_secs(5),
            journal_mode: JournalMode::Wal,
            synchronous: None,
            foreign_keys: true,
            journal_size_limit: Some(64 * 1024 * 1024),
            wal_shipping: false,
            max_read_age: None,
            cache_size_kib: 16 * 1024,
            temp_store: TempStore::Memory,
            mmap_size: 128 * 1024 * 1024,
            retry: RetryPolicy::new(),
            allow_unknown_migrations: false,
            allow_edited_migrations: false,
            allow_unmanaged_tables: false,
            application_id: None,
            create_mode: 0o600,
            create_if_missing: true,
            migration_wait: Duration::from_secs(600),
            pool_size: 8,
            fair_queue: true,
            group_commit: false,
            statement_timeout: Some(Duration::from_secs(30)),
            lock_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Some(Duration::from_secs(60)),
            lost_commit_lookup: true,
            transaction_pooling: false,
            pooler_declared: false,
        }
    }

    /// How long SQLite itself waits for a lock before reporting "database is locked"; the
    /// retry policy then takes over. Defaults to 5 s.
    ///
    /// # Panics
    /// If longer than `i32::MAX` milliseconds (SQLite's limit).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            timeout.as_millis() <= i32::MAX as u128,
            "busy_timeout must be at most i32::MAX milliseconds"
        );
        self.busy_timeout = timeout;
        self
    }

    /// The journal mode to put the file in at open. Defaults to [`JournalMode::Wal`].
    ///
    /// A file already in WAL is never switched back at run time (that needs every other
    /// connection closed): asking for a rollback mode on a WAL file is an error.
    ///
    /// # Panics
    /// If `mode` is [`JournalMode::Memory`], which only in-memory databases have, or
    /// [`JournalMode::Off`], which gives up atomic commits.
    pub fn journal_mode(mut self, mode: JournalMode) -> Self {
        assert!(
            mode != JournalMode::Memory,
            "journal_mode(Memory) cannot be asked for; in-memory databases have it by themselves"
        );
        assert!(
            mode != JournalMode::Off,
            "journal_mode(Off) cannot be asked for: a crash mid-transaction would corrupt the file"
        );
        self.journal_mode = mode;
        self
    }

    /// `PRAGMA synchronous`. Defaults to NORMAL under WAL, EXTRA with the DELETE journal
    /// (FULL does not sync the directory after deleting the journal, which a power loss can
    /// then bring back and roll back: the last acknowledged transaction was lost in about one
    /// simulated power loss in seven, `tests/power_loss`), and FULL with TRUNCATE and
    /// PERSIST.
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = Some(synchronous);
        self
    }

    /// `PRAGMA foreign_keys`. Defaults to on.
    pub fn foreign_keys(mut self, on: bool) -> Self {
        self.foreign_keys = on;
        self
    }

    /// `PRAGMA journal_size_limit` in bytes; `None` keeps SQLite's (no limit). Defaults to
    /// 64 MiB.
    ///
    /// # Panics
    /// If larger than `i64::MAX`.
    pub fn journal_size_limit(mut self, bytes: Option<u64>) -> Self {
        assert!(
            bytes.is_none_or(|b| b <= i64::MAX as u64),
            "journal_size_limit must fit in an i64"
        );
        self.journal_size_limit = bytes;
        self
    }

    /// Page cache per connection, in KiB (`PRAGMA cache_size = -N`). Defaults to 16 MiB.
    pub fn cache_size_kib(mut self, kib: u32) -> Self {
        self.cache_size_kib = kib;
        self
    }

    /// `PRAGMA temp_store`. Defaults to [`TempStore::Memory`].
    pub fn temp_store(mut self, store: TempStore) -> Self {
        self.temp_store = store;
        self
    }

    /// `PRAGMA mmap_size` in bytes; 0 turns memory-mapped reads off. Defaults to 128 MiB.
    ///
    /// # Panics
    /// If larger than `i64::MAX`.
    pub fn mmap_size(mut self, bytes: u64) -> Self {
        assert!(bytes <= i64::MAX as u64, "mmap_size must fit in an i64");
        self.mmap_size = bytes;
        self
    }

    /// The retry policy for lock errors (journal-mode switch, migrations, reads, writes).
    /// Defaults to [`RetryPolicy::new`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Accept a database that has applied migrations this binary does not know, as during a
    /// rolling upgrade where a newer binary already migrated. Defaults to refusing it.
    pub fn allow_unknown_migrations(mut self, allow: bool) -> Self {
        self.allow_unknown_migrations = allow;
        self
    }

    /// Accept a database whose applied migrations have different SQL now than when they ran
    /// (each is logged at `warn`). The layer records a checksum of every migration it applies
    /// and refuses such a database by default: its schema is not what the code says. The
    /// recorded checksums are left as they are. Defaults to refusing it.
    pub fn allow_edited_migrations(mut self, allow: bool) -> Self {
        self.allow_edited_migrations = allow;
        self
    }

    /// Accept a database that has tables but no migration history (no
    /// `__diesel_schema_migrations`, no application id of its own), as one created before
    /// the application used migrations: the pending migrations then run on top of its
    /// tables. By default such a file is taken for another program's and refused before
    /// anything is written ([`Error::UnmanagedDatabase`](crate::Error::UnmanagedDatabase)):
    /// it is not converted to WAL, stamped or given side files. Defaults to refusing it.
    pub fn allow_unmanaged_tables(mut self, allow: bool) -> Self {
        self.allow_unmanaged_tables = allow;
        self
    }

    /// Your application's id (`PRAGMA application_id`, a 32-bit number in the file's header;
    /// SQLite's docs suggest four ASCII letters, `u32::from_be_bytes(*b"MyAp")`). A new
    /// file, or one that has none yet, is stamped with it when it is first migrated, and a
    /// file carrying another id is refused before anything is written
    /// ([`Error::ForeignDatabase`](crate::Error::ForeignDatabase)). Defaults to none: no
    /// stamp, no check.
    ///
    /// # Panics
    /// If `id` is 0, which means "not set" in SQLite.
    pub fn application_id(mut self, id: u32) -> Self {
        assert!(id != 0, "application_id 0 means \"not set\"; pick another");
        self.application_id = Some(id);
        self
    }

    /// The permission bits a new database file is created with, exactly, whatever the
    /// umask. SQLite gives the `-wal` and `-shm` files the database's mode, and the fair
    /// queue's `-lock` file gets it too. Existing files keep theirs. Unix only. Defaults to
    /// `0o600`: only the owner reads it (use `0o660` for a group of workers).
    ///
    /// # Panics
    /// If `mode` has bits outside `0o777`, or lacks owner read and write.
    pub fn create_mode(mut self, mode: u32) -> Self {
        assert!(
            mode & !0o777 == 0 && mode & 0o600 == 0o600,
            "create_mode must be within 0o777 and include owner read and write (0o600)"
        );
        self.create_mode = mode;
        self
    }

    /// Whether [`open`](Options::open) creates a database file that does not exist (it
    /// then migrates it). Defaults to `true`; with `false`, a missing file is
    /// [`Error::MissingDatabase`](crate::Error::MissingDatabase) and nothing is created:
    /// for tools that must only ever touch an existing database (a backup, a report).
    /// `:memory:` is always new.
    pub fn create_if_missing(mut self, create: bool) -> Self {
        self.create_if_missing = create;
        self
    }

    /// The most connections the pool keeps open. Defaults to 8.
    ///
    /// # Panics
    /// If `size` is 0.
    pub fn pool_size(mut self, size: u32) -> Self {
        assert!(size > 0, "pool_size must be at least 1");
        self.pool_size = size;
        self
    }

    /// The longest a [`Database::read`](crate::Database::read) may keep its read transaction
    /// open. A read transaction keeps every checkpoint from passing its snapshot, so the WAL
    /// grows for as long as it lasts. Past the limit, a watchdog thread ends the transaction
    /// (interrupting a running statement), every later statement of the closure fails, and
    /// the read returns [`Error::ReadTooLong`](crate::Error::ReadTooLong). `None` (the
    /// default) sets no limit. Only the layer's reads are capped: a transaction opened on
    /// [`Database::connection`](crate::Database::connection), or by another program, is not;
    /// nor is a read on a pooled connection whose Diesel instrumentation the application
    /// replaced (the layer keeps the connection's read state there). Each capped connection
    /// gets an SQLite authorizer (which keeps the migration guard's rule).
    ///
    /// # Panics
    /// If `age` is zero.
    pub fn max_read_age(mut self, age: Option<Duration>) -> Self {
        assert!(
            age != Some(Duration::ZERO),
            "max_read_age must be above zero"
        );
        self.max_read_age = age;
        self
    }

    /// For an external WAL shipper (Litestream, LiteFS) that owns checkpoints: the layer's
    /// connections never checkpoint on their own (`PRAGMA wal_autocheckpoint = 0`), so every
    /// frame stays in `-wal` until the shipper has copied it. **Required** beside Litestream:
    /// without it, a Litestream stopped while the application writes loses the writes since
    /// its previous sync from its replica (or leaves a replica that restores corrupt), because
    /// Litestream ends its read transaction before its final sync and the layer's checkpoint
    /// then starts the WAL over (`tests/litestream.rs`). Defaults to off: the layer's
    /// connections then run a PASSIVE checkpoint after a commit once the WAL holds 1000
    /// frames (as SQLite's automatic checkpoint does), try no more than every 250 ms while a
    /// read transaction pins the WAL (SQLite retries after every commit), and log a `warn`
    /// event naming the process that pins it once the WAL passes `journal_size_limit` (64 MiB
    /// if there is none).
    pub fn wal_shipping(mut self, on: bool) -> Self {
        self.wal_shipping = on;
        self
    }

    /// The WAL size at which a pinned WAL is warned about, or `None` when the layer does not
    /// checkpoint (WAL shipping).
    pub(crate) fn checkpoint_warning(&self) -> Option<u64> {
        (!self.wal_shipping).then(|| self.journal_size_limit.unwrap_or(64 * 1024 * 1024))
    }

    /// Whether writers of this crate queue for the write lock on a sidecar file,
    /// `<database>-lock` (created with the database file's permissions), with a blocking
    /// `flock` taken before `BEGIN IMMEDIATE` and released after COMMIT. The kernel wakes the
    /// next waiter the moment the lock is free, where SQLite's busy handler makes old waiters
    /// poll every 100 ms and lose to newcomers. Correctness never depends on it: processes
    /// that ignore the file still meet SQLite's own locks and the retry policy. Turn it off
    /// where the directory is read-only or locks are unreliable. Defaults to on.
    ///
    /// A process that writes back to back keeps its turn for 200 us after a short write (one
    /// under 1 ms), so that its next write needs no hand-over to another process; such a
    /// streak lasts at most 10 ms, as long as one 10 ms write holds the turn, so another
    /// process waits at most that much longer for it. (A process's first write, and the
    /// open's own turns, never keep it.)
    ///
    /// On PostgreSQL the queue is a session advisory lock, and writers queue only while there
    /// is contention: a write that failed on a serialization failure, a deadlock or a lock
    /// timeout takes its turn (waited for in the server's lock queue, in arrival order, in the
    /// round trip of its next `BEGIN`) before it runs again, and the writes of a handle whose
    /// writes met a conflict (or waited for their turn) within the last second queue from
    /// their first attempt. Every other write takes the turn in shared mode for its
    /// transaction, which never waits: while no writer queues, writes share it and keep all of
    /// the server's concurrency; while one holds it or waits for it, the write queues too, so
    /// that no newcomer slips in between two turns. The holder's `COMMIT` hands the turn to
    /// the next. On a hot row, where `SERIALIZABLE` writers otherwise retry until one happens
    /// to begin just after a commit, this turns a tail of 20 times the fair wait into about
    /// the fair wait (BENCHMARKS.md).
    /// Behind a declared transaction pooler ([`Options::transaction_pooling`]) the turn is a
    /// table lock taken inside each attempt's transaction instead.
    pub fn fair_queue(mut self, on: bool) -> Self {
        self.fair_queue = on;
        self
    }

    /// Group commit (SQLite): the [`write`](crate::Database::write)s that arrive while
    /// another `write` of the same handle holds the write transaction join it instead of
    /// waiting for their own, and the group commits once, with one sync of the WAL: under
    /// [`Synchronous::Full`] one `fsync` for many writes, where each would otherwise wait for
    /// its own.
    ///
    /// The first writer leads: it takes the write turn, begins the transaction and runs its
    /// closure; each writer that joined then runs its own closure, on its own thread, in a
    /// savepoint of that transaction (on the leader's connection, lent to it while the leader
    /// waits): one whose closure fails (or panics) has only its savepoint rolled back and
    /// gets its own error (or panic); the others stay in. Then the leader commits, and every
    /// writer of the group is answered only once that COMMIT is done (durable under
    /// `Full`); if it fails, none is answered `Ok`. A lock error at `BEGIN` or `COMMIT` runs
    /// the whole group again (every closure: they are `FnMut` as always), under the
    /// leader's retry policy; a writer still waiting when its own deadline passes gets
    /// [`Error::Busy`](crate::Error::Busy). A lone writer pays three uncontended mutex locks.
    /// Nested writes are refused with [`Error::Reentrant`](crate::Error::Reentrant) as
    /// without it.
    ///
    /// What changes for the application: the writes of a group commit or are lost together
    /// (a crash before the COMMIT takes them all back, none of them acknowledged), and one
    /// writer's closure sees the uncommitted changes of those before it in the group, as it
    /// would see them committed without group commit. Writers of other processes are not
    /// grouped (they queue for the write turn as usual), nor are the tasks of an
    /// `AsyncDatabase` (feature `tokio`), which runs a SQLite handle's writes one after
    /// another. Defaults to `false`.
    pub fn group_commit(mut self, on: bool) -> Self {
        self.group_commit = on;
        self
    }

    /// PostgreSQL's `statement_timeout` for the sessions of a
    /// [`PgDatabase`](crate::PgDatabase): a statement running longer is cancelled (SQLSTATE
    /// 57014), and the `write` or `read` returns that error (it is not retried: running it
    /// again would take as long). The migration batch runs without one. `None` sets none.
    /// Defaults to 30 s.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// PostgreSQL's `lock_timeout`: how long one statement waits for a row or table lock
    /// before the server cancels it (55P03); the `write` then runs again as a whole, as
    /// after a deadlock or a serialization failure, until the retry deadline. Each attempt
    /// also waits at most what is left of that deadline. Defaults to 5 s.
    ///
    /// # Panics
    /// If `timeout` is zero (which PostgreSQL reads as "wait forever").
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        assert!(!timeout.is_zero(), "lock_timeout must be above zero");
        self.lock_timeout = timeout;
        self
    }

    /// PostgreSQL's `idle_in_transaction_session_timeout`: a session that keeps a
    /// transaction open without running a statement for this long is ended by the server,
    /// which rolls the transaction back and releases its locks. The analogue of
    /// [`Options::max_read_age`] for a server. `None` sets none. Defaults to 60 s.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn idle_in_transaction_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_in_transaction_timeout = timeout;
        self
    }

    /// How long an open waits in all for another process's migration batch, as long as that
    /// process is alive and migrating: the retry policy's deadline would end the wait while
    /// a long batch (an index on a big table, a long history on a slow machine) runs fine.
    /// Each time the deadline passes, the open looks at who holds what it waits for: while
    /// that is a live process migrating this database (SQLite: the write queue's holder, by
    /// its record in `<database>-lock` and the OS lock table, or the maker of a new database,
    /// by its lock on the directory; PostgreSQL: the session holding the migration lock, by
    /// `pg_locks`), it waits another deadline, until `migration_wait` from the open's start;
    /// else it gives up as before ([`Error::Busy`](crate::Error::Busy), naming the holder).
    /// Defaults to 10 minutes; never shorter than the retry deadline.
    pub fn migration_wait(mut self, limit: Duration) -> Self {
        self.migration_wait = limit;
        self
    }

    /// Whether a [`PgDatabase`](crate::PgDatabase) write whose session is lost while its
    /// `COMMIT` is in flight (a server restart, `pg_terminate_backend`, a network cut) asks
    /// the server, on a fresh session, what became of it: committed (the write returns its
    /// value, and is not run again), not committed (it runs again, as any write on a lost
    /// session), or not provable (after a crash or a failover, where a transaction's id may
    /// be handed out again): [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown).
    /// Off, every such write is `CommitOutcomeUnknown`. Defaults to on.
    ///
    /// It costs each write one round trip before its `COMMIT` (reading the transaction's id):
    /// 7 % of the rate of 4 processes on one hot row, 19 % of a lone writer's on a local
    /// socket (BENCHMARKS.md).
    pub fn lost_commit_lookup(mut self, on: bool) -> Self {
        self.lost_commit_lookup = on;
        self
    }

    /// Whether the PostgreSQL URL leads to a transaction pooler (PgBouncer's
    /// `pool_mode = transaction`, as hosted PostgreSQL often offers), which gives each
    /// transaction, and each statement outside one, whichever server connection is free:
    /// nothing a session sets outside a transaction stays with it.
    ///
    /// With it on, the layer keeps no state in the server's session: the timeouts are set
    /// `LOCAL` in each transaction instead of once per session (a session `SET` would stay
    /// on the server connection, for the pooler's other clients, and be missing from the
    /// next one); Diesel's prepared statement cache is off (a statement prepared in one
    /// transaction is missing on the next one's server connection); the turn of the write
    /// queue ([`Options::fair_queue`]) is taken inside each attempt's transaction instead of
    /// as a session lock (a table lock on the layer's checksum table, which the role must
    /// be allowed to lock, else writes go without the queue); and while a migration that
    /// cannot run in a transaction is applied, the migration lock is held in a transaction
    /// of a second session instead of as a session lock (`CREATE INDEX CONCURRENTLY` does not
    /// wait for that idle transaction; a pooler's `idle_transaction_timeout` must leave it the
    /// time the migrations take). The pooler's other clients may leave session settings on
    /// its server connections: each transaction of the layer's (the migration batch, writes,
    /// reads, [`PgStatus::read`](crate::PgStatus::read)) sets the role, `search_path`,
    /// `default_tablespace`, `synchronous_commit`, `session_replication_role` and
    /// `row_security` back to the database's defaults where they differ, and a write begins
    /// `READ WRITE` unless the database's default is read-only; a migration that cannot run
    /// in a transaction, and the statements of a session from
    /// [`PgDatabase::connection`](crate::PgDatabase::connection), run with what they find
    /// (qualify names with their schema there). Such a session has none of the layer's
    /// timeouts either.
    ///
    /// Undeclared (the default), [`Options::open_postgres`] checks whether a session's
    /// statements stay on one server connection, and refuses a URL where they move with
    /// [`Error::TransactionPooling`](crate::Error::TransactionPooling). The check finds
    /// PgBouncer's transaction pooling however it hands out server connections, unless
    /// other clients happen to keep the open's server connection from moving; it never
    /// refuses the server itself or a session pooler. It costs each open one more session
    /// and four round trips (in a cold storm of 64 processes on 2 cores, a third more time to
    /// ready: BENCHMARKS.md). Declared either way, on or off, the open does not check: off
    /// says the URL leads to the server or a session pooler.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn transaction_pooling(mut self, on: bool) -> Self {
        self.transaction_pooling = on;
        self.pooler_declared = true;
        self
    }

    /// The `synchronous` setting in force: the explicit one, else the one that fits the
    /// journal mode.
    pub(crate) fn effective_synchronous(&self) -> Synchronous {
        self.synchronous.unwrap_or(match self.journal_mode {
            JournalMode::Wal => Synchronous::Normal,
            JournalMode::Delete => Synchronous::Extra,
            _ => Synchronous::Full,
        })
    }

    /// The statements run on every new connection, in order.
    ///
    /// `busy_timeout` comes first: it takes no lock, while the pragmas after it read the
    /// schema and can meet a lock. `foreign_keys` next, since it is a no-op inside a
    /// transaction and nothing here opens one. `journal_mode` is not here: switching takes
    /// a write lock, and is done once at open.
    pub(crate) fn connection_pragmas(&self) -> String {
        let mut sql = format!(
            "PRAGMA busy_timeout = {};\nPRAGMA foreign_keys = {};\nPRAGMA synchronous = {};\n",
            self.busy_timeout.as_millis(),
            if self.foreign_keys { "ON" } else { "OFF" },
            self.effective_synchronous().as_str(),
        );
        if let Some(limit) = self.journal_size_limit {
            sql += &format!("PRAGMA journal_size_limit = {limit};\n");
        }
        if self.wal_shipping {
            sql += "PRAGMA wal_autocheckpoint = 0;\n";
        }
        sql += &format!(
            "PRAGMA cache_size = -{};\nPRAGMA temp_store = {};\nPRAGMA mmap_size = {};\n",
            self.cache_size_kib,
            self.temp_store.as_str(),
            self.mmap_size,
        );
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_timeout_comes_first_and_defaults_render() {
        let sql = Options::new().connection_pragmas();
        assert!(sql.starts_with("PRAGMA busy_timeout = 5000;\n"), "{sql}");
        for expected in [
            "PRAGMA foreign_keys = ON;",
            "PRAGMA synchronous = NORMAL;",
            "PRAGMA journal_size_limit = 67108864;",
            "PRAGMA cache_size = -16384;",
            "PRAGMA temp_store = MEMORY;",
            "PRAGMA mmap_size = 134217728;",
        ] {
            assert!(sql.contains(expected), "{expected} missing from {sql}");
        }
        assert!(!sql.contains("journal_mode"));
    }

    #[test]
    fn synchronous_follows_the_journal_mode_unless_set() {
        let rollback = Options::new().journal_mode(JournalMode::Delete);
        assert_eq!(rollback.effective_synchronous(), Synchronous::Extra);
        let truncate = Options::new().journal_mode(JournalMode::Truncate);
        assert_eq!(truncate.effective_synchronous(), Synchronous::Full);
        let explicit = rollback.synchronous(Synchronous::Full);
        assert!(explicit.connection_pragmas().contains("synchronous = FULL"));
        let no_limit = Options::new().journal_size_limit(None);
        assert!(!no_limit.connection_pragmas().contains("journal_size_limit"));
    }

    #[test]
    fn journal_modes_parse_what_sqlite_returns() {
        assert_eq!(JournalMode::parse("wal"), Some(JournalMode::Wal));
        assert_eq!(JournalMode::parse("WAL"), Some(JournalMode::Wal));
        assert_eq!(JournalMode::parse("memory"), Some(JournalMode::Memory));
        // Every mode SQLite has is typed (so errors carry it); other words are not modes.
        assert_eq!(JournalMode::parse("off"), Some(JournalMode::Off));
        assert_eq!(JournalMode::parse("wall"), None);
    }

    #[test]
    #[should_panic(expected = "journal_mode(Off) cannot be asked for")]
    fn journal_mode_off_is_rejected_in_the_setter() {
        let _ = Options::new().journal_mode(JournalMode::Off);
    }

    #[test]
    #[should_panic(expected = "application_id 0")]
    fn application_id_zero_is_rejected_in_the_setter() {
        let _ = Options::new().application_id(0);
    }

    #[test]
    #[should_panic(expected = "create_mode")]
    fn a_create_mode_the_owner_cannot_write_is_rejected() {
        let _ = Options::new().create_mode(0o444);
    }

    #[test]
    #[should_panic(expected = "pool_size must be at least 1")]
    fn empty_pool_is_rejected_in_the_setter() {
        let _ = Options::new().pool_size(0);
    }

    #[test]
    #[should_panic(expected = "journal_mode(Memory)")]
    fn memory_journal_is_rejected_in_the_setter() {
        let _ = Options::new().journal_mode(JournalMode::Memory);
    }
}
