//! Budgets of virtual keys (DESIGN §18) enforced by three real data plane processes sharing one
//! Redis: a key is refused (429 `insufficient_quota` / `budget_exceeded`, Anthropic dialect
//! `rate_limit_error`, no upstream call) once its spend reaches its budget; the reservations of
//! requests in flight count, so concurrent requests cannot overshoot when their estimates cover
//! their cost, and overshoot stays within the requests in flight when they do not; other keys are
//! unaffected; raising the budget re-admits; and the refusal survives restarting every data plane
//! and flushing Redis (the counter is restored from the control plane's recorded spend).
//!
//! Every request costs exactly 1 USD: the mock upstream reports 99,990 prompt and 10 completion
//! tokens (remote model `usage-99990-10-…`) and both prices are 10 USD per million tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

mod common;

use common::{DataPlaneProcess, PATIENCE};
use llm_proxy_control_plane::server::{self as cp_server, RunningControlPlane, ServerSettings};
use llm_proxy_control_plane::store::{
    NewAssignment, NewConnection, NewModel, NewVirtualKey, VirtualKeyPatch,
};
use llm_proxy_control_plane::usage::UsageQuery;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::openai::OPENAI_KEY;
use secrecy::SecretString;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// Micro-USD per million tokens: 10 USD.
const PRICE: i64 = 10_000_000;
/// Pico-USD of one request (100,000 tokens at 10 USD per million).
const REQUEST_PICO: u128 = 1_000_000_000_000;
/// Each test's own Redis database, so that flushing one touches no other test.
fn redis_url(db: u32) -> String {
    let base = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    format!("{}/{db}", base.trim_end_matches('/'))
}

struct Key {
    name: &'static str,
    secret: &'static str,
    alias: &'static str,
}

const CAPPED: Key = Key {
    name: "capped",
    secret: "vk-budget-capped-0123456789",
    alias: "capped-model",
};
const BURSTY: Key = Key {
    name: "bursty",
    secret: "vk-budget-bursty-0123456789",
    alias: "bursty-model",
};
const FREE: Key = Key {
    name: "unbudgeted",
    secret: "vk-budget-free-0123456789",
    alias: "free-model",
};

async fn control_plane(upstream: &str, dir: &std::path::Path) -> RunningControlPlane {
    let mut settings = ServerSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        SecretString::from(format!("sqlite://{}", dir.join("cp.db").display())),
        llm_proxy_control_plane::crypto::MasterKeys::generate_encoded(),
    );
    settings.hub = llm_proxy_control_plane::hub::HubTimings {
        coalesce: Duration::from_millis(10),
        poll: Duration::from_millis(500),
    };
    let cp = cp_server::start(settings).await.unwrap();
    let store = &cp.store;
    store
        .create_connection(NewConnection {
            name: "Mock".into(),
            provider: "openai".into(),
            endpoint: upstream.to_owned(),
            credential: SecretString::from(OPENAI_KEY),
            options: Default::default(),
        })
        .await
        .unwrap();
    for (key, budget_usd) in [(&CAPPED, Some(5)), (&BURSTY, Some(5)), (&FREE, None)] {
        store
            .create_model(NewModel {
                connection: "Mock".into(),
                name: key.alias.into(),
                remote: format!("usage-99990-10-{}", key.name),
                price_input: Some(PRICE),
                price_output: Some(PRICE),
                ..Default::default()
            })
            .await
            .unwrap();
        store
            .create_vkey(NewVirtualKey {
                name: key.name.into(),
                key: Some(SecretString::from(key.secret)),
                budget_micro_usd: budget_usd.map(|usd: i64| usd * 1_000_000),
                ..Default::default()
            })
            .await
            .unwrap();
        store
            .create_assignment(NewAssignment {
                vkey: key.name.into(),
                model: key.alias.into(),
                alias: Some(key.alias.into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    cp
}

async fn spawn_data_plane(cp: SocketAddr, db: u32, node: &str) -> DataPlaneProcess {
    let redis = redis_url(db);
    let args = [
        "--redis-url",
        redis.as_str(),
        // Budgets, not the fail mode, are under test: a busy test machine must not push Redis
        // calls past their time budget.
        "--ratelimit-redis-budget-ms",
        "500",
        "--usage-report-interval-s",
        "1",
    ];
    DataPlaneProcess::start(cp, node, &args).await
}

async fn spawn_three(cp: SocketAddr, db: u32, round: u32) -> Vec<DataPlaneProcess> {
    let mut planes = Vec::new();
    for n in 0..3 {
        planes.push(spawn_data_plane(cp, db, &format!("dp-budget-{db}-{round}-{n}")).await);
    }
    let http = reqwest::Client::new();
    for plane in &planes {
        for key in [&CAPPED, &BURSTY, &FREE] {
            plane.wait_serving(&http, key.secret, key.alias).await;
        }
    }
    planes
}

/// One chat completion; `max_tokens` sets the reservation (the prompt's estimate is tiny).
async fn chat(
    http: &reqwest::Client,
    plane: &DataPlaneProcess,
    key: &Key,
    max_tokens: u64,
) -> (u16, Value) {
    let response = http
        .post(format!("http://{}/v1/chat/completions", plane.addr))
        .bearer_auth(key.secret)
        .json(&json!({
            "model": key.alias,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("x-should-retry")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = response.json().await.unwrap();
    if status == 429 {
        assert_eq!(retry.as_deref(), Some("false"), "{body}");
    }
    (status, body)
}

fn assert_budget_refusal(status: u16, body: &Value) {
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
}

/// Upstream calls made for `key` (its model's remote name is in the body).
fn upstream_calls(mock: &MockUpstream, key: &Key) -> usize {
    let marker = format!("usage-99990-10-{}", key.name);
    mock.requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains(&marker))
        .count()
}

/// Sends sequentially, round-robin over `planes`, until a request is refused; returns how many
/// were admitted.
async fn admitted_until_refused(
    http: &reqwest::Client,
    planes: &[DataPlaneProcess],
    key: &Key,
) -> usize {
    for n in 0..100 {
        let (status, body) = chat(http, &planes[n % planes.len()], key, 1).await;
        if status != 200 {
            assert_budget_refusal(status, &body);
            return n;
        }
    }
    panic!("the budget never refused");
}

/// Recorded spend of `key` in the control plane.
async fn recorded_pico(cp: &RunningControlPlane, key: &Key) -> u128 {
    cp.store
        .query_usage(&UsageQuery {
            vkey: Some(key.name.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|row| row.cost_pico_usd)
        .sum()
}

/// Waits until every data plane has applied the control plane's current config.
async fn wait_applied(
    cp: &RunningControlPlane,
    http: &reqwest::Client,
    planes: &[DataPlaneProcess],
) {
    let version = cp.store.current_version().await.unwrap().1;
    let deadline = Instant::now() + PATIENCE;
    for plane in planes {
        loop {
            let ready = http
                .get(format!("http://{}/readyz", plane.metrics))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let applied: i64 = ready
                .rsplit("config version ")
                .next()
                .and_then(|v| v.trim().trim_end_matches(')').parse().ok())
                .unwrap_or(-1);
            if applied >= version {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a data plane never applied version {version}: {ready}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn flush_redis(db: u32) {
    let client = redis::Client::open(redis_url(db)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_holds_across_three_data_planes_restarts_and_a_redis_flush() {
    const DB: u32 = 13;
    flush_redis(DB).await;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = control_plane(&mock.base, dir.path()).await;
    let http = reqwest::Client::new();
    let mut planes = spawn_three(cp.grpc_addr, DB, 0).await;

    // Sequential requests of 1 USD each against a 5 USD budget: exactly five pass, spread over
    // the three data planes; the sixth is refused before any upstream call.
    assert_eq!(admitted_until_refused(&http, &planes, &CAPPED).await, 5);
    assert_eq!(upstream_calls(&mock, &CAPPED), 5);
    for plane in &planes {
        let (status, body) = chat(&http, plane, &CAPPED, 1).await;
        assert_budget_refusal(status, &body);
        // The Anthropic dialect refuses in its own shape.
        let response = http
            .post(format!("http://{}/v1/messages", plane.addr))
            .header("x-api-key", CAPPED.secret)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": CAPPED.alias, "max_tokens": 1,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("budget exceeded: "),
            "{body}"
        );
    }
    assert_eq!(upstream_calls(&mock, &CAPPED), 5);

    // Another key is unaffected, on every data plane.
    for plane in &planes {
        assert_eq!(chat(&http, plane, &FREE, 1).await.0, 200);
    }

    // Concurrent requests whose reservations cover their cost (max_tokens 100,000 at 10 USD per
    // million = 1 USD each): twelve at once over the three data planes, exactly five admitted.
    let mut tasks = Vec::new();
    for n in 0..12 {
        let (http, addr) = (http.clone(), planes[n % 3].addr);
        tasks.push(tokio::spawn(async move {
            let response = http
                .post(format!("http://{addr}/v1/chat/completions"))
                .bearer_auth(BURSTY.secret)
                .json(&json!({"model": BURSTY.alias, "max_tokens": 100_000,
                              "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(upstream_calls(&mock, &BURSTY), 5);

    // Raising the budget re-admits: two more dollars, two more requests.
    cp.store
        .update_vkey(
            CAPPED.name,
            VirtualKeyPatch {
                budget_micro_usd: Some(Some(7_000_000)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    wait_applied(&cp, &http, &planes).await;
    assert_eq!(admitted_until_refused(&http, &planes, &CAPPED).await, 2);
    assert_eq!(upstream_calls(&mock, &CAPPED), 7);

    // Every data plane restarts (each ships its usage at SIGTERM): Redis still holds the spend.
    for plane in planes.drain(..) {
        let (status, log) = plane.terminate().await;
        assert!(status.success(), "{log:?}");
    }
    assert_eq!(recorded_pico(&cp, &CAPPED).await, 7 * REQUEST_PICO);
    assert_eq!(recorded_pico(&cp, &BURSTY).await, 5 * REQUEST_PICO);
    let planes = spawn_three(cp.grpc_addr, DB, 1).await;
    for plane in &planes {
        let (status, body) = chat(&http, plane, &CAPPED, 1).await;
        assert_budget_refusal(status, &body);
    }

    // Redis flushed: the first request of each key restores the spend from the control plane.
    flush_redis(DB).await;
    for plane in &planes {
        let (status, body) = chat(&http, plane, &CAPPED, 1).await;
        assert_budget_refusal(status, &body);
        let (status, body) = chat(&http, plane, &BURSTY, 1).await;
        assert_budget_refusal(status, &body);
        assert_eq!(chat(&http, plane, &FREE, 1).await.0, 200);
    }
    assert_eq!(upstream_calls(&mock, &CAPPED), 7);
    assert_eq!(upstream_calls(&mock, &BURSTY), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn overshoot_stays_within_the_requests_in_flight() {
    const DB: u32 = 14;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = control_plane(&mock.base, dir.path()).await;
    let http = reqwest::Client::new();
    let planes = spawn_three(cp.grpc_addr, DB, 0).await;
    // Reservations far below the real cost (max_tokens 1): twelve concurrent requests may all be
    // admitted before any settles, but never more than the budget's five plus those in flight.
    const IN_FLIGHT: usize = 12;
    let mut tasks = Vec::new();
    for n in 0..IN_FLIGHT {
        let (http, addr) = (http.clone(), planes[n % 3].addr);
        tasks.push(tokio::spawn(async move {
            http.post(format!("http://{addr}/v1/chat/completions"))
                .bearer_auth(BURSTY.secret)
                .json(&json!({"model": BURSTY.alias, "max_tokens": 1,
                              "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        if task.await.unwrap() == 200 {
            admitted += 1;
        }
    }
    assert!((5..=IN_FLIGHT).contains(&admitted), "{admitted}");
    // Once they have settled, the spend is what they cost and nothing more is admitted.
    let (status, body) = chat(&http, &planes[0], &BURSTY, 1).await;
    assert_budget_refusal(status, &body);
    assert_eq!(upstream_calls(&mock, &BURSTY), admitted);
}
