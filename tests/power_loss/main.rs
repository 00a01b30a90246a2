//! Power loss: under WAL, `Synchronous::Full` keeps every acknowledged write and `Normal`
//! never leaves a corrupt file and loses only the last transactions; a rollback journal
//! keeps every acknowledged write with `Extra`; a backup is complete or absent. Shown the way
//! SQLite's own crash tests show it, over thousands of simulated power losses.
//!
//! A workload runs through the layer on a directory whose every write, truncation, sync,
//! creation, hard link and unlink is recorded (`vfs`: a shim VFS registered as SQLite's
//! default, and the process's own `fsync`, `fdatasync`, `unlink` and `linkat`; `model`: the
//! log): the first open applies the migration batch, a second handle opens beside it, four
//! writers (two per handle) each commit a counter, an event with a sequence number (taken
//! under the write lock: sequence order is commit order), sometimes a padding row of up to
//! 6000 bytes or deletions; three backups are taken meanwhile; the layer checkpoints (at
//! 1000 frames); both handles close (the last one checkpoints and deletes `-wal`); a third
//! opens, writes, checkpoints with TRUNCATE under WAL, writes and closes.
//! With group commit (`Options::group_commit`), sixteen writers instead of four share the
//! transactions and syncs of their handle's writes.
//!
//! Crash images are then cut from the log at random positions, stratified: during the
//! migrations, during backups, while closing and reopening, while the database file has
//! unsynced writes (a checkpoint under way), right after an acknowledgement, right before
//! and after a sync, and anywhere. An image holds what was synced, and of what was not a
//! random part, kept, lost or torn at 512-byte sectors; names created or deleted since the
//! directory's last sync are there or not (`model` has the rules). Each image is opened
//! through the layer and must pass `integrity_check`; its transactions must be a prefix of
//! the commit order (none present that was never attempted or was rolled back, none missing
//! before one present), each counter must equal its events, the padding rows must be exactly
//! those of the transactions present, byte for byte. Under FULL (and EXTRA) every write
//! acknowledged before the crash must be there, and the migrations once the open that
//! applied them returned; under NORMAL the writes lost are counted, and must all have been
//! acknowledged after the last sync of `-wal`. A backup that is there must open through the
//! layer, pass the same checks and hold every write acknowledged before it began; one that
//! `backup_to` had finished must be there.
//!
//! Not modelled: renames (neither SQLite nor the layer renames a file of the database), the
//! `-shm` (left out of every image: SQLite rebuilds it, as after a real power loss) and the
//! layer's `-lock` (its own, never needed for correctness; a new one is made), metadata
//! other than length (modes, owners, times), I/O errors, and other processes (the shim is
//! this process's; two handles with their own pools stand in for them). Unsynced writes of
//! different files are independent: nothing orders them, which is the strict choice.
//! Anything done to a recorded file that the model cannot represent (content not written
//! through SQLite, a link to an unknown file) fails the test.
//!
//! `POWER_LOSS_SEED` replays a run's random choices (the workload's threads interleave as
//! they will, so the crash positions fall on a log of the same shape, not the same log; a
//! failing image is kept, its path printed, with its position and fates);
//! `POWER_LOSS_CRASHES` sets the number of crash images of each scenario
//! (`scripts/power_loss.sh` runs many); `POWER_LOSS_DUMP=SCENARIO:FROM:TO` prints part of a
//! scenario's log.
#![cfg(target_os = "linux")]

#[path = "../common/mod.rs"]
mod common;
mod model;
mod vfs;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sqlite_persistence::{Database, JournalMode, Options, Synchronous};

use common::schema::{counters, events};
use common::MIGRATIONS;
use model::{Content, Crash, Event, Fates, Faults, Mark, Recorder};

/// One run: how the layer is set up, how much the workload does, how many crashes.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    journal: JournalMode,
    synchronous: Synchronous,
    /// Syncs made to go missing (to show the harness finds what they keep).
    faults: Faults,
    /// Writer threads, alternating between two handles.
    writers: usize,
    /// Writes per writer.
    writes: usize,
    /// Backups taken while the writers write.
    backups: usize,
    /// Crash images.
    crashes: usize,
    /// Whether failing images are kept for a look (not where failures are expected).
    keep_failures: bool,
    /// `Options::group_commit`: the writers of a handle share transactions and syncs.
    group_commit: bool,
}

impl Scenario {
    fn options(&self) -> Options {
        Options::new()
            .journal_mode(self.journal)
            .synchronous(self.synchronous)
            .group_commit(self.group_commit)
    }

    /// Whether an acknowledged write must survive.
    fn durable(&self) -> bool {
        matches!(self.synchronous, Synchronous::Full | Synchronous::Extra)
    }
}

/// The seed of this run's random choices: `POWER_LOSS_SEED`, else a fresh one.
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("POWER_LOSS_SEED") {
        Ok(seed) => seed.parse().expect("POWER_LOSS_SEED is a number"),
        Err(_) => SmallRng::from_os_rng().random(),
    })
}

/// `POWER_LOSS_CRASHES`, else `default`.
fn crashes(default: usize) -> usize {
    std::env::var("POWER_LOSS_CRASHES").map_or(default, |n| {
        n.parse().expect("POWER_LOSS_CRASHES is a number")
    })
}

/// A fresh directory on a memory filesystem where there is one (syncs cost nothing there;
/// the model, not the disk, decides what a sync made durable).
fn scratch(prefix: &str) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix(prefix).tempdir_in(shm);
    match builder {
        Ok(dir) if shm.is_dir() => dir,
        _ => tempfile::Builder::new().prefix(prefix).tempdir().unwrap(),
    }
}

// The workload.

/// The padding row a transaction with sequence number `seq` inserts (every third one), of a
/// length from none to past one page (an overflow chain), its bytes a function of `seq`:
/// a torn page inside a row that `integrity_check` passes still shows here.
fn pad(seq: u64) -> String {
    let len = (seq * 7919 % 6000) as usize;
    let mut state = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut name = format!("p{seq}:");
    name.extend((0..len).map(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        char::from(b'a' + (state % 26) as u8)
    }));
    name
}

/// Whether the transaction `deleter` deletes the padding row of `seq` (every seventh one
/// deletes those 30 to 60 before it: pages are freed and reused).
fn deletes(deleter: u64, seq: u64) -> bool {
    deleter.is_multiple_of(7) && seq + 30 <= deleter && deleter <= seq + 60
}

/// The workload's shared state.
struct Work<'a> {
    recorder: &'a Recorder,
    next_seq: AtomicU64,
    rolled_back: Mutex<HashSet<u64>>,
}

impl Work<'_> {
    /// One write transaction for writer `writer`: its counter up by one, an event row with
    /// a new sequence number, sometimes a padding row or deletions. Returns the sequence
    /// number, acknowledged.
    fn write(&self, db: &Database, writer: usize) -> u64 {
        let counter = format!("w{writer}");
        let mut tried = Vec::new();
        let seq = db
            .write(|conn| -> sqlite_persistence::Result<u64> {
                // Taken under the write lock: sequence order is commit order.
                let seq = self.next_seq.fetch_add(1, Ordering::SeqCst) + 1;
                tried.push(seq);
                self.recorder.mark(Mark::Attempt(seq));
                diesel::insert_into(counters::table)
                    .values(counters::name.eq(&counter))
                    .on_conflict_do_nothing()
                    .execute(conn)?;
                diesel::update(counters::table.find(&counter))
                    .set(counters::value.eq(counters::value + 1))
                    .execute(conn)?;
                diesel::insert_into(events::table)
                    .values((events::counter.eq(&counter), events::value.eq(seq as i64)))
                    .execute(conn)?;
                if seq.is_multiple_of(3) {
                    diesel::insert_into(counters::table)
                        .values((counters::name.eq(pad(seq)), counters::value.eq(seq as i64)))
                        .execute(conn)?;
                }
                if seq.is_multiple_of(7) {
                    diesel::sql_query(
                        "DELETE FROM counters WHERE substr(name, 1, 1) = 'p' \
                         AND value BETWEEN ? - 60 AND ? - 30",
                    )
                    .bind::<BigInt, _>(seq as i64)
                    .bind::<BigInt, _>(seq as i64)
                    .execute(conn)?;
                }
                Ok(seq)
            })
            .unwrap();
        self.recorder.mark(Mark::Ack(seq));
        let mut rolled_back = self.rolled_back.lock().unwrap();
        rolled_back.extend(tried.into_iter().filter(|&s| s != seq));
        seq
    }
}

/// What a run left for the checks.
struct Run {
    log: Vec<Event>,
    rolled_back: HashSet<u64>,
}

/// Runs the workload of `scenario` in `dir` (recorded) and returns its log.
fn run(scenario: &Scenario, dir: &Path) -> Run {
    vfs::install();
    let recorder = Recorder::start(dir, scenario.faults);
    let path = recorder.dir().join("app.db");
    let options = scenario.options();
    let work = Work {
        recorder: &recorder,
        next_seq: AtomicU64::new(0),
        rolled_back: Mutex::new(HashSet::new()),
    };
    recorder.mark(Mark::Phase("migrate"));
    let first = options.clone().open(&path, MIGRATIONS).unwrap();
    assert_eq!(first.applied_at_open().len(), common::VERSIONS.len());
    recorder.mark(Mark::MigrationsAcked);
    let second = options.clone().open(&path, MIGRATIONS).unwrap();
    recorder.mark(Mark::Phase("write"));
    let total = scenario.writers * scenario.writes;
    std::thread::scope(|s| {
        for writer in 0..scenario.writers {
            let db = if writer % 2 == 0 { &first } else { &second };
            let work = &work;
            s.spawn(move || {
                for _ in 0..scenario.writes {
                    work.write(db, writer);
                }
            });
        }
        let (work, first, path) = (&work, &first, &path);
        s.spawn(move || {
            for n in 0..scenario.backups {
                // Spread over the writes; bounded: the writers end.
                let due = total * (n + 1) / (scenario.backups + 1);
                let start = Instant::now();
                while work.recorder.acked() < due && start.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let name = format!("backup-{n}.db");
                work.recorder.mark(Mark::BackupStarted {
                    name: name.clone(),
                    acked: work.recorder.acked(),
                });
                first.backup_to(path.with_file_name(&name)).unwrap();
                work.recorder.mark(Mark::BackupDone { name });
            }
        });
    });
    recorder.mark(Mark::Phase("close"));
    second.close().unwrap();
    first.close().unwrap();
    recorder.mark(Mark::Phase("reopen"));
    let again = options.open(&path, MIGRATIONS).unwrap();
    assert!(again.applied_at_open().is_empty());
    for i in 0..30 {
        work.write(&again, i % 2);
    }
    if scenario.journal == JournalMode::Wal {
        // The WAL cut back to nothing: a truncation, then writes from the start again.
        again
            .connection()
            .unwrap()
            .batch_execute("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        for i in 0..10 {
            work.write(&again, i % 2);
        }
    }
    recorder.mark(Mark::Phase("close again"));
    again.close().unwrap();
    let rolled_back = std::mem::take(&mut *work.rolled_back.lock().unwrap());
    Run {
        log: recorder.finish(),
        rolled_back,
    }
}

// Where to crash.

/// `n` crash positions in `log`, sorted: a share in each part of the workload (migrations,
/// backups under way, closing and reopening), while the database file has unsynced writes
/// (under WAL: a checkpoint under way), right after acknowledgements, right before and after
/// syncs, and anywhere.
fn positions(log: &[Event], n: usize, rng: &mut SmallRng) -> Vec<usize> {
    let mut phase = "start";
    let mut backups = 0usize;
    let mut database = None;
    let mut database_unsynced = false;
    let (mut migrate, mut backup, mut closing) = (vec![], vec![], vec![]);
    let (mut unsynced, mut after_ack, mut around_sync) = (vec![], vec![], vec![]);
    for (i, event) in log.iter().enumerate() {
        match event {
            Event::Mark(Mark::Phase(p)) => phase = p,
            Event::Mark(Mark::BackupStarted { .. }) => backups += 1,
            Event::Mark(Mark::BackupDone { .. }) => backups -= 1,
            Event::Mark(Mark::Ack(_)) => after_ack.push(i + 1),
            Event::Create { name, inode } if name == "app.db" => database = Some(*inode),
            Event::Write { inode, .. } if Some(*inode) == database => database_unsynced = true,
            Event::SyncFile { inode, .. } | Event::SetLen { inode, .. }
                if Some(*inode) == database =>
            {
                database_unsynced = matches!(event, Event::SetLen { .. });
                around_sync.extend([i, i + 1]);
            }
            Event::SyncFile { .. } | Event::SyncDir { .. } => around_sync.extend([i, i + 1]),
            _ => {}
        }
        if database_unsynced {
            unsynced.push(i + 1);
        }
        match phase {
            "migrate" => migrate.push(i + 1),
            "close" | "reopen" | "close again" => closing.push(i + 1),
            _ if backups > 0 => backup.push(i + 1),
            _ => {}
        }
    }
    let anywhere: Vec<usize> = (0..=log.len()).collect();
    let shares: [(&Vec<usize>, usize); 7] = [
        (&migrate, 15),
        (&backup, 15),
        (&closing, 10),
        (&unsynced, 10),
        (&after_ack, 15),
        (&around_sync, 15),
        (&anywhere, 20),
    ];
    let mut at = Vec::with_capacity(n);
    for (i, (pool, share)) in shares.iter().enumerate() {
        let count = if i == shares.len() - 1 {
            n - at.len()
        } else {
            n * share / 100
        };
        let pool = if pool.is_empty() { &anywhere } else { pool };
        at.extend((0..count).map(|_| pool[rng.random_range(0..pool.len())]));
    }
    at.sort_unstable();
    at
}

// The checks.

#[derive(QueryableByName)]
struct Check {
    #[diesel(sql_type = Text)]
    integrity_check: String,
}

/// What one database in an image held.
struct Held {
    /// Event sequence numbers.
    events: Vec<u64>,
    /// Migrations the layer applied when opening it.
    applied: usize,
}

/// Opens `path` through the layer and checks it: `integrity_check`, each writer's counter
/// equal to its events, the padding rows exactly those of the transactions present, and no
/// transaction present that was never attempted, rolled back, or committed after one that
/// is missing (the transactions present are a prefix of the commit order).
fn check_database(
    path: &Path,
    options: &Options,
    attempted: u64,
    rolled_back: &HashSet<u64>,
) -> Result<Held, String> {
    let db = options
        .clone()
        .open(path, MIGRATIONS)
        .map_err(|e| format!("corrupt: the layer refuses it: {}", common::chain(&e)))?;
    let applied = db.applied_at_open().len();
    let (integrity, mut events, counters) = db
        .read(|conn| -> sqlite_persistence::Result<_> {
            let integrity: Vec<String> = diesel::sql_query("PRAGMA integrity_check")
                .load::<Check>(conn)?
                .into_iter()
                .map(|c| c.integrity_check)
                .collect();
            let events: Vec<(String, i64)> = events::table
                .select((events::counter, events::value))
                .load(conn)?;
            let counters: Vec<(String, i64)> = counters::table
                .select((counters::name, counters::value))
                .load(conn)?;
            Ok((integrity, events, counters))
        })
        .map_err(|e| format!("corrupt: reading it fails: {}", common::chain(&e)))?;
    db.close().map_err(|e| format!("closing: {e}"))?;
    if integrity != ["ok"] {
        return Err(format!(
            "corrupt: integrity_check: {}",
            integrity.join("; ")
        ));
    }
    events.sort_by_key(|(_, seq)| *seq);
    let seqs: Vec<u64> = events.iter().map(|(_, s)| *s as u64).collect();
    let present: HashSet<u64> = seqs.iter().copied().collect();
    if let Some(s) = seqs
        .iter()
        .find(|s| **s > attempted || rolled_back.contains(s))
    {
        return Err(format!("transaction {s} is there but never committed"));
    }
    let last = seqs.last().copied().unwrap_or(0);
    if let Some(missing) = (1..last).find(|s| !present.contains(s) && !rolled_back.contains(s)) {
        return Err(format!(
            "transaction {missing} is missing but {last}, committed after it, is there"
        ));
    }
    let mut per_writer: std::collections::BTreeMap<&str, i64> = Default::default();
    for (counter, _) in &events {
        *per_writer.entry(counter).or_default() += 1;
    }
    let mut pads = Vec::new();
    for (name, value) in &counters {
        if name.starts_with('w') {
            let count = per_writer.remove(name.as_str()).unwrap_or(0);
            if *value != count {
                return Err(format!("counter {name} is {value} with {count} events"));
            }
        } else if *name != pad(*value as u64) {
            return Err(format!("padding row {value} holds other bytes"));
        } else {
            pads.push(*value as u64);
        }
    }
    if let Some((counter, _)) = per_writer.into_iter().next() {
        return Err(format!("events of a counter {counter} that is missing"));
    }
    pads.sort_unstable();
    let expected: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|&s| {
            s.is_multiple_of(3) && !(s + 30..=s + 60).any(|d| deletes(d, s) && present.contains(&d))
        })
        .collect();
    if pads != expected {
        return Err(format!(
            "padding rows {pads:?} where the transactions present leave {expected:?}"
        ));
    }
    Ok(Held {
        events: seqs,
        applied,
    })
}

/// What one crash image showed.
#[derive(Default)]
struct Verdict {
    /// Acknowledged writes missing from the database.
    lost: usize,
    /// Writes acknowledged since the last sync of `-wal`.
    unsynced: usize,
    /// A check failed: what.
    failure: Option<String>,
    /// Backups checked in it (not counting ones checked before, byte-identical).
    backups_checked: usize,
    /// Backups that `backup_to` had finished, missing from it.
    backups_lost: usize,
}

/// Backups already checked, by content: one fully synced is the same in every image.
type CheckedBackups = Mutex<Vec<Content>>;

/// Writes `image` to `dir` and checks it against `crash`.
fn check_image(
    scenario: &Scenario,
    crash: &Crash,
    image: &[(String, Content)],
    dir: &Path,
    run: &Run,
    checked: &CheckedBackups,
) -> Verdict {
    let mut verdict = Verdict::default();
    for (name, content) in image {
        content.save(&dir.join(name)).unwrap();
    }
    let facts = &crash.facts;
    let options = scenario.options();
    let fail = |verdict: &mut Verdict, what: String| {
        verdict.failure.get_or_insert(what);
    };
    match check_database(
        &dir.join("app.db"),
        &options,
        facts.attempted,
        &run.rolled_back,
    ) {
        Err(e) => fail(&mut verdict, e),
        Ok(held) => {
            let present: HashSet<u64> = held.events.iter().copied().collect();
            let lost: Vec<u64> = facts
                .acked
                .iter()
                .copied()
                .filter(|s| !present.contains(s))
                .collect();
            verdict.lost = lost.len();
            verdict.unsynced = facts.acked_since_wal_sync;
            if scenario.durable() && !lost.is_empty() {
                fail(&mut verdict, format!("acknowledged writes lost: {lost:?}"));
            }
            if scenario.durable() && facts.migrations_acked && held.applied > 0 {
                fail(&mut verdict, "the acknowledged migrations were lost".into());
            }
            if scenario.journal == JournalMode::Wal && lost.len() > facts.acked_since_wal_sync {
                fail(
                    &mut verdict,
                    format!(
                        "{} acknowledged writes lost, but only {} came after the last sync",
                        lost.len(),
                        facts.acked_since_wal_sync
                    ),
                );
            }
        }
    }
    for (name, acked) in &facts.backups_started {
        let content = image.iter().find(|(n, _)| n == name).map(|(_, c)| c);
        let Some(content) = content else {
            if facts.backups_done.contains(name) {
                verdict.backups_lost += 1;
                fail(&mut verdict, format!("{name}: finished, then lost"));
            }
            continue;
        };
        if lock_checked(checked).iter().any(|c| c.same_as(content)) {
            continue;
        }
        verdict.backups_checked += 1;
        let path = dir.join(name);
        match check_database(&path, &options, facts.attempted, &run.rolled_back) {
            Err(e) => fail(&mut verdict, format!("{name}: {e}")),
            Ok(held) => {
                let present: HashSet<u64> = held.events.iter().copied().collect();
                let missing: Vec<u64> = facts.acked[..*acked]
                    .iter()
                    .copied()
                    .filter(|s| !present.contains(s))
                    .collect();
                if !missing.is_empty() {
                    fail(
                        &mut verdict,
                        format!("{name}: writes acknowledged before it began missing: {missing:?}"),
                    );
                } else if held.applied > 0 {
                    fail(&mut verdict, format!("{name}: its migrations are missing"));
                } else {
                    lock_checked(checked).push(content.clone());
                }
            }
        }
    }
    verdict
}

fn lock_checked(checked: &CheckedBackups) -> std::sync::MutexGuard<'_, Vec<Content>> {
    checked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The counts of a scenario's crashes.
#[derive(Default, Debug)]
struct Report {
    /// The workload's log: events, writes, syncs of a file, of the directory, and of the
    /// database file (under WAL, each a checkpoint's).
    log_events: usize,
    writes: usize,
    /// Writes acknowledged, and syncs of `-wal` (under WAL and FULL one a commit, and one
    /// a checkpoint, unless commits share them: group commit).
    acks: usize,
    wal_syncs: usize,
    file_syncs: usize,
    directory_syncs: usize,
    database_syncs: usize,
    crashes: usize,
    failed: usize,
    corrupt: usize,
    /// Crashes that lost acknowledged writes, the writes lost in all, the most in one, and
    /// the crashes that lost every write acknowledged since the last sync of `-wal` (the
    /// others lost fewer: the most recent of them).
    lossy: usize,
    lost: usize,
    most_lost: usize,
    lost_all_unsynced: usize,
    backups_checked: usize,
    backups_lost: usize,
    /// Where the crashes fell.
    in_migrations: usize,
    in_backups: usize,
    in_checkpoints: usize,
    closing: usize,
    failures: Vec<String>,
}

/// Cuts `scenario.crashes` images from `run`'s log and checks each, on as many threads as
/// there are cores.
fn check_crashes(scenario: &Scenario, run: &Run) -> Report {
    let run_seed = seed();
    let seed = run_seed ^ fxhash(scenario.name);
    let mut rng = SmallRng::seed_from_u64(seed);
    let at = positions(&run.log, scenario.crashes, &mut rng);
    let images = scratch("power-loss-images-");
    let report = Mutex::new(Report::default());
    let checked = CheckedBackups::default();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    // The replay hands the crashes over as it reaches them, a few ahead of the checks.
    let (send, receive) = std::sync::mpsc::sync_channel::<(usize, Crash)>(2 * threads);
    // Each check holds the receiver: if every one of them fails (panics), the replay's
    // sends fail and it runs to its end instead of waiting for them.
    let receive = std::sync::Arc::new(Mutex::new(receive));
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut index = 0;
            model::cut(&run.log, &at, |crash| {
                let _ = send.send((index, crash));
                index += 1;
            });
            drop(send);
        });
        for _ in 0..threads {
            let receive = receive.clone();
            let (report, checked, images) = (&report, &checked, &images);
            s.spawn(move || loop {
                let next = receive
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .recv();
                let Ok((index, crash)) = next else {
                    break;
                };
                let crash = &crash;
                let mut rng = SmallRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37));
                let fates = Fates::random(&mut rng);
                let image = crash.image(fates, &mut rng);
                let dir = images.path().join(format!("crash-{index}"));
                std::fs::create_dir(&dir).unwrap();
                let verdict = check_image(scenario, crash, &image, &dir, run, checked);
                let mut report = report.lock().unwrap();
                let facts = &crash.facts;
                report.crashes += 1;
                report.backups_checked += verdict.backups_checked;
                report.backups_lost += verdict.backups_lost;
                report.in_migrations += usize::from(facts.phase == "migrate");
                report.in_backups += usize::from(facts.in_backup);
                report.in_checkpoints +=
                    usize::from(facts.database_unsynced && scenario.journal == JournalMode::Wal);
                report.closing +=
                    usize::from(matches!(facts.phase, "close" | "reopen" | "close again"));
                if verdict.lost > 0 {
                    report.lossy += 1;
                    report.lost += verdict.lost;
                    report.most_lost = report.most_lost.max(verdict.lost);
                    report.lost_all_unsynced += usize::from(verdict.lost == verdict.unsynced);
                }
                match verdict.failure {
                    None => {
                        drop(report);
                        std::fs::remove_dir_all(&dir).unwrap();
                    }
                    Some(failure) => {
                        report.failed += 1;
                        report.corrupt += usize::from(failure.contains("corrupt"));
                        if report.failures.len() < 5 {
                            let kept = if scenario.keep_failures {
                                let kept = std::env::temp_dir().join(format!(
                                    "power-loss-{run_seed}-{}-{index}",
                                    scenario.name
                                ));
                                let _ = std::fs::remove_dir_all(&kept);
                                copy_dir(&dir, &kept);
                                format!("image kept in {}", kept.display())
                            } else {
                                "image not kept".to_owned()
                            };
                            report.failures.push(format!(
                                "crash {index} at log position {} (phase {}, {fates:?}): \
                                 {failure}; {kept}",
                                crash.at, facts.phase,
                            ));
                        }
                        drop(report);
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            });
        }
        drop(receive);
    });
    report.into_inner().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
    }
}

/// A stable hash of a name (the seed of each scenario's choices).
fn fxhash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// With `POWER_LOSS_DUMP=SCENARIO:FROM:TO`, prints that part of the scenario's log (to read
/// a kept image's crash position against).
fn dump(scenario: &Scenario, log: &[Event]) {
    let Ok(spec) = std::env::var("POWER_LOSS_DUMP") else {
        return;
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let [name, from, to] = parts[..] else {
        panic!("POWER_LOSS_DUMP is SCENARIO:FROM:TO");
    };
    if name != scenario.name {
        return;
    }
    let (from, to): (usize, usize) = (from.parse().unwrap(), to.parse().unwrap());
    for (i, event) in log.iter().enumerate().take(to).skip(from) {
        match event {
            Event::Write {
                inode,
                offset,
                data,
            } => eprintln!(
                "{i}: Write {{ inode: {inode}, offset: {offset}, len: {}, first: {:?} }}",
                data.len(),
                &data[..data.len().min(16)]
            ),
            event => eprintln!("{i}: {event:?}"),
        }
    }
}

/// Runs `scenario` and checks its crashes; prints the report.
fn power_losses(scenario: Scenario) -> Report {
    let started = Instant::now();
    let dir = scratch("power-loss-");
    let run = run(&scenario, dir.path());
    let ran = started.elapsed();
    dump(&scenario, &run.log);
    let mut report = check_crashes(&scenario, &run);
    report.log_events = run.log.len();
    let database = run.log.iter().find_map(|e| match e {
        Event::Create { name, inode } if name == "app.db" => Some(*inode),
        _ => None,
    });
    let wal: HashSet<_> = run
        .log
        .iter()
        .filter_map(|e| match e {
            Event::Create { name, inode } if name == "app.db-wal" => Some(*inode),
            _ => None,
        })
        .collect();
    for event in &run.log {
        match event {
            Event::Write { .. } => report.writes += 1,
            Event::Mark(Mark::Ack(_)) => report.acks += 1,
            Event::SyncFile { inode, .. } => {
                report.file_syncs += 1;
                report.database_syncs += usize::from(Some(*inode) == database);
                report.wal_syncs += usize::from(wal.contains(inode));
            }
            Event::SyncDir { .. } => report.directory_syncs += 1,
            _ => {}
        }
    }
    eprintln!(
        "power loss {}: seed {}, workload {:.1} s, {:?} ({:.1} s in all)",
        scenario.name,
        seed(),
        ran.as_secs_f64(),
        report,
        started.elapsed().as_secs_f64()
    );
    report
}

/// `crashes` images of a workload of `synchronous` and `journal` (the more crashes, the
/// more writes: 150 per writer up to 900 crashes, 500 from 3000).
fn scenario(
    name: &'static str,
    journal: JournalMode,
    synchronous: Synchronous,
    crashes: usize,
) -> Scenario {
    Scenario {
        name,
        journal,
        synchronous,
        faults: Faults::default(),
        writers: 4,
        writes: (crashes / 6).clamp(150, 500),
        backups: 3,
        crashes,
        keep_failures: true,
        group_commit: false,
    }
}

/// A failing report's text.
fn failed(report: &Report) -> String {
    format!("seed {} (POWER_LOSS_SEED replays it): {report:#?}", seed())
}

#[test]
fn under_wal_and_full_no_power_loss_corrupts_the_file_or_loses_an_acknowledged_write() {
    let report = power_losses(scenario(
        "wal-full",
        JournalMode::Wal,
        Synchronous::Full,
        crashes(900),
    ));
    assert!(report.failures.is_empty(), "{}", failed(&report));
    assert_eq!(report.lost, 0, "{}", failed(&report));
    assert_eq!(report.crashes, crashes(900));
}

/// Group commit under WAL and FULL: sixteen writers (eight a handle) share transactions and
/// the syncs of their COMMITs; every write acknowledged was in a COMMIT that was synced, so
/// none is lost, and a group is in the file whole or not at all (the transactions present
/// are still a prefix of the commit order: a group's members take their sequence numbers in
/// its transaction, one after the other).
#[test]
fn under_wal_and_full_with_group_commit_no_power_loss_loses_an_acknowledged_write() {
    let base = scenario(
        "wal-full-group",
        JournalMode::Wal,
        Synchronous::Full,
        crashes(900),
    );
    let report = power_losses(Scenario {
        writers: 16,
        writes: base.writes / 4,
        group_commit: true,
        ..base
    });
    assert!(report.failures.is_empty(), "{}", failed(&report));
    assert_eq!(report.lost, 0, "{}", failed(&report));
    assert_eq!(report.crashes, crashes(900));
    // The writes did share commits: fewer syncs of -wal than writes (each write would sync
    // it once without group commit).
    assert!(
        report.wal_syncs * 4 < report.acks * 3,
        "{} syncs of -wal for {} writes: {}",
        report.wal_syncs,
        report.acks,
        failed(&report)
    );
}

/// NORMAL under WAL (the layer's default) syncs the WAL only when it checkpoints: a power
/// loss takes back the transactions committed since, and never more (the checks: those
/// present are a prefix of the commit order, and none acknowledged before the WAL's last
/// sync is missing).
#[test]
fn under_wal_and_normal_no_power_loss_corrupts_the_file_and_only_the_last_writes_are_lost() {
    let report = power_losses(scenario(
        "wal-normal",
        JournalMode::Wal,
        Synchronous::Normal,
        crashes(900),
    ));
    assert!(report.failures.is_empty(), "{}", failed(&report));
}

/// A rollback journal with `Synchronous::Extra`: the journal's deletion, the commit, is
/// synced to the directory, so nothing acknowledged is lost.
#[test]
fn under_a_rollback_journal_and_extra_no_power_loss_loses_an_acknowledged_write() {
    let report = power_losses(scenario(
        "delete-extra",
        JournalMode::Delete,
        Synchronous::Extra,
        crashes(200),
    ));
    assert!(report.failures.is_empty(), "{}", failed(&report));
    assert_eq!(report.lost, 0, "{}", failed(&report));
}

/// A rollback journal with the layer's default there, `Synchronous::Full`: the journal is
/// deleted to commit, and FULL does not sync the directory after it (EXTRA does), so a
/// power loss can bring the journal back and SQLite then rolls the last transaction back,
/// acknowledged or not. Never corrupt, never more than that one transaction.
#[test]
fn under_a_rollback_journal_and_full_at_most_the_last_acknowledged_write_is_lost() {
    let report = power_losses(Scenario {
        keep_failures: false,
        ..scenario(
            "delete-full",
            JournalMode::Delete,
            Synchronous::Full,
            crashes(200),
        )
    });
    let unexpected: Vec<&String> = report
        .failures
        .iter()
        .filter(|f| {
            !f.contains("acknowledged writes lost: [")
                && !f.contains("the acknowledged migrations were lost")
        })
        .collect();
    assert!(unexpected.is_empty(), "{}", failed(&report));
    assert_eq!(report.corrupt, 0, "{}", failed(&report));
    assert!(report.most_lost <= 1, "{}", failed(&report));
}

/// The harness finds what it is there to find: with syncs that do nothing (the shim
/// answers `xSync` without syncing) or with `Synchronous::Off`, the same workload and
/// checks find corrupt files and lost acknowledged writes; with directory syncs that make
/// nothing durable, lost files: acknowledged writes and finished backups.
#[test]
fn the_harness_finds_corruption_and_losses_when_syncs_are_missing() {
    let lying = Faults {
        lie_about_syncs: true,
        ..Faults::default()
    };
    let forgetting = Faults {
        forget_directory_syncs: true,
        ..Faults::default()
    };
    // A fixed number: enough to find them, whatever POWER_LOSS_CRASHES asks of the others.
    let full = Scenario {
        keep_failures: false,
        ..scenario("wal-full-lying", JournalMode::Wal, Synchronous::Full, 100)
    };
    let off = Scenario {
        keep_failures: false,
        ..scenario("wal-off", JournalMode::Wal, Synchronous::Off, 100)
    };
    for scenario in [
        Scenario {
            faults: lying,
            ..full
        },
        Scenario {
            name: "wal-full-group-lying",
            faults: lying,
            writers: 16,
            writes: full.writes / 4,
            group_commit: true,
            ..full
        },
        off,
    ] {
        let report = power_losses(scenario);
        assert!(report.corrupt > 0, "{report:#?}");
        assert!(report.lost > 0, "{report:#?}");
    }
    let report = power_losses(Scenario {
        name: "wal-full-no-directory-sync",
        faults: forgetting,
        ..full
    });
    assert!(report.lost > 0, "{report:#?}");
    assert!(report.backups_lost > 0, "{report:#?}");
}

/// The layer switches the journal mode on the connection that opens the file; a rollback
/// mode other than DELETE (TRUNCATE, PERSIST) is a setting of each connection: the pool's
/// connections kept DELETE, with FULL's unsynced deletion (see above), until the layer put
/// the mode on every connection.
#[test]
fn under_truncate_and_persist_journals_and_full_no_power_loss_loses_an_acknowledged_write() {
    for (name, journal) in [
        ("truncate-full", JournalMode::Truncate),
        ("persist-full", JournalMode::Persist),
    ] {
        let report = power_losses(scenario(name, journal, Synchronous::Full, crashes(250)));
        assert!(report.failures.is_empty(), "{}", failed(&report));
    }
}
