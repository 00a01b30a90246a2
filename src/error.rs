//! The crate's one error type, the operations it names, and the one place that decides what
//! a lock error is.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::time::Duration;

use diesel::result::Error as DieselError;

use crate::escaped::Escaped;
use crate::holders::Holder;
pub(crate) use crate::operation::{FileOperation, Operation};
use crate::pragma::JournalMode;

/// A boxed error that can cross threads, as `diesel_migrations` reports its own.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening, migrating, reading or writing.
///
/// Every variant keeps its cause as `source()`, so a caller (or a command line that prints
/// the chain) sees SQLite's own message at the end. Messages are one short clause; what to
/// do about a refusal is [`Error::hint`]. Use [`Error::is_lock_error`] instead of matching
/// on messages.
///
/// Every refusal of [`Options::open`](crate::Options::open) (from [`Error::IsADirectory`] to
/// [`Error::NonTransactionalMigration`]) comes before the first write: the file is left
/// byte-for-byte as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The path cannot name a SQLite file: not UTF-8, empty, a NUL byte, URI parameters, or
    /// another engine's URL.
    #[error("database path {path} {reason}", path = Escaped::path(.path))]
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it, such as `is empty`.
        reason: &'static str,
    },

    /// The database path names a directory.
    #[error("database path {path} is a directory", path = Escaped::path(.path))]
    IsADirectory {
        /// The path as given, made absolute.
        path: PathBuf,
    },

    /// The database path names something other than a regular file: a device (whose first
    /// bytes SQLite would overwrite with its header), a FIFO (which would block the open), a
    /// socket. Nothing is created or written.
    #[error("database path {path} is {kind}, not a regular file", path = Escaped::path(.path))]
    NotAFile {
        /// The path as given, made absolute.
        path: PathBuf,
        /// What it is, such as `a block device`.
        kind: &'static str,
    },

    /// The database file does not exist, and
    /// [`Options::create_if_missing`](crate::Options::create_if_missing) is off.
    #[error("database {path} does not exist", path = Escaped::path(.path))]
    MissingDatabase {
        /// The path as given, made absolute.
        path: PathBuf,
    },

    /// The directory the database should be in does not exist.
    #[error("the directory {path} does not exist", path = Escaped::path(.path))]
    MissingDirectory {
        /// The missing directory.
        path: PathBuf,
    },

    /// The database's file name leaves no room for SQLite's side files (`-journal`, `-wal`,
    /// `-shm`) and the write queue's `-lock` within the filesystem's limit on a name; or a
    /// backup's, for its temporary file and that file's journal.
    #[error("file name {path} is longer than {max} bytes", path = Escaped::path(.path))]
    NameTooLong {
        /// The path as given, made absolute.
        path: PathBuf,
        /// The longest name that leaves room for the side files.
        max: usize,
    },

    /// The database path is a symbolic link to a file that does not exist: the layer does
    /// not create a database through a link.
    #[error("database path {path} is a symbolic link to {target}, which does not exist", path = Escaped::path(.path), target = Escaped::path(.target))]
    DanglingSymlink {
        /// The link.
        path: PathBuf,
        /// Where it points.
        target: PathBuf,
    },

    /// A file SQLite opens next to the database (`-journal`, `-wal`, `-shm`) cannot be used:
    /// it is not a regular file, or this user may not write it.
    #[error("{path} {problem}", path = Escaped::path(.path))]
    SideFile {
        /// The side file.
        path: PathBuf,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// SQLite could not open the file.
    #[error("cannot open database {path}", path = Escaped::path(.path))]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: diesel::ConnectionError,
    },

    /// The URL's scheme names an engine this build does not open (`mysql://`, `http://`),
    /// or one whose Cargo feature is off.
    #[error("cannot open {url}: the scheme {scheme}:// is not one of this build's engines ({enabled})", url = Escaped::new(.url))]
    UnsupportedUrl {
        /// The URL, without its password.
        url: String,
        /// Its scheme.
        scheme: String,
        /// The schemes this build opens, by engine.
        enabled: &'static str,
    },

    /// `$DATABASE_URL` is unset, empty or not UTF-8.
    #[error("DATABASE_URL is not set")]
    NoDatabaseUrl,

    /// No session could be opened on the PostgreSQL server.
    #[error("cannot connect to {url}", url = Escaped::new(.url))]
    Connect {
        /// The URL, without its password.
        url: String,
        /// What libpq said.
        #[source]
        source: diesel::ConnectionError,
    },

    /// Another process held PostgreSQL's migration lock (a session lock, or behind a
    /// transaction pooler a second session's transaction lock, while it applied a migration
    /// that cannot run in a transaction); waited for with the retry policy.
    #[error("another process holds the migration lock of {url}", url = Escaped::new(.url))]
    MigrationLockHeld {
        /// The URL, without its password.
        url: String,
    },

    /// The PostgreSQL URL leads to a transaction pooler (PgBouncer's `pool_mode =
    /// transaction`): one session's statements ran on different server connections, so
    /// session advisory locks, session settings and prepared statements would not hold, and
    /// [`Options::transaction_pooling`](crate::Options::transaction_pooling) was not declared.
    #[error("{url} leads to a transaction pooler: {seen}", url = Escaped::new(.url))]
    TransactionPooling {
        /// The URL, without its password.
        url: String,
        /// What gave it away: a session's statements on two server processes, or two
        /// sessions on one.
        seen: String,
    },

    /// The PostgreSQL URL leads to a pooler in statement pooling mode (PgBouncer's
    /// `pool_mode = statement`), which closes every session that begins a transaction: the
    /// layer's migrations, writes and reads are transactions. Told at open (and by
    /// [`PgStatus::read`](crate::PgStatus::read)) when a session is lost at its first
    /// `BEGIN` (or the open's check sees its statements move between server connections)
    /// and two fresh sessions in turn, whose statements outside a transaction run, are each
    /// lost at their `BEGIN` too.
    #[error("{url} leads to a statement pooler: sessions are closed at BEGIN", url = Escaped::new(.url))]
    StatementPooling {
        /// The URL, without its password.
        url: String,
    },

    /// The connection to the PostgreSQL server was lost while `COMMIT` was in flight, and the
    /// server could not prove what became of it (it crashed, restarted or failed over
    /// meanwhile, or [`Options::lost_commit_lookup`](crate::Options::lost_commit_lookup) is
    /// off): the transaction may have committed or not. It is not run again; read back to
    /// find out.
    #[error("{operation}: the connection was lost during COMMIT; whether it committed is unknown")]
    CommitOutcomeUnknown {
        /// The operation whose commit was lost.
        operation: Operation,
        /// Diesel's error.
        #[source]
        source: DieselError,
    },

    /// A statement failed; `operation` says which step ran it.
    #[error("{operation} failed")]
    Query {
        /// The step that failed.
        operation: Operation,
        /// Diesel's error, with SQLite's message.
        #[source]
        source: DieselError,
    },

    /// The database stayed locked (or, on PostgreSQL, the transaction kept conflicting, or
    /// the server kept ending the sessions) until the retry policy gave up; or, for a call of
    /// the async handle (feature `tokio`), its calls in progress kept this one from beginning
    /// until its retry deadline (`attempts` is then 0).
    #[error(
        "{operation} gave up after {attempts} attempts in {:.1} s: {}{}",
        elapsed.as_secs_f64(),
        stayed(source),
        by(holders)
    )]
    Busy {
        /// The operation that was retried.
        operation: Operation,
        /// How many times it was tried.
        attempts: u32,
        /// Wall-clock time from the first attempt (or from asking for the write queue) until
        /// giving up.
        elapsed: Duration,
        /// The last lock error, the write queue's time-out, or the async handle's wait to
        /// begin.
        #[source]
        source: BoxError,
        /// Who held the write queue or SQLite's write lock when it gave up, from the OS lock
        /// table (Linux; empty elsewhere, or if the holder had just let go).
        holders: Vec<Holder>,
    },

    /// The file is not, and could not be put, in the journal mode the options ask for.
    #[error("database {path} is in journal mode {actual}, expected {expected}", path = Escaped::path(.path))]
    JournalMode {
        /// The database file.
        path: PathBuf,
        /// The mode the options ask for.
        expected: JournalMode,
        /// The mode SQLite reports as in force.
        actual: JournalMode,
    },

    /// SQLite answered `PRAGMA journal_mode` with a mode this crate does not know.
    #[error("database {path} reports an unknown journal mode {answer:?}", path = Escaped::path(.path))]
    UnknownJournalMode {
        /// The database file.
        path: PathBuf,
        /// SQLite's answer.
        answer: String,
    },

    /// The migration source (for example `embed_migrations!`) could not list its migrations.
    #[error("cannot read the migration source")]
    MigrationSource {
        /// What `diesel_migrations` said.
        #[source]
        source: BoxError,
    },

    /// A migration failed; the whole batch was rolled back, so the database is as it was.
    #[error("migration {name} failed", name = Escaped::new(.name))]
    Migration {
        /// The migration's name (its directory name).
        name: String,
        /// What SQLite or `diesel_migrations` said.
        #[source]
        source: BoxError,
    },

    /// A pending migration would run outside a transaction, so it cannot be applied atomically.
    #[error("migration {name} has run_in_transaction = false", name = Escaped::new(.name))]
    NonTransactionalMigration {
        /// The migration's name.
        name: String,
    },

    /// A migration's SQL has `BEGIN`, `COMMIT`, `END` or `ROLLBACK`: it would end the batch's
    /// transaction and commit part of the batch. It was refused when SQLite prepared that
    /// statement; the whole batch was rolled back.
    #[error("migration {name} controls its own transaction", name = Escaped::new(.name))]
    TransactionControl {
        /// The migration's name.
        name: String,
    },

    /// The file has tables but no migration history and no application id of its own:
    /// another program's database. Nothing was written.
    #[error("database {path} has tables but no migration history: {}", escaped_list(tables), path = Escaped::path(.path))]
    UnmanagedDatabase {
        /// The database file.
        path: PathBuf,
        /// Its tables.
        tables: Vec<String>,
    },

    /// The database has applied migrations this binary does not know: it was migrated by a
    /// newer (or a different) program.
    #[error("database {path} has applied migrations this binary does not know: {}",
        escaped_list(versions), path = Escaped::path(.path))]
    UnknownMigrations {
        /// The database file.
        path: PathBuf,
        /// The unknown versions, as stored in `__diesel_schema_migrations`.
        versions: Vec<String>,
    },

    /// Migrations that were applied have different SQL now: somebody edited them after they
    /// ran, so the schema is not what the code says.
    #[error("database {path} has applied migrations whose SQL changed since they ran: {}",
        escaped_list(names), path = Escaped::path(.path))]
    EditedMigrations {
        /// The database file.
        path: PathBuf,
        /// The edited migrations' names.
        names: Vec<String>,
    },

    /// The connection pool could not hand out a connection.
    #[error("cannot get a connection from the pool")]
    Pool {
        /// r2d2's error (it keeps only a string; the real cause was logged with `tracing`).
        #[source]
        source: diesel::r2d2::PoolError,
    },

    /// A file-system call on the database's files failed.
    #[error("cannot {operation} {path}", path = Escaped::path(.path))]
    Io {
        /// What was attempted.
        operation: FileOperation,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The file exists but is not a SQLite database (wrong header, shorter than a page,
    /// encrypted).
    #[error("{path} is not a SQLite database: {reason}", path = Escaped::path(.path), reason = Escaped::new(.reason))]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// What gave it away, such as SQLite's "file is not a database".
        reason: String,
    },

    /// The file is a damaged SQLite database (truncated, or "database disk image is
    /// malformed").
    #[error("database {path} is damaged: {reason}", path = Escaped::path(.path), reason = Escaped::new(.reason))]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, such as SQLite's "database disk image is malformed".
        reason: String,
    },

    /// The directory the database is in cannot be written by this process: SQLite creates
    /// `-wal` and `-shm` (or `-journal`) there, and the write queue its `-lock`.
    #[error("directory {path} is not writable", path = Escaped::path(.path))]
    ReadOnlyDirectory {
        /// The directory.
        path: PathBuf,
    },

    /// The database file cannot be written by this process.
    #[error("database {path} is not writable", path = Escaped::path(.path))]
    ReadOnlyFile {
        /// The file.
        path: PathBuf,
    },

    /// The file carries another `PRAGMA application_id` than the one the options ask for:
    /// it belongs to another application.
    #[error("database {path} belongs to another application: application_id {found:#010x}, \
         expected {expected:#010x}", path = Escaped::path(.path))]
    ForeignDatabase {
        /// The file.
        path: PathBuf,
        /// The id the options ask for ([`Options::application_id`](crate::Options::application_id)).
        expected: u32,
        /// The id the file carries.
        found: u32,
    },

    /// The database is on a network or cluster filesystem, where WAL's shared memory does not
    /// work and locks are unreliable.
    #[error("database {path} is on a {filesystem} filesystem (statfs type {magic:#x})", path = Escaped::path(.path))]
    NetworkFilesystem {
        /// The database file.
        path: PathBuf,
        /// The filesystem's name, such as `NFS`.
        filesystem: &'static str,
        /// `statfs(2)`'s `f_type`.
        magic: u64,
    },

    /// A `write`, `read` or `connection` was called inside a `write` or `read` of the same
    /// database on the same thread: it would wait for the outer one's lock or pool slot until
    /// the deadline. Refused at once.
    #[error("{operation} called inside a {outer} of the same database on this thread")]
    Reentrant {
        /// The nested call.
        operation: Operation,
        /// The call it is inside.
        outer: Operation,
    },

    /// A [`Database::read`](crate::Database::read) stayed open past
    /// [`Options::max_read_age`](crate::Options::max_read_age): its transaction was ended so
    /// that the WAL could be checkpointed, and whatever the closure returned is discarded (its
    /// later statements failed, "not authorized"). Not retried.
    #[error("read of {path} stayed open past its limit of {limit:?}", path = Escaped::path(.path))]
    ReadTooLong {
        /// The database file.
        path: PathBuf,
        /// The limit, `Options::max_read_age`.
        limit: std::time::Duration,
    },

    /// The tokio runtime shut down before a call of the async handle (feature `tokio`) could
    /// run; nothing of it reached the database.
    #[error("{operation} cancelled: the runtime is shutting down")]
    Cancelled {
        /// The call.
        operation: Operation,
    },

    /// [`Database::close`](crate::Database::close) closed every connection it could, and
    /// some stayed open: connections the application took from the pool and still holds
    /// (which keep the pool, and its idle connections, open), or a clone of
    /// [`Database::pool`](crate::Database::pool).
    #[error(
        "database {path} still has {connections} open connections{}",
        lent_out(lent, *connections),
        path = Escaped::path(.path)
    )]
    StillOpen {
        /// The database file.
        path: PathBuf,
        /// How many.
        connections: usize,
        /// The ones the pool lent out and nobody gave back, oldest first: where they were
        /// taken (`one taken with Database::connection or from Database::pool on thread
        /// worker-2 12.5 s ago`, `one in a write on thread main ...`).
        lent: Vec<String>,
    },

    /// The destination of a backup exists; it was left as it is.
    #[error("backup destination {path} exists", path = Escaped::path(.path))]
    BackupExists {
        /// The destination.
        path: PathBuf,
    },

    /// A thread the layer needs could not be started: the process or its user is at the
    /// thread limit (`ulimit -u`, `RLIMIT_NPROC`, a cgroup's `pids.max`).
    #[error("cannot start a thread for {what}: {cause}")]
    NoThread {
        /// What the thread was for.
        what: &'static str,
        /// What the spawning code said.
        cause: String,
    },

    /// SQLite could not write the database to disk: the disk is full, or a file-size limit,
    /// a quota or an I/O error stopped it. The transaction was rolled back; the file is
    /// consistent and takes writes again once there is room.
    #[error("{operation} failed: SQLite could not write to disk")]
    Storage {
        /// The step that failed.
        operation: Operation,
        /// Diesel's error, with SQLite's message.
        #[source]
        source: DieselError,
    },
}

/// `: one taken ... ago, ...; 2 idle in the pool they (or a clone of it) keep`, or nothing.
fn lent_out(lent: &[String], connections: usize) -> String {
    let idle = connections.saturating_sub(lent.len());
    let mut parts = lent.to_vec();
    if idle > 0 {
        parts.push(format!(
            "{idle} idle in a pool that {} keeps",
            if lent.is_empty() {
                "a clone of Database::pool"
            } else {
                "a connection lent out (or a clone of Database::pool)"
            }
        ));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join("; "))
    }
}

/// The names read from a database file, each escaped, joined by `, `.
fn escaped_list(names: &[String]) -> String {
    let shown: Vec<String> = names.iter().map(|n| Escaped::new(n).to_string()).collect();
    shown.join(", ")
}

/// The source of an [`Error::Busy`] of an async handle's call that could not begin by its
/// retry deadline.
#[cfg(feature = "tokio")]
#[derive(Debug, thiserror::Error)]
#[error(
    "not begun within the retry deadline (at least 1 s): the handle's {slots} slots (its \
     pool's connections) stayed taken by calls in progress, the writes queued ahead of it did \
     not end in time, or the runtime's blocking threads were all busy"
)]
pub(crate) struct NotBegun {
    pub(crate) slots: u32,
}

/// What a [`Error::Busy`] waited for, by its last failure: a lock, (PostgreSQL) a server
/// that kept ending the sessions or could not be reached, or (async) a call that never began.
fn stayed(source: &BoxError) -> &'static str {
    #[cfg(feature = "tokio")]
    if source.is::<NotBegun>() {
        return "it never began: the async handle's calls in progress held every slot or its \
                queue of writes, or the runtime's blocking threads were busy, the whole time";
    }
    #[cfg(feature = "postgres")]
    {
        use crate::postgres::PgFailureKind;
        match source
            .downcast_ref::<crate::postgres::PgFailure>()
            .map(|f| f.kind())
        {
            Some(PgFailureKind::ConnectionLost) => return "the server stayed unavailable",
            Some(PgFailureKind::Serialization | PgFailureKind::Deadlock) => {
                return "the transaction kept conflicting with others"
            }
            _ => {}
        }
    }
    let _ = source;
    "the database stayed locked"
}

/// ` by process 7 (sqlite3) holding the write lock, ...`, or nothing.
fn by(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return String::new();
    }
    let names: Vec<String> = holders.iter().map(Holder::to_string).collect();
    format!(" by {}", names.join(", "))
}

impl Error {
    /// Whether this error means "another connection holds a lock": the kind that goes away
    /// by waiting and running the whole transaction again.
    ///
    /// True for SQLite's lock errors however Diesel wrapped them, and for [`Error::Busy`]
    /// (the retries ran out while the database stayed locked). By message, as
    /// [`is_lock_error`](crate::is_lock_error): a trigger raising "database is locked" is one
    /// to it, though `write` did not retry it.
    pub fn is_lock_error(&self) -> bool {
        match self {
            Error::Query { source, .. } => is_lock_error(source),
            Error::Busy { .. } => true,
            _ => false,
        }
    }

    /// What to do about this error, for the refusals that have a remedy: one or two
    /// sentences for a person, such as a command line's `hint:` line.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            Error::JournalMode {
                actual: JournalMode::Wal,
                ..
            } => {
                "leaving WAL needs every other connection closed, so it is never done at run \
                 time; switch the file offline (sqlite3 FILE 'PRAGMA journal_mode = DELETE')"
            }
            Error::JournalMode { .. } => {
                "SQLite kept the old mode: WAL needs shared memory, which this VFS or \
                 filesystem does not offer; use a local filesystem, or ask for a rollback \
                 journal mode"
            }
            Error::UnmanagedDatabase { .. } => {
                "it looks like another program's database: open another file, or, for a \
                 database made before the application used migrations, accept it with \
                 Options::allow_unmanaged_tables (the migrations then run on top of its tables)"
            }
            Error::NonTransactionalMigration { .. } => {
                "a metadata.toml without run_in_transaction counts as false; set \
                 run_in_transaction = true in its metadata.toml, or move the statement that \
                 needs it (VACUUM, PRAGMA journal_mode, PRAGMA foreign_keys) out of the \
                 migrations"
            }
            Error::UnknownMigrations { .. } => {
                "it was migrated by a newer or a different program; \
                 Options::allow_unknown_migrations accepts that, for rolling upgrades"
            }
            Error::EditedMigrations { .. } => {
                "restore their original SQL and put the change in a new migration \
                 (Options::allow_edited_migrations accepts them)"
            }
            Error::Migration { .. } => {
                "the whole batch was rolled back, its bookkeeping too; fix the migration and \
                 open again"
            }
            Error::TransactionControl { .. } => {
                "each migration runs inside the batch's one transaction: remove BEGIN, COMMIT, \
                 END and ROLLBACK from it (SAVEPOINT and RELEASE may stay)"
            }
            Error::Corrupt { .. } => "restore it from a backup",
            Error::UnsupportedUrl { .. } => {
                "SQLite takes a path, sqlite:// or file:; PostgreSQL postgres:// or \
                 postgresql:// (Cargo feature postgres)"
            }
            Error::TransactionPooling { .. } => {
                "open it with Options::transaction_pooling(true), which keeps no state in the \
                 server's session, or use a URL to the server itself or to a session pooler \
                 (PgBouncer's pool_mode = session)"
            }
            Error::StatementPooling { .. } => {
                "use a URL to the server itself, or to a pooler in session mode (PgBouncer's \
                 pool_mode = session) or transaction mode (pool_mode = transaction, with \
                 Options::transaction_pooling(true))"
            }
            Error::CommitOutcomeUnknown { .. } => {
                "read back what the write should have stored before running it again; make \
                 writes idempotent (a unique key per request) where this matters"
            }
            Error::MissingDatabase { .. } => {
                "check the path: this operation only ever uses an existing database"
            }
            Error::NotAFile { .. } => {
                "a database is a regular file (or a path that does not exist yet, which the \
                 open creates): check the path"
            }
            Error::NameTooLong { .. } => {
                "SQLite names its side files after the database (FILE-journal, FILE-wal, \
                 FILE-shm), the write queue uses FILE-lock, and a backup writes \
                 .FILE.backup-PID-N and its journal first: choose a shorter name"
            }
            Error::DanglingSymlink { .. } => {
                "create the database where the link points (or point the link at an existing \
                 database), or pass the real path"
            }
            Error::SideFile { .. } => {
                "SQLite opens the database's -journal, -wal and -shm files by name: remove this \
                 one if nothing uses the database, or give it to the database's owner (a \
                 -journal or -wal may hold committed data: back it up first)"
            }
            Error::BackupExists { .. } => {
                "a backup never replaces a file: choose a new name, or remove the old backup \
                 first"
            }
            Error::NoThread { .. } => {
                "the process or its user is at the thread limit (ulimit -u, RLIMIT_NPROC, a \
                 cgroup's pids.max); raise it, or run fewer threads or processes"
            }
            Error::ReadTooLong { .. } => {
                "a read transaction keeps the WAL from being checkpointed for as long as it \
                 stays open; read less at a time (several reads, by key ranges), or raise \
                 Options::max_read_age"
            }
            Error::Cancelled { .. } => "finish the database's calls before the runtime shuts down",
            Error::StillOpen { .. } => {
                "a pooled connection or a clone of Database::pool outlived the handle; drop \
                 them before closing"
            }
            Error::Reentrant { .. } => {
                "use the connection the closure is given; a second one of the same database \
                 would wait for the first one's lock or pool slot"
            }
            Error::ReadOnlyDirectory { .. } => {
                "SQLite creates the database's -wal and -shm (or -journal) files and the \
                 write queue its -lock file in that directory"
            }
            Error::ReadOnlyFile { .. } => {
                "this layer opens databases to write them (and to put them in WAL mode and \
                 migrate them)"
            }
            Error::ForeignDatabase { .. } => {
                "open it with the application id it carries, or use another file; a file \
                 with id 0 is not stamped yet and is accepted"
            }
            Error::NetworkFilesystem { .. } => {
                "SQLite's WAL needs shared memory between processes, which network \
                 filesystems do not provide, and their locking is often broken (risk: \
                 corruption); put the database on a local disk, or opt into a rollback \
                 journal there with Options::journal_mode(JournalMode::Delete)"
            }
            Error::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) =>
            {
                "the process (ulimit -n) or the system is at its limit of open files: raise \
                 it, or open fewer files at once"
            }
            Error::Storage {
                operation: Operation::Backup,
                ..
            } => {
                "free space on the backup's filesystem (or raise its quota or the file-size \
                 limit): nothing was left at the destination, and the database is untouched"
            }
            Error::Storage { .. } => {
                "free disk space, or raise the file-size limit or quota; the file is \
                 consistent and takes writes again once there is room"
            }
            _ => return None,
        })
    }

    /// A failed statement of `operation`: [`Error::Storage`] when SQLite could not write to
    /// disk, else [`Error::Query`].
    pub(crate) fn query(operation: Operation, source: DieselError) -> Self {
        if is_storage_error(&source) {
            Error::Storage { operation, source }
        } else {
            Error::Query { operation, source }
        }
    }
}

impl From<DieselError> for Error {
    /// Lets `?` inside [`Database::write`](crate::Database::write) and
    /// [`Database::read`](crate::Database::read) closures turn Diesel errors into this type.
    fn from(source: DieselError) -> Self {
        Error::query(Operation::Query, source)
    }
}

impl From<Error> for DieselError {
    /// Lets a `write` or `read` closure return Diesel's own `QueryResult<T>`: a layer error
    /// that carries Diesel's error ([`Error::Query`], [`Error::Storage`]) gives it back as it
    /// is; any other (such as [`Error::Busy`]) is boxed in `QueryBuilderError`, from which it
    /// can be downcast.
    fn from(error: Error) -> Self {
        match error {
            Error::Query { source, .. } | Error::Storage { source, .. } => source,
            other => DieselError::QueryBuilderError(Box::new(other)),
        }
    }
}

/// SQLITE_FULL ("database or disk is full": no space, or the page limit) and SQLITE_IOERR
/// ("disk I/O error", with the extended codes Diesel does not expose: a write that a
/// file-size limit or a quota cut short is IOERR_WRITE, not FULL).
fn is_storage_error(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(_, info) => {
            info.message() == "database or disk is full" || info.message() == "disk I/O error"
        }
        // SQLite rolls back by itself after a failed write; Diesel's ROLLBACK then fails.
        DieselError::RollbackErrorOnCommit { commit_error, .. } => is_storage_error(commit_error),
        _ => false,
    }
}

impl Error {
    /// [`Error::Io`] naming `path` with the OS's "too many open files", when that is why
    /// SQLite could not open it (SQLite says only "unable to open database file").
    #[cfg(feature = "sqlite")]
    fn out_of_descriptors(path: &std::path::Path) -> Option<Self> {
        crate::sqlite::files::out_of_descriptors().map(|source| Error::Io {
            operation: FileOperation::OpenDatabase,
            path: path.to_owned(),
            source,
        })
    }

    /// SQLite could not open `path`: [`Error::Io`] with the OS's "too many open files" when
    /// that is why, else [`Error::Open`].
    #[cfg(feature = "sqlite")]
    pub(crate) fn open_failed(path: &std::path::Path, source: diesel::ConnectionError) -> Self {
        Self::out_of_descriptors(path).unwrap_or_else(|| Error::Open {
            path: path.to_owned(),
            source,
        })
    }

    /// SQLite's "file is not a database" (SQLITE_NOTADB) and "database disk image is
    /// malformed" (SQLITE_CORRUPT), met by the first statements that read `path`, as the
    /// typed errors that name the file, and its "unable to open database file" as
    /// [`Error::Io`] when the process is out of file descriptors; any other error as it is.
    pub(crate) fn naming_bad_file(self, path: &std::path::Path) -> Self {
        let Error::Query {
            source: DieselError::DatabaseError(_, info),
            ..
        } = &self
        else {
            return self;
        };
        let reason = format!("SQLite says \"{}\"", info.message());
        match info.message() {
            #[cfg(feature = "sqlite")]
            "unable to open database file" => Self::out_of_descriptors(path).unwrap_or(self),
            "file is not a database" => Error::NotADatabase {
                path: path.to_owned(),
                reason,
            },
            "database disk image is malformed" => Error::Corrupt {
                path: path.to_owned(),
                reason,
            },
            _ => self,
        }
    }
}

/// The messages SQLite gives the transient lock conditions. Diesel (2.4 as 2.3) maps every
/// one of them to `DatabaseErrorKind::Unknown` and does not put SQLite's extended result
/// code in its error, so the message is all an error value has to go by.
///
/// - `database is locked`: SQLITE_BUSY and its extended codes BUSY_RECOVERY (another process
///   is rebuilding the WAL index), BUSY_SNAPSHOT (a read transaction tried to write after
///   another connection committed) and BUSY_TIMEOUT; also a COMMIT that must wait for
///   readers in rollback-journal mode.
/// - `database table is locked` (SQLITE_LOCKED, shared-cache table locks, which append
///   `: <table>`), `database schema is locked` (SQLITE_LOCKED_SHAREDCACHE on the schema).
/// - `locking protocol` (SQLITE_PROTOCOL): a WAL lock race that SQLite gave up on.
/// - `database schema has changed` (SQLITE_SCHEMA): another process migrated between
///   prepare and step more often than SQLite re-prepares by itself.
const LOCK_MESSAGES: [&str; 5] = [
    "database is locked",
    "database table is locked",
    "database schema is locked",
    "locking protocol",
    "database schema has changed",
];

/// Whether a Diesel error is one of SQLite's transient lock errors: "database is locked"
/// (SQLITE_BUSY and its extended codes), "database table is locked" and "database schema is
/// locked" (SQLITE_LOCKED), "locking protocol" (SQLITE_PROTOCOL) and "database schema has
/// changed" (SQLITE_SCHEMA), however Diesel wrapped them (a failed COMMIT included).
/// Everything else (constraint violations, syntax errors, "file is not a database", a full
/// disk) is not a lock error.
///
/// Diesel's error keeps only the message of SQLite's, so this goes by the message, and a
/// trigger's `RAISE(ABORT, 'database is locked')` looks like a lock to it (so does
/// [`Error::is_lock_error`] of the error a `write` returns for it). `write` and `read` do not
/// rely on it for their closures' statements: they read SQLite's result code itself, and
/// return such a trigger's error at once.
pub fn is_lock_error(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(_, info) => is_lock_message(info.message()),
        // Diesel tried to roll back after a failed COMMIT: the COMMIT's error is the cause.
        DieselError::RollbackErrorOnCommit { commit_error, .. } => is_lock_error(commit_error),
        _ => false,
    }
}

fn is_lock_message(message: &str) -> bool {
    LOCK_MESSAGES
        .iter()
        .any(|lock| message == *lock || message.starts_with(&format!("{lock}:")))
}

/// "a: b: c" for an error and its sources, as the retry events log it.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = Escaped::new(&error.to_string()).to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += ": ";
        text += &Escaped::new(&cause.to_string()).to_string();
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind};

    #[derive(Debug)]
    struct Info(&'static str);

    impl DatabaseErrorInformation for Info {
        fn message(&self) -> &str {
            self.0
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            None
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    fn db_error(kind: DatabaseErrorKind, message: &'static str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(Info(message)))
    }

    #[test]
    fn sqlite_lock_messages_are_lock_errors() {
        for message in [
            "database is locked",
            "database table is locked",
            "database table is locked: artifacts",
            "database schema is locked: main",
            "locking protocol",
            "database schema has changed",
        ] {
            assert!(
                is_lock_error(&db_error(DatabaseErrorKind::Unknown, message)),
                "{message}"
            );
        }
    }

    #[test]
    fn other_errors_are_not_lock_errors() {
        for (kind, message) in [
            (DatabaseErrorKind::Unknown, "file is not a database"),
            (DatabaseErrorKind::Unknown, "database or disk is full"),
            (
                DatabaseErrorKind::Unknown,
                "attempt to write a readonly database",
            ),
            (DatabaseErrorKind::Unknown, "table artifacts already exists"),
            (
                DatabaseErrorKind::UniqueViolation,
                "UNIQUE constraint failed: versions.version",
            ),
            // A message that merely contains the words is not SQLite's lock message.
            (
                DatabaseErrorKind::Unknown,
                "no such table: database is locked",
            ),
        ] {
            assert!(!is_lock_error(&db_error(kind, message)), "{message}");
        }
        assert!(!is_lock_error(&DieselError::NotFound));
        assert!(!is_lock_error(&DieselError::RollbackTransaction));
    }

    #[test]
    fn busy_commit_with_failed_rollback_is_a_lock_error() {
        let error = DieselError::RollbackErrorOnCommit {
            rollback_error: Box::new(db_error(
                DatabaseErrorKind::Unknown,
                "cannot rollback - no transaction is active",
            )),
            commit_error: Box::new(db_error(DatabaseErrorKind::Unknown, "database is locked")),
        };
        assert!(is_lock_error(&error));
    }

    #[test]
    fn disk_full_and_io_errors_are_storage_errors_not_lock_errors() {
        for message in ["database or disk is full", "disk I/O error"] {
            let error = Error::from(db_error(DatabaseErrorKind::Unknown, message));
            assert!(matches!(error, Error::Storage { .. }), "{message}");
            assert!(!error.is_lock_error());
        }
        let commit = DieselError::RollbackErrorOnCommit {
            rollback_error: Box::new(db_error(
                DatabaseErrorKind::Unknown,
                "cannot rollback - no transaction is active",
            )),
            commit_error: Box::new(db_error(DatabaseErrorKind::Unknown, "disk I/O error")),
        };
        assert!(matches!(Error::from(commit), Error::Storage { .. }));
        let other = Error::from(db_error(DatabaseErrorKind::Unknown, "no such table: x"));
        assert!(matches!(other, Error::Query { .. }));
    }

    #[test]
    fn messages_are_one_short_clause_and_refusals_carry_their_remedy_as_a_hint() {
        let path = || PathBuf::from("/srv/app.db");
        let refusals = [
            Error::JournalMode {
                path: path(),
                expected: JournalMode::Delete,
                actual: JournalMode::Wal,
            },
            Error::JournalMode {
                path: path(),
                expected: JournalMode::Wal,
                actual: JournalMode::Delete,
            },
            Error::NonTransactionalMigration { name: "m".into() },
            Error::Migration {
                name: "m".into(),
                source: "no such table: nope".into(),
            },
            Error::UnknownMigrations {
                path: path(),
                versions: vec!["2099".into()],
            },
            Error::EditedMigrations {
                path: path(),
                names: vec!["m".into()],
            },
            Error::Corrupt {
                path: path(),
                reason: "short".into(),
            },
            Error::ReadOnlyDirectory { path: path() },
            Error::ReadOnlyFile { path: path() },
            Error::ForeignDatabase {
                path: path(),
                expected: 1,
                found: 2,
            },
            Error::NetworkFilesystem {
                path: path(),
                filesystem: "NFS",
                magic: 0x6969,
            },
        ];
        for error in &refusals {
            let text = error.to_string();
            assert!(!text.contains(';') && text.len() < 120, "{text}");
            assert!(error.hint().is_some_and(|h| h.len() > 20), "{text}");
        }
        // The two journal-mode refusals say different things.
        assert_ne!(refusals[0].hint(), refusals[1].hint());
        assert_eq!(
            refusals[0].to_string(),
            "database /srv/app.db is in journal mode wal, expected delete"
        );
        // Errors without a remedy of their own have no hint.
        let locked: Error = db_error(DatabaseErrorKind::Unknown, "database is locked").into();
        assert_eq!(locked.hint(), None);
        assert_eq!(locked.to_string(), "query failed");
    }

    #[test]
    fn crate_error_and_wrapping_errors_are_classified_through_the_chain() {
        let locked: Error = db_error(DatabaseErrorKind::Unknown, "database is locked").into();
        assert!(locked.is_lock_error());
        assert!(crate::sqlite::codes::lock_in_chain(&locked).is_some());

        #[derive(Debug, thiserror::Error)]
        enum AppError {
            #[error("storage")]
            Storage(#[from] DieselError),
            #[error("domain rule broken")]
            Domain,
        }
        let wrapped = AppError::from(db_error(DatabaseErrorKind::Unknown, "database is locked"));
        assert!(crate::sqlite::codes::lock_in_chain(&wrapped).is_some());
        assert!(crate::sqlite::codes::lock_in_chain(&AppError::Domain).is_none());

        let constraint: Error = db_error(DatabaseErrorKind::UniqueViolation, "UNIQUE").into();
        assert!(!constraint.is_lock_error());
        let exhausted = Error::Busy {
            operation: Operation::Write,
            attempts: 3,
            elapsed: Duration::from_secs(1),
            source: Box::new(locked),
            holders: Vec::new(),
        };
        assert!(exhausted.is_lock_error());
        assert_eq!(
            exhausted.to_string(),
            "write gave up after 3 attempts in 1.0 s: the database stayed locked"
        );
    }
}
