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
        budget_micro_usd -> Nullable<BigInt>,
        budget_period -> Nullable<Text>,
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

diesel::table! {
    usage_hourly (vkey_id, assignment_id, hour) {
        vkey_id -> Text,
        assignment_id -> Text,
        hour -> BigInt,
        vkey_name -> Text,
        model_id -> Text,
        model_name -> Text,
        alias -> Text,
        requests -> BigInt,
        input_tokens -> BigInt,
        output_tokens -> BigInt,
        cache_read_tokens -> BigInt,
        cache_write_tokens -> BigInt,
        reasoning_tokens -> BigInt,
        cost_pico_usd -> BigInt,
    }
}

diesel::table! {
    usage_batches (node_id, boot_id, sequence) {
        node_id -> Text,
        boot_id -> Text,
        sequence -> BigInt,
        received_at -> BigInt,
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
    usage_hourly,
    usage_batches,
);
