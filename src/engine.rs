//! A handle to the database of either engine, chosen by the URL's scheme alone (see
//! [`Engine::of`]).

use diesel::migration::MigrationSource;
#[cfg(feature = "postgres")]
use diesel::pg::Pg;
#[cfg(feature = "sqlite")]
use diesel::sqlite::Sqlite;

use crate::error::{Error, Result};
use crate::handle::WriteStats;
use crate::options::Options;
#[cfg(feature = "postgres")]
use crate::postgres::PgDatabase;
#[cfg(feature = "sqlite")]
use crate::sqlite::database::Database;
use crate::url::Engine;

/// Migrations that every engine of this build can run: a Diesel migration source of each
/// backend (`embed_migrations!` and `FileBasedMigrations` are).
#[cfg(all(feature = "sqlite", feature = "postgres"))]
pub trait AnyMigrations: MigrationSource<Sqlite> + MigrationSource<Pg> {}
#[cfg(all(feature = "sqlite", feature = "postgres"))]
impl<T: MigrationSource<Sqlite> + MigrationSource<Pg>> AnyMigrations for T {}

/// Migrations that every engine of this build can run: a Diesel migration source of each
/// backend (`embed_migrations!` and `FileBasedMigrations` are).
#[cfg(all(feature = "sqlite", not(feature = "postgres")))]
pub trait AnyMigrations: MigrationSource<Sqlite> {}
#[cfg(all(feature = "sqlite", not(feature = "postgres")))]
impl<T: MigrationSource<Sqlite>> AnyMigrations for T {}

/// Migrations that every engine of this build can run: a Diesel migration source of each
/// backend (`embed_migrations!` and `FileBasedMigrations` are).
#[cfg(all(not(feature = "sqlite"), feature = "postgres"))]
pub trait AnyMigrations: MigrationSource<Pg> {}
#[cfg(all(not(feature = "sqlite"), feature = "postgres"))]
impl<T: MigrationSource<Pg>> AnyMigrations for T {}

/// A database of whichever engine its URL named ([`Options::open_url`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyDatabase {
    /// A SQLite file.
    #[cfg(feature = "sqlite")]
    Sqlite(Database),
    /// A PostgreSQL database.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    Postgres(PgDatabase),
}

/// The connection a closure of [`AnyDatabase::write`] or [`AnyDatabase::read`] is given.
#[non_exhaustive]
pub enum AnyConnection<'a> {
    /// A SQLite connection.
    #[cfg(feature = "sqlite")]
    Sqlite(&'a mut diesel::SqliteConnection),
    /// A PostgreSQL session.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    Postgres(&'a mut diesel::PgConnection),
}

impl AnyDatabase {
    /// Its engine.
    pub fn engine(&self) -> Engine {
        match self {
            #[cfg(feature = "sqlite")]
            AnyDatabase::Sqlite(_) => Engine::Sqlite,
            #[cfg(feature = "postgres")]
            AnyDatabase::Postgres(_) => Engine::Postgres,
        }
    }

    /// [`Database::write`] or [`PgDatabase::write`]: `f` gets the engine's connection.
    ///
    /// # Errors
    /// As the engine's `write`.
    pub fn write<T, E, F>(&self, mut f: F) -> Result<T, E>
    where
        F: FnMut(AnyConnection<'_>) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        match self {
            #[cfg(feature = "sqlite")]
            AnyDatabase::Sqlite(db) => db.write(|conn| f(AnyConnection::Sqlite(conn))),
            #[cfg(feature = "postgres")]
            AnyDatabase::Postgres(db) => db.write(|conn| f(AnyConnection::Postgres(conn))),
        }
    }

    /// [`Database::write_measured`] or [`PgDatabase::write_measured`]: `f` gets the engine's
    /// connection.
    ///
    /// # Errors
    /// As the engine's `write`.
    pub fn write_measured<T, E, F>(&self, mut f: F) -> Result<(T, WriteStats), E>
    where
        F: FnMut(AnyConnection<'_>) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        match self {
            #[cfg(feature = "sqlite")]
            AnyDatabase::Sqlite(db) => db.write_measured(|conn| f(AnyConnection::Sqlite(conn))),
            #[cfg(feature = "postgres")]
            AnyDatabase::Postgres(db) => db.write_measured(|conn| f(AnyConnection::Postgres(conn))),
        }
    }

    /// [`Database::read`] or [`PgDatabase::read`]: `f` gets the engine's connection.
    ///
    /// # Errors
    /// As the engine's `read`.
    pub fn read<T, E, F>(&self, mut f: F) -> Result<T, E>
    where
        F: FnMut(AnyConnection<'_>) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        match self {
            #[cfg(feature = "sqlite")]
            AnyDatabase::Sqlite(db) => db.read(|conn| f(AnyConnection::Sqlite(conn))),
            #[cfg(feature = "postgres")]
            AnyDatabase::Postgres(db) => db.read(|conn| f(AnyConnection::Postgres(conn))),
        }
    }

    /// The names of the migrations this open applied.
    pub fn applied_at_open(&self) -> &[String] {
        match self {
            #[cfg(feature = "sqlite")]
            AnyDatabase::Sqlite(db) => db.applied_at_open(),
            #[cfg(feature = "postgres")]
            AnyDatabase::Postgres(db) => db.applied_at_open(),
        }
    }
}

/// The environment variable [`Options::open_database_url`] reads.
pub const DATABASE_URL: &str = "DATABASE_URL";

impl Options {
    /// Opens `url` with the engine its scheme names (see [`Engine::of`]): a SQLite file as
    /// [`Options::open`] does, a PostgreSQL database as [`Options::open_postgres`] does.
    ///
    /// # Errors
    /// [`Error::UnsupportedUrl`] for a scheme this build does not open; else the engine's
    /// open errors.
    ///
    /// # Examples
    /// ```
    /// use diesel_migrations::{embed_migrations, EmbeddedMigrations};
    /// use sqlite_persistence::{AnyDatabase, Engine, Options};
    ///
    /// const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
    ///
    /// # fn main() -> sqlite_persistence::Result<()> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let url = format!("sqlite://{}", dir.path().join("app.db").display());
    /// let db = Options::new().open_url(&url, MIGRATIONS)?;
    /// assert_eq!(db.engine(), Engine::Sqlite);
    /// # Ok(())
    /// # }
    /// ```
    pub fn open_url<S: AnyMigrations>(self, url: &str, migrations: S) -> Result<AnyDatabase> {
        match Engine::of(url)? {
            #[cfg(feature = "sqlite")]
            Engine::Sqlite => self.open(url, migrations).map(AnyDatabase::Sqlite),
            #[cfg(not(feature = "sqlite"))]
            Engine::Sqlite => Err(Error::UnsupportedUrl {
                url: crate::url::redact(url),
                scheme: "sqlite".to_owned(),
                enabled: crate::url::ENABLED,
            }),
            #[cfg(feature = "postgres")]
            Engine::Postgres => self
                .open_postgres(url, migrations)
                .map(AnyDatabase::Postgres),
            #[cfg(not(feature = "postgres"))]
            Engine::Postgres => unreachable!("Engine::of refuses PostgreSQL without its feature"),
        }
    }

    /// [`Options::open_url`] on `$DATABASE_URL`.
    ///
    /// # Errors
    /// [`Error::NoDatabaseUrl`] if it is unset, empty or not UTF-8; else as
    /// [`Options::open_url`].
    pub fn open_database_url<S: AnyMigrations>(self, migrations: S) -> Result<AnyDatabase> {
        match std::env::var(DATABASE_URL) {
            Ok(url) if !url.trim().is_empty() => self.open_url(&url, migrations),
            _ => Err(Error::NoDatabaseUrl),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_alone_chooses_the_engine() {
        for sqlite in [
            "app.db",
            "/srv/app.db",
            "sqlite:///srv/app.db",
            "file:app.db",
            ":memory:",
            "dir:with:colons/app.db",
        ] {
            assert_eq!(Engine::of(sqlite).unwrap(), Engine::Sqlite, "{sqlite}");
        }
        for other in ["mysql://u:secret@h/db", "http://h/x", "redis://h"] {
            let error = Engine::of(other).unwrap_err();
            assert!(matches!(error, Error::UnsupportedUrl { .. }), "{other}");
            assert!(!error.to_string().contains("secret"), "{error}");
        }
        #[cfg(feature = "postgres")]
        for pg in [
            "postgres://h/db",
            "postgresql:///db?host=/tmp",
            "PostgreSQL://h",
        ] {
            assert_eq!(Engine::of(pg).unwrap(), Engine::Postgres, "{pg}");
        }
        #[cfg(not(feature = "postgres"))]
        {
            let error = Engine::of("postgres://h/db").unwrap_err();
            assert!(error.to_string().contains("feature postgres"), "{error}");
        }
    }
}
