//! Group commit under `Synchronous::Full`: THREADS threads of one process write short
//! transactions (each counts its own counter up) through one handle, with group commit and
//! without, for ROUND_SECS each, alternating which goes first; then the same with one
//! thread; then a lone writer's cost of it in short alternating rounds, under FULL and under
//! `Synchronous::Normal` (no sync to hide it).
//! Prints each round and the medians: writes per second, p50 and p99 latency (from
//! asking to write until answered), and the ratio with over without.
//!
//! Run: `cargo bench --bench group_commit` (env: `GROUP_BENCH_ROUNDS`, pairs of rounds,
//! default 5; `GROUP_BENCH_SECS`, seconds per round, default 2; `GROUP_BENCH_THREADS`,
//! default 16; `GROUP_BENCH_DIR`, where the files go, default the temporary directory: it
//! must be a disk that syncs, not a memory filesystem).

use std::path::Path;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::{Database, Options, Synchronous};

/// The library's test schema (`migrations/`): counters.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().expect("a number"))
}

/// One short write: counts `name` up by one.
fn count(db: &Database, name: &str) {
    db.write(|conn| -> sqlite_persistence::Result<usize> {
        Ok(diesel::sql_query(
            "INSERT INTO counters (name, value) VALUES (?, 1) \
             ON CONFLICT (name) DO UPDATE SET value = value + 1",
        )
        .bind::<Text, _>(name)
        .execute(conn)?)
    })
    .unwrap();
}

/// What one round measured.
#[derive(Clone, Copy, Debug)]
struct Round {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// `threads` threads write through `db` for `secs`.
fn round(db: &Database, threads: usize, secs: u64) -> Round {
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let name = format!("t{t}");
                    let mut took = Vec::new();
                    while Instant::now() < until {
                        let asked = Instant::now();
                        count(db, &name);
                        took.push(asked.elapsed());
                    }
                    took
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let elapsed = start.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Round {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn open(dir: &Path, name: &str, group: bool) -> Database {
    Options::new()
        .synchronous(Synchronous::Full)
        .group_commit(group)
        .open(dir.join(name), MIGRATIONS)
        .unwrap()
}

/// Alternating rounds of `threads` threads with (`on`) and without (`off`) group commit,
/// each on a fresh file of its own in `dir`.
fn compare(dir: &Path, threads: usize, rounds: u64, secs: u64) {
    let off = &open(dir, &format!("off-{threads}.db"), false);
    let on = &open(dir, &format!("on-{threads}.db"), true);
    let mut results: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        for k in 0..2 {
            let which = (r as usize + k) % 2;
            let db = if which == 0 { off } else { on };
            let result = round(db, threads, secs);
            println!(
                "{threads:>2} threads, group commit {}: {:>7.0} writes/s, p50 {:>7.2} ms, p99 {:>7.2} ms",
                if which == 0 { "off" } else { "on " },
                result.rate,
                ms(result.p50),
                ms(result.p99)
            );
            results[which].push(result);
        }
    }
    let med = |which: usize, f: fn(&Round) -> f64| median(results[which].iter().map(f).collect());
    let (rate_off, rate_on) = (med(0, |r| r.rate), med(1, |r| r.rate));
    let (p50_off, p50_on) = (med(0, |r| ms(r.p50)), med(1, |r| ms(r.p50)));
    let (p99_off, p99_on) = (med(0, |r| ms(r.p99)), med(1, |r| ms(r.p99)));
    // The ratios within each pair of rounds (made seconds apart), then their median.
    let pair = |f: fn(&Round) -> f64| {
        median(
            results[0]
                .iter()
                .zip(&results[1])
                .map(|(off, on)| f(on) / f(off))
                .collect(),
        )
    };
    println!(
        "{threads:>2} threads, medians of {rounds}: off {rate_off:.0} writes/s (p50 {p50_off:.2} ms, \
         p99 {p99_off:.2} ms), on {rate_on:.0} writes/s (p50 {p50_on:.2} ms, p99 {p99_on:.2} ms); \
         on/off: rate {:.2} x, p99 {:.2} x (medians of the pairs' ratios: rate {:.2} x, p99 {:.2} x)",
        rate_on / rate_off,
        p99_on / p99_off,
        pair(|r| r.rate),
        pair(|r| ms(r.p99)),
    );
}

/// A lone writer's cost of group commit under `synchronous`: LONE_ROUNDS rounds of `writes`
/// writes from one thread, with and without, alternating which goes first; each round's
/// ratio compares writes made moments apart (a sync's cost drifts a lot from second to
/// second on a shared disk), and their median is printed.
fn lone(dir: &Path, synchronous: Synchronous, writes: u32) {
    const LONE_ROUNDS: usize = 41;
    let open = |name: &str, group: bool| {
        Options::new()
            .synchronous(synchronous)
            .group_commit(group)
            .open(dir.join(name), MIGRATIONS)
            .unwrap()
    };
    let dbs = [
        open(&format!("lone-off-{synchronous:?}.db"), false),
        open(&format!("lone-on-{synchronous:?}.db"), true),
    ];
    let mut took = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    for r in 0..LONE_ROUNDS {
        let mut round = [0.0; 2];
        for k in 0..2 {
            let which = (r + k) % 2;
            let start = Instant::now();
            for _ in 0..writes {
                count(&dbs[which], "lone");
            }
            round[which] = start.elapsed().as_secs_f64() * 1e6 / f64::from(writes);
            took[which].push(round[which]);
        }
        ratios.push(round[1] / round[0]);
    }
    let [off, on] = took;
    println!(
        "lone writer ({synchronous:?}): off {:.1} us, on {:.1} us a write; on/off {:.3} x \
         (medians of {LONE_ROUNDS} rounds of {writes}, alternating; the ratio is the median of \
         each round's)",
        median(off),
        median(on),
        median(ratios)
    );
}

fn main() {
    let rounds = env("GROUP_BENCH_ROUNDS", 5);
    let secs = env("GROUP_BENCH_SECS", 2);
    let threads = env("GROUP_BENCH_THREADS", 16) as usize;
    let base = std::env::var("GROUP_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    compare(dir.path(), threads, rounds, secs);
    compare(dir.path(), 1, rounds, secs);
    lone(dir.path(), Synchronous::Full, 200);
    lone(dir.path(), Synchronous::Normal, 1000);
}
