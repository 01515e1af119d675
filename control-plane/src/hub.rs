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
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use secrecy::ExposeSecret as _;
use std::collections::{HashMap, HashSet};
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

/// Target encoded size of one snapshot part: a 100k-key config is ~40 parts, and neither plane
/// ever holds it as one message (see `Snapshot.more` in `config.proto`).
pub const SNAPSHOT_PART_BYTES: usize = 1 << 20;

/// A snapshot as it is sent: its parts, in order (`more` set on all but the last).
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedSnapshot {
    pub cluster_epoch: String,
    pub version: i64,
    pub parts: Vec<Snapshot>,
}

impl PublishedSnapshot {
    /// Splits `snapshot` into parts of about `part_bytes` (encoded): the first part carries the
    /// connections and models, and each virtual key travels with all of its assignments (a key
    /// with more assignments than fit gets a part of its own). Assignments whose key is not in
    /// the snapshot go in the last part (the data plane skips them, as it would in a whole one).
    pub fn split(snapshot: Snapshot, part_bytes: usize) -> Self {
        let Snapshot {
            cluster_epoch,
            version,
            connections,
            models,
            virtual_keys,
            assignments,
            live_data_planes,
            more: _,
            part: _,
        } = snapshot;
        let part = |connections, models| Snapshot {
            cluster_epoch: cluster_epoch.clone(),
            version,
            connections,
            models,
            live_data_planes,
            more: true,
            ..Snapshot::default()
        };
        // Assignments in key order (stable: each key keeps its assignments' order).
        let mut by_key: Vec<(usize, SnapshotAssignment)> = {
            let position: HashMap<&str, usize> = virtual_keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.id.as_str(), i))
                .collect();
            assignments
                .into_iter()
                .map(|a| {
                    let at = position.get(a.vkey_id.as_str()).copied();
                    (at.unwrap_or(usize::MAX), a)
                })
                .collect()
        };
        by_key.sort_by_key(|(at, _)| *at);
        let mut by_key = by_key.into_iter().peekable();

        let mut current = part(connections, models);
        let mut size = current.encoded_len();
        let mut parts = Vec::new();
        for (i, key) in virtual_keys.into_iter().enumerate() {
            let mut own = Vec::new();
            while let Some((_, a)) = by_key.next_if(|(at, _)| *at == i) {
                own.push(a);
            }
            // Each entry also costs its field tag and length prefix (at most 6 bytes).
            let added =
                key.encoded_len() + 6 + own.iter().map(|a| a.encoded_len() + 6).sum::<usize>();
            if size + added > part_bytes && !current.virtual_keys.is_empty() {
                parts.push(std::mem::replace(
                    &mut current,
                    part(Vec::new(), Vec::new()),
                ));
                size = current.encoded_len();
            }
            current.virtual_keys.push(key);
            current.assignments.extend(own);
            size += added;
        }
        current.assignments.extend(by_key.map(|(_, a)| a));
        current.more = false;
        parts.push(current);
        for (i, part) in parts.iter_mut().enumerate() {
            part.part = u32::try_from(i).unwrap_or(u32::MAX);
        }
        Self {
            cluster_epoch,
            version,
            parts,
        }
    }

    /// The snapshot as one message, for a subscriber that does not accept parts (a data plane
    /// older than them).
    pub fn whole(&self) -> Snapshot {
        let mut parts = self.parts.iter();
        let mut whole = parts.next().cloned().unwrap_or_default();
        for part in parts {
            whole.virtual_keys.extend(part.virtual_keys.iter().cloned());
            whole.assignments.extend(part.assignments.iter().cloned());
        }
        whole.more = false;
        whole.part = 0;
        whole
    }

    /// Encoded size of all parts.
    pub fn encoded_len(&self) -> usize {
        self.parts.iter().map(Message::encoded_len).sum()
    }
}

/// The latest snapshot plus live-data-plane count, shared with the config service.
#[derive(Debug)]
pub struct SnapshotHub {
    current: watch::Sender<Option<Arc<PublishedSnapshot>>>,
    live_data_planes: AtomicI64,
    wake: Notify,
    /// Connections left out of the latest snapshot because their credential does not decrypt
    /// (`llm_proxy_cp_undecryptable_credentials`).
    undecryptable_credentials: Gauge,
}

impl Default for SnapshotHub {
    fn default() -> Self {
        Self::new(Gauge::default())
    }
}

impl SnapshotHub {
    /// A hub that reports connections left out of its snapshots in `undecryptable_credentials`.
    pub fn new(undecryptable_credentials: Gauge) -> Self {
        Self {
            current: watch::Sender::new(None),
            live_data_planes: AtomicI64::new(0),
            wake: Notify::new(),
            undecryptable_credentials,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<PublishedSnapshot>>> {
        self.current.subscribe()
    }

    pub fn latest(&self) -> Option<Arc<PublishedSnapshot>> {
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

/// A snapshot and what had to be left out of it.
#[derive(Debug)]
pub struct BuiltSnapshot {
    pub snapshot: Snapshot,
    /// Ids of the connections left out (with their models and assignments) because their
    /// credential does not decrypt with this replica's master keys.
    pub undecryptable: Vec<String>,
}

/// Builds a snapshot from the database: one consistent read, then decryption in memory.
///
/// A connection that cannot be used (its credential does not decrypt, e.g. on a replica that
/// lacks the key another replica wrote it with during a rotation; or its stored options do not
/// parse) is left out with its models and assignments and logged by id: one bad row must not
/// stop every later change, a revoked key above all, from reaching the data planes.
pub async fn build_snapshot(
    store: &Store,
    live_data_planes: i64,
) -> Result<BuiltSnapshot, StoreError> {
    let rows = store.read_config().await?;
    let mut connections = Vec::with_capacity(rows.connections.len());
    let mut undecryptable = Vec::new();
    let mut left_out: HashSet<&str> = HashSet::new();
    for row in &rows.connections {
        let credential = match store.decrypt_credential(row) {
            Ok(credential) => credential,
            Err(error) => {
                tracing::warn!(
                    connection_id = %row.id,
                    %error,
                    "credential does not decrypt with this replica's master keys: connection left out of the snapshot with its models and assignments"
                );
                undecryptable.push(row.id.clone());
                left_out.insert(&row.id);
                continue;
            }
        };
        let options = match Store::connection_options(row) {
            Ok(options) => options,
            Err(error) => {
                tracing::error!(
                    connection_id = %row.id,
                    %error,
                    "stored options do not parse: connection left out of the snapshot with its models and assignments"
                );
                left_out.insert(&row.id);
                continue;
            }
        };
        connections.push(SnapshotConnection {
            id: row.id.clone(),
            name: row.name.clone(),
            provider: row.provider.clone(),
            endpoint: row.endpoint.clone(),
            credential: credential.expose_secret().to_owned(),
            options: options.into_iter().collect(),
        });
    }
    let (models, left_out_models): (Vec<_>, Vec<_>) = rows
        .models
        .into_iter()
        .partition(|m| !left_out.contains(m.connection_id.as_str()));
    let left_out_models: HashSet<String> = left_out_models.into_iter().map(|m| m.id).collect();
    let snapshot = Snapshot {
        cluster_epoch: rows.cluster_epoch,
        version: rows.version,
        connections,
        models: models
            .into_iter()
            .map(|m| SnapshotModel {
                id: m.id,
                connection_id: m.connection_id,
                name: m.name,
                remote: m.remote,
                deployment: m.deployment,
                price_input: m.price_input,
                price_output: m.price_output,
                price_cache_read: m.price_cache_read,
                price_cache_write: m.price_cache_write,
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
                budget_micro_usd: k.budget_micro_usd,
                // Empty exactly when there is no budget (the store keeps a period with every
                // budget and none without).
                budget_period: match k.budget_micro_usd {
                    Some(_) => k
                        .budget_period
                        .unwrap_or_else(|| crate::validate::DEFAULT_BUDGET_PERIOD.to_owned()),
                    None => String::new(),
                },
            })
            .collect(),
        assignments: rows
            .assignments
            .into_iter()
            .filter(|a| !left_out_models.contains(&a.model_id))
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
        more: false,
        part: 0,
    };
    Ok(BuiltSnapshot {
        snapshot,
        undecryptable,
    })
}
/// Keeps `hub` at the database's current version until the process ends.
pub async fn run_refresher(store: Store, hub: Arc<SnapshotHub>, timings: HubTimings) {
    let local_writes = store.changes();
    let remote_writes = Arc::new(Notify::new());
    // Owned by this future: the LISTEN session ends with the refresher (at shutdown) rather than
    // holding a database connection in a process that goes on (llmctl serve, tests).
    let mut listener = tokio::task::JoinSet::new();
    listener.spawn(listen_for_notifications(
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
    let BuiltSnapshot {
        snapshot,
        undecryptable,
    } = build_snapshot(store, live).await?;
    hub.undecryptable_credentials
        .set(i64::try_from(undecryptable.len()).unwrap_or(i64::MAX));
    let (connections, virtual_keys, assignments) = (
        snapshot.connections.len(),
        snapshot.virtual_keys.len(),
        snapshot.assignments.len(),
    );
    let published = PublishedSnapshot::split(snapshot, SNAPSHOT_PART_BYTES);
    tracing::info!(
        version = published.version,
        connections,
        virtual_keys,
        assignments,
        parts = published.parts.len(),
        bytes = published.encoded_len(),
        undecryptable = undecryptable.len(),
        build_ms = started.elapsed().as_millis() as u64,
        "config snapshot built"
    );
    hub.current.send_replace(Some(Arc::new(published)));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> SnapshotVirtualKey {
        SnapshotVirtualKey {
            id: format!("vkey-{i:06}"),
            name: format!("team-{i}"),
            key_sha256: vec![7; 32],
            enabled: true,
            expires_at_unix: None,
            ..Default::default()
        }
    }

    fn assignment(key: usize, n: usize) -> SnapshotAssignment {
        SnapshotAssignment {
            id: format!("asg-{key:06}-{n}"),
            vkey_id: format!("vkey-{key:06}"),
            model_id: "model-1".into(),
            alias: format!("alias-{n}"),
            tps: Some(10),
            weight: 1,
            ..Default::default()
        }
    }

    fn snapshot(keys: usize) -> Snapshot {
        Snapshot {
            cluster_epoch: "epoch".into(),
            version: 9,
            connections: vec![SnapshotConnection {
                id: "conn-1".into(),
                provider: "openai".into(),
                ..Default::default()
            }],
            models: vec![SnapshotModel {
                id: "model-1".into(),
                connection_id: "conn-1".into(),
                ..Default::default()
            }],
            virtual_keys: (0..keys).map(key).collect(),
            // Interleaved across keys, as a database might return them.
            assignments: (0..3)
                .flat_map(|n| (0..keys).map(move |k| assignment(k, n)))
                .collect(),
            live_data_planes: 2,
            more: false,
            part: 0,
        }
    }

    #[test]
    fn a_small_snapshot_is_one_part() {
        let published = PublishedSnapshot::split(snapshot(3), SNAPSHOT_PART_BYTES);
        assert_eq!(published.parts.len(), 1);
        let part = &published.parts[0];
        assert!(!part.more);
        assert_eq!(part.virtual_keys, snapshot(3).virtual_keys);
        assert_eq!(part.assignments.len(), 9);
        assert_eq!(part.connections.len(), 1);
    }

    #[test]
    fn a_large_snapshot_splits_by_key_within_the_part_size() {
        const PART: usize = 4_000;
        let whole = snapshot(1_000);
        let published = PublishedSnapshot::split(whole.clone(), PART);
        let parts = &published.parts;
        assert!(parts.len() > 10, "{} parts", parts.len());
        for (i, part) in parts.iter().enumerate() {
            assert_eq!((part.cluster_epoch.as_str(), part.version), ("epoch", 9));
            assert_eq!(part.live_data_planes, 2);
            assert_eq!(part.more, i + 1 < parts.len());
            assert_eq!(part.part as usize, i);
            assert_eq!(part.connections.len(), usize::from(i == 0));
            assert_eq!(part.models.len(), usize::from(i == 0));
            assert!(
                part.encoded_len() <= PART,
                "part {i}: {}",
                part.encoded_len()
            );
            // Every assignment travels with its key.
            for a in &part.assignments {
                assert!(part.virtual_keys.iter().any(|k| k.id == a.vkey_id));
            }
        }
        let keys: Vec<_> = parts.iter().flat_map(|p| p.virtual_keys.clone()).collect();
        assert_eq!(keys, whole.virtual_keys);
        let mut assignments: Vec<_> = parts.iter().flat_map(|p| p.assignments.clone()).collect();
        assert_eq!(assignments.len(), whole.assignments.len());
        // Each key keeps its assignments in their original order.
        assert_eq!(
            assignments[..3],
            [assignment(0, 0), assignment(0, 1), assignment(0, 2)]
        );
        assignments.sort_by(|a, b| a.id.cmp(&b.id));
        let mut expected = whole.assignments;
        expected.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(assignments, expected);
    }

    #[test]
    fn the_whole_snapshot_is_the_parts_joined() {
        let mut whole = snapshot(1_000);
        let published = PublishedSnapshot::split(whole.clone(), 4_000);
        assert!(published.parts.len() > 1);
        let joined = published.whole();
        // Assignments travel grouped by key; otherwise nothing changes.
        let by_id = |s: &mut Snapshot| s.assignments.sort_by(|a, b| a.id.cmp(&b.id));
        let mut joined_sorted = joined.clone();
        by_id(&mut joined_sorted);
        by_id(&mut whole);
        assert_eq!(joined_sorted, whole);
        assert!(!joined.more);
    }

    #[test]
    fn assignments_of_unknown_keys_go_last() {
        let mut whole = snapshot(50);
        whole.assignments.insert(0, assignment(999, 0));
        let published = PublishedSnapshot::split(whole, 1_000);
        let last = published.parts.last().unwrap();
        assert_eq!(last.assignments.last(), Some(&assignment(999, 0)));
    }
}
