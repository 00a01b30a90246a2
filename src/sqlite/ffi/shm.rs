//! Reading the WAL index (`-shm`) through SQLite's own mapping of it, and the database
//! file's header through SQLite's own descriptor.
//!
//! A process must never open and close a descriptor of `-shm` itself: closing any descriptor
//! of a file drops every POSIX lock the process holds on it, SQLite's read marks and its
//! "this index is in use" lock included, and another process could then rebuild the index
//! under this one's connections. So the index is read where SQLite has mapped it, through
//! the connection's VFS file (`xShmMap` of region 0, without extending it).

use std::ffi::c_void;

use diesel::connection::SimpleConnection;
use diesel::sqlite::BorrowedSqliteConnection;
use diesel::SqliteConnection;
use libsqlite3_sys as ffi;

use super::RawDb;

/// What the WAL index header and its checkpoint information say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalIndex {
    /// Frames of the WAL holding committed transactions (`mxFrame`).
    pub committed: u32,
    /// How many of them have been copied into the database file (`nBackfill`).
    pub checkpointed: u32,
    /// The five read marks (`aReadMark`); `u32::MAX` for an unused one.
    pub marks: [u32; 5],
}

/// SQLite's WAL-index page size, the size of region 0.
const REGION: i32 = 32768;

/// The WAL index of `conn`'s database, read within a read transaction of `conn`: the
/// connection then has the index open and mapped itself, so reading it cannot open (or later
/// close) a reference of its own. `None` outside WAL mode, or if any step fails.
pub(crate) fn in_read(conn: &mut SqliteConnection) -> Option<WalIndex> {
    conn.batch_execute("BEGIN; SELECT count(*) FROM sqlite_master;")
        .ok()?;
    let db = RawDb::of(conn);
    // SAFETY: `db` is `conn`'s, open, used on this thread between its statements, inside a
    // read transaction (begun above; a failed `BEGIN` returned already).
    let index = unsafe { wal_index(db.as_ptr()) };
    let _ = conn.batch_execute("COMMIT");
    index
}

/// The WAL index of the connection whose WAL hook runs with `conn`.
pub(crate) fn in_wal_hook(conn: &mut BorrowedSqliteConnection) -> Option<WalIndex> {
    // SAFETY: the connection is only borrowed to read its handle; it is neither moved nor
    // replaced.
    let db = RawDb::of(unsafe { conn.inner_mut() });
    // SAFETY: the WAL hook runs on the connection's thread right after its commit, with the
    // WAL index still referenced and mapped by the connection.
    unsafe { wal_index(db.as_ptr()) }
}

/// The WAL index of the main database of the connection `db`, if it is in WAL mode and has
/// mapped its index.
///
/// # Safety
/// `db` must be an open connection in WAL mode, used by the calling thread, and inside a
/// transaction (or its WAL hook): it then holds its own reference to the index and its
/// mapping. Outside one, `xShmMap` may open a reference of its own for the connection, whose
/// later release SQLite does not expect (tests run side by side lost a read lock that way).
unsafe fn wal_index(db: *mut ffi::sqlite3) -> Option<WalIndex> {
    // SAFETY: `db` is open (this function's contract).
    let file = unsafe { main_file(db) }?;
    // SAFETY: a file SQLite handed out has its methods, alive while the connection is open.
    let methods = unsafe { (*file).pMethods };
    // SAFETY: as above; `methods` is not null.
    if methods.is_null() || unsafe { (*methods).iVersion } < 2 {
        return None;
    }
    // SAFETY: as above; version 2 methods have `xShmMap`.
    let map = unsafe { (*methods).xShmMap }?;
    let mut region: *mut c_void = std::ptr::null_mut();
    // SAFETY: region 0 without extending: SQLite maps it if the file has it, else leaves
    // the pointer null. A read-only index answers SQLITE_READONLY with the pointer set.
    let rc = unsafe { map(file, 0, REGION, 0, &mut region) };
    if !(rc == ffi::SQLITE_OK || rc == ffi::SQLITE_READONLY) || region.is_null() {
        return None;
    }
    let word = |at: usize| {
        // SAFETY: region 0 is 32 KiB; the offsets are within its first 120 bytes. Other
        // processes write it concurrently, hence the volatile reads.
        unsafe { std::ptr::read_volatile(region.cast::<u8>().add(at).cast::<u32>()) }
    };
    // isInit, the byte at offset 12 of the header.
    // SAFETY: as above.
    let init = unsafe { std::ptr::read_volatile(region.cast::<u8>().add(12)) };
    (init != 0).then(|| WalIndex {
        committed: word(16),
        checkpointed: word(96),
        marks: [word(100), word(104), word(108), word(112), word(116)],
    })
}

/// The main database's `sqlite3_file` of the open connection `db`; `None` before SQLite
/// opened it.
///
/// # Safety
/// `db` must be an open connection used by the calling thread.
unsafe fn main_file(db: *mut ffi::sqlite3) -> Option<*mut ffi::sqlite3_file> {
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: `db` is open; FILE_POINTER writes the main database's `sqlite3_file*`.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            db,
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            (&mut file as *mut *mut ffi::sqlite3_file).cast::<c_void>(),
        )
    };
    (rc == ffi::SQLITE_OK && !file.is_null()).then_some(file)
}

/// The first 100 bytes of `conn`'s database file (SQLite's header), read through the
/// connection's own descriptor inside a read transaction: opening the file here, and
/// closing it, would drop every POSIX lock this process holds on it (SQLite's locks of
/// other connections included). `None` if any step fails.
pub(crate) fn header_in_read(conn: &mut SqliteConnection) -> Option<[u8; 100]> {
    conn.batch_execute("BEGIN; SELECT count(*) FROM sqlite_master;")
        .ok()?;
    let db = RawDb::of(conn);
    let mut header = [0u8; 100];
    // SAFETY: `db` is `conn`'s, open, used on this thread between its statements.
    let read = unsafe { main_file(db.as_ptr()) }.is_some_and(|file| {
        // SAFETY: a file SQLite handed out has its methods while the connection is open;
        // `xRead` of version 1 methods reads into the 100-byte buffer, which outlives the
        // call, and changes nothing (a short read fills the rest with zeros).
        unsafe {
            let methods = (*file).pMethods;
            !methods.is_null()
                && (*methods).xRead.is_some_and(|x_read| {
                    x_read(file, header.as_mut_ptr().cast::<c_void>(), 100, 0) == ffi::SQLITE_OK
                })
        }
    });
    let _ = conn.batch_execute("COMMIT");
    read.then_some(header)
}
