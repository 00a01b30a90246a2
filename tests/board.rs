//! The write queue's waiting board (a page of `<database>-lock` every writer maps) against
//! what else may be beside it: processes of an older version of this crate, which wait in
//! `flock` and name nobody, and a writer of the file forging the page.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{bump, fresh_db, values, MIGRATIONS};
use sqlite_persistence::{Options, RetryPolicy};

/// In a child role: takes the queue's `flock` in a loop, as a writer of a version before
/// the board does (blocking in `flock`, naming nobody), holding it `BOARD_HOLD_MS` each
/// time, until its stdin closes.
#[test]
#[ignore = "a child role of writers_beside_older_versions_are_served"]
fn older_version_child() {
    let Ok(lock) = std::env::var("BOARD_LOCK") else {
        return;
    };
    common::exit_after(60);
    let hold = Duration::from_millis(std::env::var("BOARD_HOLD_MS").unwrap().parse().unwrap());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stopper = std::sync::Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::stdin().read_line(&mut rest);
        stopper.store(true, Ordering::SeqCst);
    });
    println!("queueing");
    while !stop.load(Ordering::SeqCst) {
        let file = File::open(&lock).unwrap();
        file.lock().unwrap();
        std::thread::sleep(hold);
        drop(file);
    }
    // Before the test harness writes to a stdout nobody reads any more.
    std::process::exit(0);
}

/// Options with a short deadline: a writer starved by the others fails within it.
fn within(deadline: Duration) -> Options {
    Options::new().retry(RetryPolicy::new().max_elapsed(deadline))
}

#[test]
fn writers_beside_older_versions_are_served() {
    let (_dir, path) = fresh_db();
    let db = within(Duration::from_secs(10))
        .open(&path, MIGRATIONS)
        .unwrap();
    let lock = format!("{}-lock", path.display());
    // Eight processes of an older version keep the queue busy, 20 ms a turn: each of this
    // version's writes waits about their round, 160 ms. (Seated waiters that only tried the
    // lock every 20 ms lost to them at every release: 3 of 4 writers failed with Busy after
    // waiting 30 s beside 14 of them.)
    let mut older: Vec<_> = (0..8)
        .map(|_| {
            common::child_role(
                "older_version_child",
                &[("BOARD_LOCK", lock.clone()), ("BOARD_HOLD_MS", "20".into())],
            )
        })
        .collect();
    for child in &mut older {
        common::wait_for_line(child, "queueing");
    }
    let writers: Vec<_> = (0..3)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let db = within(Duration::from_secs(10))
                    .open(&path, MIGRATIONS)
                    .unwrap();
                let mut longest = Duration::ZERO;
                for _ in 0..5 {
                    let (_, stats) = bump(&db, "beside").unwrap();
                    longest = longest.max(stats.wait);
                }
                longest
            })
        })
        .collect();
    let longest: Vec<Duration> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for mut child in older {
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(values(&db, "beside").unwrap(), (1..=15).collect::<Vec<_>>());
    eprintln!("longest waits beside older versions: {longest:?}");
}

/// The system's monotonic clock in nanoseconds, as the board keeps it.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    #[allow(unsafe_code)]
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now)
    };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Forges the board of the queue's file `lock` until `stop`: every 200 us, either noise
/// (keeping the page's magic) or a fresh "next" naming a seat nobody holds, so that every
/// waiter holds back for it.
fn forge(lock: &Path, stop: &AtomicBool) -> u64 {
    let file = std::fs::OpenOptions::new().write(true).open(lock).unwrap();
    let mut rounds = 0u64;
    let mut noise = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::SeqCst) {
        if rounds.is_multiple_of(2) {
            let mut page = [0u8; 4096];
            for chunk in page.chunks_exact_mut(8) {
                noise ^= noise << 13;
                noise ^= noise >> 7;
                noise ^= noise << 17;
                chunk.copy_from_slice(&noise.to_le_bytes());
            }
            page[..4].copy_from_slice(b"SPW2");
            let _ = file.write_at(&page, 4096);
        } else {
            let mut named = [0u8; 16];
            named[..8].copy_from_slice(&((4242u64 << 32) | 7).to_le_bytes());
            named[8..].copy_from_slice(&monotonic_ns().to_le_bytes());
            let _ = file.write_at(&named, 4096 + 8);
        }
        rounds += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    rounds
}

#[test]
fn a_forged_board_slows_writers_but_never_stops_them() {
    let (_dir, path) = fresh_db();
    let deadline = Duration::from_secs(20);
    let db = within(deadline).open(&path, MIGRATIONS).unwrap();
    let lock = Path::new(&format!("{}-lock", path.display())).to_owned();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (forged, waits) = std::thread::scope(|s| {
        let forger = s.spawn(|| forge(&lock, &stop));
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let path = &path;
                s.spawn(move || {
                    let db = within(deadline).open(path, MIGRATIONS).unwrap();
                    (0..50)
                        .map(|_| bump(&db, "forged").unwrap().1.wait)
                        .max()
                        .unwrap()
                })
            })
            .collect();
        let waits: Vec<Duration> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::SeqCst);
        (forger.join().unwrap(), waits)
    });
    assert!(forged > 0);
    assert_eq!(
        values(&db, "forged").unwrap(),
        (1..=200).collect::<Vec<_>>()
    );
    eprintln!(
        "200 writes under a forged board in {:?}, longest wait {:?}",
        start.elapsed(),
        waits.iter().max()
    );
}
