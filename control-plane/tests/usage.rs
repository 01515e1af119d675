//! Usage accounting (DESIGN §18): `ConfigService.ReportUsage` writes each batch exactly once and
//! `AdminService.QueryUsage` sums it, on Postgres and on SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Backend;
use llm_proxy_proto::Timestamp;
use llm_proxy_proto::v1::*;
use tonic::Code;

const H0: i64 = 1_796_000_400; // 2026-11-30T01:00:00Z, on the hour
const HOUR: i64 = 3600;

fn row(vkey: &str, asg: &str, model: &str, alias: &str, hour: i64, n: i64) -> UsageRow {
    UsageRow {
        vkey_id: vkey.into(),
        assignment_id: asg.into(),
        model_id: model.into(),
        alias: alias.into(),
        hour_unix: hour,
        requests: n,
        input_tokens: 100 * n,
        output_tokens: 10 * n,
        cache_read_tokens: 7 * n,
        cache_write_tokens: 3 * n,
        reasoning_tokens: 2 * n,
        // Not a multiple of a micro-USD, so the two-part sum is exercised.
        cost_pico_usd: (1_234_567 * n).to_string(),
        vkey_name: format!("{vkey}-name"),
        model_name: format!("{model}-name"),
    }
}

fn batch(node: &str, boot: &str, sequence: u64, rows: Vec<UsageRow>) -> ReportUsageRequest {
    ReportUsageRequest {
        node_id: node.into(),
        boot_id: boot.into(),
        sequence,
        rows,
    }
}

async fn query(admin: &mut common::Admin, request: QueryUsageRequest) -> Vec<UsageTotal> {
    admin.query_usage(request).await.unwrap().into_inner().rows
}

async fn totals(admin: &mut common::Admin) -> UsageTotal {
    let mut rows = query(admin, QueryUsageRequest::default()).await;
    assert_eq!(rows.len(), 1, "no group_by gives one row of totals");
    rows.remove(0)
}

/// The sums `n` requests of [`row`] make.
fn expect(total: &UsageTotal, n: i64) {
    assert_eq!(
        (
            total.requests,
            total.input_tokens,
            total.output_tokens,
            total.cache_read_tokens,
            total.cache_write_tokens,
            total.reasoning_tokens,
            total.cost_pico_usd.as_str(),
        ),
        (
            n,
            100 * n,
            10 * n,
            7 * n,
            3 * n,
            2 * n,
            (1_234_567 * i128::from(n)).to_string().as_str()
        )
    );
}

async fn batches_are_added_exactly_once(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    let mut config = common::config_client(cp.grpc_addr, None).await;
    let v0 = cp.store.current_version().await.unwrap().1;

    expect(&totals(&mut admin).await, 0);
    let first = batch(
        "dp-1",
        "boot-a",
        1,
        vec![row("vkey-1", "asg-1", "model-1", "gpt", H0, 2)],
    );
    let ack = config
        .report_usage(first.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(ack.added);
    expect(&totals(&mut admin).await, 2);

    // The same (node, boot, sequence) again: acknowledged, nothing added.
    let ack = config
        .report_usage(first.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.added);
    expect(&totals(&mut admin).await, 2);

    // The same node restarted (new boot id, sequence from 1 again): added.
    let restarted = batch("dp-1", "boot-b", 1, first.rows.clone());
    assert!(
        config
            .report_usage(restarted)
            .await
            .unwrap()
            .into_inner()
            .added
    );
    expect(&totals(&mut admin).await, 4);

    // Another node, same sequence: added; two batches for one row sum in that row.
    let other = batch(
        "dp-2",
        "boot-a",
        1,
        vec![row("vkey-1", "asg-1", "model-1", "gpt", H0, 5)],
    );
    assert!(config.report_usage(other).await.unwrap().into_inner().added);
    let grouped = query(
        &mut admin,
        QueryUsageRequest {
            group_by: vec![UsageGroup::Hour as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(grouped.len(), 1);
    expect(&grouped[0], 9);

    // Rows of one batch for the same bucket are added together; an empty batch is fine.
    let doubled = batch(
        "dp-2",
        "boot-a",
        2,
        vec![
            row("vkey-1", "asg-1", "model-1", "gpt", H0, 1),
            row("vkey-1", "asg-1", "model-1", "gpt", H0, 1),
        ],
    );
    assert!(
        config
            .report_usage(doubled)
            .await
            .unwrap()
            .into_inner()
            .added
    );
    assert!(
        config
            .report_usage(batch("dp-2", "boot-a", 3, vec![]))
            .await
            .unwrap()
            .into_inner()
            .added
    );
    expect(&totals(&mut admin).await, 11);

    // Usage is not config: no version bump, no snapshot.
    assert_eq!(cp.store.current_version().await.unwrap().1, v0);
    cp.shutdown().await;
}

async fn concurrent_batches_lose_nothing(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8u64 {
        let mut config = common::config_client(cp.grpc_addr, None).await;
        tasks.spawn(async move {
            for seq in 0..20u64 {
                let rows = vec![
                    row("vkey-1", "asg-1", "model-1", "gpt", H0, 1),
                    row("vkey-2", "asg-2", "model-1", "gpt", H0, 1),
                ];
                let request = batch(&format!("dp-{task}"), "boot", seq, rows);
                assert!(
                    config
                        .report_usage(request.clone())
                        .await
                        .unwrap()
                        .into_inner()
                        .added
                );
                // Every batch also arrives twice, as after a lost acknowledgement.
                assert!(
                    !config
                        .report_usage(request)
                        .await
                        .unwrap()
                        .into_inner()
                        .added
                );
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    expect(&totals(&mut admin).await, 2 * 8 * 20);
    let by_key = query(
        &mut admin,
        QueryUsageRequest {
            group_by: vec![UsageGroup::Vkey as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_key.len(), 2);
    for total in &by_key {
        expect(total, 8 * 20);
    }
    cp.shutdown().await;
}

async fn bad_batches_are_refused_with_the_field_named(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    let mut config = common::config_client(cp.grpc_addr, None).await;
    let good = || row("vkey-1", "asg-1", "model-1", "gpt", H0, 1);
    let cases: Vec<(ReportUsageRequest, &str)> = vec![
        (batch("", "b", 1, vec![good()]), "node_id"),
        (batch("dp", " ", 1, vec![good()]), "boot_id"),
        (batch("dp", "b", u64::MAX, vec![good()]), "sequence"),
        (
            batch(
                "dp",
                "b",
                1,
                vec![UsageRow {
                    hour_unix: H0 + 1,
                    ..good()
                }],
            ),
            "hour_unix in rows[0]",
        ),
        (
            batch(
                "dp",
                "b",
                1,
                vec![
                    good(),
                    UsageRow {
                        cost_pico_usd: "-5".into(),
                        ..good()
                    },
                ],
            ),
            "cost_pico_usd in rows[1]",
        ),
        (
            batch(
                "dp",
                "b",
                1,
                vec![UsageRow {
                    cost_pico_usd: "1.5".into(),
                    ..good()
                }],
            ),
            "cost_pico_usd",
        ),
        (
            batch(
                "dp",
                "b",
                1,
                vec![UsageRow {
                    cost_pico_usd: "99999999999999999999".into(),
                    ..good()
                }],
            ),
            "cost_pico_usd",
        ),
        (
            batch(
                "dp",
                "b",
                1,
                vec![UsageRow {
                    requests: -1,
                    ..good()
                }],
            ),
            "requests",
        ),
        (
            batch(
                "dp",
                "b",
                1,
                vec![UsageRow {
                    vkey_id: String::new(),
                    ..good()
                }],
            ),
            "vkey_id",
        ),
        (
            batch("dp", "b", 1, vec![good(); 10_001]),
            "rows must be at most 10000",
        ),
    ];
    for (request, field) in cases {
        let status = config.report_usage(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "message {:?} should start with {field:?}",
            status.message()
        );
    }
    // A refused batch adds nothing and does not burn its sequence number.
    expect(&totals(&mut admin).await, 0);
    let ok = batch("dp", "b", 1, vec![good(); 10_000]);
    assert!(config.report_usage(ok).await.unwrap().into_inner().added);
    expect(&totals(&mut admin).await, 10_000);
    cp.shutdown().await;
}

async fn usage_needs_the_dataplane_token(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let mut settings = common::settings(&db, &common::new_master_key());
    settings.admin_token = Some("admin-token-1".to_owned().into());
    settings.dataplane_token = Some("dp-token-1".to_owned().into());
    let cp = llm_proxy_control_plane::server::start(settings)
        .await
        .unwrap();
    let request = batch("dp", "b", 1, vec![row("vkey-1", "asg-1", "m", "a", H0, 1)]);
    for token in [None, Some("admin-token-1")] {
        let mut config = common::config_client(cp.grpc_addr, token).await;
        let status = config.report_usage(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    let mut config = common::config_client(cp.grpc_addr, Some("dp-token-1")).await;
    assert!(
        config
            .report_usage(request)
            .await
            .unwrap()
            .into_inner()
            .added
    );
    for token in [None, Some("dp-token-1")] {
        let mut admin = common::admin(&cp, token).await;
        let status = admin
            .query_usage(QueryUsageRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    let mut admin = common::admin(&cp, Some("admin-token-1")).await;
    expect(&totals(&mut admin).await, 1);
    cp.shutdown().await;
}

fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

async fn queries_filter_and_group_exactly(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    let mut config = common::config_client(cp.grpc_addr, None).await;

    // Real resources: their current names are stored, and kept after the key is deleted.
    let conn = admin
        .create_connection(CreateConnectionRequest {
            name: "OpenAI".into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com".into(),
            credential: "sk-test".into(),
            options: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let model = admin
        .create_provider_model(CreateProviderModelRequest {
            connection_id: conn.id.clone(),
            name: "gpt-4o".into(),
            remote: "gpt-4o".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = admin
        .create_virtual_key(CreateVirtualKeyRequest {
            name: "Frontend".into(),
            key: None,
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .virtual_key
        .unwrap();
    let asg = admin
        .create_assignment(CreateAssignmentRequest {
            vkey_id: key.id.clone(),
            model_id: model.id.clone(),
            alias: Some("gpt".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Day 1: hours 01:00 and 02:00; day 2: 01:00 (24 h later). Two keys, two aliases.
    let day2 = H0 + 24 * HOUR;
    let rows = vec![
        row(&key.id, &asg.id, &model.id, "gpt", H0, 1),
        row(&key.id, &asg.id, &model.id, "gpt", H0 + HOUR, 2),
        row(&key.id, &asg.id, &model.id, "gpt", day2, 4),
        row("vkey-gone", "asg-gone", &model.id, "mini", H0, 8),
        row("vkey-gone", "asg-gone", &model.id, "mini", day2, 16),
    ];
    config
        .report_usage(batch("dp", "b", 1, rows))
        .await
        .unwrap();
    admin
        .delete_virtual_key(DeleteRequest {
            id: key.id.clone(),
            force: true,
        })
        .await
        .unwrap();

    expect(&totals(&mut admin).await, 31);
    let q = |f: fn(&mut QueryUsageRequest)| {
        let mut request = QueryUsageRequest::default();
        f(&mut request);
        request
    };

    // Group by key: ids and names, the deleted key included under its name.
    let by_key = query(
        &mut admin,
        QueryUsageRequest {
            group_by: vec![UsageGroup::Vkey as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_key.len(), 2);
    let frontend = by_key
        .iter()
        .find(|r| r.vkey_id.as_deref() == Some(key.id.as_str()))
        .unwrap();
    assert_eq!(frontend.vkey_name.as_deref(), Some("Frontend"));
    assert_eq!(
        (
            frontend.model_id.as_ref(),
            frontend.alias.as_ref(),
            frontend.day.as_ref()
        ),
        (None, None, None)
    );
    expect(frontend, 7);
    let gone = by_key
        .iter()
        .find(|r| r.vkey_id.as_deref() == Some("vkey-gone"))
        .unwrap();
    assert_eq!(gone.vkey_name.as_deref(), Some("vkey-gone-name"));
    expect(gone, 24);

    // Filters: key by name (after deletion), model by name, alias.
    let mut by_name = QueryUsageRequest {
        vkey: Some("Frontend".into()),
        ..Default::default()
    };
    expect(&query(&mut admin, by_name.clone()).await[0], 7);
    by_name.vkey = Some(key.id.clone());
    expect(&query(&mut admin, by_name).await[0], 7);
    let by_model = QueryUsageRequest {
        model: Some("gpt-4o".into()),
        group_by: vec![UsageGroup::Model as i32],
        ..Default::default()
    };
    let rows = query(&mut admin, by_model).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].model_name.as_deref(), Some("gpt-4o"));
    expect(&rows[0], 31);
    expect(
        &query(&mut admin, q(|r| r.alias = Some("mini".into()))).await[0],
        24,
    );
    expect(
        &query(&mut admin, q(|r| r.vkey = Some("nobody".into()))).await[0],
        0,
    );

    // Group by alias and day, ordered.
    let by_alias_day = query(
        &mut admin,
        QueryUsageRequest {
            group_by: vec![UsageGroup::Alias as i32, UsageGroup::Day as i32],
            ..Default::default()
        },
    )
    .await;
    let day0 = H0 - H0 % 86_400;
    let got: Vec<(String, i64, i64)> = by_alias_day
        .iter()
        .map(|r| (r.alias.clone().unwrap(), r.day.unwrap().seconds, r.requests))
        .collect();
    assert_eq!(
        got,
        vec![
            ("gpt".into(), day0, 3),
            ("gpt".into(), day0 + 86_400, 4),
            ("mini".into(), day0, 8),
            ("mini".into(), day0 + 86_400, 16),
        ]
    );
    // Group by hour.
    let by_hour: Vec<(i64, i64)> = query(
        &mut admin,
        QueryUsageRequest {
            group_by: vec![UsageGroup::Hour as i32],
            ..Default::default()
        },
    )
    .await
    .iter()
    .map(|r| (r.hour.unwrap().seconds, r.requests))
    .collect();
    assert_eq!(by_hour, vec![(H0, 9), (H0 + HOUR, 2), (day2, 20)]);

    // since is rounded down to its hour; until is exclusive of the bucket starting at it.
    let window = |since: Option<Timestamp>, until: Option<Timestamp>| QueryUsageRequest {
        since,
        until,
        ..Default::default()
    };
    expect(
        &query(&mut admin, window(ts(H0 + HOUR + 59 * 60, 0), None)).await[0],
        2 + 4 + 16,
    );
    expect(
        &query(&mut admin, window(None, ts(H0 + HOUR, 0))).await[0],
        9,
    );
    expect(
        &query(&mut admin, window(None, ts(H0 + HOUR, 1))).await[0],
        11,
    );
    expect(
        &query(&mut admin, window(ts(H0, 0), ts(day2, 0))).await[0],
        11,
    );

    let status = admin
        .query_usage(QueryUsageRequest {
            group_by: vec![42],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("group_by"), "{status:?}");
    cp.shutdown().await;
}

macro_rules! on_both_backends {
    ($($suite:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $suite() {
                    super::$suite(super::Backend::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $suite() {
                    super::$suite(super::Backend::Sqlite).await;
                }
            )*
        }
    };
}

on_both_backends!(
    batches_are_added_exactly_once,
    concurrent_batches_lose_nothing,
    bad_batches_are_refused_with_the_field_named,
    usage_needs_the_dataplane_token,
    queries_filter_and_group_exactly,
);
