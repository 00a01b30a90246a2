//! What a PostgreSQL database records, read without migrating or writing anything.

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Text};
use diesel::{sql_query, QueryableByName, RunQueryDsl};

use super::session::{self, Server, Settings};
use super::{holders, migrate};
use crate::error::{Error, Operation, Result};
use crate::handle::Checksums;
use crate::holders::Holder;
use crate::migrate::plan::plan;
use crate::migrate::Source;
use crate::options::Options;
use crate::retry::{Deadline, SystemClock};

/// A PostgreSQL database's state, as `status` shows it: the server, the migrations applied,
/// pending and unknown, the checksums, the owner, and who holds the migration lock. Read in
/// one read-only snapshot; nothing is created or written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgStatus {
    /// The URL, without its password.
    pub url: String,
    /// The database's name on the server.
    pub database: String,
    /// `server_version`.
    pub server_version: String,
    /// The application id in the layer's owner table; `None` when it has none.
    pub application_id: Option<u32>,
    /// Applied migrations the source knows, by name, in version order.
    pub applied: Vec<String>,
    /// Migrations of the source not applied yet.
    pub pending: Vec<String>,
    /// Versions applied that the source does not know (a newer binary's).
    pub unknown: Vec<String>,
    /// Checksums of the applied migrations against the source's SQL.
    pub checksums: Checksums,
    /// Tables present without a migration history (another program's database).
    pub unmanaged_tables: Vec<String>,
    /// The sessions holding the migration lock now.
    pub migration_lock: Vec<Holder>,
    /// Sessions connected to this database, this one excluded.
    pub sessions: u32,
}

#[derive(QueryableByName)]
struct About {
    #[diesel(sql_type = Text)]
    database: String,
    #[diesel(sql_type = Text)]
    version: String,
    #[diesel(sql_type = BigInt)]
    sessions: i64,
}

impl PgStatus {
    /// Reads the state of the database at `url` against `migrations`, with `options`'
    /// application id (which also makes the migration lock's key).
    ///
    /// # Errors
    /// [`Error::UnsupportedUrl`], [`Error::Connect`], [`Error::MigrationSource`],
    /// [`Error::Query`] if a read fails, and [`Error::StatementPooling`] if the URL leads to
    /// a statement pooler.
    pub fn read<S: MigrationSource<Pg>>(
        url: &str,
        migrations: S,
        options: &Options,
    ) -> Result<Self> {
        crate::url::expect(url, crate::url::Engine::Postgres)?;
        let source = Source::<Pg>::list(migrations)?;
        let server = Server::new(url, options);
        // Nothing kept in the server's session: behind a transaction pooler, declared or
        // not, a session `SET` would stay on the pooler's server connection for its other
        // clients. The timeouts go `LOCAL` into the one transaction of every read.
        let settings = Settings::new(options);
        let mut conn = session::open(
            &server,
            &super::pooler::probe(&settings),
            &options.retry,
            Deadline::now(&SystemClock, &options.retry),
        )?;
        // Behind a pooler, declared or not, the transaction runs with the database's
        // settings, not what the pooler's other clients left on the server connection.
        let pinned = super::pooler::Pinned::read(&mut conn)
            .map_err(|e| Error::query(Operation::ConfigureSession, e))?;
        let (state, about, migration_lock) = conn
            .build_transaction()
            .repeatable_read()
            .read_only()
            .run(|conn| {
                conn.batch_execute(&format!(
                    "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}{}",
                    session::millis(options.statement_timeout),
                    session::millis(Some(options.lock_timeout)),
                    pinned.next_in_batch(),
                ))?;
                let state = migrate::read_state(conn)?;
                let about = sql_query(
                    "SELECT current_database()::text AS database, \
                     current_setting('server_version') AS version, \
                     (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                      AND pid <> pg_backend_pid()) AS sessions",
                )
                .get_result::<About>(conn)?;
                let key = migrate::lock_key(conn, options)?;
                let lock = holders::advisory(conn, key, crate::holders::HeldLock::MigrationLock)?;
                Ok((state, about, lock))
            })
            .map_err(|e| {
                super::pooler::lost_at_first_begin(
                    Error::query(Operation::ReadStatus, e),
                    &server,
                    &settings,
                )
            })?;
        let (_, known) = source.migrations();
        let plan = plan(known, state, options.application_id);
        let names = |indices: &[usize]| source.names(indices);
        let pending: std::collections::BTreeSet<usize> = plan.pending.iter().copied().collect();
        let applied = (0..known.len())
            .filter(|i| !pending.contains(i))
            .collect::<Vec<_>>();
        Ok(PgStatus {
            url: server.shown().to_owned(),
            database: about.database,
            server_version: about.version,
            application_id: (plan.state.application_id != 0).then_some(plan.state.application_id),
            applied: names(&applied),
            pending: names(&plan.pending),
            unknown: plan.unknown.clone(),
            checksums: Checksums {
                verified: plan.verified,
                edited: names(&plan.edited),
                unrecorded: names(&plan.unrecorded),
            },
            unmanaged_tables: plan.state.unmanaged_tables.clone(),
            migration_lock,
            sessions: about.sessions.max(0) as u32,
        })
    }
}
