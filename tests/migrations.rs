//! Migration safety: unknown (newer) migrations, a failing migration mid-batch, and
//! migrations that would run outside a transaction. Each refusal leaves the file unchanged.

mod common;

use std::fs;
use std::path::Path;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel_migrations::FileBasedMigrations;
use sqlite_persistence::{Catalog, Database, Error, Options, Status, MIGRATIONS};

/// Writes a migrations directory: (name, up.sql, metadata.toml) per migration.
fn migrations(dir: &Path, list: &[(&str, &str, Option<&str>)]) -> FileBasedMigrations {
    for (name, up, metadata) in list {
        let m = dir.join(name);
        fs::create_dir_all(&m).unwrap();
        fs::write(m.join("up.sql"), up).unwrap();
        fs::write(m.join("down.sql"), "SELECT 1;").unwrap();
        if let Some(metadata) = metadata {
            fs::write(m.join("metadata.toml"), metadata).unwrap();
        }
    }
    FileBasedMigrations::from_path(dir).unwrap()
}

/// A first migration that succeeds, to show it is rolled back with the rest.
const ONE: (&str, &str, Option<&str>) = (
    "2026-01-01-000001_one",
    "CREATE TABLE one (x INTEGER);",
    None,
);

fn tables(db: &Path) -> Vec<String> {
    common::query_strings(
        db,
        "SELECT name AS value FROM sqlite_master WHERE type = 'table' ORDER BY name",
    )
}

#[test]
fn a_database_migrated_by_a_newer_binary_is_refused_and_untouched() {
    let (dir, db) = common::fresh_db();
    // The "newer binary": the catalog's migrations plus one more.
    Catalog::open(&db, Options::new()).unwrap();
    let newer = migrations(
        &dir.path().join("newer"),
        &[(
            "2099-01-01-000000_newer",
            "CREATE TABLE newer (x INTEGER);",
            None,
        )],
    );
    // And the other way round: to that source, the catalog's three are unknown.
    let error = Database::open(&db, newer).unwrap_err();
    assert!(matches!(error, Error::UnknownMigrations { ref versions, .. } if versions.len() == 3));
    {
        let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
        conn.batch_execute(
            "CREATE TABLE newer (x INTEGER);
             INSERT INTO __diesel_schema_migrations (version) VALUES ('20990101000000');",
        )
        .unwrap();
    }
    let before = tables(&db);
    let error = Catalog::open(&db, Options::new()).unwrap_err();
    match &error {
        Error::UnknownMigrations { versions, .. } => assert_eq!(versions, &["20990101000000"]),
        other => panic!("{other}"),
    }
    assert!(error.to_string().contains("20990101000000"), "{error}");
    assert_eq!(tables(&db), before);
    // Explicitly allowed, for rolling upgrades.
    Catalog::open(&db, Options::new().allow_unknown_migrations(true)).unwrap();
    let status = Status::read(&db, MIGRATIONS, &Options::new()).unwrap();
    assert_eq!(status.unknown, ["20990101000000"]);
}

#[test]
fn a_failing_migration_rolls_back_the_whole_batch() {
    let (dir, db) = common::fresh_db();
    let source = migrations(
        &dir.path().join("m"),
        &[
            ONE,
            (
                "2026-01-01-000002_two",
                "CREATE TABLE two (x INTEGER); INSERT INTO nope VALUES (1);",
                None,
            ),
            (
                "2026-01-01-000003_three",
                "CREATE TABLE three (x INTEGER);",
                None,
            ),
        ],
    );
    let error = Database::open(&db, source).unwrap_err();
    match &error {
        Error::Migration { name, .. } => assert_eq!(name, "2026-01-01-000002_two"),
        other => panic!("{other}"),
    }
    let chain = sqlite_persistence::error_chain(&error);
    assert!(chain.contains("no such table: nope"), "{chain}");
    assert!(!error.is_lock_error());
    // Neither "one" nor the bookkeeping table survived.
    assert!(tables(&db).is_empty(), "{:?}", tables(&db));
}

#[test]
fn non_transactional_migrations_are_refused_before_anything_runs() {
    for metadata in [
        "run_in_transaction = false",
        "# no key: diesel reads it as false\n",
    ] {
        let (dir, db) = common::fresh_db();
        let source = migrations(
            &dir.path().join("m"),
            &[ONE, ("2026-01-01-000002_vacuum", "VACUUM;", Some(metadata))],
        );
        let error = Database::open(&db, source).unwrap_err();
        match &error {
            Error::NonTransactionalMigration { name } => {
                assert_eq!(name, "2026-01-01-000002_vacuum")
            }
            other => panic!("{metadata}: {other}"),
        }
        assert!(error.to_string().contains("metadata.toml"), "{error}");
        assert!(tables(&db).is_empty());
    }
}

#[test]
fn an_explicitly_transactional_metadata_is_accepted() {
    let (dir, db) = common::fresh_db();
    let source = migrations(
        &dir.path().join("m"),
        &[(
            "2026-01-01-000001_one",
            "CREATE TABLE one (x INTEGER);",
            Some("run_in_transaction = true"),
        )],
    );
    let db_handle = Database::open(&db, source).unwrap();
    assert_eq!(db_handle.applied_at_open(), ["2026-01-01-000001_one"]);
}

#[test]
fn nothing_pending_takes_no_write_lock() {
    let (_dir, db) = common::fresh_db();
    Catalog::open(&db, Options::new()).unwrap();
    // Another connection holds the write lock for the whole open: a migrated database
    // opens anyway, because the fast path only reads.
    let mut holder = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    holder.batch_execute("BEGIN IMMEDIATE").unwrap();
    let options = Options::new().retry(
        sqlite_persistence::RetryPolicy::new().max_elapsed(std::time::Duration::from_millis(200)),
    );
    let catalog = Catalog::open(&db, options).unwrap();
    assert!(catalog.database().applied_at_open().is_empty());
    holder.batch_execute("ROLLBACK").unwrap();
}
