//! `sqlite-persistence status`: what a database looks like, without changing it.

use std::path::Path;

use sqlite_persistence::{Options, Status};

use crate::catalog::MIGRATIONS;
use crate::commands::migration_dir;
use crate::error::Result;

/// Reads the status of `path` against the catalog's migrations, or those in `migrations`, and
/// prints it (one JSON object with `json`).
///
/// # Errors
/// As [`Status::read`], and a migrations directory that cannot be read.
pub fn run(path: &Path, migrations: Option<&Path>, json: bool) -> Result<()> {
    #[cfg(feature = "postgres")]
    if let Some(url) = crate::commands::postgres_url(path)? {
        return postgres(&url, migrations, json);
    }
    let status = match migrations {
        Some(dir) => Status::read(path, migration_dir(dir)?, &Options::new())?,
        None => Status::read(path, MIGRATIONS, &Options::new())?,
    };
    print_status(&status, json)
}

fn print_status(status: &Status, json: bool) -> Result<()> {
    if json {
        crate::outln!(
            "{}",
            serde_json::json!({
                "path": status.path,
                "exists": status.exists,
                "filesystem": status.filesystem,
                "network_filesystem": status.network_filesystem,
                "journal_mode": status.journal_mode,
                "application_id": status.application_id,
                "applied": status.applied,
                "pending": status.pending,
                "unknown": status.unknown,
                "checksums": checksums_json(&status.checksums),
                "integrity": status.integrity,
                "sizes": {
                    "database": status.sizes.database,
                    "wal": status.sizes.wal,
                    "shm": status.sizes.shm,
                },
                "wal_frames": status.wal_frames,
                "wal_committed_frames": status.wal_committed_frames,
                "wal_checkpointed_frames": status.wal_checkpointed_frames,
                "database_complete": status.database_complete,
                "holders": holders_json(&status.holders),
                "wal_readers": holders_json(&status.wal_readers),
                "pinning_readers": holders_json(&status.pinning_readers),
                "last_checkpoint_unix_ms": status
                    .last_checkpoint
                    .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64),
            })
        )?;
        return Ok(());
    }
    let size = |bytes: Option<u64>| bytes.map_or("-".to_owned(), |b| format!("{b} B"));
    crate::outln!("database      {}", status.path.display())?;
    crate::outln!("exists        {}", if status.exists { "yes" } else { "no" })?;
    crate::outln!(
        "filesystem    {}{}",
        status.filesystem.as_deref().unwrap_or("-"),
        if status.network_filesystem {
            " (network: WAL refused)"
        } else {
            ""
        }
    )?;
    crate::outln!(
        "journal mode  {}",
        status.journal_mode.as_deref().unwrap_or("-")
    )?;
    print_migrations(
        status.application_id,
        [&status.applied, &status.pending, &status.unknown],
        &status.checksums,
    )?;
    crate::outln!(
        "integrity     {}",
        if status.integrity.is_empty() {
            "-".to_owned()
        } else {
            status.integrity.join("; ")
        }
    )?;
    crate::outln!(
        "sizes         database {}, wal {}, shm {}",
        size(status.sizes.database),
        size(status.sizes.wal),
        size(status.sizes.shm)
    )?;
    crate::outln!(
        "wal frames    {}",
        status.wal_frames.map_or("-".to_owned(), |n| n.to_string())
    )?;
    let people = |holders: &[sqlite_persistence::Holder]| {
        if holders.is_empty() {
            "none".to_owned()
        } else {
            holders
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        }
    };
    crate::outln!(
        "checkpointed  {}",
        match (status.wal_checkpointed_frames, status.wal_committed_frames) {
            (Some(done), Some(committed)) => format!("{done} of {committed} committed frames"),
            _ => "-".to_owned(),
        }
    )?;
    crate::outln!(
        "checkpoint    {}",
        match status.last_checkpoint.map(|at| at.elapsed()) {
            Some(Ok(ago)) => format!(
                "{:.1} s ago (the last one this crate's connections made)",
                ago.as_secs_f64()
            ),
            Some(Err(_)) => "just now".to_owned(),
            None => "none recorded".to_owned(),
        }
    )?;
    crate::outln!(
        "file alone    {}",
        if status.database_complete {
            "complete (holds every commit)"
        } else {
            "incomplete (the WAL holds commits not copied back yet)"
        }
    )?;
    crate::outln!("holders       {}", people(&status.holders))?;
    crate::outln!("readers       {}", people(&status.wal_readers))?;
    crate::outln!("pinned by     {}", people(&status.pinning_readers))?;
    Ok(())
}

/// `N: a, b, c`, or `0`.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "0".to_owned()
    } else {
        format!("{}: {}", items.len(), items.join(", "))
    }
}

/// The lines both engines' status shows: the owner, the applied, pending and unknown
/// migrations, and the checksums.
fn print_migrations(
    application: Option<u32>,
    [applied, pending, unknown]: [&[String]; 3],
    checksums: &sqlite_persistence::Checksums,
) -> Result<()> {
    crate::outln!("app id        {}", application_id(application))?;
    crate::outln!("applied       {}", list(applied))?;
    crate::outln!("pending       {}", list(pending))?;
    crate::outln!("unknown       {}", list(unknown))?;
    crate::outln!(
        "checksums     {} verified, edited {}, unrecorded {}",
        checksums.verified,
        list(&checksums.edited),
        list(&checksums.unrecorded)
    )?;
    Ok(())
}

/// An application id in hex and as four characters, or `-`.
fn application_id(id: Option<u32>) -> String {
    id.map_or("-".to_owned(), |id| {
        let text: String = id
            .to_be_bytes()
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
            .collect();
        format!("{id:#010x} ({text})")
    })
}

/// `{"verified", "edited", "unrecorded"}`.
fn checksums_json(checksums: &sqlite_persistence::Checksums) -> serde_json::Value {
    serde_json::json!({
        "verified": checksums.verified,
        "edited": checksums.edited,
        "unrecorded": checksums.unrecorded,
    })
}

/// `[{"pid", "command", "lock"}]`.
fn holders_json(holders: &[sqlite_persistence::Holder]) -> serde_json::Value {
    holders
        .iter()
        .map(|h| {
            serde_json::json!({
                "pid": h.pid,
                "command": h.command,
                "operation": h.operation.map(|o| o.as_str()),
                "since_unix_ms": h.since.and_then(|s| s.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64),
                "lock": match h.lock {
                    sqlite_persistence::HeldLock::WriteQueue => "write queue",
                    sqlite_persistence::HeldLock::WriteLock => "write lock",
                    sqlite_persistence::HeldLock::WalReader => "wal reader",
                    sqlite_persistence::HeldLock::FileReader => "file reader",
                    sqlite_persistence::HeldLock::MigrationLock => "migration lock",
                    sqlite_persistence::HeldLock::ServerWriteQueue => "write queue (server)",
                    sqlite_persistence::HeldLock::ServerTransaction => "write transaction",
                    _ => "other",
                },
            })
        })
        .collect()
}

/// [`run`] on PostgreSQL: the catalog's migrations (and lock key) unless `migrations` names
/// others.
#[cfg(feature = "postgres")]
fn postgres(url: &str, migrations: Option<&Path>, json: bool) -> Result<()> {
    use sqlite_persistence::PgStatus;
    let status = match migrations {
        Some(dir) => PgStatus::read(
            url,
            migration_dir(dir)?,
            &crate::commands::pg_options(Options::new()),
        )?,
        None => PgStatus::read(
            url,
            crate::pg::PG_MIGRATIONS,
            &crate::commands::pg_options(
                Options::new().application_id(crate::catalog::APPLICATION_ID),
            ),
        )?,
    };
    if json {
        crate::outln!(
            "{}",
            serde_json::json!({
                "url": status.url,
                "database": status.database,
                "server_version": status.server_version,
                "application_id": status.application_id,
                "applied": status.applied,
                "pending": status.pending,
                "unknown": status.unknown,
                "checksums": checksums_json(&status.checksums),
                "unmanaged_tables": status.unmanaged_tables,
                "migration_lock": holders_json(&status.migration_lock),
                "sessions": status.sessions,
            })
        )?;
        return Ok(());
    }
    crate::outln!("database      {} ({})", status.url, status.database)?;
    crate::outln!("server        PostgreSQL {}", status.server_version)?;
    print_migrations(
        status.application_id,
        [&status.applied, &status.pending, &status.unknown],
        &status.checksums,
    )?;
    if !status.unmanaged_tables.is_empty() {
        crate::outln!("unmanaged     {}", list(&status.unmanaged_tables))?;
    }
    let holders: Vec<String> = status
        .migration_lock
        .iter()
        .map(ToString::to_string)
        .collect();
    crate::outln!(
        "migrating     {}",
        if holders.is_empty() {
            "nobody".to_owned()
        } else {
            holders.join(", ")
        }
    )?;
    crate::outln!("sessions      {}", status.sessions)?;
    Ok(())
}
