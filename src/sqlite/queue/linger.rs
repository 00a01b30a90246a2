//! The turn of a process that writes back to back, kept between its short writes, and the
//! pause before asking again after a long turn while others queue.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::board::Board;
use super::waiter::WAITER_IDLE;
use crate::operation::Operation;

/// The turn of a process that writes back to back, kept between its short writes.
///
/// Handing the `flock` to another process costs a context switch or two: for writes of a
/// few microseconds, more than the write. So after a short turn (under `turn::YIELD_AFTER`) of a
/// process that has written before, the locked description is kept for [`LINGER`]; the
/// process's next write (from any of its threads) takes it without a system call. A streak
/// of such turns ends [`MAX_STREAK`] after it began: the turn is then released as after a
/// long one (closed, and the CPU yielded). A streak thus holds the turn no longer than one
/// 10 ms write would, and processes writing back to back hand it over a few dozen times a
/// second instead of at every write (BENCHMARKS.md: 8 such processes write about as fast as
/// one). A thread of its own releases a kept turn nobody took.
#[derive(Debug, Default)]
pub(super) struct Linger {
    state: Mutex<Lingering>,
    wake: Condvar,
    /// The queue's waiting board, where a streak learns that another process has starved.
    board: Option<Board>,
    /// Whether this process holds the turn (see [`holds`](Self::holds)).
    holding: std::sync::atomic::AtomicBool,
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
    /// Whether the kept turn is for a thread of this process woken from the board.
    reserved: bool,
}

/// What a process asking for the turn does first.
pub(super) enum Ask {
    /// Takes its kept turn (its description, locked, and when its streak began).
    Kept(File, Instant),
    /// Waits this long before it asks (it has just given back a long turn).
    GiveWay(Duration),
    /// Asks at once.
    Now,
}

/// A short turn not kept for the next write, and why.
pub(super) enum Unkept {
    /// Another process has waited past the board's bound: the streak ends.
    Starved(File),
    /// Not kept: a process's first turn, or a turn already kept, or no releasing thread.
    NotKept(File),
}

/// How long a short turn is kept for the same process's next write.
pub(super) const LINGER: Duration = Duration::from_micros(200);

/// After a long turn given back while others queue, how long the same process waits before
/// it asks again: the waiter the kernel woke needs to be scheduled to take the lock, and on a
/// busy machine that takes longer than the description's close and the yield. In the first
/// rounds of 32 processes x 10 ms writes, while each process started its waiting thread,
/// writers that asked again at once took up to 12 turns ahead of a woken waiter (max wait
/// 1.13 x fair at the median of 19 runs, up to 1.4 x); waiting 300 us first brought the
/// median back to 1.08 x (BENCHMARKS.md).
pub(super) const GIVE_WAY: Duration = Duration::from_micros(300);

/// How long after this process last found the turn taken it gives way after a long turn.
pub(super) const CONTENDED: Duration = Duration::from_secs(1);

/// How long after this process last kept a turn the releasing thread keeps looking.
const ACTIVE: Duration = Duration::from_millis(20);

/// The longest a process keeps the turn through a streak of short writes: long enough that a
/// hand-over (tens of microseconds of wake-ups, context switches and a page cache that
/// another process's commits made stale) is amortized over hundreds of short writes, so that
/// fewer than one write in a hundred waits for another process's streak.
pub(super) const MAX_STREAK: Duration = Duration::from_millis(10);

/// The shortest streak ended for a starved waiter (see `board::STARVING`). A hand-over
/// costs more than a wake-up: the new holder's first transaction runs on caches the others'
/// writes made cold (about 110 us against 50 us for a short write, see
/// `scripts/handover_trace.py`). With 16 processes writing back to back, a 2 ms bound on
/// waiting with 0.2 ms streaks kept the longest wait near 10 ms but the rate at 0.7 x that of
/// SQLite's own locking; a 20 ms bound with 0.5 ms streaks keeps it near 25 ms at 1.5-2.2 x,
/// and 8 processes as fast as one (BENCHMARKS.md, issue 23).
pub(super) const MIN_STREAK: Duration = Duration::from_micros(500);

/// How often the releasing thread looks for a kept turn past its [`LINGER`].
pub(super) const POLL: Duration = Duration::from_millis(1);

impl Linger {
    /// The linger of a queue whose waiting board is `board`.
    pub(super) fn new(board: Option<Board>) -> Self {
        Self {
            board,
            ..Self::default()
        }
    }

    /// The queue's waiting board, if it could be opened.
    pub(super) fn board(&self) -> Option<&Board> {
        self.board.as_ref()
    }

    /// Whether a waiter has waited too long for this process's streak to go on (see
    /// [`Board`]).
    pub(super) fn starving(&self) -> bool {
        self.board.as_ref().is_some_and(Board::starving)
    }

    /// Whether this process holds the turn (a thread's, or kept between its writes).
    pub(super) fn holds(&self) -> bool {
        self.holding.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// This process took the turn (`true`), or is about to give it back (`false`): before
    /// the lock goes, so that a thread of this process taking it next records it after.
    pub(super) fn holding(&self, holds: bool) {
        self.holding
            .store(holds, std::sync::atomic::Ordering::SeqCst);
    }

    /// The turn is about to be given back (see [`holding`](Self::holding)).
    pub(super) fn letting_go(&self) {
        self.holding(false);
    }

    /// The turn was just given back: the board names and wakes the oldest waiter.
    pub(super) fn released(&self) {
        if let Some(board) = &self.board {
            board.released();
        }
    }

    /// This process ended a streak at `now` because a waiter starved: without a board its
    /// next turn gives way first, so that a waiter the kernel has only just woken takes the
    /// turn (with one, the board keeps it for the waiter it names).
    pub(super) fn handed_over(&self, now: Instant) {
        if self.board.is_none() {
            self.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .gave_back = Some(now);
        }
    }

    /// What a turn of `operation` asked for `now` does first.
    pub(super) fn ask(&self, operation: Operation, now: Instant) -> Ask {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if operation == Operation::Write {
            state.turns += 1;
        }
        if !state.reserved {
            if let Some((file, streak)) = state.kept.take() {
                state.release_at = None;
                return Ask::Kept(file, streak);
            }
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
    pub(super) fn waited(&self, now: Instant) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waited = Some(now);
    }

    /// This process gave back a long turn at `now`: its next turn gives way if others have
    /// been queueing.
    pub(super) fn gave_back(&self, now: Instant) {
        if self.board.is_some() {
            // The board names the next holder, and a process asking meanwhile takes a seat.
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state
            .waited
            .is_some_and(|at| now.saturating_duration_since(at) < CONTENDED)
        {
            state.gave_back = Some(now);
        }
    }

    /// Keeps `file` (locked, its streak begun at `streak`) for the next write, or gives it
    /// back if it is not to be kept: also when another process has starved waiting for it
    /// (see [`Board`]).
    pub(super) fn keep(
        self: &Arc<Self>,
        file: File,
        streak: Instant,
        now: Instant,
    ) -> std::result::Result<(), Unkept> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.turns < 2 || state.kept.is_some() {
            return Err(Unkept::NotKept(file));
        }
        if now.saturating_duration_since(streak) >= MIN_STREAK && self.starving() {
            return Err(Unkept::Starved(file));
        }
        if !state.releaser {
            let linger = Arc::clone(self);
            let started = std::thread::Builder::new()
                .name("sqlite-persistence-linger".to_owned())
                .spawn(move || linger.release_unclaimed());
            if started.is_err() {
                return Err(Unkept::NotKept(file));
            }
            state.releaser = true;
        }
        state.kept = Some((file, streak));
        state.release_at = Some(now + LINGER);
        // A thread of this process that has waited past the bound takes the kept turn next:
        // it is woken, and the threads that ask meanwhile take a seat behind it.
        state.reserved = self.board.as_ref().is_some_and(Board::wake_own_starving);
        if state.idle {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The kept turn (its description, locked, and when its streak began), taken by a
    /// waiting thread of this process.
    pub(super) fn take_kept(&self) -> Option<(File, Instant)> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = state.kept.take()?;
        state.release_at = None;
        state.reserved = false;
        Some(kept)
    }

    /// Releases the kept turn now (the handle closes).
    pub(super) fn release(&self) {
        let kept = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.release_at = None;
            state.reserved = false;
            state.kept.take()
        };
        if kept.is_some() {
            self.letting_go();
            drop(kept);
            self.released();
        }
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
                    state.reserved = false;
                    let kept = state.kept.take();
                    drop(state);
                    // Closing the description releases the lock.
                    if kept.is_some() {
                        self.letting_go();
                        drop(kept);
                        self.released();
                    }
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
