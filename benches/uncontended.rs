//! Uncontended write cost: `Database::write` (fair-queue turn, retry loop, pooled
//! connection, BEGIN IMMEDIATE), with and without the fair queue, against a bare `immediate_transaction` on a connection with
//! the same pragmas, on the same file. Rounds alternate so that machine noise hits both;
//! the medians and the medians of each round's ratios are printed. Run: `cargo bench --bench uncontended`.

use std::time::{Duration, Instant};

use diesel::connection::Instrumentation;
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::{ConnectionCustomizer, Options};

/// The library's test schema (`migrations/`): counters.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

const WRITES_PER_ROUND: u32 = 1000;
const ROUNDS: usize = 41;

fn update(conn: &mut SqliteConnection) -> QueryResult<usize> {
    diesel::sql_query("UPDATE counters SET value = value + 1").execute(conn)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    db.write(|c| -> sqlite_persistence::Result<usize> {
        Ok(diesel::sql_query("INSERT INTO counters (name) VALUES ('a')").execute(c)?)
    })
    .unwrap();
    let unqueued = Options::new()
        .fair_queue(false)
        .open(&path, MIGRATIONS)
        .unwrap();
    let mut bare = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    ConnectionCustomizer::new(&Options::new())
        .apply(&mut bare)
        .unwrap();
    // The pragmas only: not the layer's instrumentation, which reads result codes.
    bare.set_instrumentation(None::<Box<dyn Instrumentation>>);

    // Each round times WRITES_PER_ROUND writes of each of the three, in an order that
    // rotates from round to round; each round's ratios compare writes made within a few
    // milliseconds of each other, so that the machine's drift cancels out of their medians.
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let mut took = [Duration::ZERO; 3];
        for k in 0..3 {
            let which = (round + k) % 3;
            let start = Instant::now();
            for _ in 0..WRITES_PER_ROUND {
                match which {
                    0 => db
                        .write(|c| -> sqlite_persistence::Result<usize> { Ok(update(c)?) })
                        .map(drop)
                        .unwrap(),
                    1 => unqueued
                        .write(|c| -> sqlite_persistence::Result<usize> { Ok(update(c)?) })
                        .map(drop)
                        .unwrap(),
                    _ => bare.immediate_transaction(update).map(drop).unwrap(),
                }
            }
            took[which] = start.elapsed() / WRITES_PER_ROUND;
        }
        rounds.push(took);
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let of = |i: usize| median(rounds.iter().map(|r| r[i]).collect());
    let ratio = |i: usize| median_f64(rounds.iter().map(|r| us(r[i]) / us(r[2])).collect());
    println!(
        "uncontended write: Database::write {:.1} us ({:.3} x), without the fair queue {:.1} us \
         ({:.3} x), bare immediate_transaction {:.1} us (medians of {ROUNDS} rounds of \
         {WRITES_PER_ROUND} each, in rotating order; the ratios are medians of each round's)",
        us(of(0)),
        ratio(0),
        us(of(1)),
        ratio(1),
        us(of(2)),
    );
}
