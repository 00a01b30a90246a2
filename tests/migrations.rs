//! Migration safety: unknown (newer) migrations, a failing migration mid-batch, and
//! migrations that would run outside a transaction. Each refusal leaves the file unchanged.

mod common;

use std::fs;
use std::path::Path;

use common::{APPLICATION_ID, MIGRATIONS, VERSIONS};
use diesel::connection::SimpleConnection;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use sqlite_persistence::{Database, Error, Options, Status};

/// The application's own options: its migrations, stamped with its id.
fn app() -> Options {
    Options::new().application_id(APPLICATION_ID)
}

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
    // The "newer binary": the application's migrations plus one more.
    app().open(&db, MIGRATIONS).unwrap();
    let newer = migrations(
        &dir.path().join("newer"),
        &[(
            "2099-01-01-000000_newer",
            "CREATE TABLE newer (x INTEGER);",
            None,
        )],
    );
    // And the other way round: to that source, the application's are unknown.
    let error = Database::open(&db, newer).unwrap_err();
    assert!(
        matches!(error, Error::UnknownMigrations { ref versions, .. } if versions == &VERSIONS)
    );
    {
        let mut conn = common::plain_sqlite(&db);
        conn.batch_execute(
            "CREATE TABLE newer (x INTEGER);
             INSERT INTO __diesel_schema_migrations (version) VALUES ('20990101000000');",
        )
        .unwrap();
    }
    let before = tables(&db);
    common::wait_closed(&db);
    let bytes = fs::read(&db).unwrap();
    let error = app().open(&db, MIGRATIONS).unwrap_err();
    match &error {
        Error::UnknownMigrations { versions, .. } => assert_eq!(versions, &["20990101000000"]),
        other => panic!("{other}"),
    }
    assert!(error.to_string().contains("20990101000000"), "{error}");
    assert_eq!(tables(&db), before);
    common::wait_closed(&db);
    assert!(fs::read(&db).unwrap() == bytes, "the file changed");
    assert!(error.hint().unwrap().contains("allow_unknown_migrations"));
    // Explicitly allowed, for rolling upgrades.
    app()
        .allow_unknown_migrations(true)
        .open(&db, MIGRATIONS)
        .unwrap();
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
    let chain = common::chain(&error);
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
        assert!(
            error.to_string().contains("run_in_transaction = false"),
            "{error}"
        );
        assert!(error.hint().unwrap().contains("metadata.toml"), "{error}");
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
    app().open(&db, MIGRATIONS).unwrap();
    // Another connection holds the write lock for the whole open: a migrated database
    // opens anyway, because the fast path only reads.
    let mut holder = common::plain_sqlite(&db);
    holder.batch_execute("BEGIN IMMEDIATE").unwrap();
    let options = app().retry(
        sqlite_persistence::RetryPolicy::new().max_elapsed(std::time::Duration::from_millis(200)),
    );
    let opened = options.open(&db, MIGRATIONS).unwrap();
    assert!(opened.applied_at_open().is_empty());
    holder.batch_execute("ROLLBACK").unwrap();
}

/// Two migrations in `dir`, the first with `first_sql`.
fn two(dir: &Path, first_sql: &str) -> FileBasedMigrations {
    migrations(
        dir,
        &[
            ("2026-01-01-000001_one", first_sql, None),
            (
                "2026-01-01-000002_two",
                "CREATE TABLE two (x INTEGER);",
                None,
            ),
        ],
    )
}

#[test]
fn an_applied_migration_edited_since_is_refused_by_name_and_untouched() {
    let (dir, db) = common::fresh_db();
    let source = dir.path().join("m");
    Database::open(&db, two(&source, "CREATE TABLE one (x INTEGER);")).unwrap();
    // Somebody edits the first migration after it ran.
    let edited = two(&source, "CREATE TABLE one (x INTEGER, y TEXT);");
    let before = tables(&db);
    common::wait_closed(&db);
    let bytes = fs::read(&db).unwrap();
    let error = Database::open(&db, edited).unwrap_err();
    match &error {
        Error::EditedMigrations { names, .. } => assert_eq!(names, &["2026-01-01-000001_one"]),
        other => panic!("{other}"),
    }
    assert!(
        error.hint().unwrap().contains("allow_edited_migrations"),
        "{error}"
    );
    assert_eq!(tables(&db), before);
    common::wait_closed(&db);
    assert!(fs::read(&db).unwrap() == bytes, "the file changed");
    let status = Status::read(
        &db,
        two(&source, "CREATE TABLE one (x INTEGER, y TEXT);"),
        &Options::new(),
    )
    .unwrap();
    assert_eq!(status.checksums.edited, ["2026-01-01-000001_one"]);
    assert_eq!(status.checksums.verified, 1);
    // The explicit override.
    let edited = two(&source, "CREATE TABLE one (x INTEGER, y TEXT);");
    Options::new()
        .allow_edited_migrations(true)
        .open(&db, edited)
        .unwrap();
    // Line ends alone are no edit (a checkout on Windows).
    let crlf = two(&source, "CREATE TABLE one (x INTEGER);\r\n");
    let lf = two(&source, "CREATE TABLE one (x INTEGER);\n");
    let (dir2, db2) = common::fresh_db();
    let _keep = dir2;
    Database::open(&db2, lf).unwrap();
    Database::open(&db2, crlf).unwrap();
}

#[test]
fn a_database_migrated_by_plain_diesel_gets_its_checksums_and_application_id_once() {
    let (_dir, db) = common::fresh_db();
    {
        // What plain Diesel applications run at startup.
        let mut conn = common::plain_sqlite(&db);
        conn.run_pending_migrations(MIGRATIONS).unwrap();
    }
    let status = Status::read(&db, MIGRATIONS, &Options::new()).unwrap();
    assert_eq!(status.checksums.unrecorded.len(), VERSIONS.len());
    assert_eq!(status.application_id, Some(0));
    // Nothing is pending, but the layer records what it can check from now on.
    let opened = app().open(&db, MIGRATIONS).unwrap();
    assert!(opened.applied_at_open().is_empty());
    let status = Status::read(&db, MIGRATIONS, &Options::new()).unwrap();
    assert_eq!(status.checksums.verified, VERSIONS.len());
    assert!(status.checksums.unrecorded.is_empty());
    assert_eq!(status.application_id, Some(APPLICATION_ID));
    assert_eq!(status.integrity, ["ok"]);
}

#[test]
fn a_library_user_stamps_their_own_application_id_and_another_application_refuses_that_file() {
    let (dir, db) = common::fresh_db();
    let mine = u32::from_be_bytes(*b"MyAp");
    let source = dir.path().join("m");
    let opened = Options::new()
        .application_id(mine)
        .open(&db, two(&source, "CREATE TABLE one (x INTEGER);"))
        .unwrap();
    drop(opened);
    assert_eq!(
        common::query_strings(
            &db,
            "SELECT CAST(application_id AS TEXT) AS value FROM pragma_application_id"
        ),
        [mine.to_string()]
    );
    let error = app().open(&db, MIGRATIONS).unwrap_err();
    match error {
        Error::ForeignDatabase {
            expected, found, ..
        } => {
            assert_eq!(expected, APPLICATION_ID);
            assert_eq!(found, mine);
        }
        other => panic!("{other}"),
    }
    // Without an id, the layer neither stamps nor checks.
    let (_dir2, other) = common::fresh_db();
    drop(Database::open(&other, two(&source, "CREATE TABLE one (x INTEGER);")).unwrap());
    assert_eq!(
        common::query_strings(
            &other,
            "SELECT CAST(application_id AS TEXT) AS value FROM pragma_application_id"
        ),
        ["0"]
    );
}

#[test]
fn a_migration_that_ends_the_batchs_transaction_is_refused_and_nothing_of_the_batch_stays() {
    let (dir, db) = common::fresh_db();
    let source = migrations(
        &dir.path().join("m"),
        &[
            ONE,
            (
                "2026-01-01-000002_commits",
                "CREATE TABLE two (x INTEGER); COMMIT; CREATE TABLE two_b (x INTEGER);",
                None,
            ),
            (
                "2026-01-01-000003_fails",
                "INSERT INTO nope VALUES (1);",
                None,
            ),
        ],
    );
    let error = Database::open(&db, source).unwrap_err();
    match &error {
        Error::TransactionControl { name } => assert_eq!(name, "2026-01-01-000002_commits"),
        other => panic!("expected TransactionControl, got {other}"),
    }
    assert!(error.hint().unwrap().contains("COMMIT"), "{error}");
    // Neither "one", nor "two", nor the bookkeeping: the batch is all or nothing.
    assert!(tables(&db).is_empty(), "{:?}", tables(&db));
    // A trigger's BEGIN ... END is no transaction statement.
    let (dir, db) = common::fresh_db();
    let source = migrations(
        &dir.path().join("m"),
        &[(
            "2026-01-01-000001_trigger",
            "CREATE TABLE t (x INTEGER); CREATE TABLE log (x INTEGER);
             CREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.x); END;",
            None,
        )],
    );
    let opened = Database::open(&db, source).unwrap();
    assert_eq!(opened.applied_at_open(), ["2026-01-01-000001_trigger"]);
}

#[test]
fn another_programs_database_is_refused_before_anything_is_written() {
    let (dir, db) = common::fresh_db();
    {
        // Another program's database, in its own rollback journal, with a table that clashes.
        let mut conn = common::plain_sqlite(&db);
        conn.batch_execute(
            "CREATE TABLE theirs (x INTEGER); INSERT INTO theirs VALUES (42);
             CREATE TABLE counters (name TEXT);",
        )
        .unwrap();
    }
    let bytes = fs::read(&db).unwrap();
    let error = app().open(&db, MIGRATIONS).unwrap_err();
    match &error {
        Error::UnmanagedDatabase { tables, .. } => assert_eq!(tables, &["counters", "theirs"]),
        other => panic!("expected UnmanagedDatabase, got {other}"),
    }
    assert!(error.hint().unwrap().contains("allow_unmanaged_tables"));
    // Not converted to WAL, not stamped, no side files.
    assert!(fs::read(&db).unwrap() == bytes, "the file changed");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["app.db"]);
    // A database made before the application used migrations, accepted explicitly.
    let (_dir, db) = common::fresh_db();
    {
        let mut conn = common::plain_sqlite(&db);
        conn.batch_execute("CREATE TABLE legacy (x INTEGER);")
            .unwrap();
    }
    let opened = app()
        .allow_unmanaged_tables(true)
        .open(&db, MIGRATIONS)
        .unwrap();
    assert_eq!(opened.applied_at_open().len(), VERSIONS.len());
}

/// On a database that does not exist yet, a refusal and a failed first batch leave the
/// directory as it was: the database is made under a private name and linked into place
/// only once migrated. A refused open used to leave an empty file, and a failed first batch
/// that file with its `-wal` and `-lock`.
#[test]
fn a_new_database_that_fails_its_first_batch_leaves_nothing_behind() {
    let db_dir = tempfile::tempdir().unwrap();
    let path = db_dir.path().join("app.db");
    let nothing: Vec<String> = Vec::new();
    // Refused from the migrations alone.
    let source_dir = tempfile::tempdir().unwrap();
    let source = migrations(
        source_dir.path(),
        &[
            ONE,
            (
                "2026-01-01-000002_vacuum",
                "VACUUM;",
                Some("run_in_transaction = false"),
            ),
        ],
    );
    let error = app().open(&path, source).unwrap_err();
    assert!(
        matches!(error, Error::NonTransactionalMigration { .. }),
        "{error}"
    );
    assert_eq!(common::file_names(db_dir.path()), nothing);
    // A failing migration, and one that ends the batch's transaction.
    for bad in [
        "CREATE TABLE broken (x INTEGER; -- a syntax error",
        "CREATE TABLE two (x INTEGER); COMMIT;",
    ] {
        let source_dir = tempfile::tempdir().unwrap();
        let source = migrations(
            source_dir.path(),
            &[ONE, ("2026-01-01-000002_bad", bad, None)],
        );
        let error = app().open(&path, source).unwrap_err();
        assert!(
            matches!(
                error,
                Error::Migration { .. } | Error::TransactionControl { .. }
            ),
            "{error}"
        );
        assert_eq!(common::file_names(db_dir.path()), nothing, "{bad}");
    }
    // The same path opens once the migrations are right, with what it applied reported.
    let db = app().open(&path, MIGRATIONS).unwrap();
    assert_eq!(db.applied_at_open().len(), VERSIONS.len());
    drop(db);
    common::wait_closed(&path);
    assert_eq!(common::file_names(db_dir.path()), ["app.db", "app.db-lock"]);
}

/// A maker killed while it made the database (or by a power loss) leaves its private file,
/// with whatever was written of it; the next open removes it and makes the database.
#[test]
fn a_dead_makers_file_is_taken_over() {
    let db_dir = tempfile::tempdir().unwrap();
    let path = db_dir.path().join("app.db");
    let private = db_dir.path().join(".app.db.init");
    // What a maker killed mid-batch leaves: a database, and a journal beside it.
    {
        let mut conn = common::plain_sqlite(&private);
        conn.batch_execute("CREATE TABLE half (x INTEGER)").unwrap();
    }
    fs::write(db_dir.path().join(".app.db.init-journal"), b"").unwrap();
    let db = app().open(&path, MIGRATIONS).unwrap();
    assert_eq!(db.applied_at_open().len(), VERSIONS.len());
    drop(db);
    common::wait_closed(&path);
    assert_eq!(common::file_names(db_dir.path()), ["app.db", "app.db-lock"]);
    // What a power loss may leave: the first page torn.
    let other = db_dir.path().join("other.db");
    fs::write(db_dir.path().join(".other.db.init"), [0x5au8; 4096]).unwrap();
    drop(app().open(&other, MIGRATIONS).unwrap());
    assert!(!db_dir.path().join(".other.db.init").exists());
}
