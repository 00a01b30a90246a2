//! `sqlite-persistence migrate`: open and apply what is pending.

use std::path::Path;

use sqlite_persistence::Options;

use crate::catalog::Catalog;
use crate::commands::migration_dir;
use crate::error::Result;
use crate::plain::PlainCatalog;

/// Opens `path` and applies the catalog's pending migrations (or those in `migrations`),
/// printing each one applied; `plain` runs the plain Diesel setup instead and prints nothing.
///
/// # Errors
/// As [`Options::open`] (or the plain setup's).
pub fn run(path: &Path, migrations: Option<&Path>, plain: bool) -> Result<()> {
    #[cfg(feature = "postgres")]
    if let Some(url) = crate::commands::postgres_url(path)? {
        return migrate_postgres(&url, migrations, plain);
    }
    if plain {
        match migrations {
            Some(dir) => PlainCatalog::open_with(path, migration_dir(dir)?)?,
            None => PlainCatalog::open(path)?,
        };
        return Ok(());
    }
    let db = match migrations {
        Some(dir) => Options::new().open(path, migration_dir(dir)?)?,
        None => Catalog::open(path, Options::new())?.into_database(),
    };
    report(&path.display().to_string(), db.applied_at_open())
}

/// Prints what an open applied.
fn report(database: &str, applied: &[String]) -> Result<()> {
    if applied.is_empty() {
        crate::outln!("{database}: up to date, nothing applied")?;
    } else {
        for name in applied {
            crate::outln!("applied {name}")?;
        }
    }
    Ok(())
}

/// [`run`] on PostgreSQL.
#[cfg(feature = "postgres")]
fn migrate_postgres(url: &str, migrations: Option<&Path>, plain: bool) -> Result<()> {
    use crate::pg::{PgCatalog, PlainPgCatalog};
    if plain {
        if migrations.is_some() {
            return Err(crate::error::Error::Usage {
                what: "migrate --plain",
                reason: "on PostgreSQL the plain setup applies the catalog's migrations only"
                    .to_owned(),
            });
        }
        PlainPgCatalog::open(url)?;
        return Ok(());
    }
    let db = match migrations {
        Some(dir) => super::pg_options(Options::new()).open_postgres(url, migration_dir(dir)?)?,
        None => {
            return {
                let catalog = PgCatalog::open(url, super::pg_options(Options::new()))?;
                report(
                    catalog.database().url(),
                    catalog.database().applied_at_open(),
                )
            }
        }
    };
    report(db.url(), db.applied_at_open())
}
