//! What a path given to [`Options::open`](crate::Options::open) or
//! [`Status::read`](crate::Status::read) names, decided once: a file (absolute, with the
//! `file:` URI SQLite is handed and the side files next to it) or a private in-memory
//! database.

use std::path::{Path, PathBuf};

use crate::error::{Error, FileOperation, Result};

/// The database a path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A file on disk.
    File {
        /// Absolute.
        path: PathBuf,
        /// The `file:` URI of `path`, without its `?mode=` (see [`Target::url`]).
        uri: String,
    },
    /// `:memory:`: one private database per connection.
    Memory,
}

/// How SQLite opens the file: the `mode` parameter of its URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `rwc`: read and write, create if missing.
    Create,
    /// `ro`: read an existing file; never write, checkpoint or delete anything.
    ReadOnly,
}

const MEMORY: &str = ":memory:";

impl Target {
    /// `":memory:"` is the in-memory database; anything else a file, made absolute (so that a
    /// later `chdir` cannot change which file the pool opens) and checked to be a path SQLite
    /// can be handed.
    pub(crate) fn new(path: &Path) -> Result<Self> {
        if path == Path::new(MEMORY) {
            return Ok(Target::Memory);
        }
        let text = path
            .to_str()
            .filter(|text| !text.is_empty() && !text.contains('\0'))
            .ok_or_else(|| Error::InvalidPath {
                path: path.to_owned(),
            })?;
        let path = std::path::absolute(text).map_err(|source| Error::Io {
            operation: FileOperation::ResolvePath,
            path: path.to_owned(),
            source,
        })?;
        let uri = file_uri(path.to_str().expect("an absolute UTF-8 path stays UTF-8"));
        Ok(Target::File { path, uri })
    }

    /// The file, or `:memory:`: what errors and `tracing` events name.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Target::File { path, .. } => path,
            Target::Memory => Path::new(MEMORY),
        }
    }

    /// Whether this is the in-memory database.
    pub(crate) fn is_memory(&self) -> bool {
        matches!(self, Target::Memory)
    }

    /// What to hand `SqliteConnection::establish`: a `file:` URI, so that no file name is
    /// ever read as an option, with SQLite's open mode.
    pub(crate) fn url(&self, access: Access) -> String {
        match self {
            Target::File { uri, .. } => format!(
                "{uri}?mode={}",
                match access {
                    Access::Create => "rwc",
                    Access::ReadOnly => "ro",
                }
            ),
            Target::Memory => MEMORY.to_owned(),
        }
    }

    /// A file next to the database, `<database><suffix>` (`-wal`, `-shm`, `-lock`); `None`
    /// in memory.
    pub(crate) fn side_file(&self, suffix: &str) -> Option<PathBuf> {
        let Target::File { path, .. } = self else {
            return None;
        };
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        Some(PathBuf::from(name))
    }
}

/// `file:` and the path with the characters SQLite's URI parser would read as syntax escaped.
fn file_uri(path: &str) -> String {
    let mut uri = String::from("file:");
    for c in path.chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3F"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_escape_what_sqlite_would_read_as_uri_syntax() {
        let target = Target::new(Path::new("/tmp/a b/x.db")).unwrap();
        assert_eq!(target.url(Access::Create), "file:/tmp/a b/x.db?mode=rwc");
        let target = Target::new(Path::new("/tmp/50%?#.db")).unwrap();
        assert_eq!(
            target.url(Access::ReadOnly),
            "file:/tmp/50%25%3F%23.db?mode=ro"
        );
        assert!(matches!(
            Target::new(Path::new("")),
            Err(Error::InvalidPath { .. })
        ));
    }

    #[test]
    fn memory_is_decided_once_and_has_no_side_files() {
        let memory = Target::new(Path::new(":memory:")).unwrap();
        assert!(memory.is_memory());
        assert_eq!(memory.url(Access::Create), ":memory:");
        assert_eq!(memory.path(), Path::new(":memory:"));
        assert_eq!(memory.side_file("-wal"), None);
    }

    #[test]
    fn a_relative_file_is_made_absolute_with_its_side_files_beside_it() {
        let target = Target::new(Path::new("app.db")).unwrap();
        assert!(!target.is_memory());
        assert!(target.path().is_absolute());
        assert!(target.path().ends_with("app.db"));
        let lock = target.side_file("-lock").unwrap();
        assert_eq!(lock.parent(), target.path().parent());
        assert!(lock.ends_with("app.db-lock"));
    }
}
