//! The data plane end to end against mock OpenAI and Azure upstreams that record exactly what
//! they receive (path, query, headers, body) and answer with faithful bodies and SSE streams.
//! Config comes from a real control plane (SQLite) through the real config stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

mod common;

use axum::http::StatusCode;
use common::{PATIENCE, Recorded, control_plane_settings};
use llm_proxy_control_plane::server::{self as cp_server, RunningControlPlane, ServerSettings};
use llm_proxy_control_plane::store::{
    NewAssignment, NewConnection, NewModel, NewVirtualKey, VirtualKeyPatch,
};
use llm_proxy_data_plane::gateway::RunningGateway;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::openai::{AZURE_KEY, OPENAI_KEY};
use secrecy::SecretString;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

const CLIENT_KEY: &str = "vk-front-1234";

struct Fixture {
    mock: MockUpstream,
    cp: RunningControlPlane,
    cp_settings: fn(&Fixture) -> ServerSettings,
    master_key: SecretString,
    dp: RunningGateway,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn wait_applied(&self) {
        common::wait_applied(&self.cp, &self.dp).await;
    }

    fn last(&self) -> Recorded {
        self.mock.last().expect("the mock saw no request")
    }

    async fn post(&self, path: &str, key: &str, body: &str) -> reqwest::Response {
        common::post_json(&self.http, format!("{}{path}", self.base), key, body).await
    }
}

async fn fixture() -> Fixture {
    fixture_with(None).await
}

async fn fixture_with(redis_url: Option<SecretString>) -> Fixture {
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, master_key) = common::start_control_plane(dir.path()).await;
    let store = &cp.store;
    let endpoint = mock.base.clone();
    store
        .create_connection(NewConnection {
            name: "OpenAI-Main".into(),
            provider: "openai".into(),
            endpoint: endpoint.clone(),
            credential: SecretString::from(OPENAI_KEY),
            options: BTreeMap::from([("timeout_s".to_owned(), "2".to_owned())]),
        })
        .await
        .unwrap();
    store
        .create_connection(NewConnection {
            name: "Azure-East".into(),
            provider: "azure".into(),
            endpoint: endpoint.clone(),
            credential: SecretString::from(AZURE_KEY),
            options: BTreeMap::new(),
        })
        .await
        .unwrap();
    for (conn, name, remote, deployment) in [
        ("OpenAI-Main", "gpt-4-turbo", "gpt-4-turbo-preview", None),
        (
            "OpenAI-Main",
            "text-embedding-3-small",
            "text-embedding-3-small",
            None,
        ),
        ("Azure-East", "gpt-4o", "gpt-4o", Some("gpt4o-prod")),
        ("Azure-East", "gpt-missing", "gpt-4o", Some("missing")),
    ] {
        store
            .create_model(NewModel {
                connection: conn.into(),
                name: name.into(),
                remote: remote.into(),
                deployment: deployment.map(Into::into),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    store
        .create_vkey(NewVirtualKey {
            name: "Frontend-App".into(),
            key: Some(SecretString::from(CLIENT_KEY)),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap();
    for (model, alias, tps) in [
        ("gpt-4-turbo", "gpt-4", None),
        ("text-embedding-3-small", "embed", None),
        ("gpt-4o", "azure-4o", None),
        ("gpt-missing", "azure-missing", None),
        ("gpt-4-turbo", "limited", Some(1)),
    ] {
        store
            .create_assignment(NewAssignment {
                vkey: "Frontend-App".into(),
                model: model.into(),
                alias: Some(alias.into()),
                tps,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let dp = common::start_data_plane(&cp, "dp-test", redis_url).await;
    let fixture = Fixture {
        mock,
        cp_settings: |f| control_plane_settings(f._dir.path(), f.cp.grpc_addr, &f.master_key),
        master_key,
        base: format!("http://{}", dp.addr),
        cp,
        dp,
        http: reqwest::Client::new(),
        _dir: dir,
    };
    fixture.wait_applied().await;
    fixture
}

fn assert_no_client_key(recorded: &Recorded) {
    common::assert_key_not_forwarded(recorded, CLIENT_KEY);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_chat_is_forwarded_byte_for_byte_with_the_remote_model() {
    let f = fixture().await;
    let body = r#"{"model":"gpt-4","messages":[{"role":"user","content":"Say hi \u00e9"}],"temperature":0.70,"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#;
    let response = f.post("/v1/chat/completions", CLIENT_KEY, body).await;
    assert_eq!(response.status(), 200);
    // The upstream's id is passed on as x-upstream-request-id; x-request-id is the gateway's own.
    assert_eq!(response.headers()["x-upstream-request-id"], "req_abc");
    let request_id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(request_id.len(), 32, "{request_id}");
    assert!(request_id.bytes().all(|b| b.is_ascii_hexdigit()));
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "Hello!");
    assert_eq!(answer["usage"]["total_tokens"], 17);

    let seen = f.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.query, None);
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {OPENAI_KEY}").as_str()
    );
    assert_no_client_key(&seen);
    assert_eq!(
        std::str::from_utf8(&seen.body).unwrap(),
        body.replace(r#""model":"gpt-4""#, r#""model":"gpt-4-turbo-preview""#)
    );
    // Without /v1 (the SDK with base_url lacking /v1) the same route serves.
    let response = f
        .post(
            "/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_stream_asks_for_usage_and_strips_it_unless_the_client_asked() {
    let f = fixture().await;
    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = response.text().await.unwrap();
    let seen: Value = serde_json::from_slice(&f.last().body).unwrap();
    assert_eq!(
        seen["stream_options"]["include_usage"], true,
        "the gateway asks upstream for usage"
    );
    assert!(text.contains(r#""content":"Hi""#) && text.contains(r#""content":" there""#));
    assert!(
        !text.contains("total_tokens"),
        "usage chunk stripped: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));

    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        )
        .await;
    let text = response.text().await.unwrap();
    assert!(
        text.contains(r#""total_tokens":15"#),
        "usage chunk kept: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_token_kind_openai_and_azure_report_reaches_the_metrics() {
    let f = fixture().await;
    // `usage-P-C-K-R`: the mock reports P prompt tokens (K cached), C completion (R reasoning).
    let answer: Value = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"usage-1036-100-1024-64"}]}"#,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["usage"]["prompt_tokens_details"]["cached_tokens"],
        1024
    );
    // Streamed: the usage chunk the gateway asked for (and strips, the client did not ask).
    let text = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","stream":true,"messages":[{"role":"user","content":"usage-2000-50-1500-30"}]}"#,
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("cached_tokens"));
    assert_eq!(
        common::token_counts(&f.dp, "gpt-4"),
        common::kinds(&[
            ("prompt", 1036 + 2000),
            ("completion", 100 + 50),
            ("cache_read", 1024 + 1500),
            ("reasoning", 64 + 30),
        ])
    );

    // Azure answers in the same shapes.
    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"azure-4o","messages":[{"role":"user","content":"usage-300-20-256-0"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        common::token_counts(&f.dp, "azure-4o"),
        common::kinds(&[("prompt", 300), ("completion", 20), ("cache_read", 256)])
    );

    // Embeddings have prompt tokens only (a completion series of 0, no parts).
    let response = f
        .post(
            "/v1/embeddings",
            CLIENT_KEY,
            r#"{"model":"embed","input":"hello"}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        common::token_counts(&f.dp, "embed"),
        common::kinds(&[("prompt", 7), ("completion", 0)])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_pass_through_float_and_base64() {
    let f = fixture().await;
    for (format, expected) in [
        ("float", json!([0.25, -0.5, 1.0])),
        ("base64", json!("AACAPgAAAL8AAIA/")),
    ] {
        let body = format!(r#"{{"model":"embed","input":"hello","encoding_format":"{format}"}}"#);
        let response = f.post("/v1/embeddings", CLIENT_KEY, &body).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["data"][0]["embedding"], expected);
        let seen = f.last();
        assert_eq!(seen.path, "/v1/embeddings");
        let sent: Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(sent["model"], "text-embedding-3-small");
        assert_eq!(sent["encoding_format"], format);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_classic_deployment_url_header_and_stream_quirks() {
    let f = fixture().await;
    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"azure-4o","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    let seen = f.last();
    assert_eq!(seen.path, "/openai/deployments/gpt4o-prod/chat/completions");
    assert_eq!(
        seen.query.as_deref(),
        Some("api-version=2024-05-01-preview")
    );
    assert_eq!(seen.headers["api-key"], AZURE_KEY);
    assert!(seen.headers.get("authorization").is_none());
    assert_no_client_key(&seen);

    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"azure-4o","stream":true,"messages":[]}"#,
        )
        .await;
    let text = response.text().await.unwrap();
    assert!(
        !text.contains("prompt_filter_results"),
        "filter-only chunk dropped: {text}"
    );
    for line in text.lines().filter(|l| l.starts_with("data: {")) {
        let chunk: Value = serde_json::from_str(&line[6..]).unwrap();
        assert!(!chunk["choices"].as_array().unwrap().is_empty(), "{line}");
    }

    // Azure-style inbound route: alias from the path, key in `api-key`, client's api-version used.
    let response = f
        .http
        .post(format!(
            "{}/openai/deployments/azure-4o/chat/completions?api-version=2024-10-21",
            f.base
        ))
        .header("api-key", CLIENT_KEY)
        .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(f.last().query.as_deref(), Some("api-version=2024-10-21"));
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_errors_reach_the_client_openai_shaped() {
    let f = fixture().await;
    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"azure-4o","messages":[{"role":"user","content":"BLOCKME"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "content_filter");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("content management policy")
    );

    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"azure-missing","messages":[]}"#,
        )
        .await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "DeploymentNotFound");

    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"azure-4o","messages":[{"role":"user","content":"RATELIMITME"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(response.headers()["retry-after-ms"], "6500");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry after 7 seconds")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_routing_and_bad_input_errors() {
    let f = fixture().await;
    let response = f
        .post(
            "/v1/chat/completions",
            "vk-wrong-key",
            r#"{"model":"gpt-4","messages":[]}"#,
        )
        .await;
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");

    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-5","messages":[]}"#,
        )
        .await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":["#,
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let big = format!(
        r#"{{"model":"gpt-4","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(70 * 1024)
    );
    let response = f.post("/v1/chat/completions", CLIENT_KEY, &big).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("65536"));

    let models = f
        .http
        .get(format!("{}/v1/models", f.base))
        .bearer_auth(CLIENT_KEY)
        .header("x-request-id", "req-models-1")
        .send()
        .await
        .unwrap();
    // Every answer carries x-request-id, not only the proxied ones.
    assert_eq!(models.headers()["x-request-id"], "req-models-1");
    let models: Value = models.json().await.unwrap();
    let unknown = f
        .http
        .get(format!("{}/v1/nope", f.base))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.headers()["x-request-id"].len(), 32);
    let wrong_method = f
        .http
        .get(format!("{}/v1/chat/completions", f.base))
        .header("x-request-id", "req-get-1")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["x-request-id"], "req-get-1");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["azure-4o", "azure-missing", "embed", "gpt-4", "limited"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tps_gets_429_with_retry_headers() {
    let f = fixture().await;
    let first = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"limited","messages":[]}"#,
        )
        .await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "1");
    let second = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"limited","messages":[]}"#,
        )
        .await;
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after"));
    assert!(second.headers().contains_key("retry-after-ms"));
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn disabling_a_key_or_deleting_an_assignment_applies_without_restart() {
    let f = fixture().await;
    let ok = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[]}"#,
        )
        .await;
    assert_eq!(ok.status(), 200);
    let asg =
        f.cp.store
            .list_assignments(Some("Frontend-App"), None)
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.alias == "embed")
            .unwrap();
    f.cp.store.delete_assignment(&asg.id).await.unwrap();
    f.wait_applied().await;
    let gone = f
        .post(
            "/v1/embeddings",
            CLIENT_KEY,
            r#"{"model":"embed","input":"x"}"#,
        )
        .await;
    assert_eq!(gone.status(), 404);

    f.cp.store
        .update_vkey(
            "Frontend-App",
            VirtualKeyPatch {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    f.wait_applied().await;
    let refused = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[]}"#,
        )
        .await;
    assert_eq!(refused.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_mid_stream_closes_the_upstream_connection() {
    let f = fixture().await;
    let dropped = f.mock.state.clone();
    let mut response = f
        .post("/v1/chat/completions", CLIENT_KEY, r#"{"model":"gpt-4","stream":true,"messages":[{"role":"user","content":"SLOWSTREAM"}]}"#)
        .await;
    assert_eq!(response.status(), 200);
    let first = tokio::time::timeout(PATIENCE, response.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.starts_with(b"data: "));
    drop(response);
    tokio::time::timeout(PATIENCE, dropped.stream_dropped.notified())
        .await
        .expect("the upstream stream was not closed after the client left");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upstream_gives_504_after_the_connection_timeout() {
    let f = fixture().await;
    // The OpenAI connection has timeout_s=2; the mock never answers this one.
    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"SLOWHEAD"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_whose_body_stalls_gives_504_at_the_connection_timeout() {
    let f = fixture().await;
    // timeout_s=2 bounds the head and the whole body: the mock sends a 200 head, the start of
    // the body, then nothing.
    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"SLOWBODY"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_redirect_is_not_followed() {
    let f = fixture().await;
    // A redirect would carry the connection's credential wherever it points.
    let response = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"REDIRECTME"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert_eq!(f.mock.requests().len(), 1, "the redirect was followed");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_plane_serves_while_the_control_plane_is_down_and_reconnects() {
    let mut f = fixture().await;
    let settings = (f.cp_settings)(&f);
    // Stop the control plane: the data plane keeps its last snapshot. (`placeholder` only fills
    // the fixture's field; it listens elsewhere and the data plane never dials it.)
    let placeholder = cp_server::start(control_plane_settings(
        f._dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        &f.master_key,
    ))
    .await
    .unwrap();
    let old = std::mem::replace(&mut f.cp, placeholder);
    old.shutdown().await;
    tokio::time::timeout(PATIENCE, f.dp.config.wait_connected(false))
        .await
        .expect("the data plane did not notice the control plane going away");
    let served = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[]}"#,
        )
        .await;
    assert_eq!(served.status(), 200, "serving from the last snapshot");

    // Restart on the same address and database: the data plane reconnects and gets new writes.
    let replaced = std::mem::replace(&mut f.cp, cp_server::start(settings).await.unwrap());
    replaced.shutdown().await;
    tokio::time::timeout(PATIENCE, f.dp.config.wait_connected(true))
        .await
        .expect("the data plane did not reconnect");
    f.cp.store
        .update_vkey(
            "Frontend-App",
            VirtualKeyPatch {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    f.wait_applied().await;
    let refused = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"gpt-4","messages":[]}"#,
        )
        .await;
    assert_eq!(refused.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_in_flight_requests() {
    let f = fixture().await;
    let mock = f.mock.state.clone();
    let (http, url) = (f.http.clone(), format!("{}/v1/chat/completions", f.base));
    let in_flight = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(CLIENT_KEY)
            .body(r#"{"model":"gpt-4","messages":[{"role":"user","content":"HOLDME"}]}"#)
            .send()
            .await
    });
    tokio::time::timeout(PATIENCE, mock.held.notified())
        .await
        .expect("request never reached the mock");
    let Fixture { dp, cp, .. } = f;
    let addr = dp.addr;
    dp.begin_shutdown();
    let draining = tokio::spawn(dp.shutdown(PATIENCE));
    // Wait until the listener is closed, so the request below completes during the drain.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the data plane kept accepting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mock.release.notify_one();
    let response = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the in-flight request finished during the drain"
    );
    tokio::time::timeout(PATIENCE, draining)
        .await
        .unwrap()
        .unwrap();
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_the_limit_lives_in_shared_buckets() {
    let redis_url =
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let f = fixture_with(Some(SecretString::from(redis_url.clone()))).await;
    let asg =
        f.cp.store
            .list_assignments(Some("Frontend-App"), None)
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.alias == "limited")
            .unwrap();
    let first = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"limited","messages":[]}"#,
        )
        .await;
    assert_eq!(first.status(), 200);
    let second = f
        .post(
            "/v1/chat/completions",
            CLIENT_KEY,
            r#"{"model":"limited","messages":[]}"#,
        )
        .await;
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after-ms"));
    // The bucket is in Redis, under the assignment's hash-tagged key.
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("llmproxy:{{{}}}:rps", asg.id);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(exists, "{key} missing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_goes_upstream_continuing_the_clients_trace_or_a_new_one() {
    let f = fixture().await;
    let body = r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#;
    let client_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = f
        .http
        .post(format!("{}/v1/chat/completions", f.base))
        .bearer_auth(CLIENT_KEY)
        .header("content-type", "application/json")
        .header("traceparent", client_parent)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = f.last().headers["traceparent"].to_str().unwrap().to_owned();
    let fields: Vec<&str> = sent.split('-').collect();
    assert_eq!(fields.len(), 4, "{sent}");
    assert_eq!(fields[0], "00");
    assert_eq!(fields[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert_ne!(
        fields[2], "00f067aa0ba902b7",
        "the gateway's call has its own parent id"
    );
    assert_eq!(fields[3], "01");

    // No (or a malformed) traceparent from the client: a new, valid one.
    for extra in [None, Some("garbage")] {
        let mut request = f
            .http
            .post(format!("{}/v1/chat/completions", f.base))
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(body);
        if let Some(value) = extra {
            request = request.header("traceparent", value);
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
        let sent = f.last().headers["traceparent"].to_str().unwrap().to_owned();
        let fields: Vec<&str> = sent.split('-').collect();
        assert_eq!(fields.len(), 4, "{sent}");
        assert_eq!(
            (fields[0], fields[1].len(), fields[2].len()),
            ("00", 32, 16),
            "{sent}"
        );
        assert_ne!(fields[1], "0".repeat(32));
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream garbage (DESIGN §19): each is answered within seconds with a 502 or a final error
// event, the gateway buffers no more than its caps, and the next request is served.

/// Bound on each garbage answer: they take milliseconds; seconds would mean a stall.
const WITHIN_SECONDS: Duration = Duration::from_secs(10);

/// Bytes the mock may hand out for an answer the gateway refuses early: the gateway's cap
/// (1 MiB in tests) plus what the two sockets' buffers hold, far below the 50 and 200 MB offered.
const MIB: usize = 1024 * 1024;
const PRODUCED_BOUND: usize = 32 * MIB;

fn chat(content: &str, stream: bool) -> String {
    json!({"model": "gpt-4", "stream": stream, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

impl Fixture {
    /// Posts a chat request and reads the whole answer within [`WITHIN_SECONDS`].
    async fn garbage(&self, content: &str, stream: bool) -> (StatusCode, String) {
        tokio::time::timeout(WITHIN_SECONDS, async {
            let response = self
                .post("/v1/chat/completions", CLIENT_KEY, &chat(content, stream))
                .await;
            let status = response.status();
            (status, response.text().await.unwrap())
        })
        .await
        .unwrap_or_else(|_| panic!("no whole answer to {content} within {WITHIN_SECONDS:?}"))
    }

    /// A plain request right after is served as usual.
    async fn assert_next_request_served(&self) {
        let (status, body) = self.garbage("hello", false).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "Hello!");
    }
}

/// The `error` object of a 502 answer with code `upstream_invalid_response`.
fn assert_invalid_response(status: StatusCode, body: &str) -> Value {
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "upstream_invalid_response", "{body}");
    body["error"].clone()
}

/// The `error` object of a stream's final event (no `[DONE]` before it).
fn final_error_event(text: &str) -> Value {
    let events = common::sse_data(text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_invalid_response", "{text}");
    last["error"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_2xx_answer_that_is_not_json_is_a_502() {
    let f = fixture().await;
    let (status, body) = f.garbage("NOTJSON", false).await;
    let error = assert_invalid_response(status, &body);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not a JSON object"),
        "{error}"
    );
    assert!(
        !body.contains("<html>"),
        "the answer is not relayed: {body}"
    );
    f.assert_next_request_served().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_ends_without_done_gets_a_final_error_event() {
    let f = fixture().await;
    let (status, text) = f.garbage("TRUNCATEME", true).await;
    assert_eq!(status, 200, "the stream had started");
    assert!(text.contains(r#""content":"Hi""#), "{text}");
    let error = final_error_event(&text);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("terminal event ([DONE])"),
        "{error}"
    );
    f.assert_next_request_served().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_answers_are_refused_without_buffering_them() {
    let f = fixture().await;
    // Declared: refused from the head, the body unread.
    let (status, body) = f.garbage("DECLARE200MB", false).await;
    let error = assert_invalid_response(status, &body);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "declares {} bytes, over the limit of {} bytes (--max-upstream-body-bytes)",
            200 * MIB,
            common::TEST_MAX_UPSTREAM_BODY_BYTES
        )),
        "{message}"
    );
    let produced = f.mock.state.produced.swap(0, Ordering::Relaxed);
    assert!(produced < PRODUCED_BOUND, "the mock sent {produced} bytes");
    f.assert_next_request_served().await;

    // Undeclared: read up to the cap, then refused.
    let (status, body) = f.garbage("UNDECLARED200MB", false).await;
    let error = assert_invalid_response(status, &body);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("exceeds the limit of 1048576 bytes (--max-upstream-body-bytes)"),
        "{error}"
    );
    let produced = f.mock.state.produced.swap(0, Ordering::Relaxed);
    assert!(
        (common::TEST_MAX_UPSTREAM_BODY_BYTES..PRODUCED_BOUND).contains(&produced),
        "the mock sent {produced} bytes"
    );
    f.assert_next_request_served().await;

    // An error answer: only the start of its body is read, for the message.
    let (status, body) = f.garbage("ENDLESSERROR", false).await;
    assert_eq!(status, 500, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("upstream openai answered HTTP 500: the upstream is melting: aaa"),
        "{message}"
    );
    assert!(
        message.len() < 1024,
        "the message is cut: {} bytes",
        message.len()
    );
    let produced = f.mock.state.produced.swap(0, Ordering::Relaxed);
    assert!(produced < PRODUCED_BOUND, "the mock sent {produced} bytes");
    f.assert_next_request_served().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_50_mb_sse_line_ends_the_stream_with_an_error_event() {
    let f = fixture().await;
    let (status, text) = f.garbage("LINE50MB", true).await;
    assert_eq!(status, 200, "an OpenAI stream is relayed from its head");
    let error = final_error_event(&text);
    assert!(
        error["message"].as_str().unwrap().contains(&format!(
            "exceeded the limit of {} bytes (--max-stream-event-bytes)",
            common::TEST_MAX_STREAM_EVENT_BYTES
        )),
        "{error}"
    );
    assert!(
        text.len() < 4096,
        "nothing of the line is relayed: {} bytes",
        text.len()
    );
    let produced = f.mock.state.produced.load(Ordering::Relaxed);
    assert!(produced < PRODUCED_BOUND, "the mock sent {produced} bytes");
    f.assert_next_request_served().await;
}
