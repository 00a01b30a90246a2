-- Named artifacts whose data versions the catalog records (PostgreSQL; the SQLite schema is
-- in ../migrations, with the same versions and columns).
CREATE TABLE artifacts (
    id SERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
);
