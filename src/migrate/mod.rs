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
use crate::holders::Holder;
use crate::operation::Operation;
use crate::options::Options;
use crate::retry::RetryPolicy;

/// Whether `holder` is a process (or session) applying migrations: the write queue's
/// holder that recorded a migration (SQLite), or a session holding the migration lock that
/// is not idle outside a transaction (PostgreSQL: such a session holds the lock and does
/// nothing).
fn migrating(holder: &Holder) -> bool {
    holder.operation == Some(Operation::Migrate)
}

/// Runs `round` (a bounded wait for the migration lock and the batch, ending in
/// [`Error::Busy`] at the retry deadline; given the policy to wait with, whose deadline is
/// cut to what is left of the migration wait) again while the `Busy` names a live process
/// that is migrating, until [`Options::migration_wait`] from `started` has passed. A `Busy`
/// after more than one round counts its time from `started`.
pub(crate) fn while_others_migrate<T>(
    options: &Options,
    started: Instant,
    mut round: impl FnMut(bool, &RetryPolicy) -> Result<T>,
) -> Result<T> {
    let mut first = true;
    // Whether the last round ended while a migrating process held the lock: a round after
    // it that ends without one may have ended as that process finished, with the lock free
    // a moment later, and gets one more round.
    let mut was_migrating = false;
    loop {
        let left = options.migration_wait.saturating_sub(started.elapsed());
        let policy = if first {
            options.retry
        } else {
            options
                .retry
                .max_elapsed(options.retry.deadline().min(left))
        };
        match round(first, &policy) {
            Err(Error::Busy { ref holders, .. })
                if started.elapsed() < options.migration_wait && holders.iter().any(migrating) =>
            {
                let holder = holders.iter().find(|h| migrating(h)).map(Holder::to_string);
                tracing::warn!(
                    holder = %crate::escaped::Escaped::new(&holder.unwrap_or_default()),
                    waited_ms = started.elapsed().as_millis() as u64,
                    limit_ms = options.migration_wait.as_millis() as u64,
                    "another process is still migrating: waiting on, up to the migration wait"
                );
                first = false;
                was_migrating = true;
            }
            Err(Error::Busy { .. })
                if was_migrating && started.elapsed() < options.migration_wait =>
            {
                was_migrating = false;
            }
            Err(Error::Busy {
                operation,
                attempts,
                source,
                holders,
                ..
            }) if !first => Err(Error::Busy {
                operation,
                attempts,
                elapsed: started.elapsed(),
                source,
                holders,
            })?,
            other => return other,
        }
    }
}
