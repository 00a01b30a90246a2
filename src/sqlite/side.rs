//! The files SQLite and the layer keep next to a database.

use std::path::{Path, PathBuf};

/// `<database><suffix>`: `-journal`, `-wal` and `-shm` (SQLite's), `-lock` (the write
/// queue's).
pub(crate) fn side_file(database: &Path, suffix: &str) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The longest file name most filesystems take (`NAME_MAX`): the database's name and the
/// suffixes of the files made beside it must fit in it.
pub(crate) const NAME_MAX: usize = 255;

/// Removes the file at `path` and the side files SQLite may have left beside it (`-journal`,
/// `-wal`, `-shm`): a private file of the layer's (a backup's temporary copy, a new
/// database's private name) that nobody else uses. What is not there is no error.
pub(crate) fn remove_with_side_files(path: &Path) {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let _ = std::fs::remove_file(side_file(path, suffix));
    }
}
