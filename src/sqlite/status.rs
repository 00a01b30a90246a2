//! What a database file looks like, read without creating, migrating or locking it for writes.

use std::path::{Path, PathBuf};

use diesel::migration::MigrationSource;
use diesel::sql_types::Text;
use diesel::sqlite::Sqlite;
use diesel::{sql_query, Connection, QueryableByName, RunQueryDsl, SqliteConnection};

use crate::error::{Error, FileOperation, Operation, Result};
use crate::handle::Checksums;
use crate::holders::Holder;
use crate::migrate::plan::Plan;
use crate::migrate::{Source, State};
use crate::options::Options;
use crate::retry::{retry_locked, SystemClock};
use crate::sqlite::customizer::ConnectionCustomizer;
use crate::sqlite::ffi::sys::{readable, writable};
use crate::sqlite::lock_table::{holders_of, pinning_readers_of, wal_readers_of};
use crate::sqlite::open::{
    check_side_files, read_journal_mode, regular_or_missing, Access, Filesystem, Target,
};
use crate::sqlite::queue::sidecar::last_checkpoint_of;

/// Sizes in bytes of a database's files; `None` where the file does not exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileSizes {
    /// The database file.
    pub database: Option<u64>,
    /// The write-ahead log (`-wal`).
    pub wal: Option<u64>,
    /// The WAL index (`-shm`).
    pub shm: Option<u64>,
}

/// A database's state as [`Status::read`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The database file, absolute.
    pub path: PathBuf,
    /// Whether the file exists (a missing one is not created).
    pub exists: bool,
    /// The filesystem of the database's directory (`ext2/ext3/ext4`, `NFS`, or statfs's
    /// magic number in hex); `None` where it cannot be told (not Linux).
    pub filesystem: Option<String>,
    /// Whether that filesystem is a network or cluster one, where an open in WAL mode is
    /// refused.
    pub network_filesystem: bool,
    /// The journal mode in force, as SQLite names it; `None` if the file does not exist.
    pub journal_mode: Option<String>,
    /// `PRAGMA application_id` (0: not set); `None` if the file does not exist.
    pub application_id: Option<u32>,
    /// Versions recorded as applied, ascending.
    pub applied: Vec<String>,
    /// Names of the known migrations not applied yet, in the order they would run.
    pub pending: Vec<String>,
    /// Applied versions the migration source does not know.
    pub unknown: Vec<String>,
    /// The checksums of applied migrations against the source's SQL.
    pub checksums: Checksums,
    /// What `PRAGMA quick_check` says: `["ok"]` for a sound file, else its findings (or
    /// SQLite's error); empty if the file does not exist.
    pub integrity: Vec<String>,
    /// The files' sizes.
    pub sizes: FileSizes,
    /// Frames in `-wal` (committed pages not yet, or not yet known to be, copied back into
    /// the database file), from its size and the page size; `None` without a `-wal`.
    pub wal_frames: Option<u64>,
    /// Who holds the write queue or SQLite's write lock now (OS lock table, Linux).
    pub holders: Vec<Holder>,
    /// Who has a read transaction open, holding back checkpoints (OS lock table, Linux): as
    /// [`HeldLock::WalReader`](crate::HeldLock::WalReader) if it reads from the WAL, as
    /// [`HeldLock::FileReader`](crate::HeldLock::FileReader) if it reads the file alone.
    pub wal_readers: Vec<Holder>,
    /// Frames of the WAL holding committed transactions, from the WAL index (`-shm`);
    /// `None` without one.
    pub wal_committed_frames: Option<u32>,
    /// How many of them the last checkpoint copied into the database file.
    pub wal_checkpointed_frames: Option<u32>,
    /// Whether the database file alone holds every committed transaction (no WAL, an empty
    /// one, or one checkpointed to its end): then a copy of the file alone is the whole
    /// database. `false` when the WAL holds frames not copied back, or frames that no WAL
    /// index describes (a crashed writer's, which the next open recovers).
    pub database_complete: bool,
    /// The readers that keep the WAL from being checkpointed to its end: by their read
    /// marks in `-shm` and the OS lock table (Linux).
    pub pinning_readers: Vec<Holder>,
    /// When a connection of this crate last completed a checkpoint (recorded in the write
    /// queue's file; not SQLite's own checkpoint when the last connection closes).
    pub last_checkpoint: Option<std::time::SystemTime>,
}

#[derive(QueryableByName)]
struct PageSize {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    page_size: i64,
}

#[derive(QueryableByName)]
struct CheckRow {
    #[diesel(sql_type = Text)]
    quick_check: String,
}

impl Status {
    /// Reads the state of the database at `path` against `migrations`, without creating,
    /// writing, checkpointing or deleting anything (not even the `-wal` and `-shm` a
    /// read-only SQLite connection leaves behind): while no connection has the database
    /// open, it reads the file alone and checks that nothing changed it meanwhile; else it
    /// reads through SQLite's locks and WAL index, read-only. So it also works for a user
    /// who may only read the database, in a directory they may not write. It runs
    /// `PRAGMA quick_check`, which reads the whole file.
    ///
    /// # Errors
    /// [`Error::MigrationSource`], [`Error::InvalidPath`], [`Error::Open`];
    /// [`Error::NotAFile`] when the path names a device, a FIFO or a socket;
    /// [`Error::SideFile`] when a `-journal`, `-wal` or `-shm` beside it is not a regular
    /// file or not readable by this user (or the WAL index is needed and cannot be made);
    /// [`Error::NotADatabase`] when the file is not a database; [`Error::Busy`] if it stayed
    /// locked.
    pub fn read<S: MigrationSource<Sqlite>>(
        path: impl AsRef<Path>,
        migrations: S,
        options: &Options,
    ) -> Result<Self> {
        let source = Source::list(migrations)?;
        let target = Target::new(path.as_ref())?;
        if !target.is_memory() {
            // Nothing here may block: SQLite would wait forever on a FIFO in place of the
            // database or one of its side files.
            let database = regular_or_missing(target.path())?;
            check_side_files(target.path(), database.as_ref(), false)?;
        }
        let size = |suffix: &str| match target.side_file(suffix) {
            Some(file) => file_size(file),
            None => Ok(None),
        };
        let sizes = FileSizes {
            database: size("")?,
            wal: size("-wal")?,
            shm: size("-shm")?,
        };
        let path = target.path().to_owned();
        let filesystem = match path.parent() {
            Some(dir) if !target.is_memory() => Filesystem::of(dir).ok().flatten(),
            _ => None,
        };
        let mut status = Status {
            exists: sizes.database.is_some(),
            path,
            filesystem: filesystem.map(Filesystem::name),
            network_filesystem: filesystem.is_some_and(|fs| fs.network().is_some()),
            journal_mode: None,
            application_id: None,
            applied: Vec::new(),
            pending: Vec::new(),
            unknown: Vec::new(),
            checksums: Checksums::default(),
            integrity: Vec::new(),
            sizes,
            wal_frames: None,
            holders: Vec::new(),
            wal_readers: Vec::new(),
            wal_committed_frames: None,
            wal_checkpointed_frames: None,
            database_complete: true,
            pinning_readers: Vec::new(),
            last_checkpoint: None,
        };
        let plan = if status.exists {
            read_file(&mut status, &target, &source, options)?
        } else {
            source.plan(State::default(), options)
        };
        status.pending = source.names(&plan.pending);
        status.checksums = Checksums {
            verified: plan.verified,
            edited: source.names(&plan.edited),
            unrecorded: source.names(&plan.unrecorded),
        };
        status.unknown = plan.unknown;
        status.applied = plan.state.applied.into_iter().collect();
        Ok(status)
    }
}

/// Reads what the existing database file holds into `status`, read-only and creating
/// nothing: from the file alone while no connection has it open (checked to be unchanged
/// afterwards), else through SQLite's locks and WAL index.
fn read_file(
    status: &mut Status,
    target: &Target,
    source: &Source<Sqlite>,
    options: &Options,
) -> Result<Plan> {
    let path = target.path();
    if !readable(path) {
        // SQLite would say only "unable to open database file".
        return Err(Error::Io {
            operation: FileOperation::OpenDatabase,
            path: path.to_owned(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        });
    }
    let [wal, shm] =
        ["-wal", "-shm"].map(|suffix| target.side_file(suffix).expect("a file has side files"));
    for side in [&wal, &shm] {
        if side.exists() && !readable(side) {
            return Err(Error::SideFile {
                path: side.clone(),
                problem: "is not readable by this user, and the database cannot be read \
                          without it",
            });
        }
    }
    let journal = target.side_file("-journal").expect("a file has side files");
    let wal_commits = status.sizes.wal.unwrap_or(0) > 0;
    // (An empty journal is no transaction to roll back.)
    let hot_journal = std::fs::metadata(&journal).is_ok_and(|meta| meta.len() > 0);
    if shm.exists() || wal_commits || hot_journal {
        // A connection has the database open (it keeps the WAL index), or a crashed one left
        // commits in the WAL or a journal to roll back: SQLite's own locks and index are
        // needed, and SQLite makes the index if it must.
        if !shm.exists() && wal_commits && !path.parent().is_some_and(writable) {
            return Err(Error::SideFile {
                path: shm,
                problem: "does not exist and this user may not create it (the directory is \
                          not writable): the commits in the WAL cannot be read without it",
            });
        }
        return read_with(status, target, source, options, Access::ReadOnly);
    }
    // No connection has the database open: read the file alone, so that nothing (not even
    // SQLite's -wal and -shm, which a read-only connection leaves behind) is created. A
    // writer starting meanwhile makes its side files before it changes the file: what was
    // read is whole if the file and its side files are as they were.
    let before = Witness::of(path, &wal, &shm, &journal);
    let plan = read_with(status, target, source, options, Access::Immutable)?;
    if before.is_some() && Witness::of(path, &wal, &shm, &journal) == before {
        return Ok(plan);
    }
    // A writer began meanwhile: it keeps the WAL index, through which a reader sees its
    // commits (the file alone would not hold them, however still it stays).
    read_with(status, target, source, options, Access::ReadOnly)
}

/// What changes when anyone writes a database: its file's identity, size and times, and its
/// side files' existence and sizes.
#[derive(PartialEq, Eq)]
struct Witness {
    file: (u64, u64, i64, i64, i64, i64),
    wal: Option<u64>,
    shm: bool,
    journal: bool,
}

impl Witness {
    fn of(path: &Path, wal: &Path, shm: &Path, journal: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            file: (
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec(),
            ),
            wal: std::fs::metadata(wal).ok().map(|m| m.len()),
            shm: shm.exists(),
            journal: journal.exists(),
        })
    }
}

/// One read-only connection with `access`, and everything `Status` reads through it.
fn read_with(
    status: &mut Status,
    target: &Target,
    source: &Source<Sqlite>,
    options: &Options,
    access: Access,
) -> Result<Plan> {
    // Read-only: a reader never checkpoints, so even as the last connection to close it
    // leaves -wal as it is (whatever is in it), and a user who may only read the database
    // can read its status.
    let mut conn = SqliteConnection::establish(&target.url(access))
        .map_err(|source| Error::open_failed(&status.path, source))?;
    let customizer = ConnectionCustomizer::new(options);
    let (mode, plan) = retry_locked(
        &options.retry,
        &SystemClock,
        Operation::ReadStatus,
        target.path(),
        |_| {
            customizer.apply(&mut conn)?;
            let query = |e| Error::query(Operation::ReadStatus, e);
            let mode = read_journal_mode(&mut conn).map_err(query)?;
            Ok::<_, Error>((mode, source.read(&mut conn, options).map_err(query)?))
        },
    )
    .map_err(|e| e.naming_bad_file(&status.path))?
    .value;
    // Read from the file alone, SQLite sees no WAL and says "delete"; the header says what
    // the file is in (its read and write versions are 2 in WAL mode).
    let mode = match access {
        Access::Immutable => match crate::sqlite::ffi::shm::header_in_read(&mut conn) {
            Some(header) if header[18] == 2 && header[19] == 2 => "wal".to_owned(),
            _ => mode,
        },
        _ => mode,
    };
    let wal_mode = mode == "wal";
    status.journal_mode = Some(mode);
    status.application_id = Some(plan.state.application_id);
    let page_size = sql_query("PRAGMA page_size")
        .get_result::<PageSize>(&mut conn)
        .map_or(0, |row| row.page_size.max(0) as u64);
    // A WAL is a 32-byte header, then frames of a 24-byte header and a page.
    status.wal_frames = status
        .sizes
        .wal
        .filter(|_| page_size > 0)
        .map(|bytes| bytes.saturating_sub(32) / (page_size + 24));
    status.holders = holders_of(target.path());
    status.last_checkpoint = last_checkpoint_of(target.path());
    status.wal_readers = wal_readers_of(target.path());
    // Through SQLite's mapping of -shm: opening it here, and closing it, would drop every
    // POSIX lock this process holds on it (see `shm`). Inside a read transaction, which
    // holds the connection's own reference to that mapping.
    // Only in WAL mode, and only through SQLite's index (none when reading the file alone):
    // mapping it otherwise would create -shm.
    let index = (wal_mode && access == Access::ReadOnly)
        .then(|| crate::sqlite::ffi::shm::in_read(&mut conn))
        .flatten();
    status.wal_committed_frames = index.map(|index| index.committed);
    status.wal_checkpointed_frames = index.map(|index| index.checkpointed);
    status.database_complete = match index {
        Some(index) => index.checkpointed >= index.committed,
        None => status.sizes.wal.unwrap_or(0) == 0,
    };
    if let Some(index) = index.filter(|index| index.checkpointed < index.committed) {
        status.pinning_readers = pinning_readers_of(target.path(), &index);
    }
    status.integrity = match sql_query("PRAGMA quick_check").load::<CheckRow>(&mut conn) {
        Ok(rows) => rows.into_iter().map(|r| r.quick_check).collect(),
        Err(error) => vec![error.to_string()],
    };
    Ok(plan)
}

fn file_size(file: PathBuf) -> Result<Option<u64>> {
    match std::fs::metadata(&file) {
        Ok(meta) => Ok(Some(meta.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            operation: FileOperation::ReadMetadata,
            path: file,
            source,
        }),
    }
}
