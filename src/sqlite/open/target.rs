//! What a path given to [`Options::open`](crate::Options::open) or
//! [`Status::read`](crate::Status::read) names, decided once: a file (absolute, with the
//! `file:` URI SQLite is handed and the side files next to it) or a private in-memory
//! database.

use std::path::{Path, PathBuf};

use crate::error::{Error, FileOperation, Result};
use crate::sqlite::side::side_file;

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
    /// `ro` and `immutable=1`: read the file alone, without locks and without the WAL's
    /// index (`-shm`), for a WAL database no connection has open (no `-shm`) in a directory
    /// this user may not write (SQLite cannot create the index there). The caller checks
    /// that nothing changed the file meanwhile.
    Immutable,
}

const MEMORY: &str = ":memory:";

impl Target {
    /// `":memory:"` is the in-memory database; anything else a file, made absolute (so that a
    /// later `chdir` cannot change which file the pool opens) and checked to be a path SQLite
    /// can be handed. The URL forms a `DATABASE_URL` often has (`sqlite://PATH`,
    /// `sqlite:PATH`, `file:PATH`) name the file `PATH`; URI parameters (`?`, `#`) and other
    /// engines' URLs are refused, not taken for a file name.
    pub(crate) fn new(given: &Path) -> Result<Self> {
        let invalid = |reason| Error::InvalidPath {
            path: given.to_owned(),
            reason,
        };
        let text = given
            .to_str()
            .ok_or_else(|| invalid("is not valid UTF-8"))?;
        if text.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if ["postgres://", "postgresql://", "mysql://"]
            .iter()
            .any(|scheme| text.starts_with(scheme))
        {
            return Err(invalid("is the URL of another database engine"));
        }
        // A PostgreSQL connection string a careless hand typed for a path: it would become a
        // file of that name (the password in it). Refused, shown without the password.
        if let Some(reason) = postgres_lookalike(text) {
            return Err(Error::InvalidPath {
                path: PathBuf::from(crate::url::redact_keywords(text)),
                reason,
            });
        }
        let text = ["sqlite://", "sqlite:", "file:"]
            .iter()
            .find_map(|scheme| text.strip_prefix(scheme))
            .unwrap_or(text);
        if text == MEMORY {
            return Ok(Target::Memory);
        }
        if text.is_empty() {
            return Err(invalid("is empty"));
        }
        if text.contains(['?', '#']) {
            return Err(invalid(
                "has URI parameters (? or #): the layer sets the open mode itself",
            ));
        }
        let path = std::path::absolute(text).map_err(|source| Error::Io {
            operation: FileOperation::ResolvePath,
            path: given.to_owned(),
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
                    Access::Immutable => "ro&immutable=1",
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
        Some(side_file(path, suffix))
    }
}

/// Why `text` is a PostgreSQL connection string rather than a path: `postgres:` or
/// `postgresql:` without `//`, or libpq's `keyword=value` form (`dbname=app user=app`).
fn postgres_lookalike(text: &str) -> Option<&'static str> {
    let lower = text.trim_start().to_ascii_lowercase();
    if lower.starts_with("postgres:") || lower.starts_with("postgresql:") {
        return Some("is a PostgreSQL URL without its // (write postgres://...)");
    }
    const KEYWORDS: [&str; 12] = [
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "sslmode",
        "service",
        "connect_timeout",
        "application_name",
        "target_session_attrs",
    ];
    let keyword = |token: &str| {
        token
            .split_once('=')
            .is_some_and(|(key, _)| KEYWORDS.contains(&key.trim().to_ascii_lowercase().as_str()))
    };
    text.split_whitespace()
        .any(keyword)
        .then_some("is a PostgreSQL keyword/value connection string (write postgres://...)")
}

/// `file://` (an empty authority) and the absolute path, with the characters SQLite's URI
/// parser would read as syntax escaped. The empty authority keeps a path that starts with
/// `//` a path: `file://abs/x.db` would name a host `abs`.
fn file_uri(path: &str) -> String {
    let mut uri = String::from("file://");
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
        // A file name with an = that is no libpq keyword stays a file.
        assert!(Target::new(Path::new("/tmp/a=b.db")).is_ok());
        assert!(matches!(
            Target::new(Path::new("dbname=sec user=app password=SECRET")),
            Err(Error::InvalidPath { path, .. }) if !path.to_str().unwrap().contains("SECRET")
        ));
        let target = Target::new(Path::new("/tmp/a b/x.db")).unwrap();
        assert_eq!(target.url(Access::Create), "file:///tmp/a b/x.db?mode=rwc");
        let target = Target::new(Path::new("/tmp/50%.db")).unwrap();
        assert_eq!(target.url(Access::ReadOnly), "file:///tmp/50%25.db?mode=ro");
        assert_eq!(file_uri("/a?b#c"), "file:///a%3Fb%23c");
        // A path beginning with // stays a path, not a host.
        let target = Target::new(Path::new("//tmp/x.db")).unwrap();
        assert_eq!(target.url(Access::Create), "file:////tmp/x.db?mode=rwc");
    }

    #[test]
    fn url_forms_name_the_file_and_parameters_or_other_engines_are_refused() {
        for given in ["sqlite:///tmp/x.db", "sqlite:/tmp/x.db", "file:/tmp/x.db"] {
            let target = Target::new(Path::new(given)).unwrap();
            assert_eq!(target.path(), Path::new("/tmp/x.db"), "{given}");
        }
        assert!(Target::new(Path::new("sqlite::memory:"))
            .unwrap()
            .is_memory());
        for (given, reason) in [
            ("", "is empty"),
            ("sqlite://", "is empty"),
            ("file:x.db?mode=ro", "URI parameters"),
            ("x.db?cache=shared", "URI parameters"),
            ("x.db#frag", "URI parameters"),
            ("postgres://u@h/db", "another database engine"),
            ("postgres:sec", "without its //"),
            ("PostgreSQL:sec", "without its //"),
            ("dbname=sec user=app password=SECRET", "keyword/value"),
            ("host = /tmp port=5432", "keyword/value"),
        ] {
            match Target::new(Path::new(given)) {
                Err(Error::InvalidPath { reason: r, .. }) => {
                    assert!(r.contains(reason), "{given}: {r}")
                }
                other => panic!("{given}: {other:?}"),
            }
        }
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
