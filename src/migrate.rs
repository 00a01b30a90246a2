//! Migrations applied atomically and exactly once, however many processes race.

use std::collections::BTreeSet;
use std::path::Path;

use diesel::migration::Migration;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::Sqlite;
use diesel::{sql_query, QueryResult, QueryableByName, RunQueryDsl, SqliteConnection};
use diesel_migrations::MigrationHarness;

use crate::error::{Error, Result};
use crate::fair::{wait_turn, WriteQueue};
use crate::options::Options;
use crate::retry::{retry_locked, Clock};

/// A migration source's migrations, listed once.
pub(crate) type Migrations = Vec<Box<dyn Migration<Sqlite>>>;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Text)]
    version: String,
}

/// The versions recorded in `__diesel_schema_migrations`, read without creating the table:
/// Diesel's own `applied_migrations` runs `CREATE TABLE IF NOT EXISTS` first, a write.
pub(crate) fn applied_versions(conn: &mut SqliteConnection) -> QueryResult<BTreeSet<String>> {
    let exists = sql_query(
        "SELECT count(*) AS n FROM sqlite_master \
         WHERE type = 'table' AND name = '__diesel_schema_migrations'",
    )
    .get_result::<Count>(conn)?
    .n > 0;
    if !exists {
        return Ok(BTreeSet::new());
    }
    Ok(sql_query("SELECT version FROM __diesel_schema_migrations")
        .load::<Version>(conn)?
        .into_iter()
        .map(|row| row.version)
        .collect())
}

/// What a migration source and a database's bookkeeping say together.
pub(crate) struct Plan<'m> {
    /// Known and not applied, in version order.
    pub pending: Vec<&'m dyn Migration<Sqlite>>,
    /// Applied but not known to this binary.
    pub unknown: Vec<String>,
}

pub(crate) fn plan<'m>(migrations: &'m Migrations, applied: &BTreeSet<String>) -> Plan<'m> {
    let known: BTreeSet<String> = migrations
        .iter()
        .map(|m| m.name().version().to_string())
        .collect();
    let mut pending: Vec<&dyn Migration<Sqlite>> = migrations
        .iter()
        .filter(|m| !applied.contains(&m.name().version().to_string()))
        .map(|m| &**m)
        .collect();
    pending.sort_by(|a, b| a.name().version().cmp(&b.name().version()));
    Plan {
        pending,
        unknown: applied.difference(&known).cloned().collect(),
    }
}

/// Applies what is pending and returns the names applied (empty if nothing was pending).
///
/// Fast path: the bookkeeping is read without a write lock, and if nothing is pending no
/// lock is taken. Otherwise one `BEGIN IMMEDIATE` re-reads the bookkeeping under the write
/// lock (another process may have migrated meanwhile), applies every pending migration with
/// its bookkeeping row (Diesel's per-migration transactions nest as savepoints), and commits
/// all of it or none of it. The whole transaction is retried on lock errors.
pub(crate) fn migrate(
    conn: &mut SqliteConnection,
    path: &Path,
    migrations: &Migrations,
    options: &Options,
    queue: Option<&WriteQueue>,
    clock: &dyn Clock,
) -> Result<Vec<String>> {
    let check = |applied: &BTreeSet<String>| -> Result<Vec<&dyn Migration<Sqlite>>> {
        let plan = plan(migrations, applied);
        if !plan.unknown.is_empty() && !options.allow_unknown_migrations {
            return Err(Error::UnknownMigrations {
                path: path.to_owned(),
                versions: plan.unknown,
            });
        }
        Ok(plan.pending)
    };

    let applied = retry_locked(&options.retry, clock, "read applied migrations", |_| {
        applied_versions(conn).map_err(Error::from)
    })?
    .value;
    let pending = check(&applied)?;
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    // Inside the batch's transaction, Diesel would run such a migration in the transaction
    // anyway (VACUUM fails, PRAGMA foreign_keys = OFF is silently ignored); outside it, the
    // batch would not be atomic. Refuse before touching anything.
    if let Some(m) = pending.iter().find(|m| !m.metadata().run_in_transaction()) {
        return Err(Error::NonTransactionalMigration {
            name: m.name().to_string(),
        });
    }

    let (_turn, policy) = wait_turn(queue, "migrate", &options.retry)?;
    let applied = retry_locked(&policy, clock, "migrate", |_| {
        conn.immediate_transaction(|conn| {
            // Under the lock, Diesel's own read: it also creates the bookkeeping table.
            let applied = conn
                .applied_migrations()
                .map_err(|source| Error::Migration {
                    name: "__diesel_schema_migrations".to_owned(),
                    source,
                })?
                .into_iter()
                .map(|version| version.to_string())
                .collect();
            let mut names = Vec::new();
            for migration in check(&applied)? {
                let name = migration.name().to_string();
                tracing::debug!(migration = %name, "applying migration");
                conn.run_migration(migration)
                    .map_err(|source| Error::Migration {
                        name: name.clone(),
                        source,
                    })?;
                names.push(name);
            }
            Ok::<_, Error>(names)
        })
    })?
    .value;
    if !applied.is_empty() {
        tracing::info!(
            path = %path.display(),
            count = applied.len(),
            migrations = %applied.join(", "),
            "migrations applied"
        );
    }
    Ok(applied)
}
