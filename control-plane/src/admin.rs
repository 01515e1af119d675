//! `AdminService`: CRUD over connections, provider models, virtual keys and assignments, and the
//! list of data planes. Converts between protobuf messages and [`crate::store`] types; errors
//! become gRPC statuses through the one `From<StoreError> for Status`.

use crate::error::StoreError;
use crate::rows::{AssignmentRow, ConnectionRow, DataPlaneRow, ModelRow, VirtualKeyRow};
use crate::store::{
    AssignmentPatch, ConnectionPatch, ModelPatch, NewAssignment, NewConnection, NewModel,
    NewVirtualKey, Store, VirtualKeyPatch, Written,
};
use crate::usage::{self, Group, UsageQuery, UsageSum};
use llm_proxy_proto::Timestamp;
use llm_proxy_proto::v1::admin_service_server::AdminService;
use llm_proxy_proto::v1::*;
use secrecy::{ExposeSecret as _, SecretString};
use tonic::{Request, Response, Status};

pub fn timestamp(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

fn micros(field: &'static str, ts: &Timestamp) -> Result<i64, StoreError> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(StoreError::invalid(field, "has nanos out of range"));
    }
    ts.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(ts.nanos / 1000)))
        .ok_or_else(|| StoreError::invalid(field, "is out of range"))
}

/// A filter given as an optional string: absent or blank means no filter.
fn filter(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

fn usage_query(request: QueryUsageRequest) -> Result<UsageQuery, StoreError> {
    let seconds = |field: &'static str, ts: &Timestamp| {
        micros(field, ts)?;
        Ok::<_, StoreError>(ts.seconds)
    };
    let since = match &request.since {
        Some(ts) => Some(usage::since_bound(seconds("since", ts)?)),
        None => None,
    };
    let until = match &request.until {
        Some(ts) => Some(usage::until_bound(seconds("until", ts)?, ts.nanos)),
        None => None,
    };
    let mut group_by = Vec::new();
    for value in &request.group_by {
        let group = match UsageGroup::try_from(*value) {
            Ok(UsageGroup::Vkey) => Group::Vkey,
            Ok(UsageGroup::Model) => Group::Model,
            Ok(UsageGroup::Alias) => Group::Alias,
            Ok(UsageGroup::Day) => Group::Day,
            Ok(UsageGroup::Hour) => Group::Hour,
            Ok(UsageGroup::Unspecified) | Err(_) => {
                return Err(StoreError::invalid(
                    "group_by",
                    format!("must be one of vkey, model, alias, day, hour; got {value}"),
                ));
            }
        };
        if !group_by.contains(&group) {
            group_by.push(group);
        }
    }
    Ok(UsageQuery {
        vkey: filter(request.vkey),
        model: filter(request.model),
        alias: filter(request.alias),
        since,
        until,
        group_by,
    })
}

fn usage_total(sum: UsageSum) -> UsageTotal {
    let at = |secs: i64| timestamp(secs.saturating_mul(1_000_000));
    UsageTotal {
        vkey_id: sum.vkey_id,
        vkey_name: sum.vkey_name,
        model_id: sum.model_id,
        model_name: sum.model_name,
        alias: sum.alias,
        day: sum.day.map(at),
        hour: sum.hour.map(at),
        requests: sum.requests,
        input_tokens: sum.input_tokens,
        output_tokens: sum.output_tokens,
        cache_read_tokens: sum.cache_read_tokens,
        cache_write_tokens: sum.cache_write_tokens,
        reasoning_tokens: sum.reasoning_tokens,
        cost_pico_usd: sum.cost_pico_usd.to_string(),
    }
}

fn connection(row: ConnectionRow) -> Result<Connection, StoreError> {
    let options = Store::connection_options(&row)?.into_iter().collect();
    Ok(Connection {
        id: row.id,
        name: row.name,
        provider: row.provider,
        endpoint: row.endpoint,
        options,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
    })
}

fn model(row: ModelRow) -> ProviderModel {
    ProviderModel {
        id: row.id,
        connection_id: row.connection_id,
        name: row.name,
        remote: row.remote,
        deployment: row.deployment,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        price_input: row.price_input,
        price_output: row.price_output,
        price_cache_read: row.price_cache_read,
        price_cache_write: row.price_cache_write,
    }
}

/// An update's [`PriceUpdate`]: absent leaves the price as it is (`None`), present sets it or,
/// without a value, removes it (`Some(value)`).
fn price_update(update: Option<PriceUpdate>) -> Option<Option<i64>> {
    update.map(|u| u.micro_usd_per_million)
}

fn virtual_key(row: VirtualKeyRow) -> VirtualKey {
    VirtualKey {
        id: row.id,
        name: row.name,
        key_hint: row.key_hint,
        enabled: row.enabled,
        expires_at: row.expires_at.map(timestamp),
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        budget_micro_usd: row.budget_micro_usd,
        budget_period: row.budget_period,
    }
}

fn assignment(row: AssignmentRow) -> Assignment {
    Assignment {
        id: row.id,
        vkey_id: row.vkey_id,
        model_id: row.model_id,
        alias: row.alias,
        tps: row.tps,
        burst: row.burst,
        tpm: row.tpm,
        weight: row.weight,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
    }
}

fn data_plane(row: DataPlaneRow) -> DataPlane {
    DataPlane {
        connected: Store::is_live(&row),
        node_id: row.node_id,
        applied_version: row.applied_version,
        last_seen: Some(timestamp(row.last_seen)),
        build: row.build,
        error: row.error,
    }
}

fn deleted(written: Written<String>) -> Response<DeleteResponse> {
    Response::new(DeleteResponse {
        id: written.value,
        version: written.version,
    })
}

fn non_empty(value: &str) -> Option<&str> {
    let value = value.trim();
    (!value.is_empty()).then_some(value)
}

#[derive(Debug, Clone)]
pub struct AdminApi {
    store: Store,
}

impl AdminApi {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_connection(
        &self,
        request: Request<CreateConnectionRequest>,
    ) -> Result<Response<Connection>, Status> {
        let req = request.into_inner();
        let written = self
            .store
            .create_connection(NewConnection {
                name: req.name,
                provider: req.provider,
                endpoint: req.endpoint,
                credential: SecretString::from(req.credential),
                options: req.options.into_iter().collect(),
            })
            .await?;
        tracing::info!(id = %written.value.id, version = written.version, "connection created");
        Ok(Response::new(connection(written.value)?))
    }

    async fn get_connection(
        &self,
        request: Request<GetRequest>,
    ) -> Result<Response<Connection>, Status> {
        let row = self.store.get_connection(&request.into_inner().id).await?;
        Ok(Response::new(connection(row)?))
    }

    async fn list_connections(
        &self,
        _request: Request<ListConnectionsRequest>,
    ) -> Result<Response<ListConnectionsResponse>, Status> {
        let rows = self.store.list_connections().await?;
        let connections = rows.into_iter().map(connection).collect::<Result<_, _>>()?;
        Ok(Response::new(ListConnectionsResponse { connections }))
    }

    async fn update_connection(
        &self,
        request: Request<UpdateConnectionRequest>,
    ) -> Result<Response<Connection>, Status> {
        let req = request.into_inner();
        let patch = ConnectionPatch {
            name: req.name,
            endpoint: req.endpoint,
            credential: req.credential.map(SecretString::from),
            set_options: req.set_options.into_iter().collect(),
            unset_options: req.unset_options,
        };
        let written = self.store.update_connection(&req.id, patch).await?;
        Ok(Response::new(connection(written.value)?))
    }

    async fn delete_connection(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let req = request.into_inner();
        Ok(deleted(
            self.store.delete_connection(&req.id, req.force).await?,
        ))
    }

    async fn create_provider_model(
        &self,
        request: Request<CreateProviderModelRequest>,
    ) -> Result<Response<ProviderModel>, Status> {
        let req = request.into_inner();
        let written = self
            .store
            .create_model(NewModel {
                connection: req.connection_id,
                name: req.name,
                remote: req.remote,
                deployment: req.deployment,
                price_input: req.price_input,
                price_output: req.price_output,
                price_cache_read: req.price_cache_read,
                price_cache_write: req.price_cache_write,
            })
            .await?;
        Ok(Response::new(model(written.value)))
    }

    async fn get_provider_model(
        &self,
        request: Request<GetRequest>,
    ) -> Result<Response<ProviderModel>, Status> {
        let row = self.store.get_model(&request.into_inner().id).await?;
        Ok(Response::new(model(row)))
    }

    async fn list_provider_models(
        &self,
        request: Request<ListProviderModelsRequest>,
    ) -> Result<Response<ListProviderModelsResponse>, Status> {
        let req = request.into_inner();
        let rows = self
            .store
            .list_models(non_empty(&req.connection_id))
            .await?;
        Ok(Response::new(ListProviderModelsResponse {
            models: rows.into_iter().map(model).collect(),
        }))
    }

    async fn update_provider_model(
        &self,
        request: Request<UpdateProviderModelRequest>,
    ) -> Result<Response<ProviderModel>, Status> {
        let req = request.into_inner();
        let patch = ModelPatch {
            name: req.name,
            remote: req.remote,
            deployment: req.deployment.map(|d| (!d.trim().is_empty()).then_some(d)),
            price_input: price_update(req.price_input),
            price_output: price_update(req.price_output),
            price_cache_read: price_update(req.price_cache_read),
            price_cache_write: price_update(req.price_cache_write),
        };
        let written = self.store.update_model(&req.id, patch).await?;
        Ok(Response::new(model(written.value)))
    }

    async fn delete_provider_model(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let req = request.into_inner();
        Ok(deleted(self.store.delete_model(&req.id, req.force).await?))
    }

    async fn create_virtual_key(
        &self,
        request: Request<CreateVirtualKeyRequest>,
    ) -> Result<Response<CreateVirtualKeyResponse>, Status> {
        let req = request.into_inner();
        let expires_at = req
            .expires_at
            .as_ref()
            .map(|ts| micros("expires_at", ts))
            .transpose()?;
        let written = self
            .store
            .create_vkey(NewVirtualKey {
                name: req.name,
                key: req.key.map(SecretString::from),
                expires_at,
                budget_micro_usd: req.budget_micro_usd,
                budget_period: req.budget_period,
            })
            .await?;
        let (row, generated) = written.value;
        Ok(Response::new(CreateVirtualKeyResponse {
            virtual_key: Some(virtual_key(row)),
            generated_key: generated.map(|k| k.expose_secret().to_owned()),
        }))
    }

    async fn get_virtual_key(
        &self,
        request: Request<GetRequest>,
    ) -> Result<Response<VirtualKey>, Status> {
        let row = self.store.get_vkey(&request.into_inner().id).await?;
        Ok(Response::new(virtual_key(row)))
    }

    async fn list_virtual_keys(
        &self,
        _request: Request<ListVirtualKeysRequest>,
    ) -> Result<Response<ListVirtualKeysResponse>, Status> {
        let rows = self.store.list_vkeys().await?;
        Ok(Response::new(ListVirtualKeysResponse {
            virtual_keys: rows.into_iter().map(virtual_key).collect(),
        }))
    }

    async fn update_virtual_key(
        &self,
        request: Request<UpdateVirtualKeyRequest>,
    ) -> Result<Response<VirtualKey>, Status> {
        let req = request.into_inner();
        let expires_at = if req.clear_expires_at {
            if req.expires_at.is_some() {
                return Err(StoreError::invalid(
                    "expires_at",
                    "cannot be set and cleared in one update",
                )
                .into());
            }
            Some(None)
        } else {
            req.expires_at
                .as_ref()
                .map(|ts| micros("expires_at", ts).map(Some))
                .transpose()?
        };
        let patch = VirtualKeyPatch {
            name: req.name,
            enabled: req.enabled,
            expires_at,
            // Absent = unchanged; present without a value = remove, with one = set.
            budget_micro_usd: req.budget.map(|b| b.micro_usd),
            budget_period: req.budget_period,
        };
        let written = self.store.update_vkey(&req.id, patch).await?;
        Ok(Response::new(virtual_key(written.value)))
    }

    async fn delete_virtual_key(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        Ok(deleted(
            self.store.delete_vkey(&request.into_inner().id).await?,
        ))
    }

    async fn create_assignment(
        &self,
        request: Request<CreateAssignmentRequest>,
    ) -> Result<Response<Assignment>, Status> {
        let req = request.into_inner();
        let written = self
            .store
            .create_assignment(NewAssignment {
                vkey: req.vkey_id,
                model: req.model_id,
                alias: req.alias,
                tps: req.tps,
                burst: req.burst,
                tpm: req.tpm,
                weight: req.weight,
            })
            .await?;
        Ok(Response::new(assignment(written.value)))
    }

    async fn get_assignment(
        &self,
        request: Request<GetRequest>,
    ) -> Result<Response<Assignment>, Status> {
        let row = self.store.get_assignment(&request.into_inner().id).await?;
        Ok(Response::new(assignment(row)))
    }

    async fn list_assignments(
        &self,
        request: Request<ListAssignmentsRequest>,
    ) -> Result<Response<ListAssignmentsResponse>, Status> {
        let req = request.into_inner();
        let rows = self
            .store
            .list_assignments(non_empty(&req.vkey_id), non_empty(&req.model_id))
            .await?;
        Ok(Response::new(ListAssignmentsResponse {
            assignments: rows.into_iter().map(assignment).collect(),
        }))
    }

    async fn update_assignment(
        &self,
        request: Request<UpdateAssignmentRequest>,
    ) -> Result<Response<Assignment>, Status> {
        let req = request.into_inner();
        let limit = |field: &'static str, value: Option<i64>, clear: bool| match (value, clear) {
            (Some(_), true) => Err(StoreError::invalid(
                field,
                "cannot be set and cleared in one update",
            )),
            (Some(v), false) => Ok(Some(Some(v))),
            (None, true) => Ok(Some(None)),
            (None, false) => Ok(None),
        };
        let patch = AssignmentPatch {
            alias: req.alias,
            tps: limit("tps", req.tps, req.clear_tps)?,
            burst: limit("burst", req.burst, req.clear_burst)?,
            tpm: limit("tpm", req.tpm, req.clear_tpm)?,
            weight: req.weight,
        };
        let written = self.store.update_assignment(&req.id, patch).await?;
        Ok(Response::new(assignment(written.value)))
    }

    async fn delete_assignment(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        Ok(deleted(
            self.store
                .delete_assignment(&request.into_inner().id)
                .await?,
        ))
    }

    async fn list_data_planes(
        &self,
        _request: Request<ListDataPlanesRequest>,
    ) -> Result<Response<ListDataPlanesResponse>, Status> {
        let rows = self.store.list_data_planes().await?;
        Ok(Response::new(ListDataPlanesResponse {
            data_planes: rows.into_iter().map(data_plane).collect(),
        }))
    }

    async fn query_usage(
        &self,
        request: Request<QueryUsageRequest>,
    ) -> Result<Response<QueryUsageResponse>, Status> {
        let query = usage_query(request.into_inner())?;
        let sums = self.store.query_usage(&query).await?;
        Ok(Response::new(QueryUsageResponse {
            rows: sums.into_iter().map(usage_total).collect(),
        }))
    }
}
