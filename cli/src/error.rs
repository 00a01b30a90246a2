//! The command line's own errors: the library's, and what only the command line meets (bad
//! arguments, child processes, the demo store's checks, the plain baseline).

use std::path::PathBuf;

/// Everything a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The library's error, as it is.
    #[error(transparent)]
    Persistence(#[from] sqlite_persistence::Error),

    /// An artifact name the catalog does not accept.
    #[error("invalid artifact name: {reason}")]
    ArtifactName {
        /// Which rule it breaks.
        reason: String,
    },

    /// An argument rejected before anything touched a database.
    #[error("invalid {what}: {reason}")]
    Usage {
        /// What was rejected, such as `stress load`.
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// A file-system call of the command line failed.
    #[error("cannot {operation} {path}")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A database could not be opened for a check.
    #[error("cannot open database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: diesel::ConnectionError,
    },

    /// A statement of the command line's own (a check, the plain baseline) failed.
    #[error("{operation} failed")]
    Query {
        /// The step that failed.
        operation: &'static str,
        /// What Diesel said.
        #[source]
        source: diesel::result::Error,
    },

    /// The plain baseline's pool could not hand out a connection.
    #[error("cannot get a connection from the plain pool")]
    Pool {
        /// r2d2's error.
        #[source]
        source: diesel::r2d2::PoolError,
    },

    /// A step of the plain Diesel baseline failed.
    #[error("{operation} failed")]
    Baseline {
        /// The step.
        operation: &'static str,
        /// What Diesel said.
        #[source]
        source: sqlite_persistence::BoxError,
    },

    /// Child processes of a load test did not start or finish in time.
    #[error("run of processes: {reason}")]
    Run {
        /// What went wrong.
        reason: String,
    },

    /// A read saw a write half done.
    #[error("{artifact} has latest_version {latest} but versions {versions:?}: a partial write is visible")]
    PartialWrite {
        /// The artifact read.
        artifact: String,
        /// Its latest version as read.
        latest: i64,
        /// Its version rows as read.
        versions: Vec<i64>,
    },

    /// Standard output could not be written: a closed pipe, a full disk.
    #[error("cannot write to standard output")]
    Output {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A load test was interrupted (SIGINT, SIGTERM); its processes were stopped and its
    /// temporary files removed.
    #[error("interrupted")]
    Interrupted,

    /// A load test's own side had failures or left an inconsistent file.
    #[error("{what}: sqlite-persistence had failures or an inconsistent file (see above)")]
    NotClean {
        /// `stress` or `soak`.
        what: &'static str,
    },
}

/// `Result` with the command line's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// What to do about it, where the library has a remedy.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Persistence(sqlite_persistence::Error::TransactionPooling { .. }) => Some(
                "if the pooler is meant, pass --transaction-pooling, which keeps no state in \
                 the server's session; or use a URL to the server itself or to a session \
                 pooler (PgBouncer's pool_mode = session)",
            ),
            Error::Persistence(sqlite_persistence::Error::StatementPooling { .. }) => Some(
                "use a URL to the server itself, or to a pooler in session mode (PgBouncer's \
                 pool_mode = session) or transaction mode (pool_mode = transaction, with \
                 --transaction-pooling)",
            ),
            Error::Persistence(error) => error.hint(),
            _ => None,
        }
    }
}

/// "a: b: c" for an error and its sources, as the command line prints it, each escaped.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    use sqlite_persistence::Escaped;
    let mut text = Escaped::new(&error.to_string()).to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += ": ";
        text += &Escaped::new(&cause.to_string()).to_string();
        source = cause.source();
    }
    text
}
