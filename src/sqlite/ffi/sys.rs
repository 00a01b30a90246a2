//! The platform's calls: the one place the crate calls the C library (Unix). Elsewhere each
//! says what it does instead.

use std::io;
use std::path::Path;

/// The filesystem type (`f_type`, a 32-bit magic number) of the filesystem holding `dir`;
/// `None` where the platform has no `statfs` of that kind (not Linux).
#[cfg(target_os = "linux")]
pub(crate) fn statfs_type(dir: &Path) -> io::Result<Option<u64>> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all-zero bytes are a valid `statfs` (integers only).
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `statfs` only writes into `buf`, which is large enough, and reads `c_path`, a
    // NUL-terminated string that outlives the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is signed and word-sized; the magic numbers are 32-bit (CIFS's has the top bit
    // set, so it is negative where f_type is 32 bits wide).
    Ok(Some((buf.f_type as u64) & 0xFFFF_FFFF))
}

/// See the Linux version: elsewhere the filesystem is not known.
#[cfg(not(target_os = "linux"))]
pub(crate) fn statfs_type(_dir: &Path) -> io::Result<Option<u64>> {
    Ok(None)
}

/// Whether this process may write `path` with its effective ids, as the open will.
#[cfg(unix)]
pub(crate) fn writable(path: &Path) -> bool {
    may(path, libc::W_OK)
}

/// Whether this process may read `path` with its effective ids.
#[cfg(unix)]
pub(crate) fn readable(path: &Path) -> bool {
    may(path, libc::R_OK)
}

/// `faccessat` of `path` for `mode` with the effective ids.
#[cfg(unix)]
fn may(path: &Path, mode: libc::c_int) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: faccessat only reads the NUL-terminated string, which outlives the call.
    let access =
        unsafe { libc::faccessat(libc::AT_FDCWD, c_path.as_ptr(), mode, libc::AT_EACCESS) };
    // A C library without AT_EACCESS says EINVAL or ENOSYS: then let SQLite find out.
    access == 0
        || matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::EINVAL | libc::ENOSYS)
        )
}

/// This process's effective user id.
#[cfg(unix)]
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Removes the access ACL of `file` (`system.posix_acl_access`), such as one inherited from
/// its directory's default ACL, which the file's mode does not show and whose named entries
/// the mode's group bits unmask. Nothing to remove (or no ACLs on the filesystem) is no error.
#[cfg(target_os = "linux")]
pub(crate) fn remove_access_acl(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the call; the name is a NUL-terminated literal.
    let rc = unsafe { libc::fremovexattr(file.as_raw_fd(), c"system.posix_acl_access".as_ptr()) };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENODATA | libc::ENOTSUP) => Ok(()),
        _ => Err(error),
    }
}

/// Elsewhere: no ACLs to remove.
#[cfg(not(target_os = "linux"))]
pub(crate) fn remove_access_acl(_file: &std::fs::File) -> io::Result<()> {
    Ok(())
}

/// Whether this process runs as root (effective user id 0).
#[cfg(unix)]
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether process `pid` is known to be gone (`kill(pid, 0)` says `ESRCH`); a process that
/// exists, or one this user may not signal, is not.
#[cfg(unix)]
pub(crate) fn process_gone(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks whether the process exists.
    let failed = unsafe { libc::kill(pid, 0) } != 0;
    failed && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Nanoseconds on the system-wide monotonic clock (`CLOCK_MONOTONIC`): one clock for every
/// process of the machine, unlike `Instant`, whose value cannot be shared; never stepped by
/// a change of the wall clock.
#[cfg(unix)]
pub(crate) fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC is always supported on
    // the platforms this builds for, and clock_gettime only fails for an invalid clock.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if rc != 0 {
        return 0;
    }
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}
