#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod catalog;
mod customizer;
mod database;
mod error;
mod fair;
mod filesystem;
mod history;
mod migrate;
mod options;
#[doc(hidden)]
pub mod plain;
mod preflight;
mod retry;
mod schema;
mod status;
mod wal;

pub use catalog::{
    validate_artifact_name, Catalog, Recorded, APPLICATION_ID, MAX_ARTIFACT_NAME, MIGRATIONS,
};
pub use customizer::ConnectionCustomizer;
pub use database::{Database, PooledSqlite, SqlitePool, WriteStats};
pub use error::{error_chain, is_lock_error, BoxError, Error, Result};
pub use options::{JournalMode, Options, Synchronous, TempStore};
pub use retry::{Delays, RetryPolicy};
pub use status::{Checksums, FileSizes, Status};
