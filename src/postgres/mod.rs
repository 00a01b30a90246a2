//! PostgreSQL, behind the same contract as SQLite: open and migrate exactly once, `write`
//! run again as a whole on a conflict, `read` in a snapshot, typed errors, tracing.

mod failure;
mod guard;
mod holders;
mod messages;
mod migrate;
mod outcome;
mod pooler;
mod queue;
mod session;
mod status;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::PgConnection;

pub use failure::{PgFailure, PgFailureKind};
pub use session::{PgManager, PgPool, PooledPg};
pub use status::PgStatus;

use self::outcome::Outcome;
use self::session::{Server, Settings};
use crate::error::{Error, Operation, Result};
use crate::handle::{next_id, Inside, WriteStats};
use crate::holders::{HeldLock, Holder};
use crate::migrate::Source;
use crate::options::Options;
use crate::retry::{
    retry_in, Db, Deadline, Failure, RetryPolicy, Success, SystemClock, Try, Waiting,
};

/// OpenTelemetry's `db.system.name` for PostgreSQL.
const DB_SYSTEM: &str = "postgresql";

/// One PostgreSQL database, migrated, with a bounded pool of sessions: the same contract as
/// [`Database`](crate::Database) on a server.
///
/// # Reads and writes
/// - [`write`](PgDatabase::write) runs its closure in a `SERIALIZABLE` transaction, so that
///   it means what a SQLite write means: as if it ran alone. On a serialization failure
///   (40001), a deadlock (40P01), a lock wait past `lock_timeout` (55P03) or a connection
///   lost before `COMMIT` was sent, the whole closure runs again, with the retry policy's
///   jittered backoff and deadline, on a fresh session if the old one was lost; so it is
///   `FnMut` and must not have effects outside the database that cannot repeat. For a
///   connection lost while `COMMIT` was in flight, the server is asked on a fresh session
///   whether the transaction committed (see [`Options::lost_commit_lookup`]): if it did, the
///   write returns its value; if it did not, it runs again; where the server cannot prove
///   either (after a crash or a failover), it is [`Error::CommitOutcomeUnknown`], and never
///   run again silently.
/// - [`read`](PgDatabase::read) runs its closure in `REPEATABLE READ READ ONLY`: one
///   consistent snapshot, and any write in it is an error.
///
/// PostgreSQL queues lock waiters itself; the layer's write queue (a session advisory lock)
/// serves only writers that met a conflict, see [`Options::fair_queue`]. The pool
/// ([`Options::pool_size`]) bounds the sessions a process opens.
///
/// # Behind a transaction pooler
/// Hosted PostgreSQL often sits behind PgBouncer in transaction pooling mode, where nothing
/// a session keeps outside a transaction (a session advisory lock, a `SET`, a prepared
/// statement) stays with it. [`Options::open_postgres`] refuses such a URL
/// ([`Error::TransactionPooling`]) unless [`Options::transaction_pooling`] declares it; then
/// the layer keeps no state in the session: the timeouts are set `LOCAL` in each
/// transaction, Diesel prepares no statement to keep, the write queue's turn is taken inside
/// each transaction, and the migration lock for a migration that cannot run in a
/// transaction is held in a transaction of a second session.
///
/// # Server messages
/// Failures are told by their SQLSTATE (a serialization failure, a deadlock, a lock timeout,
/// a lost session), never by the server's message: a server that answers in any language
/// (`lc_messages`), and a role that may not change it, work alike.
#[derive(Debug)]
pub struct PgDatabase {
    id: u64,
    pool: PgPool,
    server: Server,
    /// The advisory lock of the write queue (see `queue`).
    queue_key: (i32, i32),
    /// Behind a declared transaction pooler, whether the queue's turn can be taken inside
    /// each transaction (see `queue`).
    queue_in_transaction: bool,
    /// When this handle's writes last met a conflict.
    conflicts: queue::Conflicts,
    /// Behind a declared transaction pooler, the database's settings each transaction sets
    /// back (see `pooler::Pinned`).
    pinned: pooler::Pinned,
    options: Options,
    applied: Vec<String>,
}

/// What the steps of an open share: when it started (its deadline counts from then), the
/// settings its transactions pin behind a declared pooler, and how it opens another session.
#[derive(Clone, Copy)]
struct Opening<'a> {
    started: Instant,
    pinned: &'a pooler::Pinned,
    open_session: &'a dyn Fn() -> Result<PgConnection>,
}

/// What one attempt of a PostgreSQL operation failed with: a statement of the layer's, or
/// the caller's closure with the transient failure it met, if any.
#[derive(Debug)]
pub(crate) enum PgAttempt<E> {
    Layer(Error),
    Caller {
        error: E,
        transient: Option<PgFailure>,
    },
}

impl<E> From<Error> for PgAttempt<E> {
    fn from(error: Error) -> Self {
        PgAttempt::Layer(error)
    }
}

impl<E: From<Error>> PgAttempt<E> {
    /// The transient failure behind this attempt's failure, if it was one.
    fn transient(&self) -> Option<PgFailure> {
        match self {
            PgAttempt::Layer(error) => layer_transient(error),
            PgAttempt::Caller { transient, .. } => transient.clone(),
        }
    }

    fn into_caller(self) -> E {
        match self {
            PgAttempt::Layer(error) => E::from(error),
            PgAttempt::Caller { error, .. } => error,
        }
    }
}

/// The transient failure in one of the layer's own errors.
fn layer_transient(error: &Error) -> Option<PgFailure> {
    match error {
        Error::Query { source, .. } => failure::failure(source),
        _ => None,
    }
}

impl Options {
    /// Opens the PostgreSQL database at `url` (`postgres://` or `postgresql://`, any form
    /// libpq takes, a Unix socket directory in `host=` too) with these options, and applies
    /// `migrations`' pending migrations exactly once however many processes and machines
    /// start together (see the module docs of the migration batch in the README).
    ///
    /// # Errors
    /// [`Error::UnsupportedUrl`] for a URL of another scheme; [`Error::Connect`] if no
    /// session could be opened; the migration refusals and failures of [`Options::open`] ([`Error::ForeignDatabase`],
    /// [`Error::UnknownMigrations`], [`Error::EditedMigrations`],
    /// [`Error::UnmanagedDatabase`], [`Error::Migration`]); [`Error::Busy`] if another
    /// process held the migration lock past the retry deadline;
    /// [`Error::TransactionPooling`] if the URL leads to a transaction pooler that
    /// [`Options::transaction_pooling`] does not declare; [`Error::StatementPooling`] if it
    /// leads to a statement pooler.
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn open_postgres<S: MigrationSource<Pg>>(
        self,
        url: &str,
        migrations: S,
    ) -> Result<PgDatabase> {
        crate::url::expect(url, crate::url::Engine::Postgres)?;
        let server = Server::new(url, &self);
        let shown = PathBuf::from(server.shown());
        let source = Source::<Pg>::list(migrations)?;
        let started = Instant::now();
        let settings = Settings::new(&self);
        // The open's own sessions run no write that could lose a COMMIT: no server identity.
        let open_settings = Settings {
            lost_commit_lookup: false,
            ..settings.clone()
        };
        let open = |settings: &Settings| {
            session::open(
                &server,
                settings,
                &self.retry,
                Deadline::at(&SystemClock, started, &self.retry),
            )
        };
        // One attempt of the open's steps after its first connection; the whole of it runs
        // again, within the retry deadline, when a session is lost meanwhile (a server
        // restarting, sessions terminated): each step is a read, or the migration batch,
        // which re-reads under its lock what a lost attempt left.
        // Whether the last attempt's migrating session was lost (a migration's own error
        // keeps no source to tell it by).
        let migrating_lost = Cell::new(false);
        let attempt = || -> Result<_> {
            let checked = if !self.pooler_declared {
                // Before the first session SET, which a pooler would leave on a server connection.
                // The check's second session is tried once: a full server is waited for only for
                // the session the open needs.
                let probe = pooler::probe(&settings);
                let second = {
                    let (server, probe) = (server.clone(), probe.clone());
                    move || session::connect_once(&server, &probe)
                };
                let checked = pooler::detect(open(&probe)?, second)?;
                if let Some(seen) = checked.pooler {
                    // A statement pooler moves a session's statements too.
                    if pooler::statement_pooler(&server, &settings) {
                        return Err(Error::StatementPooling {
                            url: server.shown().to_owned(),
                        });
                    }
                    return Err(Error::TransactionPooling {
                        url: server.shown().to_owned(),
                        seen,
                    });
                }
                // No pooler: the check's first session is the open's, with its settings now.
                let mut conn = checked.first;
                diesel::connection::SimpleConnection::batch_execute(&mut conn, &settings.sql())
                    .map_err(|e| Error::query(Operation::ConfigureSession, e))?;
                Some(conn)
            } else {
                None
            };
            let mut conn = match checked {
                Some(conn) => conn,
                None => open(&open_settings)?,
            };
            let key = migrate::lock_key(&mut conn, &self)
                .map_err(|e| Error::query(Operation::MigrationLock, e))?;
            let pinned = if self.transaction_pooling {
                pooler::Pinned::read(&mut conn)
                    .map_err(|e| Error::query(Operation::ConfigureSession, e))?
            } else {
                pooler::Pinned::default()
            };
            let applied = self
                .migrate_postgres(
                    &mut conn,
                    &source,
                    &shown,
                    key,
                    &Opening {
                        started,
                        pinned: &pinned,
                        open_session: &|| open(&open_settings),
                    },
                )
                .map_err(|e| {
                    let e = pooler::lost_at_first_begin(e, &server, &settings);
                    migrating_lost.set(
                        !matches!(e, Error::StatementPooling { .. }) && failure::lost(&mut conn),
                    );
                    e
                })?;
            let queue_in_transaction = self.transaction_pooling
                && queue::turn_in_transaction_usable(&mut conn)
                    .map_err(|e| Error::query(Operation::ConfigureSession, e))?;
            Ok((conn, key, pinned, applied, queue_in_transaction))
        };
        let mut delays = self.retry.delays();
        let (conn, key, pinned, applied, queue_in_transaction) = loop {
            match attempt() {
                Err(error) if migrating_lost.take() || session::lost_during_open(&error) => {
                    let left = self.retry.deadline().saturating_sub(started.elapsed());
                    let delay = delays.next().unwrap_or(left).min(left);
                    if delay.is_zero() {
                        break Err(error);
                    }
                    tracing::info!(
                        db.system.name = DB_SYSTEM,
                        db.namespace = %server.namespace(),
                        error = %crate::escaped::Escaped::new(&crate::error::error_chain(&error)),
                        delay_ms = delay.as_millis() as u64,
                        "a session was lost during the open; opening again"
                    );
                    std::thread::sleep(delay);
                }
                other => break other,
            }
        }?;
        let queue_key = (key.0, key.1.wrapping_add(1));
        // Migrations ran without a statement timeout; the pooled sessions get the options'.
        let manager = PgManager::new(&server, settings);
        // The open's session becomes the pool's first, one connection less per process.
        manager.keep_spare(conn);
        let pool = PgPool::builder()
            .max_size(self.pool_size)
            .min_idle(Some(0))
            // A lost session is noticed by the statement that meets it and retried; a
            // round trip to test every checkout would cost each write one more.
            .test_on_check_out(false)
            .connection_timeout(self.retry.deadline().max(Duration::from_millis(1)))
            .error_handler(Box::new(session::TraceConnectErrors {
                shown: server.shown().to_owned(),
            }))
            .build_unchecked(manager);
        Ok(PgDatabase {
            id: next_id(),
            pool,
            queue_key,
            queue_in_transaction,
            conflicts: queue::Conflicts::default(),
            pinned,
            server,
            options: self,
            applied,
        })
    }

    /// The migration step of [`Options::open_postgres`], on the open's session.
    fn migrate_postgres(
        &self,
        conn: &mut PgConnection,
        source: &Source<Pg>,
        shown: &Path,
        key: (i32, i32),
        opening: &Opening<'_>,
    ) -> Result<Vec<String>> {
        let Opening {
            started,
            pinned,
            open_session,
        } = *opening;
        let read = |conn: &mut PgConnection| {
            migrate::read_snapshot(conn, pinned)
                .map_err(|e| Error::query(Operation::ReadMigrationState, e))
        };
        let plan = migrate::planned(source, read(conn)?, self).map_err(|r| r.at(shown))?;
        if !plan.needs_write() {
            return Ok(Vec::new());
        }
        let (_, known) = source.migrations();
        let deadline = Deadline::at(&SystemClock, started, &self.retry);
        let db = Db {
            system: DB_SYSTEM,
            namespace: &crate::escaped::Escaped::path(shown),
        };
        // Who held the lock, read on the session that gave up waiting for it.
        let conn = std::cell::RefCell::new(conn);
        let lock_holders = || {
            holders::advisory(&mut conn.borrow_mut(), key, HeldLock::MigrationLock)
                .unwrap_or_default()
        };
        // Rounds after the first (the holder was still migrating) wait a deadline more.
        let deadline = |first: bool, policy: &RetryPolicy| {
            if first {
                deadline
            } else {
                Deadline::now(&SystemClock, policy)
            }
        };
        if !migrate::needs_session_lock(known, &plan) {
            return crate::migrate::while_others_migrate(self, started, |first, policy| {
                retry_pg(
                    policy,
                    deadline(first, policy),
                    db,
                    Operation::Migrate,
                    |attempt| {
                        let mut conn = conn.borrow_mut();
                        // The server ended the session (a restart): the batch runs again on a new
                        // one, within the same deadline.
                        if failure::lost(&mut conn) {
                            **conn = open_session()?;
                        }
                        migrate::batch(&mut conn, source, self, shown, key, attempt, pinned)
                            .map_err(|error| {
                                match error {
                                    // A migration's own statement met the lost session:
                                    // Diesel's migration error keeps no source, but the
                                    // session's recorder saw it.
                                    PgAttempt::Layer(error) if failure::lost(&mut conn) => {
                                        PgAttempt::Caller {
                                            transient: Some(PgFailure {
                                                kind: PgFailureKind::ConnectionLost,
                                                message: crate::error::error_chain(&error),
                                            }),
                                            error,
                                        }
                                    }
                                    other => other,
                                }
                            })
                    },
                    |_: &_, _| lock_holders(),
                )
                .map(|success| success.value)
            });
        }
        // A migration that cannot run in a transaction is pending: wait for the lock in
        // autocommit, never inside a transaction.
        let mut lock = if self.transaction_pooling {
            migrate::SessionLock::Held(open_session()?)
        } else {
            migrate::SessionLock::Own
        };
        crate::migrate::while_others_migrate(self, started, |first, policy| {
            retry_pg(
                policy,
                deadline(first, policy),
                db,
                Operation::MigrationLock,
                |_| {
                    let mut conn = conn.borrow_mut();
                    // The server ended a session (a restart): the next try runs on a new one.
                    if failure::lost(&mut conn) {
                        **conn = open_session()?;
                    }
                    if let migrate::SessionLock::Held(holder) = &mut lock {
                        if failure::lost(holder) {
                            *holder = open_session()?;
                        }
                    }
                    match lock.try_take(&mut conn, key) {
                        Ok(true) => Ok(()),
                        Ok(false) => Err(PgAttempt::<Error>::Layer(Error::MigrationLockHeld {
                            url: shown.display().to_string(),
                        })),
                        Err(source) => Err(PgAttempt::Layer(Error::query(
                            Operation::MigrationLock,
                            source,
                        ))),
                    }
                },
                |_: &_, _| lock_holders(),
            )
        })?;
        let conn = conn.into_inner();
        // Behind a transaction pooler the session has no statement timeout to lift (and a
        // session SET would stay on a server connection).
        let own_session = lock.own_session();
        let result = (|| {
            if own_session {
                migrate::timeouts(conn, None, None)
                    .map_err(|e| Error::query(Operation::Migrate, e))?;
            }
            let state = read(conn)?;
            let plan = migrate::planned(source, state, self).map_err(|r| r.at(shown))?;
            let applied = migrate::apply(conn, source, &plan, &plan.pending, false)?;
            if own_session {
                migrate::timeouts(conn, self.statement_timeout, Some(self.lock_timeout))
                    .map_err(|e| Error::query(Operation::Migrate, e))?;
            }
            Ok(applied)
        })();
        // Released at once; a crash (or a lost session) releases it on the server.
        if let Err(error) = lock.release(conn, key) {
            tracing::warn!(
                db.system.name = DB_SYSTEM,
                db.namespace = %crate::escaped::Escaped::path(shown),
                error = %crate::escaped::Escaped::new(&error.to_string()),
                "cannot release the migration lock; the server releases it when the session ends"
            );
        }
        result
    }
}

/// [`retry_in`] for PostgreSQL: transient failures are retried; exhaustion becomes
/// [`Error::Busy`] carrying the last one.
fn retry_pg<T, E: From<Error>>(
    policy: &RetryPolicy,
    deadline: Deadline<'_>,
    db: Db<'_>,
    operation: Operation,
    attempt: impl FnMut(Try) -> Result<T, PgAttempt<E>>,
    holders: impl FnOnce(&PgAttempt<E>, Duration) -> Vec<Holder>,
) -> Result<Success<T>, E> {
    let transient = |a: &PgAttempt<E>| match (a.transient(), a) {
        (Some(failure), _) => Some(failure.kind.waiting()),
        (None, PgAttempt::Layer(Error::MigrationLockHeld { .. })) => Some(Waiting::Locked),
        (None, _) => None,
    };
    let describe = |a: &PgAttempt<E>| match (a, a.transient()) {
        (_, Some(failure)) => failure.to_string(),
        (PgAttempt::Layer(error), None) => crate::error::error_chain(error),
        (PgAttempt::Caller { .. }, None) => "the closure's error".to_owned(),
    };
    retry_in(
        policy,
        // The attempts start now: the clock is read once more.
        deadline.read_now(),
        operation,
        db,
        transient,
        describe,
        attempt,
    )
    .map_err(|failure| match failure {
        Failure::Permanent(error) => error.into_caller(),
        Failure::Exhausted {
            attempts,
            elapsed,
            last,
        } => {
            let holders = holders(&last, elapsed);
            let source: crate::error::BoxError = match (last.transient(), last) {
                (Some(failure), _) => Box::new(failure),
                (None, PgAttempt::Layer(error)) => Box::new(error),
                (None, PgAttempt::Caller { .. }) => "the closure's error".into(),
            };
            E::from(Error::Busy {
                operation,
                attempts,
                elapsed,
                source,
                holders,
            })
        }
    })
}

impl PgDatabase {
    /// Opens the PostgreSQL database at `url` with [`Options::new`] and applies `migrations`'
    /// pending migrations.
    ///
    /// # Errors
    /// See [`Options::open_postgres`].
    pub fn open<S: MigrationSource<Pg>>(url: &str, migrations: S) -> Result<Self> {
        Options::new().open_postgres(url, migrations)
    }

    /// Runs `f` in a `SERIALIZABLE` transaction and commits it, running the whole closure
    /// again on a serialization failure, a deadlock, a lock timeout or a connection lost
    /// before `COMMIT` (see the type's docs), until the retry policy's deadline.
    ///
    /// `E` is your error type, as for [`Database::write`](crate::Database::write): whether a
    /// failure is transient is read from the statement of `f` that failed last, whatever `E`
    /// keeps of it.
    ///
    /// # Errors
    /// What `f` returns (after a rollback); [`Error::Busy`] if the failures went on past the
    /// deadline; [`Error::CommitOutcomeUnknown`] if the session was lost while `COMMIT` was
    /// in flight and the server could not say whether it committed; [`Error::Pool`] if no
    /// session could be had; [`Error::Reentrant`] inside a `write` or `read` of this database
    /// on this thread.
    pub fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.write_measured(f).map(|(value, _)| value)
    }

    /// [`write`](PgDatabase::write), also returning how long it waited (until the attempt
    /// that committed began) and how many attempts it took.
    ///
    /// # Errors
    /// As [`write`](PgDatabase::write).
    pub fn write_measured<T, E, F>(&self, f: F) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.write_measured_from(Instant::now(), f)
    }

    /// [`write_measured`](PgDatabase::write_measured) of a write asked for at `asked`: its
    /// retry deadline and its wait count from then.
    pub(crate) fn write_measured_from<T, E, F>(
        &self,
        asked: Instant,
        mut f: F,
    ) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        let _inside = Inside::enter(self.id, Operation::Write)?;
        let began = Cell::new(asked);
        // The session of the attempts, kept across them while it holds the queue's turn.
        let held: std::cell::RefCell<Option<PooledPg>> = std::cell::RefCell::new(None);
        let mut queued = false;
        let outcome = retry_pg(
            &self.options.retry,
            Deadline::at(&SystemClock, asked, &self.options.retry),
            self.db(),
            Operation::Write,
            |attempt| {
                let mut held = held.borrow_mut();
                let conn = match &mut *held {
                    Some(conn) => conn,
                    None => held.insert(self.checkout()?),
                };
                let contended = attempt.number > 1 || self.conflicts.recent();
                let result = {
                    let turn_in_transaction =
                        contended && self.options.fair_queue && self.queue_in_transaction;
                    let settings = format!(
                        "; SET LOCAL lock_timeout = {}{}{}{}",
                        session::millis(Some(self.options.lock_timeout.min(attempt.left))),
                        pooler::local_settings(&self.options),
                        if turn_in_transaction {
                            queue::turn_in_transaction()
                        } else {
                            String::new()
                        },
                        self.pinned.next_in_batch(),
                    );
                    let begin = format!(
                        "BEGIN ISOLATION LEVEL SERIALIZABLE{}{settings}",
                        self.pinned.read_write
                    );
                    // The turn is a session lock, which a transaction pooler does not keep;
                    // behind one it is taken in the transaction. Waited for in the same
                    // round trip as the BEGIN; a write that does not wait for it checks
                    // that no other does (see `queue::probe`).
                    let session_queue =
                        self.options.fair_queue && !self.options.transaction_pooling;
                    let take = contended && !queued && session_queue;
                    let probing = !queued && !take && session_queue;
                    let (begin, busy_then) = if take {
                        (queue::take_then(self.queue_key, attempt.left, &begin), None)
                    } else if probing {
                        (
                            format!(
                                "BEGIN ISOLATION LEVEL SERIALIZABLE{}{settings}",
                                queue::probe(self.queue_key)
                            ),
                            Some(queue::busy_then(self.queue_key, attempt.left, &begin)),
                        )
                    } else {
                        (begin, None)
                    };
                    let busy = Cell::new(false);
                    let turn = Turn {
                        key: self.queue_key,
                        taking: take,
                        busy_then,
                        busy: &busy,
                        held: &mut queued,
                    };
                    let asked_turn = Instant::now();
                    let stamped = self.options.lost_commit_lookup;
                    match transaction(conn, &begin, Operation::Write, stamped, turn, |conn| {
                        began.set(Instant::now());
                        // Others were queued: the contention goes on.
                        if busy.get()
                            || (take || turn_in_transaction)
                                && began.get().saturating_duration_since(asked_turn)
                                    > queue::CONTENDED_WAIT
                        {
                            self.conflicts.met();
                        }
                        f(conn)
                    }) {
                        Ok(value) => Ok(value),
                        Err(Ended::Failed(attempt)) => Err(attempt),
                        Err(Ended::CommitLost {
                            value,
                            stamp,
                            source,
                        }) => {
                            let deadline = Instant::now() + attempt.left;
                            match outcome::resolve(&self.pool, &stamp, deadline) {
                                Outcome::Committed => {
                                    tracing::info!(
                                        db.system.name = DB_SYSTEM,
                                        db.namespace = %self.server.namespace(),
                                        operation = Operation::Write.as_str(),
                                        "the session was lost during COMMIT; the server says it committed"
                                    );
                                    Ok(value)
                                }
                                // Lost before it committed: run again as any lost session is.
                                Outcome::NotCommitted => {
                                    Err(PgAttempt::Layer(Error::query(Operation::Write, source)))
                                }
                                Outcome::Unknown => {
                                    Err(PgAttempt::Layer(Error::CommitOutcomeUnknown {
                                        operation: Operation::Write,
                                        source,
                                    }))
                                }
                            }
                        }
                    }
                };
                if matches!(&result, Err(e) if e.transient().is_some()) {
                    self.conflicts.met();
                }
                // Whichever statement met it (the queue's too): the server ended the
                // session, and the turn with it (or Diesel gave up on it, and the pool
                // closes it); the next attempt takes a fresh one.
                if result.is_err()
                    && (failure::lost(conn) || diesel::r2d2::R2D2Connection::is_broken(&mut **conn))
                {
                    *held = None;
                    queued = false;
                }
                result
            },
            |last, waited| self.lock_holders(last, waited, held.borrow_mut().as_deref_mut()),
        );
        if let (Some(conn), true) = (&mut *held.borrow_mut(), queued) {
            queue::give_back(conn, self.queue_key);
        }
        let Success { value, attempts } = outcome?;
        Ok((
            value,
            WriteStats {
                wait: began.get() - asked,
                attempts,
            },
        ))
    }

    /// Runs `f` in a `REPEATABLE READ READ ONLY` transaction: one snapshot; a write in it
    /// fails (25006). Run again on the same transient failures as a write.
    ///
    /// # Errors
    /// What `f` returns; [`Error::Busy`], [`Error::Pool`] and [`Error::Reentrant`] as for
    /// [`write`](PgDatabase::write).
    pub fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.read_from(Instant::now(), f)
    }

    /// [`read`](PgDatabase::read) of a read asked for at `asked`: its retry deadline counts
    /// from then.
    pub(crate) fn read_from<T, E, F>(&self, asked: Instant, mut f: F) -> Result<T, E>
    where
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        let _inside = Inside::enter(self.id, Operation::Read)?;
        retry_pg(
            &self.options.retry,
            Deadline::at(&SystemClock, asked, &self.options.retry),
            self.db(),
            Operation::Read,
            |attempt| {
                let mut conn = self.checkout()?;
                let begin = format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL lock_timeout = {}{}{}",
                    session::millis(Some(self.options.lock_timeout.min(attempt.left))),
                    pooler::local_settings(&self.options),
                    self.pinned.next_in_batch(),
                );
                let (mut no_turn, not_busy) = (false, Cell::new(false));
                let turn = Turn {
                    key: self.queue_key,
                    taking: false,
                    busy_then: None,
                    busy: &not_busy,
                    held: &mut no_turn,
                };
                transaction(&mut conn, &begin, Operation::Read, false, turn, &mut f).map_err(|ended| {
                    match ended {
                        Ended::Failed(attempt) => attempt,
                        Ended::CommitLost { source, .. } => {
                            PgAttempt::Layer(Error::query(Operation::Read, source))
                        }
                    }
                })
            },
            |last, waited| self.lock_holders(last, waited, None),
        )
        .map(|success| success.value)
    }

    /// After a lock wait gave up: the other sessions holding the write queue's turn, and
    /// those whose write transactions were open for the whole wait, read on `own` (the
    /// operation's session, which may hold the turn itself and is never named), else on a
    /// session of the pool (if one is free within a second).
    fn lock_holders<E: From<Error>>(
        &self,
        last: &PgAttempt<E>,
        waited: Duration,
        own: Option<&mut PgConnection>,
    ) -> Vec<Holder> {
        if !matches!(last.transient(), Some(f) if f.kind == PgFailureKind::LockTimeout) {
            return Vec::new();
        }
        let mut pooled;
        let conn = match own {
            Some(conn) => conn,
            None => match self.pool.get_timeout(Duration::from_secs(1)) {
                Ok(conn) => {
                    pooled = conn;
                    &mut *pooled
                }
                Err(_) => return Vec::new(),
            },
        };
        let mut holders =
            holders::advisory(conn, self.queue_key, HeldLock::ServerWriteQueue).unwrap_or_default();
        holders.extend(holders::write_transactions(conn, waited).unwrap_or_default());
        holders
    }

    /// A session from the pool, with the layer's settings (none behind a declared
    /// transaction pooler, see [`Options::transaction_pooling`]), for work
    /// that needs one directly.
    ///
    /// # Errors
    /// [`Error::Pool`] if no session could be had in time; [`Error::Reentrant`] inside a
    /// `write` or `read` of this database on this thread.
    pub fn connection(&self) -> Result<PooledPg> {
        Inside::check(self.id, Operation::Connection)?;
        self.checkout()
    }

    fn checkout(&self) -> Result<PooledPg> {
        self.pool.get().map_err(|source| Error::Pool { source })
    }

    fn db(&self) -> Db<'_> {
        Db {
            system: DB_SYSTEM,
            namespace: self.server.namespace(),
        }
    }

    /// The pool itself.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The URL, without its password.
    pub fn url(&self) -> &str {
        self.server.shown()
    }

    /// The names of the migrations this open applied (empty if another process had applied
    /// them, or nothing was pending).
    pub fn applied_at_open(&self) -> &[String] {
        &self.applied
    }

    /// The options it was opened with.
    pub fn options(&self) -> &Options {
        &self.options
    }
}

/// How a transaction of [`transaction`] failed.
enum Ended<T, E> {
    /// It failed, and rolled back (or its session was lost before `COMMIT` was sent).
    Failed(PgAttempt<E>),
    /// A write's session was lost while its `COMMIT` was in flight: see [`outcome`].
    CommitLost {
        value: T,
        stamp: Box<outcome::Stamp>,
        source: diesel::result::Error,
    },
}

impl<T, E> From<PgAttempt<E>> for Ended<T, E> {
    fn from(attempt: PgAttempt<E>) -> Self {
        Ended::Failed(attempt)
    }
}

/// The write queue's turn (a session lock, see `queue`) as one attempt sees it.
struct Turn<'a> {
    key: (i32, i32),
    /// The `begin` batch waits for the turn first ([`queue::take_then`]).
    taking: bool,
    /// The `begin` batch checks that the turn is free ([`queue::probe`]); if it is not, this
    /// batch waits for it and begins ([`queue::busy_then`]).
    busy_then: Option<String>,
    /// Set when the probe found the turn taken.
    busy: &'a Cell<bool>,
    /// Whether the session holds it: set once the batch took it, cleared once a `COMMIT`
    /// handed it over (or failed, giving it back).
    held: &'a mut bool,
}

/// Runs `f` in a transaction begun with `begin` (which may set `LOCAL` settings after the
/// `BEGIN`, and wait for the queue's `turn` before it), committing if it succeeds and rolling
/// back if not. A failure of `f` is classified by the statement that failed last on `conn`.
/// A write reads its [`Stamp`](outcome::Stamp) before its `COMMIT`, so that a session lost
/// while the `COMMIT` was in flight can be asked about ([`Ended::CommitLost`]); a read's lost
/// `COMMIT` is retried (it wrote nothing). A session holding the turn hands it over with its
/// `COMMIT` ([`queue::hand_over`]), and keeps it for the next attempt if the transaction fails
/// before.
fn transaction<T, E: 'static>(
    conn: &mut PgConnection,
    begin: &str,
    operation: Operation,
    stamped: bool,
    turn: Turn<'_>,
    f: impl FnOnce(&mut PgConnection) -> Result<T, E>,
) -> Result<T, Ended<T, E>> {
    let layer = |source| PgAttempt::Layer(Error::query(operation, source));
    let mut taking = turn.taking;
    let mut begun = AnsiTransactionManager::begin_transaction_sql(conn, begin);
    if let (Err(source), Some(busy_then)) = (&begun, &turn.busy_then) {
        if failure::transient(source) == Some(PgFailureKind::LockTimeout) && !failure::lost(conn) {
            // Another writer holds the turn or waits for it: wait for it too, at once.
            turn.busy.set(true);
            taking = true;
            begun = AnsiTransactionManager::begin_transaction_sql(conn, busy_then);
        }
    }
    if let Err(source) = begun {
        if taking && !failure::lost(conn) {
            let timed_out = failure::transient(&source) == Some(PgFailureKind::LockTimeout);
            queue::after_failed_take(conn, turn.key, timed_out);
        }
        return Err(layer(source).into());
    }
    if taking {
        *turn.held = true;
    }
    let _ = failure::take(conn);
    let value = match f(conn) {
        Ok(value) => value,
        Err(error) => {
            let transient = failure::closure_failure(failure::take(conn), &error);
            // A lost session cannot roll back; the server has done so.
            let _ = AnsiTransactionManager::rollback_transaction(conn);
            return Err(PgAttempt::Caller { error, transient }.into());
        }
    };
    // A closure that met a failure and went on (a savepoint rolled back, or an error it
    // ignored) commits as Diesel does, and gives the turn back afterwards.
    let hand_over = *turn.held && matches!(failure::take(conn), failure::Recorded::Clean);
    let server = if stamped { failure::server(conn) } else { None };
    let stamp = if let Some(server) = server {
        match outcome::stamp(conn, server) {
            Ok(stamp) => Some(stamp),
            Err(source) => {
                let _ = AnsiTransactionManager::rollback_transaction(conn);
                return Err(layer(source).into());
            }
        }
    } else {
        None
    };
    let committed = if hand_over {
        let committed = commit_handing_over(conn, turn.key);
        *turn.held = false;
        if committed.is_err() && !failure::lost(conn) {
            queue::give_back_if_still_held(conn, turn.key);
        }
        committed
    } else {
        AnsiTransactionManager::commit_transaction(conn)
    };
    match committed {
        Ok(()) => Ok(value),
        Err(source) => match stamp {
            Some(stamp) if failure::transient(&source) == Some(PgFailureKind::ConnectionLost) => {
                Err(Ended::CommitLost {
                    value,
                    stamp: Box::new(stamp),
                    source,
                })
            }
            // A write that reads no stamp cannot be asked about.
            None if operation == Operation::Write
                && failure::transient(&source) == Some(PgFailureKind::ConnectionLost) =>
            {
                Err(PgAttempt::Layer(Error::CommitOutcomeUnknown { operation, source }).into())
            }
            _ => Err(layer(source).into()),
        },
    }
}

/// `COMMIT`, in one batch with [`queue::hand_over`]: the server hands the turn to the next
/// waiter as it commits. As Diesel's own `COMMIT` of a transaction of depth 1: the session's
/// transaction state follows libpq's (idle after the batch, whether the `COMMIT` worked or
/// failed); a batch that failed before its `COMMIT` is rolled back.
fn commit_handing_over(conn: &mut PgConnection, key: (i32, i32)) -> diesel::QueryResult<()> {
    use diesel::connection::SimpleConnection;
    match conn.batch_execute(&format!("{}; COMMIT", queue::hand_over(key))) {
        Ok(()) => Ok(()),
        Err(error) => {
            // After a failed COMMIT the session is idle, which Diesel has seen: nothing to
            // roll back.
            match AnsiTransactionManager::rollback_transaction(conn) {
                Ok(()) | Err(diesel::result::Error::NotInTransaction) => {}
                Err(rollback) => {
                    return Err(diesel::result::Error::RollbackErrorOnCommit {
                        rollback_error: Box::new(rollback),
                        commit_error: Box::new(error),
                    })
                }
            }
            Err(error)
        }
    }
}
