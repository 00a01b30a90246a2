//! Migrations applied atomically and exactly once, however many processes race; refused,
//! before anything is written, for a file that belongs to another application, was migrated
//! by a newer binary, or has applied migrations whose SQL changed since.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use diesel::connection::SimpleConnection;
use diesel::migration::Migration;
use diesel::sql_types::{BigInt, Integer, Text};
use diesel::sqlite::Sqlite;
use diesel::{sql_query, QueryResult, QueryableByName, RunQueryDsl, SqliteConnection};
use diesel_migrations::MigrationHarness;

use crate::error::{Error, Result};
use crate::fair::{wait_turn, WriteQueue};
use crate::history;
use crate::options::Options;
use crate::retry::{retry_locked, Clock};

/// A migration source's migrations, listed once.
pub(crate) type Migrations = Vec<Box<dyn Migration<Sqlite>>>;

/// One migration of the binary, with what the checks compare.
pub(crate) struct Known<'m> {
    pub migration: &'m dyn Migration<Sqlite>,
    /// As Diesel records it in `__diesel_schema_migrations`.
    pub version: String,
    pub name: String,
    pub checksum: Option<String>,
}

/// The binary's migrations in version order, each with the checksum of its SQL.
pub(crate) fn known(migrations: &Migrations) -> Vec<Known<'_>> {
    let mut known: Vec<Known> = migrations
        .iter()
        .map(|m| Known {
            migration: &**m,
            version: m.name().version().to_string(),
            name: m.name().to_string(),
            checksum: history::checksum(&**m),
        })
        .collect();
    known.sort_by(|a, b| a.version.cmp(&b.version));
    known
}

/// What a database records about its migrations and its owner, read without writing.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Versions in `__diesel_schema_migrations`.
    pub applied: BTreeSet<String>,
    /// Checksums in the layer's side table, by version.
    pub checksums: BTreeMap<String, String>,
    /// `PRAGMA application_id`; 0 when never set.
    pub application_id: u32,
}

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

#[derive(QueryableByName)]
struct ApplicationId {
    #[diesel(sql_type = Integer)]
    application_id: i32,
}

pub(crate) fn table_exists(conn: &mut SqliteConnection, table: &str) -> QueryResult<bool> {
    Ok(
        sql_query("SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = ?")
            .bind::<Text, _>(table)
            .get_result::<Count>(conn)?
            .n
            > 0,
    )
}

/// Reads the state. Diesel's own `applied_migrations` runs `CREATE TABLE IF NOT EXISTS`
/// first, a write; this reads the bookkeeping only if it exists.
pub(crate) fn read_state(conn: &mut SqliteConnection) -> QueryResult<State> {
    let applied = if table_exists(conn, "__diesel_schema_migrations")? {
        sql_query("SELECT version FROM __diesel_schema_migrations")
            .load::<Version>(conn)?
            .into_iter()
            .map(|row| row.version)
            .collect()
    } else {
        BTreeSet::new()
    };
    let application_id = sql_query("PRAGMA application_id")
        .get_result::<ApplicationId>(conn)?
        .application_id as u32;
    Ok(State {
        applied,
        checksums: history::recorded(conn)?,
        application_id,
    })
}

/// What the binary's migrations and a database's state say together; indices are into the
/// [`known`] list.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Known and not applied, in version order.
    pub pending: Vec<usize>,
    /// Applied but not known to this binary.
    pub unknown: Vec<String>,
    /// Applied, and the recorded checksum differs from the binary's SQL.
    pub edited: Vec<usize>,
    /// Applied with no checksum recorded (applied before the layer, or by plain Diesel).
    pub unrecorded: Vec<usize>,
    /// Applied, and the recorded checksum matches.
    pub verified: usize,
    /// The application id to stamp the file with: the options' id, if the file has none.
    pub stamp: Option<u32>,
}

pub(crate) fn plan(known: &[Known], state: &State, options: &Options) -> Plan {
    let mut plan = Plan {
        stamp: options.application_id.filter(|_| state.application_id == 0),
        ..Plan::default()
    };
    for (i, k) in known.iter().enumerate() {
        if !state.applied.contains(&k.version) {
            plan.pending.push(i);
            continue;
        }
        match (&k.checksum, state.checksums.get(&k.version)) {
            (Some(ours), Some(theirs)) if ours == theirs => plan.verified += 1,
            (Some(_), Some(_)) => plan.edited.push(i),
            (Some(_), None) => plan.unrecorded.push(i),
            (None, _) => {}
        }
    }
    let versions: BTreeSet<&String> = known.iter().map(|k| &k.version).collect();
    plan.unknown = state
        .applied
        .iter()
        .filter(|v| !versions.contains(v))
        .cloned()
        .collect();
    plan
}

/// The refusals, most fundamental first: another application's file, a newer binary's
/// history, edited history, then a pending migration that could not run inside the batch's
/// transaction. Each leaves the file as it was.
pub(crate) fn check(
    path: &Path,
    known: &[Known],
    state: &State,
    plan: &Plan,
    options: &Options,
) -> Result<()> {
    if let Some(expected) = options.application_id {
        if state.application_id != 0 && state.application_id != expected {
            return Err(Error::ForeignDatabase {
                path: path.to_owned(),
                expected,
                found: state.application_id,
            });
        }
    }
    if !plan.unknown.is_empty() && !options.allow_unknown_migrations {
        return Err(Error::UnknownMigrations {
            path: path.to_owned(),
            versions: plan.unknown.clone(),
        });
    }
    if !plan.edited.is_empty() {
        let names: Vec<String> = plan.edited.iter().map(|&i| known[i].name.clone()).collect();
        if !options.allow_edited_migrations {
            return Err(Error::EditedMigrations {
                path: path.to_owned(),
                names,
            });
        }
        tracing::warn!(
            path = %path.display(),
            migrations = %names.join(", "),
            "applied migrations were edited since they ran; accepted as the options allow"
        );
    }
    // Inside the batch's transaction, Diesel would run such a migration in the transaction
    // anyway (VACUUM fails, PRAGMA foreign_keys = OFF is silently ignored); outside it, the
    // batch would not be atomic. Refuse before touching anything.
    if let Some(&i) = plan
        .pending
        .iter()
        .find(|&&i| !known[i].migration.metadata().run_in_transaction())
    {
        return Err(Error::NonTransactionalMigration {
            name: known[i].name.clone(),
        });
    }
    Ok(())
}

/// Applies what is pending, stamps the application id and records missing checksums, and
/// returns the names applied (empty if nothing was pending). `plan` is what the state read
/// (and checked) before says: if it needs no write, no lock is taken.
///
/// Otherwise one `BEGIN IMMEDIATE` re-reads and re-checks the state under the write lock
/// (another process may have migrated meanwhile), applies every pending migration with its
/// bookkeeping row and checksum (Diesel's per-migration transactions nest as savepoints), and
/// commits all of it or none of it. The whole transaction is retried on lock errors.
pub(crate) fn migrate(
    conn: &mut SqliteConnection,
    path: &Path,
    known: &[Known],
    plan: &Plan,
    options: &Options,
    queue: Option<&WriteQueue>,
    clock: &dyn Clock,
) -> Result<Vec<String>> {
    if plan.pending.is_empty() && plan.unrecorded.is_empty() && plan.stamp.is_none() {
        return Ok(Vec::new());
    }
    let (_turn, policy) = wait_turn(queue, "migrate", &options.retry)?;
    let applied = retry_locked(&policy, clock, "migrate", |_| {
        conn.immediate_transaction(|conn| apply(conn, path, known, options))
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

/// The batch, inside the write transaction.
fn apply(
    conn: &mut SqliteConnection,
    path: &Path,
    known: &[Known],
    options: &Options,
) -> Result<Vec<String>> {
    let query = |operation| move |source| Error::query(operation, source);
    let state = read_state(conn).map_err(query("read migration state"))?;
    let plan = plan(known, &state, options);
    check(path, known, &state, &plan, options)?;
    if let Some(id) = plan.stamp {
        conn.batch_execute(&format!("PRAGMA application_id = {}", id as i32))
            .map_err(query("stamp the application id"))?;
    }
    if !plan.pending.is_empty() {
        // Diesel's own read creates its bookkeeping table, which run_migration writes to.
        conn.applied_migrations()
            .map_err(|source| Error::Migration {
                name: "__diesel_schema_migrations".to_owned(),
                source,
            })?;
    }
    if !plan.pending.is_empty() || !plan.unrecorded.is_empty() {
        history::create_table(conn).map_err(query("create the checksum table"))?;
    }
    let mut names = Vec::new();
    for &i in &plan.pending {
        let k = &known[i];
        tracing::debug!(migration = %k.name, "applying migration");
        conn.run_migration(k.migration)
            .map_err(|source| Error::Migration {
                name: k.name.clone(),
                source,
            })?;
        names.push(k.name.clone());
    }
    for &i in plan.pending.iter().chain(&plan.unrecorded) {
        let k = &known[i];
        if let Some(checksum) = &k.checksum {
            history::record(conn, &k.version, &k.name, checksum)
                .map_err(query("record a migration checksum"))?;
        }
    }
    Ok(names)
}
