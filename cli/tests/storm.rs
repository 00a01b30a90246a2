//! Real OS processes, started together on a barrier against one fresh file: the layer never
//! fails, and the plain Diesel setup does under the same storm.

mod common;

use std::time::Duration;

use common::{failure_causes, fresh_db, query_strings, storm};

const LIMIT: Duration = Duration::from_secs(120);

/// Asserts a storm of `record --artifact a --json` processes left versions 1..=n, each
/// once, and the three migrations applied once, by exactly one process.
fn assert_clean_storm(processes: usize) {
    let (_dir, db) = fresh_db();
    let outcomes = storm(
        processes,
        &db,
        &["record", "--artifact", "a", "--json"],
        &[("SQLITE_PERSISTENCE_LOG", "sqlite_persistence=info")],
        LIMIT,
    );
    let failures = failure_causes(&outcomes);
    assert!(failures.is_empty(), "failures: {failures:?}");

    let mut versions: Vec<i64> = outcomes
        .iter()
        .map(|o| {
            let line: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
            assert_eq!(line["artifact"], "a");
            assert!(line["attempts"].as_u64().unwrap() >= 1);
            assert!(line["wait_us"].is_u64());
            line["version"].as_i64().unwrap()
        })
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=processes as i64).collect::<Vec<_>>());

    assert_eq!(
        common::stored_versions(&db),
        (1..=processes as i64).collect::<Vec<_>>()
    );
    let migrations = query_strings(
        &db,
        "SELECT version AS value FROM __diesel_schema_migrations ORDER BY version",
    );
    assert_eq!(
        migrations,
        ["20261123000001", "20261123000002", "20261123000003"]
    );
    let migrators = outcomes
        .iter()
        .filter(|o| o.stderr.contains("migrations applied"))
        .count();
    assert_eq!(migrators, 1, "exactly one process applies the batch");
    assert_eq!(
        query_strings(&db, "SELECT journal_mode AS value FROM pragma_journal_mode"),
        ["wal"]
    );
}

#[test]
fn sixty_four_processes_on_a_fresh_file_never_fail() {
    for _round in 0..3 {
        assert_clean_storm(64);
    }
}

#[test]
fn thirty_two_processes_each_writing_several_versions_never_fail() {
    for _round in 0..2 {
        let (_dir, db) = fresh_db();
        let outcomes = storm(
            32,
            &db,
            &[
                "record",
                "--artifact",
                "a",
                "--count",
                "5",
                "--hold-ms",
                "2",
            ],
            &[],
            LIMIT,
        );
        assert!(
            failure_causes(&outcomes).is_empty(),
            "{:?}",
            failure_causes(&outcomes)
        );
        assert_eq!(
            common::stored_versions(&db),
            (1..=160).collect::<Vec<i64>>(),
            "distinct and gapless"
        );
    }
}

/// The proof that the storm tests can fail: the same storm against the setup most Diesel
/// applications write (busy_timeout and WAL in the r2d2 customizer, run_pending_migrations,
/// a deferred transaction for the read-then-write).
#[test]
fn plain_diesel_setup_fails_under_the_same_storm() {
    let mut failed = 0;
    let mut causes = Vec::new();
    for _round in 0..3 {
        let (_dir, db) = fresh_db();
        let outcomes = storm(
            64,
            &db,
            &["record", "--plain", "--artifact", "a", "--count", "3"],
            &[],
            LIMIT,
        );
        failed += outcomes.iter().filter(|o| !o.success).count();
        causes.extend(failure_causes(&outcomes));
    }
    eprintln!("plain setup: {failed} of 192 processes failed: {causes:#?}");
    assert!(
        failed > 0,
        "the plain setup survived 3 storms of 64 processes"
    );
    assert!(
        causes
            .iter()
            .any(|(cause, _)| cause.contains("database is locked")
                || cause.contains("already exists")
                || cause.contains("duplicate column")
                || cause.contains("UNIQUE")),
        "{causes:?}"
    );
}

#[test]
fn stress_reports_a_clean_run_and_the_plain_failures_side_by_side() {
    let (_dir, db) = fresh_db();
    let output = std::process::Command::new(common::binary())
        .args([
            "stress",
            "--processes",
            "16",
            "--writes",
            "3",
            "--hold-ms",
            "1",
        ])
        .args(["--compare", "--json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let ours = &report["sides"][0];
    assert_eq!(ours["label"], "sqlite-persistence");
    assert_eq!(ours["clean"], true, "{ours}");
    assert_eq!(ours["acknowledged_writes"], 48);
    assert_eq!(ours["migrations_recorded"], 3);
    assert!(ours["wait_ms"]["max"].as_f64().unwrap() >= 0.0);
    assert_eq!(report["sides"][1]["label"], "plain diesel");
    // A --db that exists is refused: stress needs a fresh file.
    std::fs::write(&db, b"").unwrap();
    let refused = std::process::Command::new(common::binary())
        .args(["stress", "--processes", "2", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("fresh file"));
    // So is one whose database is missing and whose -wal is left: refused by name, and the
    // left-over file is kept for the user to look at (the run's cleanup removed it).
    std::fs::remove_file(&db).unwrap();
    let wal = format!("{}-wal", db.display());
    std::fs::write(&wal, b"frames of a lost database").unwrap();
    let refused = std::process::Command::new(common::binary())
        .args(["stress", "--processes", "2", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("-wal exists") && stderr.contains("fresh file"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&wal).unwrap(), b"frames of a lost database");
    assert!(!db.exists(), "the refusal made a database");
}
