//! Wakes the futures of the async handle at their deadlines, for the waits that come before a
//! call runs (for a slot, or for the turn in the handle's queue of writes): one thread for
//! the process, started by the first such wait and ended once it has had nothing to wake
//! for [`IDLE`]. The runtime's own timer cannot serve: `tokio::time` panics on a runtime
//! built without `enable_time`.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

/// How long the thread stays without a deadline to watch before it ends.
const IDLE: Duration = Duration::from_secs(1);

struct Alarms {
    /// The wakers to wake, by deadline (and a number that tells equal deadlines apart).
    due: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
    /// The process whose thread watches (0: none): a child forked after it started has no
    /// such thread.
    running: u32,
    /// Whether starting the thread failed once (and was logged).
    failed: bool,
}

static ALARMS: Mutex<Alarms> = Mutex::new(Alarms {
    due: BTreeMap::new(),
    next_id: 0,
    running: 0,
    failed: false,
});
static CHANGED: Condvar = Condvar::new();

fn alarms() -> MutexGuard<'static, Alarms> {
    ALARMS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One future's alarm, set at most once and taken off when dropped.
#[derive(Debug, Default)]
pub(super) struct Alarm {
    key: Option<(Instant, u64)>,
}

impl Alarm {
    /// Whether `due` has passed; if not, the future polled with `cx` is woken when it does.
    /// Never, for `None`. If no thread can be started to wake it (at the process's or the
    /// user's thread limit), the wait goes on without a bound (logged once).
    pub(super) fn passed(&mut self, due: Option<Instant>, cx: &Context<'_>) -> bool {
        let Some(due) = due else {
            return false;
        };
        if Instant::now() >= due {
            return true;
        }
        let mut alarms = alarms();
        if let Some(key) = self.key {
            // Set already: only a future moved to another task's waker needs it changed.
            if let Some(waker) = alarms.due.get_mut(&key) {
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
            }
            return false;
        }
        if alarms.running != std::process::id() {
            if let Err(error) = start(&mut alarms) {
                if !std::mem::replace(&mut alarms.failed, true) {
                    tracing::warn!(
                        error = %error,
                        "cannot start the async handle's alarm thread; calls wait for a slot \
                         without their deadline"
                    );
                }
                return false;
            }
        }
        let key = (due, alarms.next_id);
        alarms.next_id += 1;
        let earliest = alarms.due.keys().next().is_none_or(|first| key < *first);
        alarms.due.insert(key, cx.waker().clone());
        self.key = Some(key);
        if earliest {
            CHANGED.notify_one();
        }
        false
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            alarms().due.remove(&key);
        }
    }
}

/// Starts the thread that watches `alarms`' deadlines, and records it as this process's.
fn start(alarms: &mut Alarms) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("sqlite-persistence-alarm".to_owned())
        .spawn(watch)?;
    alarms.running = std::process::id();
    Ok(())
}

/// The thread: wakes each waker at its deadline, and ends after [`IDLE`] without one. A
/// waker that panics is logged and passed over.
fn watch() {
    /// If the thread unwinds (a panic the waker's own catch did not hold), says it is gone
    /// and starts another for the deadlines left.
    struct Gone;
    impl Drop for Gone {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut alarms = alarms();
                alarms.running = 0;
                if !alarms.due.is_empty() {
                    let _ = start(&mut alarms);
                }
            }
        }
    }
    let _gone = Gone;
    let mut alarms = alarms();
    let mut idle_since = Instant::now();
    loop {
        let now = Instant::now();
        let mut woken = Vec::new();
        while let Some(entry) = alarms.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            woken.push(entry.remove());
        }
        if !woken.is_empty() {
            // Woken outside the lock: a waker may run its task on this thread.
            drop(alarms);
            for waker in woken {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waker.wake())).is_err()
                {
                    tracing::error!("a waker panicked when its call's deadline came");
                }
            }
            alarms = self::alarms();
            idle_since = Instant::now();
            continue;
        }
        let wait = match alarms.due.keys().next() {
            Some(&(at, _)) => {
                idle_since = now;
                at - now
            }
            None => {
                let idle = now - idle_since;
                if idle >= IDLE {
                    // Under the lock: a deadline set from now on starts another thread.
                    alarms.running = 0;
                    return;
                }
                IDLE - idle
            }
        };
        alarms = CHANGED
            .wait_timeout(alarms, wait)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_deadline_wakes_its_waker_once_and_a_dropped_alarm_never() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let cx = Context::from_waker(&waker);
        let due = Instant::now() + Duration::from_millis(50);
        let mut alarm = Alarm::default();
        assert!(!alarm.passed(Some(due), &cx));
        assert!(!alarm.passed(Some(due), &cx), "set once");
        let mut dropped = Alarm::default();
        let other = Arc::new(Count(AtomicUsize::new(0)));
        let other_waker = Waker::from(Arc::clone(&other));
        assert!(!dropped.passed(Some(due), &Context::from_waker(&other_waker)));
        drop(dropped);
        let limit = Instant::now() + Duration::from_secs(10);
        while count.0.load(Ordering::SeqCst) == 0 && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(alarm.passed(Some(due), &cx));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken once");
        assert_eq!(
            other.0.load(Ordering::SeqCst),
            0,
            "a dropped alarm wakes nobody"
        );
        assert!(
            !Alarm::default().passed(None, &cx),
            "no deadline never passes"
        );
    }

    struct Panics;

    impl std::task::Wake for Panics {
        fn wake(self: Arc<Self>) {
            panic!("a waker that panics");
        }
    }

    #[test]
    fn a_waker_that_panics_does_not_stop_the_alarms_after_it() {
        let panics = Waker::from(Arc::new(Panics));
        let mut first = Alarm::default();
        assert!(!first.passed(
            Some(Instant::now() + Duration::from_millis(20)),
            &Context::from_waker(&panics)
        ));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut second = Alarm::default();
        let due = Instant::now() + Duration::from_millis(200);
        assert!(!second.passed(Some(due), &Context::from_waker(&waker)));
        let limit = Instant::now() + Duration::from_secs(10);
        while count.0.load(Ordering::SeqCst) == 0 && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the second alarm never rang"
        );
    }
}
