//! `sqlite-persistence record`: record new data versions of an artifact.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlite_persistence::Options;

use crate::catalog::{validate_artifact_name, Catalog, Recorded};
use crate::error::Result;
use crate::plain::{LeanCatalog, PlainCatalog};

/// What `record` is asked to do.
#[derive(Debug, Clone)]
pub struct Args {
    /// The artifact's name.
    pub artifact: String,
    /// How many versions to record, one write transaction each.
    pub count: u32,
    /// How long each write transaction stays open.
    pub hold: Duration,
    /// One JSON object per version.
    pub json: bool,
    /// Leave out the fair queue.
    pub no_fair_queue: bool,
    /// The plain Diesel setup instead of the library.
    pub plain: bool,
    /// The lean hand-written setup instead of the library.
    pub lean: bool,
}

/// Records `args.count` versions of `args.artifact` in `path`; `started` is when the process
/// started, for `ready_us`.
///
/// # Errors
/// A bad name (before anything is opened or created), and what opening and writing meet.
pub fn run(path: &Path, args: &Args, started: Instant) -> Result<()> {
    // Before opening: a bad name must not create or migrate a database.
    validate_artifact_name(&args.artifact)?;
    let print = |recorded: Recorded, ready: Duration| -> Result<()> {
        if args.json {
            crate::outln!(
                "{}",
                serde_json::json!({
                    "artifact": recorded.artifact,
                    "version": recorded.version,
                    "wait_us": recorded.wait.as_micros() as u64,
                    "attempts": recorded.attempts,
                    "ready_us": ready.as_micros() as u64,
                })
            )?;
        } else {
            crate::outln!("{} version {}", recorded.artifact, recorded.version)?;
        }
        Ok(())
    };
    #[cfg(feature = "postgres")]
    if let Some(url) = crate::commands::postgres_url(path)? {
        return record_postgres(&url, args, started, print);
    }
    if args.lean {
        let catalog = LeanCatalog::open(path)?;
        let ready = started.elapsed();
        for _ in 0..args.count {
            print(catalog.record_holding(&args.artifact, args.hold)?, ready)?;
        }
    } else if args.plain {
        let catalog = PlainCatalog::open(path)?;
        let ready = started.elapsed();
        for _ in 0..args.count {
            print(catalog.record_holding(&args.artifact, args.hold)?, ready)?;
        }
    } else {
        let options = Options::new().fair_queue(!args.no_fair_queue);
        let catalog = Catalog::open(path, options)?;
        let ready = started.elapsed();
        for _ in 0..args.count {
            print(catalog.record_holding(&args.artifact, args.hold)?, ready)?;
        }
    }
    Ok(())
}

/// [`run`] on PostgreSQL: the catalog there, or its plain baseline.
#[cfg(feature = "postgres")]
fn record_postgres(
    url: &str,
    args: &Args,
    started: Instant,
    print: impl Fn(Recorded, Duration) -> Result<()>,
) -> Result<()> {
    use crate::pg::{PgCatalog, PlainPgCatalog};
    if args.lean {
        return Err(crate::error::Error::Usage {
            what: "record --lean",
            reason: "the lean baseline is one SQLite connection; use --plain on PostgreSQL"
                .to_owned(),
        });
    }
    if args.plain {
        let catalog = PlainPgCatalog::open(url)?;
        let ready = started.elapsed();
        for _ in 0..args.count {
            print(catalog.record_holding(&args.artifact, args.hold)?, ready)?;
        }
    } else {
        let options = Options::new().fair_queue(!args.no_fair_queue);
        let catalog = PgCatalog::open(url, crate::commands::pg_options(options))?;
        let ready = started.elapsed();
        for _ in 0..args.count {
            print(catalog.record_holding(&args.artifact, args.hold)?, ready)?;
        }
    }
    Ok(())
}
