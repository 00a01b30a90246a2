//! Writers on PostgreSQL while the server restarts or ends their sessions: real processes of
//! the command line writing one hot row (the next version of one artifact, `SERIALIZABLE`)
//! against a private cluster of the test's own, which the test restarts or sweeps with
//! `pg_terminate_backend` while they write. No process may fail, and every acknowledged
//! write must be stored exactly once.
#![cfg(feature = "postgres")]

mod common;
#[path = "../../tests/common/pg.rs"]
mod pg;

use std::collections::BTreeSet;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;

const PROCESSES: usize = 4;
const WRITES: usize = 600;

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    version: i64,
}

fn stored(url: &str) -> Vec<i64> {
    diesel::sql_query(
        "SELECT v.version FROM artifact_versions v JOIN artifacts a ON a.id = v.artifact_id \
         WHERE a.name = 'hot' ORDER BY v.version",
    )
    .load::<Version>(&mut pg::connect(url))
    .map(|rows| rows.into_iter().map(|r| r.version).collect())
    .unwrap_or_default()
}

/// Starts `PROCESSES` writers of `WRITES` versions each on `url`, calls `disturb` once a
/// tenth of the writes are stored, and checks what they acknowledged against what is stored.
fn writers_ride_out(url: &str, disturb: impl FnOnce()) {
    let dir = tempfile::tempdir().unwrap();
    let count = WRITES.to_string();
    let outcomes = std::thread::scope(|scope| {
        let writers = scope.spawn(|| {
            common::storm_at(
                PROCESSES,
                dir.path(),
                url.as_ref(),
                |_| vec!["record", "--artifact", "hot", "--count", &count, "--json"],
                &[],
                Duration::from_secs(240),
            )
        });
        let started = pg::wait_until(Duration::from_secs(120), || {
            stored(url).len() >= PROCESSES * WRITES / 10 || writers.is_finished()
        });
        assert!(started, "the writers stored nothing in 120 s");
        disturb();
        writers.join().unwrap()
    });
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.success)
        .map(|o| o.stderr.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {PROCESSES} failed: {failed:#?}",
        failed.len()
    );
    let mut acknowledged = Vec::new();
    let mut retried = 0;
    for line in outcomes.iter().flat_map(|o| o.stdout.lines()) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        acknowledged.push(record["version"].as_i64().unwrap());
        retried += usize::from(record["attempts"].as_u64().unwrap() > 1);
    }
    acknowledged.sort_unstable();
    let distinct: BTreeSet<i64> = acknowledged.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        acknowledged.len(),
        "a version acknowledged twice"
    );
    assert_eq!(acknowledged.len(), PROCESSES * WRITES);
    assert_eq!(stored(url), acknowledged, "stored and acknowledged differ");
    // The disturbance met the writers: some write ran again.
    assert!(
        retried > 0,
        "no write was retried: the disturbance missed the writers"
    );
}

fn on_private_cluster(test: impl FnOnce(&pg::Cluster, &str)) {
    let Some(cluster) = pg::Cluster::private("-c max_connections=100") else {
        return;
    };
    let url = cluster.fresh_database();
    test(&cluster, &url);
}

#[test]
fn writers_ride_out_a_fast_restart() {
    on_private_cluster(|cluster, url| writers_ride_out(url, || cluster.restart("fast")));
}

#[test]
fn writers_ride_out_an_immediate_restart() {
    on_private_cluster(|cluster, url| writers_ride_out(url, || cluster.restart("immediate")));
}

#[test]
fn writers_ride_out_a_sweep_of_their_sessions() {
    on_private_cluster(|cluster, url| {
        writers_ride_out(url, || {
            pg::connect(&cluster.url("postgres"))
                .batch_execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                )
                .unwrap();
        })
    });
}
