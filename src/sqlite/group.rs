//! Group commit ([`Options::group_commit`](crate::Options::group_commit)): the writes of one
//! handle that arrive while another holds the write transaction join it, each in its own
//! savepoint, and the group commits once (one sync of the WAL under `Synchronous::Full`).
//!
//! A writer arrives ([`Group::arrive`]): if nobody leads, it leads (the path of a write without
//! group commit: the pool's connection, the cross-process turn, the retry loop); else it waits
//! in the group's line. The leader, once its own closure has run in `BEGIN IMMEDIATE`
//! ([`lead_attempt`]), calls the waiting writers one at a time: it lends each its connection
//! ([`lend`]) and waits while the writer runs its own closure, on its own thread (closures need
//! not be `Send`), in a savepoint; then it commits, and answers them all. A lock error at
//! `COMMIT` puts them back at the head of the line, for the leader's next attempt (their
//! closures run again, as a single write's would). When the leader's write ends, the first
//! writer still waiting leads next ([`Group::resign`]).
//!
//! A writer waits for its call at most until its own deadline (then it leaves the line with
//! [`Error::Busy`]); once its closure ran, it waits for the COMMIT, as a single write does.
//! Nothing here takes the write turn or a SQLite lock: only the leader does, on the path of a
//! single write, so the turn is never awaited while holding anything the group's waiters
//! need. Locks are taken in one order: the line, then a member's step.

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::SqliteConnection;

use crate::error::{Error, Operation};
use crate::handle::WriteStats;
use crate::operation::DB_SYSTEM;
use crate::retry::retry_event;
use crate::retry::{Attempt, Deadline, RetryPolicy};
use crate::sqlite::codes::{self, SqliteFailure};
use crate::sqlite::ffi::lend::{autocommit, lend, Lent};
use crate::sqlite::lock_table::holders_of;

/// The most writers a leader calls into one transaction (its own write aside): a bound on
/// how long the first of them waits for the COMMIT.
const MOST_MEMBERS: usize = 64;

/// The savepoint of a member's closure. Not Diesel's: Diesel's count of transactions stays
/// at the group's one, so that `transaction` inside the closure nests under it, and a count
/// the closure left wrong (a panic inside its own `transaction`) is seen and put right.
const SAVEPOINT: &str = "sqlite_persistence_member";

/// The deepest of the closure's own transactions that a panic can leave open and this
/// module puts right.
const DEEPEST: u32 = 16;

/// The group commit of one handle.
#[derive(Debug, Default)]
pub(crate) struct Group {
    line: Mutex<Line>,
}

/// Who leads, and who waits to be called.
#[derive(Debug, Default)]
struct Line {
    /// Whether a writer leads (is writing, or waiting for the turn or the lock). While nobody
    /// leads, nobody waits.
    leading: bool,
    waiting: VecDeque<Arc<Member>>,
}

/// A writer waiting in the line, as the leader and the writer share it.
#[derive(Debug, Default)]
struct Member {
    step: Mutex<Step>,
    changed: Condvar,
}

/// Where a member is.
#[derive(Debug, Default)]
enum Step {
    /// In the line (or just taken from it by the leader).
    #[default]
    Waiting,
    /// Called: run the closure on this connection now.
    Run(Lent),
    /// The member's closure runs.
    Running,
    /// The closure ran and the connection is back with the leader.
    Ran(Ran),
    /// The group's answer.
    Answered(Answer),
}

/// How a member's closure ended, as the leader needs to know it.
#[derive(Debug, Clone)]
enum Ran {
    /// Its savepoint was released (the closure succeeded) or rolled back (it failed); the
    /// member knows which.
    Done,
    /// It panicked; its savepoint was rolled back and the member is gone (its panic goes on
    /// to its caller).
    Gone,
    /// A savepoint statement failed: what the transaction holds is unknown, so the group
    /// must not commit.
    Broken(String),
}

/// What the leader tells a member.
#[derive(Debug)]
enum Answer {
    /// The group's COMMIT is done.
    Committed,
    /// The group's transaction did not commit: why.
    Failed(String),
    /// The leader's write ended: this member leads now.
    Lead,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Member {
    /// Sets its step and wakes it (or the leader waiting on it).
    fn tell(&self, step: Step) {
        *lock(&self.step) = step;
        self.changed.notify_all();
    }
}

/// The writers whose closures ran in the leader's transaction, to be answered; any not
/// answered when this drops (the leader's thread unwinding) are told the group failed.
#[derive(Default)]
struct Members(Vec<Arc<Member>>);

impl Members {
    fn answer(&mut self, answer: impl Fn() -> Answer) {
        for member in self.0.drain(..) {
            member.tell(Step::Answered(answer()));
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        self.answer(|| Answer::Failed("the group's leader stopped before its COMMIT".into()));
    }
}

/// A writer's part in the group.
enum Role {
    /// It leads: it writes as without group commit, with [`lead_attempt`] as its attempts.
    Lead,
    /// It waits in the line.
    Member(Arc<Member>),
}

impl Group {
    /// A writer arrives: it leads if nobody does, else it waits in the line.
    fn arrive(&self) -> Role {
        let mut line = lock(&self.line);
        if !line.leading {
            line.leading = true;
            return Role::Lead;
        }
        let member = Arc::new(Member::default());
        line.waiting.push_back(Arc::clone(&member));
        Role::Member(member)
    }

    /// The leader's write ended: the first writer waiting leads next.
    fn resign(&self) {
        let mut line = lock(&self.line);
        match line.waiting.pop_front() {
            Some(next) => next.tell(Step::Answered(Answer::Lead)),
            None => line.leading = false,
        }
    }

    /// Takes `member` out of the line; `false` if the leader has taken it already.
    fn withdraw(&self, member: &Arc<Member>) -> bool {
        let mut line = lock(&self.line);
        let at = line.waiting.iter().position(|m| Arc::ptr_eq(m, member));
        at.map(|at| line.waiting.remove(at)).is_some()
    }

    /// Puts the members that ran back at the head of the line, in their order, to run again.
    fn requeue(&self, members: &mut Members) {
        let mut line = lock(&self.line);
        for member in members.0.drain(..).rev() {
            member.tell(Step::Waiting);
            line.waiting.push_front(member);
        }
    }

    /// Calls the writers waiting (and those arriving meanwhile, up to [`MOST_MEMBERS`]), one
    /// at a time, to run their closures on `conn`; those that ran are added to `ran`.
    ///
    /// # Errors
    /// What failed in a member's savepoint statements: the transaction must not commit.
    fn run_members(&self, conn: &mut SqliteConnection, ran: &mut Members) -> Result<(), String> {
        if lock(&self.line).waiting.is_empty() {
            return Ok(());
        }
        lend(conn, |lent| {
            for _ in 0..MOST_MEMBERS {
                let Some(member) = lock(&self.line).waiting.pop_front() else {
                    break;
                };
                let mut step = lock(&member.step);
                *step = Step::Run(lent.clone());
                member.changed.notify_all();
                let how = loop {
                    if let Step::Ran(how) = &*step {
                        break how.clone();
                    }
                    step = member
                        .changed
                        .wait(step)
                        .unwrap_or_else(PoisonError::into_inner);
                };
                drop(step);
                match how {
                    Ran::Done => ran.0.push(member),
                    Ran::Gone => {}
                    Ran::Broken(why) => {
                        ran.0.push(member);
                        return Err(why);
                    }
                }
            }
            Ok(())
        })
    }
}

/// An error of the group's transaction, for a member (Diesel's errors cannot be cloned).
fn group_error(message: String) -> Error {
    Error::query(
        Operation::Write,
        DieselError::DatabaseError(DatabaseErrorKind::Unknown, Box::new(message)),
    )
}

/// One attempt of a group's leader: `f` (its own closure) in `BEGIN IMMEDIATE`, then the
/// closures of the writers waiting, each in a savepoint, then the COMMIT; the members that
/// ran are answered after it. A failure of `f` rolls back at once (nobody else ran); a lock
/// error at COMMIT puts the members back in the line for the next attempt; any other failure
/// answers them with it.
pub(crate) fn lead_attempt<T, E: 'static>(
    group: &Group,
    conn: &mut SqliteConnection,
    f: impl FnOnce(&mut SqliteConnection) -> Result<T, E>,
) -> Result<T, Attempt<E>> {
    let layer = |source| Attempt::Layer(Error::query(Operation::Write, source));
    AnsiTransactionManager::begin_transaction_sql(conn, "BEGIN IMMEDIATE").map_err(layer)?;
    // What was recorded before belongs to earlier statements.
    let _ = codes::take(conn);
    codes::forget_this_threads();
    let value = match f(conn) {
        Ok(value) => value,
        Err(error) => {
            let lock = codes::lock_failure(codes::take(conn), &error);
            AnsiTransactionManager::rollback_transaction(conn).map_err(layer)?;
            return Err(Attempt::Caller { error, lock });
        }
    };
    let mut ran = Members::default();
    if let Err(why) = group.run_members(conn, &mut ran) {
        let why = format!("a member's savepoint failed: {why}");
        if let Err(error) = AnsiTransactionManager::rollback_transaction(conn) {
            tracing::error!(error = %crate::escaped::Escaped::new(&error.to_string()), "cannot roll back a failed group");
        }
        ran.answer(|| Answer::Failed(why.clone()));
        return Err(Attempt::Layer(group_error(why)));
    }
    let committed = AnsiTransactionManager::commit_transaction(conn);
    // A member that panicked inside transactions of its own, and whose count could not be
    // put right, left Diesel deeper than the group: its "COMMIT" was a RELEASE. SQLite says
    // whether the transaction really ended (a flag read, no statement).
    let open = !autocommit(conn);
    match committed {
        Ok(()) if !open => {
            ran.answer(|| Answer::Committed);
            Ok(value)
        }
        Ok(()) => {
            let why = "a member's closure left a transaction of its own open (it panicked \
                       inside a nested transaction); the group was rolled back"
                .to_owned();
            // Diesel still counts a transaction: the connection is closed, not reused.
            let _ = conn.batch_execute("ROLLBACK");
            ran.answer(|| Answer::Failed(why.clone()));
            Err(Attempt::Layer(group_error(why)))
        }
        Err(source) => {
            if !autocommit(conn) {
                let _ = conn.batch_execute("ROLLBACK");
            }
            let error = Error::query(Operation::Write, source);
            if error.is_lock_error() {
                group.requeue(&mut ran);
            } else {
                let why = crate::error::error_chain(&error);
                ran.answer(|| Answer::Failed(why.clone()));
            }
            Err(Attempt::Layer(error))
        }
    }
}

/// What a member's closure returned, kept on its own thread.
enum Outcome<T, E> {
    Value(T),
    Failed(E),
    /// It failed with a lock error: the write runs again after a pause.
    Locked(SqliteFailure, E),
}

/// How a member's wait ended.
enum Joined<T, E> {
    Answered(Result<T, E>),
    /// The previous leader's write ended: lead.
    Lead,
    /// Its closure met a lock error: try again after a pause.
    Locked(SqliteFailure),
    /// Its deadline passed while it waited to be called.
    TimedOut,
}

/// Where a write through a group reads its settings.
pub(crate) struct Setting<'a> {
    pub policy: &'a RetryPolicy,
    pub path: &'a Path,
}

/// A write through `group`: as its leader (`lead`, the path of a write without group commit,
/// whose attempts are [`lead_attempt`]s), or as a member of another writer's group. Returns
/// what it returned, the time from `asked` until its closure began and its attempts.
pub(crate) fn write<T, E, F>(
    group: &Group,
    setting: &Setting<'_>,
    deadline: Deadline<'_>,
    asked: Instant,
    mut f: F,
    mut lead: impl FnMut(&mut F, Deadline<'_>) -> Result<(T, WriteStats), E>,
) -> Result<(T, WriteStats), E>
where
    F: FnMut(&mut SqliteConnection) -> Result<T, E>,
    E: From<Error> + 'static,
{
    let mut runs = 0u32;
    let mut began = asked;
    let mut delays = setting.policy.delays();
    let mut role = group.arrive();
    loop {
        let member = match role {
            Role::Lead => {
                struct Leading<'g>(&'g Group);
                impl Drop for Leading<'_> {
                    fn drop(&mut self) {
                        self.0.resign();
                    }
                }
                let _leading = Leading(group);
                return lead(&mut f, deadline).map(|(value, mut stats)| {
                    stats.attempts += runs;
                    (value, stats)
                });
            }
            Role::Member(member) => member,
        };
        match take_part(group, &member, &mut f, deadline, &mut runs, &mut began) {
            Joined::Answered(result) => {
                return result.map(|value| {
                    let stats = WriteStats {
                        wait: began - asked,
                        attempts: runs,
                    };
                    (value, stats)
                })
            }
            Joined::Lead => role = Role::Lead,
            Joined::Locked(failure) => {
                let deadline = deadline.read_now();
                let elapsed = deadline.elapsed();
                let left = deadline.left();
                if runs >= setting.policy.attempts_limit() || left.is_zero() {
                    return Err(give_up(setting, runs, elapsed, Box::new(failure)));
                }
                let delay = delays.next().unwrap_or_default().min(left);
                retry_event!(
                    tracing::Level::WARN,
                    DB_SYSTEM,
                    crate::escaped::Escaped::path(setting.path),
                    Operation::Write,
                    runs,
                    elapsed,
                    crate::escaped::Escaped::new(&failure.to_string()),
                    "database is locked, retrying",
                    delay_ms = delay.as_millis() as u64
                );
                std::thread::sleep(delay);
                role = group.arrive();
            }
            Joined::TimedOut => {
                let source = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the write transaction of this process's group commit was held past the \
                     deadline",
                );
                return Err(give_up(
                    setting,
                    runs.max(1),
                    deadline.elapsed(),
                    Box::new(source),
                ));
            }
        }
    }
}

/// A member gives up: the event and the error a single write's retry loop gives.
fn give_up<E: From<Error>>(
    setting: &Setting<'_>,
    attempts: u32,
    elapsed: Duration,
    source: crate::error::BoxError,
) -> E {
    retry_event!(
        tracing::Level::ERROR,
        DB_SYSTEM,
        crate::escaped::Escaped::path(setting.path),
        Operation::Write,
        attempts,
        elapsed,
        crate::escaped::Escaped::new(&source.to_string()),
        "database stayed locked, giving up"
    );
    E::from(Error::Busy {
        operation: Operation::Write,
        attempts,
        elapsed,
        source,
        holders: holders_of(setting.path),
    })
}

/// A member's wait in the line, its run when called, and its wait for the answer.
fn take_part<T, E, F>(
    group: &Group,
    member: &Arc<Member>,
    f: &mut F,
    deadline: Deadline<'_>,
    runs: &mut u32,
    began: &mut Instant,
) -> Joined<T, E>
where
    F: FnMut(&mut SqliteConnection) -> Result<T, E>,
    E: From<Error> + 'static,
{
    let mut outcome: Option<Outcome<T, E>> = None;
    // Set once the deadline passed while the leader had already taken it from the line.
    let mut taken = false;
    loop {
        let mut step = lock(&member.step);
        loop {
            match &*step {
                Step::Waiting if !taken => {
                    let left = deadline.read_now().left();
                    if left.is_zero() {
                        break;
                    }
                    step = member
                        .changed
                        .wait_timeout(step, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                Step::Waiting | Step::Running | Step::Ran(_) => {
                    step = member
                        .changed
                        .wait(step)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Step::Run(_) | Step::Answered(_) => break,
            }
        }
        match std::mem::take(&mut *step) {
            Step::Run(lent) => {
                *step = Step::Running;
                drop(step);
                taken = false;
                *runs += 1;
                *began = Instant::now();
                let (how, panic) = run_member(&lent, f, &mut outcome);
                drop(lent);
                member.tell(Step::Ran(how));
                if let Some(panic) = panic {
                    resume_unwind(panic);
                }
            }
            Step::Answered(Answer::Lead) => return Joined::Lead,
            Step::Answered(Answer::Committed) => {
                return match outcome {
                    Some(Outcome::Value(value)) => Joined::Answered(Ok(value)),
                    Some(Outcome::Failed(error)) => Joined::Answered(Err(error)),
                    Some(Outcome::Locked(failure, _)) => Joined::Locked(failure),
                    None => Joined::Answered(Err(E::from(group_error(
                        "the group's leader answered a write that had not run".into(),
                    )))),
                }
            }
            Step::Answered(Answer::Failed(why)) => {
                return Joined::Answered(Err(match outcome {
                    Some(Outcome::Failed(error) | Outcome::Locked(_, error)) => error,
                    Some(Outcome::Value(_)) | None => E::from(group_error(why)),
                }))
            }
            Step::Waiting => {
                // The deadline passed.
                drop(step);
                if group.withdraw(member) {
                    return Joined::TimedOut;
                }
                // The leader is calling it: it runs, as a single write past its deadline
                // that already holds the lock does.
                taken = true;
            }
            // Not reached: the wait above ends only when called, answered, or at the
            // deadline; the step is put back and waited for again.
            other @ (Step::Running | Step::Ran(_)) => *step = other,
        }
    }
}

/// Runs a member's closure `f` on the lent connection in a savepoint: released if it
/// succeeds, rolled back and released if it fails or panics. The closure's result is kept in
/// `outcome`; a panic is returned, to go on once the connection is back with the leader.
fn run_member<T, E, F>(
    lent: &Lent,
    f: &mut F,
    outcome: &mut Option<Outcome<T, E>>,
) -> (Ran, Option<Box<dyn Any + Send>>)
where
    F: FnMut(&mut SqliteConnection) -> Result<T, E>,
    E: 'static,
{
    let broken = |error: DieselError| Ran::Broken(error.to_string());
    let ran = lent.with(|conn| {
        let _ = codes::take(conn);
        codes::forget_this_threads();
        *outcome = None;
        if let Err(error) = conn.batch_execute(&format!("SAVEPOINT {SAVEPOINT}")) {
            return (broken(error), None);
        }
        let undo = |conn: &mut SqliteConnection| {
            conn.batch_execute(&format!(
                "ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"
            ))
        };
        match catch_unwind(AssertUnwindSafe(|| f(conn))) {
            Ok(Ok(value)) => match conn.batch_execute(&format!("RELEASE SAVEPOINT {SAVEPOINT}")) {
                Ok(()) => {
                    *outcome = Some(Outcome::Value(value));
                    (Ran::Done, None)
                }
                Err(error) => (broken(error), None),
            },
            Ok(Err(error)) => {
                let lock = codes::lock_failure(codes::take(conn), &error);
                *outcome = Some(match lock {
                    Some(lock) => Outcome::Locked(lock, error),
                    None => Outcome::Failed(error),
                });
                match undo(conn) {
                    Ok(()) => (Ran::Done, None),
                    Err(error) => (broken(error), None),
                }
            }
            Err(panic) => match close_left_open(conn).and_then(|()| undo(conn)) {
                Ok(()) => (Ran::Gone, Some(panic)),
                Err(error) => (broken(error), Some(panic)),
            },
        }
    });
    ran.unwrap_or_else(|| {
        (
            Ran::Broken("the leader took its connection back".into()),
            None,
        )
    })
}

/// Rolls back, through Diesel (so that its count of transactions is right again), the
/// transactions of the closure's own that a panic left open: Diesel names the savepoint of
/// its `n`th nested transaction `diesel_savepoint_n`, and the deepest that exists says how
/// many are open (rolling back to one keeps it and those above it).
fn close_left_open(conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
    let open = (1..=DEEPEST)
        .rev()
        .find(|n| {
            conn.batch_execute(&format!("ROLLBACK TO SAVEPOINT diesel_savepoint_{n}"))
                .is_ok()
        })
        .unwrap_or(0);
    for _ in 0..open {
        AnsiTransactionManager::rollback_transaction(conn)?;
    }
    Ok(())
}
