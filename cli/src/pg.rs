//! The catalog on PostgreSQL: the same store over [`PgDatabase`], its plain Diesel baseline,
//! and fresh databases for the load tests.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use sqlite_persistence::{Error as LayerError, Options, PgDatabase};

use crate::catalog::{record_next_pg, validate_artifact_name, Recorded, APPLICATION_ID};
use crate::error::{Error, Result};
use crate::plain::record_once;
use crate::schema::{artifact_versions, artifacts};

/// The catalog's migrations for PostgreSQL (`cli/pg_migrations/`): the same versions and
/// columns as the SQLite ones.
pub const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("pg_migrations");

/// The catalog on a PostgreSQL database.
#[derive(Debug)]
pub struct PgCatalog {
    db: PgDatabase,
}

impl PgCatalog {
    /// Opens (migrating if needed) the catalog at `url`, with the catalog's application id.
    ///
    /// # Errors
    /// As [`Options::open_postgres`].
    pub fn open(url: &str, options: Options) -> sqlite_persistence::Result<Self> {
        Ok(Self {
            db: options
                .application_id(APPLICATION_ID)
                .open_postgres(url, PG_MIGRATIONS)?,
        })
    }

    /// Records the next version of `artifact`, keeping the transaction open `hold` longer.
    ///
    /// # Errors
    /// A bad name; else as [`PgDatabase::write`].
    pub fn record_holding(&self, artifact: &str, hold: Duration) -> Result<Recorded> {
        validate_artifact_name(artifact)?;
        let written = self
            .db
            .write_measured(|conn| -> sqlite_persistence::Result<i64> {
                Ok(record_next_pg(conn, artifact, hold)?)
            })?;
        Ok(Recorded::written(artifact, written))
    }

    /// Every recorded version of `artifact`, ascending.
    ///
    /// # Errors
    /// As [`PgDatabase::read`].
    pub fn versions(&self, artifact: &str) -> sqlite_persistence::Result<Vec<i64>> {
        self.db
            .read(|conn| -> sqlite_persistence::Result<Vec<i64>> {
                Ok(artifact_versions::table
                    .inner_join(artifacts::table)
                    .filter(artifacts::name.eq(artifact))
                    .select(artifact_versions::version)
                    .order(artifact_versions::version)
                    .load(conn)?)
            })
    }

    /// The database underneath.
    pub fn database(&self) -> &PgDatabase {
        &self.db
    }
}

/// The plain Diesel setup on PostgreSQL: Diesel's r2d2 pool, `run_pending_migrations` at
/// startup, Diesel's default transaction (`READ COMMITTED`) for writes, no retry.
#[derive(Debug)]
pub struct PlainPgCatalog {
    pool: Pool<ConnectionManager<PgConnection>>,
}

impl PlainPgCatalog {
    /// Builds the pool and runs `run_pending_migrations`.
    ///
    /// # Errors
    /// Whatever the plain setup meets: "relation ... already exists", duplicate keys in
    /// Diesel's own table, ...
    pub fn open(url: &str) -> Result<Self> {
        let pool = Pool::builder()
            .max_size(2)
            .connection_timeout(Duration::from_secs(10))
            .build(ConnectionManager::<PgConnection>::new(url))
            .map_err(|source| Error::Pool { source })?;
        let mut conn = pool.get().map_err(|source| Error::Pool { source })?;
        conn.run_pending_migrations(PG_MIGRATIONS)
            .map_err(|source| Error::Baseline {
                operation: "run_pending_migrations",
                source,
            })?;
        drop(conn);
        Ok(Self { pool })
    }

    /// Records the next version in Diesel's default transaction, without retrying.
    ///
    /// # Errors
    /// A duplicate version whenever two writers read the same latest one.
    pub fn record_holding(&self, artifact: &str, hold: Duration) -> Result<Recorded> {
        record_once(artifact, hold, record_next_pg, |record| {
            let mut conn = self.pool.get().map_err(|source| Error::Pool { source })?;
            Ok((*conn).transaction(record))
        })
    }
}

/// Fresh databases for a load test on the server of `url`: created on it (named for this
/// process and the time, never one that exists), dropped when this is dropped. A load test
/// never touches the database the URL names.
#[derive(Debug)]
pub struct FreshDatabases {
    admin: String,
    names: Vec<String>,
    urls: Vec<String>,
}

impl FreshDatabases {
    /// Creates `count` databases on the server of `url`.
    ///
    /// # Errors
    /// If the server cannot be reached or the role may not create databases.
    pub fn create(url: &str, name: &str, count: usize) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut conn = connect(url)?;
        let mut fresh = Self {
            admin: url.to_owned(),
            names: Vec::new(),
            urls: Vec::new(),
        };
        for i in 0..count {
            let db = format!("sp_{name}_{}_{nanos}_{i}", std::process::id());
            conn.batch_execute(&format!("CREATE DATABASE {db}"))
                .map_err(|source| Error::Query {
                    operation: "create a fresh database",
                    source,
                })?;
            fresh.urls.push(with_database(url, &db));
            fresh.names.push(db);
        }
        Ok(fresh)
    }

    /// Their URLs, in order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }
}

impl Drop for FreshDatabases {
    fn drop(&mut self) {
        let Ok(mut conn) = connect(&self.admin) else {
            return;
        };
        for name in &self.names {
            if let Err(error) =
                conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            {
                eprintln!("warning: cannot drop the load test's database {name}: {error}");
            }
        }
    }
}

/// A plain session on `url`, for the command line's own checks.
///
/// # Errors
/// [`Error::Persistence`] with the layer's `Connect` error (the URL without its password).
pub fn connect(url: &str) -> Result<PgConnection> {
    PgConnection::establish(url).map_err(|source| {
        LayerError::Connect {
            url: sqlite_persistence::redact_url(url),
            source,
        }
        .into()
    })
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let authority_start = head.find("://").map_or(0, |i| i + 3);
    let path_start = head[authority_start..]
        .find('/')
        .map_or(head.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &head[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_of_a_url_is_replaced_and_its_parameters_kept() {
        assert_eq!(
            with_database("postgresql:///postgres?host=/tmp/x&user=postgres", "t1"),
            "postgresql:///t1?host=/tmp/x&user=postgres"
        );
        assert_eq!(
            with_database("postgres://u:p@h:5432/app", "t1"),
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(with_database("postgres://h", "t1"), "postgres://h/t1");
    }
}
