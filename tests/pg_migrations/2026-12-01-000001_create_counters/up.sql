-- The library's test schema on PostgreSQL (the SQLite one is in migrations/).
CREATE TABLE counters (
    name TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL DEFAULT 0
);
