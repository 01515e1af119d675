//! Control plane resilience (DESIGN §19): it starts while its database is down and serves once it
//! comes up, without a restart; replicas with different master-key lists keep streaming every
//! change to their data planes, the one missing a key leaving out only the connection it cannot
//! decrypt and reporting it in its metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use llm_proxy_data_plane::gateway::{self, GatewaySettings, RunningGateway};
use llm_proxy_data_plane::index::AuthError;
use llm_proxy_data_plane::sync::SyncSettings;
use llm_proxy_proto::v1::admin_service_client::AdminServiceClient;
use llm_proxy_proto::v1::*;
use secrecy::{ExposeSecret as _, SecretString};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::Channel;

/// Generous bound for "eventually": a failure means it never happened, not that it was slow.
const PATIENCE: Duration = Duration::from_secs(30);
/// "Now" for key expiry checks in the data plane's index.
const NOW: i64 = 1_700_000_000;
const KEY: &str = "vk-first-key-123456";
const SECOND_KEY: &str = "vk-second-key-123456";

/// Polls `check` until it is true; panics after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An in-process data plane subscribed to the control plane at `cp`.
async fn data_plane(cp: SocketAddr, node_id: &str) -> RunningGateway {
    gateway::start(GatewaySettings::on_loopback(SyncSettings::plaintext(
        format!("http://{cp}"),
        node_id,
    )))
    .await
    .unwrap()
}

/// How the data plane's current config treats `key`: its aliases, or why it is refused.
fn aliases_of(dp: &RunningGateway, key: &str) -> Result<Vec<String>, Option<AuthError>> {
    let index = dp.config.current().ok_or(None)?;
    let entry = index.authenticate(key, NOW).map_err(Some)?;
    Ok(entry.alias_names().into_iter().map(str::to_owned).collect())
}

async fn admin_at(addr: SocketAddr) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(common::channel(addr).await)
}

async fn add_connection(admin: &mut AdminServiceClient<Channel>, name: &str, credential: &str) {
    admin
        .create_connection(CreateConnectionRequest {
            name: name.into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com".into(),
            credential: credential.into(),
            options: Default::default(),
        })
        .await
        .unwrap();
    admin
        .create_provider_model(CreateProviderModelRequest {
            connection_id: name.into(),
            name: format!("{name}-model"),
            remote: "gpt-4o".into(),
            deployment: None,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn add_key(admin: &mut AdminServiceClient<Channel>, name: &str, key: &str) {
    admin
        .create_virtual_key(CreateVirtualKeyRequest {
            name: name.into(),
            key: Some(key.into()),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn assign(admin: &mut AdminServiceClient<Channel>, key: &str, connection: &str, alias: &str) {
    admin
        .create_assignment(CreateAssignmentRequest {
            vkey_id: key.into(),
            model_id: format!("{connection}/{connection}-model"),
            alias: Some(alias.into()),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn disable_key(admin: &mut AdminServiceClient<Channel>, key: &str) {
    admin
        .update_virtual_key(UpdateVirtualKeyRequest {
            id: key.into(),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// `/readyz` of a control plane: status and body.
async fn readyz(metrics: SocketAddr) -> (u16, String) {
    common::http_get(metrics, "/readyz").await.unwrap()
}

/// The value of an unlabelled gauge in `/metrics`.
async fn gauge(metrics: SocketAddr, name: &str) -> Option<i64> {
    let (status, body) = common::http_get(metrics, "/metrics").await?;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn starts_with_its_database_down_and_serves_once_it_is_up() {
    let db = common::fresh_postgres().await;
    let mut database = common::TcpGate::shut(common::postgres_addr().await);
    let master_key = common::new_master_key();
    let cp =
        common::spawn_cp_binary(&database.url_for(&db.url), master_key.expose_secret(), &[]).await;

    // Down: the process listens; /readyz says why, admin calls are Unavailable with the reason,
    // and a data plane's subscription is held open, waiting for the first snapshot.
    eventually("/readyz reports a failed attempt", || async {
        let (status, body) = readyz(cp.metrics_addr).await;
        assert_eq!(status, 503, "{body}");
        body.contains("database not connected yet")
    })
    .await;
    let mut admin = admin_at(cp.addr).await;
    let status = admin
        .list_connections(ListConnectionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("not ready") && status.message().contains("database"),
        "{status:?}"
    );
    let dp = data_plane(cp.addr, "dp-late-db").await;
    eventually("the data plane subscribed", || async {
        gauge(cp.metrics_addr, "llm_proxy_cp_subscribers").await == Some(1)
    })
    .await;
    assert!(
        dp.config.current().is_none(),
        "no snapshot without a database"
    );

    // Up: ready without a restart; writes reach the waiting data plane.
    database.open().await;
    common::wait_ready(cp.metrics_addr, PATIENCE).await;
    add_connection(&mut admin, "OpenAI", "sk-late-credential").await;
    add_key(&mut admin, "App", KEY).await;
    assign(&mut admin, "App", "OpenAI", "chat").await;
    eventually("the data plane has the key", || async {
        aliases_of(&dp, KEY) == Ok(vec!["chat".to_owned()])
    })
    .await;
    // Its presence, not recordable while the database was down, is recorded now.
    eventually("the control plane lists the data plane", || async {
        let mut admin = admin.clone();
        let planes = admin
            .list_data_planes(ListDataPlanesRequest {})
            .await
            .unwrap()
            .into_inner()
            .data_planes;
        planes
            .iter()
            .any(|p| p.node_id == "dp-late-db" && p.connected)
    })
    .await;

    // Unreachable again: 503 again while the data plane keeps its config; back: ready again
    // and later writes still arrive.
    database.shut_down().await;
    eventually("/readyz turns 503 again", || async {
        readyz(cp.metrics_addr).await.0 == 503
    })
    .await;
    assert_eq!(aliases_of(&dp, KEY), Ok(vec!["chat".to_owned()]));
    database.open().await;
    common::wait_ready(cp.metrics_addr, PATIENCE).await;
    disable_key(&mut admin, "App").await;
    eventually("the key is disabled in the data plane", || async {
        aliases_of(&dp, KEY) == Err(Some(AuthError::Disabled))
    })
    .await;

    dp.shutdown(Duration::from_secs(1)).await;
    let log = cp.stop().await;
    assert!(log.contains("database not ready; retrying"), "{log}");
    for secret in [master_key.expose_secret(), "sk-late-credential"] {
        assert!(!log.contains(secret), "a secret reached the log: {log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_with_different_master_keys_keep_streaming_changes() {
    let db = common::fresh_postgres().await;
    let (k1, k2) = (common::new_master_key(), common::new_master_key());
    // Mid-rotation: A has only the old key; B already encrypts with the new one.
    let both = SecretString::from(format!("{},{}", k2.expose_secret(), k1.expose_secret()));
    let replica = |key: &SecretString| {
        let mut settings = common::settings(&db, key);
        settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        llm_proxy_control_plane::server::start(settings)
    };
    let a = replica(&k1).await.unwrap();
    let b = replica(&both).await.unwrap();
    let (a_metrics, b_metrics) = (a.metrics_addr.unwrap(), b.metrics_addr.unwrap());
    let dp_a = data_plane(a.grpc_addr, "dp-a").await;
    let dp_b = data_plane(b.grpc_addr, "dp-b").await;
    let mut admin_a = admin_at(a.grpc_addr).await;
    let mut admin_b = admin_at(b.grpc_addr).await;

    // Written through A under k1: both replicas read it.
    add_connection(&mut admin_a, "Old", "sk-under-k1").await;
    add_key(&mut admin_a, "First", KEY).await;
    assign(&mut admin_a, "First", "Old", "chat").await;
    for dp in [&dp_a, &dp_b] {
        eventually("both data planes have the first key", || async {
            aliases_of(dp, KEY) == Ok(vec!["chat".to_owned()])
        })
        .await;
    }

    // Written through B under k2, which A lacks: A leaves that connection out (with its model
    // and assignment), B serves it, and A reports it.
    add_connection(&mut admin_b, "New", "sk-under-k2").await;
    assign(&mut admin_b, "First", "New", "fresh").await;
    eventually("B's data plane has the new alias", || async {
        aliases_of(&dp_b, KEY) == Ok(vec!["chat".to_owned(), "fresh".to_owned()])
    })
    .await;
    eventually("A reports the connection it cannot decrypt", || async {
        gauge(a_metrics, "llm_proxy_cp_undecryptable_credentials").await == Some(1)
    })
    .await;
    assert_eq!(
        gauge(b_metrics, "llm_proxy_cp_undecryptable_credentials").await,
        Some(0)
    );

    // Later writes, through either replica, keep reaching both data planes.
    add_key(&mut admin_b, "Second", SECOND_KEY).await;
    assign(&mut admin_b, "Second", "Old", "chat").await;
    for dp in [&dp_a, &dp_b] {
        eventually("both data planes have the second key", || async {
            aliases_of(dp, SECOND_KEY) == Ok(vec!["chat".to_owned()])
        })
        .await;
    }
    assert_eq!(aliases_of(&dp_a, KEY), Ok(vec!["chat".to_owned()]));
    disable_key(&mut admin_a, "First").await;
    for dp in [&dp_a, &dp_b] {
        eventually("both data planes see the first key disabled", || async {
            aliases_of(dp, KEY) == Err(Some(AuthError::Disabled))
        })
        .await;
    }
    let index_a = dp_a.config.current().unwrap();
    assert!(
        !format!("{index_a:?}").contains("sk-under"),
        "Debug must not print credentials"
    );
    assert_eq!(
        gauge(a_metrics, "llm_proxy_cp_undecryptable_credentials").await,
        Some(1)
    );

    dp_a.shutdown(Duration::from_secs(1)).await;
    dp_b.shutdown(Duration::from_secs(1)).await;
    a.shutdown().await;
    b.shutdown().await;
}
