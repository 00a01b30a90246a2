//! What a hostile neighbour or a careless user puts where the database should be, through
//! the command line: a clear `error: ` line naming the file and what it is, nothing created
//! or written, and nothing blocking past a bound.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs the binary with `args` and `--db db`, killed (and the test failed) past 30 s.
fn run_bounded(args: &[&str], db: &Path) -> common::Outcome {
    let child = Command::new(common::binary())
        .args(args)
        .arg("--db")
        .arg(db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::collect(vec![child], Duration::from_secs(30))
        .pop()
        .unwrap()
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Paths that name no regular file, each with what the error must call it: a character
/// device (a link to `/dev/null`, as a typo or a planted link would be), a FIFO, a socket,
/// and as root a block device node (of a device number no driver has, so that a regression
/// cannot write to a real disk).
fn not_files(
    dir: &Path,
) -> (
    Vec<(PathBuf, &'static str)>,
    std::os::unix::net::UnixListener,
) {
    let null = dir.join("null.db");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    let fifo = dir.join("fifo.db");
    mkfifo(&fifo);
    let socket = dir.join("socket.db");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut paths = vec![
        (null, "a character device"),
        (fifo, "a FIFO"),
        (socket, "a socket"),
    ];
    if common::is_root() {
        let block = dir.join("block.db");
        // Major 240 is reserved for local, experimental use: no driver answers it.
        let status = Command::new("mknod")
            .arg(&block)
            .args(["b", "240", "0"])
            .status()
            .unwrap();
        assert!(status.success());
        paths.push((block, "a block device"));
    }
    (paths, listener)
}

/// `--db` naming a device, a FIFO or a socket: every command refuses it at once, saying what
/// it is, and creates nothing beside it. A block device used to be written over (its first
/// bytes became `SQLite format 3`), `/dev/null` left `-journal` and `-lock` beside its link,
/// and `status` of a FIFO never returned.
#[test]
fn a_device_a_fifo_or_a_socket_as_the_database_is_refused_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _listener) = not_files(dir.path());
    let before = common::files_in(dir.path());
    let copy = dir.path().join("copy.db");
    for (path, kind) in &paths {
        for args in [
            &["record", "--artifact", "a"][..],
            &["migrate"],
            &["status"],
            &["backup", "--to", copy.to_str().unwrap()],
        ] {
            let outcome = run_bounded(args, path);
            assert!(!outcome.success, "{args:?} on {kind}: {}", outcome.stdout);
            let expected = format!("is {kind}, not a regular file");
            assert!(
                outcome.stderr.contains(&expected)
                    && outcome.stderr.contains(path.to_str().unwrap()),
                "{args:?} on {kind}: {}",
                outcome.stderr
            );
            assert_eq!(common::files_in(dir.path()), before, "{args:?} on {kind}");
        }
    }
}

/// A FIFO planted in place of a file the layer or SQLite opens by name blocks nothing: the
/// write queue's `-lock` (writers used to hang; it is done without), SQLite's `-journal`, `-wal` and `-shm`
/// (`status` used to hang on a `-journal`), each refused with its name; and as root, in a
/// private mount namespace, a FIFO mounted over `/proc/locks` (where the layer looks for
/// who holds a lock) leaves `status` and `record` to finish.
#[test]
fn a_fifo_in_place_of_a_side_file_or_of_the_lock_table_blocks_nothing() {
    let (dir, db) = common::fresh_db();
    assert!(run_bounded(&["record", "--artifact", "a"], &db).success);
    common::wait_closed(&db);
    let lock = PathBuf::from(format!("{}-lock", db.display()));
    std::fs::remove_file(&lock).unwrap();
    mkfifo(&lock);
    // Done without, as a `-lock` this user cannot open is: SQLite's own lock still keeps
    // the writes apart.
    let outcome = run_bounded(&["record", "--artifact", "a"], &db);
    assert!(outcome.success, "{}", outcome.stderr);
    // Said by default (warnings used to be shown only with SQLITE_PERSISTENCE_LOG=warn).
    assert!(
        outcome.stderr.contains("WARN") && outcome.stderr.contains("-lock"),
        "{}",
        outcome.stderr
    );
    std::fs::remove_file(&lock).unwrap();
    for suffix in ["-journal", "-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", db.display()));
        mkfifo(&side);
        for args in [&["status"][..], &["record", "--artifact", "a"]] {
            let outcome = run_bounded(args, &db);
            assert!(!outcome.success, "{suffix} {args:?}");
            assert!(
                outcome.stderr.contains(side.to_str().unwrap())
                    && outcome.stderr.contains("is a FIFO"),
                "{suffix} {args:?}: {}",
                outcome.stderr
            );
        }
        std::fs::remove_file(&side).unwrap();
    }
    if !common::is_root() {
        eprintln!("skipped the /proc/locks part: it needs root for a private mount namespace");
        return;
    }
    let fifo = dir.path().join("locks");
    mkfifo(&fifo);
    for args in ["status", "record --artifact b"] {
        let script = format!(
            "mount --bind '{}' /proc/locks && exec '{}' {args} --db '{}'",
            fifo.display(),
            common::binary(),
            db.display()
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let outcome = common::collect(vec![child], Duration::from_secs(30))
            .pop()
            .unwrap();
        assert!(outcome.success, "{args}: {}", outcome.stderr);
    }
}

/// `status` reads, and creates nothing: not on a database no connection has open (SQLite's
/// read-only connection used to leave an empty `-wal` and a `-shm` beside it), not for a
/// user who may only read the database in a directory they may not write (it used to fail
/// with "attempt to write a readonly database"); where it cannot read (the owner's private
/// `-wal` and `-shm` of a database in use), it names the file and the cause.
#[test]
fn status_reads_as_a_user_who_may_only_read_and_creates_nothing() {
    let (dir, db) = common::fresh_db();
    assert!(run_bounded(&["record", "--artifact", "a"], &db).success);
    common::wait_closed(&db);
    let before = common::files_in(dir.path());
    let outcome = run_bounded(&["status", "--json"], &db);
    assert!(outcome.success, "{}", outcome.stderr);
    let status: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(status["journal_mode"], "wal", "{status}");
    assert_eq!(status["integrity"][0], "ok", "{status}");
    assert_eq!(common::files_in(dir.path()), before);

    // The database readable by all, its directory writable by its owner only.
    common::set_mode(&db, 0o644);
    common::set_mode(dir.path(), 0o755);
    if !common::is_root() {
        eprintln!("skipped the other user's part: it needs root to run as another user");
        return;
    }
    let bytes = std::fs::read(&db).unwrap();
    let output =
        common::output_unprivileged(|command| command.args(["status", "--json", "--db"]).arg(&db));
    common::assert_success(&output);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["applied"].as_array().unwrap().len(), 3, "{status}");
    assert_eq!(status["journal_mode"], "wal", "{status}");
    assert_eq!(status["integrity"][0], "ok", "{status}");
    assert_eq!(common::files_in(dir.path()), before);
    assert!(std::fs::read(&db).unwrap() == bytes, "the file changed");

    // The owner has it open: its -wal and -shm are private to it.
    let catalog =
        sqlite_persistence_cli::Catalog::open(&db, sqlite_persistence::Options::new()).unwrap();
    catalog
        .database()
        .write(|conn| -> sqlite_persistence::Result<()> {
            use diesel::connection::SimpleConnection;
            Ok(conn.batch_execute("INSERT INTO artifacts (name) VALUES ('b')")?)
        })
        .unwrap();
    for suffix in ["-wal", "-shm"] {
        common::set_mode(Path::new(&format!("{}{suffix}", db.display())), 0o600);
    }
    let output = common::output_unprivileged(|command| command.args(["status", "--db"]).arg(&db));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!(
            "{}-wal is not readable by this user",
            db.display()
        )),
        "{stderr}"
    );
    drop(catalog);
    common::wait_closed(&db);
    // A database they may not read is named with the cause (it said "unable to open
    // database file").
    common::set_mode(&db, 0o600);
    let output = common::output_unprivileged(|command| command.args(["status", "--db"]).arg(&db));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot open {}: Permission denied", db.display())),
        "{stderr}"
    );
}

/// A populated catalog of about 1 MiB, closed.
fn populated(db: &Path) {
    populated_with(db, 8000);
}

/// A catalog of `rows` rows of about 180 bytes, closed.
fn populated_with(db: &Path, rows: u32) {
    let catalog =
        sqlite_persistence_cli::Catalog::open(db, sqlite_persistence::Options::new()).unwrap();
    catalog
        .database()
        .write(|conn| -> sqlite_persistence::Result<()> {
            use diesel::connection::SimpleConnection;
            Ok(conn.batch_execute(&format!(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows})
                     INSERT INTO artifacts (name)
                     SELECT 'artifact-' || x || '-' || hex(randomblob(80)) FROM c;"
            ))?)
        })
        .unwrap();
    drop(catalog);
    common::wait_closed(db);
}

/// `backup` with `umask 022` and, optionally, a file-size limit.
fn backup(db: &Path, to: &Path, size_limit: Option<u64>) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(common::binary());
    command.args(["backup", "--to"]).arg(to).arg("--db").arg(db);
    // SAFETY: between fork and exec, only umask, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    if let Some(bytes) = size_limit {
        common::limit(&mut command, libc::RLIMIT_FSIZE, bytes);
    }
    command.output().unwrap()
}

/// A backup is never more readable than its database: a 0600 database's copy was 0644 under
/// `umask 022`. As root, the copy of another user's database is that user's.
#[test]
fn a_backup_is_no_more_readable_than_its_database() {
    use std::os::unix::fs::MetadataExt;
    let (dir, db) = common::fresh_db();
    populated(&db);
    for (mode, name) in [(0o600, "private.db"), (0o640, "group.db")] {
        common::set_mode(&db, mode);
        let copy = dir.path().join(name);
        let output = backup(&db, &copy, None);
        common::assert_success(&output);
        let meta = std::fs::metadata(&copy).unwrap();
        assert_eq!(meta.mode() & 0o777, mode, "{name}");
    }
    if common::is_root() {
        std::os::unix::fs::chown(&db, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
        let copy = dir.path().join("theirs.db");
        common::assert_success(&backup(&db, &copy, None));
        let meta = std::fs::metadata(&copy).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (common::NOBODY, common::NOBODY));
    }
}

/// A backup stopped by a full disk (here a file-size limit, as a quota would) leaves nothing
/// beside its destination (its temporary's journal used to stay) and its hint speaks of the
/// backup's filesystem, not of the database; a backup of a database that does not exist
/// creates (and migrates) nothing; a destination name with no room for the temporary's is
/// refused as too long (it said "unable to open database file").
#[test]
fn a_failed_backup_leaves_nothing_and_says_why() {
    let (dir, db) = common::fresh_db();
    populated(&db);
    let before = common::files_in(dir.path());
    let copy = dir.path().join("copy.db");
    let output = backup(&db, &copy, Some(256 * 1024));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("could not write to disk"), "{stderr}");
    assert!(
        stderr.contains("free space on the backup's filesystem"),
        "{stderr}"
    );
    assert_eq!(common::files_in(dir.path()), before);

    if common::is_root() {
        // A full filesystem, as root can make one: a tmpfs of 256 KiB. A database larger
        // than the copy's cache makes SQLite write a journal beside the copy, which stayed.
        let full_dir = tempfile::tempdir().unwrap();
        let full = full_dir.path().join("full");
        std::fs::create_dir(&full).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(&full)
            .status()
            .unwrap();
        assert!(mounted.success());
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(&full);
        let (_big_dir, big) = common::fresh_db();
        populated_with(&big, 200_000);
        let output = backup(&big, &full.join("copy.db"), None);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains("disk is full"), "{stderr}");
        assert!(
            stderr.contains("free space on the backup's filesystem"),
            "{stderr}"
        );
        assert_eq!(common::files_in(&full), Vec::<String>::new());
    } else {
        eprintln!("skipped the full filesystem: mounting a small tmpfs needs root");
    }

    let missing = dir.path().join("missing.db");
    let output = backup(&missing, &copy, None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("database {} does not exist", missing.display())),
        "{stderr}"
    );
    assert_eq!(common::files_in(dir.path()), before);

    let long = dir.path().join(format!("{}.db", "n".repeat(240)));
    let output = backup(&db, &long, None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("is longer than 218 bytes"), "{stderr}");
    assert_eq!(common::files_in(dir.path()), before);
}

/// What a hostile process names itself (`/proc/self/comm`, 15 bytes at most): an escape
/// sequence that retitles the terminal and one that clears it.
const HOSTILE_NAME: &str = "\x1b]0;pwned\x07\x1b[2J";

/// Not a test on its own: names itself [`HOSTILE_NAME`], takes the write queue of
/// `EDGES_HOLD_DB` (an exclusive `flock` of its `-lock`), says `held`, and holds it until
/// its stdin closes (or 30 s pass).
#[test]
#[ignore = "run as a child process by the escape tests"]
fn hostile_holder_child() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let Ok(db) = std::env::var("EDGES_HOLD_DB") else {
        return;
    };
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(30));
        std::process::exit(3);
    });
    // The process's name is its main thread's (`prctl(PR_SET_NAME)` names the calling
    // thread, and tests run on threads of their own): written through `/proc`.
    std::fs::write("/proc/self/comm", HOSTILE_NAME).unwrap();
    let lock = std::fs::File::open(format!("{db}-lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    println!("held");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read(&mut [0]);
}

/// A process that names itself with escape sequences and holds the write queue is named
/// escaped (`\x1b]0;pwned\x07...`) by `status` and in `Error::Busy`: it was printed raw, and
/// retitled and cleared the terminal of whoever read it. So are table names read from a
/// database file and a path given by a user.
#[test]
fn names_from_outside_are_escaped_wherever_they_are_shown() {
    use std::io::BufRead;
    let (dir, db) = common::fresh_db();
    assert!(run_bounded(&["record", "--artifact", "a"], &db).success);
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args([
            "hostile_holder_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("EDGES_HOLD_DB", &db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim_end() != "held" {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the holder ended");
    }
    let escaped = "\\x1b]0;pwned\\x07\\x1b[2J";

    let status = run_bounded(&["status"], &db);
    assert!(status.success, "{}", status.stderr);
    assert!(!status.stdout.contains('\x1b'), "{}", status.stdout);
    assert!(
        status
            .stdout
            .contains(&format!("({escaped}) holding the write queue")),
        "{}",
        status.stdout
    );

    let options = sqlite_persistence::Options::new()
        .retry(sqlite_persistence::RetryPolicy::new().max_elapsed(Duration::from_millis(300)));
    let database = sqlite_persistence_cli::Catalog::open(&db, options).unwrap();
    let error = database
        .database()
        .write(|conn| -> sqlite_persistence::Result<()> {
            use diesel::connection::SimpleConnection;
            Ok(conn.batch_execute("INSERT INTO artifacts (name) VALUES ('b')")?)
        })
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, sqlite_persistence::Error::Busy { .. }),
        "{message}"
    );
    assert!(!message.contains('\x1b'), "{message}");
    assert!(message.contains(escaped), "{message}");
    drop(holder.stdin.take());
    let _ = holder.wait();

    // A table named like an escape sequence, in a database of another program.
    let foreign = dir.path().join("foreign.db");
    let mut conn =
        <diesel::SqliteConnection as diesel::Connection>::establish(foreign.to_str().unwrap())
            .unwrap();
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        "CREATE TABLE \"\x1b[2Jgone\" (x INTEGER)",
    )
    .unwrap();
    drop(conn);
    let outcome = run_bounded(&["migrate"], &foreign);
    assert!(!outcome.success);
    assert!(!outcome.stderr.contains('\x1b'), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("\\x1b[2Jgone"),
        "{}",
        outcome.stderr
    );

    // A path with a line break in it forges no line of output.
    let forged = dir.path().join("x\nFAKE holders none.db");
    let outcome = run_bounded(&["status"], &forged);
    assert!(
        !outcome.stdout.lines().any(|line| line.starts_with("FAKE")),
        "{}",
        outcome.stdout
    );
    // A path given with an escape sequence in it.
    let odd = dir.path().join("\x1b]0;x\x07").join("x.db");
    let outcome = run_bounded(&["status"], &odd);
    assert!(!outcome.stderr.contains('\x1b'), "{}", outcome.stderr);
    let outcome = run_bounded(&["record", "--artifact", "a"], &odd);
    assert!(!outcome.success);
    assert!(!outcome.stderr.contains('\x1b'), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("\\x1b]0;x\\x07"),
        "{}",
        outcome.stderr
    );
}

/// What a careless user meets on the command line: with few file descriptors left the open
/// says "Too many open files" at once (it said "unable to open database file"); an artifact
/// name with white space around it is refused (" a" and "a" were two artifacts that print
/// alike); a `--db` that is not UTF-8 is refused and creates nothing.
#[test]
fn careless_input_gets_a_clear_answer_and_creates_nothing() {
    let (dir, db) = common::fresh_db();
    assert!(run_bounded(&["record", "--artifact", "a"], &db).success);
    common::wait_closed(&db);
    let mut command = Command::new(common::binary());
    command
        .args(["record", "--artifact", "a", "--db"])
        .arg(&db)
        .stdin(Stdio::null());
    common::limit(&mut command, libc::RLIMIT_NOFILE, 5);
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!(
            "cannot open {}: Too many open files",
            db.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("ulimit -n"), "{stderr}");

    for name in [" a", "a ", "\ta"] {
        let outcome = run_bounded(&["record", "--artifact", name], &db);
        assert!(!outcome.success, "{name:?}");
        assert!(
            outcome.stderr.contains("white space") || outcome.stderr.contains("control"),
            "{name:?}: {}",
            outcome.stderr
        );
    }
    // A PostgreSQL connection string typed where a path goes: refused, no file (named with
    // the password) is made, and the password is not shown.
    let before = common::files_in(dir.path());
    for db in ["dbname=sec user=app password=SECRET", "postgres:sec"] {
        let output = Command::new(common::binary())
            .args(["record", "--artifact", "a", "--db", db])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{db}");
        assert!(stderr.contains("PostgreSQL"), "{db}: {stderr}");
        assert!(!stderr.contains("SECRET"), "{stderr}");
        assert_eq!(common::files_in(dir.path()), before, "{db}");
    }
    let bad = dir
        .path()
        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"bad\xff.db"));
    let outcome = run_bounded(&["record", "--artifact", "a"], &bad);
    assert!(!outcome.success);
    assert!(
        outcome.stderr.contains("is not valid UTF-8"),
        "{}",
        outcome.stderr
    );
    assert_eq!(common::files_in(dir.path()), before);
}

/// A WAL planted beside a database (a sticky directory lets anyone make one) is never
/// replayed into it: a stranger's 0666 `-wal` was merged into the victim's database (its
/// rows replaced by the stranger's), and a `-wal` beside a database that does not exist yet
/// was replayed into the new one. Each is refused by name, and nothing changes.
#[test]
fn a_planted_wal_is_never_replayed_into_the_database() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, db) = common::fresh_db();
    // A WAL of another database, with commits in it.
    let (_other_dir, other) = common::fresh_db();
    let mut conn =
        <diesel::SqliteConnection as diesel::Connection>::establish(other.to_str().unwrap())
            .unwrap();
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; \
         CREATE TABLE planted (x); INSERT INTO planted VALUES ('evil');",
    )
    .unwrap();
    let wal = std::fs::read(format!("{}-wal", other.display())).unwrap();
    drop(conn);
    assert!(!wal.is_empty());
    let planted = PathBuf::from(format!("{}-wal", db.display()));
    std::fs::write(&planted, &wal).unwrap();
    let outcome = run_bounded(&["record", "--artifact", "a"], &db);
    assert!(!outcome.success);
    assert!(
        outcome.stderr.contains(planted.to_str().unwrap())
            && outcome.stderr.contains("does not exist"),
        "{}",
        outcome.stderr
    );
    assert!(!db.exists());
    std::fs::remove_file(&planted).unwrap();

    // Another user's, world-writable, beside an existing database.
    assert!(run_bounded(&["record", "--artifact", "a"], &db).success);
    common::wait_closed(&db);
    let bytes = std::fs::read(&db).unwrap();
    std::fs::write(&planted, &wal).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
    if common::is_root() {
        std::os::unix::fs::chown(&planted, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    }
    for args in [&["record", "--artifact", "b"][..], &["status"]] {
        let outcome = run_bounded(args, &db);
        assert!(!outcome.success, "{args:?}");
        assert!(
            outcome.stderr.contains(planted.to_str().unwrap()),
            "{args:?}: {}",
            outcome.stderr
        );
    }
    assert!(std::fs::read(&db).unwrap() == bytes, "the database changed");
    let _ = dir;
}

/// Another user's `-lock` (planted in a sticky directory, world-writable, and held) does not
/// stop the database's writers: it is not the database's, and the queue is done without.
/// The writers waited for it the whole retry deadline and failed.
#[test]
fn another_users_lock_file_held_stops_no_writer() {
    if !common::is_root() {
        eprintln!("not root: cannot make another user's file, nothing checked");
        return;
    }
    let (_dir, db) = common::fresh_db();
    assert!(run_bounded(&["record", "--artifact", "a"], &db).success);
    common::wait_closed(&db);
    let lock = PathBuf::from(format!("{}-lock", db.display()));
    std::fs::remove_file(&lock).unwrap();
    std::fs::write(&lock, b"").unwrap();
    common::set_mode(&lock, 0o666);
    std::os::unix::fs::chown(&lock, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    let held = std::fs::File::open(&lock).unwrap();
    held.lock().unwrap();
    let outcome = run_bounded(&["record", "--artifact", "a"], &db);
    assert!(outcome.success, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("-lock"), "{}", outcome.stderr);
    drop(held);
}

/// A backup into a directory whose default ACL gives another user read access is no more
/// readable than its database: the inherited ACL, which the copy's mode does not show, let
/// that user read a copy of a database they could not.
#[test]
fn a_backup_inherits_no_acl_that_would_let_others_read_it() {
    if !common::is_root() {
        eprintln!("not root: cannot read as another user, nothing checked");
        return;
    }
    let (dir, db) = common::fresh_db();
    populated(&db);
    common::set_mode(&db, 0o640);
    let dst = dir.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    // user::rw-, user:nobody:r--, group::---, mask::r--, other::---
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, common::NOBODY),
        (0x04, 0, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    let path = std::ffi::CString::new(dst.to_str().unwrap()).unwrap();
    // SAFETY: the path and the value outlive the call, the name is a NUL-terminated literal.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"system.posix_acl_default".as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    if rc != 0 {
        eprintln!("no ACLs on this filesystem, nothing checked");
        return;
    }
    let copy = dst.join("copy.db");
    common::assert_success(&backup(&db, &copy, None));
    let read = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&copy)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!read.success(), "another user reads the copy");
}
