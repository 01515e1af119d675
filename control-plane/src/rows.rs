//! Row types of the tables in [`crate::schema`].

use crate::schema::{
    assignments, connections, data_planes, provider_models, usage_batches, usage_hourly,
    virtual_keys,
};
use diesel::prelude::*;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = connections, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct ConnectionRow {
    pub id: String,
    pub name: String,
    pub provider: String,
    pub endpoint: String,
    /// AES-SIV ciphertext, see [`crate::crypto`].
    pub credential: Vec<u8>,
    /// JSON object of string values.
    pub options: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = provider_models, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct ModelRow {
    pub id: String,
    pub connection_id: String,
    pub name: String,
    pub remote: String,
    pub deployment: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Micro-USD per million tokens (DESIGN §18); `None` = no price.
    pub price_input: Option<i64>,
    pub price_output: Option<i64>,
    pub price_cache_read: Option<i64>,
    pub price_cache_write: Option<i64>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = virtual_keys, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct VirtualKeyRow {
    pub id: String,
    pub name: String,
    pub key_sha256: Vec<u8>,
    pub key_hint: String,
    pub enabled: bool,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Micro-USD per budget period (DESIGN §18); `None` = no budget.
    pub budget_micro_usd: Option<i64>,
    /// `day`, `week` or `month`; `None` exactly when there is no budget.
    pub budget_period: Option<String>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = assignments, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct AssignmentRow {
    pub id: String,
    pub vkey_id: String,
    pub model_id: String,
    pub alias: String,
    pub tps: Option<i64>,
    pub burst: Option<i64>,
    pub tpm: Option<i64>,
    pub weight: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = data_planes, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct DataPlaneRow {
    pub node_id: String,
    pub build: String,
    pub applied_version: i64,
    pub last_seen: i64,
    pub connected: bool,
    pub error: String,
}

/// One hour of one assignment of one virtual key (DESIGN §18). `hour` is unix seconds of the
/// hour's start; `cost_pico_usd` is in 1e-12 USD.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = usage_hourly, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct UsageRow {
    pub vkey_id: String,
    pub assignment_id: String,
    pub hour: i64,
    pub vkey_name: String,
    pub model_id: String,
    pub model_name: String,
    pub alias: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_pico_usd: i64,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = usage_batches, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct UsageBatchRow {
    pub node_id: String,
    pub boot_id: String,
    pub sequence: i64,
    pub received_at: i64,
}
