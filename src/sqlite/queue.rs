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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, FileOperation, Operation, Result};
use crate::holders::HeldLock;
use crate::operation::{DB_SYSTEM, ERROR_TYPE_BUSY};
use crate::retry::{retry_attempts, Attempt, RetryPolicy, Started, Success, Try};
use crate::sqlite::lock_table::{holders_of, Record};

/// The write queue of one database file.
#[derive(Debug, Clone)]
pub(crate) struct WriteQueue {
    path: Arc<Path>,
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

/// The turn of a process that writes back to back, kept between its short writes.
///
/// Handing the `flock` to another process costs a context switch or two: for writes of a
/// few microseconds, more than the write. So after a short turn (under [`YIELD_AFTER`]) of a
/// process that has written before, the locked description is kept for [`LINGER`]; the
/// process's next write (from any of its threads) takes it without a system call. A streak
/// of such turns ends [`MAX_STREAK`] after it began: the turn is then released as after a
/// long one (closed, and the CPU yielded). A streak thus holds the turn no longer than one
/// 10 ms write would, and processes writing back to back hand it over a few dozen times a
/// second instead of at every write (BENCHMARKS.md: 8 such processes write about as fast as
/// one). A thread of its own releases a kept turn nobody took.
#[derive(Debug, Default)]
struct Linger {
    state: Mutex<Lingering>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Lingering {
    /// The kept turn's locked description and when its streak began.
    kept: Option<(File, Instant)>,
    /// When the kept turn is released if no write takes it.
    release_at: Option<Instant>,
    /// Write turns this process has taken: the first never lingers (a process that writes
    /// once, then exits, starts no thread for it), nor does the open's (the journal-mode
    /// switch, the migrations).
    turns: u64,
    /// Whether the releasing thread runs, and whether it sleeps until a turn is kept.
    releaser: bool,
    idle: bool,
    /// When this process last found the turn taken by another.
    waited: Option<Instant>,
    /// When this process last gave back a long turn while others were queueing (see
    /// [`GIVE_WAY`]).
    gave_back: Option<Instant>,
}

/// What a process asking for the turn does first.
enum Ask {
    /// Takes its kept turn (its description, locked, and when its streak began).
    Kept(File, Instant),
    /// Waits this long before it asks (it has just given back a long turn).
    GiveWay(Duration),
    /// Asks at once.
    Now,
}

/// How long a short turn is kept for the same process's next write.
const LINGER: Duration = Duration::from_micros(200);

/// After a long turn given back while others queue, how long the same process waits before
/// it asks again: the waiter the kernel woke needs to be scheduled to take the lock, and on a
/// busy machine that takes longer than the description's close and the yield. In the first
/// rounds of 32 processes x 10 ms writes, while each process started its waiting thread,
/// writers that asked again at once took up to 12 turns ahead of a woken waiter (max wait
/// 1.13 x fair at the median of 19 runs, up to 1.4 x); waiting 300 us first brought the
/// median back to 1.08 x (BENCHMARKS.md).
const GIVE_WAY: Duration = Duration::from_micros(300);

/// How long after this process last found the turn taken it gives way after a long turn.
const CONTENDED: Duration = Duration::from_secs(1);

/// How long after this process last kept a turn the releasing thread keeps looking.
const ACTIVE: Duration = Duration::from_millis(20);

/// The longest a process keeps the turn through a streak of short writes: long enough that a
/// hand-over (tens of microseconds of wake-ups, context switches and a page cache that
/// another process's commits made stale) is amortized over hundreds of short writes, so that
/// fewer than one write in a hundred waits for another process's streak.
const MAX_STREAK: Duration = Duration::from_millis(10);

/// How often the releasing thread looks for a kept turn past its [`LINGER`].
const POLL: Duration = Duration::from_millis(1);

impl Linger {
    /// What a turn of `operation` asked for `now` does first.
    fn ask(&self, operation: Operation, now: Instant) -> Ask {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if operation == Operation::Write {
            state.turns += 1;
        }
        if let Some((file, streak)) = state.kept.take() {
            state.release_at = None;
            return Ask::Kept(file, streak);
        }
        match state
            .gave_back
            .map(|at| (at + GIVE_WAY).saturating_duration_since(now))
        {
            Some(left) if !left.is_zero() => Ask::GiveWay(left),
            _ => Ask::Now,
        }
    }

    /// This process found the turn taken at `now`.
    fn waited(&self, now: Instant) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waited = Some(now);
    }

    /// This process gave back a long turn at `now`: its next turn gives way if others have
    /// been queueing.
    fn gave_back(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state
            .waited
            .is_some_and(|at| now.saturating_duration_since(at) < CONTENDED)
        {
            state.gave_back = Some(now);
        }
    }

    /// Keeps `file` (locked, its streak begun at `streak`) for the next write, or gives it
    /// back if it is not to be kept.
    fn keep(
        self: &Arc<Self>,
        file: File,
        streak: Instant,
        now: Instant,
    ) -> std::result::Result<(), File> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.turns < 2 || state.kept.is_some() {
            return Err(file);
        }
        if !state.releaser {
            let linger = Arc::clone(self);
            let started = std::thread::Builder::new()
                .name("sqlite-persistence-linger".to_owned())
                .spawn(move || linger.release_unclaimed());
            if started.is_err() {
                return Err(file);
            }
            state.releaser = true;
        }
        state.kept = Some((file, streak));
        state.release_at = Some(now + LINGER);
        if state.idle {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Releases the kept turn now (the handle closes).
    fn release(&self) {
        let kept = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.release_at = None;
            state.kept.take()
        };
        drop(kept);
    }

    /// The releasing thread: closes a kept turn past its deadline. While this process keeps
    /// turns (within [`ACTIVE`] of the last one) it looks every [`POLL`], so that
    /// keeping a turn costs a write's path no system call; after that it sleeps until a turn
    /// is kept again (which then wakes it), and exits after [`WAITER_IDLE`] without one.
    fn release_unclaimed(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut active = Instant::now();
        loop {
            let now = Instant::now();
            match state.release_at {
                Some(at) if now >= at => {
                    state.release_at = None;
                    let kept = state.kept.take();
                    drop(state);
                    // Closing the description releases the lock.
                    drop(kept);
                    state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                    active = now;
                    continue;
                }
                Some(_) => active = now,
                None if now.saturating_duration_since(active) >= ACTIVE => {
                    state.idle = true;
                    let (next, wait) = self
                        .wake
                        .wait_timeout(state, WAITER_IDLE)
                        .unwrap_or_else(PoisonError::into_inner);
                    state = next;
                    state.idle = false;
                    if wait.timed_out() && state.release_at.is_none() {
                        state.releaser = false;
                        return;
                    }
                    active = Instant::now();
                    continue;
                }
                None => {}
            }
            drop(state);
            std::thread::sleep(POLL);
            state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The one thread per queue that blocks in `flock` on behalf of this process's waiting
/// threads, in their arrival order, and hands each its locked description (or releases it,
/// if the thread gave up meanwhile). `flock` has no timeout; a thread per wait would stay
/// blocked after its caller gave up, one more for every timed-out write behind a stuck
/// holder. The thread exits when no request came for [`WAITER_IDLE`].
#[derive(Debug, Default)]
struct Waiter {
    state: Mutex<Waiting>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct Waiting {
    requests: VecDeque<Request>,
    /// Whether the waiter thread runs.
    running: bool,
}

/// One thread's wait: its description of the sidecar, where to deliver it locked, and
/// whether it gave up.
#[derive(Debug)]
struct Request {
    file: File,
    deliver: mpsc::SyncSender<std::io::Result<File>>,
    gave_up: Arc<AtomicBool>,
}

/// A process records its turns in the sidecar at most this often, for one operation.
const RECORD_EVERY: Duration = Duration::from_millis(100);

/// A wait for the turn this long is logged, naming the holder.
pub(crate) const LONG_WAIT: Duration = Duration::from_secs(1);

/// How long the waiter thread stays for another request before it exits.
const WAITER_IDLE: Duration = Duration::from_secs(5);

impl Waiter {
    /// Queues `request`, starting the waiter thread if none runs; gives the request back if
    /// no thread could be started (at the thread limit).
    fn submit(self: &Arc<Self>, request: Request) -> std::result::Result<(), Request> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.requests.push_back(request);
        if state.running {
            self.arrived.notify_one();
            return Ok(());
        }
        let waiter = Arc::clone(self);
        match std::thread::Builder::new()
            .name("sqlite-persistence-queue".to_owned())
            .spawn(move || waiter.serve())
        {
            Ok(_) => {
                state.running = true;
                Ok(())
            }
            Err(_) => Err(state.requests.pop_back().expect("just queued")),
        }
    }

    fn serve(&self) {
        loop {
            let Request {
                file,
                deliver,
                gave_up,
            } = {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(request) = state.requests.pop_front() {
                        break request;
                    }
                    let (next, wait) = self
                        .arrived
                        .wait_timeout(state, WAITER_IDLE)
                        .unwrap_or_else(PoisonError::into_inner);
                    state = next;
                    if wait.timed_out() && state.requests.is_empty() {
                        state.running = false;
                        return;
                    }
                }
            };
            if gave_up.load(Ordering::SeqCst) {
                continue;
            }
            // If the thread gave up while this blocked, the send fails and the file, and
            // with it the lock, is dropped.
            let _ = deliver.send(file.lock().map(|()| file));
        }
    }
}

/// A place in the queue: the lock is held until this is dropped.
#[derive(Debug)]
pub(crate) struct Turn {
    path: Arc<Path>,
    file: Option<File>,
    taken: Instant,
    /// When this process's streak of short turns began (see [`Linger`]).
    streak: Instant,
    linger: Option<Arc<Linger>>,
}

/// The most sidecar descriptions a thread keeps open between turns.
const IDLE_PER_THREAD: usize = 4;

thread_local! {
    /// This thread's open descriptions of sidecar files, unlocked, kept after short turns: the
    /// next turn then costs two `flock` calls instead of an open, two `flock` calls and a
    /// close. Each thread has its own (flock locks belong to the open file description), so
    /// the threads of one process still queue against each other.
    static IDLE: RefCell<Vec<(Arc<Path>, File)>> = const { RefCell::new(Vec::new()) };
}

fn take_idle(path: &Path) -> Option<File> {
    IDLE.with_borrow_mut(|idle| {
        let i = idle.iter().position(|(p, _)| **p == *path)?;
        Some(idle.swap_remove(i).1)
    })
}

fn give_back(path: Arc<Path>, file: File) {
    IDLE.with_borrow_mut(|idle| {
        if idle.len() < IDLE_PER_THREAD {
            idle.push((path, file));
        }
    });
}

/// A turn held at least this long closes its description and yields the CPU when it ends
/// (see [`Turn`]'s `Drop`).
const YIELD_AFTER: Duration = Duration::from_millis(1);

impl Turn {
    /// The turn `file` locks, taken at `taken`.
    fn new(path: Arc<Path>, file: File, linger: &Arc<Linger>, taken: Instant) -> Self {
        Self {
            path,
            file: Some(file),
            taken,
            streak: taken,
            linger: Some(Arc::clone(linger)),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // flock wakes its waiters but does not hand the lock over: a writer that asks again
        // at once would win the race against a waiter the kernel has only just woken, turn
        // after turn. So after a long turn (others may have waited long, and a context switch
        // is noise), close the description and yield, so that the next turn also pays an
        // open; if others have been queueing, the process's next turn also gives way a
        // moment (see `GIVE_WAY`). After a turn of microseconds, barging costs the waiters
        // little, and both the yield and the open would cost short writes most of their
        // speed: unlock, and keep the description for this thread's next turn.
        let Some(file) = self.file.take() else {
            return;
        };
        let now = Instant::now();
        let short = now.saturating_duration_since(self.taken) < YIELD_AFTER;
        let streaking = now.saturating_duration_since(self.streak) < MAX_STREAK;
        let file = match &self.linger {
            Some(linger) if short && streaking && !std::thread::panicking() => {
                match linger.keep(file, self.streak, now) {
                    Ok(()) => return,
                    Err(file) => file,
                }
            }
            _ => file,
        };
        // A streak that ran its length ends as a long turn does.
        if !short || !streaking {
            drop(file);
            std::thread::yield_now();
            if !short {
                if let Some(linger) = &self.linger {
                    linger.gave_back(now);
                }
            }
        } else if file.unlock().is_ok() {
            give_back(self.path.clone(), file);
        }
        // (If unlocking failed, dropping the file closed it, which releases the lock.)
    }
}

/// The sidecar's permission bits for a database file of mode `mode`: the database's, with
/// read permission only for the classes that may also write it.
#[cfg(unix)]
fn sidecar_mode(mode: u32) -> u32 {
    let writable = mode & 0o222;
    (mode & 0o666 & !0o444) | (mode & 0o444 & (writable << 1))
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
            path: sidecar.into(),
            database: database.into(),
            record: None,
            recorded: Arc::default(),
            waiter: Arc::default(),
            linger: Arc::default(),
        };
        match queue.create(database).and_then(|()| queue.open().map(drop)) {
            Ok(()) => {
                queue.record = queue.open_for_records().map(Arc::new);
                Some(queue)
            }
            Err(error) => {
                tracing::warn!(
                    queue = %queue.path.display(),
                    error = %crate::error::error_chain(&error),
                    "the write queue cannot be used; writers wait with SQLite's busy handler \
                     and the retry policy alone"
                );
                None
            }
        }
    }

    /// Creates the sidecar if it does not exist.
    fn create(&self, database: &Path) -> Result<()> {
        let mut create = OpenOptions::new();
        create.read(true).write(true).create_new(true);
        #[cfg(unix)]
        let owner = {
            use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
            let meta = std::fs::metadata(database).ok();
            let mode = meta.as_ref().map_or(0o600, |m| sidecar_mode(m.mode()));
            create.mode(mode).custom_flags(libc::O_NOFOLLOW);
            (mode, meta.map(|m| (m.uid(), m.gid())))
        };
        let file = match create.open(&self.path) {
            Ok(file) => file,
            // Another process made it first, or it is a symbolic link: `open` tells which.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(source) => return Err(self.io_error(FileOperation::CreateQueue)(source)),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let (mode, owner) = owner;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(self.io_error(FileOperation::SetPermissions))?;
            if let (true, Some((uid, gid))) = (crate::sqlite::ffi::sys::is_root(), owner) {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                    .map_err(self.io_error(FileOperation::SetPermissions))?;
            }
        }
        Ok(())
    }

    fn io_error(&self, operation: FileOperation) -> impl FnOnce(std::io::Error) -> Error {
        let path = self.path.to_path_buf();
        move |source| Error::Io {
            operation,
            path,
            source,
        }
    }

    fn open(&self) -> Result<File> {
        // Its own open file description: flock locks belong to the description, so threads of
        // one process queue against each other as processes do. Never through a symbolic
        // link, never creating it (it is made once, in `create`); flock needs no write access.
        let mut open = OpenOptions::new();
        open.read(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NOFOLLOW);
        let file = open
            .open(&self.path)
            .map_err(self.io_error(FileOperation::OpenQueue))?;
        let regular = file
            .metadata()
            .map_err(self.io_error(FileOperation::OpenQueue))?
            .is_file();
        if !regular {
            return Err(self.io_error(FileOperation::OpenQueue)(
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        Ok(file)
    }

    /// The sidecar open for writing its holder record, if this process may (never through a
    /// symbolic link, only a regular file).
    fn open_for_records(&self) -> Option<File> {
        let mut open = OpenOptions::new();
        open.write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NOFOLLOW);
        let file = open.open(&self.path).ok()?;
        file.metadata().ok()?.is_file().then_some(file)
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
                let mut turn = Turn::new(self.path.clone(), file, &self.linger, start);
                turn.streak = streak;
                return Ok(turn);
            }
            Ask::GiveWay(pause) => {
                std::thread::sleep(pause.min(timeout));
                Instant::now()
            }
            Ask::Now => start,
        };
        let file = match take_idle(&self.path) {
            Some(file) => file,
            None => self.open().map_err(Wait::Failed)?,
        };
        match file.try_lock() {
            Ok(()) => return Ok(Turn::new(self.path.clone(), file, &self.linger, asked)),
            Err(TryLockError::WouldBlock) => self.linger.waited(asked),
            Err(TryLockError::Error(source)) => {
                return Err(Wait::Failed(self.io_error(FileOperation::LockQueue)(
                    source,
                )))
            }
        }
        let (deliver, receiver) = mpsc::sync_channel(1);
        let gave_up = Arc::new(AtomicBool::new(false));
        let request = Request {
            file,
            deliver,
            gave_up: Arc::clone(&gave_up),
        };
        if let Err(request) = self.waiter.submit(request) {
            // At the process's or the user's thread limit: poll instead. Bounded still, no
            // longer in arrival order.
            drop(request);
            tracing::warn!(
                queue = %self.path.display(),
                "cannot start the write queue's waiting thread; polling for the turn"
            );
            return self.poll(start, timeout);
        }
        let mut received =
            receiver.recv_timeout(timeout.saturating_sub(start.elapsed()).min(LONG_WAIT));
        if received.is_err() && timeout > LONG_WAIT {
            self.log_long_wait(operation);
            received = receiver.recv_timeout(timeout.saturating_sub(start.elapsed()));
        }
        match received {
            Ok(Ok(file)) => Ok(Turn::new(
                self.path.clone(),
                file,
                &self.linger,
                Instant::now(),
            )),
            Ok(Err(source)) => Err(Wait::Failed(self.io_error(FileOperation::LockQueue)(
                source,
            ))),
            Err(_) => {
                gave_up.store(true, Ordering::SeqCst);
                Err(Wait::TimedOut)
            }
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
            db.namespace = %self.database.display(),
            db.operation.name = operation.as_str(),
            operation = operation.as_str(),
            waited_ms = LONG_WAIT.as_millis() as u64,
            held_by = %if holders.is_empty() { "unknown".to_owned() } else { holders.join(", ") },
            "waiting for the write queue"
        );
    }

    /// Waits at most `timeout` for the lock by trying it every few milliseconds.
    fn poll(&self, start: Instant, timeout: Duration) -> Result<Turn, Wait> {
        let file = self.open().map_err(Wait::Failed)?;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(Turn::new(
                        self.path.clone(),
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
                    return Err(Wait::Failed(self.io_error(FileOperation::LockQueue)(
                        source,
                    )))
                }
            }
        }
    }
}

/// Takes the write turn in `queue` (if there is one), then runs `attempt` under the retry
/// policy until it succeeds or fails for good; the turn is held throughout. Queueing and
/// retrying share one deadline. This is how the journal-mode switch, the migration batch
/// and every `write` take the write lock: the turn is never awaited while holding a SQLite
/// lock, because it comes first. The deadline counts from when it `started`.
pub(crate) fn locked<T, E>(
    queue: Option<&WriteQueue>,
    policy: &RetryPolicy,
    started: Started<'_>,
    operation: Operation,
    database: &Path,
    attempt: impl FnMut(Try) -> Result<T, Attempt<E>>,
) -> Result<Success<T>, E>
where
    E: From<Error> + 'static,
{
    let (turn, policy) = wait_turn(queue, started.at, operation, policy, database)?;
    // A turn had at once was taken when the operation started: no clock read for the retry
    // loop's start.
    let attempts = match &turn {
        Some(turn) if turn.taken != started.at => Started::now(started.clock),
        _ => started,
    };
    let outcome = retry_attempts(&policy, attempts, operation, database, attempt);
    drop(turn);
    outcome
}

/// Takes a turn in `queue` (if there is one) for `operation`, waiting at most the policy's
/// deadline from `start` (now). Returns the turn and the policy left for the operation itself: its deadline
/// shortened by the time spent queueing, so that the whole stays within one deadline.
fn wait_turn(
    queue: Option<&WriteQueue>,
    start: Instant,
    operation: Operation,
    policy: &RetryPolicy,
    database: &Path,
) -> Result<(Option<Turn>, RetryPolicy)> {
    let Some(queue) = queue else {
        return Ok((None, *policy));
    };
    match queue.turn(start, policy.deadline(), operation) {
        Ok(turn) => {
            // (No clock read: a turn had without waiting was taken at `start`.)
            let left = policy
                .deadline()
                .saturating_sub(turn.taken.saturating_duration_since(start));
            Ok((Some(turn), policy.max_elapsed(left)))
        }
        Err(Wait::Failed(error)) => {
            // The sidecar was usable at open and is not now (removed, replaced): do without.
            tracing::warn!(
                operation = operation.as_str(),
                queue = %queue.path.display(),
                error = %crate::error::error_chain(&error),
                "the write queue cannot be used; waiting with SQLite's locks alone"
            );
            Ok((None, *policy))
        }
        Err(Wait::TimedOut) => {
            let elapsed = start.elapsed();
            tracing::error!(
                db.system.name = DB_SYSTEM,
                db.namespace = %database.display(),
                db.operation.name = operation.as_str(),
                error.type = ERROR_TYPE_BUSY,
                operation = operation.as_str(),
                elapsed_ms = elapsed.as_millis() as u64,
                queue = %queue.path.display(),
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
                        queue.path.display()
                    ),
                )),
                holders: holders_of(database),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(db: &Path) -> PathBuf {
        PathBuf::from(format!("{}-lock", db.display()))
    }

    fn queue_of(db: &Path) -> WriteQueue {
        WriteQueue::new(db, sidecar(db)).unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn only_those_who_may_write_the_database_may_read_the_sidecar() {
        assert_eq!(sidecar_mode(0o600), 0o600);
        assert_eq!(sidecar_mode(0o644), 0o600);
        assert_eq!(sidecar_mode(0o640), 0o600);
        assert_eq!(sidecar_mode(0o660), 0o660);
        assert_eq!(sidecar_mode(0o664), 0o660);
        assert_eq!(sidecar_mode(0o666), 0o666);
        assert_eq!(sidecar_mode(0o100644), 0o600);
        assert_eq!(sidecar_mode(0o444), 0o000);
    }

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
        // The first turn of a process is never kept: one that writes once starts no thread.
        short();
        assert!(free(&db));
        // The second is kept for a moment ...
        short();
        assert!(!free(&db), "the turn was not kept");
        // ... and released when nobody takes it.
        let start = Instant::now();
        while !free(&db) {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "the kept turn was never released"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(start.elapsed() < LINGER + POLL + Duration::from_millis(50));
        // Closing the database gives a kept turn back at once.
        short();
        assert!(!free(&db));
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
