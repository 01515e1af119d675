//! The golden fixtures end to end: every Google and Bedrock fixture with a client request is sent
//! through a real data plane (config from a real control plane) to the mock upstream, which
//! answers a request equal to a fixture's upstream request with that fixture's upstream answer
//! (`mock-upstream/src/golden.rs`). What the client gets must equal the fixture's snapshot: the
//! translated answer, the translated stream (with its final error event), or the error. The
//! golden tests (`google_golden.rs`, `bedrock_golden.rs`) check the translators alone; this checks
//! them through the HTTP path, the body parser and the stream relay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod golden_support;

use golden_support::{normalise, sse_events};
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::golden::{self, Golden, GoldenProvider};
use serde_json::{Value, json};
use std::collections::BTreeSet;

const CLIENT_KEY: &str = "vk-golden-0123456789";

/// The alias under which a fixture's model is assigned.
fn alias(provider: GoldenProvider, model: &str) -> String {
    let prefix = match provider {
        GoldenProvider::Google => "google",
        GoldenProvider::Bedrock => "bedrock",
    };
    format!("{prefix}-{model}")
}

/// The fixtures that start with a client request the gateway sends upstream or refuses.
async fn cases(provider: GoldenProvider) -> Vec<&'static Golden> {
    golden::all(provider)
        .await
        .iter()
        .filter(|g| {
            matches!(
                g.case["kind"].as_str(),
                Some("chat" | "stream" | "rejection")
            )
        })
        .collect()
}

/// What the client should get for `golden`, as (status, body or events) with the random parts
/// normalised.
fn expected(golden: &Golden) -> (u16, Value) {
    let case = &golden.case;
    let error = |e: &Value| (e["status"].as_u64().unwrap() as u16, e["body"].clone());
    if let Some(err) = case.get("openai_error") {
        return error(err);
    }
    if case["kind"] == "chat" {
        return (200, case["openai_answer"].clone());
    }
    let mut events: Vec<Value> = case["openai_stream"].as_array().unwrap().clone();
    if let Some(err) = case.get("stream_error") {
        // Before the first chunk an upstream failure is the answer's status; after it, a final
        // error event ends the stream (DESIGN §19).
        if events.is_empty() {
            return error(err);
        }
        events.retain(|e| e != "[DONE]");
        events.push(err["body"].clone());
    }
    (200, Value::Array(events))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fixture_through_the_gateway_matches_its_snapshot() {
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    common::add_connections(
        &cp.store,
        "google",
        &mock.base,
        [(
            "Google",
            llm_proxy_mock_upstream::google::GEMINI_KEY.to_owned(),
            common::options(&[("api", "gemini")]),
        )],
    )
    .await;
    common::add_connections(
        &cp.store,
        "bedrock",
        &mock.base,
        [(
            "Bedrock",
            llm_proxy_mock_upstream::bedrock::API_KEY.to_owned(),
            common::options(&[("region", "us-east-1")]),
        )],
    )
    .await;
    let mut models = BTreeSet::new();
    for (provider, connection) in [
        (GoldenProvider::Google, "Google"),
        (GoldenProvider::Bedrock, "Bedrock"),
    ] {
        for golden in cases(provider).await {
            let model = golden.model(provider).to_owned();
            models.insert((connection, alias(provider, &model), model));
        }
    }
    let models: Vec<(&str, &str, &str)> = models
        .iter()
        .map(|(c, a, m)| (*c, a.as_str(), m.as_str()))
        .collect();
    common::add_models_for_key(&cp.store, "Golden", CLIENT_KEY, &models).await;
    let dp = common::start_data_plane(&cp, "dp-golden", None).await;
    common::wait_applied(&cp, &dp).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", dp.addr);

    let mut checked = 0;
    for provider in [GoldenProvider::Google, GoldenProvider::Bedrock] {
        for golden in cases(provider).await {
            let mut request = golden.case["request"].clone();
            request["model"] = json!(alias(provider, golden.model(provider)));
            let response =
                common::post_json(&http, url.clone(), CLIENT_KEY, &request.to_string()).await;
            let status = response.status().as_u16();
            let streamed = response
                .headers()
                .get("content-type")
                .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
            let text = response.text().await.unwrap();
            let mut got = if streamed {
                Value::Array(sse_events(text.as_bytes()))
            } else {
                serde_json::from_str(&text).unwrap_or_else(|_| json!(text))
            };
            let (want_status, mut want) = expected(golden);
            normalise(&mut got);
            normalise(&mut want);
            let name = format!("{provider:?}/{}", golden.name);
            assert_eq!(status, want_status, "{name}: status; body {text}");
            assert_eq!(
                got, want,
                "{name}: what the client got differs from the snapshot"
            );
            checked += 1;
        }
    }
    // Every chat, stream and rejection fixture of both providers (so that a fixture directory
    // that failed to load cannot pass unnoticed).
    assert!(checked >= 30, "only {checked} fixtures checked");
    let upstream_calls = mock.requests().len();
    assert!(
        upstream_calls > 0 && upstream_calls < checked,
        "{upstream_calls} upstream calls"
    );
}
