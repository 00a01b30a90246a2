-- The job queue: one counter row, one row per job, numbered by the counter.
CREATE TABLE counter (
    id INTEGER PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL
);
INSERT INTO counter (id, value) VALUES (1, 0);
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY NOT NULL,
    payload TEXT NOT NULL,
    writer TEXT NOT NULL,
    created_us BIGINT NOT NULL
);
