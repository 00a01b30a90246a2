-- Named counters: the schema of the library's README example, doctests and tests. Portable:
-- the tests run it on SQLite and on PostgreSQL.
CREATE TABLE counters (
    name TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL DEFAULT 0
);
