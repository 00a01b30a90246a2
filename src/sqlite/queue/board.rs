//! The waiting board: a page of the queue's file, mapped by every process of this crate
//! that writes the database, where each waiting thread takes a seat saying since when it
//! waits, and the holder of the turn, when it gives the turn back, names the oldest as the
//! next and wakes only that one (a futex on its seat).
//!
//! Without it, waiters block in `flock`, and a release wakes every one of them: on a busy
//! machine the next turn goes to whichever is scheduled first, after as many context
//! switches as there are waiters. With it, a hand-over costs one wake-up and the turn goes
//! in arrival order. A process keeping the turn through a streak of short writes ends the
//! streak as soon as a seat has waited [`STARVING`] (as Linux's mutex hands off to a waiter
//! that has starved), so that a waiter waits for about the writes ahead of it, not a streak
//! of every other process.
//!
//! The `flock` still decides who holds the turn, and is released by the kernel when its
//! process dies; the board only orders and wakes. A process that asks while another is
//! named next does not try the lock for [`HANDOFF`] (it takes a seat instead); after that
//! anyone may. Every sleep on the board is bounded by [`BACKSTOP`], after which the sleeper
//! tries the lock itself. A seated waiter shows it is alive at least that often; a seat not
//! shown alive for [`STALE`] (its process died, was stopped, or lives in another pid
//! namespace) is passed over and may be taken by another waiter. When nobody has been named
//! for a [`BACKSTOP`] (the holders are processes of an older version of this crate, which
//! block in `flock` and name nobody), a seated waiter blocks in `flock` too, as they do, and
//! so do waiters beyond the board's 126 seats. Whoever may write the database may write the
//! board, and can slow hand-overs with it, never stop a write: a waiter that has sat five
//! backstops tries the lock whoever is named; that user can as well hold the lock itself.
//! Like SQLite's `-shm`, the page is mapped: shrinking the file under running writers kills
//! them with `SIGBUS` (only users who may write the database may write the file).
//!
//! Layout, from byte 4096 of `<database>-lock` (one page): at 0 `SPW2`; at 4 the number of
//! seats taken; at 8 the seat named next; at 16 when it was named (nanoseconds of the
//! system's monotonic clock, one clock for every process of the machine); at 24 whether a
//! checkpoint run outside the turn is to be finished by the next holder; at 32 since when
//! one runs (0: none); from 64, 126 seats of 32 bytes: the owner (pid and a number of the
//! process's own, never 0), since when it waits, its futex word, and when its waiter last
//! showed it was alive.

use std::cell::Cell;
use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::sqlite::ffi::page::{futex_wait, futex_wake, SharedPage, PAGE};
use crate::sqlite::ffi::sys::monotonic_ns;

/// A seat that has waited this long ends the streak of the process keeping the turn: the
/// bound on a short write's wait however many processes write back to back.
///
/// A hand-over between processes costs about two short writes on a 2-core machine (the
/// woken waiter's wake-up, and its first transaction on caches the others' writes made
/// cold: `scripts/handover_trace.py`). Each of n + 1 processes writing back to back waits
/// about the bound S once per round of the others' streaks, so about n w / S of their writes
/// wait it (w the time of one write): with 16 processes and 20 ms, 4 % (p99 wait 20 ms, max
/// 25 ms). A bound of 100 ms made that under 1 % at 16 processes on an idle machine (p99
/// 0.1-5 ms, max 100 ms), but 1-2 % from 24 processes up or beside CPU hogs, where the p99
/// became the whole 100 ms; 4 ms with 0.1 ms streaks made the p99 5 ms at 0.87-1.05 x the
/// rate of SQLite's own locking (BENCHMARKS.md, issue 23).
pub(super) const STARVING: Duration = Duration::from_millis(20);

/// How long the seat named next has to take the turn before anyone may try it.
pub(super) const HANDOFF: Duration = Duration::from_millis(2);

/// The longest sleep on the board before the sleeper tries the lock itself.
pub(super) const BACKSTOP: Duration = Duration::from_millis(20);

/// A seat whose waiter has not shown it is alive for this long is passed over, and may be
/// taken by another waiter: its process died, was stopped, or cannot be seen from here (a
/// pid of another namespace).
const STALE: Duration = Duration::from_millis(200);

/// A checkpoint recorded as running longer than this is taken for abandoned.
const CHECKPOINT_STALE: Duration = Duration::from_secs(1);

/// Where the board starts in the queue's file: past the holder and checkpoint records, on a
/// page of its own.
const BOARD_AT: u64 = 4096;
const MAGIC: u32 = u32::from_le_bytes(*b"SPW2");
const MAGIC_AT: usize = 0;
const SEATED_AT: usize = 4;
const NEXT_AT: usize = 8;
const NAMED_AT: usize = 16;
const FINISH_AT: usize = 24;
const CHECKPOINTING_AT: usize = 32;
const SEATS_AT: usize = 64;
const SEAT_LEN: usize = 32;
const SEATS: usize = (PAGE - SEATS_AT) / SEAT_LEN;

/// This process's mapping of one queue's board.
#[derive(Debug)]
pub(super) struct Board {
    page: SharedPage,
    pid: u32,
}

/// Numbers this process's seats (on every board: two handles of one database have a board
/// each), so that each wait has an owner of its own.
static SERIAL: AtomicU32 = AtomicU32::new(1);

/// A seat's owner, since when it waits, its futex word, and when its waiter last showed it
/// was alive.
struct SeatWords<'a> {
    owner: &'a AtomicU64,
    since: &'a AtomicU64,
    wake: &'a AtomicU32,
    seen: &'a AtomicU64,
}

impl SeatWords<'_> {
    /// The seat's owner and since when it waits, if it is taken by a waiter that showed it
    /// was alive within [`STALE`] of `now` (a waiter looks at least every [`BACKSTOP`]).
    fn live(&self, now: u64) -> Option<(u64, u64)> {
        let owner = self.owner.load(SeqCst);
        let since = self.since.load(SeqCst);
        let seen = self.seen.load(SeqCst);
        (owner != 0
            && since != 0
            && since <= now
            && seen <= now
            && now - seen < STALE.as_nanos() as u64)
            .then_some((owner, since))
    }
}

impl Board {
    /// The board of the queue's file `file` (open for reading and writing), grown to hold
    /// it if it is shorter (never shrunk).
    pub(super) fn open(file: &File) -> std::io::Result<Self> {
        let end = BOARD_AT + PAGE as u64;
        if file.metadata()?.len() < end {
            file.set_len(end)?;
        }
        let page = SharedPage::map(file, BOARD_AT)?;
        let _ = page
            .u32_at(MAGIC_AT)
            .compare_exchange(0, MAGIC, SeqCst, SeqCst);
        Ok(Self {
            page,
            pid: std::process::id(),
        })
    }

    fn seat(&self, i: usize) -> SeatWords<'_> {
        let at = SEATS_AT + i * SEAT_LEN;
        SeatWords {
            owner: self.page.u64_at(at),
            since: self.page.u64_at(at + 8),
            wake: self.page.u32_at(at + 16),
            seen: self.page.u64_at(at + 24),
        }
    }

    fn next(&self) -> &AtomicU64 {
        self.page.u64_at(NEXT_AT)
    }

    fn named(&self) -> &AtomicU64 {
        self.page.u64_at(NAMED_AT)
    }

    fn seated(&self) -> &AtomicU32 {
        self.page.u32_at(SEATED_AT)
    }

    /// Whether another seat than `me` (0: any) is named next and still has time to take
    /// the turn: then nobody else tries the lock.
    pub(super) fn reserved_for_other(&self, me: u64) -> bool {
        let next = self.next().load(SeqCst);
        if next == 0 || next == me {
            return false;
        }
        let named = self.named().load(SeqCst);
        let now = monotonic_ns();
        named <= now && now - named < HANDOFF.as_nanos() as u64
    }

    /// A checkpoint ran after its write gave the turn back: the next holder of the turn
    /// finishes it (see `queue::release_before_checkpoint`).
    pub(super) fn finish_due(&self) {
        self.page.u32_at(FINISH_AT).store(1, SeqCst);
    }

    /// Records that this process runs a checkpoint outside the turn; `false` if another
    /// does (since less than [`CHECKPOINT_STALE`]).
    pub(super) fn begin_checkpoint(&self) -> bool {
        let word = self.page.u64_at(CHECKPOINTING_AT);
        let now = monotonic_ns().max(1);
        let seen = word.load(SeqCst);
        if seen != 0 && seen <= now && now - seen < CHECKPOINT_STALE.as_nanos() as u64 {
            return false;
        }
        word.compare_exchange(seen, now, SeqCst, SeqCst).is_ok()
    }

    /// The checkpoint recorded by [`begin_checkpoint`](Self::begin_checkpoint) is over.
    pub(super) fn end_checkpoint(&self) {
        self.page.u64_at(CHECKPOINTING_AT).store(0, SeqCst);
    }

    /// Whether a checkpoint is to be finished, now taken on by the caller.
    pub(super) fn take_finish(&self) -> bool {
        self.page.u32_at(FINISH_AT).load(SeqCst) != 0
            && self.page.u32_at(FINISH_AT).swap(0, SeqCst) != 0
    }

    /// Takes a seat for a wait that began at `asked`; `None` if every seat is taken.
    pub(super) fn sit(&self, asked: Instant) -> Option<Seat<'_>> {
        let serial = loop {
            let serial = SERIAL.fetch_add(1, SeqCst);
            if serial != 0 {
                break serial;
            }
        };
        let me = (u64::from(self.pid) << 32) | u64::from(serial);
        let since = monotonic_ns()
            .saturating_sub(asked.elapsed().as_nanos() as u64)
            .max(1);
        self.take_seat(me, since).map(|index| Seat {
            board: self,
            index: Cell::new(index),
            me,
            since,
        })
    }

    /// Takes a seat for `me`, waiting since `since`: a free one, else one whose waiter is
    /// gone (its count is left as it was). Its index; `None` if every seat is taken.
    fn take_seat(&self, me: u64, since: u64) -> Option<usize> {
        let start = (self.pid as usize)
            .wrapping_mul(31)
            .wrapping_add(me as u32 as usize)
            % SEATS;
        let now = monotonic_ns();
        // A free seat first: a seat passed over may be its waiter's again once it shows it
        // is alive (it was stopped, or starved of the CPU).
        let (i, free) = [true, false].into_iter().find_map(|free| {
            (0..SEATS).map(|k| (start + k) % SEATS).find_map(|i| {
                let seat = self.seat(i);
                let owner = seat.owner.load(SeqCst);
                if (owner == 0) != free || owner != 0 && seat.live(now).is_some() {
                    return None;
                }
                seat.owner
                    .compare_exchange(owner, me, SeqCst, SeqCst)
                    .is_ok()
                    .then_some((i, free))
            })
        })?;
        let seat = self.seat(i);
        seat.seen.store(0, SeqCst);
        seat.since.store(since, SeqCst);
        seat.seen.store(monotonic_ns(), SeqCst);
        if free {
            self.seated().fetch_add(1, SeqCst);
        }
        Some(i)
    }

    /// Whether a seat of another process has waited longer than [`STARVING`]. This
    /// process's own waiting threads do not end its streak: any of its threads takes the
    /// turn kept between its writes, so its writes go on at the pace of one connection.
    pub(super) fn starving(&self) -> bool {
        if self.seated().load(SeqCst) == 0 {
            return false;
        }
        let now = monotonic_ns();
        let bound = STARVING.as_nanos() as u64;
        (0..SEATS).any(|i| {
            self.seat(i).live(now).is_some_and(|(owner, since)| {
                (owner >> 32) as u32 != self.pid && now - since > bound
            })
        })
    }

    /// Wakes this process's longest-waiting seat if it has waited past [`STARVING`]: the
    /// turn this process keeps between its writes is for it. Whether it woke one.
    pub(super) fn wake_own_starving(&self) -> bool {
        if self.seated().load(SeqCst) == 0 {
            return false;
        }
        let now = monotonic_ns();
        let bound = STARVING.as_nanos() as u64;
        let oldest = (0..SEATS)
            .filter_map(|i| {
                let (owner, since) = self.seat(i).live(now)?;
                ((owner >> 32) as u32 == self.pid && now - since > bound).then_some((since, i))
            })
            .min();
        let Some((_, i)) = oldest else {
            return false;
        };
        let seat = self.seat(i);
        seat.wake.fetch_add(1, SeqCst);
        futex_wake(seat.wake, 1);
        true
    }

    /// The turn was just given back: names the oldest seat next and wakes it (nobody, if no
    /// seat is taken).
    pub(super) fn released(&self) {
        if self.seated().load(SeqCst) == 0 {
            return;
        }
        let now = monotonic_ns();
        let oldest = (0..SEATS)
            .filter_map(|i| {
                let (owner, since) = self.seat(i).live(now)?;
                Some((since, i, owner))
            })
            .min();
        let Some((_, i, owner)) = oldest else {
            return;
        };
        self.named().store(now, SeqCst);
        self.next().store(owner, SeqCst);
        let seat = self.seat(i);
        // Named, it is to show it is alive again within a BACKSTOP (it does when it wakes
        // and does not get the turn), else it is passed over as stale: a waiter that does not
        // wake (stopped, or starved of the CPU) is not named again, nor ends streaks, until
        // it shows it is alive; it keeps its place then (see `Seat::alive`). Before, every
        // hand-over held back HANDOFF for it until it went stale.
        let _ = seat.seen.fetch_min(
            now.saturating_sub((STALE - BACKSTOP).as_nanos() as u64),
            SeqCst,
        );
        seat.wake.fetch_add(1, SeqCst);
        futex_wake(seat.wake, 1);
    }
}

/// A seat taken on the board, given up when dropped.
pub(super) struct Seat<'a> {
    board: &'a Board,
    /// Which seat: another once this one was passed over and taken by another waiter.
    index: Cell<usize>,
    me: u64,
    /// Since when its waiter waits.
    since: u64,
}

impl Seat<'_> {
    /// The seat's futex word now: a wake-up after this changes it.
    pub(super) fn generation(&self) -> u32 {
        self.board.seat(self.index.get()).wake.load(SeqCst)
    }

    /// Whether this seat may try the lock now: it is named next, or nobody else is.
    pub(super) fn may_try(&self) -> bool {
        !self.board.reserved_for_other(self.me)
    }

    /// This seat took the turn: if it was named next, the name is spent.
    pub(super) fn took_turn(&self) {
        let _ = self
            .board
            .next()
            .compare_exchange(self.me, 0, SeqCst, SeqCst);
    }

    /// Whether a holder named a seat within the last [`BACKSTOP`]: the holders are of this
    /// version, which hand over through the board.
    pub(super) fn naming_recently(&self) -> bool {
        let named = self.board.named().load(SeqCst);
        let now = monotonic_ns();
        named <= now && now - named < BACKSTOP.as_nanos() as u64
    }

    /// Shows the seat's waiter is alive (see [`STALE`]). A seat passed over and taken by
    /// another waiter meanwhile (this one was stopped, or starved of the CPU) is replaced by
    /// another, waiting since the same time: the waiter keeps its place in the order.
    pub(super) fn alive(&self) {
        let seat = self.board.seat(self.index.get());
        if seat.owner.load(SeqCst) == self.me {
            seat.seen.store(monotonic_ns(), SeqCst);
        } else if let Some(index) = self.board.take_seat(self.me, self.since) {
            self.index.set(index);
        }
    }

    /// Sleeps until woken after `generation`, at most `timeout` (and [`BACKSTOP`]).
    pub(super) fn sleep(&self, generation: u32, timeout: Duration) {
        self.alive();
        let mut timeout = timeout.min(BACKSTOP);
        if !self.may_try() {
            // Named for another: look again when its time to take the turn is up.
            let named = self.board.named().load(SeqCst);
            let until = Duration::from_nanos(
                (named + HANDOFF.as_nanos() as u64).saturating_sub(monotonic_ns()),
            );
            timeout = timeout.min(until.max(Duration::from_micros(50)));
        }
        futex_wait(self.board.seat(self.index.get()).wake, generation, timeout);
    }
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        // Only while it is still this waiter's: a seat passed over as stale may have been
        // taken by another waiter since, whose words are not to be touched.
        let seat = self.board.seat(self.index.get());
        if seat
            .owner
            .compare_exchange(self.me, 0, SeqCst, SeqCst)
            .is_ok()
        {
            self.board.seated().fetch_sub(1, SeqCst);
        }
        // Named next but leaving without the turn (gave up): name another.
        if self
            .board
            .next()
            .compare_exchange(self.me, 0, SeqCst, SeqCst)
            .is_ok()
        {
            self.board.released();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(path: &std::path::Path) -> Board {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        Board::open(&file).unwrap()
    }

    #[test]
    fn the_oldest_seat_is_named_next_and_others_hold_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-lock");
        let one = board(&path);
        let two = board(&path);
        assert!(!one.starving());
        let now = Instant::now();
        let young = one.sit(now).unwrap();
        let old = two.sit(now - Duration::from_millis(5)).unwrap();
        // This process's own waiting threads do not end its streak.
        assert!(!one.starving());
        assert!(young.may_try() && old.may_try());
        let before = old.generation();
        one.released();
        // The oldest is named and woken; the other holds back, as a newcomer does.
        assert_ne!(old.generation(), before);
        assert!(old.may_try());
        assert!(!young.may_try());
        assert!(one.reserved_for_other(0));
        old.took_turn();
        assert!(young.may_try());
        drop(old);
        drop(young);
        assert!(!one.starving());
        assert_eq!(one.seated().load(SeqCst), 0);
    }

    #[test]
    fn a_seat_of_another_process_waiting_past_the_bound_ends_a_streak() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-lock");
        let mine = board(&path);
        let seat = mine.seat(3);
        // The parent of this test's process: another live process.
        let other = u64::from(std::os::unix::process::parent_id());
        seat.owner.store((other << 32) | 1, SeqCst);
        seat.since.store(monotonic_ns(), SeqCst);
        seat.seen.store(monotonic_ns(), SeqCst);
        mine.seated().fetch_add(1, SeqCst);
        assert!(!mine.starving(), "it has only just begun to wait");
        seat.since
            .store(monotonic_ns() - 2 * STARVING.as_nanos() as u64, SeqCst);
        assert!(mine.starving());
        // A time in the future, as a hostile writer of the file might put, is no wait.
        seat.since.store(u64::MAX, SeqCst);
        assert!(!mine.starving());
    }

    #[test]
    fn a_seat_not_shown_alive_is_passed_over_and_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-lock");
        let mine = board(&path);
        // Every seat taken by a waiter of another live process (the parent of this test's),
        // long ago, last seen alive longer ago than STALE: stopped, or in another pid
        // namespace, where its pid cannot be told from a live one.
        let other = u64::from(std::os::unix::process::parent_id());
        let stale = monotonic_ns() - 2 * STALE.as_nanos() as u64;
        for i in 0..SEATS {
            let seat = mine.seat(i);
            seat.owner.store((other << 32) | (i as u64 + 1), SeqCst);
            seat.since.store(monotonic_ns() - 1_000_000_000, SeqCst);
            seat.seen.store(stale, SeqCst);
        }
        mine.seated().store(SEATS as u32, SeqCst);
        // None of them ends a streak, nor is named.
        assert!(!mine.starving());
        mine.released();
        assert_eq!(mine.next().load(SeqCst), 0);
        // A new waiter takes one of their seats, and is the one named.
        let live = mine.sit(Instant::now()).unwrap();
        mine.released();
        assert_eq!(mine.next().load(SeqCst), live.me);
        // A waiter that shows it is alive keeps its seat.
        let seat = mine.seat(live.index.get());
        seat.seen.store(stale, SeqCst);
        live.alive();
        assert!(seat.live(monotonic_ns()).is_some());
    }

    #[test]
    fn a_waiter_passed_over_keeps_its_place_once_it_shows_it_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-lock");
        let mine = board(&path);
        let now = Instant::now();
        let stopped = mine.sit(now - Duration::from_millis(500)).unwrap();
        let first = stopped.index.get();
        let stale = monotonic_ns() - 2 * STALE.as_nanos() as u64;
        mine.seat(first).seen.store(stale, SeqCst);
        // A newcomer takes a free seat before the stale one.
        let newcomer = mine.sit(now).unwrap();
        assert_ne!(newcomer.index.get(), first);
        mine.released();
        assert_eq!(mine.next().load(SeqCst), newcomer.me);
        newcomer.took_turn();
        // Taken by another waiter all the same (every other seat was taken then).
        let other = u64::from(std::os::unix::process::parent_id()) << 32 | 7;
        let seat = mine.seat(first);
        seat.owner.store(other, SeqCst);
        seat.since.store(monotonic_ns(), SeqCst);
        seat.seen.store(monotonic_ns(), SeqCst);
        // The stopped waiter resumes: it sits again, waiting since when it first did, so it
        // is the oldest and named next; the other's seat is left alone.
        stopped.alive();
        assert_ne!(stopped.index.get(), first);
        assert_eq!(mine.seat(first).owner.load(SeqCst), other);
        mine.released();
        assert_eq!(mine.next().load(SeqCst), stopped.me);
        let seated = mine.seated().load(SeqCst);
        drop(stopped);
        assert_eq!(mine.seated().load(SeqCst), seated - 1);
        assert_eq!(mine.seat(first).owner.load(SeqCst), other);
    }

    #[test]
    fn a_seat_named_that_does_not_wake_is_passed_over_until_it_shows_it_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-lock");
        let mine = board(&path);
        let now = Instant::now();
        let stopped = mine.sit(now - Duration::from_millis(50)).unwrap();
        let other = mine.sit(now).unwrap();
        mine.released();
        assert_eq!(mine.next().load(SeqCst), stopped.me);
        // It does not wake (stopped): after a BACKSTOP the next hand-over names the other.
        std::thread::sleep(BACKSTOP + Duration::from_millis(5));
        for _ in 0..2 {
            // The other shows it is alive, as a waiting thread does each time it sleeps.
            other.alive();
            mine.released();
            assert_eq!(mine.next().load(SeqCst), other.me);
            other.took_turn();
        }
        // Once it shows it is alive, it is the oldest again, and named.
        stopped.alive();
        mine.released();
        assert_eq!(mine.next().load(SeqCst), stopped.me);
    }

    #[test]
    fn a_named_seat_that_gives_up_names_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-lock");
        let mine = board(&path);
        let now = Instant::now();
        let first = mine.sit(now - Duration::from_millis(2)).unwrap();
        let second = mine.sit(now).unwrap();
        mine.released();
        assert!(!second.may_try());
        drop(first);
        assert!(second.may_try());
        assert_eq!(mine.next().load(SeqCst), second.me);
    }

    #[test]
    fn a_sleep_is_bounded_and_a_wake_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-lock");
        let mine = board(&path);
        let seat = mine.sit(Instant::now()).unwrap();
        let start = Instant::now();
        seat.sleep(seat.generation(), Duration::from_millis(30));
        assert!(start.elapsed() < Duration::from_secs(5));
        // A wake from another thread, on its own mapping, ends a long sleep.
        let other = board(&path);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                other.released();
            });
            let generation = seat.generation();
            let mut woken = false;
            for _ in 0..1000 {
                seat.sleep(generation, Duration::from_secs(10));
                if seat.generation() != generation {
                    woken = true;
                    break;
                }
            }
            assert!(woken);
        });
    }
}
