//! Opening a SQLite database has one home: target, preflight, first connection, what the
//! file records, the journal mode, the migrations (the handle builds its pool later, when
//! it first needs one).

mod filesystem;
mod init;
mod opening;
mod preflight;
mod target;
mod wal;

pub(crate) use filesystem::Filesystem;
pub(crate) use preflight::{check_side_files, regular_or_missing};
pub(crate) use target::{Access, Target};
pub(crate) use wal::read as read_journal_mode;
pub(crate) use wal::switch as switch_journal_mode;
