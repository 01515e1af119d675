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
use crate::rows::{AssignmentRow, ConnectionRow, DataPlaneRow, ModelRow, VirtualKeyRow};
use crate::schema::{
    assignments, config_state, connections, data_planes, provider_models, virtual_keys,
};
use crate::validate;
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use secrecy::{ExposeSecret, SecretString};
use std::collections::BTreeMap;

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
                    row.updated_at = now_micros();
                    diesel::update(virtual_keys::table.filter(virtual_keys::id.eq(&row.id)))
                        .set((
                            virtual_keys::name.eq(&row.name),
                            virtual_keys::enabled.eq(row.enabled),
                            virtual_keys::expires_at.eq(row.expires_at),
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
