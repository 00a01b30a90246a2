//! The command line over `sqlite-persistence`: its demo store (the catalog), the plain
//! Diesel baseline, and the commands, load tests among them. Not published: the binary
//! `sqlite-persistence` and this package's tests are what it is for. It uses only the
//! library's public API.
#![warn(missing_docs)]

pub mod catalog;
pub mod commands;
pub mod error;
pub mod harness;
pub mod output;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod plain;
pub mod schema;

pub use catalog::{validate_artifact_name, Catalog, Recorded, APPLICATION_ID, MIGRATIONS};
pub use error::{Error, Result};
pub use plain::PlainCatalog;
