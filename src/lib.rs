//! SQLite for Diesel applications that start many processes at once against one database
//! file (parallel CLI runs, workers, cron jobs, web servers) and must never fail on
//! "database is locked", lose a write, or apply a migration twice.
//!
//! [`Options::open`] (or [`Database::open`] with the defaults) opens a file, puts it in WAL
//! mode once, and applies your embedded migrations atomically and exactly once however many
//! processes start together. [`Database::write`] runs a closure in a write transaction that
//! takes the lock up front (`BEGIN IMMEDIATE`) and runs again as a whole while the database
//! is locked; [`Database::read`] runs one in a read-only snapshot.
//!
//! ```
//! use diesel::prelude::*;
//! use diesel_migrations::{embed_migrations, EmbeddedMigrations};
//! use sqlite_persistence::Options;
//!
//! const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
//!
//! # fn main() -> sqlite_persistence::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("app.db");
//! let db = Options::new().open(&path, MIGRATIONS)?;
//! let value = db.write(|conn| -> sqlite_persistence::Result<i64> {
//!     // Read, then write: safe, because the write lock is held from the start.
//!     diesel::sql_query("INSERT OR IGNORE INTO counters (name) VALUES ('jobs')").execute(conn)?;
//!     diesel::sql_query("UPDATE counters SET value = value + 1 WHERE name = 'jobs'")
//!         .execute(conn)?;
//!     Ok(1)
//! })?;
//! assert_eq!(value, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # What it guarantees
//! - **Opening**: `busy_timeout` is the first pragma on every connection; the journal mode
//!   is read first, switched only when needed, on one connection, under the write turn,
//!   retried with jittered backoff and verified; refusals (not a database, damaged,
//!   read-only, another application's file, a network filesystem, a database migrated by a
//!   newer binary, an edited migration) come before the first write and leave the file
//!   byte-for-byte as it was.
//! - **Migrations**: one `BEGIN IMMEDIATE` re-reads what is applied under the lock and
//!   commits the whole batch, its bookkeeping and the checksum of each migration's SQL, or
//!   none of it. A database with nothing pending takes no write lock.
//! - **Writes**: `BEGIN IMMEDIATE`, retried as a whole on lock errors with a wall-clock
//!   deadline ([`RetryPolicy`]); writers of this crate queue for the lock on a sidecar
//!   file, `<database>-lock`, in arrival order ([`Options::fair_queue`]).
//! - **Embedding**: a nested `write`, `read` or `connection` of the same database on one
//!   thread is refused at once ([`Error::Reentrant`]); dropping the handle, or
//!   [`Database::close`], returns once every connection is closed and the WAL checkpointed.
//! - **Errors** are one [`Error`] enum with context and the cause chain kept;
//!   [`Error::is_lock_error`] tells a lock error from the rest, [`Error::hint`] what to do
//!   about a refusal. Every retry is a `tracing` event (`operation`, `attempt`, `delay_ms`,
//!   `elapsed_ms`, `error`) at `warn`; the library never installs a subscriber.
//!
//! # The exported names
//! | name | what it is |
//! |---|---|
//! | [`Options`] | the builder: pragmas, journal mode, retry policy, migration checks, pool; [`Options::open`] |
//! | [`Database`] | an open database: [`write`](Database::write), [`read`](Database::read), [`connection`](Database::connection) |
//! | [`WriteStats`] | what a [`Database::write_measured`] waited and how many attempts it took |
//! | [`Backup`] | what a [`Database::backup_to`] (a verified online backup) wrote |
//! | [`SqlitePool`], [`PooledSqlite`], [`SqliteManager`] | the r2d2 pool of a `Database`, a connection borrowed from it, and its connection manager |
//! | [`ConnectionCustomizer`] | the r2d2 hook that applies the pragmas, for a pool of your own |
//! | [`JournalMode`], [`Synchronous`], [`TempStore`] | typed pragma values |
//! | [`RetryPolicy`], [`Delays`] | when lock errors are retried, and the schedule of sleeps |
//! | [`Status`], [`Checksums`], [`FileSizes`] | a database's state, read without changing it |
//! | [`Error`], [`Operation`], [`FileOperation`], [`Result`], [`BoxError`] | errors and the steps they name |
//! | [`Holder`], [`HeldLock`] | who held the lock a write gave up on ([`Error::Busy`]) |
//! | [`is_lock_error`] | the one classifier of SQLite's lock errors, for Diesel's error type |
//! | `AsyncDatabase`, `BlockingDatabase` | (feature `tokio`) the same handle for async code, over either engine (`AsyncDatabase<PgDatabase>`): calls run on tokio's blocking threads, bounded by the pool, cancellation-safe, a nested call refused at once |
//! | [`Engine`], [`AnyDatabase`], [`AnyConnection`], [`AnyMigrations`], [`DATABASE_URL`] | the engine a URL's scheme names, and a database of either ([`Options::open_url`], [`Options::open_database_url`]) |
//! | [`redact_url`] | a URL as the layer shows it, without its password |
//! | `PgDatabase`, `PgStatus`, `PgPool`, `PgManager`, `PooledPg`, `PgFailure`, `PgFailureKind` | (feature `postgres`) the same contract on PostgreSQL: `Options::open_postgres`, migrations under an advisory lock, `SERIALIZABLE` writes run again on a conflict, `REPEATABLE READ READ ONLY` reads |
//!
//! # Engines
//! The features choose the engines: `sqlite` (the default) and `postgres`, each of which
//! builds without the other. The engine of a URL is chosen by its scheme alone, never by
//! trying connection types in turn: a path, `sqlite:` or `file:` is SQLite;
//! `postgres://` or `postgresql://` PostgreSQL; any other scheme is refused, naming it.
//!
//! # Platforms
//! Linux, where every test runs. The SQLite engine needs Unix (its write queue, side-file
//! checks and lock holders use POSIX file locks, modes and owners) and does not compile
//! elsewhere; on Unix systems other than Linux, the filesystem check (`statfs`) and the
//! names of lock holders (`/proc/locks`) are left out, and nothing there is tested.
//!
//! The user's guide, with every default and what happens on each fault, is the README;
//! the command line `sqlite-persistence` (load tests, status) is a separate package.
#![warn(missing_docs)]
// `unsafe` lives in one room, `sqlite::ffi`, which allows it on its `mod` line.
#![deny(unsafe_code)]
// A PostgreSQL-only build leaves out the SQLite engine, which alone uses some shared helpers
// (pragma names, the write queue's operation codes, the file-naming error mapping).
#![cfg_attr(not(feature = "sqlite"), allow(dead_code))]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod engine;
mod error;
mod escaped;
mod handle;
mod holders;
mod migrate;
mod operation;
mod options;
#[cfg(feature = "postgres")]
mod postgres;
mod pragma;
mod retry;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "tokio")]
mod tokio;
mod url;

#[cfg(all(feature = "sqlite", not(unix)))]
compile_error!(
    "sqlite-persistence's SQLite engine runs on Unix only (Linux is tested): its write queue, \
     side-file checks and lock holders use POSIX file locks, file modes and owners"
);

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("sqlite-persistence needs an engine: enable the feature `sqlite` or `postgres`");

#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use self::tokio::{AsyncDatabase, BlockingDatabase};
pub use engine::{AnyConnection, AnyDatabase, AnyMigrations, DATABASE_URL};
pub use error::{is_lock_error, BoxError, Error, Result};
pub use escaped::Escaped;
pub use handle::{Checksums, WriteStats};
pub use holders::{HeldLock, Holder};
pub use operation::{FileOperation, Operation};
pub use options::Options;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PgDatabase, PgFailure, PgFailureKind, PgManager, PgPool, PgStatus, PooledPg};
pub use pragma::{JournalMode, Synchronous, TempStore};
pub use retry::{Delays, RetryPolicy};
#[cfg(feature = "sqlite")]
pub use sqlite::backup::Backup;
#[cfg(feature = "sqlite")]
pub use sqlite::customizer::ConnectionCustomizer;
#[cfg(feature = "sqlite")]
pub use sqlite::database::Database;
#[cfg(feature = "sqlite")]
pub use sqlite::pool::{PooledSqlite, SqliteManager, SqlitePool};
#[cfg(feature = "sqlite")]
pub use sqlite::status::{FileSizes, Status};
pub use url::{redact_url, Engine};

/// The README's example, compiled and run as a doctest so that the user's guide stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
