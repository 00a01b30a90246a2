//! The r2d2 hook that prepares every pooled connection.

use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::CustomizeConnection;
use diesel::SqliteConnection;

use crate::error::{Error, Operation};
use crate::options::Options;
use crate::sqlite::closing::OpenConnections;

/// Applies [`Options`]' per-connection pragmas to every connection an r2d2 pool opens,
/// `busy_timeout` first.
///
/// It takes no write lock (the journal mode is switched once, at
/// [`Database::open`](crate::Database::open), not here). r2d2 runs it on its own threads and
/// keeps only a string of its error, so the real cause is logged with `tracing` first.
///
/// Use it directly when you build your own pool:
/// ```
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel::SqliteConnection;
/// use sqlite_persistence::{ConnectionCustomizer, Options};
///
/// let pool = Pool::builder()
///     .connection_customizer(Box::new(ConnectionCustomizer::new(&Options::new())))
///     .build_unchecked(ConnectionManager::<SqliteConnection>::new(":memory:"));
/// # let _ = pool;
/// ```
#[derive(Debug, Clone)]
pub struct ConnectionCustomizer {
    pragmas: String,
    /// A rollback journal mode other than DELETE (TRUNCATE, PERSIST), which is each
    /// connection's own setting: put on every connection of a file not in WAL.
    rollback_journal: Option<crate::pragma::JournalMode>,
    /// The checkpoint hook and read state each connection gets.
    hooks: crate::sqlite::codes::Hooks,
    /// A `Database`'s count of its pool's open connections.
    open: Option<Arc<OpenConnections>>,
}

impl ConnectionCustomizer {
    /// A customizer that applies `options`' pragmas.
    ///
    /// Each connection it prepares also records SQLite's extended result code of its failed
    /// statements (read through the handle Diesel hands out), to tell a lock error from a
    /// trigger that raises the same message, and gets the layer's migration guard (an
    /// authorizer), its checkpoint hook and, with [`Options::max_read_age`], its read cap.
    /// Nothing else in the process is touched: other connections are left as they are.
    pub fn new(options: &Options) -> Self {
        use crate::pragma::JournalMode;
        Self {
            pragmas: options.connection_pragmas(),
            rollback_journal: matches!(
                options.journal_mode,
                JournalMode::Truncate | JournalMode::Persist
            )
            .then_some(options.journal_mode),
            hooks: crate::sqlite::codes::Hooks {
                checkpoints: options.checkpoint_warning(),
                read_age: options.max_read_age.is_some(),
            },
            open: None,
        }
    }

    /// Also counts every connection it prepares in `open` until SQLite has closed it.
    pub(crate) fn counting(mut self, open: Arc<OpenConnections>) -> Self {
        self.open = Some(open);
        self
    }

    /// Applies the pragmas to one connection, and has it record the result code of its
    /// failed statements (Diesel's default instrumentation, if one is set, still sees every
    /// event).
    ///
    /// # Errors
    /// [`Error::Query`] if SQLite rejects a pragma, for example "file is not a database"
    /// (the pragmas after `busy_timeout` are the first statements that read the file).
    pub fn apply(&self, conn: &mut SqliteConnection) -> Result<(), Error> {
        self.set(conn)
            .map_err(|source| Error::query(Operation::ApplyPragmas, source))?;
        crate::sqlite::codes::attach(conn, self.hooks);
        Ok(())
    }

    /// The pragmas, and a rollback journal mode of each connection's own (on a file that is
    /// not in WAL: asking a WAL file for another mode would switch it out of WAL).
    fn set(&self, conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
        conn.batch_execute(&self.pragmas)?;
        if let Some(mode) = self.rollback_journal {
            if crate::sqlite::open::read_journal_mode(conn)? != "wal" {
                crate::sqlite::open::switch_journal_mode(conn, mode)?;
            }
        }
        Ok(())
    }
}

impl ConnectionCustomizer {
    /// Restores the settings the layer relies on where the connection's user assigned one
    /// (inside a `write` or `read`, or on a connection taken from the pool): the options'
    /// pragmas, `locking_mode` normal (the exclusive lock let go), and the checkpoint hook
    /// that an assigned `wal_autocheckpoint` replaced. Costs nothing when nothing was
    /// assigned.
    ///
    /// # Errors
    /// SQLite's, if a pragma fails; an error too where the user changed what cannot be put
    /// back (a temporary object, an attached database, another pragma): the connection is
    /// then not to be used again.
    pub(crate) fn restore(&self, conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
        let assigned = crate::sqlite::codes::take_assigned(conn);
        if assigned == 0 {
            return Ok(());
        }
        if assigned & crate::sqlite::guard::DISCARD != 0 {
            // Nothing to put back: the connection is closed, a new one takes its place.
            return Err(diesel::result::Error::QueryBuilderError(
                "the connection's schema or settings were changed for good (a temporary \
                 object, an attached database, or a pragma the layer does not restore)"
                    .into(),
            ));
        }
        tracing::debug!("restoring the connection's settings after an assigned pragma");
        crate::sqlite::guard::own(|| {
            conn.batch_execute(&format!(
                "{}PRAGMA locking_mode = NORMAL;\nPRAGMA schema_version;\n",
                self.pragmas
            ))
        })?;
        if assigned & crate::sqlite::guard::WAL_HOOK != 0 {
            if let Some(warn_bytes) = self.hooks.checkpoints {
                crate::sqlite::checkpoint::install(conn, warn_bytes);
            }
        }
        Ok(())
    }
}

/// Runs `f` with SQLite's busy handler waiting at most `left` (when that is shorter than
/// `busy_timeout`, the connection's setting), so that an attempt begun just before the
/// retry deadline does not block a whole `busy_timeout` past it. Costs a pragma only near
/// the deadline.
pub(crate) fn within<T>(
    conn: &mut SqliteConnection,
    busy_timeout: Duration,
    left: Duration,
    f: impl FnOnce(&mut SqliteConnection) -> T,
) -> T {
    if left >= busy_timeout {
        return f(conn);
    }
    let set = |conn: &mut SqliteConnection, timeout: Duration| {
        let millis = timeout.as_millis().max(1);
        let set = crate::sqlite::guard::own(|| {
            conn.batch_execute(&format!("PRAGMA busy_timeout = {millis}"))
        });
        if let Err(error) = set {
            tracing::warn!(error = %crate::escaped::Escaped::new(&error.to_string()), "cannot set busy_timeout");
        }
    };
    set(conn, left);
    let value = f(conn);
    set(conn, busy_timeout);
    value
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for ConnectionCustomizer {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        // The connection the open prepared (with `apply`) and hands to the pool first has
        // the pragmas and the hooks already.
        let prepared = crate::sqlite::codes::is_prepared(conn);
        let prepare = |conn: &mut SqliteConnection| {
            self.set(conn)
                .map(|()| crate::sqlite::codes::attach(conn, self.hooks))
        };
        (if prepared { Ok(()) } else { prepare(conn) })
            .and_then(|()| match &self.open {
                Some(open) => open.track(conn),
                None => Ok(()),
            })
            .map_err(|source| {
                tracing::error!(
                    operation = Operation::ApplyPragmas.as_str(),
                    error = %crate::escaped::Escaped::new(&source.to_string()),
                    "cannot prepare a pooled connection"
                );
                diesel::r2d2::Error::QueryError(source)
            })
    }
}
