//! The catalog's tables, as `diesel print-schema` writes them for `cli/migrations/`.
#![allow(missing_docs)]

diesel::table! {
    artifacts (id) {
        id -> Integer,
        name -> Text,
        created_at -> Text,
        latest_version -> BigInt,
    }
}

diesel::table! {
    artifact_versions (artifact_id, version) {
        artifact_id -> Integer,
        version -> BigInt,
        recorded_at -> Text,
    }
}

diesel::joinable!(artifact_versions -> artifacts (artifact_id));
diesel::allow_tables_to_appear_in_same_query!(artifacts, artifact_versions);
