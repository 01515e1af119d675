//! Diesel schema shared by the Postgres and SQLite backends (portable column types only).

diesel::table! {
    config_state (id) {
        id -> Integer,
        version -> BigInt,
        cluster_epoch -> Text,
    }
}

diesel::table! {
    connections (id) {
        id -> Text,
        name -> Text,
        provider -> Text,
        endpoint -> Text,
        credential -> Binary,
        options -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    provider_models (id) {
        id -> Text,
        connection_id -> Text,
        name -> Text,
        remote -> Text,
        deployment -> Nullable<Text>,
        created_at -> BigInt,
        updated_at -> BigInt,
        price_input -> Nullable<BigInt>,
        price_output -> Nullable<BigInt>,
        price_cache_read -> Nullable<BigInt>,
        price_cache_write -> Nullable<BigInt>,
    }
}

diesel::table! {
    virtual_keys (id) {
        id -> Text,
        name -> Text,
        key_sha256 -> Binary,
        key_hint -> Text,
        enabled -> Bool,
        expires_at -> Nullable<BigInt>,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    assignments (id) {
        id -> Text,
        vkey_id -> Text,
        model_id -> Text,
        alias -> Text,
        tps -> Nullable<BigInt>,
        burst -> Nullable<BigInt>,
        tpm -> Nullable<BigInt>,
        weight -> BigInt,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    data_planes (node_id) {
        node_id -> Text,
        build -> Text,
        applied_version -> BigInt,
        last_seen -> BigInt,
        connected -> Bool,
        error -> Text,
    }
}

diesel::joinable!(provider_models -> connections (connection_id));
diesel::joinable!(assignments -> virtual_keys (vkey_id));
diesel::joinable!(assignments -> provider_models (model_id));

diesel::allow_tables_to_appear_in_same_query!(
    config_state,
    connections,
    provider_models,
    virtual_keys,
    assignments,
    data_planes,
);
