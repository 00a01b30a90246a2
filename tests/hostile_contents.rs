//! What a database file holds never switches a protection off: views named like every
//! function and pragma the layer's setup reads (or once read) leave the read-age cap, the
//! checkpoint hook and the classification of lock errors in force.

mod common;

use std::time::Duration;

use common::{fresh_db, MIGRATIONS};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use sqlite_persistence::{Error, Options, RetryPolicy, Status};

/// Names a setup query could read: the table-valued pragma functions of the pragmas the
/// layer sets or reads (an older layer read its handle with `pragma_page_size()`; a name
/// beginning with `sqlite_` is SQLite's own, which no view may take).
const SHADOWS: [&str; 11] = [
    "pragma_page_size",
    "pragma_journal_mode",
    "pragma_application_id",
    "pragma_query_only",
    "pragma_busy_timeout",
    "pragma_wal_checkpoint",
    "pragma_database_list",
    "pragma_table_list",
    "pragma_journal_size_limit",
    "pragma_wal_autocheckpoint",
    "pragma_synchronous",
];

#[test]
fn views_named_like_the_setups_reads_leave_every_protection_in_force() {
    let (_dir, path) = fresh_db();
    drop(Options::new().open(&path, MIGRATIONS).unwrap());
    {
        let mut conn = common::plain_sqlite(&path);
        for name in SHADOWS {
            conn.batch_execute(&format!(
                "CREATE VIEW {name} AS SELECT 'x' AS page_size, 'x' AS handle, 1 AS busy, \
                 'x' AS log, 'x' AS checkpointed"
            ))
            .unwrap();
        }
        conn.batch_execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON counters WHEN NEW.name = 'refused' \
             BEGIN SELECT RAISE(ABORT, 'database is locked'); END",
        )
        .unwrap();
    }
    let db = Options::new()
        .max_read_age(Some(Duration::from_millis(300)))
        .retry(RetryPolicy::new().max_elapsed(Duration::from_secs(3)))
        .open(&path, MIGRATIONS)
        .unwrap();

    // The read-age cap: a read kept open past it is ended.
    let read = db.read(|_conn| -> sqlite_persistence::Result<()> {
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    });
    assert!(
        matches!(read, Err(Error::ReadTooLong { .. })),
        "the read was not capped: {read:?}"
    );

    // Lock classification by result code: the trigger's "database is locked" is returned as
    // it is, not retried as a lock until the deadline (which would end in Error::Busy).
    let refused = db.write(|conn| -> sqlite_persistence::Result<usize> {
        Ok(diesel::sql_query("INSERT INTO counters (name) VALUES ('refused')").execute(conn)?)
    });
    match refused {
        Err(Error::Busy { .. }) | Ok(_) => {
            panic!("the trigger's error was taken for a lock: {refused:?}")
        }
        Err(e) => assert!(
            e.to_string().contains("database is locked")
                || format!("{e:?}").contains("database is locked"),
            "{e:?}"
        ),
    }

    // The checkpoint hook: after a commit at 1000 frames the layer's own checkpoint runs and
    // is recorded.
    common::write_past_a_checkpoint(&db);
    let status = Status::read(&path, MIGRATIONS, &Options::new()).unwrap();
    assert!(
        status.last_checkpoint.is_some(),
        "the layer's checkpoint hook never ran"
    );
}
