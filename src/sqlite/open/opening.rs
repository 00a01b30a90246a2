//! The SQLite opening flow: target, preflight, first connection, what the file records, the
//! journal mode, the migrations; the connection is then the handle's (its pool comes later,
//! see `pool::Connections`).

use super::{init, preflight, wal, Access, Target};
use crate::migrate::{Source, State};
use std::path::Path;
use std::sync::Arc;

use diesel::migration::MigrationSource;
use diesel::sqlite::Sqlite;
use diesel::{Connection, SqliteConnection};

use crate::error::{Error, Operation, Result};
use crate::operation::DB_SYSTEM;
use crate::options::Options;
use crate::pragma::JournalMode;
use crate::retry::{retry_locked, Attempt, Clock, Deadline, RetryPolicy, SystemClock, Try};
use crate::sqlite::closing::OpenConnections;
use crate::sqlite::customizer::{within, ConnectionCustomizer};
use crate::sqlite::database::Database;
use crate::sqlite::pool::{Connections, Recipe};
use crate::sqlite::queue::{locked, WriteQueue};

impl Options {
    /// Opens (creating if needed) the database at `path` with these options and applies
    /// `migrations`' pending migrations. `":memory:"` opens a private in-memory database
    /// (its pool holds its one connection).
    ///
    /// In order: the migration source is listed; the file is checked before SQLite opens it
    /// (a regular file or none, its directory exists and is writable, the filesystem is not
    /// a network one under WAL, an existing file is writable and at least one page long);
    /// a missing one is made whole under a private name beside it (`.NAME.init`, with
    /// [`Options::create_mode`]), migrated, and linked into place, so that a refusal or a
    /// failed first batch leaves nothing behind (processes making it at once take turns, one
    /// makes it, the others use it); a dedicated connection opens it and gets the pragmas; what the file records (application id,
    /// applied migrations and their checksums) is read and checked; the journal mode is put
    /// in force (see [`Options::journal_mode`]); the migrations are applied atomically and
    /// exactly once across processes; then the pool is built. Every refusal comes before
    /// the first write, so a refused file is left byte-for-byte as it was.
    ///
    /// # Errors
    /// [`Error::MigrationSource`]; [`Error::InvalidPath`], [`Error::IsADirectory`],
    /// [`Error::MissingDirectory`], [`Error::Open`]; [`Error::NetworkFilesystem`];
    /// [`Error::ReadOnlyDirectory`], [`Error::ReadOnlyFile`]; [`Error::NotADatabase`],
    /// [`Error::Corrupt`]; [`Error::ForeignDatabase`]; [`Error::UnknownMigrations`],
    /// [`Error::EditedMigrations`], [`Error::NonTransactionalMigration`];
    /// [`Error::JournalMode`] when the file stays in another mode; [`Error::Migration`]
    /// (nothing of the batch is applied); [`Error::Storage`] when the disk is full;
    /// [`Error::Busy`] when the database stayed locked past the retry deadline.
    ///
    /// # Examples
    /// ```
    /// use diesel_migrations::{embed_migrations, EmbeddedMigrations};
    /// use sqlite_persistence::{JournalMode, Options};
    ///
    /// const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
    ///
    /// # fn main() -> sqlite_persistence::Result<()> {
    /// let db = Options::new().pool_size(4).open(":memory:", MIGRATIONS)?;
    /// assert_eq!(db.journal_mode(), JournalMode::Memory);
    /// assert_eq!(db.applied_at_open().len(), 2);
    /// # Ok(())
    /// # }
    /// ```
    pub fn open<S: MigrationSource<Sqlite>>(
        self,
        path: impl AsRef<Path>,
        migrations: S,
    ) -> Result<Database> {
        let source = Source::list(migrations)?;
        let target = Target::new(path.as_ref())?;
        let opening = Opening {
            target: &target,
            options: &self,
            clock: &SystemClock,
        };
        let open = Arc::new(OpenConnections::default());
        let (connections, setup) = opening.run(&source, &open)?;
        Ok(Database::new(
            connections,
            open,
            target.path().to_owned(),
            self,
            setup.journal_mode,
            setup.applied,
            setup.queue,
        ))
    }
}

/// One open in progress: the target and the options, which every step and every error of
/// the open takes from here.
struct Opening<'a> {
    target: &'a Target,
    options: &'a Options,
    clock: &'a dyn Clock,
}

/// What the set-up on the first connection did.
struct SetUp {
    journal_mode: JournalMode,
    applied: Vec<String>,
    queue: Option<WriteQueue>,
}

impl Opening<'_> {
    fn run(
        &self,
        source: &Source<Sqlite>,
        open: &Arc<OpenConnections>,
    ) -> Result<(Connections, SetUp)> {
        let _span =
            tracing::info_span!("open", path = %crate::escaped::Escaped::path(self.target.path()))
                .entered();
        let customizer = ConnectionCustomizer::new(self.options);
        let memory = self.target.is_memory();
        let url = self.target.url(Access::Create);
        let recipe = Recipe {
            url: url.clone(),
            max_size: if memory { 1 } else { self.options.pool_size },
            wait: self.options.retry.deadline(),
            customizer: customizer.clone().counting(Arc::clone(open)),
            memory,
            open: Arc::clone(open),
        };
        if memory {
            // Each connection to :memory: is its own database: the pool's only one is set
            // up, and is the only one.
            let connections = Connections::memory(recipe)?;
            let mut conn = connections.checkout()?;
            let setup = self.set_up(&mut conn, source)?;
            drop(conn);
            return Ok((connections, setup));
        }
        let started = std::time::Instant::now();
        let missing = preflight::prepare(self.target.path(), self.options)?;
        let mut made_here = None;
        if !missing {
            init::remove_stale(self.target.path());
        }
        if missing {
            // What the migrations alone decide (one that cannot run in a transaction) is
            // refused before anything is created.
            source
                .check(&source.plan(State::default(), self.options), self.options)
                .map_err(|refusal| refusal.at(self.target.path()))?;
            // The turn is held only by a live process making a database (a dead one's lock
            // is gone): it is waited for as long as another process's migrations.
            let wait = self
                .options
                .retry
                .deadline()
                .max(self.options.migration_wait);
            let deadline = started + wait.min(init::LONGEST_WAIT);
            if let init::Made::Here(applied) =
                init::make(self.target, self.options, source, started, deadline)?
            {
                made_here = Some(applied);
            }
        }
        // A dedicated connection: its errors are typed, where r2d2 would keep a string. The
        // customizer guards it (see `guard`): the migrations run on it.
        let mut conn = SqliteConnection::establish(&url)
            .map_err(|source| Error::open_failed(self.target.path(), source))?;
        self.retry(Operation::ApplyPragmas, |_| customizer.apply(&mut conn))?;
        let mut setup = self.set_up(&mut conn, source)?;
        if let Some(applied) = made_here {
            self.log_applied(&applied);
            setup.applied = applied;
        }
        // Counted among the handle's open connections (and closed, checkpointing, when the
        // handle is), then kept for the handle's operations: no pool, and none of its
        // threads, until a second connection is needed at once.
        open.track(&mut conn)
            .map_err(|e| Error::query(Operation::ApplyPragmas, e))?;
        Ok((Connections::new(Some(conn), recipe), setup))
    }

    /// On the first connection: read and check what the file records (its owner, its
    /// migration history) before writing anything, so that a refused file keeps even its
    /// journal mode; then the write queue, the journal mode and the migrations.
    fn set_up(&self, conn: &mut SqliteConnection, source: &Source<Sqlite>) -> Result<SetUp> {
        let plan = self.retry(Operation::ReadMigrationState, |_| {
            source
                .read(conn, self.options)
                .map_err(|e| Error::query(Operation::ReadMigrationState, e))
        })?;
        source
            .check(&plan, self.options)
            .map_err(|refusal| refusal.at(self.target.path()))?;
        let queue = match self.target.side_file("-lock") {
            Some(sidecar) if self.options.fair_queue => {
                WriteQueue::new(self.target.path(), sidecar)
            }
            _ => None,
        };
        let journal_mode = self.journal_mode(conn, queue.as_ref())?;
        let applied = if plan.needs_write() {
            let started = std::time::Instant::now();
            crate::migrate::while_others_migrate(self.options, started, |_, policy| {
                self.migrate(conn, source, queue.as_ref(), policy)
            })?
        } else {
            Vec::new()
        };
        Ok(SetUp {
            journal_mode,
            applied,
            queue,
        })
    }

    /// Puts the file in the options' journal mode and returns the mode in force: read
    /// first, switched only when needed, the answer checked. In-memory databases report
    /// `memory` and cannot be WAL: that is accepted.
    fn journal_mode(
        &self,
        conn: &mut SqliteConnection,
        queue: Option<&WriteQueue>,
    ) -> Result<JournalMode> {
        let wanted = self.options.journal_mode;
        let found = self.retry(Operation::ReadJournalMode, |_| {
            wal::read(conn).map_err(|e| Error::query(Operation::ReadJournalMode, e))
        })?;
        let found = self.parse_mode(found)?;
        match wal::decide(found, wanted) {
            wal::Decision::Keep(mode) => return Ok(mode),
            wal::Decision::Refuse => return Err(self.mode_error(found)),
            wal::Decision::Switch => {}
        }
        let answer = locked(
            queue,
            &self.options.retry,
            Deadline::now(self.clock, &self.options.retry),
            Operation::SwitchJournalMode,
            self.target.path(),
            |_| {
                wal::switch(conn, wanted).map_err(|e| {
                    Attempt::<Error>::Layer(Error::query(Operation::SwitchJournalMode, e))
                })
            },
        )?
        .value;
        match self.parse_mode(answer)? {
            mode if mode == wanted => {
                tracing::info!(journal_mode = %mode, "journal mode switched");
                Ok(mode)
            }
            other => Err(self.mode_error(other)),
        }
    }

    /// Applies what the plan says in one `BEGIN IMMEDIATE` under the write turn, retried as a
    /// whole on lock errors; returns the names applied (empty if another process did it).
    fn migrate(
        &self,
        conn: &mut SqliteConnection,
        source: &Source<Sqlite>,
        queue: Option<&WriteQueue>,
        policy: &RetryPolicy,
    ) -> Result<Vec<String>> {
        let applied = locked(
            queue,
            policy,
            Deadline::now(self.clock, policy),
            Operation::Migrate,
            self.target.path(),
            |attempt| {
                within(conn, self.options.busy_timeout, attempt.left, |conn| {
                    conn.immediate_transaction(|conn| source.apply(conn, self.target, self.options))
                })
                .map_err(Attempt::<Error>::Layer)
            },
        )?
        .value;
        self.log_applied(&applied);
        Ok(applied)
    }

    /// The `info` event of a batch applied (none for an empty one).
    fn log_applied(&self, applied: &[String]) {
        if !applied.is_empty() {
            tracing::info!(
                db.system.name = DB_SYSTEM,
                db.namespace = %crate::escaped::Escaped::path(self.target.path()),
                db.operation.name = Operation::Migrate.as_str(),
                count = applied.len(),
                migrations = %crate::escaped::Escaped::new(&applied.join(", ")),
                "migrations applied"
            );
        }
    }

    /// `attempt` under the retry policy, with SQLite's "not a database" and "malformed" as
    /// the typed errors naming the file.
    fn retry<T>(&self, operation: Operation, attempt: impl FnMut(Try) -> Result<T>) -> Result<T> {
        retry_locked(
            &self.options.retry,
            self.clock,
            operation,
            self.target.path(),
            attempt,
        )
        .map(|success| success.value)
        .map_err(|e| e.naming_bad_file(self.target.path()))
    }

    fn parse_mode(&self, answer: String) -> Result<JournalMode> {
        JournalMode::parse(&answer).ok_or_else(|| Error::UnknownJournalMode {
            path: self.target.path().to_owned(),
            answer,
        })
    }

    fn mode_error(&self, actual: JournalMode) -> Error {
        Error::JournalMode {
            path: self.target.path().to_owned(),
            expected: self.options.journal_mode,
            actual,
        }
    }
}
