//! Bad input through the command line: a clear `error: ` line, a non-zero exit, and the
//! database file left exactly as it was (or not created at all).

mod common;

use std::path::Path;
use std::process::Command;

fn run(args: &[&str], db: &Path) -> (bool, String) {
    let output = Command::new(common::binary())
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_byte_for_byte() {
    let (dir, db) = common::fresh_db();
    let bytes: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &bytes).unwrap();
    let (ok, stderr) = run(&["migrate"], &db);
    assert!(!ok);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("is not a SQLite database"), "{stderr}");
    assert_eq!(std::fs::read(&db).unwrap(), bytes);
    assert_eq!(
        common::files_in(dir.path()),
        ["catalog.db"],
        "no -wal or -shm left behind"
    );
}

#[test]
fn a_directory_and_a_missing_parent_are_named_as_such() {
    let (dir, _) = common::fresh_db();
    let (ok, stderr) = run(&["migrate"], dir.path());
    assert!(!ok);
    assert!(stderr.contains("is a directory"), "{stderr}");
    let missing = dir.path().join("nope").join("x.db");
    let (ok, stderr) = run(&["migrate"], &missing);
    assert!(!ok);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(common::files_in(dir.path()).is_empty());
}

#[test]
fn a_bad_artifact_name_creates_nothing() {
    let (dir, db) = common::fresh_db();
    for name in ["", "a\tb"] {
        let (ok, stderr) = run(&["record", "--artifact", name], &db);
        assert!(!ok);
        assert!(
            stderr.starts_with("error: invalid artifact name"),
            "{stderr}"
        );
    }
    assert!(common::files_in(dir.path()).is_empty());
}

/// `status --json` of `db`, which must succeed.
fn status_json(db: &Path) -> serde_json::Value {
    let output = Command::new(common::binary())
        .args(["status", "--json", "--db"])
        .arg(db)
        .output()
        .unwrap();
    common::assert_success(&output);
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn status_of_a_missing_file_does_not_create_it() {
    let (dir, db) = common::fresh_db();
    let status = status_json(&db);
    assert_eq!(status["exists"], false);
    assert_eq!(status["pending"].as_array().unwrap().len(), 3);
    assert!(common::files_in(dir.path()).is_empty());
}

/// Everything in `dir`, name and bytes, to compare before and after.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    common::files_in(dir)
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect()
}

/// A catalog with enough versions to span many pages, closed (its WAL checkpointed away).
fn populated(db: &Path) {
    let catalog =
        sqlite_persistence_cli::Catalog::open(db, sqlite_persistence::Options::new()).unwrap();
    catalog
        .database()
        .write(|conn| -> sqlite_persistence::Result<()> {
            use diesel::connection::SimpleConnection;
            Ok(conn.batch_execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000)
                 INSERT INTO artifacts (name) SELECT 'artifact-' || x FROM c;",
            )?)
        })
        .unwrap();
    drop(catalog);
    common::wait_closed(db);
}

#[test]
fn a_truncated_database_is_refused_as_damaged_and_left_byte_for_byte() {
    let (dir, db) = common::fresh_db();
    populated(&db);
    let len = std::fs::metadata(&db).unwrap().len();
    assert!(len >= 8 * 4096, "{len}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let before = snapshot(dir.path());
    for args in [&["migrate"][..], &["record", "--artifact", "a"]] {
        let (ok, stderr) = run(args, &db);
        assert!(!ok);
        assert!(
            stderr.contains("is damaged: SQLite says \"database disk image is malformed\""),
            "{stderr}"
        );
        assert!(stderr.contains("restore it from a backup"), "{stderr}");
    }
    assert_eq!(
        snapshot(dir.path()),
        before,
        "nothing written, nothing created"
    );
}

#[test]
fn a_database_of_another_application_is_refused_and_left_byte_for_byte() {
    let (dir, db) = common::fresh_db();
    {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut conn = diesel::SqliteConnection::establish(db.to_str().unwrap()).unwrap();
        conn.batch_execute(
            "PRAGMA application_id = 305419896; CREATE TABLE theirs (x INTEGER); \
             INSERT INTO theirs VALUES (42);",
        )
        .unwrap();
    }
    let before = snapshot(dir.path());
    let (ok, stderr) = run(&["migrate"], &db);
    assert!(!ok);
    assert!(
        stderr.contains("belongs to another application")
            && stderr.contains("0x12345678")
            && stderr.contains("0x53506374"),
        "{stderr}"
    );
    // Still in its rollback journal mode, no -wal, -shm or -lock next to it.
    assert_eq!(snapshot(dir.path()), before);
}

/// `args` on `db` as `nobody` when the tests run as root; see
/// [`common::output_unprivileged`].
#[cfg(unix)]
fn run_unprivileged(args: &[&str], db: &Path) -> (bool, String) {
    let output = common::output_unprivileged(|command| command.args(args).arg("--db").arg(db));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[cfg(unix)]
#[test]
fn a_read_only_file_is_refused_by_name_and_left_byte_for_byte() {
    let (dir, db) = common::fresh_db();
    populated(&db);
    common::set_mode(&db, 0o444);
    if common::is_root() {
        // The directory is the unprivileged user's; the file stays root's, read-only to it.
        std::os::unix::fs::chown(dir.path(), Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    }
    let before = snapshot(dir.path());
    let (ok, stderr) = run_unprivileged(&["record", "--artifact", "a"], &db);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{} is not writable", db.display())),
        "{stderr}"
    );
    assert_eq!(snapshot(dir.path()), before);
}

#[cfg(unix)]
#[test]
fn a_read_only_directory_is_refused_by_name_and_left_byte_for_byte() {
    // WAL needs to create -wal and -shm next to the database, the queue its -lock.
    let (dir, db) = common::fresh_db();
    populated(&db);
    if common::is_root() {
        // The file is the unprivileged user's; the directory stays root's.
        std::os::unix::fs::chown(&db, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
        common::set_mode(dir.path(), 0o755);
    } else {
        common::set_mode(dir.path(), 0o555);
    }
    let before = snapshot(dir.path());
    let (ok, stderr) = run_unprivileged(&["record", "--artifact", "a"], &db);
    common::set_mode(dir.path(), 0o755);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{} is not writable", dir.path().display()))
            && stderr.contains("-wal and -shm"),
        "{stderr}"
    );
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn status_reports_filesystem_application_id_checksums_and_integrity() {
    let (_dir, db) = common::fresh_db();
    let (ok, stderr) = run(&["record", "--artifact", "a"], &db);
    assert!(ok, "{stderr}");
    let status = status_json(&db);
    assert!(status["filesystem"].is_string(), "{status}");
    assert_eq!(status["network_filesystem"], false);
    assert_eq!(status["journal_mode"], "wal");
    assert_eq!(
        status["application_id"],
        sqlite_persistence_cli::APPLICATION_ID
    );
    assert_eq!(status["checksums"]["verified"], 3);
    assert_eq!(status["checksums"]["edited"].as_array().unwrap().len(), 0);
    assert_eq!(status["integrity"][0], "ok");
}

#[test]
fn a_file_shorter_than_a_page_is_not_taken_for_an_empty_database() {
    // SQLite alone takes a 1-byte file for an empty database and overwrites it (the plain
    // setup turns it into a 24 KiB database); longer ones it refuses by their header.
    for len in [1, 100] {
        let (dir, db) = common::fresh_db();
        std::fs::write(&db, vec![7u8; len]).unwrap();
        let before = snapshot(dir.path());
        let (ok, stderr) = run(&["migrate"], &db);
        assert!(!ok);
        assert!(
            stderr.contains(&format!("is not a SQLite database: it is {len} bytes long")),
            "{stderr}"
        );
        assert_eq!(snapshot(dir.path()), before);
    }
}

#[cfg(unix)]
#[test]
fn a_user_who_may_only_read_the_database_can_read_its_status_and_changes_nothing() {
    let (dir, db) = common::fresh_db();
    populated(&db);
    if common::is_root() {
        // The file stays root's, readable by all; the directory is the other user's.
        common::set_mode(&db, 0o644);
        std::os::unix::fs::chown(dir.path(), Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    } else {
        common::set_mode(&db, 0o444);
    }
    let bytes = std::fs::read(&db).unwrap();
    let output =
        common::output_unprivileged(|command| command.args(["status", "--json", "--db"]).arg(&db));
    common::assert_success(&output);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["exists"], true);
    assert_eq!(status["applied"].as_array().unwrap().len(), 3);
    assert_eq!(status["integrity"][0], "ok");
    assert!(std::fs::read(&db).unwrap() == bytes, "the file changed");
}

/// A finished run that failed with a message, not a panic or a signal.
fn failed_cleanly(output: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "it succeeded: {stderr}");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{:?}: {stderr}",
        output.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[test]
fn a_closed_pipe_or_a_full_disk_on_stdout_is_an_error_not_a_panic() {
    let (_dir, db) = common::fresh_db();
    // `record --count 500 | head -0`: the reader is gone before the first line.
    let mut child = Command::new(common::binary())
        .args(["record", "--artifact", "a", "--count", "500", "--db"])
        .arg(&db)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = common::collect(vec![child], std::time::Duration::from_secs(60))
        .pop()
        .unwrap();
    assert!(!output.success);
    assert!(!output.stderr.contains("panicked"), "{}", output.stderr);
    assert!(
        output
            .stderr
            .contains("cannot write to standard output: Broken pipe"),
        "{}",
        output.stderr
    );
    // The version it could not print was committed: the next one follows it.
    assert_eq!(common::stored_versions(&db), [1]);

    if Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let output = Command::new(common::binary())
            .args(["status", "--db"])
            .arg(&db)
            .stdout(full)
            .output()
            .unwrap();
        let stderr = failed_cleanly(&output);
        assert!(stderr.contains("No space left on device"), "{stderr}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_file_size_limit_is_a_storage_error_even_where_sigxfsz_is_not_ignored() {
    let (_dir, db) = common::fresh_db();
    sqlite_persistence_cli::Catalog::open(&db, sqlite_persistence::Options::new()).unwrap();
    let mut command = Command::new(common::binary());
    command
        .args(["record", "--artifact", "a", "--count", "100000", "--db"])
        .arg(&db)
        .stdout(std::process::Stdio::null());
    // SIGXFSZ is left at its default (terminate): the binary must ignore it itself.
    common::limit(&mut command, libc::RLIMIT_FSIZE, 256 * 1024);
    let stderr = failed_cleanly(&command.output().unwrap());
    assert!(stderr.contains("could not write to disk"), "{stderr}");
}

#[test]
fn soak_refuses_an_existing_plain_side_and_an_endless_duration() {
    let (dir, db) = common::fresh_db();
    let plain = dir.path().join("catalog.db-plain");
    std::fs::write(&plain, b"someone's data").unwrap();
    let output = Command::new(common::binary())
        .args(["soak", "--seconds", "1", "--compare", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let stderr = failed_cleanly(&output);
    assert!(stderr.contains("catalog.db-plain exists"), "{stderr}");
    assert_eq!(std::fs::read(&plain).unwrap(), b"someone's data");
    assert_eq!(common::files_in(dir.path()), ["catalog.db-plain"]);
    for seconds in ["18446744073709551615", "0"] {
        let output = Command::new(common::binary())
            .args(["soak", "--seconds", seconds, "--db"])
            .arg(&db)
            .output()
            .unwrap();
        let stderr = failed_cleanly(&output);
        assert!(stderr.contains("--seconds from 1 to"), "{stderr}");
    }
}

#[test]
fn stress_ignores_files_a_user_or_an_interrupted_run_left_next_to_its_database() {
    let (dir, db) = common::fresh_db();
    let users = format!("{}.barrier", db.display());
    std::fs::write(&users, b"mine").unwrap();
    // A ready-file of an interrupted run: counted, it made the next run wait 60 s for
    // processes that never come.
    std::fs::write(format!("{}.barrier.ready-99999", db.display()), b"").unwrap();
    let start = std::time::Instant::now();
    let output = Command::new(common::binary())
        .args([
            "stress",
            "--processes",
            "2",
            "--writes",
            "1",
            "--hold-ms",
            "0",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    common::assert_success(&output);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(std::fs::read(&users).unwrap(), b"mine");
    drop(dir);
}

#[cfg(unix)]
#[test]
fn an_interrupted_stress_stops_its_processes_and_removes_its_temporary_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let child = Command::new(common::binary())
        .args([
            "stress",
            "--processes",
            "4",
            "--writes",
            "500",
            "--hold-ms",
            "5",
        ])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (bounded) until the run's directory holds a database being written.
    let start = std::time::Instant::now();
    let run_dir = loop {
        let found = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("stress.db").exists());
        if let Some(dir) = found {
            break dir;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no run started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&run_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the run's directory is private");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let outcome = common::collect(vec![child], std::time::Duration::from_secs(60))
        .pop()
        .unwrap();
    assert!(
        outcome.stderr.contains("error: interrupted"),
        "{}",
        outcome.stderr
    );
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "the temporary directory is left"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn at_the_thread_limit_a_process_that_writes_from_one_thread_still_writes() {
    let (dir, db) = common::fresh_db();
    populated(&db);
    if common::is_root() {
        // RLIMIT_NPROC binds only other users: the file and directory become theirs.
        std::os::unix::fs::chown(&db, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    }
    let before = common::stored_versions(&db).len();
    // One process, no thread beside it: opening, writing twice and closing need none (the
    // pool and its thread are built only when a second connection is needed at once; a
    // turn that cannot be kept for lack of a thread is given back at once).
    let output = common::output_unprivileged(|command| {
        command
            .args(["record", "--artifact", "a", "--count", "2", "--db"])
            .arg(&db);
        common::limit(command, libc::RLIMIT_NPROC, 1)
    });
    common::assert_success(&output);
    assert_eq!(common::stored_versions(&db).len(), before + 2);
}

#[test]
fn transaction_pooling_on_a_sqlite_file_is_refused_and_nothing_is_created() {
    let (dir, db) = common::fresh_db();
    for args in [
        &["record", "--transaction-pooling", "--artifact", "a"][..],
        &["--transaction-pooling", "migrate"][..],
        &["--transaction-pooling", "stress", "--processes", "2"][..],
    ] {
        let (ok, stderr) = run(args, &db);
        assert!(!ok, "{args:?}");
        assert!(
            stderr.starts_with("error: invalid --transaction-pooling")
                && stderr.contains("SQLite file"),
            "{args:?}: {stderr}"
        );
    }
    assert!(common::files_in(dir.path()).is_empty());
}
