//! Checksums of applied migrations' SQL, so that a migration edited after it ran is noticed.
//!
//! Diesel records only a migration's version. The layer also records a checksum of the SQL
//! each migration ran, in `__sqlite_persistence_checksums`, in the same transaction, and
//! compares it with the binary's SQL at every open. Diesel's `Migration` does not expose its
//! SQL, so the checksum is taken by running the migration against a connection that only
//! records what it is asked to execute.

use std::any::Any;

use diesel::backend::Backend;
use diesel::connection::{BoxableConnection, SimpleConnection};
use diesel::migration::Migration;
use diesel::QueryResult;

/// The side table. Its name starts with `__` like Diesel's own bookkeeping table; exclude it
/// from `diesel print-schema` as you would that one.
pub(crate) const TABLE: &str = "__sqlite_persistence_checksums";

/// A stand-in connection that records the SQL a migration would execute.
#[derive(Default)]
struct Recorder {
    sql: String,
}

impl SimpleConnection for Recorder {
    fn batch_execute(&mut self, query: &str) -> QueryResult<()> {
        self.sql.push_str(query);
        Ok(())
    }
}

impl<DB: Backend> BoxableConnection<DB> for Recorder {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The checksum of the SQL `migration` runs: `fnv1a64:` and 16 hex digits, over the SQL with
/// CRLF line ends read as LF (a checkout on Windows must not count as an edit). `None` for a
/// migration that runs no SQL through `batch_execute` (an empty one, or a hand-written
/// `Migration` that needs a real connection): it cannot be checked.
///
/// FNV-1a detects edits, not deliberate collisions; it needs no dependency and is stable
/// across Rust versions, which `std`'s hasher is not.
pub(crate) fn checksum<DB: Backend>(migration: &dyn Migration<DB>) -> Option<String> {
    let sql = sql(migration)?;
    Some(format!(
        "fnv1a64:{:016x}",
        fnv1a64(&sql.replace("\r\n", "\n"))
    ))
}

/// The SQL `migration` runs through `batch_execute`, recorded without running it; `None`
/// for one that runs none (or needs a real connection).
pub(crate) fn sql<DB: Backend>(migration: &dyn Migration<DB>) -> Option<String> {
    let mut recorder = Recorder::default();
    migration.run(&mut recorder).ok()?;
    (!recorder.sql.is_empty()).then_some(recorder.sql)
}

pub(crate) fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(feature = "sqlite")]
pub(crate) use sqlite_tables::*;

/// The SQLite side.
#[cfg(feature = "sqlite")]
mod sqlite_tables {
    use std::collections::BTreeMap;

    use diesel::connection::SimpleConnection;
    use diesel::sql_types::{BigInt, Text};
    use diesel::{sql_query, QueryResult, QueryableByName, RunQueryDsl, SqliteConnection};

    use super::TABLE;

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    /// Whether `table` exists, read without writing (Diesel's own reads of its bookkeeping table
    /// create it first).
    pub(crate) fn table_exists(conn: &mut SqliteConnection, table: &str) -> QueryResult<bool> {
        Ok(
            sql_query("SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind::<Text, _>(table)
                .get_result::<Count>(conn)?
                .n
                > 0,
        )
    }

    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        version: String,
        #[diesel(sql_type = Text)]
        checksum: String,
    }

    /// The recorded checksums by version; empty if the table does not exist (yet).
    pub(crate) fn recorded(conn: &mut SqliteConnection) -> QueryResult<BTreeMap<String, String>> {
        if !table_exists(conn, TABLE)? {
            return Ok(BTreeMap::new());
        }
        Ok(sql_query(format!("SELECT version, checksum FROM {TABLE}"))
            .load::<Row>(conn)?
            .into_iter()
            .map(|row| (row.version, row.checksum))
            .collect())
    }

    /// Creates the table if needed; inside the migration batch's transaction.
    pub(crate) fn create_table(conn: &mut SqliteConnection) -> QueryResult<()> {
        conn.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                version TEXT PRIMARY KEY NOT NULL,
                name TEXT NOT NULL,
                checksum TEXT NOT NULL,
                recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
            )"
        ))
    }

    /// Records (or replaces, after a revert and a re-run) one migration's checksum.
    pub(crate) fn record(
        conn: &mut SqliteConnection,
        version: &str,
        name: &str,
        checksum: &str,
    ) -> QueryResult<()> {
        sql_query(format!(
            "INSERT OR REPLACE INTO {TABLE} (version, name, checksum) VALUES (?, ?, ?)"
        ))
        .bind::<Text, _>(version)
        .bind::<Text, _>(name)
        .bind::<Text, _>(checksum)
        .execute(conn)
        .map(drop)
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use diesel::migration::MigrationSource;
    use diesel::sqlite::Sqlite;

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn the_checksum_is_taken_without_running_anything_and_ignores_crlf() {
        const EMBEDDED: diesel_migrations::EmbeddedMigrations =
            diesel_migrations::embed_migrations!("migrations");
        let migrations = MigrationSource::<Sqlite>::migrations(&EMBEDDED).unwrap();
        let sums: Vec<_> = migrations.iter().map(|m| checksum(&**m).unwrap()).collect();
        assert!(sums
            .iter()
            .all(|s| s.starts_with("fnv1a64:") && s.len() == 24));
        assert_ne!(sums[0], sums[1]);

        let dir = tempfile::tempdir().unwrap();
        let write = |sql: &str| {
            let m = dir.path().join("2026-01-01-000001_one");
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(m.join("up.sql"), sql).unwrap();
            std::fs::write(m.join("down.sql"), "SELECT 1;").unwrap();
            let source = diesel_migrations::FileBasedMigrations::from_path(dir.path()).unwrap();
            let list = MigrationSource::<Sqlite>::migrations(&source).unwrap();
            checksum(&*list[0])
        };
        let lf = write("CREATE TABLE t (x INTEGER);\nCREATE TABLE u (y INTEGER);\n");
        let crlf = write("CREATE TABLE t (x INTEGER);\r\nCREATE TABLE u (y INTEGER);\r\n");
        let edited = write("CREATE TABLE t (x INTEGER, z TEXT);\nCREATE TABLE u (y INTEGER);\n");
        assert_eq!(lf, crlf);
        assert_ne!(lf, edited);
        // An empty migration runs nothing and cannot be checked.
        assert_eq!(write(""), None);
    }
}
