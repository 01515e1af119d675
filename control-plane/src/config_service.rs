//! `ConfigService`: the snapshot stream to data planes and their status reports.

use crate::error::StoreError;
use crate::hub::{PublishedSnapshot, SnapshotHub};
use crate::readiness::Readiness;
use crate::rows::UsageRow;
use crate::store::{Store, now_micros};
use crate::usage::{self, UsageBatch};
use llm_proxy_proto::v1::config_service_server::ConfigService;
use llm_proxy_proto::v1::{
    ConfigEvent, GetSpendRequest, GetSpendResponse, Heartbeat, ReportStatusRequest,
    ReportStatusResponse, ReportUsageRequest, ReportUsageResponse, Snapshot, SubscribeRequest,
    config_event,
};
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct ConfigApi {
    store: Store,
    hub: Arc<SnapshotHub>,
    heartbeat_every: Duration,
    subscribers: Gauge,
    /// Ends every stream when the server shuts down (graceful shutdown waits for open streams).
    shutdown: watch::Receiver<bool>,
    /// Status writes wait for the database; streams do not (they wait for a snapshot).
    readiness: Readiness,
    /// Held by every clone, stream tasks included: the receiver learns when all are gone, so a
    /// shutdown can wait for the streams' last status writes ([`StreamsDone`]).
    _alive: mpsc::Sender<()>,
}

/// Resolves once the service and every stream task it spawned have ended.
#[derive(Debug)]
pub struct StreamsDone(mpsc::Receiver<()>);

impl StreamsDone {
    pub async fn wait(mut self) {
        // Nothing is ever sent: `recv` returns `None` once every sender is dropped.
        let _ = self.0.recv().await;
    }
}

impl ConfigApi {
    pub fn new(
        store: Store,
        hub: Arc<SnapshotHub>,
        heartbeat_every: Duration,
        subscribers: Gauge,
        shutdown: watch::Receiver<bool>,
        readiness: Readiness,
    ) -> (Self, StreamsDone) {
        let (alive, done) = mpsc::channel(1);
        let api = Self {
            store,
            hub,
            heartbeat_every,
            subscribers,
            shutdown,
            readiness,
            _alive: alive,
        };
        (api, StreamsDone(done))
    }

    /// Records that `node` subscribed; false (logged) when that cannot be written now. The
    /// stream is served either way: a data plane needs its config more than the control plane
    /// needs the bookkeeping, which the next heartbeat retries.
    async fn record_connected(&self, node: &str, build: &str) -> bool {
        if let Some(reason) = self.readiness.not_ready_reason() {
            tracing::debug!(node_id = %node, %reason, "data plane presence not recorded yet");
            return false;
        }
        match bounded(self.store.data_plane_connected(node, build)).await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(node_id = %node, error = %err, "cannot record data plane connection; serving its config stream anyway");
                false
            }
        }
    }
}

/// Bound on one data-plane status write made on a stream's behalf: a database that hangs must not
/// hold up a subscription or its snapshots.
const STATUS_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

async fn bounded<T>(
    write: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(STATUS_WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {} s",
                STATUS_WRITE_TIMEOUT.as_secs()
            )))
        })
}

fn node_id(value: &str) -> Result<String, Status> {
    let value = value.trim();
    if value.is_empty() || value.len() > 200 {
        return Err(Status::invalid_argument(
            "invalid node_id: must be 1 to 200 characters",
        ));
    }
    Ok(value.to_owned())
}

/// A name the data plane knew: kept as given, cut to a sane length.
fn known_name(value: &str) -> String {
    value.trim().chars().take(usage::MAX_ID_LEN).collect()
}

/// One reported row, checked; errors name the field and the row ("hour_unix in rows[3] must…").
fn usage_row(i: usize, row: &llm_proxy_proto::v1::UsageRow) -> Result<UsageRow, StoreError> {
    let at = |e: StoreError| match e {
        StoreError::Invalid { field, reason } => StoreError::Invalid {
            field,
            reason: format!("in rows[{i}] {reason}"),
        },
        other => other,
    };
    let id = |field, value: &str| usage::batch_id(field, value).map_err(at);
    let count = |field, value| usage::count(field, value).map_err(at);
    Ok(UsageRow {
        vkey_id: id("vkey_id", &row.vkey_id)?,
        assignment_id: id("assignment_id", &row.assignment_id)?,
        hour: usage::hour("hour_unix", row.hour_unix).map_err(at)?,
        vkey_name: known_name(&row.vkey_name),
        model_id: id("model_id", &row.model_id)?,
        model_name: known_name(&row.model_name),
        alias: id("alias", &row.alias)?,
        requests: count("requests", row.requests)?,
        input_tokens: count("input_tokens", row.input_tokens)?,
        output_tokens: count("output_tokens", row.output_tokens)?,
        cache_read_tokens: count("cache_read_tokens", row.cache_read_tokens)?,
        cache_write_tokens: count("cache_write_tokens", row.cache_write_tokens)?,
        reasoning_tokens: count("reasoning_tokens", row.reasoning_tokens)?,
        cost_pico_usd: usage::parse_cost("cost_pico_usd", &row.cost_pico_usd).map_err(at)?,
    })
}

/// A reported batch, checked and merged per (key, assignment, hour).
pub fn usage_batch(request: ReportUsageRequest) -> Result<UsageBatch, StoreError> {
    let node_id = usage::batch_id("node_id", &request.node_id)?;
    let boot_id = usage::batch_id("boot_id", &request.boot_id)?;
    let sequence = usage::sequence(request.sequence)?;
    if request.rows.len() > usage::MAX_BATCH_ROWS {
        return Err(StoreError::invalid(
            "rows",
            format!(
                "must be at most {} per batch, got {}: split the batch",
                usage::MAX_BATCH_ROWS,
                request.rows.len()
            ),
        ));
    }
    let rows = request
        .rows
        .iter()
        .enumerate()
        .map(|(i, row)| usage_row(i, row))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(UsageBatch {
        node_id,
        boot_id,
        sequence,
        rows: usage::merge(rows)?,
    })
}

fn heartbeat(hub: &SnapshotHub, current: Option<&PublishedSnapshot>) -> ConfigEvent {
    ConfigEvent {
        event: Some(config_event::Event::Heartbeat(Heartbeat {
            cluster_epoch: current.map(|s| s.cluster_epoch.clone()).unwrap_or_default(),
            version: current.map_or(0, |s| s.version),
            live_data_planes: hub.live_data_planes(),
            server_time_unix_ms: now_micros() / 1000,
        })),
    }
}

/// Sends every part of `snapshot` in order; false when the subscriber is gone. A part is cloned
/// only as it is sent, so a subscriber costs one part of memory, not a whole snapshot.
async fn send_snapshot(
    hub: &SnapshotHub,
    tx: &mpsc::Sender<Result<ConfigEvent, Status>>,
    snapshot: &PublishedSnapshot,
    accepts_parts: bool,
) -> bool {
    let live_data_planes = hub.live_data_planes();
    if !accepts_parts {
        let whole = Snapshot {
            live_data_planes,
            ..snapshot.whole()
        };
        let event = ConfigEvent {
            event: Some(config_event::Event::Snapshot(whole)),
        };
        return tx.send(Ok(event)).await.is_ok();
    }
    for part in &snapshot.parts {
        let part = Snapshot {
            live_data_planes,
            ..part.clone()
        };
        let event = ConfigEvent {
            event: Some(config_event::Event::Snapshot(part)),
        };
        if tx.send(Ok(event)).await.is_err() {
            return false;
        }
    }
    true
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

struct SubscriberGuard(Gauge);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn stream_config(
    api: ConfigApi,
    request: SubscribeRequest,
    node: String,
    mut recorded: bool,
    tx: mpsc::Sender<Result<ConfigEvent, Status>>,
) {
    api.subscribers.inc();
    let _guard = SubscriberGuard(api.subscribers.clone());
    let mut updates = api.hub.subscribe();
    let mut shutdown = api.shutdown.clone();
    let first = tokio::select! {
        () = tx.closed() => None,
        () = stopped(&mut shutdown) => None,
        first = updates.wait_for(Option::is_some) => first.ok().and_then(|s| s.clone()),
    };
    let Some(first) = first else {
        return;
    };
    let accepts_parts = request.accepts_parts;
    let build = request.build;
    let mut sent = (request.cluster_epoch, request.have_version);
    let delivered = if sent == (first.cluster_epoch.clone(), first.version) {
        tx.send(Ok(heartbeat(&api.hub, Some(&first)))).await.is_ok()
    } else {
        sent = (first.cluster_epoch.clone(), first.version);
        send_snapshot(&api.hub, &tx, &first, accepts_parts).await
    };
    if !delivered {
        return;
    }
    let mut heartbeats = tokio::time::interval(api.heartbeat_every);
    heartbeats.tick().await;
    loop {
        tokio::select! {
            () = tx.closed() => break,
            () = stopped(&mut shutdown) => break,
            changed = updates.changed() => {
                if changed.is_err() {
                    break;
                }
                let latest = updates.borrow_and_update().clone();
                if let Some(latest) = latest {
                    let key = (latest.cluster_epoch.clone(), latest.version);
                    if key != sent {
                        sent = key;
                        if !send_snapshot(&api.hub, &tx, &latest, accepts_parts).await {
                            break;
                        }
                    }
                }
            }
            _ = heartbeats.tick() => {
                let latest = api.hub.latest();
                if tx.send(Ok(heartbeat(&api.hub, latest.as_deref()))).await.is_err() {
                    break;
                }
                if !recorded {
                    recorded = api.record_connected(&node, &build).await;
                } else if let Err(err) = bounded(api.store.data_plane_seen(&node, true)).await {
                    tracing::warn!(node_id = %node, error = %err, "cannot record data plane heartbeat");
                }
            }
        }
    }
    // An update of the row, if any (a status report may have created it when `recorded` is not).
    if api.readiness.is_ready()
        && let Err(err) = bounded(api.store.data_plane_seen(&node, false)).await
    {
        tracing::warn!(node_id = %node, error = %err, "cannot record data plane disconnect");
    }
    tracing::info!(node_id = %node, "data plane unsubscribed");
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    type SubscribeStream = ReceiverStream<Result<ConfigEvent, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let node = node_id(&request.node_id)?;
        let recorded = self.record_connected(&node, &request.build).await;
        tracing::info!(node_id = %node, have_version = request.have_version, "data plane subscribed");
        // Small buffer: a slow data plane gets the newest snapshot, not a backlog of old ones.
        let (tx, rx) = mpsc::channel(2);
        #[allow(
            clippy::disallowed_methods,
            reason = "the task owns the stream's sender and ends when the data plane drops the stream"
        )]
        tokio::spawn(stream_config(self.clone(), request, node, recorded, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_status(
        &self,
        request: Request<ReportStatusRequest>,
    ) -> Result<Response<ReportStatusResponse>, Status> {
        let request = request.into_inner();
        let node = node_id(&request.node_id)?;
        if request.applied_version < 0 {
            return Err(Status::invalid_argument(
                "invalid applied_version: must not be negative",
            ));
        }
        let error: String = request.error.chars().take(1000).collect();
        self.readiness.check()?;
        self.store
            .report_status(&node, request.applied_version, &error)
            .await?;
        Ok(Response::new(ReportStatusResponse {}))
    }

    async fn report_usage(
        &self,
        request: Request<ReportUsageRequest>,
    ) -> Result<Response<ReportUsageResponse>, Status> {
        let batch = usage_batch(request.into_inner())?;
        self.readiness.check()?;
        let added = self.store.report_usage(&batch).await?;
        if !added {
            tracing::debug!(node_id = %batch.node_id, boot_id = %batch.boot_id, sequence = batch.sequence, "usage batch already written; acknowledged again");
        }
        Ok(Response::new(ReportUsageResponse { added }))
    }

    async fn get_spend(
        &self,
        request: Request<GetSpendRequest>,
    ) -> Result<Response<GetSpendResponse>, Status> {
        let request = request.into_inner();
        let query = spend_query(&request)?;
        self.readiness.check()?;
        let cost: u128 = self
            .store
            .query_usage(&query)
            .await?
            .iter()
            .map(|sum| sum.cost_pico_usd)
            .sum();
        Ok(Response::new(GetSpendResponse {
            cost_pico_usd: cost.to_string(),
        }))
    }
}

/// The usage query behind `GetSpend`: one key's total since an hour.
fn spend_query(request: &GetSpendRequest) -> Result<usage::UsageQuery, StoreError> {
    let vkey_id = request.vkey_id.trim();
    if vkey_id.is_empty() {
        return Err(StoreError::invalid("vkey_id", "must not be empty"));
    }
    let since = usage::hour("since_unix", request.since_unix)?;
    Ok(usage::UsageQuery {
        vkey: Some(vkey_id.to_owned()),
        since: Some(since),
        ..Default::default()
    })
}
