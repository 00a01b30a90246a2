//! The layer's tracing events carry OpenTelemetry's database fields beside its own, so that
//! an operator's subscriber can turn waits and retries into metrics.

mod common;

use std::time::Duration;

use common::{bump, fresh_db, hold_write_lock, Captured, MIGRATIONS};
use sqlite_persistence::{Options, RetryPolicy};

#[test]
fn retries_and_giving_up_carry_the_open_telemetry_database_fields() {
    let (_dir, path) = fresh_db();
    let db = Options::new()
        .busy_timeout(Duration::from_millis(50))
        .retry(RetryPolicy::new().max_elapsed(Duration::from_millis(400)))
        .open(&path, MIGRATIONS)
        .unwrap();
    let captured = Captured::default();
    let subscriber = captured.subscriber(tracing::Level::WARN);
    let holder = hold_write_lock(&path, Duration::from_millis(1200));
    tracing::subscriber::with_default(subscriber, || {
        bump(&db, "a").unwrap_err();
    });
    holder.join().unwrap();
    let text = captured.text();
    let retries: Vec<&str> = text.lines().filter(|l| l.contains("retrying")).collect();
    let gave_up: Vec<&str> = text.lines().filter(|l| l.contains("giving up")).collect();
    assert!(!retries.is_empty() && gave_up.len() == 1, "{text}");
    for line in retries.iter().chain(&gave_up) {
        for field in [
            "db.system.name=\"sqlite\"",
            "db.operation.name=\"write\"",
            "error.type=\"busy\"",
            "operation=\"write\"",
            "elapsed_ms=",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
        assert!(
            line.contains(&format!("db.namespace={}", path.display())),
            "{line}"
        );
    }
    assert!(retries.iter().all(|l| l.contains("delay_ms=")), "{text}");
}

#[test]
fn a_long_wait_for_the_write_queue_is_logged_naming_the_holder_and_what_it_does() {
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    let captured = Captured::default();
    std::thread::scope(|scope| {
        let (held, is_held) = std::sync::mpsc::channel();
        let db = &db;
        scope.spawn(move || {
            db.write(|_conn| -> sqlite_persistence::Result<()> {
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(1600));
                Ok(())
            })
            .unwrap();
        });
        is_held.recv_timeout(Duration::from_secs(10)).unwrap();
        tracing::subscriber::with_default(captured.subscriber(tracing::Level::WARN), || {
            bump(db, "a").unwrap();
        });
    });
    let text = captured.text();
    let waits: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("waiting for the write queue"))
        .collect();
    assert_eq!(waits.len(), 1, "{text}");
    for field in [
        "db.operation.name=\"write\"",
        "waited_ms=1000",
        &format!("held_by=process {} ", std::process::id()),
        "holding the write queue for ",
        " s (write)",
    ] {
        assert!(waits[0].contains(field), "{field} missing: {}", waits[0]);
    }
}

/// `tracing-core` caches a callsite's interest for the whole process, and while one
/// dispatcher is registered it asks the default of the thread that reaches the callsite
/// first (tokio-rs/tracing#3611): a callsite first reached on a thread without a subscriber,
/// while a test captures on its own, is cached as never wanted, and the capture misses the
/// event. [`Captured`] keeps a second dispatcher registered, so that every registered one is
/// asked.
#[test]
fn a_capture_sees_an_event_whose_callsite_another_thread_reached_first() {
    fn say() {
        tracing::warn!("reached");
    }
    let captured = Captured::default();
    tracing::subscriber::with_default(captured.subscriber(tracing::Level::WARN), || {
        std::thread::spawn(say).join().unwrap();
        say();
    });
    let text = captured.text();
    assert_eq!(text.matches("reached").count(), 1, "{text}");
}
