-- One row per recorded data version; (artifact, version) is unique, so two writers can
-- never both claim a version.
CREATE TABLE artifact_versions (
    artifact_id INTEGER NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
    version BIGINT NOT NULL CHECK (version > 0),
    recorded_at TEXT NOT NULL DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    PRIMARY KEY (artifact_id, version)
);
