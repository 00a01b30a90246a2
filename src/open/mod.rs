//! Opening has one home: target, preflight, first connection, what the file records, the
//! journal mode, the migrations (the handle builds its pool later, when it first needs one).

pub(crate) mod checksums;
#[cfg(feature = "sqlite")]
mod filesystem;
pub(crate) mod plan;
#[cfg(feature = "sqlite")]
mod preflight;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
mod target;
#[cfg(feature = "sqlite")]
mod wal;

#[cfg(feature = "sqlite")]
pub(crate) use filesystem::Filesystem;
pub(crate) use plan::Source;
#[cfg(feature = "sqlite")]
pub(crate) use plan::State;
#[cfg(feature = "sqlite")]
pub(crate) use target::{Access, Target};
#[cfg(feature = "sqlite")]
pub(crate) use wal::read as read_journal_mode;
