//! The config stream: snapshots on subscribe and after writes, heartbeats, data-plane presence,
//! propagation between control plane processes sharing one Postgres, and a 100k-key snapshot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Backend;
use llm_proxy_proto::v1::*;
use std::time::{Duration, Instant};
use tonic::Streaming;

/// Generous bound for "eventually": a failure means the event never came, not that it was slow.
const PATIENCE: Duration = Duration::from_secs(30);

async fn next_event(stream: &mut Streaming<ConfigEvent>) -> config_event::Event {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("no config event within the patience window")
        .unwrap()
        .expect("stream ended")
        .event
        .unwrap()
}

/// Reads events until a snapshot with at least `version` has arrived whole; returns its parts.
async fn parts_at_least(stream: &mut Streaming<ConfigEvent>, version: i64) -> Vec<Snapshot> {
    loop {
        if let config_event::Event::Snapshot(first) = next_event(stream).await
            && first.version >= version
        {
            assert_eq!(first.part, 0);
            let mut parts = vec![first];
            while let Some(last) = parts.last()
                && last.more
            {
                let config_event::Event::Snapshot(part) = next_event(stream).await else {
                    panic!("a heartbeat arrived between the parts of a snapshot");
                };
                assert_eq!(
                    (&part.cluster_epoch, part.version, part.part as usize),
                    (&last.cluster_epoch, last.version, parts.len())
                );
                assert!(part.connections.is_empty() && part.models.is_empty());
                parts.push(part);
            }
            return parts;
        }
    }
}

/// The parts of one snapshot merged into one.
fn merge(parts: Vec<Snapshot>) -> Snapshot {
    let mut parts = parts.into_iter();
    let mut whole = parts.next().unwrap();
    for part in parts {
        whole.virtual_keys.extend(part.virtual_keys);
        whole.assignments.extend(part.assignments);
        whole.more = part.more;
    }
    whole
}

/// Like [`parts_at_least`], with the parts merged into one snapshot.
async fn snapshot_at_least(stream: &mut Streaming<ConfigEvent>, version: i64) -> Snapshot {
    merge(parts_at_least(stream, version).await)
}

async fn subscribe_and_receive(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let mut settings = common::settings(&db, &common::new_master_key());
    settings.heartbeat_every = Duration::from_millis(200);
    let cp = llm_proxy_control_plane::server::start(settings)
        .await
        .unwrap();
    let mut admin = common::admin(&cp, None).await;
    admin
        .create_connection(CreateConnectionRequest {
            name: "OpenAI".into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com".into(),
            credential: "sk-live-credential".into(),
            options: [("timeout_s".to_owned(), "20".to_owned())].into(),
        })
        .await
        .unwrap();
    let mut config = common::config_client(cp.grpc_addr, None).await;
    let mut stream = config
        .subscribe(SubscribeRequest {
            node_id: "dp-a".into(),
            build: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = snapshot_at_least(&mut stream, 2).await;
    assert_eq!(first.connections.len(), 1);
    let conn = &first.connections[0];
    assert_eq!(
        conn.credential, "sk-live-credential",
        "snapshots carry the decrypted credential"
    );
    assert_eq!(
        conn.options.get("timeout_s").map(String::as_str),
        Some("20")
    );
    assert!(!first.cluster_epoch.is_empty());

    admin
        .create_provider_model(CreateProviderModelRequest {
            connection_id: "OpenAI".into(),
            name: "gpt-4".into(),
            remote: "gpt-4-0613".into(),
            deployment: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let created = admin
        .create_virtual_key(CreateVirtualKeyRequest {
            name: "App".into(),
            key: Some("vk-app-123456".into()),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .create_assignment(CreateAssignmentRequest {
            vkey_id: "App".into(),
            model_id: "gpt-4".into(),
            tps: Some(5),
            ..Default::default()
        })
        .await
        .unwrap();
    let current = cp.store.current_version().await.unwrap().1;
    let latest = snapshot_at_least(&mut stream, current).await;
    assert_eq!(latest.version, current);
    assert_eq!(latest.models[0].remote, "gpt-4-0613");
    let key = &latest.virtual_keys[0];
    assert_eq!(key.id, created.virtual_key.unwrap().id);
    assert_eq!(
        key.key_sha256,
        llm_proxy_control_plane::ids::key_sha256("vk-app-123456")
    );
    assert_eq!(latest.assignments[0].tps, Some(5));
    assert_eq!(latest.assignments[0].alias, "gpt-4");
    assert_eq!(key.budget_micro_usd, None);
    assert_eq!(key.budget_period, "", "no budget, no period");

    // Heartbeats flow while nothing changes.
    loop {
        if let config_event::Event::Heartbeat(hb) = next_event(&mut stream).await {
            assert_eq!(hb.version, current);
            break;
        }
    }

    // The data plane's reported version shows up in ListDataPlanes.
    config
        .report_status(ReportStatusRequest {
            node_id: "dp-a".into(),
            applied_version: current,
            error: String::new(),
        })
        .await
        .unwrap();
    let planes = admin
        .list_data_planes(ListDataPlanesRequest {})
        .await
        .unwrap()
        .into_inner()
        .data_planes;
    assert_eq!(planes.len(), 1);
    assert_eq!(planes[0].node_id, "dp-a");
    assert_eq!(planes[0].applied_version, current);
    assert_eq!(planes[0].build, "test");
    assert!(planes[0].connected);

    // A data plane that already has the current epoch+version gets a heartbeat, not a snapshot.
    let mut again = config
        .subscribe(SubscribeRequest {
            node_id: "dp-b".into(),
            cluster_epoch: latest.cluster_epoch.clone(),
            have_version: current,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut again).await {
        config_event::Event::Heartbeat(hb) => assert_eq!(hb.version, current),
        config_event::Event::Snapshot(s) => panic!("unexpected snapshot at version {}", s.version),
    }
    // ...but a different epoch (e.g. a restored database) gets a snapshot.
    let mut other_epoch = config
        .subscribe(SubscribeRequest {
            node_id: "dp-c".into(),
            cluster_epoch: "another-cluster".into(),
            have_version: current,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut other_epoch).await,
        config_event::Event::Snapshot(_)
    ));

    // A budget set, then removed, reaches the data plane as new snapshots (DESIGN §18).
    admin
        .update_virtual_key(UpdateVirtualKeyRequest {
            id: "App".into(),
            budget: Some(BudgetUpdate {
                micro_usd: Some(25_000_000),
            }),
            budget_period: Some("day".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let budgeted = snapshot_at_least(&mut stream, current + 1).await;
    assert_eq!(budgeted.virtual_keys[0].budget_micro_usd, Some(25_000_000));
    assert_eq!(budgeted.virtual_keys[0].budget_period, "day");
    admin
        .update_virtual_key(UpdateVirtualKeyRequest {
            id: "App".into(),
            budget: Some(BudgetUpdate { micro_usd: None }),
            ..Default::default()
        })
        .await
        .unwrap();
    let unbudgeted = snapshot_at_least(&mut stream, current + 2).await;
    assert_eq!(unbudgeted.virtual_keys[0].budget_micro_usd, None);
    assert_eq!(unbudgeted.virtual_keys[0].budget_period, "");

    // Disconnecting marks the data plane as not connected.
    drop(stream);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let planes = admin
            .list_data_planes(ListDataPlanesRequest {})
            .await
            .unwrap()
            .into_inner()
            .data_planes;
        let a = planes.iter().find(|p| p.node_id == "dp-a").unwrap();
        if !a.connected {
            break;
        }
        assert!(Instant::now() < deadline, "dp-a still listed as connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_and_receive_on_postgres() {
    subscribe_and_receive(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_and_receive_on_sqlite() {
    subscribe_and_receive(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_rejects_empty_node_id() {
    let db = common::fresh_sqlite();
    let cp = common::start(&db).await;
    let mut config = common::config_client(cp.grpc_addr, None).await;
    let status = config
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("node_id"));
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_survives_a_refused_status_write() {
    use diesel_async::{AsyncConnection as _, RunQueryDsl as _, SimpleAsyncConnection as _};
    let db = common::fresh_postgres().await;
    let mut settings = common::settings(&db, &common::new_master_key());
    settings.heartbeat_every = Duration::from_millis(100);
    let cp = llm_proxy_control_plane::server::start(settings)
        .await
        .unwrap();
    // From now on the database refuses every write of data-plane status (presence, heartbeats,
    // applied versions); config reads and writes still work.
    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url)
        .await
        .unwrap();
    conn.batch_execute(
        "CREATE FUNCTION refuse_status_writes() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'status writes refused by the test'; END $$; \
         CREATE TRIGGER refuse_status_writes BEFORE INSERT OR UPDATE ON data_planes \
           FOR EACH ROW EXECUTE FUNCTION refuse_status_writes();",
    )
    .await
    .unwrap();
    let mut admin = common::admin(&cp, None).await;
    admin
        .create_connection(CreateConnectionRequest {
            name: "OpenAI".into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com".into(),
            credential: "sk-x".into(),
            options: Default::default(),
        })
        .await
        .unwrap();
    let mut config = common::config_client(cp.grpc_addr, None).await;
    let status = config
        .report_status(ReportStatusRequest {
            node_id: "dp-1".into(),
            applied_version: 1,
            error: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        status
            .message()
            .contains("status writes refused by the test"),
        "the database does refuse: {status:?}"
    );

    // The subscription is served anyway, from the latest snapshot, and keeps receiving changes
    // and heartbeats (whose status writes fail too).
    let mut stream = config
        .subscribe(SubscribeRequest {
            node_id: "dp-1".into(),
            build: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let written = cp.store.current_version().await.unwrap().1;
    let first = snapshot_at_least(&mut stream, written).await;
    assert_eq!(first.connections.len(), 1);
    let mut heartbeats = 0;
    while heartbeats < 3 {
        if let config_event::Event::Heartbeat(_) = next_event(&mut stream).await {
            heartbeats += 1;
        }
    }
    admin
        .create_virtual_key(CreateVirtualKeyRequest {
            name: "App".into(),
            key: None,
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let next = snapshot_at_least(&mut stream, first.version + 1).await;
    assert_eq!(next.virtual_keys.len(), 1);
    let recorded: i64 = diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "(SELECT count(*) FROM data_planes)",
    ))
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(recorded, 0, "no status was written");
    cp.shutdown().await;
}

/// The real `llm-proxy-control-plane` binary, once its `/readyz` answers 200.
async fn spawn_cp(url: &str, master_key: &str) -> common::CpProcess {
    let cp = common::spawn_cp_binary(url, master_key, &[]).await;
    common::wait_ready(cp.metrics_addr, PATIENCE).await;
    cp
}

#[tokio::test(flavor = "multi_thread")]
async fn two_control_plane_processes_share_every_change() {
    let db = common::fresh_postgres().await;
    let key = common::new_master_key();
    let key_text = secrecy::ExposeSecret::expose_secret(&key).to_owned();
    let mut a = spawn_cp(&db.url, &key_text).await;
    let mut b = spawn_cp(&db.url, &key_text).await;

    let mut config = common::config_client(a.addr, None).await;
    let mut stream = config
        .subscribe(SubscribeRequest {
            node_id: "dp-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let initial = snapshot_at_least(&mut stream, 1).await;

    let mut admin_b = llm_proxy_proto::v1::admin_service_client::AdminServiceClient::new(
        common::channel(b.addr).await,
    );
    admin_b
        .create_connection(CreateConnectionRequest {
            name: "Via-B".into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com".into(),
            credential: "sk-written-through-b".into(),
            options: Default::default(),
        })
        .await
        .unwrap();
    let seen = snapshot_at_least(&mut stream, initial.version + 1).await;
    assert_eq!(seen.connections.len(), 1);
    assert_eq!(seen.connections[0].name, "Via-B");
    assert_eq!(seen.connections[0].credential, "sk-written-through-b");

    // A failing request must not leak the credential either.
    let _ = admin_b
        .update_connection(UpdateConnectionRequest {
            id: "Via-B".into(),
            credential: Some("sk-second-secret".into()),
            endpoint: Some("bad endpoint".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();

    a.child.start_kill().unwrap();
    b.child.start_kill().unwrap();
    let _ = a.child.wait().await;
    let _ = b.child.wait().await;
    for log in [a.log.lock().unwrap().clone(), b.log.lock().unwrap().clone()] {
        assert!(log.contains("config snapshot built"), "log: {log}");
        for secret in ["sk-written-through-b", "sk-second-secret", &key_text] {
            assert!(!log.contains(secret), "a secret reached the log: {log}");
        }
    }
}

/// Builds, streams and decodes a snapshot of 100k virtual keys with one assignment each, and
/// prints its size and timings (the figures quoted in the project docs).
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_of_100k_virtual_keys_passes_the_stream() {
    use diesel_async::{AsyncConnection as _, RunQueryDsl as _};
    use llm_proxy_control_plane::rows::{AssignmentRow, VirtualKeyRow};
    use llm_proxy_control_plane::schema::{assignments, virtual_keys};
    use prost::Message;

    const KEYS: usize = 100_000;
    let db = common::fresh_postgres().await;
    let master_key = common::new_master_key();
    let start = || async {
        llm_proxy_control_plane::server::start(common::settings(&db, &master_key))
            .await
            .unwrap()
    };
    let cp = start().await;
    let mut admin = common::admin(&cp, None).await;
    admin
        .create_connection(CreateConnectionRequest {
            name: "OpenAI".into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com".into(),
            credential: "sk-x".into(),
            options: Default::default(),
        })
        .await
        .unwrap();
    let model = admin
        .create_provider_model(CreateProviderModelRequest {
            connection_id: "OpenAI".into(),
            name: "gpt-4o-mini".into(),
            remote: "gpt-4o-mini".into(),
            deployment: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    cp.shutdown().await;

    // Bulk-load the rows directly: 100k admin calls would only measure the admin API.
    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url)
        .await
        .unwrap();
    let now = llm_proxy_control_plane::store::now_micros();
    let keys: Vec<VirtualKeyRow> = (0..KEYS)
        .map(|i| VirtualKeyRow {
            id: llm_proxy_control_plane::ids::new_id("vkey"),
            name: format!("team-{i:06}"),
            key_sha256: llm_proxy_control_plane::ids::key_sha256(&format!("vk-team-{i:06}")),
            key_hint: "vk-te…0000".into(),
            enabled: true,
            expires_at: None,
            created_at: now,
            updated_at: now,
            budget_micro_usd: None,
            budget_period: None,
        })
        .collect();
    let rows: Vec<AssignmentRow> = keys
        .iter()
        .map(|k| AssignmentRow {
            id: llm_proxy_control_plane::ids::new_id("asg"),
            vkey_id: k.id.clone(),
            model_id: model.id.clone(),
            alias: "gpt-4o-mini".into(),
            tps: Some(10),
            burst: None,
            tpm: Some(100_000),
            weight: 1,
            created_at: now,
            updated_at: now,
        })
        .collect();
    conn.transaction(async |c| {
        for chunk in keys.chunks(2000) {
            diesel::insert_into(virtual_keys::table)
                .values(chunk)
                .execute(c)
                .await?;
        }
        for chunk in rows.chunks(2000) {
            diesel::insert_into(assignments::table)
                .values(chunk)
                .execute(c)
                .await?;
        }
        diesel::sql_query("UPDATE config_state SET version = version + 1")
            .execute(c)
            .await?;
        Ok::<_, diesel::result::Error>(())
    })
    .await
    .unwrap();
    drop(conn);

    let cp = start().await;
    let mut config = common::config_client(cp.grpc_addr, None).await;
    let started = Instant::now();
    let mut stream = config
        .subscribe(SubscribeRequest {
            node_id: "dp-big".into(),
            accepts_parts: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let parts = parts_at_least(&mut stream, 1).await;
    let received = started.elapsed();
    let largest = parts.iter().map(Message::encoded_len).max().unwrap();
    assert!(parts.len() > 5, "{} parts", parts.len());
    assert!(largest < 2 * 1024 * 1024, "a part of {largest} bytes");
    let snapshot = merge(parts);
    // A subscriber that does not accept parts (an older data plane) gets it in one message.
    let mut legacy = config
        .subscribe(SubscribeRequest {
            node_id: "dp-legacy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let whole = parts_at_least(&mut legacy, 1).await;
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].virtual_keys.len(), KEYS);
    assert_eq!(snapshot.virtual_keys.len(), KEYS);
    assert_eq!(snapshot.assignments.len(), KEYS);
    let encoded = snapshot.encoded_len();
    let decode_started = Instant::now();
    let decoded = Snapshot::decode(snapshot.encode_to_vec().as_slice()).unwrap();
    let decode = decode_started.elapsed();
    assert_eq!(decoded.virtual_keys.len(), KEYS);
    let build_started = Instant::now();
    let rebuilt = llm_proxy_control_plane::hub::build_snapshot(&cp.store, 0)
        .await
        .unwrap();
    let build = build_started.elapsed();
    assert_eq!(rebuilt.snapshot.virtual_keys.len(), KEYS);
    println!(
        "100k-key snapshot: {:.1} MiB encoded; build from Postgres {build:?}; subscribe-to-received {received:?}; decode {decode:?}",
        encoded as f64 / (1024.0 * 1024.0)
    );
    cp.shutdown().await;
}
