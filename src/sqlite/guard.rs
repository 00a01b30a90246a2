//! A migration may not end the batch's transaction: `BEGIN`, `COMMIT`, `END` or `ROLLBACK`
//! in its SQL would commit (or drop) part of the batch, leaving it applied and recorded while
//! the rest fails.
//!
//! Reading the SQL text cannot tell a `COMMIT` from the `END` of a trigger body; SQLite's
//! parser can. Every connection the layer prepares gets an authorizer (Diesel's
//! `on_authorize`), which SQLite asks about every statement it prepares: while this thread
//! runs a migration's SQL, it denies the transaction statements (savepoints, which Diesel
//! nests migrations in, stay allowed). Where the read-age cap sets its own authorizer on a
//! connection, that one asks [`denies_transaction`] too.
//!
//! The same authorizer notes the pragmas a connection's user sets ([`Assigned`]): a setting
//! the layer relies on (`busy_timeout`, `query_only`, `locking_mode`, the options' pragmas)
//! changed inside a `write`, a `read` or on a connection taken from the pool would otherwise
//! stay on the pooled connection for every later operation. The pool restores them before
//! the connection serves again (see `ConnectionCustomizer::restore`). Diesel never caches a
//! raw `sql_query` or `batch_execute` statement, so each such pragma is prepared, and seen,
//! every time it runs.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use diesel::sqlite::{AuthorizerContext, AuthorizerDecision};
use diesel::SqliteConnection;

thread_local! {
    /// Whether this thread is running a migration's SQL.
    static MIGRATING: Cell<bool> = const { Cell::new(false) };
    /// Whether a transaction statement was denied since the migration began.
    static DENIED: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread runs one of the layer's own pragmas, which no user assigned.
    static OWN: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, the layer's own statements (`query_only` around a read, `busy_timeout` near a
/// deadline, a restore): the settings they assign are not noted as a user's.
pub(crate) fn own<T>(f: impl FnOnce() -> T) -> T {
    struct Done(bool);
    impl Drop for Done {
        fn drop(&mut self) {
            OWN.with(|own| own.set(self.0));
        }
    }
    let _done = Done(OWN.with(|own| own.replace(true)));
    f()
}

/// Whether a transaction statement is to be denied now: this thread runs a migration (the
/// denial is recorded for [`migrating`]).
pub(crate) fn denies_transaction() -> bool {
    let deny = MIGRATING.with(Cell::get);
    if deny {
        DENIED.with(|denied| denied.set(true));
    }
    deny
}

/// The settings a connection's user assigned since the layer last restored them.
#[derive(Debug, Default)]
pub(crate) struct Assigned(AtomicU8);

/// A setting the layer relies on was assigned.
pub(crate) const SETTING: u8 = 1;
/// `wal_autocheckpoint` was assigned: SQLite then replaced the layer's checkpoint hook (both
/// are the connection's one WAL hook).
pub(crate) const WAL_HOOK: u8 = 2;
/// Something that cannot be put back was changed on the connection: a temporary table,
/// view, trigger or index (a temporary table named like a real one takes its writes, which
/// vanish with the connection), an attached database, or another pragma
/// (`ignore_check_constraints`, `writable_schema`, ...): the connection is closed instead of
/// serving again.
pub(crate) const DISCARD: u8 = 4;

/// The pragmas whose value the layer sets or relies on, per connection, and puts back.
const SETTINGS: [&str; 9] = [
    "busy_timeout",
    "foreign_keys",
    "synchronous",
    "journal_size_limit",
    "wal_autocheckpoint",
    "cache_size",
    "temp_store",
    "mmap_size",
    "locking_mode",
];

/// Pragmas with an argument that change no connection state: they act on the file
/// (`user_version`, checkpoints), last one transaction (`defer_foreign_keys`), or only read
/// (`table_info(t)`, `integrity_check(n)`).
const STATELESS: [&str; 19] = [
    "application_id",
    "user_version",
    "wal_checkpoint",
    "incremental_vacuum",
    "optimize",
    "shrink_memory",
    "defer_foreign_keys",
    "integrity_check",
    "quick_check",
    "table_info",
    "table_xinfo",
    "table_list",
    "index_info",
    "index_xinfo",
    "index_list",
    "foreign_key_list",
    "foreign_key_check",
    "function_list",
    "pragma_list",
];

/// Pragmas a connection's user may not assign: the layer owns them. `journal_mode` would
/// take the file out of WAL for every process, `query_only = 0` would let a `read` write.
const OWNED: [&str; 2] = ["journal_mode", "query_only"];

impl Assigned {
    /// Notes a pragma statement being prepared: `PRAGMA name = argument` (or
    /// `name(argument)`); one without an argument only reads. Returns whether it is to be
    /// denied.
    pub(crate) fn note(&self, name: Option<&str>, argument: Option<&str>) -> bool {
        let (Some(name), Some(_)) = (name, argument) else {
            return false;
        };
        if OWN.with(Cell::get) {
            return false;
        }
        let is = |list: &[&str]| list.iter().any(|s| s.eq_ignore_ascii_case(name));
        if is(&OWNED) {
            return true;
        }
        let bits = if name.eq_ignore_ascii_case("wal_autocheckpoint") {
            SETTING | WAL_HOOK
        } else if is(&SETTINGS) {
            SETTING
        } else if is(&STATELESS) {
            return false;
        } else {
            DISCARD
        };
        self.0.fetch_or(bits, Ordering::Relaxed);
        false
    }

    /// Notes a statement that changes the connection's schema state for good: a temporary
    /// object, or an attached database (see [`DISCARD`]).
    pub(crate) fn note_schema_change(&self) {
        if !OWN.with(Cell::get) {
            self.0.fetch_or(DISCARD, Ordering::Relaxed);
        }
    }

    /// What was assigned since the last call.
    pub(crate) fn take(&self) -> u8 {
        self.0.swap(0, Ordering::Relaxed)
    }
}

/// Installs the guard on `conn` (replacing any authorizer it had), noting assigned settings
/// in `assigned`.
pub(crate) fn install(conn: &mut SqliteConnection, assigned: Arc<Assigned>) {
    conn.on_authorize(move |context| match context {
        AuthorizerContext::Transaction(_) if denies_transaction() => AuthorizerDecision::Deny,
        AuthorizerContext::Pragma(pragma) => {
            if assigned.note(pragma.name, pragma.argument) {
                AuthorizerDecision::Deny
            } else {
                AuthorizerDecision::Allow
            }
        }
        AuthorizerContext::CreateTempTable(_)
        | AuthorizerContext::CreateTempIndex(_)
        | AuthorizerContext::CreateTempTrigger(_)
        | AuthorizerContext::CreateTempView(_)
        | AuthorizerContext::Attach(_) => {
            assigned.note_schema_change();
            AuthorizerDecision::Allow
        }
        _ => AuthorizerDecision::Allow,
    });
}

/// Runs `f` (one migration) with transaction statements denied on this thread's guarded
/// connections; returns its result and whether a transaction statement was denied.
pub(crate) fn migrating<T>(f: impl FnOnce() -> T) -> (T, bool) {
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            MIGRATING.with(|migrating| migrating.set(false));
        }
    }
    DENIED.with(|denied| denied.set(false));
    MIGRATING.with(|migrating| migrating.set(true));
    let done = Done;
    let value = f();
    drop(done);
    (value, DENIED.with(Cell::get))
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    #[test]
    fn transaction_statements_are_denied_only_while_migrating_on_a_guarded_connection() {
        let mut guarded = SqliteConnection::establish(":memory:").unwrap();
        install(&mut guarded, Arc::default());
        let mut plain = SqliteConnection::establish(":memory:").unwrap();
        for conn in [&mut guarded, &mut plain] {
            conn.batch_execute("BEGIN; CREATE TABLE t (x INTEGER); COMMIT;")
                .unwrap();
        }
        let (result, denied) =
            migrating(|| guarded.batch_execute("CREATE TABLE u (x INTEGER); COMMIT;"));
        assert!(result.is_err() && denied);
        // Savepoints, and a trigger's BEGIN ... END, are not transaction statements.
        let (result, denied) = migrating(|| {
            guarded.batch_execute(
                "SAVEPOINT s; CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END; \
                 RELEASE s;",
            )
        });
        assert!(result.is_ok() && !denied, "{result:?}");
        // A connection the layer did not prepare is never guarded.
        let (result, denied) = migrating(|| plain.batch_execute("BEGIN; COMMIT;"));
        assert!(result.is_ok() && !denied);
        // Outside a migration the guarded connection works as any.
        guarded.batch_execute("BEGIN; COMMIT;").unwrap();
    }

    #[test]
    fn assigned_settings_are_noted_and_reads_and_other_pragmas_are_not() {
        let assigned = Arc::new(Assigned::default());
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        install(&mut conn, Arc::clone(&assigned));
        conn.batch_execute(
            "CREATE TABLE t (x INTEGER); PRAGMA busy_timeout; PRAGMA table_info(t); \
             PRAGMA wal_checkpoint(PASSIVE); PRAGMA user_version = 3;",
        )
        .unwrap();
        assert_eq!(assigned.take(), 0);
        conn.batch_execute("PRAGMA Busy_Timeout = 1; PRAGMA busy_timeout = 0;")
            .unwrap();
        assert_eq!(assigned.take(), SETTING);
        // The layer's own: denied to users.
        assert!(conn.batch_execute("PRAGMA query_only = 1").is_err());
        assert!(conn.batch_execute("PRAGMA journal_mode = DELETE").is_err());
        assert_eq!(assigned.take(), 0);
        conn.batch_execute("PRAGMA ignore_check_constraints = ON")
            .unwrap();
        assert_eq!(assigned.take(), DISCARD);
        conn.batch_execute("CREATE TEMP TABLE t2 (x INTEGER)")
            .unwrap();
        assert_eq!(assigned.take(), DISCARD);
        assert_eq!(assigned.take(), 0);
        conn.batch_execute("PRAGMA main.wal_autocheckpoint(100)")
            .unwrap();
        assert_eq!(assigned.take(), SETTING | WAL_HOOK);
    }
}
