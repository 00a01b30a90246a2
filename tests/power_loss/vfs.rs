//! What the power-loss model sees of the process's file I/O, from two places:
//!
//! - **A shim VFS**, registered as SQLite's default (so every connection the layer opens goes
//!   through it), wrapping the `unix` VFS: each file of a recorded directory reports its
//!   creation (`xOpen`), writes (`xWrite`), truncations (`xTruncate`, and the `ftruncate`
//!   the `unix` VFS does inside `SQLITE_FCNTL_SIZE_HINT` when it memory-maps a growing
//!   file) to its [`Recorder`], which logs them under its mutex together with the real
//!   operation. `xSync` is forwarded (or, for a recorder told to lie, answered `SQLITE_OK`
//!   without syncing anything: the harness's own proof that it finds lost syncs).
//! - **The process's `fsync`, `fdatasync`, `unlink` and `linkat`**, defined here: an
//!   executable's own definitions take the place of libc's for every call in it, the `unix`
//!   VFS's (its `full_fsync`, the directory sync of a new journal or after a delete, its
//!   `unlink` in the system-call table) and the layer's `std::fs` ones alike (the backup's
//!   `sync_all` of its copy and of the directory, its `hard_link` into place, its removal of
//!   the temporary name). A sync is what makes content and directory entries durable in the
//!   model, whoever asks for it, so a sync missing anywhere shows. Each one calls the kernel
//!   directly (`syscall`): calling libc's would call these again.
//!
//! Renames are not observed: neither SQLite nor the layer renames a file of the database.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use libsqlite3_sys as ffi;

use crate::model::{self, InodeId, Recorder};

/// The shim's name among SQLite's VFSes.
const NAME: &CStr = c"power-loss-shim";

/// Registers the shim as SQLite's default VFS, once per process; before the layer opens
/// anything, or its first connections would bypass it.
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: sqlite3_initialize may be called at any time, from any thread; the
        // bundled SQLite is built thread-safe (SQLITE_THREADSAFE=1).
        assert_eq!(unsafe { ffi::sqlite3_initialize() }, ffi::SQLITE_OK);
        // SAFETY: NULL asks for the default VFS, `unix` on Linux; it lives as long as the
        // process (it is never unregistered).
        let real = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
        assert!(!real.is_null(), "SQLite has no default VFS");
        // SAFETY: `real` points to a registered, initialised VFS; copying it is how SQLite's
        // own VFS variants share the `unix` methods. Its methods that take the VFS read
        // only `pAppData` and `mxPathname`, which the copy keeps.
        let mut shim: ffi::sqlite3_vfs = unsafe { *real };
        // SAFETY: `real`'s szOsFile is its file structure's size, a small positive int.
        let real_size = usize::try_from(unsafe { (*real).szOsFile }).unwrap();
        shim.szOsFile = c_int::try_from(REAL_OFFSET + real_size).unwrap();
        shim.zName = NAME.as_ptr();
        shim.pNext = std::ptr::null_mut();
        shim.xOpen = Some(shim_open);
        REAL_VFS.set(RealVfs(real)).ok().unwrap();
        let shim = Box::leak(Box::new(shim));
        // SAFETY: `shim` lives for ever (leaked) and is a complete VFS; 1 makes it the
        // default, which every later sqlite3_open_v2 without a VFS name uses.
        let rc = unsafe { ffi::sqlite3_vfs_register(shim, 1) };
        assert_eq!(rc, ffi::SQLITE_OK, "cannot register the shim VFS");
    });
}

/// The `unix` VFS, which the shim forwards to.
struct RealVfs(*mut ffi::sqlite3_vfs);
// SAFETY: a registered VFS is immutable and used from every thread by SQLite itself.
unsafe impl Send for RealVfs {}
// SAFETY: as above.
unsafe impl Sync for RealVfs {}
static REAL_VFS: std::sync::OnceLock<RealVfs> = std::sync::OnceLock::new();

/// The shim's file: SQLite's base, which file of a recorder it is (null if none: a file
/// outside every recorded directory, or a temporary file), then the `unix` VFS's own file
/// structure at [`REAL_OFFSET`].
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    tracked: *mut Tracked,
}

/// Where the real file structure starts within the shim's allocation (16-aligned).
const REAL_OFFSET: usize = std::mem::size_of::<ShimFile>().next_multiple_of(16);

/// A recorded file: its recorder and the model's inode.
struct Tracked {
    recorder: Arc<Recorder>,
    inode: InodeId,
}

/// The real file inside the shim's allocation.
///
/// # Safety
/// `file` must be a [`ShimFile`] allocated with the shim's `szOsFile`.
unsafe fn real(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: the allocation is REAL_OFFSET + the real szOsFile bytes (see `install`).
    unsafe { file.cast::<u8>().add(REAL_OFFSET).cast() }
}

/// The recorded file behind `file`, if any.
///
/// # Safety
/// `file` must be an open [`ShimFile`].
unsafe fn tracked<'a>(file: *mut ffi::sqlite3_file) -> Option<&'a Tracked> {
    // SAFETY: an open ShimFile's `tracked` is null or a live Box, freed only by xClose.
    unsafe { (*file.cast::<ShimFile>()).tracked.as_ref() }
}

/// The real file's methods.
///
/// # Safety
/// `file` must be an open [`ShimFile`] (whose real file is open).
unsafe fn methods<'a>(file: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    // SAFETY: the shim's methods are installed only once the real file's are.
    unsafe { &*(*real(file)).pMethods }
}

unsafe extern "C" fn shim_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = REAL_VFS.get().unwrap().0;
    // SAFETY: SQLite hands over `szOsFile` bytes for the file; the real VFS gets its own
    // part of them, and its xOpen is called with its own VFS, as SQLite would.
    let rc = unsafe {
        let shim = file.cast::<ShimFile>();
        std::ptr::addr_of_mut!((*shim).tracked).write(std::ptr::null_mut());
        (*file).pMethods = std::ptr::null();
        ((*real_vfs).xOpen.unwrap())(real_vfs, name, real(file), flags, out_flags)
    };
    // SAFETY: as above: the real file's pMethods is set if it must be closed.
    if unsafe { (*real(file)).pMethods.is_null() } {
        return rc;
    }
    // SAFETY: the real file is open, so the shim's methods can forward to it.
    unsafe { (*file).pMethods = &METHODS };
    if rc == ffi::SQLITE_OK && !name.is_null() {
        // SAFETY: a non-null name is a NUL-terminated full path (xFullPathname's).
        let path = PathBuf::from(unsafe { CStr::from_ptr(name) }.to_str().unwrap());
        if let Some((recorder, inode)) = model::opened(&path) {
            let tracked = Box::into_raw(Box::new(Tracked { recorder, inode }));
            // SAFETY: the ShimFile was initialised above; xClose frees the box.
            unsafe { (*file.cast::<ShimFile>()).tracked = tracked };
        }
    }
    rc
}

unsafe extern "C" fn shim_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes an open file once; the box was made in shim_open.
    unsafe {
        let rc = (methods(file).xClose.unwrap())(real(file));
        let shim = file.cast::<ShimFile>();
        if !(*shim).tracked.is_null() {
            drop(Box::from_raw((*shim).tracked));
            (*shim).tracked = std::ptr::null_mut();
        }
        rc
    }
}

unsafe extern "C" fn shim_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { (methods(file).xRead.unwrap())(real(file), buf, amount, offset) }
}

unsafe extern "C" fn shim_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    let write = || unsafe { (methods(file).xWrite.unwrap())(real(file), buf, amount, offset) };
    // SAFETY: the file is open.
    match unsafe { tracked(file) } {
        None => write(),
        Some(t) => {
            // SAFETY: SQLite's buffer holds `amount` bytes for the length of the call.
            let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), amount as usize) };
            t.recorder.write(t.inode, offset as u64, data, write)
        }
    }
}

unsafe extern "C" fn shim_truncate(
    file: *mut ffi::sqlite3_file,
    size: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    let truncate = || unsafe { (methods(file).xTruncate.unwrap())(real(file), size) };
    // SAFETY: the file is open.
    match unsafe { tracked(file) } {
        None => truncate(),
        Some(t) => t
            .recorder
            .set_len(t.inode, || (truncate(), Some(size as u64))),
    }
}

unsafe extern "C" fn shim_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: the file is open.
    if unsafe { tracked(file) }.is_some_and(|t| t.recorder.lies_about_syncs()) {
        return ffi::SQLITE_OK;
    }
    // SAFETY: forwarded as SQLite called it; the fsync it makes is observed below.
    unsafe { (methods(file).xSync.unwrap())(real(file), flags) }
}

unsafe extern "C" fn shim_file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { (methods(file).xFileSize.unwrap())(real(file), size) }
}

unsafe extern "C" fn shim_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { (methods(file).xLock.unwrap())(real(file), level) }
}

unsafe extern "C" fn shim_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { (methods(file).xUnlock.unwrap())(real(file), level) }
}

unsafe extern "C" fn shim_check_reserved_lock(
    file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { (methods(file).xCheckReservedLock.unwrap())(real(file), out) }
}

unsafe extern "C" fn shim_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    let control = || unsafe { (methods(file).xFileControl.unwrap())(real(file), op, arg) };
    // SAFETY: the file is open.
    match unsafe { tracked(file) } {
        // The `unix` VFS grows a memory-mapped file with ftruncate here, not in xTruncate.
        Some(t) if op == ffi::SQLITE_FCNTL_SIZE_HINT => t.recorder.set_len(t.inode, || {
            let rc = control();
            let mut size: ffi::sqlite3_int64 = 0;
            // SAFETY: forwarded to the open real file.
            let sized = unsafe { (methods(file).xFileSize.unwrap())(real(file), &mut size) };
            (rc, (sized == ffi::SQLITE_OK).then_some(size as u64))
        }),
        _ => control(),
    }
}

unsafe extern "C" fn shim_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { (methods(file).xSectorSize.unwrap())(real(file)) }
}

unsafe extern "C" fn shim_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { (methods(file).xDeviceCharacteristics.unwrap())(real(file)) }
}

unsafe extern "C" fn shim_shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    page_size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it (the -shm is not recorded: see `model`).
    unsafe {
        match methods(file).xShmMap {
            Some(map) => map(real(file), page, page_size, extend, out),
            None => ffi::SQLITE_IOERR,
        }
    }
}

unsafe extern "C" fn shim_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        match methods(file).xShmLock {
            Some(lock) => lock(real(file), offset, n, flags),
            None => ffi::SQLITE_IOERR,
        }
    }
}

unsafe extern "C" fn shim_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        if let Some(barrier) = methods(file).xShmBarrier {
            barrier(real(file));
        }
    }
}

unsafe extern "C" fn shim_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        match methods(file).xShmUnmap {
            Some(unmap) => unmap(real(file), delete),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn shim_fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it. A mapping only reads: the `unix` VFS writes
    // through xWrite (it is not built with SQLITE_MMAP_READWRITE).
    unsafe {
        match methods(file).xFetch {
            Some(fetch) => fetch(real(file), offset, amount, out),
            None => {
                *out = std::ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn shim_unfetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    page: *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        match methods(file).xUnfetch {
            Some(unfetch) => unfetch(real(file), offset, page),
            None => ffi::SQLITE_OK,
        }
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(shim_close),
    xRead: Some(shim_read),
    xWrite: Some(shim_write),
    xTruncate: Some(shim_truncate),
    xSync: Some(shim_sync),
    xFileSize: Some(shim_file_size),
    xLock: Some(shim_lock),
    xUnlock: Some(shim_unlock),
    xCheckReservedLock: Some(shim_check_reserved_lock),
    xFileControl: Some(shim_file_control),
    xSectorSize: Some(shim_sector_size),
    xDeviceCharacteristics: Some(shim_device_characteristics),
    xShmMap: Some(shim_shm_map),
    xShmLock: Some(shim_shm_lock),
    xShmBarrier: Some(shim_shm_barrier),
    xShmUnmap: Some(shim_shm_unmap),
    xFetch: Some(shim_fetch),
    xUnfetch: Some(shim_unfetch),
};

// The process's sync, unlink and link calls (see the module's docs).

/// The device and inode behind `fd`, if it has one.
fn key_of_fd(fd: c_int) -> Option<(u64, u64)> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer, or fails and writes nothing read.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let stat = unsafe { stat.assume_init() };
    Some((stat.st_dev, stat.st_ino))
}

/// `path` (a C string) as an absolute path, relative to the working directory when it is
/// not absolute and `dirfd` is `AT_FDCWD`; `None` for a path relative to another directory
/// descriptor (neither SQLite nor the layer uses one).
///
/// # Safety
/// `path` must be a NUL-terminated string.
unsafe fn absolute(dirfd: c_int, path: *const c_char) -> Option<PathBuf> {
    if path.is_null() {
        return None;
    }
    // SAFETY: the caller's.
    let path = Path::new(unsafe { CStr::from_ptr(path) }.to_str().ok()?);
    if path.is_absolute() {
        Some(path.to_owned())
    } else if dirfd == libc::AT_FDCWD {
        std::env::current_dir().ok().map(|cwd| cwd.join(path))
    } else {
        None
    }
}

/// A sync of `fd`: what it covers is fixed before the kernel is asked, so a write another
/// thread makes meanwhile is not taken for durable.
fn observed_sync(fd: c_int, sync: impl FnOnce() -> c_int) -> c_int {
    let pending = key_of_fd(fd).and_then(model::sync_begins);
    let rc = sync();
    if let (0, Some(pending)) = (rc, pending) {
        pending.done();
    }
    rc
}

/// `fsync(2)`, observed (see the module's docs).
///
/// # Safety
/// As `fsync(2)`.
#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    observed_sync(fd, || {
        // SAFETY: the system call takes any descriptor, and reports a bad one.
        unsafe { libc::syscall(libc::SYS_fsync, fd as libc::c_long) as c_int }
    })
}

/// `fdatasync(2)`, observed (see the module's docs).
///
/// # Safety
/// As `fdatasync(2)`.
#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    observed_sync(fd, || {
        // SAFETY: as for fsync.
        unsafe { libc::syscall(libc::SYS_fdatasync, fd as libc::c_long) as c_int }
    })
}

/// `unlink(2)`, observed (see the module's docs).
///
/// # Safety
/// As `unlink(2)`: `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
    // SAFETY: the caller's string; unlinkat with AT_FDCWD and no flags is unlink.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_unlinkat,
            libc::AT_FDCWD as libc::c_long,
            path,
            0 as libc::c_long,
        ) as c_int
    };
    if rc == 0 {
        // SAFETY: the caller's string.
        if let Some(path) = unsafe { absolute(libc::AT_FDCWD, path) } {
            model::unlinked(&path);
        }
    }
    rc
}

/// `linkat(2)`, observed (see the module's docs): `std::fs::hard_link` calls it.
///
/// # Safety
/// As `linkat(2)`: the paths are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn linkat(
    old_dirfd: c_int,
    old_path: *const c_char,
    new_dirfd: c_int,
    new_path: *const c_char,
    flags: c_int,
) -> c_int {
    // SAFETY: the caller's arguments, passed on unchanged.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_linkat,
            old_dirfd as libc::c_long,
            old_path,
            new_dirfd as libc::c_long,
            new_path,
            flags as libc::c_long,
        ) as c_int
    };
    if rc == 0 {
        // SAFETY: the caller's strings.
        let paths = unsafe { (absolute(old_dirfd, old_path), absolute(new_dirfd, new_path)) };
        match paths {
            (Some(old), Some(new)) => model::linked(&old, &new),
            (_, new) => model::unmodelled(new.as_deref(), "a link relative to a directory"),
        }
    }
    rc
}

/// `link(2)`, observed as [`linkat`].
///
/// # Safety
/// As `link(2)`.
#[no_mangle]
pub unsafe extern "C" fn link(old_path: *const c_char, new_path: *const c_char) -> c_int {
    // SAFETY: the caller's strings; linkat relative to the working directory is link.
    unsafe { linkat(libc::AT_FDCWD, old_path, libc::AT_FDCWD, new_path, 0) }
}
