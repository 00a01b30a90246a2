//! The async handle against the blocking one, on the same file, side by side:
//! - uncontended: one caller, `AsyncDatabase::write(..).await` against `Database::write`
//!   awaited in `block_on` and in a spawned task (rounds alternate; medians of 15 rounds of
//!   2,000 writes);
//! - contended: 8, 16 and 64 tokio tasks against as many OS threads, 500 short writes each,
//!   in one process (5 alternating rounds, median throughput).
//!
//! Run: `cargo bench --features tokio --bench async_handle`. `CALLERS=16` (a comma-separated
//! list) and `ROUNDS=5` change the contended loads.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::{AsyncDatabase, Options};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

fn update(conn: &mut SqliteConnection) -> sqlite_persistence::Result<usize> {
    Ok(
        diesel::sql_query("UPDATE counters SET value = value + 1 WHERE name = 'a'")
            .execute(conn)?,
    )
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The context switches of this process's threads so far, voluntary (a wait) and not.
fn switches() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid place for the kernel to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: zeroed, then filled by `getrusage`.
    let usage = unsafe { usage.assume_init() };
    (usage.ru_nvcsw + usage.ru_nivcsw) as f64
}

/// The CPU time this process has used, user and system.
fn cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid place for the kernel to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: zeroed, then filled by `getrusage`.
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = runtime
        .block_on(AsyncDatabase::open_with(Options::new(), &path, MIGRATIONS))
        .unwrap();
    db.blocking()
        .write(|c| -> sqlite_persistence::Result<usize> {
            Ok(diesel::sql_query("INSERT INTO counters (name) VALUES ('a')").execute(c)?)
        })
        .unwrap();

    const WRITES: u32 = 2000;
    let (mut blocking, mut asynchronous, mut spawned) = (Vec::new(), Vec::new(), Vec::new());
    let (mut blocking_cpu, mut asynchronous_cpu) = (Vec::new(), Vec::new());
    let uncontended: usize = env_or("UNCONTENDED", 15);
    for _ in 0..uncontended {
        let (start, used) = (Instant::now(), cpu());
        for _ in 0..WRITES {
            db.blocking().write(update).unwrap();
        }
        blocking.push(start.elapsed() / WRITES);
        blocking_cpu.push((cpu() - used) / WRITES);
        let (start, used) = (Instant::now(), cpu());
        runtime.block_on(async {
            for _ in 0..WRITES {
                db.write(update).await.unwrap();
            }
        });
        asynchronous.push(start.elapsed() / WRITES);
        asynchronous_cpu.push((cpu() - used) / WRITES);
        let start = Instant::now();
        let task = runtime.spawn({
            let db = db.clone();
            async move {
                for _ in 0..WRITES {
                    db.write(update).await.unwrap();
                }
            }
        });
        runtime.block_on(task).unwrap();
        spawned.push(start.elapsed() / WRITES);
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    if uncontended > 0 {
        let (b, a, s) = (median(blocking), median(asynchronous), median(spawned));
        let (bc, ac) = (median(blocking_cpu), median(asynchronous_cpu));
        println!(
            "uncontended write: AsyncDatabase::write {:.1} us ({:.3} x) in `block_on`, {:.1} us \
             ({:.3} x) in a spawned task, Database::write {:.1} us; CPU a write in `block_on`: \
             {:.1} us ({:.3} x), blocking {:.1} us (medians of {uncontended} alternating rounds \
             of {WRITES})",
            us(a),
            us(a) / us(b),
            us(s),
            us(s) / us(b),
            us(b),
            us(ac),
            us(ac) / us(bc),
            us(bc)
        );
    }

    const EACH: usize = 500;
    let rounds: usize = env_or("ROUNDS", 5);
    let callers: Vec<usize> = std::env::var("CALLERS")
        .unwrap_or_else(|_| "8,16,64".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    for callers in callers {
        let (mut threads, mut tasks) = (Vec::new(), Vec::new());
        let (mut threads_cpu, mut tasks_cpu): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
        let (mut threads_switches, mut tasks_switches) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (start, used, switched) = (Instant::now(), cpu(), switches());
            std::thread::scope(|s| {
                for _ in 0..callers {
                    s.spawn(|| {
                        for _ in 0..EACH {
                            db.blocking().write(update).unwrap();
                        }
                    });
                }
            });
            threads.push((callers * EACH) as f64 / start.elapsed().as_secs_f64());
            threads_cpu.push(us(cpu() - used) / (callers * EACH) as f64);
            threads_switches.push((switches() - switched) / (callers * EACH) as f64);
            let (start, used, switched) = (Instant::now(), cpu(), switches());
            runtime.block_on(async {
                let handles: Vec<_> = (0..callers)
                    .map(|_| {
                        let db = db.clone();
                        tokio::spawn(async move {
                            for _ in 0..EACH {
                                db.write(update).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for handle in handles {
                    handle.await.unwrap();
                }
            });
            tasks.push((callers * EACH) as f64 / start.elapsed().as_secs_f64());
            tasks_cpu.push(us(cpu() - used) / (callers * EACH) as f64);
            tasks_switches.push((switches() - switched) / (callers * EACH) as f64);
        }
        let (t, k) = (median(threads), median(tasks));
        let (tc, kc) = (median(threads_cpu), median(tasks_cpu));
        let (ts, ks) = (median(threads_switches), median(tasks_switches));
        println!(
            "contended, {callers} callers x {EACH} writes: tokio tasks {k:.0} writes/s ({:.3} x), \
             OS threads {t:.0} writes/s; CPU a write: tasks {kc:.1} us ({:.3} x), threads {tc:.1} us; \
             context switches a write: tasks {ks:.2}, threads {ts:.2} (medians of {rounds} \
             alternating rounds)",
            k / t,
            kc / tc
        );
    }
}
