//! The data plane's config sync against a real control plane (SQLite): snapshots reach the
//! index, key changes take effect, the last config survives a control-plane outage and the sync
//! reconnects, and the control plane learns the applied version.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use llm_proxy_control_plane::crypto::MasterKeys;
use llm_proxy_control_plane::hub::HubTimings;
use llm_proxy_control_plane::server::{self, RunningControlPlane, ServerSettings};
use llm_proxy_control_plane::store::{
    ModelPatch, NewAssignment, NewConnection, NewModel, NewVirtualKey, Store, VirtualKeyPatch,
};
use llm_proxy_data_plane::index::{AuthError, Prices, Provider};
use llm_proxy_data_plane::sync::{self, ConfigHandle, SyncSettings};
use secrecy::{ExposeSecret as _, SecretString};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Generous bound for "eventually": a failure means the event never came, not that it was slow.
const PATIENCE: Duration = Duration::from_secs(30);

const KEY: &str = "vk-app-123456";
const NOW: i64 = 1_700_000_000;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn eventually<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {PATIENCE:?}"))
}

fn copy(secret: &SecretString) -> SecretString {
    SecretString::from(secret.expose_secret().to_owned())
}

async fn start_cp(
    db: &Path,
    master_key: &SecretString,
    listen: SocketAddr,
    token: Option<&str>,
) -> RunningControlPlane {
    init_logs();
    let mut settings = ServerSettings::new(
        listen,
        SecretString::from(format!("sqlite://{}", db.join("cp.db").display())),
        copy(master_key),
    );
    settings.hub = HubTimings {
        coalesce: Duration::from_millis(20),
        poll: Duration::from_millis(500),
    };
    settings.heartbeat_every = Duration::from_millis(200);
    settings.dataplane_token = token.map(SecretString::from);
    server::start(settings).await.unwrap()
}

fn sync_settings(cp: SocketAddr, node_id: &str, token: Option<&str>) -> SyncSettings {
    SyncSettings {
        control_plane: format!("http://{cp}"),
        token: token.map(SecretString::from),
        node_id: node_id.into(),
        build: "test-build".into(),
        tls: None,
    }
}

/// A connection, a model, the key [`KEY`] and one assignment under alias `chat`; returns the
/// config version after the last write.
async fn seed(store: &Store) -> i64 {
    store
        .create_connection(NewConnection {
            name: "OpenAI".into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com/".into(),
            credential: SecretString::from("sk-live-credential"),
            options: [("timeout_s".to_owned(), "20".to_owned())].into(),
        })
        .await
        .unwrap();
    let model = store
        .create_model(NewModel {
            connection: "OpenAI".into(),
            name: "gpt-4".into(),
            remote: "gpt-4-0613".into(),
            deployment: None,
            price_input: Some(30_000_000),
            price_output: Some(60_000_000),
            ..Default::default()
        })
        .await
        .unwrap();
    let key = store
        .create_vkey(NewVirtualKey {
            name: "App".into(),
            key: Some(SecretString::from(KEY)),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap();
    store
        .create_assignment(NewAssignment {
            vkey: key.value.0.id,
            model: model.value.id,
            alias: Some("chat".into()),
            tps: Some(5),
            ..Default::default()
        })
        .await
        .unwrap()
        .version
}

/// A port that was free a moment ago, so two control planes can be started on the same address.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_reaches_the_index_and_key_changes_apply() {
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKeys::generate_encoded();
    let token = "dp-token-123";
    let cp = start_cp(
        dir.path(),
        &master,
        "127.0.0.1:0".parse().unwrap(),
        Some(token),
    )
    .await;
    let handle = ConfigHandle::new();
    let task = sync::spawn(
        sync_settings(cp.grpc_addr, "dp-1", Some(token)),
        handle.clone(),
    );

    // (1) A key and assignment written through the store are served by the index.
    let version = seed(&cp.store).await;
    eventually(
        "snapshot with the seeded key",
        handle.wait_for_version(version),
    )
    .await;
    assert!(handle.connected());
    let index = handle.current().unwrap();
    assert!(index.version >= version);
    assert!(!index.cluster_epoch.is_empty());
    assert_eq!(index.key_count(), 1);
    let key = index.authenticate(KEY, NOW).unwrap();
    assert!(key.enabled());
    assert_eq!(key.expires_at_unix(), None);
    assert_eq!(key.alias_names(), vec!["chat"]);
    let pool = key.pool("chat").unwrap();
    let target = pool.attempt_order(42).next().unwrap();
    assert_eq!(target.model.remote, "gpt-4-0613");
    assert_eq!(target.connection.provider, Provider::OpenAi);
    assert_eq!(target.connection.endpoint, "https://api.openai.com");
    assert_eq!(target.connection.timeout, Duration::from_secs(20));
    assert_eq!(target.limits.tps, Some(5));
    // The model's prices, ready for each request's cost (DESIGN §18).
    assert_eq!(
        target.model.prices,
        Some(Prices {
            input: Some(30_000_000),
            output: Some(60_000_000),
            ..Prices::default()
        })
    );
    assert!(
        !format!("{index:?} {key:?}").contains("sk-live-credential"),
        "Debug must not print credentials"
    );
    assert_eq!(
        index.authenticate("vk-unknown-123456", NOW).unwrap_err(),
        AuthError::UnknownKey
    );

    // New prices apply with the next version, like any change.
    let repriced = cp
        .store
        .update_model(
            "gpt-4",
            ModelPatch {
                price_input: Some(None),
                price_cache_read: Some(Some(15_000_000)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually(
        "snapshot with the new prices",
        handle.wait_for_version(repriced.version),
    )
    .await;
    let index = handle.current().unwrap();
    let key = index.authenticate(KEY, NOW).unwrap();
    let target = key.pool("chat").unwrap().attempt_order(42).next().unwrap();
    assert_eq!(
        target.model.prices,
        Some(Prices {
            output: Some(60_000_000),
            cache_read: Some(15_000_000),
            ..Prices::default()
        })
    );

    // (2) Disabling the key takes effect with the next version.
    let disabled = cp
        .store
        .update_vkey(
            "App",
            VirtualKeyPatch {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually(
        "snapshot with the disabled key",
        handle.wait_for_version(disabled.version),
    )
    .await;
    let index = handle.current().unwrap();
    assert_eq!(
        index.authenticate(KEY, NOW).unwrap_err(),
        AuthError::Disabled
    );

    task.abort();
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_through_an_outage_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKeys::generate_encoded();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cp = start_cp(dir.path(), &master, addr, None).await;
    let handle = ConfigHandle::new();
    let task = sync::spawn(sync_settings(addr, "dp-outage", None), handle.clone());
    let version = seed(&cp.store).await;
    eventually("first snapshot", handle.wait_for_version(version)).await;

    // (3) The control plane goes away: the stream ends, the last index stays.
    cp.shutdown().await;
    eventually("disconnect noticed", handle.wait_connected(false)).await;
    let index = handle.current().unwrap();
    assert!(index.version >= version);
    assert!(index.authenticate(KEY, NOW).is_ok());

    // A new control plane on the same database and address: the sync reconnects (the unchanged
    // config is not resent) and the next write arrives.
    let cp = start_cp(dir.path(), &master, addr, None).await;
    eventually("reconnect", handle.wait_connected(true)).await;
    let written = cp
        .store
        .create_vkey(NewVirtualKey {
            name: "Second".into(),
            key: Some(SecretString::from("vk-second-123456")),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually(
        "write through the second control plane",
        handle.wait_for_version(written.version),
    )
    .await;
    let index = handle.current().unwrap();
    assert_eq!(index.key_count(), 2);
    assert_eq!(
        index.authenticate("vk-second-123456", NOW).unwrap().id(),
        written.value.0.id
    );
    assert!(index.authenticate(KEY, NOW).is_ok());

    task.abort();
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_lists_the_applied_version() {
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKeys::generate_encoded();
    let cp = start_cp(dir.path(), &master, "127.0.0.1:0".parse().unwrap(), None).await;
    let handle = ConfigHandle::new();
    let task = sync::spawn(
        sync_settings(cp.grpc_addr, "dp-status", None),
        handle.clone(),
    );
    let version = seed(&cp.store).await;
    eventually("snapshot", handle.wait_for_version(version)).await;
    let applied = handle.current().unwrap().version;

    // (4) ReportStatus has no event to await: poll the data-plane list until it shows up.
    // The live-data-plane count (from snapshots and heartbeats) is polled the same way.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let planes = cp.store.list_data_planes().await.unwrap();
        if let Some(row) = planes.iter().find(|p| p.node_id == "dp-status")
            && row.applied_version >= applied
            && handle.live_data_planes() >= 1
        {
            assert_eq!(row.build, "test-build");
            assert!(row.error.is_empty(), "{}", row.error);
            assert!(row.connected);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "applied version or live count never reported: {planes:?}, live {}",
            handle.live_data_planes()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    task.abort();
    cp.shutdown().await;
}
