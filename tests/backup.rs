//! Verified online backup: taken while others write, complete and valid or absent.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use common::{bump, fresh_db, values, MIGRATIONS};
use sqlite_persistence::{Database, Error, Operation, Options};

#[test]
fn a_backup_taken_while_others_write_holds_every_write_acknowledged_before_it() {
    let (dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    let acknowledged = AtomicI64::new(0);
    let stop = AtomicBool::new(false);
    let backups = tempfile::tempdir().unwrap();
    let destination = backups.path().join("app-backup.db");
    let (before, backup) = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let value = bump(&db, "a").unwrap().0;
                    acknowledged.fetch_max(value, Ordering::SeqCst);
                }
            });
        }
        while acknowledged.load(Ordering::SeqCst) < 200 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let before = acknowledged.load(Ordering::SeqCst);
        let backup = db.backup_to(&destination).unwrap();
        stop.store(true, Ordering::Relaxed);
        (before, backup)
    });
    assert_eq!(backup.path, destination);
    assert!(backup.bytes > 0);
    // Only the backup is there: no temporary file, no -wal or -shm of the copy.
    assert_eq!(common::file_names(backups.path()), ["app-backup.db"]);
    // Restoring is opening the copy: every write acknowledged before the backup, gapless.
    let restored = Options::new().open(&destination, MIGRATIONS).unwrap();
    let stored = values(&restored, "a").unwrap();
    assert!(stored.len() as i64 >= before, "{} < {before}", stored.len());
    assert_eq!(stored, (1..=stored.len() as i64).collect::<Vec<_>>());
    assert_eq!(
        common::query_strings(
            &destination,
            "SELECT integrity_check AS value FROM pragma_integrity_check"
        ),
        ["ok"]
    );
    drop(dir);
}

#[test]
fn a_backup_never_replaces_a_file_and_leaves_nothing_when_refused() {
    let (dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();
    let destination = dir.path().join("backup.db");
    std::fs::write(&destination, b"an older backup").unwrap();
    match db.backup_to(&destination) {
        Err(Error::BackupExists { path }) => assert_eq!(path, destination),
        other => panic!("expected BackupExists, got {other:?}"),
    }
    assert_eq!(std::fs::read(&destination).unwrap(), b"an older backup");
    let missing = dir.path().join("nope").join("backup.db");
    assert!(matches!(
        db.backup_to(&missing),
        Err(Error::MissingDirectory { .. })
    ));
    // Inside a write of the same database it would wait for itself.
    let nested = db
        .write(|_| -> sqlite_persistence::Result<Error> {
            Ok(db.backup_to(dir.path().join("nested.db")).unwrap_err())
        })
        .unwrap();
    assert!(
        matches!(
            nested,
            Error::Reentrant {
                operation: Operation::Backup,
                ..
            }
        ),
        "{nested}"
    );
    let mut left = common::file_names(dir.path());
    left.retain(|n| !n.starts_with("app.db"));
    assert_eq!(left, ["backup.db"]);
}

#[test]
fn an_in_memory_database_can_be_backed_up_to_a_file() {
    let memory = Database::open(":memory:", MIGRATIONS).unwrap();
    bump(&memory, "a").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backup = memory.backup_to(dir.path().join("copy.db")).unwrap();
    let restored = Database::open(&backup.path, MIGRATIONS).unwrap();
    assert_eq!(values(&restored, "a").unwrap(), [1]);
}

#[cfg(unix)]
#[test]
fn the_next_backup_removes_what_a_killed_one_left_beside_its_destination() {
    let (dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    // A process that has exited, and a live one (this one).
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = dir.path().join(format!(".backup.db.backup-{dead}-7"));
    let live = dir
        .path()
        .join(format!(".backup.db.backup-{}-8", std::process::id()));
    let other = dir.path().join(format!(".other.db.backup-{dead}-9"));
    for file in [&stale, &live, &other] {
        std::fs::write(file, b"partial").unwrap();
    }
    db.backup_to(dir.path().join("backup.db")).unwrap();
    assert!(
        !stale.exists(),
        "the dead process's temporary file is removed"
    );
    assert!(
        live.exists() && other.exists(),
        "{:?}",
        common::file_names(dir.path())
    );
}
