//! What both engines share of migrating: the pure planner (what is applied, pending, unknown
//! or edited, and whether to refuse) and the checksums of migrations' SQL. Each engine runs
//! the batch its own way (`sqlite::open`, `postgres::migrate`).

pub(crate) mod checksums;
pub(crate) mod plan;

pub(crate) use plan::Source;
#[cfg(feature = "sqlite")]
pub(crate) use plan::State;
