//! Which filesystem a database lives on, and whether SQLite's WAL is safe there.
//!
//! WAL needs memory shared between the processes that open the file (`-shm`, mapped), and
//! every mode needs POSIX locks that work. sqlite.org says neither holds on a network
//! filesystem, and SQLite does not check: it runs and may corrupt the file. On Linux,
//! `statfs(2)` tells the filesystem type of the database's directory.

use std::io;
use std::path::Path;

use crate::error::{Error, Result};
use crate::pragma::JournalMode;

/// A filesystem type, as `statfs(2)`'s `f_type` (its magic number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Filesystem {
    magic: u64,
}

/// Network and cluster filesystems: their names by magic number (linux/magic.h and the
/// filesystems' own headers).
const NETWORK: [(u64, &str); 14] = [
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x6573_5546, "FUSE"),
    (0x0102_1997, "9p"),
    (0x00C3_6400, "Ceph"),
    (0x5346_414F, "AFS"),
    (0x6B41_4653, "kAFS"),
    (0x4750_4653, "GPFS"),
    (0x0BD0_0BD0, "Lustre"),
    (0x0116_1970, "GFS2"),
    (0x7461_636F, "OCFS2"),
    (0x786F_4256, "vboxsf"),
];

/// Local filesystems, named for `status`.
const LOCAL: [(u64, &str); 9] = [
    (0xEF53, "ext2/ext3/ext4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0x794C_7630, "overlayfs"),
    (0x2FC1_2FC1, "zfs"),
    (0xF2F5_2010, "f2fs"),
    (0x4D44, "vfat"),
    (0x5346_544E, "ntfs"),
];

impl Filesystem {
    /// The filesystem of type `magic`.
    pub(crate) const fn new(magic: u64) -> Self {
        Self { magic }
    }

    /// The filesystem `dir` is on; `None` where `statfs` does not exist (not Linux).
    ///
    /// # Errors
    /// The OS error of `statfs`.
    pub(crate) fn of(dir: &Path) -> io::Result<Option<Self>> {
        crate::sqlite::ffi::sys::statfs_type(dir).map(|magic| magic.map(Self::new))
    }

    /// Its name if it is a network or cluster filesystem.
    pub(crate) fn network(self) -> Option<&'static str> {
        NETWORK
            .iter()
            .find(|(magic, _)| *magic == self.magic)
            .map(|(_, name)| *name)
    }

    /// A name for people: `NFS`, `ext2/ext3/ext4`, or the magic number in hex.
    pub(crate) fn name(self) -> String {
        NETWORK
            .iter()
            .chain(LOCAL.iter())
            .find(|(magic, _)| *magic == self.magic)
            .map_or_else(
                || format!("{:#x}", self.magic),
                |(_, name)| (*name).to_owned(),
            )
    }
}

/// Refuses WAL on a network or cluster filesystem; a rollback journal there is the user's
/// explicit choice ([`Options::journal_mode`](crate::Options::journal_mode)) and is allowed.
pub(crate) fn check(path: &Path, filesystem: Filesystem, mode: JournalMode) -> Result<()> {
    match filesystem.network() {
        Some(name) if mode == JournalMode::Wal => Err(Error::NetworkFilesystem {
            path: path.to_owned(),
            filesystem: name,
            magic: filesystem.magic,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_cluster_filesystems_are_refused_under_wal() {
        let path = Path::new("/mnt/share/app.db");
        for (magic, name) in NETWORK {
            let error = check(path, Filesystem::new(magic), JournalMode::Wal).unwrap_err();
            match &error {
                Error::NetworkFilesystem {
                    filesystem,
                    magic: m,
                    ..
                } => {
                    assert_eq!(*filesystem, name);
                    assert_eq!(*m, magic);
                }
                other => panic!("{other}"),
            }
            let text = error.to_string();
            assert!(text.contains(name), "{text}");
            let hint = error.hint().unwrap();
            assert!(hint.contains("shared memory"), "{hint}");
            assert!(hint.contains("JournalMode::Delete"), "{hint}");
        }
    }

    #[test]
    fn a_rollback_journal_is_allowed_there_and_local_filesystems_always() {
        let nfs = Filesystem::new(0x6969);
        for mode in [
            JournalMode::Delete,
            JournalMode::Truncate,
            JournalMode::Persist,
        ] {
            check(Path::new("x"), nfs, mode).unwrap();
        }
        for (magic, _) in LOCAL {
            check(Path::new("x"), Filesystem::new(magic), JournalMode::Wal).unwrap();
        }
        // An unknown type is not refused: only known network filesystems are.
        check(Path::new("x"), Filesystem::new(0x1234), JournalMode::Wal).unwrap();
        assert_eq!(Filesystem::new(0x1234).name(), "0x1234");
        assert_eq!(nfs.name(), "NFS");
    }

    #[test]
    fn cifs_magic_survives_a_sign_extended_f_type() {
        // A 32-bit f_type holds CIFS's magic as a negative number; sign extension must not
        // hide it.
        let f_type = 0xFF53_4D42_u32 as i32 as i64;
        let magic = (f_type as u64) & 0xFFFF_FFFF;
        assert_eq!(Filesystem::new(magic).network(), Some("CIFS"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_temporary_directory_is_read_and_not_a_network_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Filesystem::of(dir.path()).unwrap().unwrap();
        assert_ne!(fs.magic, 0);
        assert!(fs.network().is_none(), "{}", fs.name());
        assert!(Filesystem::of(&dir.path().join("missing")).is_err());
    }
}
