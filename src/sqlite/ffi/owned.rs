//! Data that a connection's hooks use, owned by the connection until SQLite closes it.
//!
//! SQLite's hooks (the WAL hook, the authorizer) take a bare pointer and have no destructor.
//! So the data is also the user data of a function registered on the connection under
//! `name`, never called, whose destructor SQLite runs at the end of `sqlite3_close`, after
//! the last hook call: the data lives exactly as long as the hooks may use it.

use std::ffi::{c_int, c_void, CStr};

use libsqlite3_sys as ffi;

unsafe extern "C" fn never_called(
    _context: *mut ffi::sqlite3_context,
    _argc: c_int,
    _argv: *mut *mut ffi::sqlite3_value,
) {
}

/// Hands `data` to the connection `db`, which calls `release(data)` when it closes (or at
/// once if registering fails, or if another call registers `name` again). Returns whether
/// the connection owns it now; the caller may then give `data` to the connection's hooks.
///
/// # Safety
/// `db` must be an open connection's handle, used by the calling thread; `release` must free
/// `data` exactly once, and nothing else may.
pub(crate) unsafe fn until_close(
    db: *mut ffi::sqlite3,
    name: &CStr,
    data: *mut c_void,
    release: unsafe extern "C" fn(*mut c_void),
) -> bool {
    // SAFETY: as the caller promises; SQLite owns `data` from here.
    let rc = unsafe {
        ffi::sqlite3_create_function_v2(
            db,
            name.as_ptr(),
            0,
            ffi::SQLITE_UTF8 | ffi::SQLITE_DIRECTONLY,
            data,
            Some(never_called),
            None,
            None,
            Some(release),
        )
    };
    rc == ffi::SQLITE_OK
}
