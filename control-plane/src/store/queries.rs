//! The diesel query bodies behind [`Store`](super::Store), written once in `backend_queries!` and
//! compiled for `AsyncPgConnection` (`pg`) and for the SQLite wrapper (`sqlite`): one body, the
//! same behaviour on both. Kept apart from the facade so the SQL can be read as one piece, next to
//! how a row stores what it holds (options as JSON, the credential sealed to its row).

use super::{
    AssignmentPatch, ConfigRows, ConnectionPatch, ModelPatch, NewAssignment, NewConnection,
    NewModel, NewVirtualKey, VirtualKeyPatch, Written, check_limits, now_micros,
};
use crate::crypto::{Location, MasterKeys};
use crate::db::{CONFIG_CHANNEL, SqliteConn};
use crate::error::StoreError;
use crate::ids;
use crate::rows::{
    AssignmentRow, ConnectionRow, DataPlaneRow, ModelRow, UsageBatchRow, UsageRow, VirtualKeyRow,
};
use crate::schema::{
    assignments, config_state, connections, data_planes, provider_models, usage_batches,
    usage_hourly, virtual_keys,
};
use crate::usage::{self, Group, UsageBatch, UsageQuery, UsageSum};
use crate::validate;
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel::sql_types::{BigInt, Nullable};
use diesel::upsert::excluded;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use secrecy::{ExposeSecret, SecretString};
use std::collections::{BTreeMap, HashMap};

const CREDENTIAL_AT: (&str, &str) = ("connections", "credential");

/// Where a connection's credential is sealed (table, column and row), so it decrypts only there.
pub(super) fn credential_location(row_id: &str) -> Location<'_> {
    Location {
        table: CREDENTIAL_AT.0,
        column: CREDENTIAL_AT.1,
        row_id,
    }
}

pub(super) fn parse_options(row: &ConnectionRow) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(&row.options).map_err(|e| {
        StoreError::Database(format!(
            "connections.options of {} is not a JSON object: {e}",
            row.id
        ))
    })
}

fn options_json(options: &BTreeMap<String, String>) -> Result<String, StoreError> {
    serde_json::to_string(options).map_err(|e| StoreError::Database(e.to_string()))
}

fn reference<'a>(field: &'static str, value: &'a str) -> Result<&'a str, StoreError> {
    let value = value.trim();
    if value.is_empty() {
        Err(StoreError::invalid(field, "must name an ID or a name"))
    } else {
        Ok(value)
    }
}

/// The sums of one `QueryUsage` group as SQL returns them (see [`usage_sql`]).
#[derive(QueryableByName)]
struct UsageSumSql {
    #[diesel(sql_type = Nullable<Text>)]
    vkey_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    vkey_name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    model_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    model_name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    alias: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    day: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    hour: Option<i64>,
    #[diesel(sql_type = BigInt)]
    requests: i64,
    #[diesel(sql_type = BigInt)]
    input_tokens: i64,
    #[diesel(sql_type = BigInt)]
    output_tokens: i64,
    #[diesel(sql_type = BigInt)]
    cache_read_tokens: i64,
    #[diesel(sql_type = BigInt)]
    cache_write_tokens: i64,
    #[diesel(sql_type = BigInt)]
    reasoning_tokens: i64,
    #[diesel(sql_type = BigInt)]
    cost_micro: i64,
    #[diesel(sql_type = BigInt)]
    cost_pico: i64,
}

impl UsageSumSql {
    fn into_sum(self) -> Result<UsageSum, StoreError> {
        Ok(UsageSum {
            cost_pico_usd: usage::join_cost(self.cost_micro, self.cost_pico)?,
            vkey_id: self.vkey_id,
            vkey_name: self.vkey_name,
            model_id: self.model_id,
            model_name: self.model_name,
            alias: self.alias,
            day: self.day,
            hour: self.hour,
            requests: self.requests,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_write_tokens: self.cache_write_tokens,
            reasoning_tokens: self.reasoning_tokens,
        })
    }
}

/// The `QueryUsage` statement: group columns from a fixed list (never user text), twelve bound
/// parameters in a fixed order (see `query_usage`), `$n` on Postgres and `?` on SQLite. Each
/// filter is `param IS NULL OR ...`, so absent filters need no other statement. The cost is
/// summed in two parts that cannot overflow 64 bits for any realistic row count (whole micro-USD,
/// and the remainder below one micro-USD), joined exactly in `u128` afterwards.
fn usage_sql(groups: &[Group], postgres: bool) -> String {
    let mut n = 0;
    let mut p = || {
        n += 1;
        if postgres {
            format!("${n}")
        } else {
            "?".to_owned()
        }
    };
    let text = |on: bool, expr: &str| {
        if on {
            expr.to_owned()
        } else {
            "CAST(NULL AS TEXT)".to_owned()
        }
    };
    let int = |on: bool, expr: &str| {
        if on {
            expr.to_owned()
        } else {
            "CAST(NULL AS BIGINT)".to_owned()
        }
    };
    let has = |g: Group| groups.contains(&g);
    const DAY: &str = "(hour - hour % 86400)";
    let mut group_exprs = Vec::new();
    for (g, expr) in [
        (Group::Vkey, "vkey_id"),
        (Group::Model, "model_id"),
        (Group::Alias, "alias"),
        (Group::Day, DAY),
        (Group::Hour, "hour"),
    ] {
        if has(g) {
            group_exprs.push(expr);
        }
    }
    let sum = |col: &str| format!("CAST(COALESCE(SUM({col}), 0) AS BIGINT) AS {col}");
    let (p1, p2, p3) = (p(), p(), p());
    let (p4, p5, p6) = (p(), p(), p());
    let (p7, p8) = (p(), p());
    let (p9, p10) = (p(), p());
    let (p11, p12) = (p(), p());
    let mut sql = format!(
        "SELECT {} AS vkey_id, {} AS vkey_name, {} AS model_id, {} AS model_name, {} AS alias, \
         {} AS day, {} AS hour, {}, {}, {}, {}, {}, {}, \
         CAST(COALESCE(SUM(cost_pico_usd / {micro}), 0) AS BIGINT) AS cost_micro, \
         CAST(COALESCE(SUM(cost_pico_usd % {micro}), 0) AS BIGINT) AS cost_pico \
         FROM usage_hourly \
         WHERE (CAST({p1} AS TEXT) IS NULL OR vkey_id = {p2} OR vkey_name = {p3}) \
         AND (CAST({p4} AS TEXT) IS NULL OR model_id = {p5} OR model_name = {p6}) \
         AND (CAST({p7} AS TEXT) IS NULL OR alias = {p8}) \
         AND (CAST({p9} AS BIGINT) IS NULL OR hour >= {p10}) \
         AND (CAST({p11} AS BIGINT) IS NULL OR hour < {p12})",
        text(has(Group::Vkey), "vkey_id"),
        text(has(Group::Vkey), "MAX(vkey_name)"),
        text(has(Group::Model), "model_id"),
        text(has(Group::Model), "MAX(model_name)"),
        text(has(Group::Alias), "alias"),
        int(has(Group::Day), DAY),
        int(has(Group::Hour), "hour"),
        sum("requests"),
        sum("input_tokens"),
        sum("output_tokens"),
        sum("cache_read_tokens"),
        sum("cache_write_tokens"),
        sum("reasoning_tokens"),
        micro = usage::PICO_PER_MICRO,
    );
    if !group_exprs.is_empty() {
        let list = group_exprs.join(", ");
        sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
    }
    sql
}

macro_rules! backend_queries {
    ($module:ident, $conn:ty, $is_postgres:expr) => {
        pub(super) mod $module {
            use super::*;

            type Conn = $conn;
            const IS_POSTGRES: bool = $is_postgres;

            async fn bump_version(c: &mut Conn) -> Result<i64, StoreError> {
                let version: i64 = diesel::update(config_state::table.filter(config_state::id.eq(1)))
                    .set(config_state::version.eq(config_state::version + 1))
                    .returning(config_state::version)
                    .get_result(c)
                    .await?;
                if IS_POSTGRES {
                    // Delivered to every LISTENing replica when the transaction commits.
                    diesel::sql_query("SELECT pg_notify($1, $2)")
                        .bind::<Text, _>(CONFIG_CHANNEL)
                        .bind::<Text, _>(version.to_string())
                        .execute(c)
                        .await?;
                }
                Ok(version)
            }

            pub async fn current_version(c: &mut Conn) -> Result<(String, i64), StoreError> {
                Ok(config_state::table
                    .filter(config_state::id.eq(1))
                    .select((config_state::cluster_epoch, config_state::version))
                    .first(c)
                    .await?)
            }

            async fn find_connection(
                c: &mut Conn,
                field: &'static str,
                r: &str,
            ) -> Result<ConnectionRow, StoreError> {
                let r = reference(field, r)?;
                connections::table
                    .filter(connections::id.eq(r).or(connections::name.eq(r)))
                    .select(ConnectionRow::as_select())
                    .first(c)
                    .await
                    .optional()?
                    .ok_or_else(|| StoreError::not_found("connection", r))
            }

            async fn find_vkey(
                c: &mut Conn,
                field: &'static str,
                r: &str,
            ) -> Result<VirtualKeyRow, StoreError> {
                let r = reference(field, r)?;
                virtual_keys::table
                    .filter(virtual_keys::id.eq(r).or(virtual_keys::name.eq(r)))
                    .select(VirtualKeyRow::as_select())
                    .first(c)
                    .await
                    .optional()?
                    .ok_or_else(|| StoreError::not_found("virtual key", r))
            }

            /// ID, `CONNECTION/MODEL`, or a bare model name when it is unique.
            async fn find_model(
                c: &mut Conn,
                field: &'static str,
                r: &str,
            ) -> Result<ModelRow, StoreError> {
                let r = reference(field, r)?;
                if let Some(row) = provider_models::table
                    .filter(provider_models::id.eq(r))
                    .select(ModelRow::as_select())
                    .first(c)
                    .await
                    .optional()?
                {
                    return Ok(row);
                }
                if let Some((conn_ref, model_name)) = r.split_once('/') {
                    let found = provider_models::table
                        .inner_join(connections::table)
                        .filter(connections::name.eq(conn_ref).or(connections::id.eq(conn_ref)))
                        .filter(provider_models::name.eq(model_name))
                        .select(ModelRow::as_select())
                        .first(c)
                        .await
                        .optional()?;
                    if let Some(row) = found {
                        return Ok(row);
                    }
                }
                let mut candidates: Vec<(ModelRow, String)> = provider_models::table
                    .inner_join(connections::table)
                    .filter(provider_models::name.eq(r))
                    .select((ModelRow::as_select(), connections::name))
                    .load(c)
                    .await?;
                match candidates.len() {
                    0 => Err(StoreError::not_found("model", r)),
                    1 => Ok(candidates.remove(0).0),
                    _ => {
                        let names: Vec<String> = candidates
                            .iter()
                            .map(|(m, conn)| format!("{conn}/{} ({})", m.name, m.id))
                            .collect();
                        Err(StoreError::invalid(
                            field,
                            format!(
                                "{r:?} is ambiguous: {}; use CONNECTION/MODEL or the ID",
                                names.join(", ")
                            ),
                        ))
                    }
                }
            }

            async fn find_assignment(c: &mut Conn, r: &str) -> Result<AssignmentRow, StoreError> {
                let r = reference("id", r)?;
                assignments::table
                    .filter(assignments::id.eq(r))
                    .select(AssignmentRow::as_select())
                    .first(c)
                    .await
                    .optional()?
                    .ok_or_else(|| StoreError::not_found("assignment", r))
            }

            async fn ensure_connection_name_free(
                c: &mut Conn,
                name: &str,
            ) -> Result<(), StoreError> {
                let taken: i64 = connections::table
                    .filter(connections::name.eq(name))
                    .count()
                    .get_result(c)
                    .await?;
                if taken > 0 {
                    return Err(StoreError::AlreadyExists(format!(
                        "a connection named {name:?} already exists"
                    )));
                }
                Ok(())
            }

            async fn ensure_vkey_name_free(c: &mut Conn, name: &str) -> Result<(), StoreError> {
                let taken: i64 = virtual_keys::table
                    .filter(virtual_keys::name.eq(name))
                    .count()
                    .get_result(c)
                    .await?;
                if taken > 0 {
                    return Err(StoreError::AlreadyExists(format!(
                        "a virtual key named {name:?} already exists"
                    )));
                }
                Ok(())
            }

            async fn ensure_model_name_free(
                c: &mut Conn,
                connection: &ConnectionRow,
                name: &str,
            ) -> Result<(), StoreError> {
                let taken: i64 = provider_models::table
                    .filter(provider_models::connection_id.eq(&connection.id))
                    .filter(provider_models::name.eq(name))
                    .count()
                    .get_result(c)
                    .await?;
                if taken > 0 {
                    return Err(StoreError::AlreadyExists(format!(
                        "connection {:?} already has a model named {name:?}",
                        connection.name
                    )));
                }
                Ok(())
            }

            // ---- connections ----

            pub async fn create_connection(
                c: &mut Conn,
                keys: &MasterKeys,
                input: &NewConnection,
            ) -> Result<Written<ConnectionRow>, StoreError> {
                let id = ids::new_id("conn");
                let credential =
                    keys.encrypt(credential_location(&id), input.credential.expose_secret())?;
                let now = now_micros();
                let row = ConnectionRow {
                    id,
                    name: input.name.clone(),
                    provider: input.provider.clone(),
                    endpoint: input.endpoint.clone(),
                    credential,
                    options: options_json(&input.options)?,
                    created_at: now,
                    updated_at: now,
                };
                c.transaction(async |c| {
                    ensure_connection_name_free(c, &row.name).await?;
                    diesel::insert_into(connections::table)
                        .values(&row)
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row.clone(), version })
                })
                .await
            }

            pub async fn get_connection(c: &mut Conn, r: &str) -> Result<ConnectionRow, StoreError> {
                find_connection(c, "id", r).await
            }

            pub async fn list_connections(c: &mut Conn) -> Result<Vec<ConnectionRow>, StoreError> {
                Ok(connections::table
                    .order(connections::name.asc())
                    .select(ConnectionRow::as_select())
                    .load(c)
                    .await?)
            }

            pub async fn update_connection(
                c: &mut Conn,
                keys: &MasterKeys,
                r: &str,
                patch: &ConnectionPatch,
            ) -> Result<Written<ConnectionRow>, StoreError> {
                c.transaction(async |c| {
                    let mut row = find_connection(c, "id", r).await?;
                    if let Some(name) = &patch.name {
                        if *name != row.name {
                            ensure_connection_name_free(c, name).await?;
                            row.name = name.clone();
                        }
                    }
                    if let Some(endpoint) = &patch.endpoint {
                        validate::endpoint_change(&row.endpoint, endpoint, patch.credential.is_some())?;
                        row.endpoint = endpoint.clone();
                    }
                    if let Some(credential) = &patch.credential {
                        row.credential =
                            keys.encrypt(credential_location(&row.id), credential.expose_secret())?;
                    }
                    let mut options = parse_options(&row)?;
                    for key in &patch.unset_options {
                        options.remove(key);
                    }
                    options.extend(patch.set_options.clone());
                    validate::connection_options(&row.provider, &row.endpoint, &options)?;
                    row.options = options_json(&options)?;
                    row.updated_at = now_micros();
                    diesel::update(connections::table.filter(connections::id.eq(&row.id)))
                        .set((
                            connections::name.eq(&row.name),
                            connections::endpoint.eq(&row.endpoint),
                            connections::credential.eq(&row.credential),
                            connections::options.eq(&row.options),
                            connections::updated_at.eq(row.updated_at),
                        ))
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row, version })
                })
                .await
            }

            pub async fn delete_connection(
                c: &mut Conn,
                r: &str,
                force: bool,
            ) -> Result<Written<String>, StoreError> {
                c.transaction(async |c| {
                    let row = find_connection(c, "id", r).await?;
                    let models: Vec<(String, String)> = provider_models::table
                        .filter(provider_models::connection_id.eq(&row.id))
                        .select((provider_models::id, provider_models::name))
                        .order(provider_models::name.asc())
                        .load(c)
                        .await?;
                    if !models.is_empty() && !force {
                        let names: Vec<&str> = models.iter().map(|(_, n)| n.as_str()).collect();
                        return Err(StoreError::FailedPrecondition(format!(
                            "connection {:?} still has {} model(s) ({}); delete them first or pass --force to delete them and their assignments",
                            row.name,
                            models.len(),
                            names.join(", ")
                        )));
                    }
                    let model_ids: Vec<&String> = models.iter().map(|(id, _)| id).collect();
                    diesel::delete(assignments::table.filter(assignments::model_id.eq_any(&model_ids)))
                        .execute(c)
                        .await?;
                    diesel::delete(provider_models::table.filter(provider_models::connection_id.eq(&row.id)))
                        .execute(c)
                        .await?;
                    diesel::delete(connections::table.filter(connections::id.eq(&row.id)))
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row.id, version })
                })
                .await
            }

            // ---- provider models ----

            pub async fn create_model(
                c: &mut Conn,
                input: &NewModel,
            ) -> Result<Written<ModelRow>, StoreError> {
                c.transaction(async |c| {
                    let connection = find_connection(c, "connection_id", &input.connection).await?;
                    ensure_model_name_free(c, &connection, &input.name).await?;
                    let now = now_micros();
                    let row = ModelRow {
                        id: ids::new_id("model"),
                        connection_id: connection.id.clone(),
                        name: input.name.clone(),
                        remote: input.remote.clone(),
                        deployment: input.deployment.clone(),
                        created_at: now,
                        updated_at: now,
                        price_input: input.price_input,
                        price_output: input.price_output,
                        price_cache_read: input.price_cache_read,
                        price_cache_write: input.price_cache_write,
                    };
                    diesel::insert_into(provider_models::table)
                        .values(&row)
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row, version })
                })
                .await
            }

            pub async fn get_model(c: &mut Conn, r: &str) -> Result<ModelRow, StoreError> {
                find_model(c, "id", r).await
            }

            pub async fn list_models(
                c: &mut Conn,
                connection: Option<&str>,
            ) -> Result<Vec<ModelRow>, StoreError> {
                let mut query = provider_models::table
                    .select(ModelRow::as_select())
                    .order((provider_models::name.asc(), provider_models::id.asc()))
                    .into_boxed();
                if let Some(conn_ref) = connection {
                    let connection = find_connection(c, "connection_id", conn_ref).await?;
                    query = query.filter(provider_models::connection_id.eq(connection.id));
                }
                Ok(query.load(c).await?)
            }

            pub async fn update_model(
                c: &mut Conn,
                r: &str,
                patch: &ModelPatch,
            ) -> Result<Written<ModelRow>, StoreError> {
                c.transaction(async |c| {
                    let mut row = find_model(c, "id", r).await?;
                    if let Some(name) = &patch.name {
                        if *name != row.name {
                            let connection = find_connection(c, "connection_id", &row.connection_id).await?;
                            ensure_model_name_free(c, &connection, name).await?;
                            row.name = name.clone();
                        }
                    }
                    if let Some(remote) = &patch.remote {
                        row.remote = remote.clone();
                    }
                    if let Some(deployment) = &patch.deployment {
                        row.deployment = deployment.clone();
                    }
                    if let Some(price) = patch.price_input {
                        row.price_input = price;
                    }
                    if let Some(price) = patch.price_output {
                        row.price_output = price;
                    }
                    if let Some(price) = patch.price_cache_read {
                        row.price_cache_read = price;
                    }
                    if let Some(price) = patch.price_cache_write {
                        row.price_cache_write = price;
                    }
                    row.updated_at = now_micros();
                    diesel::update(provider_models::table.filter(provider_models::id.eq(&row.id)))
                        .set((
                            provider_models::name.eq(&row.name),
                            provider_models::remote.eq(&row.remote),
                            provider_models::deployment.eq(&row.deployment),
                            provider_models::price_input.eq(row.price_input),
                            provider_models::price_output.eq(row.price_output),
                            provider_models::price_cache_read.eq(row.price_cache_read),
                            provider_models::price_cache_write.eq(row.price_cache_write),
                            provider_models::updated_at.eq(row.updated_at),
                        ))
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row, version })
                })
                .await
            }

            pub async fn delete_model(
                c: &mut Conn,
                r: &str,
                force: bool,
            ) -> Result<Written<String>, StoreError> {
                c.transaction(async |c| {
                    let row = find_model(c, "id", r).await?;
                    let used: Vec<String> = assignments::table
                        .filter(assignments::model_id.eq(&row.id))
                        .select(assignments::id)
                        .order(assignments::id.asc())
                        .load(c)
                        .await?;
                    if !used.is_empty() && !force {
                        return Err(StoreError::FailedPrecondition(format!(
                            "model {:?} still has {} assignment(s) ({}); unassign them first or pass --force to delete them too",
                            row.name,
                            used.len(),
                            used.join(", ")
                        )));
                    }
                    diesel::delete(assignments::table.filter(assignments::model_id.eq(&row.id)))
                        .execute(c)
                        .await?;
                    diesel::delete(provider_models::table.filter(provider_models::id.eq(&row.id)))
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row.id, version })
                })
                .await
            }

            // ---- virtual keys ----

            pub async fn create_vkey(
                c: &mut Conn,
                input: &NewVirtualKey,
            ) -> Result<Written<(VirtualKeyRow, Option<SecretString>)>, StoreError> {
                let (key, generated) = match &input.key {
                    Some(key) => (key.clone(), None),
                    None => {
                        let key = SecretString::from(ids::generate_virtual_key());
                        (key.clone(), Some(key))
                    }
                };
                let now = now_micros();
                let row = VirtualKeyRow {
                    id: ids::new_id("vkey"),
                    name: input.name.clone(),
                    key_sha256: ids::key_sha256(key.expose_secret()),
                    key_hint: ids::key_hint(key.expose_secret()),
                    enabled: true,
                    expires_at: input.expires_at,
                    created_at: now,
                    updated_at: now,
                    budget_micro_usd: input.budget_micro_usd,
                    budget_period: input.budget_period.clone(),
                };
                c.transaction(async |c| {
                    ensure_vkey_name_free(c, &row.name).await?;
                    let same_key: i64 = virtual_keys::table
                        .filter(virtual_keys::key_sha256.eq(&row.key_sha256))
                        .count()
                        .get_result(c)
                        .await?;
                    if same_key > 0 {
                        return Err(StoreError::AlreadyExists(
                            "another virtual key already uses this key value; choose a different --key".into(),
                        ));
                    }
                    diesel::insert_into(virtual_keys::table)
                        .values(&row)
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: (row.clone(), generated.clone()), version })
                })
                .await
            }

            pub async fn get_vkey(c: &mut Conn, r: &str) -> Result<VirtualKeyRow, StoreError> {
                find_vkey(c, "id", r).await
            }

            pub async fn list_vkeys(c: &mut Conn) -> Result<Vec<VirtualKeyRow>, StoreError> {
                Ok(virtual_keys::table
                    .order(virtual_keys::name.asc())
                    .select(VirtualKeyRow::as_select())
                    .load(c)
                    .await?)
            }

            pub async fn update_vkey(
                c: &mut Conn,
                r: &str,
                patch: &VirtualKeyPatch,
            ) -> Result<Written<VirtualKeyRow>, StoreError> {
                c.transaction(async |c| {
                    let mut row = find_vkey(c, "id", r).await?;
                    if let Some(name) = &patch.name {
                        if *name != row.name {
                            ensure_vkey_name_free(c, name).await?;
                            row.name = name.clone();
                        }
                    }
                    if let Some(enabled) = patch.enabled {
                        row.enabled = enabled;
                    }
                    if let Some(expires_at) = patch.expires_at {
                        row.expires_at = expires_at;
                    }
                    match patch.budget_micro_usd {
                        None => {}
                        Some(None) => {
                            row.budget_micro_usd = None;
                            row.budget_period = None;
                        }
                        Some(Some(budget)) => {
                            row.budget_micro_usd = Some(budget);
                            if row.budget_period.is_none() {
                                row.budget_period = Some(validate::DEFAULT_BUDGET_PERIOD.to_owned());
                            }
                        }
                    }
                    if let Some(period) = &patch.budget_period {
                        if row.budget_micro_usd.is_none() {
                            return Err(validate::budget_period_without_budget());
                        }
                        row.budget_period = Some(period.clone());
                    }
                    row.updated_at = now_micros();
                    diesel::update(virtual_keys::table.filter(virtual_keys::id.eq(&row.id)))
                        .set((
                            virtual_keys::name.eq(&row.name),
                            virtual_keys::enabled.eq(row.enabled),
                            virtual_keys::expires_at.eq(row.expires_at),
                            virtual_keys::budget_micro_usd.eq(row.budget_micro_usd),
                            virtual_keys::budget_period.eq(&row.budget_period),
                            virtual_keys::updated_at.eq(row.updated_at),
                        ))
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row, version })
                })
                .await
            }

            pub async fn delete_vkey(c: &mut Conn, r: &str) -> Result<Written<String>, StoreError> {
                c.transaction(async |c| {
                    let row = find_vkey(c, "id", r).await?;
                    diesel::delete(assignments::table.filter(assignments::vkey_id.eq(&row.id)))
                        .execute(c)
                        .await?;
                    diesel::delete(virtual_keys::table.filter(virtual_keys::id.eq(&row.id)))
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row.id, version })
                })
                .await
            }

            // ---- assignments ----

            pub async fn create_assignment(
                c: &mut Conn,
                input: &NewAssignment,
            ) -> Result<Written<AssignmentRow>, StoreError> {
                c.transaction(async |c| {
                    let vkey = find_vkey(c, "vkey_id", &input.vkey).await?;
                    let model = find_model(c, "model_id", &input.model).await?;
                    let alias = input.alias.clone().unwrap_or_else(|| model.name.clone());
                    let duplicate: Option<String> = assignments::table
                        .filter(assignments::vkey_id.eq(&vkey.id))
                        .filter(assignments::model_id.eq(&model.id))
                        .filter(assignments::alias.eq(&alias))
                        .select(assignments::id)
                        .first(c)
                        .await
                        .optional()?;
                    if let Some(existing) = duplicate {
                        return Err(StoreError::AlreadyExists(format!(
                            "virtual key {:?} already has model {:?} under alias {alias:?} ({existing})",
                            vkey.name, model.name
                        )));
                    }
                    let now = now_micros();
                    let row = AssignmentRow {
                        id: ids::new_id("asg"),
                        vkey_id: vkey.id,
                        model_id: model.id,
                        alias,
                        tps: input.tps,
                        burst: input.burst,
                        tpm: input.tpm,
                        weight: input.weight.unwrap_or(1),
                        created_at: now,
                        updated_at: now,
                    };
                    diesel::insert_into(assignments::table)
                        .values(&row)
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row, version })
                })
                .await
            }

            pub async fn get_assignment(c: &mut Conn, r: &str) -> Result<AssignmentRow, StoreError> {
                find_assignment(c, r).await
            }

            pub async fn list_assignments(
                c: &mut Conn,
                vkey: Option<&str>,
                model: Option<&str>,
            ) -> Result<Vec<AssignmentRow>, StoreError> {
                let mut query = assignments::table
                    .select(AssignmentRow::as_select())
                    .order((assignments::alias.asc(), assignments::id.asc()))
                    .into_boxed();
                if let Some(vkey_ref) = vkey {
                    let vkey = find_vkey(c, "vkey_id", vkey_ref).await?;
                    query = query.filter(assignments::vkey_id.eq(vkey.id));
                }
                if let Some(model_ref) = model {
                    let model = find_model(c, "model_id", model_ref).await?;
                    query = query.filter(assignments::model_id.eq(model.id));
                }
                Ok(query.load(c).await?)
            }

            pub async fn update_assignment(
                c: &mut Conn,
                r: &str,
                patch: &AssignmentPatch,
            ) -> Result<Written<AssignmentRow>, StoreError> {
                c.transaction(async |c| {
                    let mut row = find_assignment(c, r).await?;
                    if let Some(alias) = &patch.alias {
                        row.alias = alias.clone();
                    }
                    if let Some(tps) = patch.tps {
                        row.tps = tps;
                    }
                    if let Some(burst) = patch.burst {
                        row.burst = burst;
                    }
                    if let Some(tpm) = patch.tpm {
                        row.tpm = tpm;
                    }
                    if let Some(weight) = patch.weight {
                        row.weight = weight;
                    }
                    check_limits(row.tps, row.burst)?;
                    row.updated_at = now_micros();
                    diesel::update(assignments::table.filter(assignments::id.eq(&row.id)))
                        .set((
                            assignments::alias.eq(&row.alias),
                            assignments::tps.eq(row.tps),
                            assignments::burst.eq(row.burst),
                            assignments::tpm.eq(row.tpm),
                            assignments::weight.eq(row.weight),
                            assignments::updated_at.eq(row.updated_at),
                        ))
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row, version })
                })
                .await
            }

            pub async fn delete_assignment(c: &mut Conn, r: &str) -> Result<Written<String>, StoreError> {
                c.transaction(async |c| {
                    let row = find_assignment(c, r).await?;
                    diesel::delete(assignments::table.filter(assignments::id.eq(&row.id)))
                        .execute(c)
                        .await?;
                    let version = bump_version(c).await?;
                    Ok(Written { value: row.id, version })
                })
                .await
            }

            // ---- snapshot, rotation ----

            pub async fn read_config(c: &mut Conn) -> Result<ConfigRows, StoreError> {
                c.transaction(async |c| {
                    if IS_POSTGRES {
                        // One consistent view across the five reads.
                        diesel::sql_query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                            .execute(c)
                            .await?;
                    }
                    let (cluster_epoch, version) = current_version(c).await?;
                    Ok(ConfigRows {
                        cluster_epoch,
                        version,
                        connections: connections::table
                            .select(ConnectionRow::as_select())
                            .load(c)
                            .await?,
                        models: provider_models::table
                            .select(ModelRow::as_select())
                            .load(c)
                            .await?,
                        virtual_keys: virtual_keys::table
                            .select(VirtualKeyRow::as_select())
                            .load(c)
                            .await?,
                        assignments: assignments::table
                            .select(AssignmentRow::as_select())
                            .load(c)
                            .await?,
                    })
                })
                .await
            }

            pub async fn rotate_credentials(
                c: &mut Conn,
                keys: &MasterKeys,
            ) -> Result<usize, StoreError> {
                c.transaction(async |c| {
                    let rows: Vec<(String, Vec<u8>)> = connections::table
                        .select((connections::id, connections::credential))
                        .load(c)
                        .await?;
                    for (id, stored) in &rows {
                        let plain = keys.decrypt(credential_location(id), stored)?;
                        let sealed = keys.encrypt(credential_location(id), plain.expose_secret())?;
                        diesel::update(connections::table.filter(connections::id.eq(id)))
                            .set(connections::credential.eq(sealed))
                            .execute(c)
                            .await?;
                    }
                    Ok(rows.len())
                })
                .await
            }

            // ---- data planes (presence, not config: no version bump) ----

            pub async fn upsert_data_plane(c: &mut Conn, row: &DataPlaneRow) -> Result<(), StoreError> {
                diesel::insert_into(data_planes::table)
                    .values(row)
                    .on_conflict(data_planes::node_id)
                    .do_update()
                    .set((
                        data_planes::build.eq(&row.build),
                        data_planes::last_seen.eq(row.last_seen),
                        data_planes::connected.eq(row.connected),
                    ))
                    .execute(c)
                    .await?;
                Ok(())
            }

            pub async fn report_status(
                c: &mut Conn,
                node_id: &str,
                applied_version: i64,
                error: &str,
                now: i64,
            ) -> Result<(), StoreError> {
                let row = DataPlaneRow {
                    node_id: node_id.to_owned(),
                    build: String::new(),
                    applied_version,
                    last_seen: now,
                    connected: true,
                    error: error.to_owned(),
                };
                diesel::insert_into(data_planes::table)
                    .values(&row)
                    .on_conflict(data_planes::node_id)
                    .do_update()
                    .set((
                        data_planes::applied_version.eq(applied_version),
                        data_planes::error.eq(error),
                        data_planes::last_seen.eq(now),
                    ))
                    .execute(c)
                    .await?;
                Ok(())
            }

            pub async fn touch_data_plane(c: &mut Conn, node_id: &str, now: i64, connected: bool) -> Result<(), StoreError> {
                diesel::update(data_planes::table.filter(data_planes::node_id.eq(node_id)))
                    .set((data_planes::last_seen.eq(now), data_planes::connected.eq(connected)))
                    .execute(c)
                    .await?;
                Ok(())
            }

            pub async fn list_data_planes(c: &mut Conn) -> Result<Vec<DataPlaneRow>, StoreError> {
                Ok(data_planes::table
                    .order(data_planes::node_id.asc())
                    .select(DataPlaneRow::as_select())
                    .load(c)
                    .await?)
            }

            /// Writes a batch and its (node, boot, sequence) in one transaction; `false` when
            /// that batch was already written (nothing is added). Names are the control plane's
            /// current ones where the key or model still exists, else the data plane's.
            pub async fn report_usage(c: &mut Conn, batch: &UsageBatch, now: i64) -> Result<bool, StoreError> {
                let marker = UsageBatchRow {
                    node_id: batch.node_id.clone(),
                    boot_id: batch.boot_id.clone(),
                    sequence: batch.sequence,
                    received_at: now,
                };
                c.transaction(async |c| {
                    // A concurrent writer of the same batch waits on this key until the first
                    // commits, then inserts nothing: the batch is added exactly once.
                    let inserted = diesel::insert_into(usage_batches::table)
                        .values(&marker)
                        .on_conflict_do_nothing()
                        .execute(c)
                        .await?;
                    if inserted == 0 {
                        return Ok(false);
                    }
                    let mut vkey_ids: Vec<&str> = batch.rows.iter().map(|r| r.vkey_id.as_str()).collect();
                    vkey_ids.sort_unstable();
                    vkey_ids.dedup();
                    let mut model_ids: Vec<&str> = batch.rows.iter().map(|r| r.model_id.as_str()).collect();
                    model_ids.sort_unstable();
                    model_ids.dedup();
                    let vkey_names: HashMap<String, String> = virtual_keys::table
                        .filter(virtual_keys::id.eq_any(&vkey_ids))
                        .select((virtual_keys::id, virtual_keys::name))
                        .load::<(String, String)>(c)
                        .await?
                        .into_iter()
                        .collect();
                    let model_names: HashMap<String, String> = provider_models::table
                        .filter(provider_models::id.eq_any(&model_ids))
                        .select((provider_models::id, provider_models::name))
                        .load::<(String, String)>(c)
                        .await?
                        .into_iter()
                        .collect();
                    for row in &batch.rows {
                        let row = UsageRow {
                            vkey_name: vkey_names.get(&row.vkey_id).cloned().unwrap_or_else(|| row.vkey_name.clone()),
                            model_name: model_names.get(&row.model_id).cloned().unwrap_or_else(|| row.model_name.clone()),
                            ..row.clone()
                        };
                        diesel::insert_into(usage_hourly::table)
                            .values(&row)
                            .on_conflict((usage_hourly::vkey_id, usage_hourly::assignment_id, usage_hourly::hour))
                            .do_update()
                            .set((
                                usage_hourly::requests.eq(usage_hourly::requests + excluded(usage_hourly::requests)),
                                usage_hourly::input_tokens.eq(usage_hourly::input_tokens + excluded(usage_hourly::input_tokens)),
                                usage_hourly::output_tokens.eq(usage_hourly::output_tokens + excluded(usage_hourly::output_tokens)),
                                usage_hourly::cache_read_tokens.eq(usage_hourly::cache_read_tokens + excluded(usage_hourly::cache_read_tokens)),
                                usage_hourly::cache_write_tokens.eq(usage_hourly::cache_write_tokens + excluded(usage_hourly::cache_write_tokens)),
                                usage_hourly::reasoning_tokens.eq(usage_hourly::reasoning_tokens + excluded(usage_hourly::reasoning_tokens)),
                                usage_hourly::cost_pico_usd.eq(usage_hourly::cost_pico_usd + excluded(usage_hourly::cost_pico_usd)),
                                // The latest names, model and alias win (a rename shows at once).
                                usage_hourly::vkey_name.eq(excluded(usage_hourly::vkey_name)),
                                usage_hourly::model_id.eq(excluded(usage_hourly::model_id)),
                                usage_hourly::model_name.eq(excluded(usage_hourly::model_name)),
                                usage_hourly::alias.eq(excluded(usage_hourly::alias)),
                            ))
                            .execute(c)
                            .await?;
                    }
                    Ok(true)
                })
                .await
            }

            pub async fn query_usage(c: &mut Conn, q: &UsageQuery) -> Result<Vec<UsageSum>, StoreError> {
                let sql = usage_sql(&q.group_by, IS_POSTGRES);
                let rows: Vec<UsageSumSql> = diesel::sql_query(sql)
                    .bind::<Nullable<Text>, _>(q.vkey.as_deref())
                    .bind::<Nullable<Text>, _>(q.vkey.as_deref())
                    .bind::<Nullable<Text>, _>(q.vkey.as_deref())
                    .bind::<Nullable<Text>, _>(q.model.as_deref())
                    .bind::<Nullable<Text>, _>(q.model.as_deref())
                    .bind::<Nullable<Text>, _>(q.model.as_deref())
                    .bind::<Nullable<Text>, _>(q.alias.as_deref())
                    .bind::<Nullable<Text>, _>(q.alias.as_deref())
                    .bind::<Nullable<BigInt>, _>(q.since)
                    .bind::<Nullable<BigInt>, _>(q.since)
                    .bind::<Nullable<BigInt>, _>(q.until)
                    .bind::<Nullable<BigInt>, _>(q.until)
                    .load(c)
                    .await?;
                rows.into_iter().map(UsageSumSql::into_sum).collect()
            }

            pub async fn count_live_data_planes(c: &mut Conn, seen_since: i64) -> Result<i64, StoreError> {
                Ok(data_planes::table
                    .filter(data_planes::connected.eq(true))
                    .filter(data_planes::last_seen.ge(seen_since))
                    .count()
                    .get_result(c)
                    .await?)
            }
        }
    };
}

backend_queries!(pg, AsyncPgConnection, true);
backend_queries!(sqlite, SqliteConn, false);
