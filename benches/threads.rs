//! Threads of one process writing short transactions: 16 threads x 500 writes each (a
//! read-then-insert, as a job queue does), with the fair queue and without it, on one
//! file; 5 alternating rounds; median throughput and median p99 of the per-write wait.
//!
//! Run: `cargo bench --bench threads`.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::{Database, Options};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
const THREADS: usize = 16;
const EACH: usize = 500;

#[derive(QueryableByName)]
struct Max {
    #[diesel(sql_type = BigInt)]
    top: i64,
}

/// One job-queue write: read the last value, insert the next.
fn job(db: &Database, counter: &str) -> Duration {
    db.write_measured(|conn| -> sqlite_persistence::Result<()> {
        let top = diesel::sql_query(
            "SELECT coalesce(max(value), 0) AS top FROM events WHERE counter = ?",
        )
        .bind::<Text, _>(counter)
        .get_result::<Max>(conn)?
        .top;
        diesel::sql_query("INSERT INTO events (counter, value) VALUES (?, ?)")
            .bind::<Text, _>(counter)
            .bind::<BigInt, _>(top + 1)
            .execute(conn)?;
        Ok(())
    })
    .unwrap()
    .1
    .wait
}

/// Runs the load on a fresh file; returns writes/s and the p99 wait.
fn round(queue: bool) -> (f64, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("threads.db");
    let db = Options::new()
        .fair_queue(queue)
        .pool_size(THREADS as u32)
        .open(&path, MIGRATIONS)
        .unwrap();
    db.write(|c| -> sqlite_persistence::Result<usize> {
        Ok(diesel::sql_query("INSERT INTO counters (name) VALUES ('jobs')").execute(c)?)
    })
    .unwrap();
    let start = Instant::now();
    let mut waits: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| s.spawn(|| (0..EACH).map(|_| job(&db, "jobs")).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let rate = (THREADS * EACH) as f64 / start.elapsed().as_secs_f64();
    waits.sort();
    (rate, waits[waits.len() * 99 / 100])
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        on.push(round(true));
        off.push(round(false));
    }
    let rate = |v: &[(f64, Duration)]| median(v.iter().map(|r| r.0).collect());
    let p99 = |v: &[(f64, Duration)]| median(v.iter().map(|r| r.1).collect());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{THREADS} threads x {EACH} writes: fair queue {:.0} writes/s ({:.3} x), p99 wait {:.2} ms; \
         queue off {:.0} writes/s, p99 wait {:.2} ms (medians of 5 alternating rounds)",
        rate(&on),
        rate(&on) / rate(&off),
        ms(p99(&on)),
        rate(&off),
        ms(p99(&off)),
    );
}
