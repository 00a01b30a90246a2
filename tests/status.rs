//! `Status::read` changes nothing: not the database, not its WAL, whatever is in them.

mod common;

use common::{fresh_db, MIGRATIONS, VERSIONS};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use sqlite_persistence::{Options, Status};

/// Not a test on its own: the child role of the WAL test. With `STATUS_WAL_DB` set, it writes
/// 100 rows with automatic checkpoints off and exits without closing: the rows are in `-wal`
/// only, as after a crash.
#[test]
#[ignore = "run as a child process by the WAL test"]
fn leave_a_wal_child() {
    let Ok(path) = std::env::var("STATUS_WAL_DB") else {
        return;
    };
    let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
    conn.batch_execute(
        "PRAGMA wal_autocheckpoint = 0;
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100)
         INSERT INTO counters (name, value) SELECT 'c' || x, x FROM c;",
    )
    .unwrap();
    std::process::exit(0);
}

#[test]
fn status_leaves_the_database_and_a_wal_of_unchecked_frames_as_they_were() {
    let (_dir, path) = fresh_db();
    drop(Options::new().open(&path, MIGRATIONS).unwrap());
    common::wait_closed(&path);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["leave_a_wal_child", "--exact", "--ignored"])
        .env("STATUS_WAL_DB", &path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let wal = std::path::PathBuf::from(format!("{}-wal", path.display()));
    let before = (std::fs::read(&path).unwrap(), std::fs::read(&wal).unwrap());
    assert!(before.1.len() > 4096, "the child left frames in -wal");

    let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
    assert_eq!(status.applied, VERSIONS);
    assert_eq!(status.integrity, ["ok"]);
    assert!(status.sizes.wal.unwrap() > 4096);

    let after = (std::fs::read(&path).unwrap(), std::fs::read(&wal).unwrap());
    assert!(before == after, "status changed the database or its WAL");
    // The rows are all there for the next open.
    assert_eq!(
        common::query_strings(
            &path,
            "SELECT CAST(count(*) AS TEXT) AS value FROM counters"
        ),
        ["100"]
    );
}

#[cfg(target_os = "linux")]
#[test]
fn status_names_who_holds_the_write_lock_and_who_reads_from_the_wal() {
    use std::time::Duration;
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    common::bump(&db, "a").unwrap();
    let me = std::process::id();
    std::thread::scope(|s| {
        let (reading, is_reading) = std::sync::mpsc::channel();
        let db = &db;
        s.spawn(move || {
            db.read(|conn| -> sqlite_persistence::Result<()> {
                // The read transaction begins with its first statement.
                common::schema::counters::table
                    .count()
                    .get_result::<i64>(conn)?;
                reading.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(800));
                Ok(())
            })
            .unwrap();
        });
        is_reading.recv_timeout(Duration::from_secs(10)).unwrap();
        let holder = common::hold_write_lock(&path, Duration::from_millis(600));
        let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
        holder.join().unwrap();
        assert!(status.wal_frames.unwrap() > 0, "{status:?}");
        assert!(
            status
                .holders
                .iter()
                .any(|h| h.pid == me && h.lock == sqlite_persistence::HeldLock::WriteLock),
            "{:?}",
            status.holders
        );
        assert!(
            status.wal_readers.iter().any(|h| h.pid == me),
            "{:?}",
            status.wal_readers
        );
    });
    // Nobody holds or reads now.
    let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
    assert!(status.holders.is_empty(), "{:?}", status.holders);
}
