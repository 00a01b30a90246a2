//! Everything SQLite's own: what the layer asks of SQLite's C API and of the platform, in
//! the one room that may hold `unsafe` code (`ffi`).

#[allow(unsafe_code)]
pub(crate) mod ffi;
