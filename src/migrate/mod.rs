//! What both engines share of migrating: the pure planner (what is applied, pending, unknown
//! or edited, and whether to refuse) and the checksums of migrations' SQL. Each engine runs
//! the batch its own way (`sqlite::open`, `postgres::migrate`).

pub(crate) mod checksums;
pub(crate) mod plan;

pub(crate) use plan::Source;
#[cfg(feature = "sqlite")]
pub(crate) use plan::State;

use std::time::Instant;

use crate::error::{Error, Result};
use crate::holders::{HeldLock, Holder};
use crate::operation::Operation;
use crate::options::Options;

/// Whether `holder` is a process (or session) applying migrations.
fn migrating(holder: &Holder) -> bool {
    holder.lock == HeldLock::MigrationLock || holder.operation == Some(Operation::Migrate)
}

/// Runs `round` (a bounded wait for the migration lock and the batch, ending in
/// [`Error::Busy`] at the retry deadline) again while the `Busy` names a live process that
/// is migrating, until [`Options::migration_wait`] from `started` has passed.
pub(crate) fn while_others_migrate<T>(
    options: &Options,
    started: Instant,
    mut round: impl FnMut(bool) -> Result<T>,
) -> Result<T> {
    let mut first = true;
    loop {
        match round(first) {
            Err(Error::Busy { ref holders, .. })
                if started.elapsed() < options.migration_wait && holders.iter().any(migrating) =>
            {
                let holder = holders.iter().find(|h| migrating(h)).map(Holder::to_string);
                tracing::info!(
                    holder = %crate::escaped::Escaped::new(&holder.unwrap_or_default()),
                    waited_ms = started.elapsed().as_millis() as u64,
                    limit_ms = options.migration_wait.as_millis() as u64,
                    "another process is still migrating; waiting on"
                );
                first = false;
            }
            other => return other,
        }
    }
}
