// The library's test schema, as `diesel print-schema` writes it for `migrations/`.

diesel::table! {
    counters (name) {
        name -> Text,
        value -> BigInt,
    }
}

diesel::table! {
    events (counter, value) {
        counter -> Text,
        value -> BigInt,
    }
}

diesel::joinable!(events -> counters (counter));
diesel::allow_tables_to_appear_in_same_query!(counters, events);
