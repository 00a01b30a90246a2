//! Helpers for the library's own tests: its small schema (`migrations/`: counters and their
//! events), fresh files, and bounded waits.
#![allow(dead_code)]

pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::{Database, WriteStats};

use schema::{counters, events};

/// The library's test schema.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Its versions, as Diesel records them.
pub const VERSIONS: [&str; 2] = ["20261201000001", "20261201000002"];

/// An application id for the tests that stamp files: `Test`.
pub const APPLICATION_ID: u32 = u32::from_be_bytes(*b"Test");

/// This process's thread count.
#[cfg(target_os = "linux")]
pub fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// A fresh temporary directory and a database path in it.
pub fn fresh_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    (dir, db)
}

/// Counts `name` up by one in a write transaction (read the value, then write the next and
/// its event row: safe only with the write lock held from the start), returning the new
/// value and what the write waited.
pub fn bump(db: &Database, name: &str) -> sqlite_persistence::Result<(i64, WriteStats)> {
    db.write_measured(|conn| -> sqlite_persistence::Result<i64> { Ok(bump_in(conn, name)?) })
}

/// Defines `$name`, the statements of [`bump`] on a `$conn`, in whatever transaction it is
/// in: the same statements on each engine.
macro_rules! bump_on {
    ($(#[$attr:meta])* $name:ident, $conn:ty) => {
        $(#[$attr])*
        pub fn $name(conn: &mut $conn, name: &str) -> QueryResult<i64> {
            diesel::insert_into(counters::table)
                .values(counters::name.eq(name))
                .on_conflict_do_nothing()
                .execute(conn)?;
            let value: i64 = counters::table
                .find(name)
                .select(counters::value)
                .first(conn)?;
            diesel::update(counters::table.find(name))
                .set(counters::value.eq(value + 1))
                .execute(conn)?;
            diesel::insert_into(events::table)
                .values((events::counter.eq(name), events::value.eq(value + 1)))
                .execute(conn)?;
            Ok(value + 1)
        }
    };
}

bump_on!(
    /// The statements of [`bump`], in whatever transaction `conn` is in.
    bump_in,
    SqliteConnection
);

#[cfg(feature = "postgres")]
bump_on!(
    /// [`bump_in`] on PostgreSQL.
    bump_in_pg,
    diesel::PgConnection
);

/// Every value `name` took, ascending, read through the layer.
pub fn values(db: &Database, name: &str) -> sqlite_persistence::Result<Vec<i64>> {
    db.read(|conn| -> sqlite_persistence::Result<Vec<i64>> {
        Ok(events::table
            .filter(events::counter.eq(name))
            .select(events::value)
            .order(events::value)
            .load(conn)?)
    })
}

/// A plain Diesel connection to `db`, for checking or holding locks beside the layer, with
/// `busy_timeout` set (10 s) before anything else: without it, a check that meets another
/// connection's checkpoint or commit fails with "database is locked" instead of waiting.
pub fn plain_sqlite(db: impl AsRef<Path>) -> SqliteConnection {
    let db = db.as_ref();
    let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    conn.set_busy_timeout(Duration::from_secs(10));
    conn
}

/// Writes 600 rows of about 4 KiB through the layer, one write each: past the 1000 WAL
/// frames after which the layer's hook checkpoints.
pub fn write_past_a_checkpoint(db: &Database) {
    use diesel::sql_types::Text;
    for i in 0..600 {
        db.write(|conn| -> sqlite_persistence::Result<()> {
            diesel::sql_query("INSERT INTO counters (name) VALUES (?)")
                .bind::<Text, _>(format!("{i:04096}"))
                .execute(conn)?;
            Ok(())
        })
        .unwrap();
    }
}

/// Runs one SQL query with Diesel on its own connection and returns the rows' first column.
pub fn query_strings(db: &Path, sql: &str) -> Vec<String> {
    use diesel::sql_types::Text;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        value: String,
    }
    let mut conn = plain_sqlite(db);
    diesel::sql_query(sql)
        .load::<Row>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|r| r.value)
        .collect()
}

/// Holds a write lock on `db` from another connection for `hold`, on its own thread;
/// returns once the lock is held.
pub fn hold_write_lock(db: &Path, hold: Duration) -> thread::JoinHandle<()> {
    hold_lock(db, "BEGIN IMMEDIATE", hold)
}

/// Holds the lock that `begin` takes on `db` from another connection for `hold`, on its own
/// thread; returns once the lock is held.
pub fn hold_lock(db: &Path, begin: &'static str, hold: Duration) -> thread::JoinHandle<()> {
    let url = db.to_str().unwrap().to_owned();
    let (locked, is_locked) = mpsc::channel();
    let holder = thread::spawn(move || {
        let mut conn = plain_sqlite(&url);
        conn.batch_execute(begin).unwrap();
        locked.send(()).unwrap();
        thread::sleep(hold);
        conn.batch_execute("COMMIT").unwrap();
    });
    is_locked.recv_timeout(Duration::from_secs(10)).unwrap();
    holder
}

/// Runs `f` while another thread has a `read` of `db` open (its transaction begun, by a first
/// statement), then ends the read: for a test that looks at a reader, however slowly a
/// loaded machine runs it.
pub fn while_reading<T>(db: &Database, f: impl FnOnce() -> T) -> T {
    thread::scope(|s| {
        let (reading, is_reading) = mpsc::channel();
        let (done, is_done) = mpsc::channel::<()>();
        s.spawn(move || {
            db.read(|conn| -> sqlite_persistence::Result<()> {
                counters::table.count().get_result::<i64>(conn)?;
                reading.send(()).unwrap();
                let _ = is_done.recv_timeout(Duration::from_secs(30));
                Ok(())
            })
            .unwrap();
        });
        is_reading.recv_timeout(Duration::from_secs(10)).unwrap();
        let value = f();
        done.send(()).unwrap();
        value
    })
}

/// A lock held by another connection on its own thread until [`Held::release`] (or 30 s).
pub struct Held {
    release: mpsc::Sender<()>,
    thread: thread::JoinHandle<()>,
}

impl Held {
    /// Commits, and waits for the thread.
    pub fn release(self) {
        let _ = self.release.send(());
        self.thread.join().unwrap();
    }
}

/// Holds the lock that `begin` takes on `db` until released: for a test that must look at
/// the lock while it is held, however slowly a loaded machine runs it.
pub fn hold_lock_until_released(db: &Path, begin: &'static str) -> Held {
    let url = db.to_str().unwrap().to_owned();
    let (locked, is_locked) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let thread = thread::spawn(move || {
        let mut conn = plain_sqlite(&url);
        conn.batch_execute(begin).unwrap();
        locked.send(()).unwrap();
        let _ = released.recv_timeout(Duration::from_secs(30));
        conn.batch_execute("COMMIT").unwrap();
    });
    is_locked.recv_timeout(Duration::from_secs(10)).unwrap();
    Held { release, thread }
}

/// Waits (at most 10 s) until every connection to `db` is closed, which SQLite marks by
/// checkpointing and removing `-wal`. r2d2 may close a dropped pool's last connection a
/// moment later on its own thread (its worker holds the pool while it connects), so a test
/// that compares a file's bytes after dropping a `Database` waits for this first.
pub fn wait_closed(db: &Path) {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let start = Instant::now();
    while wal.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} still open after 10 s",
            db.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// "a: b: c" for an error and its sources.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += ": ";
        text += &cause.to_string();
        source = cause.source();
    }
    text
}

/// The user id of the tests that need another user.
#[cfg(unix)]
pub const NOBODY: u32 = 65534;

/// Whether the tests run as root.
#[cfg(unix)]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The names of the files in `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// What a `tracing_subscriber::fmt` subscriber wrote, for tests that read the layer's events.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    /// A subscriber writing events at `level` and above here.
    pub fn subscriber(&self, level: tracing::Level) -> impl tracing::Subscriber + Send + Sync {
        pin_dispatchers();
        tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_max_level(level)
            .finish()
    }

    /// What was written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Keeps a second dispatcher registered for the life of the test binary. While only one is
/// registered, `tracing-core` computes a callsite's interest, once for the whole process, from
/// the default of the thread that reaches the callsite first (tokio-rs/tracing#3611): a thread
/// without a subscriber, in a test that captures nothing, makes the callsite never wanted, and
/// a capture on another thread misses its event. With two registered, every registered one is
/// asked; this one says "sometimes", so each event asks its thread's own subscriber.
fn pin_dispatchers() {
    static PINNED: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    PINNED.get_or_init(|| tracing::Dispatch::new(Pinned));
}

/// The subscriber of [`pin_dispatchers`]: wants no event itself.
struct Pinned;

impl tracing::Subscriber for Pinned {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::OFF)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The size of `db`'s side file `<db><suffix>`, 0 if there is none.
pub fn side_file_len(db: &Path, suffix: &str) -> u64 {
    std::fs::metadata(format!("{}{suffix}", db.display()))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// For a failing assertion about locks: the inode numbers of `db` and its `-shm` and `-wal`,
/// and the OS lock table (Linux), as they are now.
pub fn lock_table(db: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let ino = |suffix: &str| {
        std::fs::metadata(format!("{}{suffix}", db.display()))
            .map_or("-".to_owned(), |m| format!("{:x}:{}", m.dev(), m.ino()))
    };
    format!(
        "db {} shm {} wal {}; /proc/locks:\n{}",
        ino(""),
        ino("-shm"),
        ino("-wal"),
        std::fs::read_to_string("/proc/locks").unwrap_or_default()
    )
}

/// Runs this test binary's child role `role` (an ignored test that acts only when its
/// environment is set) with `env` set; its stdin and stdout piped.
pub fn child_role(role: &str, env: &[(&str, String)]) -> std::process::Child {
    use std::process::{Command, Stdio};
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([role, "--exact", "--ignored", "--nocapture"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().unwrap()
}

/// Waits (bounded by the child's own limit, see [`exit_after`]) until `child` prints `line`;
/// returns the rest of its output.
pub fn wait_for_line(
    child: &mut std::process::Child,
    line: &str,
) -> std::io::BufReader<std::process::ChildStdout> {
    use std::io::BufRead;
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    loop {
        text.clear();
        assert!(
            out.read_line(&mut text).unwrap() > 0,
            "the child ended before saying {line}"
        );
        if text.trim_end() == line {
            return out;
        }
    }
}

/// In a child role: exits the process after `seconds`, so that no child outlives a broken
/// test.
pub fn exit_after(seconds: u64) {
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(seconds));
        std::process::exit(3);
    });
}

#[cfg(feature = "postgres")]
pub mod pg;

/// A migrations directory with `migrations` (name, up.sql, run_in_transaction).
pub fn migrations_dir(dir: &Path, migrations: &[(&str, &str, bool)]) {
    for (name, up, transactional) in migrations {
        let m = dir.join(name);
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("up.sql"), up).unwrap();
        std::fs::write(m.join("down.sql"), "SELECT 1;").unwrap();
        if !transactional {
            std::fs::write(m.join("metadata.toml"), "run_in_transaction = false\n").unwrap();
        }
    }
}

#[cfg(feature = "postgres")]
pub mod bouncer;
