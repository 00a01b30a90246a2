//! [`AsyncDatabase`]: the same handle for tokio applications, behind the `tokio` feature, over
//! either engine.
//!
//! A [`Database`](crate::Database) (or `PgDatabase`) call blocks its thread while it waits
//! for a lock, sleeps between retries and runs the closure. On a tokio worker that stalls
//! every other task of the worker for as long, up to the retry deadline. `AsyncDatabase` runs
//! each call on tokio's blocking threads (`spawn_blocking`) instead, at most as many at once
//! as the pool has connections; callers beyond that wait asynchronously for a slot, until
//! their retry deadline (watched by a thread of this crate's, see `alarm`: tokio's timer may
//! be disabled).
//!
//! Every runtime flavour and context takes the same path: a multi-thread or current-thread
//! runtime, a task of a `LocalSet`, a `Handle::block_on`. (`block_in_place` would save the
//! hand-off to a blocking thread on a multi-thread runtime's workers, but it panics inside a
//! `LocalSet` driven by `block_on`, and a call run in place could not be given up: a
//! `timeout` or `select!` around it, in the same task, would wait for the lock with it.)
//!
//! On SQLite, a handle's writes queue and one blocking thread at a time (the runner) runs
//! them, a run at a time: it wakes the callers of a run together once the run is over, so
//! that many tasks writing at once wake the runtime about once a run rather than once a
//! write (each wake-up of a worker cost about two context switches, and on two cores the
//! woken workers preempted the runner), and it looks for the next write a moment before it
//! parks, so that a caller that writes again at once finds it awake.
//!
//! A call made while the calling thread is already inside a call of this layer (a closure
//! that awaits another call with `Handle::block_on` or any other executor) runs there at
//! once, as the blocking API's call would: on the same database it is refused with
//! [`Error::Reentrant`], where waiting for the outer call's turn or slot would wait forever.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ::tokio::sync::Semaphore;

use crate::error::{Error, Operation, Result};
use crate::handle::{next_id, Inside, WriteStats};
use crate::options::Options;

#[cfg(feature = "postgres")]
use crate::postgres::PgDatabase;
#[cfg(feature = "sqlite")]
use crate::sqlite::database::Database;

mod alarm;

mod sealed {
    use super::{BlockingDatabase, Error, Result, WriteStats};
    use std::time::Instant;

    /// What [`AsyncDatabase`](super::AsyncDatabase) needs of a blocking handle; implemented
    /// only by this crate's handles.
    pub trait Sealed {
        /// OpenTelemetry's `db.system.name` of the engine, for the events.
        const SYSTEM: &'static str;
        /// Whether the writes of one handle queue and run one after another on one blocking
        /// thread: the engine runs one write at a time anyway.
        const SERIAL_WRITES: bool;

        /// The database as the events show it (its path, or its URL without the password).
        fn namespace(&self) -> String;

        /// The options it was opened with.
        fn options(&self) -> &super::Options;

        /// The blocking handle's `write_measured`, of a call made at `asked` (its retry
        /// deadline and its wait count from then).
        fn write_measured<T, E, F>(&self, asked: Instant, f: F) -> Result<(T, WriteStats), E>
        where
            Self: BlockingDatabase,
            F: FnMut(&mut <Self as BlockingDatabase>::Connection) -> Result<T, E>,
            E: From<Error> + 'static;

        /// The blocking handle's `write`, of a call made at `asked`.
        fn write<T, E, F>(&self, asked: Instant, f: F) -> Result<T, E>
        where
            Self: BlockingDatabase,
            F: FnMut(&mut <Self as BlockingDatabase>::Connection) -> Result<T, E>,
            E: From<Error> + 'static;

        /// The blocking handle's `read`, of a call made at `asked`.
        fn read<T, E, F>(&self, asked: Instant, f: F) -> Result<T, E>
        where
            Self: BlockingDatabase,
            F: FnMut(&mut <Self as BlockingDatabase>::Connection) -> Result<T, E>,
            E: From<Error> + 'static;

        /// Runs `f` with a connection of the pool.
        fn interact<T>(
            &self,
            f: impl FnOnce(&mut <Self as BlockingDatabase>::Connection) -> T,
        ) -> Result<T>
        where
            Self: BlockingDatabase;
    }
}

/// A blocking handle that [`AsyncDatabase`] can serve: [`Database`](crate::Database)
/// (SQLite) or `PgDatabase` (PostgreSQL, feature `postgres`). Sealed: only this crate's
/// handles implement it.
pub trait BlockingDatabase: sealed::Sealed + fmt::Debug + Send + Sync + 'static {
    /// The connection the closures of [`AsyncDatabase::write`], [`AsyncDatabase::read`] and
    /// [`AsyncDatabase::interact`] are given.
    type Connection: 'static;
}

#[cfg(feature = "sqlite")]
impl sealed::Sealed for Database {
    const SYSTEM: &'static str = "sqlite";
    const SERIAL_WRITES: bool = true;

    fn namespace(&self) -> String {
        crate::escaped::Escaped::path(self.path()).to_string()
    }

    fn options(&self) -> &Options {
        Database::options(self)
    }

    fn write_measured<T, E, F>(&self, asked: Instant, f: F) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut diesel::SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.write_timed(asked, f, true)
    }

    fn write<T, E, F>(&self, asked: Instant, f: F) -> Result<T, E>
    where
        F: FnMut(&mut diesel::SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.write_timed(asked, f, false).map(|(value, _)| value)
    }

    fn read<T, E, F>(&self, asked: Instant, f: F) -> Result<T, E>
    where
        F: FnMut(&mut diesel::SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.read_from(asked, f)
    }

    fn interact<T>(&self, f: impl FnOnce(&mut diesel::SqliteConnection) -> T) -> Result<T> {
        self.with_connection(Operation::Connection, |conn| Ok(f(conn)))
    }
}

#[cfg(feature = "sqlite")]
impl BlockingDatabase for Database {
    type Connection = diesel::SqliteConnection;
}

#[cfg(feature = "postgres")]
impl sealed::Sealed for PgDatabase {
    const SYSTEM: &'static str = "postgresql";
    // The server runs writes side by side (`SERIALIZABLE`, run again on a conflict, and the
    // layer's own queue for writers that met one): queueing them here would only serialise
    // writes that do not conflict.
    const SERIAL_WRITES: bool = false;

    fn namespace(&self) -> String {
        crate::escaped::Escaped::new(self.url()).to_string()
    }

    fn options(&self) -> &Options {
        PgDatabase::options(self)
    }

    fn write_measured<T, E, F>(&self, asked: Instant, f: F) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut diesel::PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.write_measured_from(asked, f)
    }

    fn write<T, E, F>(&self, asked: Instant, f: F) -> Result<T, E>
    where
        F: FnMut(&mut diesel::PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.write_measured_from(asked, f).map(|(value, _)| value)
    }

    fn read<T, E, F>(&self, asked: Instant, f: F) -> Result<T, E>
    where
        F: FnMut(&mut diesel::PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.read_from(asked, f)
    }

    fn interact<T>(&self, f: impl FnOnce(&mut diesel::PgConnection) -> T) -> Result<T> {
        let mut conn = self.connection()?;
        Ok(f(&mut conn))
    }
}

#[cfg(feature = "postgres")]
impl BlockingDatabase for PgDatabase {
    type Connection = diesel::PgConnection;
}

/// Generates the handle's definition, whose default engine is SQLite when SQLite is built.
macro_rules! async_database {
    ($($default:ty)?) => {
        /// A [`Database`](crate::Database) (or, with the feature `postgres`, a `PgDatabase`:
        /// `AsyncDatabase<PgDatabase>`) for async code: every call runs on tokio's blocking
        /// threads, at most as many at once as the pool has connections, so that no runtime
        /// worker ever waits for a lock; on SQLite, the writes of one handle queue in arrival
        /// order and run one after another. Cheap to clone; the clones share the database.
        ///
        /// It works alike on a multi-thread and a current-thread runtime, in a `LocalSet` and
        /// under `Handle::block_on`, and never panics for the context it is called in.
        ///
        /// # Engines
        /// `AsyncDatabase` (that is, `AsyncDatabase<Database>`) serves SQLite, and
        /// `AsyncDatabase<PgDatabase>` (opened with `AsyncDatabase::open_postgres`, or made
        /// from a `PgDatabase` with `From`) PostgreSQL, with the same calls and the same
        /// contract. On SQLite, the writes of one handle queue in arrival order (a write in
        /// the queue holds no thread) and run one after another on one blocking thread at a
        /// time, which goes on to the next queued write at once and wakes the callers of the
        /// writes it ran together: SQLite runs one write at a time, and a write waiting for
        /// the lock would hold a blocking thread and a pooled connection. On PostgreSQL they do not queue: the server runs writes side by side,
        /// and writes that conflict are run again (or queue on the layer's write queue), so
        /// a queue here would only serialise writes that do not conflict. On both, the pool
        /// size bounds the calls that run at once (on SQLite the queued writes count as one).
        ///
        /// # Nested calls
        /// A call made from inside another call's closure, on its thread (awaited with
        /// `Handle::block_on` or another executor), runs there at once, as the blocking API's
        /// would. On the same database (any clone of the handle) it is refused with
        /// [`Error::Reentrant`] at once, whichever of `write`, `write_measured`, `read` and
        /// `interact` it is and whichever it is inside: it would wait for the queue, the slot
        /// or the lock the outer call holds. On another database it runs, without taking one
        /// of that handle's slots.
        ///
        /// # Deadlines
        /// A call's retry deadline ([`RetryPolicy::max_elapsed`](crate::RetryPolicy::max_elapsed))
        /// counts from the call, as a blocking call's does: a call that has not begun by then
        /// (every slot taken by calls in progress, on SQLite the writes queued ahead of it not
        /// done, or the runtime's blocking threads all busy) returns [`Error::Busy`] with 0
        /// attempts and never runs, whether or not its future was polled meanwhile; one that
        /// begins later retries for what is left of it. As for a blocking call's wait for a
        /// pooled connection, the wait to begin is never cut shorter than 1 s.
        ///
        /// # Cancellation
        /// Dropping the future of a `write`, `read` or `interact` (a timeout, a `select!`, a
        /// client that went away) is safe on either engine and either runtime flavour, and
        /// what happened is one of two things:
        /// - the call had not begun (it was waiting in the queue of writes or for a slot, or
        ///   its blocking task had not started): it never runs; nothing of it reaches the
        ///   database;
        /// - it had begun: it runs to its end, as the blocking API would, and its
        ///   transaction is committed or rolled back, never left open, its connection
        ///   returned to the pool clean. Its outcome is logged at `info` (`operation`,
        ///   `outcome`: `committed`, `failed` or `panicked`, with `db.system.name` and
        ///   `db.namespace`) whenever its future was not there to receive it: dropped while
        ///   the call ran, or after it finished but before the future saw it. A write whose
        ///   future was dropped is thus either returned or logged, never neither.
        ///
        /// So after a drop, a caller may assume only that the write was applied at most
        /// once, and entirely or not at all; to know which, make the write idempotent or
        /// look for its effect. A write is never applied twice: the layer retries a closure
        /// only after its transaction rolled back.
        ///
        /// # Examples
        /// ```
        /// # #[tokio::main(flavor = "current_thread")]
        /// # async fn main() -> sqlite_persistence::Result<()> {
        /// use diesel::RunQueryDsl;
        /// use diesel_migrations::{embed_migrations, EmbeddedMigrations};
        /// use sqlite_persistence::AsyncDatabase;
        ///
        /// const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
        ///
        /// let dir = tempfile::tempdir().unwrap();
        /// let db = AsyncDatabase::open(dir.path().join("app.db"), MIGRATIONS).await?;
        /// let inserted = db
        ///     .write(|conn| -> sqlite_persistence::Result<usize> {
        ///         Ok(diesel::sql_query("INSERT INTO counters (name) VALUES ('a')").execute(conn)?)
        ///     })
        ///     .await?;
        /// assert_eq!(inserted, 1);
        /// # Ok(())
        /// # }
        /// ```
        #[derive(Debug)]
        pub struct AsyncDatabase<D: BlockingDatabase $(= $default)?> {
            shared: Arc<Shared<D>>,
        }
    };
}

#[cfg(feature = "sqlite")]
async_database!(Database);
// Without SQLite there is no default: enabling `sqlite` later must not change what
// `AsyncDatabase` means in code that names the engine.
#[cfg(not(feature = "sqlite"))]
async_database!();

/// What the clones of one [`AsyncDatabase`] share.
#[derive(Debug)]
struct Shared<D> {
    database: D,
    /// Tells this handle (and its clones) apart in the thread's record of the operations it
    /// is inside: a nested call on it is refused, whatever the engine records itself.
    id: u64,
    /// One permit per pooled connection: how many calls run on blocking threads at once.
    slots: Arc<Semaphore>,
    /// On SQLite, this handle's writes, run one after another.
    writes: Option<Arc<Writes>>,
    /// The database as the events show it.
    namespace: Arc<str>,
}

impl<D> Drop for Shared<D> {
    fn drop(&mut self) {
        if let Some(writes) = &self.writes {
            writes.close();
        }
    }
}

impl<D: BlockingDatabase> Clone for AsyncDatabase<D> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<D: BlockingDatabase> From<D> for AsyncDatabase<D> {
    fn from(database: D) -> Self {
        let slots = Arc::new(Semaphore::new(database.options().pool_size as usize));
        let namespace = database.namespace().into();
        Self {
            shared: Arc::new(Shared {
                id: next_id(),
                writes: D::SERIAL_WRITES.then(|| Arc::new(Writes::new(Arc::clone(&slots)))),
                slots,
                namespace,
                database,
            }),
        }
    }
}

/// Where one call is, shared by its future and the thread that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not begun.
    Waiting,
    /// Begun, its future still there.
    Running,
    /// Its future was dropped before it began: it never will.
    Abandoned,
    /// Its future was dropped while it ran: the thread that runs it logs the outcome.
    Orphaned,
    /// Over, with this outcome, which its future has not received yet: if the future is
    /// dropped now, its drop logs the outcome.
    Finished(&'static str),
    /// Never run, and never will be: its job was dropped unrun (the runtime shut down before
    /// its blocking task started). Its future returns `Error::Cancelled`.
    Unrun,
    /// Never run, and never will be: it had not begun by its deadline (seen by its future or
    /// by the thread that was to run it). Its future returns `Error::Busy`.
    TimedOut,
    /// Over, its outcome handed to its future or logged.
    Done,
}

/// One call, shared by its future and the thread that runs it: its phase, its outcome until
/// the future takes it, the future's waker, and what its log line names.
struct Call<R> {
    state: Mutex<State<R>>,
    operation: Operation,
    system: &'static str,
    namespace: Arc<str>,
}

struct State<R> {
    phase: Phase,
    /// The outcome, from when the call finished until its future takes it.
    ended: Option<std::thread::Result<R>>,
    /// The future's waker, while it waits.
    waker: Option<Waker>,
}

impl<R> Call<R> {
    fn state(&self) -> std::sync::MutexGuard<'_, State<R>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The outcome of a call nobody is left to receive.
    fn log(&self, outcome: &str) {
        tracing::info!(
            db.system.name = self.system,
            db.namespace = %self.namespace,
            operation = self.operation.as_str(),
            outcome,
            "finished after its caller dropped it"
        );
    }
}

/// Held by a call's future: marks the call abandoned or orphaned if the future is dropped
/// before it finishes, and logs the outcome if it is dropped after the call finished but
/// before it received the outcome.
struct Watch<R>(Arc<Call<R>>);

/// How a call's wait for its outcome ended.
enum Ended<R> {
    /// It ran, and this is its outcome (or its panic).
    Ran(std::thread::Result<R>),
    /// It will never run: its job was dropped unrun.
    Unrun,
    /// It had not begun by its deadline, and now never will.
    TimedOut,
}

impl<R> Watch<R> {
    /// The call's outcome once it has one; [`Ended::TimedOut`] if it has not begun by `due`
    /// (then it never will: `alarm` wakes the future then).
    fn poll_ended(
        &self,
        cx: &mut Context<'_>,
        due: Option<Instant>,
        alarm: &mut alarm::Alarm,
    ) -> Poll<Ended<R>> {
        let mut state = self.0.state();
        if let Some(ended) = state.ended.take() {
            // From here the outcome is this future's: dropping it changes nothing.
            state.phase = Phase::Done;
            return Poll::Ready(Ended::Ran(ended));
        }
        match state.phase {
            Phase::Unrun => return Poll::Ready(Ended::Unrun),
            Phase::TimedOut => return Poll::Ready(Ended::TimedOut),
            // Under the lock: the thread that would run it sees it timed out, and skips it.
            Phase::Waiting if alarm.passed(due, cx) => {
                state.phase = Phase::TimedOut;
                return Poll::Ready(Ended::TimedOut);
            }
            _ => {}
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<R> Drop for Watch<R> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.waker = None;
        match state.phase {
            Phase::Waiting => state.phase = Phase::Abandoned,
            Phase::Running => state.phase = Phase::Orphaned,
            Phase::Finished(outcome) => {
                state.phase = Phase::Done;
                let ended = state.ended.take();
                drop(state);
                drop(ended);
                self.0.log(outcome);
            }
            Phase::Abandoned | Phase::Orphaned | Phase::Unrun | Phase::TimedOut | Phase::Done => {}
        }
    }
}

#[cfg(feature = "sqlite")]
impl AsyncDatabase<Database> {
    /// Opens the database at `path` with [`Options::new`], as [`Database::open`] does, on a
    /// blocking thread: the migrations run off the runtime's workers.
    ///
    /// # Errors
    /// As [`Options::open`]; [`Error::Cancelled`] if the runtime is shutting down.
    pub async fn open<S>(path: impl AsRef<std::path::Path>, migrations: S) -> Result<Self>
    where
        S: diesel::migration::MigrationSource<diesel::sqlite::Sqlite> + Send + 'static,
    {
        Self::open_with(Options::new(), path, migrations).await
    }

    /// Opens the database at `path` with `options`, as [`Options::open`] does, on a blocking
    /// thread.
    ///
    /// # Errors
    /// As [`Options::open`]; [`Error::Cancelled`] if the runtime is shutting down.
    pub async fn open_with<S>(
        options: Options,
        path: impl AsRef<std::path::Path>,
        migrations: S,
    ) -> Result<Self>
    where
        S: diesel::migration::MigrationSource<diesel::sqlite::Sqlite> + Send + 'static,
    {
        let path = path.as_ref().to_owned();
        opened(move || options.open(path, migrations)).await
    }
}

#[cfg(feature = "postgres")]
impl AsyncDatabase<PgDatabase> {
    /// Opens the PostgreSQL database at `url` with [`Options::new`], as `PgDatabase::open`
    /// does, on a blocking thread: the migrations run off the runtime's workers.
    ///
    /// # Errors
    /// As [`Options::open_postgres`]; [`Error::Cancelled`] if the runtime is shutting down.
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn open_postgres<S>(url: &str, migrations: S) -> Result<Self>
    where
        S: diesel::migration::MigrationSource<diesel::pg::Pg> + Send + 'static,
    {
        Self::open_postgres_with(Options::new(), url, migrations).await
    }

    /// Opens the PostgreSQL database at `url` with `options`, as
    /// [`Options::open_postgres`] does, on a blocking thread.
    ///
    /// # Errors
    /// As [`Options::open_postgres`]; [`Error::Cancelled`] if the runtime is shutting down.
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn open_postgres_with<S>(options: Options, url: &str, migrations: S) -> Result<Self>
    where
        S: diesel::migration::MigrationSource<diesel::pg::Pg> + Send + 'static,
    {
        let url = url.to_owned();
        opened(move || options.open_postgres(&url, migrations)).await
    }
}

/// Runs `open` on a blocking thread and wraps the handle it opens.
async fn opened<D: BlockingDatabase>(
    open: impl FnOnce() -> Result<D> + Send + 'static,
) -> Result<AsyncDatabase<D>> {
    match ::tokio::task::spawn_blocking(open).await {
        Ok(opened) => opened.map(AsyncDatabase::from),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(Error::Cancelled {
            operation: Operation::Migrate,
        }),
    }
}

impl<D: BlockingDatabase> AsyncDatabase<D> {
    /// The blocking handle's `write` on a blocking thread: on SQLite `f` runs in
    /// `BEGIN IMMEDIATE`, on PostgreSQL in a `SERIALIZABLE` transaction, again as a whole on
    /// a lock error or a conflict, and commits.
    ///
    /// # Errors
    /// As [`Database::write`](crate::Database::write) (or `PgDatabase::write`);
    /// [`Error::Reentrant`] inside a call of this database on this thread (see the type's
    /// docs); [`Error::Cancelled`] if the runtime is shutting down.
    ///
    /// # Panics
    /// If `f` panics, with its panic, once its transaction rolled back; the handle and its
    /// pool stay usable.
    pub async fn write<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnMut(&mut D::Connection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.run(Operation::Write, move |db, asked| {
            sealed::Sealed::write(db, asked, f)
        })
        .await
    }

    /// [`write`](AsyncDatabase::write), also returning how long it waited for the lock and
    /// how many attempts it took. The wait counts from the call: the wait for a slot or in
    /// the queue of writes is in it.
    ///
    /// # Errors
    /// As [`write`](AsyncDatabase::write).
    ///
    /// # Panics
    /// As [`write`](AsyncDatabase::write).
    pub async fn write_measured<T, E, F>(&self, f: F) -> std::result::Result<(T, WriteStats), E>
    where
        F: FnMut(&mut D::Connection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.run(Operation::Write, move |db, asked| {
            sealed::Sealed::write_measured(db, asked, f)
        })
        .await
    }

    /// The blocking handle's `read` on a blocking thread: on SQLite `f` runs in a read
    /// transaction with `query_only` on, on PostgreSQL in `REPEATABLE READ READ ONLY`.
    ///
    /// # Errors
    /// As [`Database::read`](crate::Database::read) (or `PgDatabase::read`);
    /// [`Error::Reentrant`] and [`Error::Cancelled`] as for [`write`](AsyncDatabase::write).
    ///
    /// # Panics
    /// If `f` panics, with its panic.
    pub async fn read<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnMut(&mut D::Connection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.run(Operation::Read, move |db, asked| {
            sealed::Sealed::read(db, asked, f)
        })
        .await
    }

    /// Runs `f` with a connection of the pool, on a blocking thread: for work that needs one
    /// directly (on SQLite, use `immediate_transaction` for anything that writes, as with
    /// [`Database::connection`](crate::Database::connection)).
    ///
    /// # Errors
    /// As the blocking handle's `connection`; [`Error::Reentrant`] and [`Error::Cancelled`]
    /// as for [`write`](AsyncDatabase::write).
    ///
    /// # Panics
    /// If `f` panics, with its panic.
    pub async fn interact<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut D::Connection) -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run(Operation::Connection, move |db, _asked| {
            sealed::Sealed::interact(db, f)
        })
        .await
    }

    /// The blocking handle, for code that runs on a blocking thread already.
    pub fn blocking(&self) -> &D {
        &self.shared.database
    }

    /// Runs `call` on a blocking thread, cancellation-safe: a write on SQLite through the
    /// handle's queue of writes, anything else once a slot is free; or here, at once, if this
    /// thread is inside a call already.
    async fn run<T, E, C>(&self, operation: Operation, call: C) -> std::result::Result<T, E>
    where
        C: FnOnce(&D, Instant) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let shared = &self.shared;
        let asked = Instant::now();
        if Inside::current().is_some() {
            // This thread is inside a call of this layer: the future is awaited from its
            // closure, by a blocking executor. Waiting for the queue, a slot or a thread the
            // outer call may hold would never end; the blocking API's answer is at hand
            // instead (`Error::Reentrant` on the same database).
            let _inside = Inside::enter(shared.id, operation)?;
            return call(&shared.database, asked);
        }
        let due = begin_by(asked, shared.database.options());
        let mut alarm = alarm::Alarm::default();
        let watch = Watch(Arc::new(Call {
            state: Mutex::new(State {
                phase: Phase::Waiting,
                ended: None,
                waker: None,
            }),
            operation,
            system: D::SYSTEM,
            namespace: Arc::clone(&shared.namespace),
        }));
        let job = Box::new(Task {
            call: Arc::clone(&watch.0),
            due,
            work: Some({
                let shared = Arc::clone(shared);
                move || call(&shared.database, asked)
            }),
            handle: shared.id,
        });
        match (&shared.writes, operation) {
            (Some(writes), Operation::Write) => writes.submit(job),
            _ => {
                // Dropped here, the job is dropped unrun with it: it never runs.
                let mut acquiring = std::pin::pin!(Arc::clone(&shared.slots).acquire_owned());
                let permit = std::future::poll_fn(|cx| match acquiring.as_mut().poll(cx) {
                    Poll::Ready(permit) => Poll::Ready(Some(permit)),
                    Poll::Pending if alarm.passed(due, cx) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                })
                .await;
                let Some(permit) = permit else {
                    return Err(E::from(self.waited_out(operation, asked)));
                };
                let permit = permit.expect("the semaphore is never closed");
                // If the runtime is shutting down, the closure is dropped unrun, and with it
                // the job, which tells the future so.
                drop(::tokio::task::spawn_blocking(move || {
                    let waker = Job::run(job);
                    // The slot is held until the blocking work ends, even if the future is
                    // dropped meanwhile.
                    drop(permit);
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }));
            }
        }
        let ended = std::future::poll_fn(|cx| watch.poll_ended(cx, due, &mut alarm)).await;
        drop(watch);
        match ended {
            Ended::Ran(Ok(result)) => result,
            Ended::Ran(Err(panic)) => std::panic::resume_unwind(panic),
            Ended::Unrun => Err(E::from(Error::Cancelled { operation })),
            Ended::TimedOut => Err(E::from(self.waited_out(operation, asked))),
        }
    }

    /// The error of a call that did not begin by its retry deadline: every slot stayed
    /// taken, the writes queued ahead of it did not end in time, or no blocking thread ran
    /// it.
    fn waited_out(&self, operation: Operation, asked: Instant) -> Error {
        let elapsed = asked.elapsed();
        tracing::warn!(
            db.system.name = D::SYSTEM,
            db.namespace = %self.shared.namespace,
            operation = operation.as_str(),
            waited_ms = elapsed.as_millis() as u64,
            "gave up waiting to begin: the handle's slots, its queue of writes or the \
             runtime's blocking threads stayed busy"
        );
        Error::Busy {
            operation,
            attempts: 0,
            elapsed,
            source: Box::new(crate::error::NotBegun {
                slots: self.shared.database.options().pool_size,
            }),
            holders: Vec::new(),
        }
    }
}

/// The end of the wait of a call made at `asked` to begin (for a slot, for its turn in the
/// queue of writes, for a blocking thread): its retry deadline, but never less than
/// [`BEGIN_WAIT_MIN`], as a blocking call's wait for a pooled connection; `None`: no end.
fn begin_by(asked: Instant, options: &Options) -> Option<Instant> {
    asked.checked_add(options.retry.deadline().max(BEGIN_WAIT_MIN))
}

/// The shortest wait of a call to begin: r2d2's shortest wait for a pooled connection,
/// which a blocking call with a shorter deadline (or none) waits for.
const BEGIN_WAIT_MIN: Duration = Duration::from_secs(1);

/// A call ready to run on the thread it is handed to.
trait Job: Send {
    /// Runs the call, unless its future was dropped before; returns the waker of its future,
    /// to wake once the thread is ready to.
    fn run(self: Box<Self>) -> Option<Waker>;
}

/// One call's work and its shared state.
struct Task<R, W> {
    call: Arc<Call<R>>,
    /// When the wait to begin ends (see [`begin_by`]): a call not begun by then never runs.
    due: Option<Instant>,
    /// Taken when it runs: a task dropped with it still there never ran.
    work: Option<W>,
    /// The handle it belongs to, whose nested calls it refuses.
    handle: u64,
}

impl<R, W> Job for Task<R, W>
where
    R: Outcome + Send,
    W: FnOnce() -> R + Send,
{
    fn run(mut self: Box<Self>) -> Option<Waker> {
        let work = self.work.take()?;
        let call = &self.call;
        {
            let mut state = call.state();
            if state.phase == Phase::Abandoned {
                state.phase = Phase::Done;
                tracing::debug!(
                    operation = call.operation.as_str(),
                    "dropped before it began: not run"
                );
                return None;
            }
            if state.phase == Phase::TimedOut {
                return None;
            }
            if self.due.is_some_and(|due| Instant::now() >= due) {
                // Its future was not polled at its deadline (its runtime stalled, or was not
                // driven): it did not begin in time, so it never does.
                state.phase = Phase::TimedOut;
                return state.waker.take();
            }
            state.phase = Phase::Running;
        }
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Refuses a call of this handle nested in this one, awaited by a blocking
            // executor.
            match Inside::enter(self.handle, call.operation) {
                Ok(_inside) => work(),
                Err(error) => R::refused(error),
            }
        }));
        let outcome = match &ended {
            Ok(result) if result.is_ok() => "committed",
            Ok(_) => "failed",
            Err(_) => "panicked",
        };
        let mut state = call.state();
        if state.phase == Phase::Orphaned {
            state.phase = Phase::Done;
            drop(state);
            drop(ended);
            call.log(outcome);
            None
        } else {
            // Its future receives it, or logs it if dropped first.
            state.phase = Phase::Finished(outcome);
            state.ended = Some(ended);
            state.waker.take()
        }
    }
}

impl<R, W> Drop for Task<R, W> {
    fn drop(&mut self) {
        if self.work.is_some() {
            // Dropped unrun: its future, if still there, returns `Error::Cancelled`.
            let waker = {
                let mut state = self.call.state();
                if state.phase == Phase::Waiting {
                    state.phase = Phase::Unrun;
                }
                state.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// A call's result, as [`Task`] needs it.
trait Outcome {
    fn is_ok(&self) -> bool;
    fn refused(error: Error) -> Self;
}

impl<T, E: From<Error>> Outcome for std::result::Result<T, E> {
    fn is_ok(&self) -> bool {
        std::result::Result::is_ok(self)
    }

    fn refused(error: Error) -> Self {
        Err(E::from(error))
    }
}

/// How long the runner looks for the next write before it parks, holding its slot: a caller
/// that awaits its write and then writes again is back within this on an idle machine, and
/// finds the runner awake, without a wake-up; callers woken together by a run come back
/// within it too.
const SPIN: Duration = Duration::from_micros(20);

/// How long the runner stays parked without a write before it ends (and gives its blocking
/// thread back): the runtime's shutdown waits for a parked runner at most this long.
const IDLE: Duration = Duration::from_millis(2);

/// The longest an outcome waits for the rest of its run before its future is woken: a run
/// wakes its callers once at its end, but a long write does not hold back the outcomes
/// before it.
const FLUSH: Duration = Duration::from_micros(500);

/// How long a run waits, once the queue is empty, for the writes of the callers the last run
/// woke (as many as it woke), yielding its CPU meanwhile: they are on their way back (16 tasks
/// writing in a loop come back within tens of microseconds), and a run that ended without
/// them would wake the runtime again for each one or two of them. A run that has all of them,
/// or whose caller is one, ends at once.
const GATHER: Duration = Duration::from_micros(200);

/// On SQLite, a handle's writes, in arrival order, run one after another by one blocking
/// thread at a time (the runner): SQLite runs one write at a time anyway, a write waiting in
/// the queue holds no thread, and the runner goes from one write to the next without a
/// hand-off.
#[derive(Debug)]
struct Writes {
    queue: Mutex<Queue>,
    /// Whether writes wait in the queue: read by the runner while it looks for the next one
    /// without the lock.
    pending: AtomicBool,
    /// The handle's slots: the runner holds one while it runs writes.
    slots: Arc<Semaphore>,
}

struct Queue {
    jobs: VecDeque<Box<dyn Job>>,
    runner: Runner,
    /// Every clone of the handle was dropped: the runner ends once the queue is empty.
    closed: bool,
}

/// The runner, as the queue knows it.
#[derive(Debug)]
enum Runner {
    /// None: the next write starts one.
    Stopped,
    /// Running writes, or looking for the next one.
    Running,
    /// Parked, waiting for a write: the next one unparks it.
    Parked(std::thread::Thread),
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("jobs", &self.jobs.len())
            .field("runner", &self.runner)
            .field("closed", &self.closed)
            .finish()
    }
}

impl Writes {
    fn new(slots: Arc<Semaphore>) -> Self {
        Self {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                runner: Runner::Stopped,
                closed: false,
            }),
            pending: AtomicBool::new(false),
            slots,
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`, and wakes or starts the runner unless it is running.
    fn submit(self: &Arc<Self>, job: Box<dyn Job>) {
        let runner = {
            let mut queue = self.queue();
            queue.jobs.push_back(job);
            self.pending.store(true, Ordering::Release);
            std::mem::replace(&mut queue.runner, Runner::Running)
        };
        match runner {
            Runner::Running => {}
            Runner::Parked(thread) => thread.unpark(),
            Runner::Stopped => {
                let runner = Runs {
                    writes: Arc::clone(self),
                    drained: false,
                };
                // If the runtime is shutting down, the runner is dropped unrun: see its drop.
                drop(::tokio::task::spawn_blocking(move || runner.run()));
            }
        }
    }

    /// Moves the queued writes into `run`; false if there were none.
    fn take_queued(&self, run: &mut VecDeque<Box<dyn Job>>) -> bool {
        let mut queue = self.queue();
        self.pending.store(false, Ordering::Release);
        std::mem::swap(&mut queue.jobs, run);
        !run.is_empty()
    }

    /// Every clone of the handle was dropped: a parked runner ends now.
    fn close(&self) {
        let parked = {
            let mut queue = self.queue();
            queue.closed = true;
            match &queue.runner {
                Runner::Parked(thread) => Some(thread.clone()),
                Runner::Stopped | Runner::Running => None,
            }
        };
        // A running one sees `closed` once the queue is empty.
        if let Some(thread) = parked {
            thread.unpark();
        }
    }

    /// Moves the queued writes into `run`, waiting for some if there are none: looking for
    /// [`SPIN`], then parked, holding no slot; false if none came within [`IDLE`] (or the
    /// handle was dropped), and the runner is to end.
    fn take_run(
        &self,
        run: &mut VecDeque<Box<dyn Job>>,
        permit: &mut Option<::tokio::sync::OwnedSemaphorePermit>,
    ) -> bool {
        let spin_until = Instant::now() + SPIN;
        while !self.pending.load(Ordering::Acquire) && Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        let mut idle_since = None;
        loop {
            let mut queue = self.queue();
            if !queue.jobs.is_empty() {
                std::mem::swap(&mut queue.jobs, run);
                self.pending.store(false, Ordering::Release);
                queue.runner = Runner::Running;
                return true;
            }
            let idle_for = idle_since.get_or_insert_with(Instant::now).elapsed();
            if queue.closed || idle_for >= IDLE {
                queue.runner = Runner::Stopped;
                return false;
            }
            queue.runner = Runner::Parked(std::thread::current());
            drop(queue);
            // Parked, it holds no slot.
            *permit = None;
            std::thread::park_timeout(IDLE - idle_for);
        }
    }
}

/// The runner: runs a handle's queued writes on a blocking thread, a run at a time (the
/// writes queued when it looks, those queued while it runs, and those of the callers the
/// last run woke if they come back within [`GATHER`]), and wakes their futures at the end of
/// each run (or once an outcome has waited [`FLUSH`]): a run of writes wakes the runtime
/// once, not once a write. It holds one slot while it runs writes, and ends once no write
/// came for [`IDLE`].
struct Runs {
    writes: Arc<Writes>,
    /// Whether it ended, the queue empty, and said so.
    drained: bool,
}

impl Runs {
    fn run(mut self) {
        let mut permit = None;
        let mut run = VecDeque::new();
        let mut wakers: Vec<Waker> = Vec::new();
        // How many callers the last run woke: as many writes are expected back.
        let mut expected = 1;
        while self.writes.take_run(&mut run, &mut permit) {
            if permit.is_none() {
                // Writes count among the calls that run at once, as one.
                permit = Some(acquire(&self.writes.slots));
            }
            // When the oldest outcome not yet told was ready, and how many this run told.
            let (mut oldest, mut told) = (None, 0);
            loop {
                for job in run.drain(..) {
                    // A job catches its closure's panic; it does not unwind.
                    if let Some(waker) = job.run() {
                        wakers.push(waker);
                    }
                    if !wakers.is_empty()
                        && oldest.get_or_insert_with(Instant::now).elapsed() >= FLUSH
                    {
                        told += wakers.len();
                        wakers.drain(..).for_each(Waker::wake);
                        oldest = None;
                    }
                }
                // Writes queued meanwhile join the run: their callers are woken with it. So
                // do those of the callers the last run woke, if they come back within
                // `GATHER`.
                if !self.writes.pending.load(Ordering::Acquire) && told + wakers.len() < expected {
                    let until = Instant::now() + GATHER;
                    while !self.writes.pending.load(Ordering::Acquire) && Instant::now() < until {
                        std::thread::yield_now();
                    }
                }
                if !self.writes.pending.load(Ordering::Acquire)
                    || !self.writes.take_queued(&mut run)
                {
                    break;
                }
            }
            told += wakers.len();
            expected = told.max(1);
            wakers.drain(..).for_each(Waker::wake);
        }
        self.drained = true;
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        if !self.drained {
            // Dropped unrun (the runtime is shutting down) or unwinding (a waker panicked):
            // the queued writes never run, their futures return `Error::Cancelled`, and the
            // next write starts a runner.
            let jobs = {
                let mut queue = self.writes.queue();
                queue.runner = Runner::Stopped;
                self.writes.pending.store(false, Ordering::Release);
                std::mem::take(&mut queue.jobs)
            };
            drop(jobs);
        }
    }
}

/// Waits for a permit of `slots` on this thread (not a runtime's worker).
fn acquire(slots: &Arc<Semaphore>) -> ::tokio::sync::OwnedSemaphorePermit {
    if let Ok(permit) = Arc::clone(slots).try_acquire_owned() {
        return permit;
    }
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut acquiring = std::pin::pin!(Arc::clone(slots).acquire_owned());
    loop {
        if let Poll::Ready(permit) = acquiring.as_mut().poll(&mut cx) {
            return permit.expect("the semaphore is never closed");
        }
        std::thread::park();
    }
}
