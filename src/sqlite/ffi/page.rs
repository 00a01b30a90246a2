//! A page of a file mapped shared between processes, read and written with atomics, and
//! `futex(2)` waits and wake-ups on its words: the write queue's waiting board
//! (`queue::board`).
//!
//! A futex on a shared file mapping is keyed by the file and offset, not the address, so a
//! waiter in one process is woken by a wake on the same word in another. Every wait has a
//! timeout: a word nobody wakes (its waker died, or a hostile writer of the file) costs at
//! most that.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

/// The page's size, and the size the file must have past the page's offset.
pub(crate) const PAGE: usize = 4096;

/// One page of a file, mapped shared.
#[derive(Debug)]
pub(crate) struct SharedPage {
    base: NonNull<u8>,
}

// SAFETY: the mapping is plain shared memory, only ever accessed through atomics (see
// `u64_at` and `u32_at`), which are Sync; unmapped only on drop, with no borrow left.
unsafe impl Send for SharedPage {}
// SAFETY: as above.
unsafe impl Sync for SharedPage {}

impl SharedPage {
    /// Maps the page of `file` (open for reading and writing, at least `offset + PAGE`
    /// bytes long) at `offset` (a multiple of the page size).
    ///
    /// The file must stay at least that long while mapped: a process that touches a mapped
    /// page past the end of its file gets `SIGBUS`. Only who may write the database may
    /// write (and so truncate) the queue's file, who can as well truncate its `-shm`, which
    /// SQLite maps the same way.
    pub(crate) fn map(file: &File, offset: u64) -> std::io::Result<Self> {
        if !offset.is_multiple_of(PAGE as u64) || file.metadata()?.len() < offset + PAGE as u64 {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        // SAFETY: a new shared mapping of PAGE bytes of an open descriptor at a page-aligned
        // offset inside the file; the kernel picks the address; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        NonNull::new(base.cast())
            .map(|base| Self { base })
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidData))
    }

    /// The 8-byte word at byte `at` (a multiple of 8, inside the page).
    pub(crate) fn u64_at(&self, at: usize) -> &AtomicU64 {
        assert!(at.is_multiple_of(8) && at + 8 <= PAGE);
        // SAFETY: inside the mapping, aligned (the mapping is page-aligned), valid for the
        // page's life, which bounds the borrow; other processes access it only as memory,
        // and this one only through atomics.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(at).cast()) }
    }

    /// The 4-byte word at byte `at` (a multiple of 4, inside the page).
    pub(crate) fn u32_at(&self, at: usize) -> &AtomicU32 {
        assert!(at.is_multiple_of(4) && at + 4 <= PAGE);
        // SAFETY: as in `u64_at`.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(at).cast()) }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), PAGE);
        }
    }
}

/// Sleeps while `word` holds `expected`, at most `timeout`, or until woken by
/// [`futex_wake`] on the same word of the same file (in any process). Returns at once if the
/// word differs; may return early for no reason (the caller looks again).
#[cfg(target_os = "linux")]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT (shared: no PRIVATE flag) on a valid aligned word of a live
    // mapping, with a valid relative timeout; it only reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &timeout as *const libc::timespec,
        );
    }
}

/// Without futexes: looks again after a moment.
#[cfg(not(target_os = "linux"))]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    if word.load(std::sync::atomic::Ordering::SeqCst) == expected {
        std::thread::sleep(timeout.min(Duration::from_micros(500)));
    }
}

/// Without futexes: the waiter looks again by itself.
#[cfg(not(target_os = "linux"))]
pub(crate) fn futex_wake(_word: &AtomicU32, _count: u32) {}

/// Wakes at most `count` waiters sleeping on `word` (in any process).
#[cfg(target_os = "linux")]
pub(crate) fn futex_wake(word: &AtomicU32, count: u32) {
    // SAFETY: FUTEX_WAKE (shared) on a valid aligned word of a live mapping; it does not
    // touch the word.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, count);
    }
}
