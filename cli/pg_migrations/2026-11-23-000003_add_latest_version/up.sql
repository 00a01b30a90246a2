-- The latest version, kept on the artifact so that the next one is one row read away.
ALTER TABLE artifacts ADD COLUMN latest_version BIGINT NOT NULL DEFAULT 0;
UPDATE artifacts SET latest_version = coalesce(
    (SELECT max(version) FROM artifact_versions WHERE artifact_id = artifacts.id), 0);
