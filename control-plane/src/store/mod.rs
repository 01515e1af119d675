//! Every read and write of the config: [`Store`], the facade the admin API, the config service and
//! the CLI use. It validates input, runs one backend function on a pooled connection of whichever
//! backend is configured (`on_backend!`), and wakes [`Store::changes`] after a local write.
//!
//! The queries live in `queries` (`backend_queries!`), instantiated for `AsyncPgConnection` and for
//! the SQLite wrapper: one body, the same behaviour on both. Each write is one transaction that
//! validates its references, changes rows and bumps `config_state.version` (plus `pg_notify` on
//! Postgres, which is delivered to every replica on commit).

mod queries;

use self::queries::{credential_location, parse_options, pg, sqlite};
use crate::crypto::MasterKeys;
use crate::db::{Database, DbConn};
use crate::error::StoreError;
use crate::rows::{AssignmentRow, ConnectionRow, DataPlaneRow, ModelRow, VirtualKeyRow};
use crate::usage::{UsageBatch, UsageQuery, UsageSum};
use crate::validate;
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

#[derive(Default)]
pub struct NewModel {
    pub connection: String,
    pub name: String,
    pub remote: String,
    pub deployment: Option<String>,
    /// Micro-USD per million tokens (DESIGN §18); `None` = no price.
    pub price_input: Option<i64>,
    pub price_output: Option<i64>,
    pub price_cache_read: Option<i64>,
    pub price_cache_write: Option<i64>,
}

#[derive(Default)]
pub struct ModelPatch {
    pub name: Option<String>,
    pub remote: Option<String>,
    /// `Some(None)` clears the deployment.
    pub deployment: Option<Option<String>>,
    /// `None` leaves a price unchanged, `Some(None)` removes it, `Some(Some(v))` sets it.
    pub price_input: Option<Option<i64>>,
    pub price_output: Option<Option<i64>>,
    pub price_cache_read: Option<Option<i64>>,
    pub price_cache_write: Option<Option<i64>>,
}

#[derive(Default)]
pub struct NewVirtualKey {
    pub name: String,
    pub key: Option<SecretString>,
    pub expires_at: Option<i64>,
    /// Micro-USD per budget period (DESIGN §18); `None` = no budget.
    pub budget_micro_usd: Option<i64>,
    /// `day`, `week` or `month`; `None` with a budget = `month`. Refused without a budget.
    pub budget_period: Option<String>,
}

#[derive(Default)]
pub struct VirtualKeyPatch {
    pub name: Option<String>,
    pub enabled: Option<bool>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<i64>>,
    /// `None` leaves the budget unchanged, `Some(None)` removes it and its period,
    /// `Some(Some(v))` sets it (keeping the key's period, `month` if it had none).
    pub budget_micro_usd: Option<Option<i64>>,
    /// A new period for the key's budget: the key must have one after `budget_micro_usd` is
    /// applied.
    pub budget_period: Option<String>,
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

fn check_limits(tps: Option<i64>, burst: Option<i64>) -> Result<(), StoreError> {
    if burst.is_some() && tps.is_none() {
        return Err(StoreError::invalid(
            "burst",
            "needs tps: it is the capacity of the requests-per-second bucket",
        ));
    }
    Ok(())
}

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
        for (field, value) in [
            ("price_input", input.price_input),
            ("price_output", input.price_output),
            ("price_cache_read", input.price_cache_read),
            ("price_cache_write", input.price_cache_write),
        ] {
            if let Some(v) = value {
                validate::price(field, v)?;
            }
        }
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
        for (field, value) in [
            ("price_input", patch.price_input),
            ("price_output", patch.price_output),
            ("price_cache_read", patch.price_cache_read),
            ("price_cache_write", patch.price_cache_write),
        ] {
            if let Some(Some(v)) = value {
                validate::price(field, v)?;
            }
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
        if let Some(budget) = input.budget_micro_usd {
            validate::budget(budget)?;
        }
        input.budget_period = match (input.budget_micro_usd, input.budget_period.as_deref()) {
            (Some(_), Some(period)) => Some(validate::budget_period(period)?),
            (Some(_), None) => Some(validate::DEFAULT_BUDGET_PERIOD.to_owned()),
            (None, Some(period)) => {
                // A bad period is named as such before the missing budget.
                validate::budget_period(period)?;
                return Err(validate::budget_period_without_budget());
            }
            (None, None) => None,
        };
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
        if let Some(Some(budget)) = patch.budget_micro_usd {
            validate::budget(budget)?;
        }
        if let Some(period) = &patch.budget_period {
            patch.budget_period = Some(validate::budget_period(period)?);
            if patch.budget_micro_usd == Some(None) {
                // Removing the budget removes its period: a new period makes no sense.
                return Err(validate::budget_period_without_budget());
            }
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

    /// Writes a validated usage batch (see [`crate::usage`]); `false` when that (node, boot,
    /// sequence) was already written and nothing was added. Not a config write: no version bump.
    pub async fn report_usage(&self, batch: &UsageBatch) -> Result<bool, StoreError> {
        on_backend!(self, report_usage(batch, now_micros()))
    }

    pub async fn query_usage(&self, query: &UsageQuery) -> Result<Vec<UsageSum>, StoreError> {
        on_backend!(self, query_usage(query))
    }

    /// True when a data plane row counts as connected right now.
    pub fn is_live(row: &DataPlaneRow) -> bool {
        row.connected && row.last_seen >= now_micros() - LIVE_WINDOW_MICROS
    }
}
