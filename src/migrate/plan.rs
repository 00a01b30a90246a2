//! The migration plan: what a migration source and a database's records say together. One
//! type, read without writing, checked, and applied atomically and exactly once however many
//! processes race; opening and [`Status`](crate::Status) both use it.
//!
//! The planner itself ([`plan`], [`check`]) is pure: it takes what the source and the file
//! say and returns lists and refusals, so that table-driven tests cover every case without a
//! database.

use std::collections::{BTreeMap, BTreeSet};

use diesel::backend::Backend;
use diesel::migration::{Migration, MigrationSource};

use super::checksums;
use crate::error::{Error, Result};
use crate::options::Options;

/// Diesel's bookkeeping table.
pub(crate) const DIESEL_TABLE: &str = "__diesel_schema_migrations";

/// One migration of the source, as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Known {
    /// As Diesel records it in `__diesel_schema_migrations`.
    pub version: String,
    /// Its directory name.
    pub name: String,
    /// Of its SQL; `None` if it runs none that can be recorded.
    pub checksum: Option<String>,
    /// `run_in_transaction` of its metadata.
    pub transactional: bool,
}

/// A migration source's migrations, listed once, in version order, with what the planner
/// needs of each (`known[i]` describes `migrations[i]`).
pub(crate) struct Source<DB: Backend> {
    migrations: Vec<Box<dyn Migration<DB>>>,
    known: Vec<Known>,
}

/// What a database records about its migrations and its owner, read without writing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct State {
    /// Versions in `__diesel_schema_migrations`.
    pub applied: BTreeSet<String>,
    /// Checksums in the layer's side table, by version.
    pub checksums: BTreeMap<String, String>,
    /// `PRAGMA application_id`; 0 when never set.
    pub application_id: u32,
    /// The file's tables, read only when it has no migration history (Diesel's table is
    /// missing): a file with tables but no history was made by another program.
    pub unmanaged_tables: Vec<String>,
}

/// What the source and a database's state say together; indices are into the source's
/// migrations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The state it was made from.
    pub state: State,
    /// Known and not applied, in version order.
    pub pending: Vec<usize>,
    /// Applied but not known to the source.
    pub unknown: Vec<String>,
    /// Applied, and the recorded checksum differs from the source's SQL.
    pub edited: Vec<usize>,
    /// Applied with no checksum recorded (applied before the layer, or by plain Diesel).
    pub unrecorded: Vec<usize>,
    /// Applied, and the recorded checksum matches.
    pub verified: usize,
    /// The application id to stamp the file with: the options' id, if the file has none.
    pub stamp: Option<u32>,
}

/// Why a plan cannot go ahead; see [`check`]. It becomes an [`Error`] naming the file with
/// [`Refusal::at`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The file carries another application id.
    Foreign { expected: u32, found: u32 },
    /// Applied versions the source does not know.
    Unknown(Vec<String>),
    /// Applied migrations whose SQL changed.
    Edited(Vec<String>),
    /// A pending migration that would run outside the batch's transaction.
    NonTransactional(String),
    /// Tables without a migration history.
    Unmanaged(Vec<String>),
    /// A pending migration whose SQL ends the batch's transaction (found by reading it, on
    /// PostgreSQL; SQLite's authorizer refuses the statement as it is prepared).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    TransactionControl(String),
}

impl Refusal {
    /// The error for the file at `path`.
    pub(crate) fn at(self, path: &std::path::Path) -> Error {
        let path = path.to_owned();
        match self {
            Refusal::Foreign { expected, found } => Error::ForeignDatabase {
                path,
                expected,
                found,
            },
            Refusal::Unknown(versions) => Error::UnknownMigrations { path, versions },
            Refusal::Edited(names) => Error::EditedMigrations { path, names },
            Refusal::NonTransactional(name) => Error::NonTransactionalMigration { name },
            Refusal::Unmanaged(tables) => Error::UnmanagedDatabase { path, tables },
            Refusal::TransactionControl(name) => Error::TransactionControl { name },
        }
    }
}

/// The planner: what `known` (in version order) and `state` say together, for a file that
/// should carry `application_id` (if any).
pub(crate) fn plan(known: &[Known], state: State, application_id: Option<u32>) -> Plan {
    let mut plan = Plan {
        stamp: application_id.filter(|_| state.application_id == 0),
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
    plan.state = state;
    plan
}

/// The refusals, most fundamental first: another application's file (its id, or tables
/// without a migration history), a newer binary's history, edited history, then a pending
/// migration that could not run inside the batch's transaction. An accepted edit (the options allow it) is logged at `warn`.
pub(crate) fn check(
    known: &[Known],
    plan: &Plan,
    options: &Options,
    engine: Batch,
) -> std::result::Result<(), Refusal> {
    if let Some(expected) = options.application_id {
        let found = plan.state.application_id;
        if found != 0 && found != expected {
            return Err(Refusal::Foreign { expected, found });
        }
    }
    let ours = options.application_id.is_some() && plan.state.application_id != 0;
    if !plan.state.unmanaged_tables.is_empty()
        && !plan.pending.is_empty()
        && !ours
        && !options.allow_unmanaged_tables
    {
        return Err(Refusal::Unmanaged(plan.state.unmanaged_tables.clone()));
    }
    if !plan.unknown.is_empty() && !options.allow_unknown_migrations {
        return Err(Refusal::Unknown(plan.unknown.clone()));
    }
    if !plan.edited.is_empty() {
        let names = names(known, &plan.edited);
        if !options.allow_edited_migrations {
            return Err(Refusal::Edited(names));
        }
        tracing::warn!(
            migrations = %crate::escaped::Escaped::new(&names.join(", ")),
            "applied migrations were edited since they ran; accepted as the options allow"
        );
    }
    // Inside the batch's transaction, Diesel would run such a migration in the transaction
    // anyway (VACUUM fails, PRAGMA foreign_keys = OFF is silently ignored); outside it, the
    // batch would not be atomic. Refuse before touching anything.
    if engine == Batch::OneTransaction {
        if let Some(&i) = plan.pending.iter().find(|&&i| !known[i].transactional) {
            return Err(Refusal::NonTransactional(known[i].name.clone()));
        }
    }
    Ok(())
}

/// How an engine applies a batch that holds a migration with `run_in_transaction = false`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Batch {
    /// Always in one transaction: such a migration is refused (SQLite).
    OneTransaction,
    /// In one transaction when every pending migration allows it, else each migration in
    /// its own, the others in autocommit, under a session lock (PostgreSQL).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    SplitWhenNeeded,
}

/// The names of `known[i]` for each index.
fn names(known: &[Known], indices: &[usize]) -> Vec<String> {
    indices.iter().map(|&i| known[i].name.clone()).collect()
}

impl Plan {
    /// Whether applying it writes anything: pending migrations, checksums to record, an id
    /// to stamp. A plan that writes nothing takes no lock.
    pub(crate) fn needs_write(&self) -> bool {
        !self.pending.is_empty() || !self.unrecorded.is_empty() || self.stamp.is_some()
    }
}

/// The SQLite side.
#[cfg(feature = "sqlite")]
mod state_sqlite {
    use diesel::sql_types::Integer;
    use diesel::{
        sql_query, Connection, QueryResult, QueryableByName, RunQueryDsl, SqliteConnection,
    };

    use std::collections::BTreeSet;

    use super::{checksums, State, DIESEL_TABLE};

    #[derive(QueryableByName)]
    struct Version {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }

    #[derive(QueryableByName)]
    struct ApplicationId {
        #[diesel(sql_type = Integer)]
        application_id: i32,
    }

    impl State {
        /// Reads the state, in one read transaction (a savepoint inside the batch's), so that
        /// every part of it comes from one snapshot: read statement by statement, a process could
        /// see no migration history, then the tables another process's batch had just committed.
        /// Diesel's own `applied_migrations` runs `CREATE TABLE IF NOT EXISTS` first, a write;
        /// this reads the bookkeeping only if it exists.
        pub(crate) fn read(conn: &mut SqliteConnection) -> QueryResult<Self> {
            conn.transaction(Self::read_in)
        }

        fn read_in(conn: &mut SqliteConnection) -> QueryResult<Self> {
            let has_history = checksums::table_exists(conn, DIESEL_TABLE)?;
            let applied = if has_history {
                sql_query(format!("SELECT version FROM {DIESEL_TABLE}"))
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
            let unmanaged_tables = if !has_history {
                sql_query(
                    "SELECT name AS version FROM sqlite_master WHERE type = 'table' \
                     AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_\\_%' ESCAPE '\\' \
                     ORDER BY name",
                )
                .load::<Version>(conn)?
                .into_iter()
                .map(|row| row.version)
                .collect()
            } else {
                Vec::new()
            };
            Ok(State {
                applied,
                checksums: checksums::recorded(conn)?,
                application_id,
                unmanaged_tables,
            })
        }
    }
}

impl<DB: Backend> Source<DB> {
    /// Lists `source`'s migrations once, in version order, with each one's checksum.
    ///
    /// # Errors
    /// [`Error::MigrationSource`] if the source cannot list them.
    pub(crate) fn list<S: MigrationSource<DB>>(source: S) -> Result<Self> {
        let mut migrations = source
            .migrations()
            .map_err(|source| Error::MigrationSource { source })?;
        migrations.sort_by_key(|m| m.name().version().to_string());
        let known = migrations
            .iter()
            .map(|m| Known {
                version: m.name().version().to_string(),
                name: m.name().to_string(),
                checksum: checksums::checksum(&**m),
                transactional: m.metadata().run_in_transaction(),
            })
            .collect();
        Ok(Self { migrations, known })
    }

    /// The plan for a database in `state`.
    pub(crate) fn plan(&self, state: State, options: &Options) -> Plan {
        plan(&self.known, state, options.application_id)
    }

    /// The names of the migrations at `indices`.
    pub(crate) fn names(&self, indices: &[usize]) -> Vec<String> {
        names(&self.known, indices)
    }

    /// The migrations, and what the planner knows of each (same indices).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn migrations(&self) -> (&[Box<dyn Migration<DB>>], &[Known]) {
        (&self.migrations, &self.known)
    }
}

/// The SQLite side.
#[cfg(feature = "sqlite")]
mod source_sqlite {
    use diesel::connection::SimpleConnection;
    use diesel::sqlite::Sqlite;
    use diesel::{QueryResult, SqliteConnection};
    use diesel_migrations::MigrationHarness;

    use super::{check, checksums, Batch, Plan, Refusal, Source, State, DIESEL_TABLE};
    use crate::error::{Error, Operation, Result};
    use crate::options::Options;
    use crate::sqlite::guard;
    use crate::sqlite::open::Target;

    impl Source<Sqlite> {
        /// The plan for the database `conn` is open on, read without writing.
        pub(crate) fn read(
            &self,
            conn: &mut SqliteConnection,
            options: &Options,
        ) -> QueryResult<Plan> {
            Ok(self.plan(State::read(conn)?, options))
        }

        /// [`check`] against this source, for a SQLite batch.
        pub(crate) fn check(
            &self,
            plan: &Plan,
            options: &Options,
        ) -> std::result::Result<(), Refusal> {
            check(&self.known, plan, options, Batch::OneTransaction)
        }

        /// The batch, inside the caller's write transaction (`BEGIN IMMEDIATE`): re-reads and
        /// re-checks the state under the write lock (another process may have migrated
        /// meanwhile), stamps the application id, applies every pending migration with its
        /// bookkeeping row (Diesel's per-migration transactions nest as savepoints) and records
        /// the checksums. Returns the names applied.
        pub(crate) fn apply(
            &self,
            conn: &mut SqliteConnection,
            target: &Target,
            options: &Options,
        ) -> Result<Vec<String>> {
            let query = |operation| move |source| Error::query(operation, source);
            let plan = self
                .read(conn, options)
                .map_err(query(Operation::ReadMigrationState))?;
            self.check(&plan, options)
                .map_err(|refusal| refusal.at(target.path()))?;
            if let Some(id) = plan.stamp {
                conn.batch_execute(&format!("PRAGMA application_id = {}", id as i32))
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
                checksums::create_table(conn).map_err(query(Operation::CreateChecksumTable))?;
            }
            let mut applied = Vec::new();
            for &i in &plan.pending {
                let k = &self.known[i];
                tracing::debug!(migration = %crate::escaped::Escaped::new(&k.name), "applying migration");
                let (result, ends_the_transaction) =
                    guard::migrating(|| conn.run_migration(&*self.migrations[i]));
                if ends_the_transaction {
                    return Err(Error::TransactionControl {
                        name: k.name.clone(),
                    });
                }
                result.map_err(|source| Error::Migration {
                    name: k.name.clone(),
                    source,
                })?;
                applied.push(k.name.clone());
            }
            for &i in plan.pending.iter().chain(&plan.unrecorded) {
                let k = &self.known[i];
                if let Some(checksum) = &k.checksum {
                    checksums::record(conn, &k.version, &k.name, checksum)
                        .map_err(query(Operation::RecordChecksum))?;
                }
            }
            Ok(applied)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source migration: version `v`, named `v_name`, with checksum `sum` (if any).
    fn known(v: &str, sum: Option<&str>) -> Known {
        Known {
            version: v.to_owned(),
            name: format!("{v}_name"),
            checksum: sum.map(str::to_owned),
            transactional: true,
        }
    }

    /// A state: applied versions with their recorded checksums (`None`: none recorded).
    fn state(applied: &[(&str, Option<&str>)], application_id: u32) -> State {
        State {
            applied: applied.iter().map(|(v, _)| v.to_string()).collect(),
            checksums: applied
                .iter()
                .filter_map(|(v, sum)| sum.map(|s| (v.to_string(), s.to_owned())))
                .collect(),
            application_id,
            unmanaged_tables: Vec::new(),
        }
    }

    /// A file with `tables` and no migration history, carrying `application_id`.
    fn unmanaged(tables: &[&str], application_id: u32) -> State {
        State {
            unmanaged_tables: tables.iter().map(|t| t.to_string()).collect(),
            ..state(&[], application_id)
        }
    }

    const APP: u32 = 0x4D79_4170;

    struct Case {
        name: &'static str,
        known: Vec<Known>,
        state: State,
        options: Options,
        pending: Vec<usize>,
        unknown: Vec<&'static str>,
        edited: Vec<usize>,
        unrecorded: Vec<usize>,
        verified: usize,
        stamp: Option<u32>,
        refusal: Option<Refusal>,
    }

    fn source() -> Vec<Known> {
        vec![
            known("1", Some("a")),
            known("2", Some("b")),
            known("3", Some("c")),
        ]
    }

    fn case(name: &'static str, state: State) -> Case {
        Case {
            name,
            known: source(),
            state,
            options: Options::new(),
            pending: vec![],
            unknown: vec![],
            edited: vec![],
            unrecorded: vec![],
            verified: 0,
            stamp: None,
            refusal: None,
        }
    }

    #[test]
    fn the_planner_sorts_every_migration_and_refuses_what_it_must() {
        let cases = vec![
            Case {
                pending: vec![0, 1, 2],
                ..case("fresh file: everything pending", state(&[], 0))
            },
            Case {
                verified: 3,
                ..case(
                    "all applied and verified",
                    state(&[("1", Some("a")), ("2", Some("b")), ("3", Some("c"))], 0),
                )
            },
            Case {
                pending: vec![2],
                verified: 2,
                ..case(
                    "one pending",
                    state(&[("1", Some("a")), ("2", Some("b"))], 0),
                )
            },
            Case {
                unknown: vec!["4"],
                verified: 3,
                refusal: Some(Refusal::Unknown(vec!["4".to_owned()])),
                ..case(
                    "schema ahead: a newer binary migrated",
                    state(
                        &[
                            ("1", Some("a")),
                            ("2", Some("b")),
                            ("3", Some("c")),
                            ("4", Some("d")),
                        ],
                        0,
                    ),
                )
            },
            Case {
                unknown: vec!["4"],
                verified: 3,
                options: Options::new().allow_unknown_migrations(true),
                ..case(
                    "schema ahead, allowed",
                    state(
                        &[
                            ("1", Some("a")),
                            ("2", Some("b")),
                            ("3", Some("c")),
                            ("4", None),
                        ],
                        0,
                    ),
                )
            },
            Case {
                edited: vec![1],
                verified: 2,
                refusal: Some(Refusal::Edited(vec!["2_name".to_owned()])),
                ..case(
                    "edited after it ran",
                    state(&[("1", Some("a")), ("2", Some("B")), ("3", Some("c"))], 0),
                )
            },
            Case {
                edited: vec![1],
                verified: 2,
                options: Options::new().allow_edited_migrations(true),
                ..case(
                    "edited, allowed",
                    state(&[("1", Some("a")), ("2", Some("B")), ("3", Some("c"))], 0),
                )
            },
            Case {
                unrecorded: vec![0, 1],
                pending: vec![2],
                ..case(
                    "applied by plain diesel: no checksums yet",
                    state(&[("1", None), ("2", None)], 0),
                )
            },
            Case {
                pending: vec![0, 1, 2],
                stamp: Some(APP),
                options: Options::new().application_id(APP),
                ..case("a fresh file is stamped", state(&[], 0))
            },
            Case {
                verified: 3,
                options: Options::new().application_id(APP),
                ..case(
                    "our own file",
                    state(&[("1", Some("a")), ("2", Some("b")), ("3", Some("c"))], APP),
                )
            },
            Case {
                pending: vec![0, 1, 2],
                options: Options::new().application_id(APP),
                refusal: Some(Refusal::Foreign {
                    expected: APP,
                    found: 7,
                }),
                ..case("another application's file", state(&[], 7))
            },
            Case {
                pending: vec![0, 1, 2],
                ..case("no id asked for: any id is accepted", state(&[], 7))
            },
            Case {
                unknown: vec!["9"],
                options: Options::new().application_id(APP),
                refusal: Some(Refusal::Foreign {
                    expected: APP,
                    found: 7,
                }),
                pending: vec![0, 1, 2],
                ..case("foreign comes before unknown", state(&[("9", None)], 7))
            },
            Case {
                known: vec![
                    known("1", Some("a")),
                    Known {
                        transactional: false,
                        ..known("2", Some("b"))
                    },
                ],
                pending: vec![1],
                verified: 1,
                refusal: Some(Refusal::NonTransactional("2_name".to_owned())),
                ..case(
                    "a pending non-transactional migration",
                    state(&[("1", Some("a"))], 0),
                )
            },
            Case {
                known: vec![
                    Known {
                        transactional: false,
                        ..known("1", Some("a"))
                    },
                    known("2", Some("b")),
                ],
                pending: vec![1],
                verified: 1,
                ..case(
                    "an applied non-transactional migration is history",
                    state(&[("1", Some("a"))], 0),
                )
            },
            Case {
                pending: vec![0, 1, 2],
                refusal: Some(Refusal::Unmanaged(vec!["theirs".to_owned()])),
                ..case(
                    "another program's tables, no history",
                    unmanaged(&["theirs"], 0),
                )
            },
            Case {
                pending: vec![0, 1, 2],
                options: Options::new().allow_unmanaged_tables(true),
                ..case("unmanaged tables, allowed", unmanaged(&["theirs"], 0))
            },
            Case {
                pending: vec![0, 1, 2],
                options: Options::new().application_id(APP),
                ..case(
                    "our own id: tables are ours even without history",
                    unmanaged(&["counters"], APP),
                )
            },
            Case {
                pending: vec![0, 1, 2],
                stamp: Some(APP),
                options: Options::new().application_id(APP),
                refusal: Some(Refusal::Unmanaged(vec!["theirs".to_owned()])),
                ..case(
                    "no id, tables, no history: not ours to stamp",
                    unmanaged(&["theirs"], 0),
                )
            },
            Case {
                known: vec![known("1", None), known("2", Some("b"))],
                verified: 1,
                ..case(
                    "a migration without SQL cannot be checked",
                    state(&[("1", Some("x")), ("2", Some("b"))], 0),
                )
            },
        ];
        for c in cases {
            let plan = plan(&c.known, c.state.clone(), c.options.application_id);
            assert_eq!(plan.pending, c.pending, "{}: pending", c.name);
            assert_eq!(plan.unknown, c.unknown, "{}: unknown", c.name);
            assert_eq!(plan.edited, c.edited, "{}: edited", c.name);
            assert_eq!(plan.unrecorded, c.unrecorded, "{}: unrecorded", c.name);
            assert_eq!(plan.verified, c.verified, "{}: verified", c.name);
            assert_eq!(plan.stamp, c.stamp, "{}: stamp", c.name);
            assert_eq!(plan.state, c.state, "{}: state kept", c.name);
            assert_eq!(
                check(&c.known, &plan, &c.options, Batch::OneTransaction).err(),
                c.refusal,
                "{}: refusal",
                c.name
            );
            let writes = !c.pending.is_empty() || !c.unrecorded.is_empty() || c.stamp.is_some();
            assert_eq!(plan.needs_write(), writes, "{}: needs_write", c.name);
        }
    }

    #[test]
    fn refusals_become_errors_naming_the_file() {
        let path = std::path::Path::new("/srv/app.db");
        let error = Refusal::Foreign {
            expected: APP,
            found: 7,
        }
        .at(path);
        assert!(
            matches!(&error, Error::ForeignDatabase { path: p, expected: APP, found: 7 } if p == path),
            "{error}"
        );
        assert!(matches!(
            Refusal::Unknown(vec!["4".into()]).at(path),
            Error::UnknownMigrations { .. }
        ));
        assert!(matches!(
            Refusal::Edited(vec!["2".into()]).at(path),
            Error::EditedMigrations { .. }
        ));
        assert!(matches!(
            Refusal::NonTransactional("2".into()).at(path),
            Error::NonTransactionalMigration { .. }
        ));
        assert!(matches!(
            Refusal::Unmanaged(vec!["t".into()]).at(path),
            Error::UnmanagedDatabase { .. }
        ));
    }
}
