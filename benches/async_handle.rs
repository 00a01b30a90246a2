//! The async handle against the blocking one, on the same file, side by side:
//! - uncontended: one caller, `AsyncDatabase::write(..).await` against `Database::write`
//!   (rounds alternate; medians of 15 rounds of 2,000 writes);
//! - contended: 16 tokio tasks against 16 OS threads, 500 short writes each, in one process
//!   (5 alternating rounds, median throughput).
//!
//! Run: `cargo bench --features tokio --bench async_handle`.

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
    let (mut blocking, mut asynchronous) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let start = Instant::now();
        for _ in 0..WRITES {
            db.blocking().write(update).unwrap();
        }
        blocking.push(start.elapsed() / WRITES);
        let start = Instant::now();
        runtime.block_on(async {
            for _ in 0..WRITES {
                db.write(update).await.unwrap();
            }
        });
        asynchronous.push(start.elapsed() / WRITES);
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (b, a) = (median(blocking), median(asynchronous));
    println!(
        "uncontended write: AsyncDatabase::write {:.1} us ({:.3} x), Database::write {:.1} us \
         (median of 15 alternating rounds of {WRITES})",
        us(a),
        us(a) / us(b),
        us(b)
    );

    const CALLERS: usize = 16;
    const EACH: usize = 500;
    let (mut threads, mut tasks) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..CALLERS {
                s.spawn(|| {
                    for _ in 0..EACH {
                        db.blocking().write(update).unwrap();
                    }
                });
            }
        });
        threads.push((CALLERS * EACH) as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        runtime.block_on(async {
            let handles: Vec<_> = (0..CALLERS)
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
        tasks.push((CALLERS * EACH) as f64 / start.elapsed().as_secs_f64());
    }
    let (t, k) = (median(threads), median(tasks));
    println!(
        "contended, {CALLERS} callers x {EACH} writes: tokio tasks {k:.0} writes/s ({:.3} x), \
         OS threads {t:.0} writes/s (median of 5 alternating rounds)",
        k / t
    );
}
