//! The power-loss model: a log of what was written and synced in one directory, and crash
//! images cut from it.
//!
//! While a workload runs, its [`Recorder`] logs, in one order under one mutex, every write
//! and truncation of each file (with the real operation), every sync of a file or of the
//! directory (with the position in the log it covers, taken before the kernel was asked),
//! every creation, hard link and unlink of a name, and the workload's own marks: a write
//! attempted, acknowledged, a backup begun or finished. Nothing is decided while it runs.
//!
//! Afterwards [`cut`] replays the log and stops at chosen positions. At each one the state a
//! power loss could leave is:
//! - **the directory**: the entries as of its last sync, then each name operation since
//!   (create, link, unlink), in order, kept or lost at random: a file created or deleted
//!   without a directory sync may be there or not (SQLite's own crash tests leave names
//!   alone; this is stricter);
//! - **each file** named there: its content as of its last sync, then each write and
//!   truncation since, in order, each kept whole, lost, or torn: each 512-byte sector of a
//!   torn write is new, old, or (in some images) random bytes, as in SQLite's crash tests
//!   (`test6.c`), but only within the bytes written (the `unix` VFS reports powersafe
//!   overwrite); a file may also keep the length of a lost write, zero-filled (its size
//!   reached the disk, its data did not);
//! - **no `-shm`**: SQLite rebuilds it, as after a real power loss; the layer's `-lock` is
//!   not written through SQLite and is left out too (the layer makes a new one).
//!
//! Files are independent: nothing orders one file's unsynced writes against another's.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

use rand::rngs::SmallRng;
use rand::Rng;

/// A file in the model (an inode: hard links share one).
pub type InodeId = u32;

/// What the workload tells the recorder.
#[derive(Clone, Debug)]
pub enum Mark {
    /// From here on the workload does this (for the report).
    Phase(&'static str),
    /// A write transaction took this sequence number (its attempt may still roll back).
    Attempt(u64),
    /// `write` returned Ok for the transaction with this sequence number.
    Ack(u64),
    /// The open that applied the migrations returned.
    MigrationsAcked,
    /// A backup to this file name began, after this many acknowledgements.
    BackupStarted { name: String, acked: usize },
    /// `backup_to` returned Ok for this file name.
    BackupDone { name: String },
}

/// One entry of the log.
#[derive(Clone, Debug)]
pub enum Event {
    Create {
        name: String,
        inode: InodeId,
    },
    Link {
        name: String,
        inode: InodeId,
    },
    Unlink {
        name: String,
    },
    Write {
        inode: InodeId,
        offset: u64,
        data: Arc<[u8]>,
    },
    SetLen {
        inode: InodeId,
        len: u64,
    },
    /// A sync of a file: every operation on it logged before `covers` is durable.
    SyncFile {
        inode: InodeId,
        covers: usize,
    },
    /// A sync of the directory: every name operation logged before `covers` is durable.
    SyncDir {
        covers: usize,
    },
    Mark(Mark),
}

/// Syncs the harness makes go missing, to show that it finds what they would have kept.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// The shim answers every `xSync` without syncing.
    pub lie_about_syncs: bool,
    /// Syncs of the directory make nothing durable (SQLite's and the layer's alike).
    pub forget_directory_syncs: bool,
}

/// Records one directory (see the module's docs).
pub struct Recorder {
    dir: PathBuf,
    dir_key: (u64, u64),
    faults: Faults,
    live: Mutex<Live>,
}

#[derive(Default)]
struct Live {
    log: Vec<Event>,
    /// The open files of the model by device and inode number.
    by_key: HashMap<(u64, u64), InodeId>,
    /// The names in the directory now.
    names: HashMap<String, InodeId>,
    /// Each file's length now.
    lens: HashMap<InodeId, u64>,
    next_inode: InodeId,
    /// Acknowledgements logged.
    acked: usize,
    /// What happened that the model cannot represent (the test fails on any).
    unmodelled: Vec<String>,
}

/// The recorders in use: every file operation of the process is checked against them.
static ACTIVE: RwLock<Vec<Arc<Recorder>>> = RwLock::new(Vec::new());

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key_of_path(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

impl Recorder {
    /// Starts recording `dir`, which must be empty, with `faults`.
    pub fn start(dir: &Path, faults: Faults) -> Arc<Self> {
        let dir = dir.canonicalize().unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "not empty");
        let recorder = Arc::new(Recorder {
            dir_key: key_of_path(&dir),
            dir,
            faults,
            live: Mutex::new(Live::default()),
        });
        ACTIVE
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(recorder.clone());
        recorder
    }

    /// The directory recorded (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops recording and returns the log.
    ///
    /// # Panics
    /// If anything happened that the model cannot represent.
    pub fn finish(self: &Arc<Self>) -> Vec<Event> {
        ACTIVE
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|r| !Arc::ptr_eq(r, self));
        let mut live = lock(&self.live);
        assert!(
            live.unmodelled.is_empty(),
            "the model missed file operations: {:?}",
            live.unmodelled
        );
        std::mem::take(&mut live.log)
    }

    /// Logs a mark of the workload.
    pub fn mark(&self, mark: Mark) {
        let mut live = lock(&self.live);
        live.acked += usize::from(matches!(mark, Mark::Ack(_)));
        live.log.push(Event::Mark(mark));
    }

    /// How many acknowledgements are logged so far.
    pub fn acked(&self) -> usize {
        lock(&self.live).acked
    }

    pub fn lies_about_syncs(&self) -> bool {
        self.faults.lie_about_syncs
    }

    /// A write of `data` at `offset`, made by `real` (which returns SQLite's result code)
    /// under the lock, so that the log's order is the files' order.
    pub fn write(
        &self,
        inode: InodeId,
        offset: u64,
        data: &[u8],
        real: impl FnOnce() -> std::ffi::c_int,
    ) -> std::ffi::c_int {
        let mut live = lock(&self.live);
        let rc = real();
        if rc == libsqlite3_sys::SQLITE_OK {
            live.log.push(Event::Write {
                inode,
                offset,
                data: data.into(),
            });
            let len = live.lens.entry(inode).or_default();
            *len = (*len).max(offset + data.len() as u64);
        }
        rc
    }

    /// A change of length made by `real`, which returns SQLite's result code and the new
    /// length, if known.
    pub fn set_len(
        &self,
        inode: InodeId,
        real: impl FnOnce() -> (std::ffi::c_int, Option<u64>),
    ) -> std::ffi::c_int {
        let mut live = lock(&self.live);
        let (rc, len) = real();
        if let Some(len) = len {
            if rc == libsqlite3_sys::SQLITE_OK && live.lens.get(&inode) != Some(&len) {
                live.log.push(Event::SetLen { inode, len });
                live.lens.insert(inode, len);
            }
        }
        rc
    }
}

fn recorder_of_dir(dir: &Path) -> Option<Arc<Recorder>> {
    ACTIVE
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|r| r.dir == dir)
        .cloned()
}

/// The recorder of `path`'s directory (named as given, else canonically) and its name there.
fn split(path: &Path) -> Option<(Arc<Recorder>, String)> {
    let parent = path.parent()?;
    let recorder = recorder_of_dir(parent).or_else(|| {
        let any = !ACTIVE
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        any.then(|| parent.canonicalize().ok())
            .flatten()
            .and_then(|parent| recorder_of_dir(&parent))
    })?;
    Some((recorder, path.file_name()?.to_str()?.to_owned()))
}

/// SQLite opened `path`: the file's recorder and inode, if it is in a recorded directory.
/// A file not seen before is new: the directory was empty when recording began, and only
/// SQLite's writes are expected in its files (one that has content already was written
/// some other way, which the model cannot represent).
pub fn opened(path: &Path) -> Option<(Arc<Recorder>, InodeId)> {
    let (recorder, name) = split(path)?;
    let key = key_of_path(path);
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    let inode = lock(&recorder.live).opened(name, key, len);
    Some((recorder, inode))
}

impl Live {
    fn opened(&mut self, name: String, key: (u64, u64), len: u64) -> InodeId {
        if let Some(&inode) = self.by_key.get(&key) {
            if self.names.get(&name) != Some(&inode) {
                self.unmodelled
                    .push(format!("{name} opened under a name the model lacks"));
            }
            return inode;
        }
        if self.names.contains_key(&name) {
            self.unmodelled
                .push(format!("{name} replaced without an unlink"));
        }
        if len > 0 {
            self.unmodelled
                .push(format!("{name} has {len} bytes not written by SQLite"));
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.by_key.insert(key, inode);
        self.names.insert(name.clone(), inode);
        self.lens.insert(inode, 0);
        self.log.push(Event::Create { name, inode });
        inode
    }
}

/// `path` was unlinked.
pub fn unlinked(path: &Path) {
    let Some((recorder, name)) = split(path) else {
        return;
    };
    let mut live = lock(&recorder.live);
    // A name the model never had (the -shm, the layer's -lock) is none of its business.
    let Some(inode) = live.names.remove(&name) else {
        return;
    };
    if !live.names.values().any(|&i| i == inode) {
        // Gone: its inode number may be given to a new file.
        live.by_key.retain(|_, i| *i != inode);
    }
    live.log.push(Event::Unlink { name });
}

/// `new` was linked to `old`'s file.
pub fn linked(old: &Path, new: &Path) {
    let Some((recorder, name)) = split(new) else {
        return;
    };
    let mut live = lock(&recorder.live);
    let inode = split(old).and_then(|(r, old)| {
        Arc::ptr_eq(&r, &recorder)
            .then(|| live.names.get(&old).copied())
            .flatten()
    });
    match inode {
        Some(inode) => {
            live.names.insert(name.clone(), inode);
            live.log.push(Event::Link { name, inode });
        }
        None => live
            .unmodelled
            .push(format!("{name} linked to a file the model lacks")),
    }
}

/// Something the model cannot represent happened to `path` (to some path, if `None`: every
/// recorder is told).
pub fn unmodelled(path: Option<&Path>, what: &str) {
    match path {
        Some(path) => {
            if let Some((recorder, name)) = split(path) {
                lock(&recorder.live)
                    .unmodelled
                    .push(format!("{name}: {what}"));
            }
        }
        None => {
            for recorder in ACTIVE.read().unwrap_or_else(PoisonError::into_inner).iter() {
                lock(&recorder.live).unmodelled.push(what.to_owned());
            }
        }
    }
}

/// A sync in progress of a file or directory of a recorder.
pub struct PendingSync {
    recorder: Arc<Recorder>,
    inode: Option<InodeId>,
    covers: usize,
}

/// A sync of the file or directory with device and inode `key` begins: what it covers is
/// what is logged now.
pub fn sync_begins(key: (u64, u64)) -> Option<PendingSync> {
    let active = ACTIVE.read().unwrap_or_else(PoisonError::into_inner);
    for recorder in active.iter() {
        let live = lock(&recorder.live);
        let inode = if key == recorder.dir_key {
            None
        } else if let Some(&inode) = live.by_key.get(&key) {
            Some(inode)
        } else {
            continue;
        };
        return Some(PendingSync {
            recorder: recorder.clone(),
            inode,
            covers: live.log.len(),
        });
    }
    None
}

impl PendingSync {
    /// The sync succeeded.
    pub fn done(self) {
        if self.inode.is_none() && self.recorder.faults.forget_directory_syncs {
            return;
        }
        let event = match self.inode {
            Some(inode) => Event::SyncFile {
                inode,
                covers: self.covers,
            },
            None => Event::SyncDir {
                covers: self.covers,
            },
        };
        lock(&self.recorder.live).log.push(event);
    }
}

// Content and images.

const CHUNK: usize = 4096;
/// The unit of a torn write.
pub const SECTOR: u64 = 512;

fn zero_chunk() -> Arc<[u8; CHUNK]> {
    static ZERO: OnceLock<Arc<[u8; CHUNK]>> = OnceLock::new();
    ZERO.get_or_init(|| Arc::new([0; CHUNK])).clone()
}

/// A file's bytes, in shared copy-on-write chunks: a crash image costs a copy of the
/// pointers, not of the file.
#[derive(Clone, Default)]
pub struct Content {
    len: u64,
    chunks: Vec<Arc<[u8; CHUNK]>>,
}

impl Content {
    pub fn len(&self) -> u64 {
        self.len
    }

    fn ensure(&mut self, len: u64) {
        let needed = (len as usize).div_ceil(CHUNK);
        while self.chunks.len() < needed {
            self.chunks.push(zero_chunk());
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        self.ensure(end);
        let mut at = offset as usize;
        let mut data = data;
        while !data.is_empty() {
            let (index, within) = (at / CHUNK, at % CHUNK);
            let n = data.len().min(CHUNK - within);
            Arc::make_mut(&mut self.chunks[index])[within..within + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            at += n;
        }
        self.len = self.len.max(end);
    }

    pub fn set_len(&mut self, len: u64) {
        if len < self.len {
            let keep = (len as usize).div_ceil(CHUNK);
            self.chunks.truncate(keep);
            let within = len as usize % CHUNK;
            if within != 0 {
                // What a later extension shows is zeros.
                Arc::make_mut(&mut self.chunks[keep - 1])[within..].fill(0);
            }
        } else {
            self.ensure(len);
        }
        self.len = len;
    }

    /// Writes the content to a new file at `path`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(path)?;
        let mut left = self.len as usize;
        for chunk in &self.chunks {
            let n = left.min(CHUNK);
            file.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    }

    /// Whether `self` and `other` are the same bytes by construction (shared chunks).
    pub fn same_as(&self, other: &Content) -> bool {
        self.len == other.len
            && self
                .chunks
                .iter()
                .zip(&other.chunks)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

#[derive(Clone)]
enum FileOp {
    Write { offset: u64, data: Arc<[u8]> },
    SetLen(u64),
}

#[derive(Clone, Default)]
struct File {
    durable: Content,
    /// Operations since the last sync, with their log positions.
    pending: Vec<(usize, FileOp)>,
}

#[derive(Clone)]
enum DirOp {
    Create(String, InodeId),
    Unlink(String),
}

/// What the workload had done and been told at a crash.
#[derive(Clone, Default)]
pub struct Facts {
    /// The workload's phase.
    pub phase: &'static str,
    /// Acknowledged sequence numbers, in order of acknowledgement.
    pub acked: Vec<u64>,
    /// The highest sequence number any write had taken.
    pub attempted: u64,
    pub migrations_acked: bool,
    /// Backups begun: file name and how many acknowledgements came before.
    pub backups_started: Vec<(String, usize)>,
    /// Backups whose `backup_to` returned Ok.
    pub backups_done: Vec<String>,
    /// Acknowledgements since the last sync of `-wal` (or of any file, without one).
    pub acked_since_wal_sync: usize,
    /// Whether the database file had unsynced writes (under WAL: a checkpoint under way).
    pub database_unsynced: bool,
    /// Whether a backup was under way.
    pub in_backup: bool,
}

/// The state at one crash position, before the random choices.
pub struct Crash {
    /// The log position: everything before it happened.
    pub at: usize,
    pub facts: Facts,
    durable_names: BTreeMap<String, InodeId>,
    pending_names: Vec<DirOp>,
    files: HashMap<InodeId, File>,
}

/// How a crash image treats what was not synced.
#[derive(Clone, Copy, Debug)]
pub struct Fates {
    /// Chance that an unsynced name operation reached the disk.
    pub names: f64,
    /// Chance that an unsynced write or truncation reached the disk whole.
    pub whole: f64,
    /// Chance that one not whole is torn (some of its sectors new), else lost.
    pub torn: f64,
    /// Whether a torn sector may hold random bytes.
    pub garbage: bool,
    /// Chance that a file keeps the length of a lost write beyond its end, zero-filled.
    pub length: f64,
}

impl Fates {
    /// One of a spread of treatments: all kept, all lost, and mixtures.
    pub fn random(rng: &mut SmallRng) -> Self {
        const WHOLE: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];
        const NAMES: [f64; 4] = [0.0, 0.5, 0.9, 1.0];
        Fates {
            names: NAMES[rng.random_range(0..NAMES.len())],
            whole: WHOLE[rng.random_range(0..WHOLE.len())],
            torn: 0.5,
            garbage: rng.random_bool(0.5),
            length: 0.3,
        }
    }
}

impl Crash {
    /// The files a power loss here could leave, by name, with the fates drawn from `rng`.
    pub fn image(&self, fates: Fates, rng: &mut SmallRng) -> Vec<(String, Content)> {
        let mut names = self.durable_names.clone();
        for op in &self.pending_names {
            if rng.random_bool(fates.names) {
                match op {
                    DirOp::Create(name, inode) => {
                        names.insert(name.clone(), *inode);
                    }
                    DirOp::Unlink(name) => {
                        names.remove(name);
                    }
                }
            }
        }
        let mut contents: HashMap<InodeId, Content> = HashMap::new();
        let mut image = Vec::new();
        for (name, inode) in names {
            let content = contents
                .entry(inode)
                .or_insert_with(|| match self.files.get(&inode) {
                    Some(file) => after_crash(file, fates, rng),
                    None => Content::default(),
                })
                .clone();
            image.push((name, content));
        }
        image
    }
}

/// A file's content after a power loss: its durable content, then each unsynced operation
/// kept, lost or torn.
fn after_crash(file: &File, fates: Fates, rng: &mut SmallRng) -> Content {
    let mut content = file.durable.clone();
    let mut lost_end = 0;
    for (_, op) in &file.pending {
        match op {
            FileOp::SetLen(len) => {
                if rng.random_bool(fates.whole) {
                    content.set_len(*len);
                }
            }
            FileOp::Write { offset, data } => {
                let end = offset + data.len() as u64;
                if rng.random_bool(fates.whole) {
                    content.write(*offset, data);
                    continue;
                }
                if end > content.len() {
                    lost_end = lost_end.max(end);
                }
                if !rng.random_bool(fates.torn) {
                    continue;
                }
                // Torn: sector by sector (absolute sectors), within the bytes written.
                let mut at = *offset;
                while at < end {
                    let sector_end = ((at / SECTOR) + 1) * SECTOR;
                    let piece_end = sector_end.min(end);
                    let piece = &data[(at - offset) as usize..(piece_end - offset) as usize];
                    match rng.random_range(0..10) {
                        0..5 => content.write(at, piece),
                        5..9 => {}
                        _ if fates.garbage => {
                            let noise: Vec<u8> = (0..piece.len()).map(|_| rng.random()).collect();
                            content.write(at, &noise);
                        }
                        _ => {}
                    }
                    at = piece_end;
                }
            }
        }
    }
    if lost_end > content.len() && rng.random_bool(fates.length) {
        content.set_len(lost_end);
    }
    content
}

/// Replays `log` and hands `crash` the crash at each position of `at` in turn (sorted,
/// each at most the log's length: position p means "after the first p events"), as the
/// replay reaches it: only the crashes not yet checked are held.
pub fn cut(log: &[Event], at: &[usize], mut crash: impl FnMut(Crash)) {
    let mut durable_names: BTreeMap<String, InodeId> = BTreeMap::new();
    let mut pending_names: Vec<(usize, DirOp)> = Vec::new();
    let mut files: HashMap<InodeId, File> = HashMap::new();
    let mut current_names: HashMap<String, InodeId> = HashMap::new();
    let mut facts = Facts {
        phase: "start",
        ..Facts::default()
    };
    let mut in_backup = 0usize;
    // Log positions of the acknowledgements, and from where the last sync of `-wal` (of
    // any file, without a `-wal`) left writes unsynced.
    let mut ack_positions: Vec<usize> = Vec::new();
    let mut unsynced_from = 0usize;
    let mut next = at.iter().copied().peekable();
    for position in 0..=log.len() {
        while next.peek() == Some(&position) {
            next.next();
            // Only the files that a name can still lead to.
            let mut reachable: Vec<InodeId> = durable_names.values().copied().collect();
            reachable.extend(pending_names.iter().filter_map(|(_, op)| match op {
                DirOp::Create(_, inode) => Some(*inode),
                DirOp::Unlink(_) => None,
            }));
            let database = current_names.get("app.db");
            let mut facts = facts.clone();
            facts.database_unsynced = database
                .and_then(|inode| files.get(inode))
                .is_some_and(|f| !f.pending.is_empty());
            facts.in_backup = in_backup > 0;
            facts.acked_since_wal_sync =
                ack_positions.len() - ack_positions.partition_point(|&p| p < unsynced_from);
            crash(Crash {
                at: position,
                facts,
                durable_names: durable_names.clone(),
                pending_names: pending_names.iter().map(|(_, op)| op.clone()).collect(),
                files: reachable
                    .into_iter()
                    .filter_map(|inode| Some((inode, files.get(&inode)?.clone())))
                    .collect(),
            });
        }
        let Some(event) = log.get(position) else {
            break;
        };
        match event {
            Event::Create { name, inode } => {
                files.entry(*inode).or_default();
                current_names.insert(name.clone(), *inode);
                pending_names.push((position, DirOp::Create(name.clone(), *inode)));
            }
            Event::Link { name, inode } => {
                current_names.insert(name.clone(), *inode);
                pending_names.push((position, DirOp::Create(name.clone(), *inode)));
            }
            Event::Unlink { name } => {
                current_names.remove(name);
                pending_names.push((position, DirOp::Unlink(name.clone())));
            }
            Event::Write {
                inode,
                offset,
                data,
            } => files.entry(*inode).or_default().pending.push((
                position,
                FileOp::Write {
                    offset: *offset,
                    data: data.clone(),
                },
            )),
            Event::SetLen { inode, len } => files
                .entry(*inode)
                .or_default()
                .pending
                .push((position, FileOp::SetLen(*len))),
            Event::SyncFile { inode, covers } => {
                let file = files.entry(*inode).or_default();
                let done = file.pending.partition_point(|(p, _)| p < covers);
                for (_, op) in file.pending.drain(..done) {
                    match op {
                        FileOp::Write { offset, data } => file.durable.write(offset, &data),
                        FileOp::SetLen(len) => file.durable.set_len(len),
                    }
                }
                let is_wal = current_names
                    .iter()
                    .any(|(name, i)| i == inode && name == "app.db-wal");
                let has_wal = current_names.contains_key("app.db-wal");
                if is_wal || !has_wal {
                    unsynced_from = unsynced_from.max(*covers);
                }
            }
            Event::SyncDir { covers } => {
                let done = pending_names.partition_point(|(p, _)| p < covers);
                for (_, op) in pending_names.drain(..done) {
                    match op {
                        DirOp::Create(name, inode) => {
                            durable_names.insert(name, inode);
                        }
                        DirOp::Unlink(name) => {
                            durable_names.remove(&name);
                        }
                    }
                }
            }
            Event::Mark(mark) => match mark {
                Mark::Phase(phase) => facts.phase = phase,
                Mark::Attempt(seq) => facts.attempted = facts.attempted.max(*seq),
                Mark::Ack(seq) => {
                    facts.acked.push(*seq);
                    ack_positions.push(position);
                }
                Mark::MigrationsAcked => facts.migrations_acked = true,
                Mark::BackupStarted { name, acked } => {
                    in_backup += 1;
                    facts.backups_started.push((name.clone(), *acked));
                }
                Mark::BackupDone { name } => {
                    in_backup -= 1;
                    facts.backups_done.push(name.clone());
                }
            },
        }
    }
}
