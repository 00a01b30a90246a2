//! The retry policy and the one loop that applies it to lock errors.

#[cfg(feature = "sqlite")]
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::error::Operation;
#[cfg(feature = "sqlite")]
use crate::error::{error_chain, Error};
#[cfg(feature = "sqlite")]
use crate::holders::HeldLock;
#[cfg(feature = "sqlite")]
use crate::operation::DB_SYSTEM;
#[cfg(feature = "sqlite")]
use crate::sqlite::codes::{lock_in_value, SqliteFailure};
#[cfg(feature = "sqlite")]
use crate::sqlite::lock_table::holders_of;

/// The event of a retry loop's retry (`warn`, with `delay_ms`) or giving up (`error`) on a
/// `Busy` kind of failure of `operation` on the database `namespace` of `system`: one set of
/// fields for the loop here and for a group commit's members (`sqlite::group`).
macro_rules! retry_event {
    ($level:expr, $system:expr, $namespace:expr, $operation:expr, $attempts:expr,
     $elapsed:expr, $error:expr, $message:literal $(, $key:ident = $value:expr)?) => {
        tracing::event!(
            $level,
            db.system.name = $system,
            db.namespace = %$namespace,
            db.operation.name = $operation.as_str(),
            error.type = $crate::operation::ERROR_TYPE_BUSY,
            operation = $operation.as_str(),
            attempt = $attempts,
            $($key = $value,)?
            elapsed_ms = $elapsed.as_millis() as u64,
            error = %$error,
            $message
        )
    };
}
#[cfg(feature = "sqlite")]
pub(crate) use retry_event;

/// When and how often a locked operation is tried again.
///
/// Exponential backoff with full jitter: before retry `n` (counting from 0) the loop sleeps
/// a uniformly random time in `0..=min(max_delay, initial_delay * 2^n)`. Because jitter is
/// drawn below the capped value, `max_delay` is a hard bound on every sleep. The loop gives
/// up when `max_attempts` attempts have failed or when `max_elapsed` of wall-clock time has
/// passed since the first attempt, whichever comes first; it never sleeps past that deadline.
/// Wall-clock time matters because each attempt can itself block inside SQLite for up to
/// `busy_timeout`.
///
/// Only lock errors are retried ([`is_lock_error`](crate::is_lock_error)); anything else
/// returns at once. Each retry is a `tracing` event at `warn` (fields `operation`, `attempt`,
/// `delay_ms`, `elapsed_ms`, `error`), giving up one at `error`.
///
/// # Default
/// | setting | value |
/// |---|---|
/// | `initial_delay` | 10 ms |
/// | `max_delay` | 250 ms |
/// | `max_elapsed` | 30 s: rides out a lock held for six times the default `busy_timeout` |
/// | `max_attempts` | 1000 (the deadline is what normally ends the retries) |
/// | `jitter` | on, seeded from the OS |
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use sqlite_persistence::RetryPolicy;
///
/// let policy = RetryPolicy::new().jitter(false).initial_delay(Duration::from_millis(10));
/// let delays: Vec<_> = policy.delays().take(3).collect();
/// assert_eq!(delays, [10, 20, 40].map(Duration::from_millis));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    initial_delay: Duration,
    max_delay: Duration,
    max_elapsed: Duration,
    max_attempts: u32,
    jitter: bool,
    seed: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryPolicy {
    /// The default policy (see the table above).
    pub const fn new() -> Self {
        Self {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(250),
            max_elapsed: Duration::from_secs(30),
            max_attempts: 1000,
            jitter: true,
            seed: None,
        }
    }

    /// The sleep before the first retry, before jitter. Defaults to 10 ms.
    pub const fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// The hard upper bound on any one sleep, jitter included. Defaults to 250 ms.
    pub const fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Wall-clock time after the first attempt at which the loop gives up. Defaults to 30 s.
    pub const fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.max_elapsed = elapsed;
        self
    }

    /// The most attempts (the first one included). Defaults to 1000.
    ///
    /// # Panics
    /// If `attempts` is 0: at least one attempt is always made.
    pub const fn max_attempts(mut self, attempts: u32) -> Self {
        assert!(attempts > 0, "max_attempts must be at least 1");
        self.max_attempts = attempts;
        self
    }

    /// Whether sleeps are randomised (full jitter). Without it, processes that collided once
    /// retry in lock step and collide again. Defaults to on.
    pub const fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// A fixed seed for the jitter, for reproducible schedules in tests. Defaults to none
    /// (seeded from the OS, so that processes differ).
    pub const fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The most attempts. See [`RetryPolicy::max_attempts`].
    #[cfg(feature = "sqlite")]
    pub(crate) const fn attempts_limit(&self) -> u32 {
        self.max_attempts
    }

    /// The wall-clock deadline. See [`RetryPolicy::max_elapsed`].
    pub const fn deadline(&self) -> Duration {
        self.max_elapsed
    }

    /// The sleeps this policy would make, one per retry, ignoring the deadline and the
    /// attempt limit (the retry loop applies those). A fresh iterator starts a fresh schedule.
    pub fn delays(&self) -> Delays {
        Delays {
            policy: *self,
            retry: 0,
            rng: None,
        }
    }
}

/// The schedule of sleeps of one run of a [`RetryPolicy`]; see [`RetryPolicy::delays`].
#[derive(Debug, Clone)]
pub struct Delays {
    policy: RetryPolicy,
    retry: u32,
    /// Seeded at the first jittered delay: most writes never retry, and seeding from the OS
    /// is a system call.
    rng: Option<SmallRng>,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let exponential = self
            .policy
            .initial_delay
            .checked_mul(1u32.checked_shl(self.retry).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        let capped = exponential.min(self.policy.max_delay);
        self.retry = self.retry.saturating_add(1);
        if !self.policy.jitter {
            return Some(capped);
        }
        let micros = u64::try_from(capped.as_micros()).unwrap_or(u64::MAX);
        let seed = self.policy.seed;
        let rng = self.rng.get_or_insert_with(|| match seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        });
        Some(Duration::from_micros(rng.random_range(0..=micros)))
    }
}

/// Time as the retry loop sees it: real in the library, fake in unit tests, so that tests
/// assert exact schedules and never sleep.
pub(crate) trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn sleep(&self, duration: Duration);
}

/// One operation's deadline: when it started, by which clock, and how long it may take (the
/// policy's `max_elapsed`). Made once where the operation begins, before it waits for a
/// connection or for the write turn, and carried through those waits and every attempt:
/// what is left is always read from it, never from a copy of the policy shortened by the
/// waits.
#[derive(Clone, Copy)]
pub(crate) struct Deadline<'a> {
    clock: &'a dyn Clock,
    start: Instant,
    limit: Duration,
    /// The latest time this operation read the clock (its start, until it waited): the next
    /// attempt's time left counts to it, without reading the clock again.
    known: Instant,
}

impl<'a> Deadline<'a> {
    /// `policy`'s deadline for an operation that started at `start`, a time just read from
    /// `clock`.
    pub(crate) fn at(clock: &'a dyn Clock, start: Instant, policy: &RetryPolicy) -> Self {
        Self {
            clock,
            start,
            limit: policy.max_elapsed,
            known: start,
        }
    }

    /// `policy`'s deadline for an operation starting now by `clock`.
    pub(crate) fn now(clock: &'a dyn Clock, policy: &RetryPolicy) -> Self {
        Self::at(clock, clock.now(), policy)
    }

    /// The same deadline, the operation having read the clock at `now` (after a wait).
    pub(crate) fn read_at(self, now: Instant) -> Self {
        Self {
            known: now.max(self.known),
            ..self
        }
    }

    /// The same deadline, with the clock read now.
    pub(crate) fn read_now(self) -> Self {
        self.read_at(self.clock.now())
    }

    /// The latest time this operation read the clock.
    pub(crate) fn known(&self) -> Instant {
        self.known
    }

    /// What is left of it at the latest time read.
    pub(crate) fn left(&self) -> Duration {
        self.limit
            .saturating_sub(self.known.saturating_duration_since(self.start))
    }

    /// How long the operation has run, now.
    pub(crate) fn elapsed(&self) -> Duration {
        self.clock.now().saturating_duration_since(self.start)
    }
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// How a retried operation ended without success.
#[derive(Debug)]
pub(crate) enum Failure<E> {
    /// Not a lock error: returned at once.
    Permanent(E),
    /// Still a lock error when the attempts or the deadline ran out.
    Exhausted {
        attempts: u32,
        elapsed: Duration,
        last: E,
    },
}

/// One attempt of a retried operation, as the attempt sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Try {
    /// 1 for the first attempt.
    pub number: u32,
    /// Wall-clock time left before the deadline: an attempt that can block (SQLite's busy
    /// handler) blocks at most this long.
    pub left: Duration,
}

/// What a successful retried operation cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Success<T> {
    pub value: T,
    pub attempts: u32,
}

/// The database a retried operation works on, as its `tracing` events name it.
#[derive(Clone, Copy)]
pub(crate) struct Db<'a> {
    /// OpenTelemetry's `db.system.name`.
    pub system: &'static str,
    /// `db.namespace`: the file, or the server's database.
    pub namespace: &'a dyn std::fmt::Display,
}

/// Why a retried attempt failed, when running it again may work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// Another connection held a lock (or PostgreSQL found a conflict).
    Locked,
    /// The server could not be reached, was starting, full, or ended the session.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Unavailable,
    /// PostgreSQL cancelled the transaction for a conflict with another one (a serialization
    /// failure, a deadlock).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Conflict,
}

/// Runs `attempt` until it succeeds, fails with an error `transient` finds no [`Waiting`]
/// in, or the policy's attempts or the `deadline` run out. Each retry is logged at `warn`,
/// exhaustion at `error`, with the error as `describe` renders it and a message saying what
/// was waited for; the events name `db`.
pub(crate) fn retry_in<T, E>(
    policy: &RetryPolicy,
    deadline: Deadline<'_>,
    operation: Operation,
    db: Db<'_>,
    transient: impl Fn(&E) -> Option<Waiting>,
    describe: impl Fn(&E) -> String,
    mut attempt: impl FnMut(Try) -> Result<T, E>,
) -> Result<Success<T>, Failure<E>> {
    let mut delays = policy.delays();
    let mut attempts = 0u32;
    let mut deadline = deadline;
    loop {
        attempts += 1;
        // The first attempt starts when the operation last read the clock.
        if attempts > 1 {
            deadline = deadline.read_now();
        }
        let (error, waiting) = match attempt(Try {
            number: attempts,
            left: deadline.left(),
        }) {
            Ok(value) => return Ok(Success { value, attempts }),
            Err(error) => match transient(&error) {
                None => return Err(Failure::Permanent(error)),
                Some(waiting) => (error, waiting),
            },
        };
        deadline = deadline.read_now();
        let elapsed = deadline.known.saturating_duration_since(deadline.start);
        let remaining = deadline.left();
        let error_text = describe(&error);
        let error_text = crate::escaped::Escaped::new(&error_text);
        // The retry and the giving up: the same fields, a message saying what was waited for.
        macro_rules! busy_event {
            ($level:expr, $message:literal $(, $key:ident = $value:expr)?) => {
                retry_event!(
                    $level,
                    db.system,
                    db.namespace,
                    operation,
                    attempts,
                    elapsed,
                    error_text,
                    $message
                    $(, $key = $value)?
                )
            };
        }
        if attempts >= policy.max_attempts || remaining.is_zero() {
            match waiting {
                Waiting::Locked => {
                    busy_event!(tracing::Level::ERROR, "database stayed locked, giving up")
                }
                Waiting::Unavailable => busy_event!(
                    tracing::Level::ERROR,
                    "server stayed unavailable, giving up"
                ),
                Waiting::Conflict => busy_event!(
                    tracing::Level::ERROR,
                    "transactions kept conflicting, giving up"
                ),
            }
            return Err(Failure::Exhausted {
                attempts,
                elapsed,
                last: error,
            });
        }
        let delay = delays.next().unwrap_or(policy.max_delay).min(remaining);
        let delay_ms = delay.as_millis() as u64;
        match waiting {
            Waiting::Locked => {
                busy_event!(
                    tracing::Level::WARN,
                    "database is locked, retrying",
                    delay_ms = delay_ms
                )
            }
            Waiting::Unavailable => {
                busy_event!(
                    tracing::Level::WARN,
                    "server unavailable, retrying",
                    delay_ms = delay_ms
                )
            }
            Waiting::Conflict => {
                busy_event!(
                    tracing::Level::WARN,
                    "transaction conflicted, retrying",
                    delay_ms = delay_ms
                )
            }
        }
        deadline.clock.sleep(delay);
    }
}

/// What one attempt of a layer operation failed with. The layer's own statements (`BEGIN`,
/// `COMMIT`, the pool, pragmas) fail as [`Attempt::Layer`] and are classified by the layer
/// whatever the caller's error type is; the caller's closure fails as [`Attempt::Caller`],
/// classified when it is made (from SQLite's result code where the connection recorded one).
#[derive(Debug)]
#[cfg(feature = "sqlite")]
pub(crate) enum Attempt<E> {
    /// A statement of the layer's.
    Layer(Error),
    /// The caller's closure, with the lock error it failed with if it was one.
    Caller {
        error: E,
        lock: Option<SqliteFailure>,
    },
}

#[cfg(feature = "sqlite")]
impl<E> From<Error> for Attempt<E> {
    fn from(error: Error) -> Self {
        Attempt::Layer(error)
    }
}

#[cfg(feature = "sqlite")]
impl<E: From<Error> + 'static> Attempt<E> {
    /// The caller's error, classified by what it is (no result code known).
    pub(crate) fn caller(error: E) -> Self {
        let lock = lock_in_value(&error);
        Attempt::Caller { error, lock }
    }

    fn is_lock_error(&self) -> bool {
        match self {
            Attempt::Layer(error) => error.is_lock_error(),
            Attempt::Caller { lock, .. } => lock.is_some(),
        }
    }

    /// The error, for the retry events: only lock errors are described.
    fn describe(&self) -> String {
        match self {
            Attempt::Layer(error) => error_chain(error),
            Attempt::Caller {
                lock: Some(lock), ..
            } => lock.to_string(),
            Attempt::Caller { lock: None, .. } => "the closure's error".to_owned(),
        }
    }

    /// The lock error, as [`Error::Busy`] carries it.
    fn into_lock(self) -> crate::error::BoxError {
        match self {
            Attempt::Layer(error) => Box::new(error),
            Attempt::Caller { lock, .. } => Box::new(lock.unwrap_or_else(|| SqliteFailure {
                code: None,
                message: "the closure's error".to_owned(),
            })),
        }
    }

    /// As the caller sees it.
    fn into_caller(self) -> E {
        match self {
            Attempt::Layer(error) => E::from(error),
            Attempt::Caller { error, .. } => error,
        }
    }
}

/// [`retry_in`] for the layer's SQLite operations: lock errors are retried (the layer's own
/// by the layer's classifier, the caller's anywhere in their source chain), and exhaustion
/// becomes [`Error::Busy`] carrying the last lock error.
#[cfg(feature = "sqlite")]
pub(crate) fn retry_attempts<T, E>(
    policy: &RetryPolicy,
    deadline: Deadline<'_>,
    operation: Operation,
    database: &Path,
    attempt: impl FnMut(Try) -> Result<T, Attempt<E>>,
) -> Result<Success<T>, E>
where
    E: From<Error> + 'static,
{
    let namespace = crate::escaped::Escaped::path(database);
    let db = Db {
        system: DB_SYSTEM,
        namespace: &namespace,
    };
    retry_in(
        policy,
        deadline,
        operation,
        db,
        |attempt: &Attempt<E>| attempt.is_lock_error().then_some(Waiting::Locked),
        Attempt::describe,
        attempt,
    )
    .map_err(|failure| match failure {
        Failure::Permanent(error) => error.into_caller(),
        Failure::Exhausted {
            attempts,
            elapsed,
            last,
        } => E::from(Error::Busy {
            operation,
            attempts,
            elapsed,
            source: last.into_lock(),
            // The write queue's turn this process holds while it retries is not the wait.
            holders: holders_of(database)
                .into_iter()
                .filter(|h| !(h.pid == std::process::id() && h.lock == HeldLock::WriteQueue))
                .collect(),
        }),
    })
}

/// [`retry_attempts`] for an operation whose every error is the caller's type.
#[cfg(feature = "sqlite")]
pub(crate) fn retry_locked<T, E>(
    policy: &RetryPolicy,
    clock: &dyn Clock,
    operation: Operation,
    database: &Path,
    mut attempt: impl FnMut(Try) -> Result<T, E>,
) -> Result<Success<T>, E>
where
    E: From<Error> + 'static,
{
    retry_attempts(
        policy,
        Deadline::now(clock, policy),
        operation,
        database,
        |n| attempt(n).map_err(Attempt::caller),
    )
}

#[cfg(all(test, feature = "sqlite"))]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A clock whose sleeps advance time instantly, and that also charges each attempt a
    /// fixed cost (as `busy_timeout` would).
    pub(crate) struct FakeClock {
        start: Instant,
        state: Mutex<(Duration, Vec<Duration>)>,
    }

    impl FakeClock {
        pub(crate) fn new() -> Self {
            Self {
                start: Instant::now(),
                state: Mutex::new((Duration::ZERO, Vec::new())),
            }
        }
        pub(crate) fn advance(&self, by: Duration) {
            self.state.lock().unwrap().0 += by;
        }
        pub(crate) fn sleeps(&self) -> Vec<Duration> {
            self.state.lock().unwrap().1.clone()
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + self.state.lock().unwrap().0
        }
        fn sleep(&self, duration: Duration) {
            let mut state = self.state.lock().unwrap();
            state.0 += duration;
            state.1.push(duration);
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const TEST_DB: Db<'static> = Db {
        system: DB_SYSTEM,
        namespace: &"test.db",
    };

    /// Runs an operation that is always locked, calling `each` at every attempt.
    fn always_locked(
        policy: &RetryPolicy,
        clock: &FakeClock,
        mut each: impl FnMut(),
    ) -> Result<Success<()>, Failure<&'static str>> {
        retry_in(
            policy,
            Deadline::now(clock, policy),
            Operation::Query,
            TEST_DB,
            |_: &&str| Some(Waiting::Locked),
            |e| e.to_string(),
            |_| {
                each();
                Err("locked")
            },
        )
    }

    #[test]
    fn schedule_without_jitter_doubles_up_to_the_cap() {
        let policy = RetryPolicy::new()
            .jitter(false)
            .initial_delay(ms(10))
            .max_delay(ms(100));
        let delays: Vec<_> = policy.delays().take(7).collect();
        assert_eq!(delays, [10, 20, 40, 80, 100, 100, 100].map(ms));
    }

    #[test]
    fn schedule_does_not_overflow_after_many_retries() {
        let policy = RetryPolicy::new().jitter(false).max_delay(ms(250));
        assert_eq!(policy.delays().nth(200), Some(ms(250)));
    }

    #[test]
    fn jittered_sleeps_stay_under_the_exponential_and_the_hard_cap() {
        let policy = RetryPolicy::new()
            .initial_delay(ms(10))
            .max_delay(ms(100))
            .seed(7);
        let delays: Vec<_> = policy.delays().take(2000).collect();
        for (retry, delay) in delays.iter().enumerate() {
            let bound = ms(10 * (1u64 << retry.min(20))).min(ms(100));
            assert!(*delay <= bound, "retry {retry}: {delay:?} > {bound:?}");
        }
        // Full jitter really spreads: the capped tail covers most of 0..=100 ms.
        let tail = &delays[10..];
        assert!(tail.iter().any(|d| *d < ms(10)));
        assert!(tail.iter().any(|d| *d > ms(90)));
        // The same seed gives the same schedule; another seed does not.
        assert_eq!(delays, policy.delays().take(2000).collect::<Vec<_>>());
        assert_ne!(
            delays,
            policy.seed(8).delays().take(2000).collect::<Vec<_>>()
        );
    }

    #[test]
    fn succeeds_after_transient_errors_with_the_exact_schedule() {
        let clock = FakeClock::new();
        let policy = RetryPolicy::new().jitter(false).initial_delay(ms(10));
        let outcome = retry_in(
            &policy,
            Deadline::now(&clock, &policy),
            Operation::Query,
            TEST_DB,
            |_: &&str| Some(Waiting::Locked),
            |e| e.to_string(),
            |attempt| {
                if attempt.number < 4 {
                    Err("locked")
                } else {
                    Ok(attempt.number)
                }
            },
        )
        .unwrap();
        assert_eq!(
            outcome,
            Success {
                value: 4,
                attempts: 4
            }
        );
        assert_eq!(clock.sleeps(), [10, 20, 40].map(ms));
    }

    #[test]
    fn permanent_errors_return_at_once() {
        let clock = FakeClock::new();
        let policy = RetryPolicy::new();
        let outcome = retry_in(
            &policy,
            Deadline::now(&clock, &policy),
            Operation::Query,
            TEST_DB,
            |e: &&str| (*e == "locked").then_some(Waiting::Locked),
            |e| e.to_string(),
            |_| Err::<(), _>("syntax error"),
        );
        assert!(matches!(outcome, Err(Failure::Permanent("syntax error"))));
        assert!(clock.sleeps().is_empty());
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let clock = FakeClock::new();
        let policy = RetryPolicy::new().jitter(false).max_attempts(3);
        let mut calls = 0;
        let outcome = always_locked(&policy, &clock, || calls += 1);
        match outcome {
            Err(Failure::Exhausted { attempts, last, .. }) => {
                assert_eq!((attempts, last, calls), (3, "locked", 3));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(clock.sleeps(), [10, 20].map(ms));
    }

    #[test]
    fn deadline_is_wall_clock_and_never_overslept() {
        // Each attempt blocks 400 ms inside SQLite (busy_timeout); the sleeps alone would
        // never reach the 1 s deadline, the wall clock does.
        let clock = FakeClock::new();
        let policy = RetryPolicy::new()
            .jitter(false)
            .initial_delay(ms(100))
            .max_elapsed(ms(1000));
        let outcome = always_locked(&policy, &clock, || clock.advance(ms(400)));
        match outcome {
            Err(Failure::Exhausted {
                attempts, elapsed, ..
            }) => {
                // 400 | sleep 100 | 400 (900) | sleep 100 (the remainder) | 400 (1400): stop.
                assert_eq!(attempts, 3);
                assert_eq!(elapsed, ms(1400));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(clock.sleeps(), [100, 100].map(ms));
    }

    #[test]
    fn the_last_sleep_is_cut_to_the_deadline() {
        let clock = FakeClock::new();
        let policy = RetryPolicy::new()
            .jitter(false)
            .initial_delay(ms(300))
            .max_delay(ms(300))
            .max_elapsed(ms(500));
        let outcome = always_locked(&policy, &clock, || {});
        assert!(matches!(
            outcome,
            Err(Failure::Exhausted { attempts: 3, .. })
        ));
        assert_eq!(clock.sleeps(), [300, 200].map(ms));
    }

    #[test]
    #[should_panic(expected = "max_attempts must be at least 1")]
    fn zero_attempts_is_rejected_in_the_setter() {
        let _ = RetryPolicy::new().max_attempts(0);
    }
}
