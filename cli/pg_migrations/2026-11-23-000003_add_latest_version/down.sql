ALTER TABLE artifacts DROP COLUMN latest_version;
