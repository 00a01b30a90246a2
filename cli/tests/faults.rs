//! Faults, with real processes: kill -9 during a migration batch and during writes, a
//! foreign process holding the write lock, a file-size limit (disk full), file permissions,
//! and a soak. Whatever happens, the file is whole, every acknowledged write is in it, and
//! the next start goes on.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use rand::{Rng, SeedableRng};
use sqlite_persistence::{Error, Operation, Options, RetryPolicy};
use sqlite_persistence_cli::Catalog;

/// Rows the slow migration inserts: about 0.2 s in a debug build.
const SLOW_ROWS: u32 = 30_000;

/// A batch of three migrations whose middle one is slow, in `dir`.
fn slow_batch(dir: &Path) {
    let migrations = [
        ("2026-01-01-000001_one", "CREATE TABLE one (x INTEGER);".to_owned()),
        (
            "2026-01-01-000002_slow",
            format!(
                "CREATE TABLE slow (x INTEGER, pad TEXT);
                 WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {SLOW_ROWS})
                 INSERT INTO slow SELECT x, hex(randomblob(32)) FROM c;"
            ),
        ),
        (
            "2026-01-01-000003_three",
            "CREATE INDEX slow_x ON slow (x); CREATE TABLE three (y INTEGER);".to_owned(),
        ),
    ];
    for (name, up) in migrations {
        let m = dir.join(name);
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("up.sql"), up).unwrap();
        std::fs::write(m.join("down.sql"), "SELECT 1;").unwrap();
    }
}

fn migrate_command(db: &Path, migrations: &Path) -> Command {
    migrate_command_with(db, migrations, &[])
}

/// `migrate --migrations DIR` with `extra` arguments (`--plain`: Diesel's own harness).
fn migrate_command_with(db: &Path, migrations: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(common::binary());
    command
        .arg("migrate")
        .args(extra)
        .arg("--migrations")
        .arg(migrations)
        .arg("--db")
        .arg(db)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// What of the slow batch a database holds: `Some(false)` none of it, `Some(true)` all of it
/// (with every row), `None` anything in between.
fn batch_state(db: &Path) -> Option<bool> {
    let tables = common::query_strings(
        db,
        "SELECT name AS value FROM sqlite_master WHERE type = 'table' \
         AND name IN ('one', 'slow', 'three', '__diesel_schema_migrations') ORDER BY name",
    );
    if tables.is_empty() {
        return Some(false);
    }
    let all = ["__diesel_schema_migrations", "one", "slow", "three"];
    if tables != all {
        return None;
    }
    let applied = common::query_strings(
        db,
        "SELECT CAST(count(*) AS TEXT) AS value FROM __diesel_schema_migrations",
    );
    let rows = common::query_strings(db, "SELECT CAST(count(*) AS TEXT) AS value FROM slow");
    (applied == ["3"] && rows == [SLOW_ROWS.to_string()]).then_some(true)
}

fn integrity(db: &Path) -> Vec<String> {
    common::query_strings(
        db,
        "SELECT integrity_check AS value FROM pragma_integrity_check",
    )
}

fn seeded_rng() -> rand::rngs::SmallRng {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("rng seed {seed}");
    rand::rngs::SmallRng::seed_from_u64(seed)
}

/// The slow batch in a temporary directory, and how long an uninterrupted `migrate` of it
/// (with `extra` arguments) takes from start to exit: the window kills are drawn from.
fn timed_batch(extra: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let migrations = dir.path().join("migrations");
    slow_batch(&migrations);
    let timed = dir.path().join("timed.db");
    let start = Instant::now();
    let status = migrate_command_with(&timed, &migrations, extra)
        .status()
        .unwrap();
    let window = start.elapsed();
    assert!(status.success());
    assert_eq!(batch_state(&timed), Some(true));
    (dir, migrations, window)
}

/// Kills that must land while the migrating process runs.
const KILLS: usize = 50;

#[test]
fn kill_9_during_a_migration_batch_leaves_none_or_all_of_it_and_the_next_start_completes() {
    let (dir, migrations, mut window) = timed_batch(&[]);
    let mut rng = seeded_rng();
    let (mut trials, mut killed_running, mut none, mut all) = (0, 0, 0, 0);
    // Only kills that land while the process runs count; the machine's load changes how
    // long a run takes, so every full run below re-measures the window.
    while killed_running < KILLS {
        assert!(
            trials < 4 * KILLS,
            "only {killed_running} of {trials} kills landed in a run"
        );
        let db = dir.path().join(format!("trial-{trials}.db"));
        trials += 1;
        let mut child = migrate_command(&db, &migrations).spawn().unwrap();
        std::thread::sleep(window.mul_f64(rng.random_range(0.0..1.0)));
        if child.try_wait().unwrap().is_none() {
            killed_running += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let before = if db.exists() {
            batch_state(&db)
        } else {
            Some(false) // killed before it even created the file
        };
        match before {
            Some(false) => none += 1,
            Some(true) => all += 1,
            None => panic!("trial {trials}: a partial batch is visible"),
        }
        if db.exists() {
            assert_eq!(integrity(&db), ["ok"], "trial {trials}");
        }
        // The next start completes the migration.
        let start = Instant::now();
        let output = migrate_command(&db, &migrations).output().unwrap();
        assert!(
            output.status.success(),
            "trial {trials}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if before == Some(false) {
            window = start.elapsed();
        }
        assert_eq!(batch_state(&db), Some(true), "trial {trials}");
        assert_eq!(integrity(&db), ["ok"], "trial {trials}");
    }
    eprintln!(
        "{trials} kills, {killed_running} while running; after them {none} held none of the \
         batch, {all} all of it"
    );
    // Most kills land in the slow migration, which leaves none of the batch.
    assert!(none >= KILLS / 5, "{none}");
}

/// The proof that the kill test can fail: Diesel's `run_pending_migrations` commits each
/// migration on its own, so a kill during the slow one leaves the first applied alone.
#[test]
fn kill_9_during_plain_run_pending_migrations_leaves_a_partial_batch() {
    let (dir, migrations, mut window) = timed_batch(&["--plain"]);
    let mut rng = seeded_rng();
    for trial in 0..40 {
        let db = dir.path().join(format!("plain-{trial}.db"));
        let mut child = migrate_command_with(&db, &migrations, &["--plain"])
            .spawn()
            .unwrap();
        std::thread::sleep(window.mul_f64(rng.random_range(0.3..0.9)));
        let running = child.try_wait().unwrap().is_none();
        child.kill().unwrap();
        child.wait().unwrap();
        if db.exists() && batch_state(&db).is_none() {
            return;
        }
        if !running {
            // The run was faster than the window: measure it again.
            window = timed_batch(&["--plain"]).2;
        }
    }
    panic!("40 kills of the plain harness left no partial batch");
}

/// `record --artifact a --count K --hold-ms 2 --json` on `db`: a writer whose every
/// transaction stays open 2 ms, printing each version after its commit.
fn writer(db: &Path, count: u32) -> Child {
    Command::new(common::binary())
        .args(["record", "--artifact", "a", "--hold-ms", "2", "--json"])
        .arg("--count")
        .arg(count.to_string())
        .arg("--db")
        .arg(db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn acknowledged(outcomes: &[common::Outcome]) -> BTreeSet<i64> {
    outcomes
        .iter()
        .flat_map(|o| o.stdout.lines())
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["version"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

#[test]
fn kill_9_of_writers_mid_transaction_loses_no_acknowledged_write_and_the_others_go_on() {
    let (_dir, db) = common::fresh_db();
    Catalog::open(&db, Options::new()).unwrap();
    let mut rng = seeded_rng();
    let survivors: Vec<Child> = (0..4).map(|_| writer(&db, 150)).collect();
    let mut victims: Vec<Child> = (0..4).map(|_| writer(&db, 150)).collect();
    let mut killed_running = 0;
    std::thread::sleep(Duration::from_millis(300));
    for victim in &mut victims {
        std::thread::sleep(Duration::from_millis(rng.random_range(50..250)));
        if victim.try_wait().unwrap().is_none() {
            killed_running += 1;
        }
        victim.kill().unwrap();
    }
    let limit = Duration::from_secs(120);
    let victims = common::collect(victims, limit);
    let survivors = common::collect(survivors, limit);
    assert_eq!(killed_running, 4, "every victim was killed while writing");
    let failures = common::failure_causes(&survivors);
    assert!(failures.is_empty(), "the others went on: {failures:?}");

    let stored = common::stored_versions(&db);
    let max = *stored.last().unwrap();
    // No partial write: versions 1..=max each once, and the artifact's latest agrees.
    assert_eq!(stored, (1..=max).collect::<Vec<_>>());
    assert_eq!(
        common::query_strings(
            &db,
            "SELECT CAST(latest_version AS TEXT) AS value FROM artifacts WHERE name = 'a'"
        ),
        [max.to_string()]
    );
    // Every acknowledged write is there, the killed processes' included.
    let acknowledged_by_victims = acknowledged(&victims);
    let all: BTreeSet<i64> = acknowledged(&survivors)
        .union(&acknowledged_by_victims)
        .copied()
        .collect();
    assert!(!acknowledged_by_victims.is_empty());
    let stored: BTreeSet<i64> = stored.into_iter().collect();
    assert!(all.is_subset(&stored), "{:?}", all.difference(&stored));
    assert!(stored.len() >= 4 * 150);
    assert_eq!(integrity(&db), ["ok"]);
}

/// Not a test on its own: the child role of the foreign-holder tests. With
/// `FAULTS_HOLD_DB` set, it opens the database with plain Diesel (no crate), takes the write
/// lock with `BEGIN IMMEDIATE`, creates `<db>.held`, holds it `FAULTS_HOLD_MS`, and commits.
#[test]
#[ignore = "run by the foreign-holder tests as a child process"]
fn foreign_holder_child() {
    let Ok(db) = std::env::var("FAULTS_HOLD_DB") else {
        return;
    };
    let hold: u64 = std::env::var("FAULTS_HOLD_MS").unwrap().parse().unwrap();
    let mut conn = SqliteConnection::establish(&db).unwrap();
    conn.batch_execute("PRAGMA busy_timeout = 5000; BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS foreign_data (x INTEGER); INSERT INTO foreign_data VALUES (1);")
        .unwrap();
    std::fs::write(format!("{db}.held"), b"").unwrap();
    std::thread::sleep(Duration::from_millis(hold));
    conn.batch_execute("COMMIT").unwrap();
}

/// Starts the foreign holder on `db` for `hold` and returns once it holds the write lock.
fn foreign_holder(db: &Path, hold: Duration) -> Child {
    let held = format!("{}.held", db.display());
    let _ = std::fs::remove_file(&held);
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "foreign_holder_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("FAULTS_HOLD_DB", db)
        .env("FAULTS_HOLD_MS", hold.as_millis().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !Path::new(&held).exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no lock held");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// busy_timeout well below the foreign hold, so the retry policy has to outlast it. The
/// foreign process creates its own table in the file (before the catalog's migrations, on a
/// new file), which is accepted explicitly.
fn patient(deadline: Duration) -> Options {
    Options::new()
        .busy_timeout(Duration::from_millis(200))
        .retry(RetryPolicy::new().max_elapsed(deadline))
        .allow_unmanaged_tables(true)
}

#[test]
fn a_foreign_process_holding_the_write_lock_past_busy_timeout_is_outlasted() {
    let (_dir, db) = common::fresh_db();
    let hold = Duration::from_millis(1500);
    // Startup: the file is new, in rollback mode, and the foreign writer holds it.
    let mut holder = foreign_holder(&db, hold);
    let start = Instant::now();
    let catalog = Catalog::open(&db, patient(Duration::from_secs(20))).unwrap();
    let waited = start.elapsed();
    holder.wait().unwrap();
    assert!(waited >= hold - Duration::from_millis(300), "{waited:?}");
    assert_eq!(catalog.database().applied_at_open().len(), 3);
    // A write, now in WAL mode.
    let mut holder = foreign_holder(&db, hold);
    let recorded = catalog.record("a").unwrap();
    holder.wait().unwrap();
    assert_eq!(recorded.version, 1);
    assert!(recorded.attempts > 1, "{recorded:?}");
    assert!(
        recorded.wait >= hold - Duration::from_millis(300),
        "{recorded:?}"
    );
    assert_eq!(
        common::query_strings(
            &db,
            "SELECT CAST(count(*) AS TEXT) AS value FROM foreign_data"
        ),
        ["2"],
        "the foreign writes are kept"
    );
}

#[test]
fn a_foreign_lock_held_past_the_deadline_gives_the_typed_timeout_error_in_time() {
    let deadline = Duration::from_secs(1);
    let hold = Duration::from_secs(4);
    let busy = |error: &Error| match error {
        Error::Busy {
            operation,
            attempts,
            elapsed,
            ..
        } => {
            assert!(*attempts > 1, "{error}");
            assert!(*elapsed >= deadline, "{error}");
            let text = error.to_string();
            assert!(
                text.contains(operation.as_str())
                    && text.contains(&format!("after {attempts} attempts")),
                "{text}"
            );
            *operation
        }
        other => panic!("expected Busy, got {other}"),
    };
    // Startup on a new file.
    let (_dir, db) = common::fresh_db();
    let mut holder = foreign_holder(&db, hold);
    let error = Catalog::open(&db, patient(deadline)).unwrap_err();
    // Given up while the foreign process still held the lock (4 s), at its 1 s deadline:
    // behaviour, not a bound on how fast a loaded machine runs.
    let still_held = holder.try_wait().unwrap().is_none();
    assert_eq!(busy(&error), Operation::SwitchJournalMode);
    assert!(still_held, "the open waited out the holder: {error}");
    holder.wait().unwrap();
    // A write.
    let catalog = Catalog::open(&db, patient(deadline)).unwrap();
    let mut holder = foreign_holder(&db, hold);
    let error = match catalog.record("a").unwrap_err() {
        sqlite_persistence_cli::Error::Persistence(error) => error,
        other => panic!("expected the library's error, got {other}"),
    };
    let still_held = holder.try_wait().unwrap().is_none();
    assert_eq!(busy(&error), Operation::Write);
    assert!(still_held, "the write waited out the holder: {error}");
    holder.wait().unwrap();
    assert_eq!(
        catalog.record("a").unwrap().version,
        1,
        "nothing half-written"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_file_size_limit_fails_writes_with_the_typed_error_and_the_file_takes_writes_again() {
    use std::os::unix::process::CommandExt;
    let (_dir, db) = common::fresh_db();
    Catalog::open(&db, Options::new()).unwrap();
    let mut command = Command::new(common::binary());
    command
        .args([
            "record",
            "--artifact",
            "a",
            "--count",
            "100000",
            "--json",
            "--db",
        ])
        .arg(&db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // No file of this process may grow past 256 KiB, as on a full disk.
    common::limit(&mut command, libc::RLIMIT_FSIZE, 256 * 1024);
    // SAFETY: between fork and exec, only signal, which is async-signal-safe. Without the
    // signal ignored, SIGXFSZ would kill it instead of failing the write.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let outcome = common::collect(vec![command.spawn().unwrap()], Duration::from_secs(120))
        .pop()
        .unwrap();
    assert!(!outcome.success, "the limit was never hit");
    assert!(
        outcome.stderr.contains("could not write to disk"),
        "{}",
        outcome.stderr
    );
    let acknowledged = acknowledged(std::slice::from_ref(&outcome));
    assert!(!acknowledged.is_empty());
    // Room again (a process without the limit): consistent, nothing acknowledged lost, and
    // the failed write claimed no version.
    let n = acknowledged.len() as i64;
    assert_eq!(acknowledged, (1..=n).collect());
    let catalog = Catalog::open(&db, Options::new()).unwrap();
    assert_eq!(catalog.versions("a").unwrap(), (1..=n).collect::<Vec<_>>());
    assert_eq!(catalog.record("a").unwrap().version, n + 1);
    assert_eq!(integrity(&db), ["ok"]);
}

#[cfg(unix)]
#[test]
fn a_new_database_and_its_wal_shm_and_lock_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let with = |db: &Path, suffix: &str| format!("{}{suffix}", db.display());
    let (_dir, db) = common::fresh_db();
    // The test process's umask is typically 022: SQLite alone would make 0644 files.
    let catalog = Catalog::open(&db, Options::new()).unwrap();
    catalog.record("a").unwrap();
    for suffix in ["", "-wal", "-shm", "-lock"] {
        let path = with(&db, suffix);
        assert_eq!(mode(Path::new(&path)), 0o600, "{path}");
    }
    drop(catalog);
    // A group of workers: asked for explicitly.
    let (_dir, db) = common::fresh_db();
    let catalog = Catalog::open(&db, Options::new().create_mode(0o660)).unwrap();
    catalog.record("a").unwrap();
    for suffix in ["", "-wal", "-shm", "-lock"] {
        assert_eq!(mode(Path::new(&with(&db, suffix))), 0o660, "{suffix}");
    }
    // An existing file keeps its mode.
    let (_dir, db) = common::fresh_db();
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
    Catalog::open(&db, Options::new()).unwrap();
    assert_eq!(mode(&db), 0o640);
}

#[cfg(unix)]
#[test]
fn a_group_shares_a_database_whose_lock_file_another_member_created() {
    // Files of two users need root to make; CI runs as root.
    if !common::is_root() {
        eprintln!("not root: cannot make files of two users, nothing checked");
        return;
    }
    let (dir, db) = common::fresh_db();
    // root's database and sidecar, writable by the group (here: everyone)...
    let catalog = Catalog::open(&db, Options::new().create_mode(0o666)).unwrap();
    catalog.record("a").unwrap();
    drop(catalog);
    common::wait_closed(&db);
    std::os::unix::fs::chown(dir.path(), Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    // ...opened by another member, who may not change the mode of root's -lock file.
    let output = common::output_unprivileged(|command| {
        command.args(["record", "--artifact", "a", "--db"]).arg(&db)
    });
    common::assert_success(&output);
    assert_eq!(common::stored_versions(&db), [1, 2]);
}

/// A catalog with version 1 recorded, closed, then given (file and directory) to `nobody`:
/// a service user's database that root is about to meddle with.
#[cfg(unix)]
fn service_users_database() -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, db) = common::fresh_db();
    Catalog::open(&db, Options::new())
        .unwrap()
        .record("a")
        .unwrap();
    common::wait_closed(&db);
    std::os::unix::fs::chown(&db, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    (dir, db)
}

#[cfg(unix)]
#[test]
fn a_lock_file_the_owner_cannot_open_is_done_without_and_the_owners_writes_go_on() {
    if !common::is_root() {
        eprintln!("not root: cannot make files of two users, nothing checked");
        return;
    }
    let (_dir, db) = service_users_database();
    // With a -lock only root may open (as an older version, or root with another tool, left
    // it).
    let lock = format!("{}-lock", db.display());
    common::set_mode(std::path::Path::new(&lock), 0o600);
    let output = common::output_unprivileged(|command| {
        command
            .args(["record", "--artifact", "a", "--db"])
            .arg(&db)
            .env("SQLITE_PERSISTENCE_LOG", "warn")
    });
    common::assert_success(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the write queue cannot be used"),
        "the fallback is said: {stderr}"
    );
    assert_eq!(common::stored_versions(&db), [1, 2]);
}

#[cfg(unix)]
#[test]
fn another_users_wal_next_to_the_database_is_named_and_nothing_changes() {
    if !common::is_root() {
        eprintln!("not root: cannot make files of two users, nothing checked");
        return;
    }
    let (_dir, db) = service_users_database();
    // Root left a -wal and -shm next to it.
    for suffix in ["-wal", "-shm"] {
        let side = format!("{}{suffix}", db.display());
        std::fs::write(&side, b"").unwrap();
        common::set_mode(std::path::Path::new(&side), 0o644);
    }
    let before = std::fs::read(&db).unwrap();
    let output = common::output_unprivileged(|command| {
        command.args(["record", "--artifact", "a", "--db"]).arg(&db)
    });
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}-wal is not writable by this user",
            db.display()
        )),
        "{stderr}"
    );
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the database changed"
    );
}

fn soak(compare: bool, backup_every_ms: Option<u64>) -> serde_json::Value {
    let (_dir, db) = common::fresh_db();
    let mut command = Command::new(common::binary());
    command.args([
        "soak",
        "--processes",
        "8",
        "--seconds",
        "2",
        "--json",
        "--db",
    ]);
    command.arg(&db);
    if compare {
        command.arg("--compare");
    }
    if let Some(ms) = backup_every_ms {
        command.args(["--backup-every-ms", &ms.to_string()]);
    }
    let outcome = common::collect(
        vec![command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()],
        Duration::from_secs(120),
    )
    .pop()
    .unwrap();
    assert!(outcome.success, "{}", outcome.stderr);
    serde_json::from_str(&outcome.stdout).unwrap()
}

#[test]
fn soak_of_eight_processes_mixing_reads_and_writes_loses_nothing() {
    // With a backup every 300 ms meanwhile: each holds every write acknowledged before it.
    let report = soak(false, Some(300));
    let ours = &report["sides"][0];
    assert_eq!(ours["clean"], true, "{ours}");
    assert_eq!(ours["failed_processes"], 0);
    assert_eq!(ours["missing_writes"], 0);
    assert_eq!(ours["integrity"], "ok");
    let acknowledged = ours["acknowledged_writes"].as_u64().unwrap();
    assert!(acknowledged > 100, "{ours}");
    assert_eq!(ours["stored_versions"].as_u64().unwrap(), acknowledged);
    assert!(ours["reads"].as_u64().unwrap() > 100, "{ours}");
    let backups = &ours["backups"];
    assert!(backups["taken"].as_u64().unwrap() >= 2, "{ours}");
    for zero in ["failed", "missing_writes", "not_ok"] {
        assert_eq!(backups[zero], 0, "{ours}");
    }
}

/// The proof that the soak can fail: the plain Diesel setup under the same load.
#[test]
fn plain_diesel_setup_fails_under_the_same_soak() {
    // The plain side fails at start-up (the migration race), in about two soaks of three: up
    // to eight tries, so that this test itself is not flaky.
    let mut plain_failures = Vec::new();
    for _ in 0..8 {
        let report = soak(true, None);
        let plain = &report["sides"][1];
        assert_eq!(plain["label"], "plain diesel");
        if plain["failed_processes"].as_u64().unwrap() > 0 {
            plain_failures.push(plain["failures"].clone());
            break;
        }
    }
    eprintln!("plain soak failures: {plain_failures:?}");
    assert!(
        !plain_failures.is_empty(),
        "the plain setup survived 8 soaks"
    );
}

#[test]
fn kill_9_during_a_backup_leaves_a_complete_backup_or_none() {
    let (dir, db) = common::fresh_db();
    let catalog = Catalog::open(&db, Options::new()).unwrap();
    catalog
        .database()
        .write(|conn| -> sqlite_persistence::Result<()> {
            // Some 15 MB, so that a backup takes a while to kill.
            Ok(conn.batch_execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000)
                 INSERT INTO artifacts (name) SELECT 'artifact-' || x || hex(randomblob(50)) FROM c;",
            )?)
        })
        .unwrap();
    drop(catalog);
    let backup = |to: &Path| {
        let mut command = Command::new(common::binary());
        command
            .args(["backup", "--db"])
            .arg(&db)
            .arg("--to")
            .arg(to)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    };
    let start = Instant::now();
    assert!(backup(&dir.path().join("timed.db"))
        .status()
        .unwrap()
        .success());
    let window = start.elapsed();
    let mut rng = seeded_rng();
    let (mut absent, mut complete) = (0, 0);
    for trial in 0..20 {
        let to = dir.path().join(format!("backup-{trial}.db"));
        let mut child = backup(&to).spawn().unwrap();
        std::thread::sleep(window.mul_f64(rng.random_range(0.0..1.0)));
        child.kill().unwrap();
        child.wait().unwrap();
        if !to.exists() {
            absent += 1;
            continue;
        }
        complete += 1;
        assert_eq!(integrity(&to), ["ok"], "trial {trial}");
        assert_eq!(
            common::query_strings(&to, "SELECT CAST(count(*) AS TEXT) AS value FROM artifacts"),
            ["100000"],
            "trial {trial}"
        );
    }
    eprintln!("20 kills during backups: {absent} left no backup, {complete} a complete one");
    assert!(absent > 0, "no kill landed during a backup");
}
