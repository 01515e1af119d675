//! Every read and write of the config, written once and compiled for both backends.
//!
//! The queries live in `backend_queries!`, instantiated for `AsyncPgConnection` and for the SQLite
//! wrapper: one body, the same behaviour on both. Each write is one transaction that validates its
//! references, changes rows and bumps `config_state.version` (plus `pg_notify` on Postgres, which
//! is delivered to every replica on commit).

use crate::crypto::{Location, MasterKeys};
use crate::db::{CONFIG_CHANNEL, Database, DbConn, SqliteConn};
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
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

const CREDENTIAL_AT: (&str, &str) = ("connections", "credential");

fn credential_location(row_id: &str) -> Location<'_> {
    Location {
        table: CREDENTIAL_AT.0,
        column: CREDENTIAL_AT.1,
        row_id,
    }
}

pub struct NewConnection {
    pub name: String,
    pub provider: String,
    pub endpoint: String,
    pub credential: SecretString,
    pub options: BTreeMap<String, String>,
}

#[derive(Default)]
pub struct ConnectionPatch {
    pub name: Option<String>,
    pub endpoint: Option<String>,
    pub credential: Option<SecretString>,
    pub set_options: BTreeMap<String, String>,
    pub unset_options: Vec<String>,
}

pub struct NewModel {
    pub connection: String,
    pub name: String,
    pub remote: String,
    pub deployment: Option<String>,
}

#[derive(Default)]
pub struct ModelPatch {
    pub name: Option<String>,
    pub remote: Option<String>,
    /// `Some(None)` clears the deployment.
    pub deployment: Option<Option<String>>,
}

pub struct NewVirtualKey {
    pub name: String,
    pub key: Option<SecretString>,
    pub expires_at: Option<i64>,
}

#[derive(Default)]
pub struct VirtualKeyPatch {
    pub name: Option<String>,
    pub enabled: Option<bool>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<i64>>,
}

#[derive(Default)]
pub struct NewAssignment {
    pub vkey: String,
    pub model: String,
    pub alias: Option<String>,
    pub tps: Option<i64>,
    pub burst: Option<i64>,
    pub tpm: Option<i64>,
    pub weight: Option<i64>,
}

#[derive(Default)]
pub struct AssignmentPatch {
    pub alias: Option<String>,
    /// `Some(None)` removes the limit.
    pub tps: Option<Option<i64>>,
    pub burst: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
    pub weight: Option<i64>,
}

/// Everything a snapshot is built from, read in one transaction.
#[derive(Debug)]
pub struct ConfigRows {
    pub cluster_epoch: String,
    pub version: i64,
    pub connections: Vec<ConnectionRow>,
    pub models: Vec<ModelRow>,
    pub virtual_keys: Vec<VirtualKeyRow>,
    pub assignments: Vec<AssignmentRow>,
}

/// A write's result and the config version it produced.
#[derive(Debug)]
pub struct Written<T> {
    pub value: T,
    pub version: i64,
}

fn parse_options(row: &ConnectionRow) -> Result<BTreeMap<String, String>, StoreError> {
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

fn check_limits(tps: Option<i64>, burst: Option<i64>) -> Result<(), StoreError> {
    if burst.is_some() && tps.is_none() {
        return Err(StoreError::invalid(
            "burst",
            "needs tps: it is the capacity of the requests-per-second bucket",
        ));
    }
    Ok(())
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
        mod $module {
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
                    row.updated_at = now_micros();
                    diesel::update(provider_models::table.filter(provider_models::id.eq(&row.id)))
                        .set((
                            provider_models::name.eq(&row.name),
                            provider_models::remote.eq(&row.remote),
                            provider_models::deployment.eq(&row.deployment),
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

/// Runs one backend function with a pooled connection of whichever backend is configured.
macro_rules! on_backend {
    ($self:ident, $op:ident ( $($arg:expr),* $(,)? )) => {{
        match $self.db.get().await? {
            DbConn::Postgres(mut conn) => pg::$op(&mut conn, $($arg),*).await,
            DbConn::Sqlite(mut conn) => sqlite::$op(&mut conn, $($arg),*).await,
        }
    }};
}

/// A data plane counts as live when seen within this window (heartbeats come every ~10 s).
pub const LIVE_WINDOW_MICROS: i64 = 30_000_000;

/// What [`Store::verify_credentials`] found.
#[derive(Debug)]
pub struct CredentialReport {
    /// Stored connections.
    pub total: usize,
    /// Connections whose credential does not decrypt, with why (never the ciphertext).
    pub undecryptable: Vec<(String, StoreError)>,
}

/// Validated reads and writes of the config. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Database,
    keys: Arc<MasterKeys>,
    changed: Arc<Notify>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("db", &self.db).finish()
    }
}

impl Store {
    pub fn new(db: Database, keys: Arc<MasterKeys>) -> Self {
        Self {
            db,
            keys,
            changed: Arc::new(Notify::new()),
        }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn master_keys(&self) -> &MasterKeys {
        &self.keys
    }

    /// Woken after every local write (bursts collapse into one stored permit).
    pub fn changes(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    fn written<T>(&self, result: Result<Written<T>, StoreError>) -> Result<Written<T>, StoreError> {
        if result.is_ok() {
            self.changed.notify_one();
        }
        result
    }

    pub async fn current_version(&self) -> Result<(String, i64), StoreError> {
        on_backend!(self, current_version())
    }

    pub async fn create_connection(
        &self,
        mut input: NewConnection,
    ) -> Result<Written<ConnectionRow>, StoreError> {
        input.name = validate::connection_name(&input.name)?;
        input.provider = validate::provider(&input.provider)?;
        input.endpoint = validate::endpoint(&input.endpoint)?;
        validate::connection_options(&input.provider, &input.endpoint, &input.options)?;
        let keys = self.keys.clone();
        let result = on_backend!(self, create_connection(&keys, &input));
        self.written(result)
    }

    pub async fn get_connection(&self, r: &str) -> Result<ConnectionRow, StoreError> {
        on_backend!(self, get_connection(r))
    }

    pub async fn list_connections(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        on_backend!(self, list_connections())
    }

    pub async fn update_connection(
        &self,
        r: &str,
        mut patch: ConnectionPatch,
    ) -> Result<Written<ConnectionRow>, StoreError> {
        if let Some(name) = &patch.name {
            patch.name = Some(validate::connection_name(name)?);
        }
        if let Some(endpoint) = &patch.endpoint {
            patch.endpoint = Some(validate::endpoint(endpoint)?);
        }
        let keys = self.keys.clone();
        let result = on_backend!(self, update_connection(&keys, r, &patch));
        self.written(result)
    }

    pub async fn delete_connection(
        &self,
        r: &str,
        force: bool,
    ) -> Result<Written<String>, StoreError> {
        let result = on_backend!(self, delete_connection(r, force));
        self.written(result)
    }

    pub async fn create_model(&self, mut input: NewModel) -> Result<Written<ModelRow>, StoreError> {
        input.name = validate::name("name", &input.name)?;
        if validate::looks_like_id(&input.name) {
            return Err(StoreError::invalid(
                "name",
                "looks like a resource ID; pick another name",
            ));
        }
        input.remote = validate::remote(&input.remote)?;
        input.deployment = input
            .deployment
            .as_deref()
            .map(validate::deployment)
            .transpose()?;
        let result = on_backend!(self, create_model(&input));
        self.written(result)
    }

    pub async fn get_model(&self, r: &str) -> Result<ModelRow, StoreError> {
        on_backend!(self, get_model(r))
    }

    pub async fn list_models(&self, connection: Option<&str>) -> Result<Vec<ModelRow>, StoreError> {
        on_backend!(self, list_models(connection))
    }

    pub async fn update_model(
        &self,
        r: &str,
        mut patch: ModelPatch,
    ) -> Result<Written<ModelRow>, StoreError> {
        if let Some(name) = &patch.name {
            patch.name = Some(validate::name("name", name)?);
        }
        if let Some(remote) = &patch.remote {
            patch.remote = Some(validate::remote(remote)?);
        }
        if let Some(Some(deployment)) = &patch.deployment {
            patch.deployment = Some(Some(validate::deployment(deployment)?));
        }
        let result = on_backend!(self, update_model(r, &patch));
        self.written(result)
    }

    pub async fn delete_model(&self, r: &str, force: bool) -> Result<Written<String>, StoreError> {
        let result = on_backend!(self, delete_model(r, force));
        self.written(result)
    }

    pub async fn create_vkey(
        &self,
        mut input: NewVirtualKey,
    ) -> Result<Written<(VirtualKeyRow, Option<SecretString>)>, StoreError> {
        input.name = validate::name("name", &input.name)?;
        if validate::looks_like_id(&input.name) {
            return Err(StoreError::invalid(
                "name",
                "looks like a resource ID; pick another name",
            ));
        }
        if let Some(key) = &input.key {
            validate::user_key(key.expose_secret())?;
        }
        let result = on_backend!(self, create_vkey(&input));
        self.written(result)
    }

    pub async fn get_vkey(&self, r: &str) -> Result<VirtualKeyRow, StoreError> {
        on_backend!(self, get_vkey(r))
    }

    pub async fn list_vkeys(&self) -> Result<Vec<VirtualKeyRow>, StoreError> {
        on_backend!(self, list_vkeys())
    }

    pub async fn update_vkey(
        &self,
        r: &str,
        mut patch: VirtualKeyPatch,
    ) -> Result<Written<VirtualKeyRow>, StoreError> {
        if let Some(name) = &patch.name {
            patch.name = Some(validate::name("name", name)?);
        }
        let result = on_backend!(self, update_vkey(r, &patch));
        self.written(result)
    }

    pub async fn delete_vkey(&self, r: &str) -> Result<Written<String>, StoreError> {
        let result = on_backend!(self, delete_vkey(r));
        self.written(result)
    }

    pub async fn create_assignment(
        &self,
        mut input: NewAssignment,
    ) -> Result<Written<AssignmentRow>, StoreError> {
        input.alias = input.alias.as_deref().map(validate::alias).transpose()?;
        input.tps = input
            .tps
            .map(|v| validate::positive("tps", v))
            .transpose()?;
        input.burst = input
            .burst
            .map(|v| validate::positive("burst", v))
            .transpose()?;
        input.tpm = input
            .tpm
            .map(|v| validate::positive("tpm", v))
            .transpose()?;
        input.weight = input
            .weight
            .map(|v| validate::positive("weight", v))
            .transpose()?;
        check_limits(input.tps, input.burst)?;
        let result = on_backend!(self, create_assignment(&input));
        self.written(result)
    }

    pub async fn get_assignment(&self, r: &str) -> Result<AssignmentRow, StoreError> {
        on_backend!(self, get_assignment(r))
    }

    pub async fn list_assignments(
        &self,
        vkey: Option<&str>,
        model: Option<&str>,
    ) -> Result<Vec<AssignmentRow>, StoreError> {
        on_backend!(self, list_assignments(vkey, model))
    }

    pub async fn update_assignment(
        &self,
        r: &str,
        mut patch: AssignmentPatch,
    ) -> Result<Written<AssignmentRow>, StoreError> {
        if let Some(alias) = &patch.alias {
            patch.alias = Some(validate::alias(alias)?);
        }
        for (field, value) in [
            ("tps", patch.tps),
            ("burst", patch.burst),
            ("tpm", patch.tpm),
        ] {
            if let Some(Some(v)) = value {
                validate::positive(field, v)?;
            }
        }
        if let Some(weight) = patch.weight {
            validate::positive("weight", weight)?;
        }
        let result = on_backend!(self, update_assignment(r, &patch));
        self.written(result)
    }

    pub async fn delete_assignment(&self, r: &str) -> Result<Written<String>, StoreError> {
        let result = on_backend!(self, delete_assignment(r));
        self.written(result)
    }

    pub async fn read_config(&self) -> Result<ConfigRows, StoreError> {
        on_backend!(self, read_config())
    }

    /// Decrypts one stored credential (for snapshots).
    pub fn decrypt_credential(&self, row: &ConnectionRow) -> Result<SecretString, StoreError> {
        Ok(self
            .keys
            .decrypt(credential_location(&row.id), &row.credential)?)
    }

    pub fn connection_options(row: &ConnectionRow) -> Result<BTreeMap<String, String>, StoreError> {
        parse_options(row)
    }

    /// Re-encrypts every credential under the active master key; returns how many.
    pub async fn rotate_credentials(&self) -> Result<usize, StoreError> {
        let keys = self.keys.clone();
        on_backend!(self, rotate_credentials(&keys))
    }

    /// Tries every stored credential against the configured keys: which ones do not decrypt
    /// (a replica missing a key mid-rotation, or a tampered row). Errors only on the database.
    pub async fn verify_credentials(&self) -> Result<CredentialReport, StoreError> {
        let rows = self.list_connections().await?;
        let undecryptable = rows
            .iter()
            .filter_map(|row| {
                self.decrypt_credential(row)
                    .err()
                    .map(|err| (row.id.clone(), err))
            })
            .collect();
        Ok(CredentialReport {
            total: rows.len(),
            undecryptable,
        })
    }

    pub async fn data_plane_connected(&self, node_id: &str, build: &str) -> Result<(), StoreError> {
        let row = DataPlaneRow {
            node_id: node_id.to_owned(),
            build: build.to_owned(),
            applied_version: 0,
            last_seen: now_micros(),
            connected: true,
            error: String::new(),
        };
        on_backend!(self, upsert_data_plane(&row))
    }

    pub async fn data_plane_seen(&self, node_id: &str, connected: bool) -> Result<(), StoreError> {
        on_backend!(self, touch_data_plane(node_id, now_micros(), connected))
    }

    pub async fn report_status(
        &self,
        node_id: &str,
        applied_version: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        on_backend!(
            self,
            report_status(node_id, applied_version, error, now_micros())
        )
    }

    pub async fn list_data_planes(&self) -> Result<Vec<DataPlaneRow>, StoreError> {
        on_backend!(self, list_data_planes())
    }

    pub async fn count_live_data_planes(&self) -> Result<i64, StoreError> {
        on_backend!(
            self,
            count_live_data_planes(now_micros() - LIVE_WINDOW_MICROS)
        )
    }

    /// True when a data plane row counts as connected right now.
    pub fn is_live(row: &DataPlaneRow) -> bool {
        row.connected && row.last_seen >= now_micros() - LIVE_WINDOW_MICROS
    }
}
