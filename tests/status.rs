//! `Status::read` changes nothing: not the database, not its WAL, whatever is in them.

mod common;

use common::{fresh_db, MIGRATIONS, VERSIONS};
use diesel::connection::SimpleConnection;
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
    let mut conn = common::plain_sqlite(&path);
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
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    common::bump(&db, "a").unwrap();
    let me = std::process::id();
    let (status, table) = common::while_reading(&db, || {
        let holder = common::hold_lock_until_released(&path, "BEGIN IMMEDIATE");
        let before = common::lock_table(&path);
        let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
        let table = format!("BEFORE {before}\nAFTER {}", common::lock_table(&path));
        holder.release();
        (status, table)
    });
    assert!(status.wal_frames.unwrap() > 0, "{status:?}");
    assert!(
        status
            .holders
            .iter()
            .any(|h| h.pid == me && h.lock == sqlite_persistence::HeldLock::WriteLock),
        "{:?}: {}",
        status.holders,
        common::lock_table(&path)
    );
    // The reader is named: as a reader of the WAL, or, had its snapshot begun on a WAL
    // checkpointed to its end (read mark 0: seen once among tests run side by side), as a
    // reader of the file alone.
    assert!(
        status.wal_readers.iter().any(|h| h.pid == me),
        "{status:?}: {table}"
    );
    // Nobody holds or reads now, once this process has given back the write queue's turn it
    // keeps for a moment after a short write (a few milliseconds at most; longer on a loaded
    // machine, where the thread that gives it back waits for a core).
    let start = std::time::Instant::now();
    loop {
        let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
        if status.holders.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5)
                && status
                    .holders
                    .iter()
                    .all(|h| h.pid == me && h.lock == sqlite_persistence::HeldLock::WriteQueue),
            "{:?}",
            status.holders
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Runs a PASSIVE checkpoint on one of `db`'s connections.
fn checkpoint(db: &sqlite_persistence::Database) {
    use diesel::connection::SimpleConnection;
    db.connection()
        .unwrap()
        .batch_execute("PRAGMA wal_checkpoint(PASSIVE)")
        .unwrap();
}

#[test]
fn status_says_whether_the_file_alone_is_complete_who_pins_the_wal_and_what_the_holder_does() {
    use sqlite_persistence::{HeldLock, Operation};
    use std::time::Duration;
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    common::bump(&db, "a").unwrap();
    // Commits in the WAL, not copied back: the file alone is not the whole database.
    let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
    assert!(!status.database_complete, "{status:?}");
    let committed = status.wal_committed_frames.unwrap();
    assert!(committed > 0 && status.wal_checkpointed_frames.unwrap() < committed);
    checkpoint(&db);
    let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
    assert!(status.database_complete, "{status:?}");
    assert!(status.pinning_readers.is_empty());

    let me = std::process::id();
    let status = common::while_reading(&db, || {
        // Commits after the reader's snapshot: a checkpoint cannot copy them back.
        common::bump(&db, "a").unwrap();
        checkpoint(&db);
        // And a writer holding the queue, until the status is read.
        std::thread::scope(|s| {
            let (writing, is_writing) = std::sync::mpsc::channel();
            let (done, is_done) = std::sync::mpsc::channel::<()>();
            let db = &db;
            s.spawn(move || {
                db.write(|_conn| -> sqlite_persistence::Result<()> {
                    writing.send(()).unwrap();
                    let _ = is_done.recv_timeout(Duration::from_secs(30));
                    Ok(())
                })
                .unwrap();
            });
            is_writing.recv_timeout(Duration::from_secs(10)).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
            let table = common::lock_table(&path);
            done.send(()).unwrap();
            (status, table)
        })
    });
    let (status, table) = status;
    assert!(!status.database_complete, "{status:?}");
    // The reader began on a checkpointed WAL, so it reads the database file alone (read
    // mark 0), under which no frame can be copied into the file.
    assert!(
        status
            .pinning_readers
            .iter()
            .any(|h| h.pid == me && h.lock == HeldLock::FileReader),
        "{:?}",
        status.pinning_readers
    );
    let queue = status
        .holders
        .iter()
        .find(|h| h.lock == HeldLock::WriteQueue)
        .unwrap_or_else(|| panic!("no holder of the write queue: {status:?}: {table}"));
    assert_eq!(queue.pid, me);
    assert_eq!(queue.operation, Some(Operation::Write));
    let held = queue.since.unwrap().elapsed().unwrap();
    assert!(held >= Duration::from_millis(50) && held < Duration::from_secs(30));
    checkpoint(&db);
    let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
    assert!(status.database_complete, "{status:?}");
    assert_eq!(status.wal_checkpointed_frames, status.wal_committed_frames);
}

/// The POSIX locks this process holds on `file`, as `/proc/locks` lists them (Linux).
fn my_posix_locks_on(file: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).unwrap();
    let id = format!(
        "{:02x}:{:02x}:{}",
        (meta.dev() >> 8) & 0xfff,
        meta.dev() & 0xff,
        meta.ino()
    );
    let me = std::process::id().to_string();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&"POSIX")
                && fields.get(4) == Some(&me.as_str())
                && fields.get(5) == Some(&id.as_str())
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn reading_the_wal_index_keeps_this_processs_own_sqlite_locks() {
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    common::bump(&db, "a").unwrap();
    let shm = std::path::PathBuf::from(format!("{}-shm", path.display()));
    let (before, after) = common::while_reading(&db, || {
        let before = my_posix_locks_on(&shm);
        // Status reads the WAL index; closing a descriptor of -shm of its own would drop
        // every one of these locks (the read mark, and the lock that says the index is in
        // use, which another process takes as leave to rebuild it).
        let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
        assert!(status.wal_committed_frames.is_some());
        (before, my_posix_locks_on(&shm))
    });
    assert!(!before.is_empty(), "the read holds locks on -shm");
    assert!(
        after.len() >= before.len(),
        "before {before:?}\nafter {after:?}"
    );
}

#[test]
fn status_says_when_a_connection_of_this_crate_last_completed_a_checkpoint() {
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    common::bump(&db, "a").unwrap();
    assert_eq!(
        Status::read(&path, MIGRATIONS, &Options::new())
            .unwrap()
            .last_checkpoint,
        None
    );
    // The layer checkpoints after a commit at 1000 frames.
    common::write_past_a_checkpoint(&db);
    let at = Status::read(&path, MIGRATIONS, &Options::new())
        .unwrap()
        .last_checkpoint
        .expect("a checkpoint recorded");
    let ago = at.elapsed().unwrap_or_default();
    assert!(ago < std::time::Duration::from_secs(30), "{ago:?}");
}
