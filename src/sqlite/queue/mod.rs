//! The cross-process write turn: writers queue on an OS file lock next to the database
//! instead of racing SQLite's polling busy handler; [`locked`] takes the turn, then retries
//! the whole operation.
//!
//! SQLite's busy handler polls: newcomers retry every few milliseconds, old waiters every
//! 100 ms, so under load old waiters lose again and again. A blocking `flock(2)` on a sidecar
//! file is woken by the kernel the moment the holder releases it. The layer takes it before
//! `BEGIN IMMEDIATE` (and around the WAL switch and migrations) and releases it after COMMIT,
//! never waiting for it while holding a SQLite lock. It is an optimisation, never the
//! guarantee: processes that do not use the crate ignore it and SQLite's own locks (with the
//! retry policy) still decide.

//!
//! The mechanisms, one module each: the queue's file, the only code that opens it
//! ([`sidecar`]); a place in the queue and how it ends ([`turn`]); the turn kept between a
//! process's short writes ([`linger`]); the thread that blocks in `flock` for the process's
//! waiting threads ([`waiter`]). This module composes them.

mod board;
mod linger;
pub(crate) mod sidecar;
mod turn;
mod waiter;

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, FileOperation, Operation, Result};
use crate::holders::HeldLock;
use crate::operation::{DB_SYSTEM, ERROR_TYPE_BUSY};
use crate::retry::{retry_attempts, Attempt, Deadline, RetryPolicy, Success, Try};
use crate::sqlite::lock_table::holders_of;
use board::Board;
use linger::{Ask, Linger};
use sidecar::{Record, Sidecar};
use turn::take_idle;
pub(crate) use turn::Turn;
use waiter::{Request, Waiter};

/// A process records its turns in the sidecar at most this often, for one operation.
const RECORD_EVERY: Duration = Duration::from_millis(100);

/// A wait for the turn this long is logged, naming the holder.
pub(crate) const LONG_WAIT: Duration = Duration::from_secs(1);

/// The write queue of one database file.
#[derive(Debug, Clone)]
pub(crate) struct WriteQueue {
    /// The queue's file, `<database>-lock`.
    sidecar: Sidecar,
    /// The database the queue is for, to name who holds it.
    database: Arc<Path>,
    /// A description of the sidecar open for writing, to record this process's turns in it
    /// (see [`Record`]); `None` if it cannot be written.
    record: Option<Arc<File>>,
    /// The operation and time of this process's last record.
    recorded: Arc<Mutex<Option<(Operation, Instant)>>>,
    /// Blocks in `flock` for this process's waiting threads.
    waiter: Arc<Waiter>,
    /// This process's turn, kept for a moment after a short write.
    linger: Arc<Linger>,
}

/// How waiting for a turn ended without one.
#[derive(Debug)]
pub(crate) enum Wait {
    /// The timeout passed while another holder kept the lock.
    TimedOut,
    /// The lock file could not be opened or locked.
    Failed(Error),
}

impl WriteQueue {
    /// The queue for `database` on its `sidecar` (`<database>-lock`), or `None` (with a
    /// warning) where the sidecar cannot be used: the queue only makes waiting fair, SQLite's
    /// own locks and the retry policy still decide, so writers then do without it.
    ///
    /// The sidecar is never followed if it is a symbolic link (nor created through one). A
    /// new one is created with its mode and owner set on its descriptor, not by path, so that
    /// nobody can swap the path for another file in between: the database's mode, with read
    /// permission only where the database has write permission (a user who may only read
    /// the database has no business in the queue, and cannot hold it to stop the writers),
    /// and, when created by root, the database's owner and group (as SQLite does for `-wal`
    /// and `-shm`), so that the owner can still open it. A sidecar that exists is left as it
    /// is: it may be another user's, in a group that shares the database.
    pub(crate) fn new(database: &Path, sidecar: PathBuf) -> Option<Self> {
        let mut queue = Self {
            sidecar: Sidecar::new(sidecar),
            database: database.into(),
            record: None,
            recorded: Arc::default(),
            waiter: Arc::default(),
            linger: Arc::default(),
        };
        match queue
            .sidecar
            .create(database)
            .and_then(|()| queue.sidecar.open_checked(database).map(drop))
        {
            Ok(()) => {
                queue.record = queue.sidecar.open_for_records().map(Arc::new);
                let board = queue
                    .record
                    .as_deref()
                    .and_then(|file| Board::open(file).ok());
                queue.linger = Arc::new(Linger::new(board));
                Some(queue)
            }
            Err(error) => {
                tracing::warn!(
                    queue = %crate::escaped::Escaped::path(&queue.sidecar.path),
                    error = %crate::error::error_chain(&error),
                    "the write queue cannot be used; writers wait with SQLite's busy handler \
                     and the retry policy alone"
                );
                None
            }
        }
    }

    /// Records in the sidecar that this process holds the turn for `operation` since now;
    /// skipped if its last record, for the same operation, is under [`RECORD_EVERY`] old
    /// (a write to the file costs short writes about 1 us), so that the recorded start is
    /// early by at most that.
    fn record(&self, turn: Turn, operation: Operation) -> Turn {
        let Some(file) = &self.record else {
            return turn;
        };
        let mut recorded = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = recorded.is_some_and(|(last, at)| {
            last == operation && turn.taken.duration_since(at) < RECORD_EVERY
        });
        if !fresh {
            Record::now(operation).write_to(file);
            *recorded = Some((operation, turn.taken));
        }
        turn
    }

    /// Waits at most `timeout` from `start` (now) for the turn, for `operation` (recorded in
    /// the sidecar once taken; a wait past [`LONG_WAIT`] is logged, naming the holder). A
    /// turn had without waiting was taken at `start`.
    pub(crate) fn turn(
        &self,
        start: Instant,
        timeout: Duration,
        operation: Operation,
    ) -> Result<Turn, Wait> {
        self.wait(start, timeout, operation)
            .map(|turn| self.record(turn, operation))
    }

    /// Waits at most `timeout` for the lock. Uncontended, this is one non-blocking `flock` on
    /// this thread's kept description (opened the first time); contended, the queue's one
    /// waiter thread blocks in `flock` (which has no timeout of its own) for this thread, in
    /// arrival order, and hands the lock over, or drops it if this thread already gave up.
    fn wait(&self, start: Instant, timeout: Duration, operation: Operation) -> Result<Turn, Wait> {
        // When a turn had at once is taken: `start`, unless this process gave way first.
        let asked = match self.linger.ask(operation, start) {
            Ask::Kept(file, streak) => {
                let mut turn = Turn::new(self.sidecar.path.clone(), file, &self.linger, start);
                turn.streak = streak;
                return Ok(turn);
            }
            Ask::GiveWay(pause) => {
                std::thread::sleep(pause.min(timeout));
                Instant::now()
            }
            Ask::Now => start,
        };
        let file = match take_idle(&self.sidecar.path) {
            Some(file) => file,
            None => self.sidecar.open().map_err(Wait::Failed)?,
        };
        // The turn was just handed to a waiter: take a seat behind it rather than barge.
        let handed = self
            .linger
            .board()
            .is_some_and(|board| board.reserved_for_other(0));
        match if handed {
            Err(TryLockError::WouldBlock)
        } else {
            file.try_lock()
        } {
            Ok(()) => {
                return Ok(Turn::new(
                    self.sidecar.path.clone(),
                    file,
                    &self.linger,
                    asked,
                ))
            }
            Err(TryLockError::WouldBlock) => self.linger.waited(asked),
            Err(TryLockError::Error(source)) => {
                return Err(Wait::Failed(self
                    .sidecar
                    .io_error(FileOperation::LockQueue)(
                    source
                )))
            }
        }
        // A thread of a process that holds the turn (another of its threads writes, or the
        // turn is kept between writes) waits in `flock` for its process to give it back,
        // in arrival order behind its siblings, as before the board: seated, it waited for
        // its process's turn to be handed over or given back (p99 20 ms for 16 threads).
        if !self.linger.holds() {
            if let Some(seat) = self.linger.board().and_then(|board| board.sit(asked)) {
                return self.wait_seated(&seat, file, start, timeout, operation);
            }
        }
        // No board, or every seat taken: the waiting thread blocks in `flock` for this one.
        self.wait_in_flock(None, file, start, timeout, operation, false)
    }

    /// Has the queue's waiting thread block in `flock` with `file` for this thread, and
    /// waits at most `timeout` from `start` for it to hand the lock over (or polls, if no
    /// thread can be started). A `seat` on the board is kept alive meanwhile; `logged` says
    /// whether the long wait was logged already.
    fn wait_in_flock(
        &self,
        seat: Option<&board::Seat<'_>>,
        file: File,
        start: Instant,
        timeout: Duration,
        operation: Operation,
        mut logged: bool,
    ) -> Result<Turn, Wait> {
        let (deliver, receiver) = mpsc::sync_channel(1);
        let gave_up = Arc::new(AtomicBool::new(false));
        let request = Request {
            file,
            deliver,
            gave_up: Arc::clone(&gave_up),
            linger: Arc::clone(&self.linger),
        };
        if let Err(request) = self.waiter.submit(request) {
            // At the process's or the user's thread limit: poll instead. Bounded still, no
            // longer in arrival order.
            drop(request);
            tracing::warn!(
                queue = %crate::escaped::Escaped::path(&self.sidecar.path),
                "cannot start the write queue's waiting thread; polling for the turn"
            );
            return self.poll(start, timeout);
        }
        logged |= timeout <= LONG_WAIT;
        let received = loop {
            let Some(mut left) = self.next_wait(start, timeout, operation, &mut logged) else {
                break None;
            };
            if let Some(seat) = seat {
                // A seat's waiter shows it is alive, or the seat is passed over.
                seat.alive();
                left = left.min(board::BACKSTOP);
            }
            match receiver.recv_timeout(left) {
                Ok(received) => break Some(received),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            }
        };
        match received {
            Some(Ok(file)) => {
                if let Some(seat) = seat {
                    seat.took_turn();
                }
                Ok(Turn::new(
                    self.sidecar.path.clone(),
                    file,
                    &self.linger,
                    Instant::now(),
                ))
            }
            Some(Err(source)) => Err(Wait::Failed(self
                .sidecar
                .io_error(FileOperation::LockQueue)(
                source
            ))),
            None => {
                gave_up.store(true, Ordering::SeqCst);
                Err(Wait::TimedOut)
            }
        }
    }

    /// How long a wait begun at `start` for `operation` may block next: what is left of
    /// `timeout`, cut at [`LONG_WAIT`] until that wait is logged (`logged`, set once it is);
    /// `None` once the timeout has passed.
    fn next_wait(
        &self,
        start: Instant,
        timeout: Duration,
        operation: Operation,
        logged: &mut bool,
    ) -> Option<Duration> {
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return None;
        }
        if !*logged && elapsed >= LONG_WAIT {
            self.log_long_wait(operation);
            *logged = true;
        }
        let left = timeout - elapsed;
        Some(if *logged {
            left
        } else {
            left.min(LONG_WAIT - elapsed)
        })
    }

    /// Waits on the waiting board in `seat` (see [`board`]) with `file` until the seat takes
    /// the turn, or `timeout` from `start` passes.
    fn wait_seated(
        &self,
        seat: &board::Seat<'_>,
        file: File,
        start: Instant,
        timeout: Duration,
        operation: Operation,
    ) -> Result<Turn, Wait> {
        let mut logged = timeout <= LONG_WAIT;
        let seated = Instant::now();
        loop {
            let generation = seat.generation();
            // Woken for the turn this process keeps between its writes.
            if let Some((kept, streak)) = self.linger.take_kept() {
                seat.took_turn();
                let mut turn = Turn::new(
                    self.sidecar.path.clone(),
                    kept,
                    &self.linger,
                    Instant::now(),
                );
                turn.streak = streak;
                return Ok(turn);
            }
            // The seat named next has a moment to take the turn; a waiter that has sat long
            // tries anyway (a name that never takes the turn, forged or left by a process
            // that stopped, holds nobody back for good).
            if seat.may_try() || seated.elapsed() >= 5 * board::BACKSTOP {
                match file.try_lock() {
                    Ok(()) => {
                        seat.took_turn();
                        return Ok(Turn::new(
                            self.sidecar.path.clone(),
                            file,
                            &self.linger,
                            Instant::now(),
                        ));
                    }
                    Err(TryLockError::WouldBlock) => {}
                    Err(TryLockError::Error(source)) => {
                        return Err(Wait::Failed(self
                            .sidecar
                            .io_error(FileOperation::LockQueue)(
                            source
                        )))
                    }
                }
            }
            let Some(left) = self.next_wait(start, timeout, operation, &mut logged) else {
                return Err(Wait::TimedOut);
            };
            // Nobody named on the board for a while, and the holder is not this process: it
            // may be a process that names nobody (an older version of this crate), whose own
            // waiters block in `flock` and are woken at every release. Block there too,
            // keeping the seat. (A thread of this process waits for the turn its process
            // keeps to be handed to it, or given back.)
            if seated.elapsed() >= board::BACKSTOP
                && !seat.naming_recently()
                && !self.linger.holds()
            {
                return self.wait_in_flock(Some(seat), file, start, timeout, operation, logged);
            }
            seat.sleep(generation, left);
        }
    }

    /// Releases this process's kept turn, if it has one (the database is closing).
    pub(crate) fn release_kept(&self) {
        self.linger.release();
    }

    /// The event of a wait that has lasted [`LONG_WAIT`], naming who holds the turn.
    fn log_long_wait(&self, operation: Operation) {
        let holders: Vec<String> = holders_of(&self.database)
            .iter()
            .filter(|h| h.lock == HeldLock::WriteQueue)
            .map(ToString::to_string)
            .collect();
        tracing::warn!(
            db.system.name = DB_SYSTEM,
            db.namespace = %crate::escaped::Escaped::path(&self.database),
            db.operation.name = operation.as_str(),
            operation = operation.as_str(),
            waited_ms = LONG_WAIT.as_millis() as u64,
            held_by = %if holders.is_empty() { "unknown".to_owned() } else { holders.join(", ") },
            "waiting for the write queue"
        );
    }

    /// Waits at most `timeout` for the lock by trying it every few milliseconds.
    fn poll(&self, start: Instant, timeout: Duration) -> Result<Turn, Wait> {
        let file = self.sidecar.open().map_err(Wait::Failed)?;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(Turn::new(
                        self.sidecar.path.clone(),
                        file,
                        &self.linger,
                        Instant::now(),
                    ))
                }
                Err(TryLockError::WouldBlock) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(TryLockError::WouldBlock) => return Err(Wait::TimedOut),
                Err(TryLockError::Error(source)) => {
                    return Err(Wait::Failed(self
                        .sidecar
                        .io_error(FileOperation::LockQueue)(
                        source
                    )))
                }
            }
        }
    }
}

/// Takes the write turn in `queue` (if there is one), then runs `attempt` under the retry
/// policy until it succeeds or fails for good; the turn is held throughout. Queueing and
/// retrying share the one `deadline`. This is how the journal-mode switch, the migration
/// batch and every `write` take the write lock: the turn is never awaited while holding a
/// SQLite lock, because it comes first.
pub(crate) fn locked<T, E>(
    queue: Option<&WriteQueue>,
    policy: &RetryPolicy,
    deadline: Deadline<'_>,
    operation: Operation,
    database: &Path,
    attempt: impl FnMut(Try) -> Result<T, Attempt<E>>,
) -> Result<Success<T>, E>
where
    E: From<Error> + 'static,
{
    let turn = wait_turn(queue, deadline, operation, database)?;
    // A turn had at once was taken when the operation last read the clock: no clock read
    // for the first attempt.
    let deadline = match &turn {
        Some(turn) if turn.taken != deadline.known() => deadline.read_now(),
        _ => deadline,
    };
    let outcome = retry_attempts(policy, deadline, operation, database, attempt);
    drop(turn);
    outcome
}

/// [`locked`] for a `write` of the database file `file` (device and inode): the same, except
/// that the checkpoint a commit may run (the WAL hook, see `checkpoint`) can give the turn
/// back first ([`release_before_checkpoint`]).
pub(crate) fn locked_write<T, E>(
    queue: Option<&WriteQueue>,
    policy: &RetryPolicy,
    deadline: Deadline<'_>,
    file: Option<(u64, u64)>,
    database: &Path,
    attempt: impl FnMut(Try) -> Result<T, Attempt<E>>,
) -> Result<Success<T>, E>
where
    E: From<Error> + 'static,
{
    let turn = wait_turn(queue, deadline, Operation::Write, database)?;
    let deadline = match &turn {
        Some(turn) if turn.taken != deadline.known() => deadline.read_now(),
        _ => deadline,
    };
    let _held = turn.map(|turn| Held::put(file, turn));
    retry_attempts(policy, deadline, Operation::Write, database, attempt)
}

/// A database file's device and inode.
type FileId = Option<(u64, u64)>;

thread_local! {
    /// The turns this thread holds for a `write`, by database file (a thread is inside at
    /// most one write of a file).
    static HELD: std::cell::RefCell<Vec<(FileId, Turn)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A write's turn, put where the checkpoint after its commit can give it back first.
struct Held(Option<(u64, u64)>);

impl Held {
    fn put(file: Option<(u64, u64)>, turn: Turn) -> Self {
        HELD.with_borrow_mut(|held| held.push((file, turn)));
        Self(file)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let turn = HELD.with_borrow_mut(|held| {
            let i = held.iter().rposition(|(file, _)| *file == self.0)?;
            Some(held.remove(i).1)
        });
        // Dropped outside the borrow: giving the turn back wakes the next waiter.
        drop(turn);
    }
}

/// A write's turn given back before the checkpoint after its commit, which runs while this
/// lives (recorded on the board, so that other processes' commits meanwhile do not start
/// one of their own).
pub(crate) struct Released(Arc<Linger>);

impl Released {
    /// The checkpoint ran: the next holder of the turn finishes it ([`take_finish`]).
    pub(crate) fn checkpointed(&self) {
        if let Some(board) = self.0.board() {
            board.finish_due();
        }
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        if let Some(board) = self.0.board() {
            board.end_checkpoint();
        }
    }
}

/// What the checkpoint after a `write`'s commit does with the write's turn.
pub(crate) enum BeforeCheckpoint {
    /// The turn is given back; the checkpoint runs outside it.
    Released(Released),
    /// Another process runs a checkpoint outside its turn: none is to run now.
    Skip,
    /// This thread holds no turn with a board for that file: the checkpoint runs as it is.
    NotHeld,
}

/// Gives back, at once and ending this process's streak, the turn this thread holds for a
/// `write` of the database file `file`, whose transaction has just committed: called by the
/// checkpoint after a commit, before it runs, so that the waiters do not wait out its
/// copying and fsync (milliseconds; SQLite lets other writers commit while a PASSIVE
/// checkpoint runs). Only where the queue has its waiting board, through which the next
/// holder finishes the checkpoint: what was committed meanwhile is copied under the turn,
/// and the transaction after starts the WAL over, which keeps it bounded. `NotHeld` if this
/// thread holds no such turn (the commit was not a `write`'s: the open's, a migration's, an
/// application's own), or the queue has no board.
pub(crate) fn release_before_checkpoint(file: (u64, u64)) -> BeforeCheckpoint {
    let mut busy = false;
    let turn = HELD.with_borrow_mut(|held| {
        let i = held.iter().rposition(|(f, turn)| {
            *f == Some(file) && turn.linger().is_some_and(|l| l.board().is_some())
        })?;
        let board = held[i].1.linger().and_then(|l| l.board())?;
        if !board.begin_checkpoint() {
            busy = true;
            return None;
        }
        Some(held.remove(i).1)
    });
    match turn.and_then(|mut turn| turn.end_streak()) {
        Some(linger) => BeforeCheckpoint::Released(Released(linger)),
        None if busy => BeforeCheckpoint::Skip,
        None => BeforeCheckpoint::NotHeld,
    }
}

/// Whether a checkpoint run after another write gave the turn back is to be finished by
/// this thread, which holds the turn for a `write` of the database file `file` and has just
/// committed (see [`release_before_checkpoint`]); taken on if so.
pub(crate) fn take_finish(file: (u64, u64)) -> bool {
    with_held_board(file, board::Board::take_finish)
}

/// The finish taken on met another checkpointer: the next holder finishes it.
pub(crate) fn finish_later(file: (u64, u64)) {
    with_held_board(file, |board| {
        board.finish_due();
        true
    });
}

/// `f` of the waiting board of the turn this thread holds for a `write` of `file`; `false`
/// without one.
fn with_held_board(file: (u64, u64), f: impl FnOnce(&board::Board) -> bool) -> bool {
    HELD.with_borrow(|held| {
        held.iter()
            .rev()
            .find(|(f, _)| *f == Some(file))
            .and_then(|(_, turn)| turn.linger().and_then(|linger| linger.board()))
            .is_some_and(f)
    })
}

/// Takes a turn in `queue` (if there is one) for `operation`, waiting at most what is left
/// of `deadline`, counted from when the operation last read the clock.
fn wait_turn(
    queue: Option<&WriteQueue>,
    deadline: Deadline<'_>,
    operation: Operation,
    database: &Path,
) -> Result<Option<Turn>> {
    let Some(queue) = queue else {
        return Ok(None);
    };
    match queue.turn(deadline.known(), deadline.left(), operation) {
        Ok(turn) => Ok(Some(turn)),
        Err(Wait::Failed(error)) => {
            // The sidecar was usable at open and is not now (removed, replaced): do without.
            tracing::warn!(
                operation = operation.as_str(),
                queue = %crate::escaped::Escaped::path(&queue.sidecar.path),
                error = %crate::error::error_chain(&error),
                "the write queue cannot be used; waiting with SQLite's locks alone"
            );
            Ok(None)
        }
        Err(Wait::TimedOut) => {
            let elapsed = deadline.elapsed();
            tracing::error!(
                db.system.name = DB_SYSTEM,
                db.namespace = %crate::escaped::Escaped::path(database),
                db.operation.name = operation.as_str(),
                error.type = ERROR_TYPE_BUSY,
                operation = operation.as_str(),
                elapsed_ms = elapsed.as_millis() as u64,
                queue = %crate::escaped::Escaped::path(&queue.sidecar.path),
                "write queue stayed locked, giving up"
            );
            Err(Error::Busy {
                operation,
                attempts: 1,
                elapsed,
                source: Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "another process held the write queue {} past the deadline",
                        crate::escaped::Escaped::path(&queue.sidecar.path)
                    ),
                )),
                holders: holders_of(database),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::linger::{CONTENDED, GIVE_WAY, LINGER};
    use super::*;

    fn sidecar(db: &Path) -> PathBuf {
        PathBuf::from(format!("{}-lock", db.display()))
    }

    fn queue_of(db: &Path) -> WriteQueue {
        WriteQueue::new(db, sidecar(db)).unwrap()
    }

    #[cfg(unix)]
    /// Whether another open file description gets the lock at once.
    fn free(db: &Path) -> bool {
        let file = File::open(sidecar(db)).unwrap();
        let free = file.try_lock().is_ok();
        drop(file);
        free
    }

    #[test]
    fn a_short_turn_is_kept_for_the_next_write_then_released() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let queue = queue_of(&db);
        let short = || {
            drop(
                queue
                    .turn(Instant::now(), Duration::from_secs(1), Operation::Write)
                    .unwrap(),
            )
        };
        // Whether a short turn is still held right after it (by another open file
        // description's try); `None` if this thread looked only after LINGER had passed (it
        // was not scheduled), which tells nothing.
        let kept_after_short = || {
            short();
            let done = Instant::now();
            let kept = !free(&db);
            (kept || done.elapsed() < LINGER).then_some(kept)
        };
        let kept = || (0..100).find_map(|_| kept_after_short());
        // The first turn of a process is never kept: one that writes once starts no thread.
        short();
        assert!(free(&db));
        // The next ones are kept for a moment ...
        assert_eq!(kept(), Some(true), "the turn was not kept");
        // ... and released when nobody takes it (LINGER and a poll; a loaded machine may
        // take longer to run the releasing thread, never seconds).
        let start = Instant::now();
        while !free(&db) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the kept turn was never released"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        // Closing the database gives a kept turn back at once.
        assert_eq!(kept(), Some(true), "the turn was not kept");
        queue.release_kept();
        assert!(free(&db));
    }

    #[test]
    fn a_streak_of_short_turns_lets_a_waiter_in() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let queue = queue_of(&db);
        let stop = Arc::new(AtomicBool::new(false));
        // One thread takes short turns back to back, as a process writing in a loop does.
        let writer = {
            let (queue, stop) = (queue.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    drop(
                        queue
                            .turn(Instant::now(), Duration::from_secs(5), Operation::Write)
                            .unwrap(),
                    );
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        // Another process's writer (its own queue, its own descriptions) still gets a turn.
        let other = queue_of(&db);
        let start = Instant::now();
        let turn = other.turn(Instant::now(), Duration::from_secs(5), Operation::Write);
        let waited = start.elapsed();
        stop.store(true, Ordering::SeqCst);
        drop(turn.unwrap());
        writer.join().unwrap();
        assert!(waited < Duration::from_millis(500), "waited {waited:?}");
    }

    #[test]
    fn a_long_turn_given_back_while_others_queue_gives_way_before_the_next() {
        let linger = Arc::new(Linger::default());
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Never waited: a long turn given back changes nothing.
        linger.gave_back(t0);
        assert!(matches!(linger.ask(Operation::Write, t0), Ask::Now));
        // Found the turn taken, then gave a long one back: the next ask waits first ...
        linger.waited(t0);
        linger.gave_back(t0 + ms(10));
        match linger.ask(Operation::Write, t0 + ms(10)) {
            Ask::GiveWay(pause) => assert_eq!(pause, GIVE_WAY),
            _ => panic!("did not give way"),
        }
        // ... only just after it: an ask after GIVE_WAY goes at once.
        assert!(matches!(
            linger.ask(Operation::Write, t0 + ms(10) + GIVE_WAY),
            Ask::Now
        ));
        // The last wait is over a second old: no longer contended.
        linger.gave_back(t0 + CONTENDED + ms(20));
        assert!(matches!(
            linger.ask(Operation::Write, t0 + CONTENDED + ms(20)),
            Ask::Now
        ));
    }

    #[test]
    fn one_holder_at_a_time_and_a_bounded_wait() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_of(&dir.path().join("db"));
        let first = queue
            .turn(Instant::now(), Duration::from_secs(1), Operation::Write)
            .unwrap();
        let start = Instant::now();
        assert!(matches!(
            queue.turn(start, Duration::from_millis(200), Operation::Write),
            Err(Wait::TimedOut)
        ));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2));
        drop(first);
        // The abandoned waiter's thread got the lock and dropped it: the queue is free.
        let again = queue.turn(Instant::now(), Duration::from_secs(5), Operation::Write);
        assert!(again.is_ok());
    }

    #[test]
    fn a_waiter_gets_the_lock_as_soon_as_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_of(&dir.path().join("db"));
        let held = queue
            .turn(Instant::now(), Duration::from_secs(1), Operation::Write)
            .unwrap();
        let other = queue.clone();
        let waiter = std::thread::spawn(move || {
            let start = Instant::now();
            let turn = other.turn(start, Duration::from_secs(10), Operation::Write);
            (turn.is_ok(), start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
        let (ok, waited) = waiter.join().unwrap();
        assert!(ok);
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_sidecar_gets_the_database_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        std::fs::write(&db, b"").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
        queue_of(&db);
        let mode = std::fs::metadata(sidecar(&db))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
