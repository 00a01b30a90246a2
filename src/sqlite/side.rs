//! The files SQLite and the layer keep next to a database.

use std::path::{Path, PathBuf};

/// `<database><suffix>`: `-journal`, `-wal` and `-shm` (SQLite's), `-lock` (the write
/// queue's).
pub(crate) fn side_file(database: &Path, suffix: &str) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}
