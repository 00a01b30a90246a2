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
    let applied = db.applied_at_open();
    if applied.is_empty() {
        crate::outln!("{}: up to date, nothing applied", path.display())?;
    } else {
        for name in applied {
            crate::outln!("applied {name}")?;
        }
    }
    Ok(())
}
