//! `sqlite-persistence backup`: a verified online backup of the catalog.

use std::path::Path;

use sqlite_persistence::Options;

use crate::catalog::Catalog;
use crate::error::Result;

/// Writes a verified copy of the database at `path` to `to`, a file that must not exist,
/// while other processes go on writing; prints where, how large and how long.
///
/// # Errors
/// As [`Catalog::open`] and `Database::backup_to`.
pub fn run(path: &Path, to: &Path, json: bool) -> Result<()> {
    crate::commands::sqlite_only(path, "backup")?;
    // A backup never creates (nor migrates) the database it copies.
    let catalog = Catalog::open(path, Options::new().create_if_missing(false))?;
    let backup = catalog.database().backup_to(to)?;
    if json {
        crate::outln!(
            "{}",
            serde_json::json!({
                "path": backup.path,
                "bytes": backup.bytes,
                "elapsed_ms": backup.elapsed.as_millis() as u64,
            })
        )?;
    } else {
        crate::outln!(
            "backup {}: {} bytes in {} ms",
            backup.path.display(),
            backup.bytes,
            backup.elapsed.as_millis()
        )?;
    }
    Ok(())
}
