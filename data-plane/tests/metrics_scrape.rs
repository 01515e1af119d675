//! `/metrics` on both planes shows the DESIGN §16 series after real traffic: the test scrapes each
//! plane's metrics listener over HTTP, parses the text exposition and checks names, label sets
//! and values. It also checks that no secret (virtual key, provider credential) and no
//! client-chosen text (unknown model names, invented gRPC methods) ever becomes part of a series.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::PATIENCE;
use llm_proxy_control_plane::server::{self as cp_server, RunningControlPlane};
use llm_proxy_control_plane::store::{NewAssignment, NewConnection, NewModel, NewVirtualKey};
use llm_proxy_data_plane::gateway::{self, RunningGateway};
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_proto::v1::admin_service_client::AdminServiceClient;
use llm_proxy_proto::v1::{CreateConnectionRequest, GetRequest, ListConnectionsRequest};
use secrecy::SecretString;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const CLIENT_KEY: &str = "vk-metrics-scrape-client-key-7c1e9a";
const WRONG_KEY: &str = "vk-attacker-wrong-key-3b8d";
const OPENAI_KEY: &str = llm_proxy_mock_upstream::openai::OPENAI_KEY;
const BROKEN_KEY: &str = llm_proxy_mock_upstream::openai::OPENAI_SECOND_KEY;
const UNKNOWN_MODEL: &str = "attacker-chosen-xyz";

// ---------------------------------------------------------------------------------------------
// The text exposition, parsed

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape: its raw text and its samples.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

/// `key="value",...` (the inside of the braces), with the exposition's escapes.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(
            chars.next(),
            Some('"'),
            "label {key} without a quoted value"
        );
        let mut value = String::new();
        loop {
            match chars.next().expect("unterminated label value") {
                '"' => break,
                '\\' => match chars.next().expect("dangling escape") {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        assert!(
            labels.insert(key.clone(), value).is_none(),
            "label {key} repeated"
        );
        match chars.next() {
            None | Some(',') => {}
            Some(c) => panic!("unexpected {c:?} after label {key}"),
        }
    }
    labels
}

impl Scrape {
    fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("no value in {line:?}"));
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}"));
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (
                        name,
                        parse_labels(
                            rest.strip_suffix('}')
                                .unwrap_or_else(|| panic!("unclosed labels in {line:?}")),
                        ),
                    ),
                    None => (series, BTreeMap::new()),
                };
                Sample {
                    name: name.to_owned(),
                    labels,
                    value,
                }
            })
            .collect();
        Self { text, samples }
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the sample named `name` with exactly the label set `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut found = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted);
        let first = found.next()?;
        assert!(found.next().is_none(), "{name}{labels:?} exposed twice");
        Some(first.value)
    }

    /// Like [`Self::get`], failing with the whole scrape when the series is missing.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{}", self.text))
    }

    /// The sum over every sample named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Checks the histogram `name`{`labels`} (`_bucket`, `_sum`, `_count`) and returns its count:
    /// the `+Inf` bucket equals the count, buckets never decrease, the sum is not negative (and
    /// positive once something was observed).
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let count = self.value(&format!("{name}_count"), labels);
        let sum = self.value(&format!("{name}_sum"), labels);
        let bucket_name = format!("{name}_bucket");
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        assert_eq!(
            self.value(&bucket_name, &with_le),
            count,
            "{name}{labels:?}: +Inf bucket != count"
        );
        let mut buckets: Vec<(f64, f64)> = self
            .matching(&bucket_name, labels)
            .filter(|s| s.labels.len() == labels.len() + 1)
            .map(|s| (s.labels["le"].parse::<f64>().unwrap(), s.value))
            .collect();
        assert!(buckets.len() > 1, "{name}{labels:?}: no finite buckets");
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        for pair in buckets.windows(2) {
            assert!(
                pair[0].1 <= pair[1].1,
                "{name}{labels:?}: cumulative buckets decrease: {buckets:?}"
            );
        }
        assert!(sum >= 0.0, "{name}{labels:?}: negative sum {sum}");
        if count > 0.0 {
            assert!(
                sum > 0.0,
                "{name}{labels:?}: {count} observations summing to 0"
            );
        }
        count
    }

    /// Asserts the `# TYPE` line of the metric family `family`.
    fn assert_type(&self, family: &str, kind: &str) {
        let line = format!("# TYPE {family} {kind}");
        assert!(
            self.text.lines().any(|l| l == line),
            "missing {line:?} in:\n{}",
            self.text
        );
    }

    /// Asserts that `needle` appears nowhere in the scrape (names, labels, help texts).
    fn assert_absent(&self, needle: &str, what: &str) {
        assert!(
            !self.text.contains(needle),
            "{what} ({needle:?}) leaked into /metrics:\n{}",
            self.text
        );
    }
}

/// GETs `http://{addr}/metrics` once.
async fn scrape(http: &reqwest::Client, addr: SocketAddr) -> Scrape {
    let response = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET /metrics on {addr}");
    Scrape::parse(response.text().await.unwrap())
}

/// Scrapes `addr` until `ready` holds (some series are written just after the client has its
/// answer, e.g. a stream's tokens when the stream ends), failing after [`PATIENCE`].
async fn scrape_until(
    http: &reqwest::Client,
    addr: SocketAddr,
    what: &str,
    ready: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let scrape = scrape(http, addr).await;
        if ready(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {PATIENCE:?}; last scrape:\n{}",
            scrape.text
        );
        // Poll interval (the condition above is what the test waits for).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Mock OpenAI upstreams

/// The remote model of the broken connection: the mock answers it with OpenAI's 500.
const BROKEN_REMOTE: &str = llm_proxy_mock_upstream::openai::SERVER_ERROR_MODEL;

// ---------------------------------------------------------------------------------------------
// Planes with their metrics listeners

/// A data plane like [`common::start_data_plane`], with its metrics listener on a local port.
async fn start_data_plane_with_metrics(
    cp: &RunningControlPlane,
    node_id: &str,
    redis_url: Option<SecretString>,
) -> RunningGateway {
    let mut settings = common::data_plane_settings(cp, node_id, redis_url);
    settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    // Generous, so that a busy test machine does not turn a slow Redis answer into a Redis error
    // (the test asserts there are none).
    settings.ratelimit_redis_budget = Duration::from_secs(5);
    gateway::start(settings).await.unwrap()
}

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Two OpenAI connections (one healthy, one answering 500), a key with the aliases `chat`,
/// `limited` (1 request per second, burst 1) and `broken`.
async fn configure(cp: &RunningControlPlane, ok: &MockUpstream, broken: &MockUpstream) {
    let store = &cp.store;
    for (name, mock, credential) in [
        ("OpenAI-Main", ok, OPENAI_KEY),
        ("OpenAI-Broken", broken, BROKEN_KEY),
    ] {
        store
            .create_connection(NewConnection {
                name: name.into(),
                provider: "openai".into(),
                endpoint: mock.base.clone(),
                credential: SecretString::from(credential),
                options: common::options(&[("timeout_s", "10")]),
            })
            .await
            .unwrap();
    }
    // gpt-4o-mini at $0.15 in, $0.60 out per million tokens (micro-USD per million).
    for (connection, name, remote, prices) in [
        (
            "OpenAI-Main",
            "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18",
            (Some(150_000), Some(600_000)),
        ),
        (
            "OpenAI-Broken",
            "gpt-4o-broken",
            BROKEN_REMOTE,
            (None, None),
        ),
    ] {
        store
            .create_model(NewModel {
                connection: connection.into(),
                name: name.into(),
                remote: remote.into(),
                deployment: None,
                price_input: prices.0,
                price_output: prices.1,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    store
        .create_vkey(NewVirtualKey {
            name: "Metrics-App".into(),
            key: Some(SecretString::from(CLIENT_KEY)),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap();
    for (model, alias, tps, burst) in [
        ("gpt-4o-mini", "chat", None, None),
        ("gpt-4o-mini", "limited", Some(1), Some(1)),
        ("gpt-4o-broken", "broken", None, None),
    ] {
        store
            .create_assignment(NewAssignment {
                vkey: "Metrics-App".into(),
                model: model.into(),
                alias: Some(alias.into()),
                tps,
                burst,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Data plane

#[tokio::test(flavor = "multi_thread")]
async fn data_plane_metrics_show_every_series_after_traffic() {
    let ok = MockUpstream::start().await.unwrap();
    let broken = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, _master_key) = common::start_control_plane(dir.path()).await;
    configure(&cp, &ok, &broken).await;
    let dp =
        start_data_plane_with_metrics(&cp, "dp-metrics", Some(SecretString::from(redis_url())))
            .await;
    common::wait_applied(&cp, &dp).await;
    let applied_version = cp.store.current_version().await.unwrap().1;
    assert!(applied_version > 0);
    let metrics_addr = dp.metrics_addr.expect("metrics listener not started");
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", dp.addr);

    // A non-streamed chat: usage 8 + 9.
    let response = common::post_json(
        &http,
        url.clone(),
        CLIENT_KEY,
        r#"{"model":"chat","messages":[{"role":"user","content":"Hello"}]}"#,
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 8);

    // A stream that asks for usage: 12 + 3.
    let response = common::post_json(
        &http,
        url.clone(),
        CLIENT_KEY,
        r#"{"model":"chat","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hi"}]}"#,
    )
    .await;
    assert_eq!(response.status(), 200);
    let events = common::sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3);

    // 1 request per second, burst 1: the first passes, one of the next is limited (retried a few
    // times in case the machine is so slow that a second went by).
    let mut limited_ok = 0u32;
    let mut limited_429 = 0u32;
    for _ in 0..5 {
        let response = common::post_json(
            &http,
            url.clone(),
            CLIENT_KEY,
            r#"{"model":"limited","messages":[]}"#,
        )
        .await;
        match response.status().as_u16() {
            200 => limited_ok += 1,
            429 => {
                limited_429 += 1;
                break;
            }
            other => panic!("limited alias answered {other}"),
        }
    }
    assert!(limited_ok >= 1, "the first request was not allowed");
    assert_eq!(limited_429, 1, "the rate limit never refused a request");

    // An upstream that answers 500.
    let response = common::post_json(
        &http,
        url.clone(),
        CLIENT_KEY,
        r#"{"model":"broken","messages":[]}"#,
    )
    .await;
    assert!(
        response.status().is_server_error(),
        "broken upstream gave {}",
        response.status()
    );
    assert_eq!(broken.requests().len(), 1);

    // Refused before routing: no key, a wrong key, an unknown model.
    let response = http
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"model":"chat","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = common::post_json(
        &http,
        url.clone(),
        WRONG_KEY,
        r#"{"model":"chat","messages":[]}"#,
    )
    .await;
    assert_eq!(response.status(), 401);
    let response = common::post_json(
        &http,
        url.clone(),
        CLIENT_KEY,
        &format!(r#"{{"model":"{UNKNOWN_MODEL}","messages":[]}}"#),
    )
    .await;
    assert_eq!(response.status(), 404);

    let limited_ok = f64::from(limited_ok);
    // Requests that reached an upstream (and got an answer from it).
    let routed = 2.0 + limited_ok + 1.0;
    let openai = ("provider", "openai");
    // A stream's first-byte time and tokens are recorded as its body goes out and ends.
    let m = scrape_until(&http, metrics_addr, "stream metrics", |m| {
        m.get(
            "llm_proxy_tokens_total",
            &[("alias", "chat"), openai, ("kind", "completion")],
        ) == Some(12.0)
            && m.get(
                "llm_proxy_time_to_first_token_seconds_count",
                &[("alias", "chat"), openai],
            ) == Some(1.0)
    })
    .await;

    // Requests by alias, provider and exact status.
    let requests = "llm_proxy_requests_total";
    m.assert_type("llm_proxy_requests", "counter");
    assert_eq!(
        m.value(requests, &[("alias", "chat"), openai, ("status", "200")]),
        2.0
    );
    assert_eq!(
        m.value(requests, &[("alias", "limited"), openai, ("status", "200")]),
        limited_ok
    );
    // The refusal by the rate limit happens before an upstream is chosen; whatever provider it
    // is labelled with, it is one 4xx of `limited`.
    assert_eq!(
        m.sum(requests, &[("alias", "limited"), ("status", "429")]),
        1.0
    );
    assert_eq!(
        m.value(requests, &[("alias", "broken"), openai, ("status", "500")]),
        1.0
    );
    // No key, wrong key, unknown model: one bounded series without alias or provider.
    assert_eq!(
        m.value(
            requests,
            &[("alias", ""), ("provider", ""), ("status", "401")]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            requests,
            &[("alias", ""), ("provider", ""), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(m.sum(requests, &[]), routed + 1.0 + 3.0);
    for sample in m.matching(requests, &[]) {
        assert!(
            ["", "chat", "limited", "broken"].contains(&sample.labels["alias"].as_str()),
            "unexpected alias label: {sample:?}"
        );
        // The exact code, never a class such as `4xx` (DESIGN §16).
        let status = &sample.labels["status"];
        assert!(
            status.len() == 3 && status.parse::<u16>().is_ok_and(|s| (100..600).contains(&s)),
            "not an HTTP status code: {sample:?}"
        );
    }
    assert!(
        m.text.contains(
            "# HELP llm_proxy_requests Requests answered, by alias, provider and exact HTTP status code.\n"
        ),
        "help text of llm_proxy_requests"
    );

    // Latencies.
    m.assert_type("llm_proxy_request_duration_seconds", "histogram");
    assert_eq!(
        m.histogram(
            "llm_proxy_request_duration_seconds",
            &[("alias", "chat"), openai]
        ),
        2.0
    );
    assert_eq!(
        m.histogram(
            "llm_proxy_request_duration_seconds",
            &[("alias", "broken"), openai]
        ),
        1.0
    );
    m.assert_type("llm_proxy_upstream_duration_seconds", "histogram");
    assert_eq!(
        m.histogram("llm_proxy_upstream_duration_seconds", &[openai]),
        routed
    );
    m.assert_type("llm_proxy_overhead_seconds", "histogram");
    assert_eq!(m.histogram("llm_proxy_overhead_seconds", &[]), routed);
    m.assert_type("llm_proxy_time_to_first_token_seconds", "histogram");
    assert_eq!(
        m.histogram(
            "llm_proxy_time_to_first_token_seconds",
            &[("alias", "chat"), openai]
        ),
        1.0
    );

    // Tokens: the mock's usage, non-streamed (8 + 9) and streamed (12 + 3).
    m.assert_type("llm_proxy_tokens", "counter");
    let tokens = "llm_proxy_tokens_total";
    assert_eq!(
        m.value(tokens, &[("alias", "chat"), openai, ("kind", "prompt")]),
        20.0
    );
    assert_eq!(
        m.value(tokens, &[("alias", "chat"), openai, ("kind", "completion")]),
        12.0
    );
    assert_eq!(
        m.value(tokens, &[("alias", "limited"), openai, ("kind", "prompt")]),
        8.0 * limited_ok
    );
    assert_eq!(
        m.value(
            tokens,
            &[("alias", "limited"), openai, ("kind", "completion")]
        ),
        9.0 * limited_ok
    );

    // Cost from the model's prices: (20 × 0.15 + 12 × 0.60) / 1e6 USD on `chat`, (8 × 0.15 +
    // 9 × 0.60) / 1e6 per answer on `limited`; the unpriced model has no series.
    m.assert_type("llm_proxy_cost_usd", "counter");
    let cost = "llm_proxy_cost_usd_total";
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    let chat_cost = m.value(cost, &[("alias", "chat"), openai]);
    assert!(close(chat_cost, 10.2e-6), "chat cost {chat_cost}");
    let limited_cost = m.value(cost, &[("alias", "limited"), openai]);
    assert!(
        close(limited_cost, 6.6e-6 * limited_ok),
        "limited cost {limited_cost}"
    );
    assert_eq!(m.get(cost, &[("alias", "broken"), openai]), None);

    // Rate limiting (through Redis) and upstream failures.
    m.assert_type("llm_proxy_ratelimit_decisions", "counter");
    let decisions = "llm_proxy_ratelimit_decisions_total";
    assert_eq!(m.value(decisions, &[("result", "allowed")]), routed);
    assert_eq!(m.value(decisions, &[("result", "limited")]), 1.0);
    assert_eq!(m.get(decisions, &[("result", "unavailable")]), None);
    m.assert_type("llm_proxy_upstream_errors", "counter");
    assert_eq!(
        m.value(
            "llm_proxy_upstream_errors_total",
            &[openai, ("kind", "status_5xx")]
        ),
        1.0
    );
    assert_eq!(m.sum("llm_proxy_upstream_errors_total", &[]), 1.0);
    m.assert_type("llm_proxy_redis_errors", "counter");
    assert_eq!(m.value("llm_proxy_redis_errors_total", &[]), 0.0);
    assert_eq!(m.value("llm_proxy_ratelimit_mode_switches_total", &[]), 0.0);
    assert_eq!(
        m.value("llm_proxy_ratelimit_fallback_decisions_total", &[]),
        0.0
    );
    assert_eq!(m.value("llm_proxy_ratelimit_degraded", &[]), 0.0);
    m.assert_type("llm_proxy_ratelimit_live_data_planes", "gauge");

    // Config state.
    m.assert_type("llm_proxy_config_version", "gauge");
    assert_eq!(
        m.value("llm_proxy_config_version", &[]),
        applied_version as f64
    );
    let age = m.value("llm_proxy_config_age_seconds", &[]);
    assert!(
        age > 0.0 && age < PATIENCE.as_secs_f64() * 2.0,
        "config age {age}"
    );
    assert_eq!(m.value("llm_proxy_control_plane_connected", &[]), 1.0);
    m.assert_type("llm_proxy_snapshot_apply_seconds", "histogram");
    assert!(m.value("llm_proxy_snapshot_apply_seconds_count", &[]) >= 1.0);
    assert!(m.value("llm_proxy_snapshot_bytes", &[]) > 0.0);

    // No secret and no client-chosen text in any series.
    m.assert_absent(CLIENT_KEY, "the virtual key");
    m.assert_absent(WRONG_KEY, "a presented wrong key");
    m.assert_absent(OPENAI_KEY, "a provider credential");
    m.assert_absent(BROKEN_KEY, "a provider credential");
    m.assert_absent(UNKNOWN_MODEL, "a client-chosen model name");

    // The in-process rendering is the same exposition.
    let rendered = Scrape::parse(dp.render_metrics());
    assert_eq!(
        rendered.value(decisions, &[("result", "limited")]),
        m.value(decisions, &[("result", "limited")])
    );

    dp.shutdown(Duration::from_secs(5)).await;
    cp.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Control plane

/// A gRPC call by hand (HTTP/2, an empty message) to a method no service implements; returns
/// its `grpc-status`.
async fn call_unimplemented(h2: &reqwest::Client, grpc: SocketAddr, path: &str) -> String {
    let response = h2
        .post(format!("http://{grpc}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_metrics_show_rpcs_subscribers_and_pool() {
    let dir = tempfile::tempdir().unwrap();
    let master_key = llm_proxy_control_plane::crypto::MasterKeys::generate_encoded();
    let mut settings =
        common::control_plane_settings(dir.path(), "127.0.0.1:0".parse().unwrap(), &master_key);
    settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let cp = cp_server::start(settings).await.unwrap();
    let metrics_addr = cp.metrics_addr.expect("metrics listener not started");
    let dp = common::start_data_plane(&cp, "dp-cp-metrics", None).await;

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", cp.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = AdminServiceClient::new(channel);
    let created = admin
        .create_connection(CreateConnectionRequest {
            name: "OpenAI-Metrics".into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com".into(),
            credential: OPENAI_KEY.into(),
            options: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let list = admin
            .list_connections(ListConnectionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.connections.len(), 1);
    }
    let missing = admin
        .get_connection(GetRequest {
            id: "conn-doesnotexist0000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let invalid = admin
        .create_connection(CreateConnectionRequest {
            name: "Bad-Provider".into(),
            provider: "no-such-provider".into(),
            endpoint: "https://example.com".into(),
            credential: BROKEN_KEY.into(),
            options: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");

    // Methods no service implements, under a known service and an unknown one.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for path in [
        "/llmproxy.v1.AdminService/DropEverythingQz7",
        "/llmproxy.v1.NoSuchServiceQz7/Steal",
    ] {
        assert_eq!(call_unimplemented(&h2, cp.grpc_addr, path).await, "12");
    }

    // The data plane holds the latest version: subscribed, and reporting its status.
    common::wait_applied(&cp, &dp).await;
    let version = cp.store.current_version().await.unwrap().1;
    let http = reqwest::Client::new();
    let m = scrape_until(&http, metrics_addr, "subscriber and its calls", |m| {
        m.get("llm_proxy_cp_subscribers", &[]) == Some(1.0)
            && m.get("llm_proxy_cp_config_version", &[]) == Some(version as f64)
            && m.sum(
                "llm_proxy_cp_rpc_total",
                &[("method", "ReportStatus"), ("code", "OK")],
            ) >= 1.0
    })
    .await;

    let rpc = "llm_proxy_cp_rpc_total";
    m.assert_type("llm_proxy_cp_rpc", "counter");
    assert_eq!(
        m.value(rpc, &[("method", "CreateConnection"), ("code", "OK")]),
        1.0
    );
    assert_eq!(
        m.value(
            rpc,
            &[("method", "CreateConnection"), ("code", "INVALID_ARGUMENT")]
        ),
        1.0
    );
    assert_eq!(
        m.value(rpc, &[("method", "ListConnections"), ("code", "OK")]),
        2.0
    );
    assert_eq!(
        m.value(rpc, &[("method", "GetConnection"), ("code", "NOT_FOUND")]),
        1.0
    );
    assert_eq!(
        m.get(rpc, &[("method", "GetConnection"), ("code", "OK")]),
        None
    );
    assert!(m.value(rpc, &[("method", "Subscribe"), ("code", "OK")]) >= 1.0);
    // Both invented methods share the one `unknown` label.
    assert_eq!(
        m.value(rpc, &[("method", "unknown"), ("code", "UNIMPLEMENTED")]),
        2.0
    );
    m.assert_absent("Qz7", "a client-invented gRPC method");
    m.assert_absent("DropEverything", "a client-invented gRPC method");

    m.assert_type("llm_proxy_cp_rpc_duration_seconds", "histogram");
    let durations = "llm_proxy_cp_rpc_duration_seconds";
    assert_eq!(
        m.histogram(durations, &[("method", "CreateConnection")]),
        2.0
    );
    assert_eq!(
        m.histogram(durations, &[("method", "ListConnections")]),
        2.0
    );
    assert_eq!(m.histogram(durations, &[("method", "GetConnection")]), 1.0);
    assert_eq!(m.histogram(durations, &[("method", "unknown")]), 2.0);
    // Every counted call has its latency observed (a call finishing during the scrape may show
    // in the latencies only: they are written first and read last).
    assert!(
        m.sum(rpc, &[]) <= m.sum(&format!("{durations}_count"), &[]),
        "calls counted without a latency observation"
    );

    m.assert_type("llm_proxy_cp_subscribers", "gauge");
    assert_eq!(m.value("llm_proxy_cp_subscribers", &[]), 1.0);
    m.assert_type("llm_proxy_cp_db_pool_connections", "gauge");
    let idle = m.value("llm_proxy_cp_db_pool_connections", &[("state", "idle")]);
    let in_use = m.value("llm_proxy_cp_db_pool_connections", &[("state", "in_use")]);
    assert!(idle >= 0.0 && in_use >= 0.0);
    assert!(
        idle + in_use >= 1.0,
        "the pool served queries but holds no connection"
    );
    assert!(
        idle + in_use <= 16.0,
        "more connections than the pool's maximum"
    );

    m.assert_absent(OPENAI_KEY, "a provider credential");
    m.assert_absent(BROKEN_KEY, "a provider credential");
    m.assert_absent(&created.id, "a resource id");

    dp.shutdown(Duration::from_secs(5)).await;
    cp.shutdown().await;
}
