//! Turns config versions into snapshots and fans them out (DESIGN §7).
//!
//! One refresher task per control plane watches for changes from three sources: local writes
//! (in-process notify), Postgres `NOTIFY llm_proxy_config` from any replica, and a periodic poll
//! of the version row (a NOTIFY can be lost while the LISTEN session reconnects). Wake-ups within
//! the coalescing window collapse into one rebuild. The latest snapshot is shared by all
//! subscribers through a `watch` channel.

use crate::error::StoreError;
use crate::store::Store;
use futures_util::StreamExt as _;
use llm_proxy_proto::v1::{
    Snapshot, SnapshotAssignment, SnapshotConnection, SnapshotModel, SnapshotVirtualKey,
};
use secrecy::ExposeSecret as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

#[derive(Debug, Clone, Copy)]
pub struct HubTimings {
    /// Writes within this window after the first wake-up produce one snapshot.
    pub coalesce: Duration,
    /// Version poll interval (backstop for missed notifications).
    pub poll: Duration,
}

impl Default for HubTimings {
    fn default() -> Self {
        Self {
            coalesce: Duration::from_millis(50),
            poll: Duration::from_secs(2),
        }
    }
}

/// The latest snapshot plus live-data-plane count, shared with the config service.
#[derive(Debug)]
pub struct SnapshotHub {
    current: watch::Sender<Option<Arc<Snapshot>>>,
    live_data_planes: AtomicI64,
    wake: Notify,
}

impl Default for SnapshotHub {
    fn default() -> Self {
        Self {
            current: watch::Sender::new(None),
            live_data_planes: AtomicI64::new(0),
            wake: Notify::new(),
        }
    }
}

impl SnapshotHub {
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.current.subscribe()
    }

    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.current.borrow().clone()
    }

    pub fn live_data_planes(&self) -> i64 {
        self.live_data_planes.load(Ordering::Relaxed)
    }

    /// Asks the refresher to re-read the version now (e.g. a data plane joined).
    pub fn poke(&self) {
        self.wake.notify_one();
    }
}

/// Builds a snapshot from the database: one consistent read, then decryption in memory.
pub async fn build_snapshot(store: &Store, live_data_planes: i64) -> Result<Snapshot, StoreError> {
    let rows = store.read_config().await?;
    let mut connections = Vec::with_capacity(rows.connections.len());
    for row in &rows.connections {
        let credential = store.decrypt_credential(row)?;
        connections.push(SnapshotConnection {
            id: row.id.clone(),
            name: row.name.clone(),
            provider: row.provider.clone(),
            endpoint: row.endpoint.clone(),
            credential: credential.expose_secret().to_owned(),
            options: Store::connection_options(row)?.into_iter().collect(),
        });
    }
    Ok(Snapshot {
        cluster_epoch: rows.cluster_epoch,
        version: rows.version,
        connections,
        models: rows
            .models
            .into_iter()
            .map(|m| SnapshotModel {
                id: m.id,
                connection_id: m.connection_id,
                name: m.name,
                remote: m.remote,
                deployment: m.deployment,
            })
            .collect(),
        virtual_keys: rows
            .virtual_keys
            .into_iter()
            .map(|k| SnapshotVirtualKey {
                id: k.id,
                name: k.name,
                key_sha256: k.key_sha256,
                enabled: k.enabled,
                expires_at_unix: k.expires_at.map(|micros| micros.div_euclid(1_000_000)),
            })
            .collect(),
        assignments: rows
            .assignments
            .into_iter()
            .map(|a| SnapshotAssignment {
                id: a.id,
                vkey_id: a.vkey_id,
                model_id: a.model_id,
                alias: a.alias,
                tps: a.tps,
                burst: a.burst,
                tpm: a.tpm,
                weight: a.weight,
            })
            .collect(),
        live_data_planes,
    })
}

/// Keeps `hub` at the database's current version until the process ends.
pub async fn run_refresher(store: Store, hub: Arc<SnapshotHub>, timings: HubTimings) {
    let local_writes = store.changes();
    let remote_writes = Arc::new(Notify::new());
    tokio::spawn(listen_for_notifications(
        store.clone(),
        remote_writes.clone(),
    ));
    let mut poll = tokio::time::interval(timings.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let woken_by_change = tokio::select! {
            () = local_writes.notified() => true,
            () = remote_writes.notified() => true,
            () = hub.wake.notified() => true,
            _ = poll.tick() => false,
        };
        if woken_by_change {
            // Coalescing window: let a burst of writes land before reading once.
            tokio::time::sleep(timings.coalesce).await;
        }
        if let Err(err) = refresh(&store, &hub).await {
            tracing::warn!(error = %err, "config refresh failed; keeping the previous snapshot");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn refresh(store: &Store, hub: &SnapshotHub) -> Result<(), StoreError> {
    let live = store.count_live_data_planes().await?;
    hub.live_data_planes.store(live, Ordering::Relaxed);
    let (epoch, version) = store.current_version().await?;
    let stale = hub
        .current
        .borrow()
        .as_ref()
        .is_none_or(|s| s.version != version || s.cluster_epoch != epoch);
    if !stale {
        return Ok(());
    }
    let started = Instant::now();
    let snapshot = build_snapshot(store, live).await?;
    tracing::info!(
        version = snapshot.version,
        connections = snapshot.connections.len(),
        virtual_keys = snapshot.virtual_keys.len(),
        assignments = snapshot.assignments.len(),
        build_ms = started.elapsed().as_millis() as u64,
        "config snapshot built"
    );
    hub.current.send_replace(Some(Arc::new(snapshot)));
    Ok(())
}

/// Postgres only: LISTEN on the config channel, reconnecting with backoff.
async fn listen_for_notifications(store: Store, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match store.database().listen_connection().await {
            Ok(None) => return,
            Ok(Some(mut conn)) => {
                backoff = Duration::from_millis(200);
                // Anything written while we were reconnecting is caught by this wake-up.
                wake.notify_one();
                let mut notifications = std::pin::pin!(conn.notifications_stream());
                while let Some(item) = notifications.next().await {
                    match item {
                        Ok(_) => wake.notify_one(),
                        Err(err) => {
                            tracing::warn!(error = %err, "config LISTEN session failed");
                            break;
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot open config LISTEN session"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
