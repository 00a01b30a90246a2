//! The demo store: named artifacts and their data versions. A worked example of an
//! application on the library, and what the command line and the cross-process tests drive.

use std::path::Path;
use std::time::Duration;

use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::{Database, Options};

use crate::error::{Error, Result};
use crate::schema::{artifact_versions, artifacts};

/// The catalog's migrations (`cli/migrations/`).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The catalog's `PRAGMA application_id`: `SPct` in ASCII. A catalog file carries it, and
/// the catalog refuses files that carry another.
pub const APPLICATION_ID: u32 = u32::from_be_bytes(*b"SPct");

/// The longest artifact name accepted, in bytes.
pub const MAX_ARTIFACT_NAME: usize = 255;

/// A catalog of named artifacts and their data versions.
///
/// Recording a version from many processes at once yields distinct, gapless versions
/// 1, 2, 3, ... per artifact: each is a read-then-write (read the latest, write the next),
/// which is safe because [`Database::write`] holds the write lock from the start.
#[derive(Debug)]
pub struct Catalog {
    db: Database,
}

/// One recorded data version.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recorded {
    /// The artifact's name.
    pub artifact: String,
    /// The new version, 1 for the first.
    pub version: i64,
    /// From asking to write until the write transaction began.
    pub wait: Duration,
    /// How many times the transaction was started.
    pub attempts: u32,
}

impl Recorded {
    /// The version a layer's write of `artifact` recorded, with what the write cost.
    pub(crate) fn written(
        artifact: &str,
        (version, stats): (i64, sqlite_persistence::WriteStats),
    ) -> Self {
        Self {
            artifact: artifact.to_owned(),
            version,
            wait: stats.wait,
            attempts: stats.attempts,
        }
    }
}

impl Catalog {
    /// Opens (creating and migrating if needed) the catalog at `path`, with the catalog's
    /// [`APPLICATION_ID`] in place of any the options set.
    ///
    /// # Errors
    /// As [`Options::open`]; `ForeignDatabase` for a file of another application.
    pub fn open(path: impl AsRef<Path>, options: Options) -> sqlite_persistence::Result<Self> {
        Ok(Self {
            db: options
                .application_id(APPLICATION_ID)
                .open(path, MIGRATIONS)?,
        })
    }

    /// Records the next data version of `artifact` (creating it at its first version).
    ///
    /// # Errors
    /// [`Error::ArtifactName`] for an empty, over-long, control-character or invisible-character
    /// name; otherwise
    /// as [`Database::write`].
    pub fn record(&self, artifact: &str) -> Result<Recorded> {
        self.record_holding(artifact, Duration::ZERO)
    }

    /// [`record`](Catalog::record), keeping the write transaction open `hold` longer: the
    /// simulated work of a real transaction, for benchmarks and tests.
    ///
    /// # Errors
    /// As [`record`](Catalog::record).
    pub fn record_holding(&self, artifact: &str, hold: Duration) -> Result<Recorded> {
        validate_artifact_name(artifact)?;
        let written = self
            .db
            .write_measured(|conn| -> sqlite_persistence::Result<i64> {
                Ok(record_next(conn, artifact, hold)?)
            })?;
        Ok(Recorded::written(artifact, written))
    }

    /// Every recorded version of `artifact`, ascending (empty if it is unknown).
    ///
    /// # Errors
    /// As [`Database::read`].
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

    /// Every artifact with its latest version, by name.
    ///
    /// # Errors
    /// As [`Database::read`].
    pub fn artifacts(&self) -> sqlite_persistence::Result<Vec<(String, i64)>> {
        self.db
            .read(|conn| -> sqlite_persistence::Result<Vec<(String, i64)>> {
                Ok(artifacts::table
                    .select((artifacts::name, artifacts::latest_version))
                    .order(artifacts::name)
                    .load(conn)?)
            })
    }

    /// The database underneath.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The database underneath, keeping it.
    pub fn into_database(self) -> Database {
        self.db
    }
}

/// Defines `$name`, which claims the next version of `artifact` on a `$conn`: reads the
/// latest and writes the next. The same statements on each engine.
macro_rules! record_next_on {
    ($(#[$attr:meta])* $name:ident, $conn:ty) => {
        $(#[$attr])*
        pub fn $name(conn: &mut $conn, artifact: &str, hold: Duration) -> QueryResult<i64> {
            diesel::insert_into(artifacts::table)
                .values(artifacts::name.eq(artifact))
                .on_conflict_do_nothing()
                .execute(conn)?;
            let (id, latest): (i32, i64) = artifacts::table
                .filter(artifacts::name.eq(artifact))
                .select((artifacts::id, artifacts::latest_version))
                .first(conn)?;
            let version = latest + 1;
            diesel::update(artifacts::table.find(id))
                .set(artifacts::latest_version.eq(version))
                .execute(conn)?;
            diesel::insert_into(artifact_versions::table)
                .values((
                    artifact_versions::artifact_id.eq(id),
                    artifact_versions::version.eq(version),
                ))
                .execute(conn)?;
            if !hold.is_zero() {
                std::thread::sleep(hold);
            }
            Ok(version)
        }
    };
}

record_next_on!(
    /// Claims the next version of `artifact`: reads the latest and writes the next. Safe only
    /// in a transaction that holds the write lock from its start; the plain Diesel baseline
    /// runs it in a deferred one to show what happens otherwise.
    record_next,
    SqliteConnection
);

#[cfg(feature = "postgres")]
record_next_on!(
    /// [`record_next`] on PostgreSQL: safe in a `SERIALIZABLE` transaction that runs again on
    /// a conflict; the plain baseline runs it in Diesel's default (`READ COMMITTED`) one.
    record_next_pg,
    diesel::PgConnection
);

/// Characters that are not shown, or that reorder the text around them (Unicode's format
/// characters and the bidirectional controls): two names that look the same must be the same.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// Checks an artifact name as [`Catalog::record`] does, without touching a database: not
/// empty, no white space around it, at most [`MAX_ARTIFACT_NAME`] bytes, no control,
/// invisible or text-direction characters.
///
/// # Errors
/// [`Error::ArtifactName`] saying which rule the name breaks.
pub fn validate_artifact_name(name: &str) -> Result<()> {
    let reason = if name.trim().is_empty() {
        "it is empty".to_owned()
    } else if name.trim() != name {
        // " a" and "a" would be two artifacts that print alike.
        "it begins or ends with white space".to_owned()
    } else if name.len() > MAX_ARTIFACT_NAME {
        format!(
            "it is {} bytes long, the limit is {MAX_ARTIFACT_NAME}",
            name.len()
        )
    } else if name.chars().any(char::is_control) {
        "it contains a control character".to_owned()
    } else if let Some(c) = name.chars().find(|&c| is_invisible(c)) {
        format!(
            "it contains U+{:04X}, an invisible or text-direction character",
            c as u32
        )
    } else {
        return Ok(());
    };
    Err(Error::ArtifactName { reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_per_artifact_in_memory() {
        let catalog = Catalog::open(":memory:", Options::new()).unwrap();
        assert_eq!(
            catalog.database().journal_mode(),
            sqlite_persistence::JournalMode::Memory
        );
        assert_eq!(catalog.database().applied_at_open().len(), 3);
        for expected in 1..=3 {
            assert_eq!(catalog.record("a").unwrap().version, expected);
        }
        assert_eq!(catalog.record("b").unwrap().version, 1);
        assert_eq!(catalog.versions("a").unwrap(), [1, 2, 3]);
        assert_eq!(
            catalog.artifacts().unwrap(),
            [("a".to_owned(), 3), ("b".to_owned(), 1)]
        );
        assert!(catalog.versions("missing").unwrap().is_empty());
    }

    #[test]
    fn bad_names_are_refused_before_any_write() {
        let catalog = Catalog::open(":memory:", Options::new()).unwrap();
        for name in [
            "",
            "   ",
            "a\nb",
            &"x".repeat(256),
            "a\u{200B}b",
            "model\u{202E}txt.exe",
            "\u{FEFF}a",
        ] {
            let error = catalog.record(name).unwrap_err();
            assert!(matches!(error, Error::ArtifactName { .. }), "{error}");
        }
        assert!(catalog.artifacts().unwrap().is_empty());
    }
}
