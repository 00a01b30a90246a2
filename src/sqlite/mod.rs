//! Everything SQLite's own, behind the `sqlite` feature: the handle (`database`), its pool
//! and customizer, the write queue, checkpoints, the read-age cap, the migration guard,
//! closing, status, backup, the classification of lock errors (`codes`), and what the layer
//! asks of SQLite's C API and of the platform, in the one room that may hold `unsafe` code
//! (`ffi`). The migration planner both engines share is `crate::migrate`.

#[allow(unsafe_code)]
pub(crate) mod ffi;

pub(crate) mod backup;
pub(crate) mod checkpoint;
pub(crate) mod closing;
pub(crate) mod codes;
pub(crate) mod customizer;
pub(crate) mod database;
pub(crate) mod files;
pub(crate) mod group;
pub(crate) mod guard;
pub(crate) mod lock_table;
pub(crate) mod open;
pub(crate) mod pool;
pub(crate) mod queue;
pub(crate) mod read_age;
pub(crate) mod side;
pub(crate) mod status;
