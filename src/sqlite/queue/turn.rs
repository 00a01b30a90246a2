//! A place in the write queue, and what its end does: keep the turn for a streak of short
//! writes, keep the description for this thread's next turn, or close it and yield.

use std::cell::RefCell;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::linger::{Linger, Unkept, MAX_STREAK};

/// A place in the queue: the lock is held until this is dropped.
#[derive(Debug)]
pub(crate) struct Turn {
    path: Arc<Path>,
    file: Option<File>,
    pub(super) taken: Instant,
    /// When this process's streak of short turns began (see [`Linger`]).
    pub(super) streak: Instant,
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

pub(super) fn take_idle(path: &Path) -> Option<File> {
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
pub(super) const YIELD_AFTER: Duration = Duration::from_millis(1);

impl Turn {
    /// The turn `file` locks, taken at `taken`.
    pub(super) fn new(path: Arc<Path>, file: File, linger: &Arc<Linger>, taken: Instant) -> Self {
        linger.holding(true);
        Self {
            path,
            file: Some(file),
            taken,
            streak: taken,
            linger: Some(Arc::clone(linger)),
        }
    }
}

impl Turn {
    /// The process's linger (and board), if the turn has one.
    pub(super) fn linger(&self) -> Option<&Arc<Linger>> {
        self.linger.as_ref()
    }

    /// Gives the turn back now, outside any streak, and wakes the next waiter.
    pub(super) fn end_streak(&mut self) -> Option<Arc<Linger>> {
        if let Some(linger) = &self.linger {
            linger.letting_go();
        }
        drop(self.file.take());
        let linger = self.linger.take()?;
        linger.released();
        Some(linger)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // flock wakes its waiters but does not hand the lock over: a writer that asks again
        // at once would win the race against a waiter the kernel has only just woken, turn
        // after turn. So after a long turn (others may have waited long, and a context switch
        // is noise), close the description and yield, so that the next turn also pays an
        // open; if others have been queueing, the process's next turn also gives way a
        // moment (see `linger::GIVE_WAY`). After a turn of microseconds, barging costs the waiters
        // little, and both the yield and the open would cost short writes most of their
        // speed: unlock, and keep the description for this thread's next turn.
        let Some(file) = self.file.take() else {
            return;
        };
        let now = Instant::now();
        let short = now.saturating_duration_since(self.taken) < YIELD_AFTER;
        let mut streaking = now.saturating_duration_since(self.streak) < MAX_STREAK;
        let mut starved = false;
        let file = match &self.linger {
            Some(linger) if short && streaking && !std::thread::panicking() => {
                match linger.keep(file, self.streak, now) {
                    Ok(()) => return,
                    Err(Unkept::Starved(file)) => {
                        // Another process has waited too long: the streak ends here.
                        (streaking, starved) = (false, true);
                        file
                    }
                    Err(Unkept::NotKept(file)) => file,
                }
            }
            _ => file,
        };
        if let Some(linger) = &self.linger {
            linger.letting_go();
        }
        // A streak that ended ends as a long turn does.
        if !short || !streaking {
            drop(file);
            if let Some(linger) = &self.linger {
                linger.released();
            }
            std::thread::yield_now();
            if let Some(linger) = &self.linger {
                if starved {
                    linger.handed_over(now);
                } else if !short {
                    linger.gave_back(now);
                }
            }
        } else {
            if file.unlock().is_ok() {
                give_back(self.path.clone(), file);
            }
            // (If unlocking failed, dropping the file closed it, which releases the lock.)
            if let Some(linger) = &self.linger {
                linger.released();
            }
        }
    }
}
