//! The command line on PostgreSQL, against a real server (the library's test harness starts
//! a private throwaway cluster, or uses `PG_TEST_URL`).
#![cfg(feature = "postgres")]

#[path = "../../tests/common/bouncer.rs"]
mod bouncer;
mod common;
#[path = "../../tests/common/pg.rs"]
mod pg;

use std::process::Command;

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::binary())
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn stress_compare_on_postgres_has_no_failure_on_the_layers_side_and_shows_plain_failing() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let (ok, out, err) = cli(&[
        "stress",
        "--compare",
        "--json",
        "--db",
        &url,
        "--processes",
        "16",
        "--writes",
        "10",
        "--hold-ms",
        "2",
    ]);
    // The plain side fails, so the command reports an unclean run only if ours was.
    assert!(ok, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ours = &report["sides"][0];
    let plain = &report["sides"][1];
    assert_eq!(ours["clean"], true, "{ours}");
    assert_eq!(ours["failed_processes"], 0, "{ours}");
    assert_eq!(ours["stored_versions"], 160, "{ours}");
    assert_eq!(ours["migrations_recorded"], 3, "{ours}");
    assert_eq!(plain["clean"], false, "{plain}");
    // The databases it made are gone; the one the URL names is untouched.
    let mut conn = pg::connect(&url);
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let count = |conn: &mut PgConnection, sql: &str| {
        diesel::sql_query(sql).get_result::<N>(conn).unwrap().n
    };
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_database WHERE datname LIKE 'sp_stress_%'"
        ),
        0
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'"
        ),
        0
    );
}

#[test]
fn migrate_record_and_status_take_a_postgres_url() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let (ok, out, err) = cli(&["migrate", "--db", &url]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("applied ")).count(),
        3,
        "{out}"
    );
    let (ok, out, err) = cli(&[
        "record",
        "--artifact",
        "model",
        "--count",
        "2",
        "--db",
        &url,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "model version 1\nmodel version 2\n");
    let (ok, out, err) = cli(&["status", "--json", "--db", &url]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["applied"].as_array().unwrap().len(), 3, "{status}");
    assert_eq!(status["pending"].as_array().unwrap().len(), 0, "{status}");
    assert_eq!(status["checksums"]["verified"], 3, "{status}");
    assert_eq!(
        status["application_id"],
        u32::from_be_bytes(*b"SPct"),
        "{status}"
    );
    // DATABASE_URL works as --db does.
    let out = Command::new(common::binary())
        .args(["record", "--artifact", "model"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "model version 3\n");
    // Commands that work on files alone say so.
    let (ok, _, err) = cli(&["backup", "--to", "/tmp/x.db", "--db", &url]);
    assert!(!ok && err.contains("SQLite files"), "{err}");
    // A scheme of no engine is refused, naming it.
    let (ok, _, err) = cli(&["status", "--db", "mysql://u:secret@h/db"]);
    assert!(
        !ok && err.contains("mysql://") && !err.contains("secret"),
        "{err}"
    );
}

/// Behind PgBouncer in transaction pooling mode, the command line refuses the undeclared
/// pooler and says how to declare it; `--transaction-pooling` declares it (`record`, and
/// `stress`, which passes it to its processes), and the writes go through.
#[test]
fn a_transaction_pooler_is_refused_until_declared_with_transaction_pooling() {
    let Some((_direct, bounced)) = bouncer::fresh_database(bouncer::Order::RoundRobin) else {
        return;
    };
    let (ok, _, err) = cli(&["record", "--db", &bounced, "--artifact", "a"]);
    assert!(!ok, "an undeclared transaction pooler was opened");
    assert!(err.contains("transaction pool"), "{err}");
    assert!(
        err.contains("hint:") && err.contains("--transaction-pooling"),
        "{err}"
    );
    let (ok, out, err) = cli(&[
        "record",
        "--transaction-pooling",
        "--db",
        &bounced,
        "--artifact",
        "a",
        "--count",
        "3",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    // `stress` lists its processes' failures by cause, and their hints once.
    let (ok, out, err) = cli(&[
        "stress",
        "--json",
        "--db",
        &bounced,
        "--processes",
        "2",
        "--writes",
        "1",
    ]);
    assert!(!ok, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect(&err);
    let side = &report["sides"][0];
    let causes = side["failures_by_cause"].as_object().unwrap();
    assert!(
        !causes.is_empty() && causes.keys().all(|c| c.contains("transaction pool")),
        "{out}"
    );
    let hints = side["hints"].as_array().unwrap();
    assert!(
        hints.len() == 1 && hints[0].as_str().unwrap().contains("--transaction-pooling"),
        "{out}"
    );
    let (ok, out, err) = cli(&[
        "--transaction-pooling",
        "stress",
        "--json",
        "--db",
        &bounced,
        "--processes",
        "4",
        "--writes",
        "5",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let side = &report["sides"][0];
    assert_eq!(side["failed_processes"], 0, "{out}");
    assert_eq!(side["acknowledged_writes"], 20, "{out}");
    assert_eq!(side["clean"], true, "{out}");
}
