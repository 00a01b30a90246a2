DROP TABLE artifact_versions;
