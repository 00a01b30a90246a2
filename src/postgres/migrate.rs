//! Migrations on PostgreSQL, exactly once across processes and machines.
//!
//! - Every pending migration allows a transaction (the usual case): one `READ COMMITTED`
//!   transaction takes `pg_advisory_xact_lock` on the database's key (waiting at most
//!   `lock_timeout` and what is left of the deadline per attempt, retried with the policy),
//!   re-reads what is applied under the lock, applies the whole batch with its bookkeeping,
//!   and commits; a crash rolls it all back and the server releases the lock.
//! - A pending migration with `run_in_transaction = false` (`CREATE INDEX CONCURRENTLY`):
//!   the lock is a session lock, asked for with `pg_try_advisory_lock` in autocommit and the
//!   policy's jittered backoff. Waiting for it inside a transaction would deadlock with the
//!   holder's `CREATE INDEX CONCURRENTLY`, which waits for every older transaction. Then
//!   each run of pending migrations that allow a transaction is applied in one (with its
//!   bookkeeping: all of the run or none of it), and the others alone. Behind a
//!   transaction pooler, which keeps no session lock, the lock is a transaction-scoped one
//!   in a second session's transaction, held idle meanwhile (see [`SessionLock`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Bool, Integer, Text};
use diesel::{sql_query, Connection, PgConnection, QueryResult, QueryableByName, RunQueryDsl};
use diesel_migrations::MigrationHarness;

use super::pooler::Pinned;
use super::session::millis;
use super::PgAttempt;
use crate::error::{Error, Operation, Result};
use crate::migrate::checksums::{self, TABLE as CHECKSUMS};
use crate::migrate::plan::{check, plan, Batch, Known, Plan, Refusal, State, DIESEL_TABLE};
use crate::migrate::Source;
use crate::options::Options;
use crate::retry::Try;

/// The layer's owner table: PostgreSQL has no `application_id`, so one row holds it.
pub(crate) const OWNER_TABLE: &str = "__sqlite_persistence_owner";

/// The first half of the advisory lock key when the options set no application id: "SQLP".
const DEFAULT_KEY: i32 = 0x5351_4c50;

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(QueryableByName)]
struct Checksum {
    #[diesel(sql_type = Text)]
    version: String,
    #[diesel(sql_type = Text)]
    checksum: String,
}

/// Whether `table` exists in a schema of the session's search path.
///
/// Read from `pg_class` with the statement's snapshot, not with `to_regclass`: name lookups
/// go through the session's catalog cache, which a session that waited for the advisory
/// lock has not refreshed (taking an advisory lock reads no invalidation messages), so it
/// would miss the tables the previous holder committed while the snapshot sees them.
fn exists(conn: &mut PgConnection, table: &str) -> QueryResult<bool> {
    Ok(sql_query(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname = $1 AND n.nspname = ANY (current_schemas(false))) AS flag",
    )
    .bind::<Text, _>(table)
    .get_result::<Flag>(conn)?
    .flag)
}

/// What the database records, statement by statement: inside the batch's transaction, under
/// the lock, where no other migrator can commit meanwhile; or in a read-only snapshot.
pub(crate) fn read_state(conn: &mut PgConnection) -> QueryResult<State> {
    let has_history = exists(conn, DIESEL_TABLE)?;
    let applied: BTreeSet<String> = if has_history {
        sql_query(format!("SELECT version AS name FROM {DIESEL_TABLE}"))
            .load::<Name>(conn)?
            .into_iter()
            .map(|row| row.name)
            .collect()
    } else {
        BTreeSet::new()
    };
    let checksums: BTreeMap<String, String> = if exists(conn, CHECKSUMS)? {
        sql_query(format!("SELECT version, checksum FROM {CHECKSUMS}"))
            .load::<Checksum>(conn)?
            .into_iter()
            .map(|row| (row.version, row.checksum))
            .collect()
    } else {
        BTreeMap::new()
    };
    let application_id = if exists(conn, OWNER_TABLE)? {
        sql_query(format!(
            "SELECT coalesce(max(application_id), 0) AS id FROM {OWNER_TABLE}"
        ))
        .get_result::<Id>(conn)?
        .id as u32
    } else {
        0
    };
    let unmanaged_tables = if has_history {
        Vec::new()
    } else {
        sql_query(
            "SELECT c.relname AS name FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') \
             AND c.relname NOT LIKE '\\_\\_%' ORDER BY 1",
        )
        .load::<Name>(conn)?
        .into_iter()
        .map(|row| row.name)
        .collect()
    };
    Ok(State {
        applied,
        checksums,
        application_id,
        unmanaged_tables,
    })
}

/// [`read_state`] in one read-only snapshot.
pub(crate) fn read_snapshot(conn: &mut PgConnection, pinned: &Pinned) -> QueryResult<State> {
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run(|conn| {
            if !pinned.select.is_empty() {
                conn.batch_execute(&pinned.select)?;
            }
            read_state(conn)
        })
}

/// The plan for `source` on `state`, and its refusal if any.
pub(crate) fn planned(
    source: &Source<Pg>,
    state: State,
    options: &Options,
) -> std::result::Result<Plan, Refusal> {
    let (migrations, known) = source.migrations();
    let plan = plan(known, state, options.application_id);
    check(known, &plan, options, Batch::SplitWhenNeeded)?;
    for &i in &plan.pending {
        let sql = checksums::sql(&*migrations[i]).unwrap_or_default();
        if let Some(command) = super::guard::transaction_command(&sql) {
            tracing::debug!(migration = %crate::escaped::Escaped::new(&known[i].name), command, "migration ends the transaction");
            return Err(Refusal::TransactionControl(known[i].name.clone()));
        }
    }
    Ok(plan)
}

/// The advisory lock key of this application on the database `conn` is connected to.
pub(crate) fn lock_key(conn: &mut PgConnection, options: &Options) -> QueryResult<(i32, i32)> {
    let database = sql_query("SELECT current_database()::text AS name")
        .get_result::<Name>(conn)?
        .name;
    let first = options.application_id.map_or(DEFAULT_KEY, |id| id as i32);
    Ok((first, checksums::fnv1a64(&database) as i32))
}

/// Whether a plan holds a pending migration that cannot run in a transaction.
pub(crate) fn needs_session_lock(known: &[Known], plan: &Plan) -> bool {
    plan.pending.iter().any(|&i| !known[i].transactional)
}

/// The whole batch in one transaction, as one attempt of the retry loop: lock, re-read,
/// re-check, apply, record, commit. Returns the names applied.
pub(crate) fn batch(
    conn: &mut PgConnection,
    source: &Source<Pg>,
    options: &Options,
    shown: &std::path::Path,
    key: (i32, i32),
    attempt: Try,
    pinned: &Pinned,
) -> Result<Vec<String>, PgAttempt<Error>> {
    let layer = |operation| move |source| PgAttempt::Layer(Error::query(operation, source));
    AnsiTransactionManager::begin_transaction_sql(
        conn,
        &format!("BEGIN ISOLATION LEVEL READ COMMITTED{}", pinned.read_write),
    )
    .map_err(layer(Operation::Migrate))?;
    let result = (|| {
        conn.batch_execute(&format!(
            "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = 0{}",
            millis(Some(options.lock_timeout.min(attempt.left))),
            pinned.next_in_batch(),
        ))
        .map_err(layer(Operation::Migrate))?;
        sql_query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind::<Integer, _>(key.0)
            .bind::<Integer, _>(key.1)
            .execute(conn)
            .map_err(layer(Operation::MigrationLock))?;
        let state = read_state(conn).map_err(layer(Operation::ReadMigrationState))?;
        let plan = planned(source, state, options).map_err(|r| PgAttempt::Layer(r.at(shown)))?;
        apply(conn, source, &plan, &plan.pending, true).map_err(PgAttempt::Layer)
    })();
    match result {
        Ok(applied) => {
            // A session lost during this COMMIT is retried like any lost session: the next
            // attempt reads, under the lock, what the batch left, and applies only what is
            // still pending.
            AnsiTransactionManager::commit_transaction(conn).map_err(layer(Operation::Migrate))?;
            Ok(applied)
        }
        Err(error) => {
            let _ = AnsiTransactionManager::rollback_transaction(conn);
            Err(error)
        }
    }
}

/// Applies `pending` (indices into the source) in order with their bookkeeping, stamps the
/// owner and records the checksums the plan lacks; `in_transaction` when the caller's
/// transaction holds the whole batch (else each migration that allows one gets its own).
pub(crate) fn apply(
    conn: &mut PgConnection,
    source: &Source<Pg>,
    plan: &Plan,
    pending: &[usize],
    in_transaction: bool,
) -> Result<Vec<String>> {
    let (migrations, known) = source.migrations();
    let query = |operation| move |source| Error::query(operation, source);
    let bookkeeping = |conn: &mut PgConnection| -> Result<()> {
        if let Some(id) = plan.stamp {
            conn.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {OWNER_TABLE} (\
                   application_id BIGINT NOT NULL, \
                   only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row)); \
                 INSERT INTO {OWNER_TABLE} (application_id) VALUES ({id}) \
                   ON CONFLICT (only_row) DO NOTHING;"
            ))
            .map_err(query(Operation::StampApplicationId))?;
        }
        if !plan.pending.is_empty() {
            // Diesel's own read creates its bookkeeping table, which run_migration writes to.
            conn.applied_migrations()
                .map_err(|source| Error::Migration {
                    name: DIESEL_TABLE.to_owned(),
                    source,
                })?;
        }
        if !plan.pending.is_empty() || !plan.unrecorded.is_empty() {
            conn.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {CHECKSUMS} (
                    version TEXT PRIMARY KEY NOT NULL,
                    name TEXT NOT NULL,
                    checksum TEXT NOT NULL,
                    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )"
            ))
            .map_err(query(Operation::CreateChecksumTable))?;
        }
        for &i in &plan.unrecorded {
            record(conn, &known[i])?;
        }
        Ok(())
    };
    if in_transaction {
        bookkeeping(conn)?;
    } else {
        conn.transaction(|conn| bookkeeping(conn))?;
    }
    let run = |conn: &mut PgConnection, i: usize| -> Result<()> {
        let k = &known[i];
        tracing::debug!(migration = %crate::escaped::Escaped::new(&k.name), "applying migration");
        conn.run_migration(&*migrations[i])
            .map_err(|source| Error::Migration {
                name: k.name.clone(),
                source,
            })?;
        record(conn, k)
    };
    let mut applied = Vec::new();
    let mut rest = pending;
    while let Some(&first) = rest.first() {
        // In the caller's transaction, all of them; else each run of migrations that allow a
        // transaction in one (all of the run or none of it), and the others alone.
        let len = if in_transaction {
            rest.len()
        } else {
            rest.iter().take_while(|&&i| known[i].transactional).count()
        };
        let (now, after) = rest.split_at(len.max(1));
        if in_transaction || !known[first].transactional {
            for &i in now {
                run(conn, i)?;
            }
        } else {
            conn.transaction(|conn| now.iter().try_for_each(|&i| run(conn, i)))?;
        }
        applied.extend(now.iter().map(|&i| known[i].name.clone()));
        rest = after;
    }
    Ok(applied)
}

/// Records one migration's checksum (replacing it after a revert and a re-run).
fn record(conn: &mut PgConnection, k: &Known) -> Result<()> {
    let Some(checksum) = &k.checksum else {
        return Ok(());
    };
    sql_query(format!(
        "INSERT INTO {CHECKSUMS} (version, name, checksum) VALUES ($1, $2, $3) \
         ON CONFLICT (version) DO UPDATE SET name = excluded.name, checksum = excluded.checksum"
    ))
    .bind::<Text, _>(&k.version)
    .bind::<Text, _>(&k.name)
    .bind::<Text, _>(checksum)
    .execute(conn)
    .map(drop)
    .map_err(|source| Error::query(Operation::RecordChecksum, source))
}

/// The migration lock while a migration that cannot run in a transaction is applied.
pub(crate) enum SessionLock {
    /// A session advisory lock of the migrating session's own.
    Own,
    /// Behind a transaction pooler, where a session lock is not kept: a transaction-scoped
    /// lock in a transaction of another session, left idle while the migrating session
    /// applies, and ended when it is done. `CREATE INDEX CONCURRENTLY` does not wait for it:
    /// a `READ COMMITTED` transaction idle between statements holds no snapshot and no lock
    /// on the table. The pooler keeps that transaction on its server connection.
    Held(PgConnection),
}

impl SessionLock {
    /// One try for the lock, in autocommit (or, held, in a transaction ended at once if the
    /// lock is taken): never a wait inside a transaction.
    pub(crate) fn try_take(
        &mut self,
        conn: &mut PgConnection,
        key: (i32, i32),
    ) -> QueryResult<bool> {
        let try_lock = |conn: &mut PgConnection| {
            Ok(
                sql_query("SELECT pg_try_advisory_xact_lock($1, $2) AS flag")
                    .bind::<Integer, _>(key.0)
                    .bind::<Integer, _>(key.1)
                    .get_result::<Flag>(conn)?
                    .flag,
            )
        };
        match self {
            SessionLock::Own => Ok(sql_query("SELECT pg_try_advisory_lock($1, $2) AS flag")
                .bind::<Integer, _>(key.0)
                .bind::<Integer, _>(key.1)
                .get_result::<Flag>(conn)?
                .flag),
            SessionLock::Held(holder) => {
                holder.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")?;
                let taken = try_lock(holder);
                if !matches!(taken, Ok(true)) {
                    holder.batch_execute("ROLLBACK")?;
                    return taken;
                }
                // A statement of the simple protocol drops the unnamed portal of the one
                // before, and its snapshot with it: kept, that snapshot would make
                // `CREATE INDEX CONCURRENTLY` wait for the holder, which waits for it.
                // And the server's idle-in-transaction timeout would end the holder (and
                // release the lock) while a long migration runs.
                holder.batch_execute("SET LOCAL idle_in_transaction_session_timeout = 0")?;
                taken
            }
        }
    }

    /// Whether the migrating session's own settings are session settings, which a
    /// transaction pooler would leave on a server connection.
    pub(crate) fn own_session(&self) -> bool {
        matches!(self, SessionLock::Own)
    }

    /// Releases the lock.
    pub(crate) fn release(self, conn: &mut PgConnection, key: (i32, i32)) -> QueryResult<()> {
        match self {
            SessionLock::Own => sql_query("SELECT pg_advisory_unlock($1, $2)")
                .bind::<Integer, _>(key.0)
                .bind::<Integer, _>(key.1)
                .execute(conn)
                .map(drop),
            // Closing the holder would end its transaction too; this says when.
            SessionLock::Held(mut holder) => holder.batch_execute("COMMIT"),
        }
    }
}

/// Turns the statement and lock timeouts off for this session's migrations that cannot run
/// in a transaction, and back to the options' values afterwards: a migration may rewrite a
/// large table, and `CREATE INDEX CONCURRENTLY` waits for every older transaction (a lock
/// timeout cancelled it half-way, and left an invalid index that the next run of the
/// migration meets: "relation already exists").
pub(crate) fn timeouts(
    conn: &mut PgConnection,
    statement: Option<Duration>,
    lock: Option<Duration>,
) -> QueryResult<()> {
    conn.batch_execute(&format!(
        "SET statement_timeout = {}; SET lock_timeout = {}",
        millis(statement),
        millis(lock)
    ))
}
