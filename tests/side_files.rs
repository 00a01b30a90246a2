//! No way in through the files around a database: the layer often runs as root, or as a
//! service user, in a directory others can write. Symbolic links are never followed to
//! create a file, side files are owned like the database and readable only by those who may
//! write it, and a write queue that cannot be used is done without, not a failure.
#![cfg(unix)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{bump, fresh_db, MIGRATIONS};
use sqlite_persistence::{Error, Options};

fn side(db: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", db.display()))
}

#[test]
fn a_dangling_lock_symlink_is_not_followed_and_writes_go_on_without_the_queue() {
    let (dir, path) = fresh_db();
    let target = dir.path().join("planted");
    std::os::unix::fs::symlink(&target, side(&path, "-lock")).unwrap();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    assert_eq!(bump(&db, "a").unwrap().0, 1);
    assert_eq!(bump(&db, "a").unwrap().0, 2);
    assert!(!target.exists(), "a file was created through the link");
}

#[test]
fn a_lock_that_is_a_directory_is_done_without() {
    let (_dir, path) = fresh_db();
    std::fs::create_dir(side(&path, "-lock")).unwrap();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}

#[test]
fn a_lock_that_is_a_fifo_is_done_without_instead_of_hanging_the_open() {
    let (_dir, path) = fresh_db();
    let lock = side(&path, "-lock");
    let made = std::process::Command::new("mkfifo")
        .arg(&lock)
        .status()
        .unwrap();
    assert!(made.success());
    // Opening a FIFO for reading waits for a writer: the open used to hang there for ever.
    let (done, opened) = std::sync::mpsc::channel();
    let opening = path.clone();
    std::thread::spawn(move || {
        let result = Options::new().open(&opening, MIGRATIONS).and_then(|db| {
            let first = bump(&db, "a")?.0;
            let second = bump(&db, "a")?.0;
            Ok((first, second))
        });
        let _ = done.send(result.map_err(|e| e.to_string()));
    });
    let written = opened
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the open hung on a FIFO named like the write queue's file");
    assert_eq!(written.unwrap(), (1, 2));
    // Left as it was.
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &std::fs::symlink_metadata(&lock).unwrap().file_type()
    ));
}

#[test]
fn a_database_path_that_is_a_dangling_symlink_is_refused_and_nothing_is_created() {
    let (dir, path) = fresh_db();
    let target = dir.path().join("elsewhere.db");
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let error = Options::new().open(&path, MIGRATIONS).unwrap_err();
    match &error {
        Error::DanglingSymlink { path: p, target: t } => {
            assert_eq!(p, &path);
            assert_eq!(t, &target);
        }
        other => panic!("expected DanglingSymlink, got {other}"),
    }
    assert!(error.hint().is_some());
    assert!(!target.exists());
    assert_eq!(common::file_names(dir.path()), ["app.db"]);
}

#[test]
fn a_name_too_long_for_the_side_files_is_refused_before_anything_is_created() {
    let (dir, _) = fresh_db();
    let path = dir.path().join("d".repeat(250));
    let error = Options::new().open(&path, MIGRATIONS).unwrap_err();
    assert!(
        matches!(error, Error::NameTooLong { max: 245, .. }),
        "{error}"
    );
    assert!(
        common::file_names(dir.path()).is_empty(),
        "{:?}",
        common::file_names(dir.path())
    );
    // The longest name that fits works, side files and all.
    let path = dir.path().join("d".repeat(245));
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}

#[test]
fn only_those_who_may_write_the_database_may_open_its_queue() {
    let (_dir, path) = fresh_db();
    // A database others may read but not write: they have no business in its write queue
    // (a reader holding the queue's lock would stop every writer).
    let db = Options::new()
        .create_mode(0o644)
        .open(&path, MIGRATIONS)
        .unwrap();
    bump(&db, "a").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o644);
    assert_eq!(mode(&side(&path, "-lock")), 0o600);
    let (_dir, path) = fresh_db();
    Options::new()
        .create_mode(0o664)
        .open(&path, MIGRATIONS)
        .unwrap();
    assert_eq!(mode(&side(&path, "-lock")), 0o660);
}

#[test]
fn a_lock_file_root_creates_belongs_to_the_databases_owner() {
    if !common::is_root() {
        eprintln!("not root: cannot make files of another user, nothing checked");
        return;
    }
    let (dir, path) = fresh_db();
    {
        // The database of a service user...
        let db = Options::new().open(&path, MIGRATIONS).unwrap();
        bump(&db, "a").unwrap();
    }
    std::fs::remove_file(side(&path, "-lock")).unwrap();
    std::os::unix::fs::chown(&path, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    // ...written once by root: the -lock root creates is the owner's, as SQLite does for
    // -wal and -shm, so that the owner's own writes can still queue.
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();
    let meta = std::fs::metadata(side(&path, "-lock")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (common::NOBODY, common::NOBODY));
}

#[test]
fn a_fifo_where_sqlite_expects_its_journal_or_wal_is_refused_at_once_by_name() {
    for suffix in ["-journal", "-wal"] {
        let (_dir, path) = fresh_db();
        drop(Options::new().open(&path, MIGRATIONS).unwrap());
        common::wait_closed(&path);
        let fifo = side(&path, suffix);
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // On a thread with a bounded wait: SQLite alone would block forever opening it.
        let (sender, receiver) = std::sync::mpsc::channel();
        let opening = path.clone();
        std::thread::spawn(move || {
            let _ = sender.send(Options::new().open(&opening, MIGRATIONS).map(drop));
        });
        let outcome = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("opening with a FIFO {suffix} hangs"));
        match outcome {
            Err(Error::SideFile { path: p, problem }) => {
                assert_eq!(p, fifo);
                assert_eq!(problem, "is a FIFO, not a regular file");
            }
            other => panic!("{suffix}: expected SideFile, got {other:?}"),
        }
    }
}
