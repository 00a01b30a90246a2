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

use std::cell::Cell;

use diesel::sqlite::{AuthorizerContext, AuthorizerDecision};
use diesel::SqliteConnection;

thread_local! {
    /// Whether this thread is running a migration's SQL.
    static MIGRATING: Cell<bool> = const { Cell::new(false) };
    /// Whether a transaction statement was denied since the migration began.
    static DENIED: Cell<bool> = const { Cell::new(false) };
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

/// Installs the guard on `conn` (replacing any authorizer it had).
pub(crate) fn install(conn: &mut SqliteConnection) {
    conn.on_authorize(|context| match context {
        AuthorizerContext::Transaction(_) if denies_transaction() => AuthorizerDecision::Deny,
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
        install(&mut guarded);
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
}
