//! A small HTTP counter service on [`AsyncDatabase`]: run several at once against one file,
//! and every increment lands exactly once, whatever process serves it.
//!
//! ```sh
//! cargo run --release --features tokio --example service -- counters.db 127.0.0.1:3000 &
//! cargo run --release --features tokio --example service -- counters.db 127.0.0.1:3001 &
//! curl -X POST localhost:3000/counters/a    # 1
//! curl -X POST localhost:3001/counters/a    # 2
//! curl localhost:3000/counters/a            # 2
//! ```
//!
//! Each request's write runs on a blocking thread (the runtime's workers never wait for the
//! lock), retried while another process holds it; a client that hangs up mid-request drops
//! the future, and the write then either never began or runs to its end (see the async
//! handle's docs).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use diesel::sql_types::{BigInt, Text};
use diesel::RunQueryDsl;
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::AsyncDatabase;

/// The library's schema: `counters (name, value)` and `events (counter, value)`.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

#[derive(diesel::QueryableByName)]
struct Value {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

/// Adds one to counter `name` and records the value it took; returns it.
async fn increment(
    State(db): State<AsyncDatabase>,
    Path(name): Path<String>,
) -> Result<String, (StatusCode, String)> {
    let value = db
        .write(move |conn| -> sqlite_persistence::Result<i64> {
            let value = diesel::sql_query(
                "INSERT INTO counters (name, value) VALUES (?, 1) \
                 ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
            )
            .bind::<Text, _>(&name)
            .get_result::<Value>(conn)?
            .value;
            diesel::sql_query("INSERT INTO events (counter, value) VALUES (?, ?)")
                .bind::<Text, _>(&name)
                .bind::<BigInt, _>(value)
                .execute(conn)?;
            Ok(value)
        })
        .await
        .map_err(unavailable)?;
    Ok(format!("{value}\n"))
}

/// The value of counter `name` (0 if it never was incremented).
async fn current(
    State(db): State<AsyncDatabase>,
    Path(name): Path<String>,
) -> Result<String, (StatusCode, String)> {
    let values = db
        .read(move |conn| -> sqlite_persistence::Result<Vec<Value>> {
            Ok(
                diesel::sql_query("SELECT value FROM counters WHERE name = ?")
                    .bind::<Text, _>(&name)
                    .load::<Value>(conn)?,
            )
        })
        .await
        .map_err(unavailable)?;
    Ok(format!("{}\n", values.first().map_or(0, |v| v.value)))
}

/// A database error as a 503, with the layer's message and hint.
fn unavailable(error: sqlite_persistence::Error) -> (StatusCode, String) {
    let hint = error.hint().map(|h| format!(" ({h})")).unwrap_or_default();
    (StatusCode::SERVICE_UNAVAILABLE, format!("{error}{hint}\n"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "counters.db".to_owned());
    let address = args.next().unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    // The migrations run here, on a blocking thread, however many processes start at once.
    let db = AsyncDatabase::open(&path, MIGRATIONS).await?;
    let app = Router::new()
        .route("/counters/{name}", get(current).post(increment))
        .with_state(db);
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("serving {path} on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
