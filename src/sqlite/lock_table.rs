//! The SQLite side of [`Holder`](crate::Holder): the OS lock table (`/proc/locks`), with the
//! holder record the write queue keeps in `<database>-lock` (`queue::sidecar`).

use std::path::Path;

use crate::holders::{HeldLock, Holder};
use crate::sqlite::ffi::shm::WalIndex;
use crate::sqlite::files::read_regular;
use crate::sqlite::queue::sidecar::read_record;
use crate::sqlite::side::side_file;

/// SQLite's lock bytes: the WAL write lock in `-shm`, and RESERVED in the database file
/// (`PENDING_BYTE + 1`); the read marks of readers that use WAL frames (1 to 4; mark 0, byte
/// 123, reads the database file alone).
const WAL_WRITE_LOCK: u64 = 120;
const RESERVED_BYTE: u64 = 0x4000_0001;
const WAL_READ_MARKS: std::ops::RangeInclusive<u64> = 124..=127;
const READ_MARK_ZERO: u64 = 123;

/// The processes holding the write queue or SQLite's write lock of the database at `path`,
/// each once, as the OS lock table lists them now.
pub(crate) fn holders_of(path: &Path) -> Vec<Holder> {
    let side = |suffix| side_file(path, suffix);
    let mut holders = listed(&[
        (side("-lock"), "WRITE", Look::Flock, HeldLock::WriteQueue),
        (
            side("-shm"),
            "WRITE",
            Look::Byte(WAL_WRITE_LOCK),
            HeldLock::WriteLock,
        ),
        (
            path.to_owned(),
            "WRITE",
            Look::Byte(RESERVED_BYTE),
            HeldLock::WriteLock,
        ),
    ]);
    if let Some(record) = read_record(path) {
        for holder in &mut holders {
            if holder.lock == HeldLock::WriteQueue && holder.pid == record.pid {
                holder.operation = Some(record.operation);
                holder.since = Some(record.since);
            }
        }
    }
    holders
}

/// The processes with a read transaction open on the database at `path` (which holds back
/// checkpoints), each once per kind: reading from the WAL (read marks 1 to 4), or reading the
/// database file alone (read mark 0, taken when the WAL had nothing to add).
pub(crate) fn wal_readers_of(path: &Path) -> Vec<Holder> {
    readers_of(path, |_| true)
}

/// The processes whose read transaction keeps a checkpoint of the database at `path` from
/// passing the WAL's last committed frame, by its `index` (read through SQLite's mapping:
/// see `shm`): those holding read mark 0 (a reader of the database file alone, begun when
/// the WAL was empty or fully checkpointed: no frame can be copied into the file under it),
/// and those holding a read mark whose value is below the last frame.
pub(crate) fn pinning_readers_of(path: &Path, index: &WalIndex) -> Vec<Holder> {
    readers_of(path, |mark| index.marks[mark] < index.committed)
}

/// The holders of read mark 0, and of the marks 1 to 4 that `wanted` keeps (by index). Mark
/// `i` is locked on byte `123 + i` of `-shm`.
fn readers_of(path: &Path, wanted: impl Fn(usize) -> bool) -> Vec<Holder> {
    let shm = side_file(path, "-shm");
    let mut looks = vec![(
        shm.clone(),
        "READ",
        Look::Byte(READ_MARK_ZERO),
        HeldLock::FileReader,
    )];
    looks.extend(
        WAL_READ_MARKS
            .filter(|byte| wanted((*byte - READ_MARK_ZERO) as usize))
            .map(|byte| (shm.clone(), "READ", Look::Byte(byte), HeldLock::WalReader)),
    );
    listed(&looks)
}

/// Which locks of a file to look for.
#[derive(Clone, Copy)]
enum Look {
    /// An `flock` of the whole file.
    Flock,
    /// A POSIX lock covering this byte.
    Byte(u64),
}

/// The processes the OS lock table lists for each `(file, mode, look, lock)`, each
/// `(pid, lock)` once.
fn listed(wanted: &[(std::path::PathBuf, &str, Look, HeldLock)]) -> Vec<Holder> {
    #[cfg(target_os = "linux")]
    {
        // Never blocking: a FIFO mounted over it (a private mount namespace) fails at once.
        let Ok(table) = read_regular(Path::new("/proc/locks"), 64 << 20) else {
            return Vec::new();
        };
        let mut holders: Vec<Holder> = Vec::new();
        for (file, mode, look, lock) in wanted {
            let Some(id) = file_id(file) else {
                continue;
            };
            for pid in lock_holders(&table, &id, mode, *look) {
                if !holders.iter().any(|h| h.pid == pid && h.lock == *lock) {
                    holders.push(Holder {
                        pid,
                        command: command_of(pid),
                        lock: *lock,
                        operation: None,
                        since: None,
                        hidden: false,
                    });
                }
            }
        }
        holders
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = wanted;
        Vec::new()
    }
}

/// `major:minor:inode` as `/proc/locks` writes it (hex device numbers, decimal inode).
#[cfg(target_os = "linux")]
fn file_id(file: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).ok()?;
    let dev = meta.dev();
    Some(format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    ))
}

/// The pids holding a `mode` (`WRITE`, `READ`) lock on the file `id` as `look` says, from the
/// text of `/proc/locks`. Waiters (lines with `->`) hold nothing.
fn lock_holders<'a>(
    table: &'a str,
    id: &'a str,
    wanted_mode: &'a str,
    look: Look,
) -> impl Iterator<Item = u32> + 'a {
    table.lines().filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1:" TYPE ADVISORY WRITE PID DEV:INODE START END
        let [_, kind, _, mode, pid, file, start, end] = fields.as_slice() else {
            return None;
        };
        if *mode != wanted_mode || *file != id {
            return None;
        }
        let covers = match (look, *kind) {
            (Look::Flock, "FLOCK") => true,
            (Look::Byte(byte), "POSIX" | "OFDLCK") => {
                let start: u64 = start.parse().ok()?;
                let end = if *end == "EOF" {
                    u64::MAX
                } else {
                    end.parse().ok()?
                };
                (start..=end).contains(&byte)
            }
            _ => false,
        };
        covers.then(|| pid.parse().ok()).flatten()
    })
}

#[cfg(target_os = "linux")]
fn command_of(pid: u32) -> Option<String> {
    read_regular(Path::new(&format!("/proc/{pid}/comm")), 64)
        .ok()
        .map(|c| c.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::Operation;
    use std::time::{Duration, SystemTime};

    const TABLE: &str = "\
1: FLOCK  ADVISORY  WRITE 25522 fe:00:10010949 0 EOF
2: POSIX  ADVISORY  WRITE 25522 fe:00:10010963 120 120
3: POSIX  ADVISORY  READ 25600 fe:00:10010963 124 124
4: POSIX  ADVISORY  READ 25522 fe:00:10010930 1073741826 1073742335
5: POSIX  ADVISORY  WRITE 26000 fe:00:10010930 1073741825 1073741825
6: -> FLOCK  ADVISORY  WRITE 27000 fe:00:10010949 0 EOF
7: FLOCK  ADVISORY  WRITE 28000 fe:00:99 0 EOF";

    fn pids(id: &str, mode: &str, look: Look) -> Vec<u32> {
        lock_holders(TABLE, id, mode, look).collect()
    }

    #[test]
    fn the_lock_table_names_writers_not_readers_nor_waiters() {
        // The queue's flock, not the waiter queued behind it.
        assert_eq!(pids("fe:00:10010949", "WRITE", Look::Flock), [25522]);
        // The WAL write lock byte; a reader's byte 124 is not it.
        let shm = "fe:00:10010963";
        assert_eq!(pids(shm, "WRITE", Look::Byte(WAL_WRITE_LOCK)), [25522]);
        assert!(pids(shm, "WRITE", Look::Byte(124)).is_empty());
        // RESERVED in rollback mode; SHARED ranges held for reading are not it.
        assert_eq!(
            pids("fe:00:10010930", "WRITE", Look::Byte(RESERVED_BYTE)),
            [26000]
        );
        // Another file's locks are not this one's.
        assert!(pids("fe:00:1", "WRITE", Look::Flock).is_empty());
    }

    #[test]
    fn readers_of_wal_frames_are_those_holding_a_read_mark_above_zero() {
        let shm = "fe:00:10010963";
        assert_eq!(pids(shm, "READ", Look::Byte(124)), [25600]);
        assert!(pids(shm, "READ", Look::Byte(125)).is_empty());
    }

    #[test]
    fn a_holder_reads_as_a_clause() {
        let holder = Holder {
            pid: 7,
            command: Some("sqlite3".to_owned()),
            lock: HeldLock::WriteLock,
            operation: None,
            since: None,
            hidden: false,
        };
        assert_eq!(
            holder.to_string(),
            "process 7 (sqlite3) holding the write lock"
        );
        let holder = Holder {
            pid: 8,
            command: Some("worker".to_owned()),
            lock: HeldLock::WriteQueue,
            operation: Some(Operation::Write),
            since: SystemTime::now().checked_sub(Duration::from_millis(3200)),
            hidden: false,
        };
        assert_eq!(
            holder.to_string(),
            "process 8 (worker) holding the write queue for 3.2 s (write)"
        );
    }
}
