//! Usage shipping (DESIGN §18): a data plane aggregates the usage of what upstreams answered and
//! ships it to the real control plane (SQLite), whose `usage_hourly` totals must be exact — with
//! the control plane up, down for a while, and at the data plane's shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{PATIENCE, control_plane_settings};
use llm_proxy_control_plane::server::{self as cp_server, RunningControlPlane};
use llm_proxy_control_plane::store::{NewAssignment, NewConnection, NewModel, NewVirtualKey};
use llm_proxy_control_plane::usage::{Group, UsageQuery};
use llm_proxy_data_plane::gateway::{self, RunningGateway};
use llm_proxy_data_plane::usage_report::UsageSettings;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::openai::OPENAI_KEY;
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::time::Duration;

const KEY_A: &str = "vk-usage-a-1234";
const KEY_B: &str = "vk-usage-b-1234";
/// Micro-USD per million tokens = pico-USD per token.
const PRICE_INPUT: u128 = 2_500_000;
const PRICE_OUTPUT: u128 = 10_000_000;
const PRICE_CACHE_READ: u128 = 250_000;

struct Fixture {
    _mock: MockUpstream,
    cp: RunningControlPlane,
    master_key: SecretString,
    dp: RunningGateway,
    base: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

/// Sums per (key name, alias): requests, input, output, cache read, cache write, reasoning, cost.
type Totals = BTreeMap<(String, String), [u128; 7]>;

async fn fixture() -> Fixture {
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, master_key) = common::start_control_plane(dir.path()).await;
    let store = &cp.store;
    store
        .create_connection(NewConnection {
            name: "OpenAI".into(),
            provider: "openai".into(),
            endpoint: mock.base.clone(),
            credential: SecretString::from(OPENAI_KEY),
            options: BTreeMap::new(),
        })
        .await
        .unwrap();
    store
        .create_model(NewModel {
            connection: "OpenAI".into(),
            name: "priced".into(),
            remote: "gpt-4o".into(),
            price_input: Some(PRICE_INPUT as i64),
            price_output: Some(PRICE_OUTPUT as i64),
            price_cache_read: Some(PRICE_CACHE_READ as i64),
            ..Default::default()
        })
        .await
        .unwrap();
    store
        .create_model(NewModel {
            connection: "OpenAI".into(),
            name: "free".into(),
            remote: "gpt-4o-mini".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for (vkey, key) in [("key-a", KEY_A), ("key-b", KEY_B)] {
        store
            .create_vkey(NewVirtualKey {
                name: vkey.into(),
                key: Some(SecretString::from(key)),
                expires_at: None,
                ..Default::default()
            })
            .await
            .unwrap();
        for model in ["priced", "free"] {
            store
                .create_assignment(NewAssignment {
                    vkey: vkey.into(),
                    model: model.into(),
                    alias: Some(model.into()),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let dp = gateway::start(gateway::GatewaySettings {
        // Only the tests' explicit flushes (and shutdown) ship.
        usage: UsageSettings {
            interval: Duration::from_secs(3600),
            queue_max_batches: 100,
        },
        ..common::data_plane_settings(&cp, "dp-usage", None)
    })
    .await
    .unwrap();
    common::wait_applied(&cp, &dp).await;
    Fixture {
        _mock: mock,
        master_key,
        base: format!("http://{}", dp.addr),
        cp,
        dp,
        http: reqwest::Client::new(),
        dir,
    }
}

impl Fixture {
    /// Sends a chat request whose answer reports `usage-P-C-K-R` (P prompt tokens, K of them
    /// cached, C completion tokens, R of them reasoning) and reads the whole answer.
    async fn chat(&self, key: &str, alias: &str, usage: [u64; 4], stream: bool) {
        let [p, c, k, r] = usage;
        let body = format!(
            r#"{{"model":"{alias}","stream":{stream},"messages":[{{"role":"user","content":"usage-{p}-{c}-{k}-{r}"}}]}}"#
        );
        let answer = common::post_json(
            &self.http,
            format!("{}/v1/chat/completions", self.base),
            key,
            &body,
        )
        .await;
        assert_eq!(answer.status(), 200);
        answer.text().await.unwrap();
    }

    async fn totals(&self) -> Totals {
        totals(&self.cp).await
    }
}

async fn totals(cp: &RunningControlPlane) -> Totals {
    let sums = cp
        .store
        .query_usage(&UsageQuery {
            group_by: vec![Group::Vkey, Group::Alias],
            ..Default::default()
        })
        .await
        .unwrap();
    sums.into_iter()
        .map(|s| {
            let n = |v: i64| u128::try_from(v).unwrap();
            (
                (s.vkey_name.unwrap(), s.alias.unwrap()),
                [
                    n(s.requests),
                    n(s.input_tokens),
                    n(s.output_tokens),
                    n(s.cache_read_tokens),
                    n(s.cache_write_tokens),
                    n(s.reasoning_tokens),
                    s.cost_pico_usd,
                ],
            )
        })
        .collect()
}

/// Adds one answer's `usage-P-C-K-R` to `totals` under (key, alias), costed when priced.
fn expect(totals: &mut Totals, vkey: &str, alias: &str, usage: [u64; 4]) {
    let [p, c, k, r] = usage.map(u128::from);
    let cost = if alias == "priced" {
        (p - k) * PRICE_INPUT + k * PRICE_CACHE_READ + c * PRICE_OUTPUT
    } else {
        0
    };
    let sums = totals
        .entry((vkey.to_owned(), alias.to_owned()))
        .or_default();
    for (sum, add) in sums.iter_mut().zip([1, p, c, k, 0, r, cost]) {
        *sum += add;
    }
}

/// Flushes until the control plane's totals are `expected` (a stream's usage is counted when its
/// end is settled, just after the client read it).
async fn flush_until(f: &Fixture, expected: &Totals) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let flushed = f.dp.usage.flush().await;
        let got = f.totals().await;
        if flushed.is_ok() && &got == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage totals never matched: flush {flushed:?}, got {got:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Mixed traffic: two keys, a priced and an unpriced model, streamed and not, cache and
/// reasoning tokens; refusals are not counted.
async fn mixed_traffic(f: &Fixture, expected: &mut Totals) {
    let calls: [(&str, &str, &str, [u64; 4], bool); 5] = [
        (KEY_A, "key-a", "priced", [1036, 100, 1024, 64], false),
        (KEY_A, "key-a", "priced", [2000, 50, 1500, 30], true),
        (KEY_A, "key-a", "free", [300, 20, 256, 0], false),
        (KEY_B, "key-b", "priced", [10, 5, 0, 0], true),
        (KEY_B, "key-b", "free", [7, 3, 2, 1], true),
    ];
    for (key, vkey, alias, usage, stream) in calls {
        f.chat(key, alias, usage, stream).await;
        expect(expected, vkey, alias, usage);
    }
    // Refused before any upstream call: not counted.
    let unknown = common::post_json(
        &f.http,
        format!("{}/v1/chat/completions", f.base),
        KEY_A,
        r#"{"model":"nope","messages":[]}"#,
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let unauthorized = common::post_json(
        &f.http,
        format!("{}/v1/chat/completions", f.base),
        "vk-wrong",
        r#"{"model":"priced","messages":[]}"#,
    )
    .await;
    assert_eq!(unauthorized.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn totals_in_the_control_plane_are_exact() {
    let f = fixture().await;
    let mut expected = Totals::new();
    mixed_traffic(&f, &mut expected).await;
    flush_until(&f, &expected).await;
    // Again: later batches add to the same hourly rows.
    mixed_traffic(&f, &mut expected).await;
    flush_until(&f, &expected).await;
    assert_eq!(f.dp.usage.queued_batches().await, 0);
    let metrics = f.dp.render_metrics();
    assert!(
        metrics.contains("llm_proxy_usage_dropped_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"llm_proxy_usage_batches_total{result="sent"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_wait_for_a_control_plane_that_is_down_and_arrive_once() {
    let mut f = fixture().await;
    let settings = control_plane_settings(f.dir.path(), f.cp.grpc_addr, &f.master_key);
    let mut expected = Totals::new();
    mixed_traffic(&f, &mut expected).await;
    flush_until(&f, &expected).await;

    // Down: two flushes fail and leave two batches queued, in order.
    let placeholder = cp_server::start(control_plane_settings(
        f.dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        &f.master_key,
    ))
    .await
    .unwrap();
    std::mem::replace(&mut f.cp, placeholder).shutdown().await;
    for _ in 0..2 {
        mixed_traffic(&f, &mut expected).await;
        // Wait for the streams' ends to be counted before the batch is cut.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let before = f.dp.usage.queued_batches().await;
        loop {
            assert!(
                f.dp.usage.flush().await.is_err(),
                "the control plane is down"
            );
            if f.dp.usage.queued_batches().await > before {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(f.dp.usage.queued_batches().await >= 2);

    // Back on the same address and database: everything arrives, nothing twice.
    std::mem::replace(&mut f.cp, cp_server::start(settings).await.unwrap())
        .shutdown()
        .await;
    flush_until(&f, &expected).await;
    assert_eq!(f.dp.usage.queued_batches().await, 0);
    // Acknowledged batches are not sent again.
    f.dp.usage.flush().await.unwrap();
    assert_eq!(f.totals().await, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ships_what_is_pending() {
    let f = fixture().await;
    let mut expected = Totals::new();
    mixed_traffic(&f, &mut expected).await;
    let Fixture { cp, dp, _mock, .. } = f;
    dp.shutdown(Duration::from_secs(10)).await;
    assert_eq!(totals(&cp).await, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_under_the_same_node_id_is_not_taken_for_a_duplicate() {
    let mut f = fixture().await;
    let mut expected = Totals::new();
    mixed_traffic(&f, &mut expected).await;
    // A new process with the same node id starts its sequence again, under a new boot id.
    let restarted = gateway::start(gateway::GatewaySettings {
        usage: UsageSettings {
            interval: Duration::from_secs(3600),
            queue_max_batches: 100,
        },
        ..common::data_plane_settings(&f.cp, "dp-usage", None)
    })
    .await
    .unwrap();
    common::wait_applied(&f.cp, &restarted).await;
    let old = std::mem::replace(&mut f.dp, restarted);
    old.shutdown(Duration::from_secs(10)).await;
    assert_eq!(f.totals().await, expected);
    f.base = format!("http://{}", f.dp.addr);
    mixed_traffic(&f, &mut expected).await;
    flush_until(&f, &expected).await;
}
