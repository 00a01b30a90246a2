//! Uncontended write cost: `Database::write` (fair-queue turn, retry loop, pooled
//! connection, BEGIN IMMEDIATE), with and without the fair queue, against a bare `immediate_transaction` on a connection with
//! the same pragmas, on the same file. Rounds alternate so that machine noise hits both;
//! the medians and their ratio are printed. Run: `cargo bench --bench uncontended`.

use std::time::{Duration, Instant};

use diesel::connection::Instrumentation;
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::{ConnectionCustomizer, Options};

/// The library's test schema (`migrations/`): counters.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

const WRITES_PER_ROUND: u32 = 2000;
const ROUNDS: usize = 15;

fn update(conn: &mut SqliteConnection) -> QueryResult<usize> {
    diesel::sql_query("UPDATE counters SET value = value + 1").execute(conn)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
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

    let (mut layer, mut no_queue, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..WRITES_PER_ROUND {
            db.write(|c| -> sqlite_persistence::Result<usize> { Ok(update(c)?) })
                .unwrap();
        }
        layer.push(start.elapsed() / WRITES_PER_ROUND);
        let start = Instant::now();
        for _ in 0..WRITES_PER_ROUND {
            unqueued
                .write(|c| -> sqlite_persistence::Result<usize> { Ok(update(c)?) })
                .unwrap();
        }
        no_queue.push(start.elapsed() / WRITES_PER_ROUND);
        let start = Instant::now();
        for _ in 0..WRITES_PER_ROUND {
            bare.immediate_transaction(update).unwrap();
        }
        baseline.push(start.elapsed() / WRITES_PER_ROUND);
    }
    let (layer, no_queue, baseline) = (median(layer), median(no_queue), median(baseline));
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "uncontended write: Database::write {:.1} us ({:.3} x), without the fair queue {:.1} us \
         ({:.3} x), bare immediate_transaction {:.1} us (median of {ROUNDS} alternating rounds \
         of {WRITES_PER_ROUND})",
        us(layer),
        us(layer) / us(baseline),
        us(no_queue),
        us(no_queue) / us(baseline),
        us(baseline),
    );
}
