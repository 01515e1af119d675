//! The Anthropic Messages route (`/v1/messages`, DESIGN §17) end to end against the mock upstreams
//! of `llm-proxy-mock-upstream`, which record exactly what they receive: passthrough to the
//! Anthropic API, Foundry, Claude on Bedrock (InvokeModel and the Messages endpoint) and on Vertex
//! (body byte for byte except `model`, version and beta headers as sent), Anthropic error shapes,
//! `count_tokens`, the Anthropic models list, usage with cache tokens in the metrics, and the
//! translated pairs (Messages clients on OpenAI models, OpenAI clients on Claude). Config comes
//! from a real control plane (SQLite) through the real config stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Recorded, options};
use llm_proxy_control_plane::server::RunningControlPlane;
use llm_proxy_data_plane::gateway::RunningGateway;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::anthropic::{
    ANTHROPIC_KEY, BEDROCK_VERSION, CACHE_CREATION_TOKENS, CACHE_READ_TOKENS, INPUT_TOKENS,
    OUTPUT_TOKENS, THINKING_SIGNATURE, TOOL_USE_ID, VERTEX_VERSION,
};
use llm_proxy_mock_upstream::google::VERTEX_TOKEN;
use llm_proxy_mock_upstream::openai::OPENAI_KEY;
use serde_json::{Value, json};

const CLIENT_KEY: &str = "vk-claude-code-4411";
/// What Claude Code sends (agent-clients.md).
const BETAS: &str =
    "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27";
const BEDROCK_CLAUDE: &str = "us.anthropic.claude-sonnet-4-5-20250929-v1:0";
const BEDROCK_NEW_CLAUDE: &str = "anthropic.claude-opus-4-7-v1";
const VERTEX_CLAUDE: &str = "claude-sonnet-4-5@20250929";

struct Fixture {
    mock: MockUpstream,
    cp: RunningControlPlane,
    dp: RunningGateway,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    let store = &cp.store;
    common::add_connections(
        store,
        "anthropic",
        &mock.base,
        [("Anthropic", ANTHROPIC_KEY.to_owned(), options(&[]))],
    )
    .await;
    common::add_connections(
        store,
        "anthropic",
        &mock.base,
        [(
            "Anthropic-2026",
            ANTHROPIC_KEY.to_owned(),
            options(&[("anthropic_version", "2026-10-21")]),
        )],
    )
    .await;
    // Nothing listens there: connect errors.
    common::add_connections(
        store,
        "anthropic",
        "http://127.0.0.1:9",
        [("Anthropic-Down", ANTHROPIC_KEY.to_owned(), options(&[]))],
    )
    .await;
    common::add_connections(
        store,
        "anthropic",
        &format!("{}/anthropic", mock.base),
        [(
            "Foundry",
            ANTHROPIC_KEY.to_owned(),
            options(&[("anthropic_version", "2023-06-01")]),
        )],
    )
    .await;
    let bedrock_key = llm_proxy_mock_upstream::bedrock::API_KEY.to_owned();
    common::add_connections(
        store,
        "bedrock",
        &mock.base,
        [
            (
                "Bedrock",
                bedrock_key.clone(),
                options(&[("region", "us-east-1")]),
            ),
            (
                "Bedrock-Messages",
                bedrock_key,
                options(&[("region", "us-east-1"), ("anthropic_api", "messages")]),
            ),
        ],
    )
    .await;
    common::add_connections(
        store,
        "google",
        &mock.base,
        [(
            "Vertex",
            VERTEX_TOKEN.to_owned(),
            options(&[
                ("api", "vertex"),
                ("auth", "bearer"),
                ("project", "llm-proxy-test"),
                ("location", "us-east5"),
            ]),
        )],
    )
    .await;
    common::add_connections(
        store,
        "openai",
        &mock.base,
        [("OpenAI", OPENAI_KEY.to_owned(), options(&[]))],
    )
    .await;
    let models = [
        ("Anthropic", "claude", "claude-sonnet-4-5-20250929"),
        (
            "Anthropic-2026",
            "claude-2026",
            "claude-sonnet-4-5-20250929",
        ),
        (
            "Anthropic-Down",
            "claude-down",
            "claude-sonnet-4-5-20250929",
        ),
        ("Foundry", "foundry-claude", "claude-opus-4-5"),
        ("Bedrock", "bedrock-claude", BEDROCK_CLAUDE),
        ("Bedrock", "bedrock-new-claude", BEDROCK_NEW_CLAUDE),
        (
            "Bedrock-Messages",
            "bedrock-claude-messages",
            BEDROCK_CLAUDE,
        ),
        ("Vertex", "vertex-claude", VERTEX_CLAUDE),
        ("OpenAI", "gpt", "gpt-4o"),
    ];
    common::add_models_for_key(store, "Claude-Code", CLIENT_KEY, &models).await;
    let dp = common::start_data_plane(&cp, "dp-messages-test", None).await;
    let fixture = Fixture {
        mock,
        base: format!("http://{}", dp.addr),
        cp,
        dp,
        http: reqwest::Client::new(),
        _dir: dir,
    };
    common::wait_applied(&fixture.cp, &fixture.dp).await;
    fixture
}

impl Fixture {
    /// POSTs `body` to `/v1/messages?beta=true` as Claude Code does (`x-api-key`,
    /// `anthropic-version: 2023-06-01`, its betas).
    async fn messages(&self, body: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/messages?beta=true", self.base))
            .header("x-api-key", CLIENT_KEY)
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", BETAS)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    fn last(&self) -> Recorded {
        self.mock.last().expect("the mock saw no request")
    }
}

/// A Claude Code-like request for `model`, with odd spacing so that byte-for-byte relaying shows.
fn claude_code_body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model": "{model}",  "max_tokens":32000,"messages":[{{"role":"user","content":[{{"type":"text","text":"say hi","cache_control":{{"type":"ephemeral"}}}}]}}],"system":[{{"type":"text","text":"You are Claude Code.","cache_control":{{"type":"ephemeral"}}}}],"thinking":{{"type":"enabled","budget_tokens":31999,"display":"omitted"}},"context_management":{{"edits":[{{"type":"clear_thinking_20251015","keep":"all"}}]}},"metadata":{{"user_id":"{{\"session\":\"abc\"}}"}},"stream":{stream} }}"#
    )
}

fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            let mut name = String::new();
            let mut data = String::new();
            for line in event.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    name = rest.to_owned();
                } else if let Some(rest) = line.strip_prefix("data: ") {
                    data.push_str(rest);
                }
            }
            (name, serde_json::from_str(&data).unwrap_or(Value::Null))
        })
        .collect()
}

/// The token counts of `n` answers of the mock's Claude to a request with `cache_control`:
/// the cache tokens are parts of the prompt; thinking has no count of its own.
fn cached_counts(n: u64) -> std::collections::BTreeMap<String, u64> {
    common::kinds(&[
        (
            "prompt",
            n * (INPUT_TOKENS + CACHE_CREATION_TOKENS + CACHE_READ_TOKENS),
        ),
        ("completion", n * OUTPUT_TOKENS),
        ("cache_read", n * CACHE_READ_TOKENS),
        ("cache_write", n * CACHE_CREATION_TOKENS),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_passthrough_keeps_the_body_and_headers() {
    let f = fixture().await;
    let sent = claude_code_body("claude", false);
    let response = f.messages(&sent).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["content"][0]["type"], "thinking");
    assert_eq!(answer["content"][0]["signature"], THINKING_SIGNATURE);

    let upstream = f.last();
    assert_eq!(upstream.path, "/v1/messages");
    let expected = sent.replace(
        r#""model": "claude""#,
        r#""model":"claude-sonnet-4-5-20250929""#,
    );
    assert_eq!(String::from_utf8_lossy(&upstream.body), expected);
    assert_eq!(upstream.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(upstream.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(upstream.header("anthropic-beta"), Some(BETAS));
    common::assert_key_not_forwarded(&upstream, CLIENT_KEY);

    // Usage counts the cache tokens as prompt tokens, and each kind apart.
    assert_eq!(common::token_counts(&f.dp, "claude"), cached_counts(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foundry_takes_the_connection_version_when_the_client_sends_none() {
    let f = fixture().await;
    let response = f
        .http
        .post(format!("{}/v1/messages", f.base))
        .bearer_auth(CLIENT_KEY)
        .header("content-type", "application/json")
        .body(r#"{"model":"foundry-claude","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let upstream = f.last();
    assert_eq!(upstream.path, "/anthropic/v1/messages");
    assert_eq!(upstream.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(upstream.header("anthropic-beta"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_streams_are_relayed_and_counted() {
    let f = fixture().await;
    let response = f.messages(&claude_code_body("claude", true)).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = response.text().await.unwrap();
    let names: Vec<String> = sse_events(&text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(names.iter().any(|n| n == "content_block_delta"));
    // message_start's input and cache counts with message_delta's output count.
    assert_eq!(common::token_counts(&f.dp, "claude"), cached_counts(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_invoke_gets_the_version_and_betas_in_the_body() {
    let f = fixture().await;
    let sent = claude_code_body("bedrock-claude", false);
    let response = f.messages(&sent).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let upstream = f.last();
    assert_eq!(
        upstream.path,
        "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    );
    let betas = serde_json::to_string(&BETAS.split(',').collect::<Vec<_>>()).unwrap();
    let expected = sent
        .replace(
            r#""model": "bedrock-claude""#,
            &format!(r#""anthropic_version":"{BEDROCK_VERSION}","anthropic_beta":{betas}"#),
        )
        .replace(r#","stream":false "#, " ");
    assert_eq!(String::from_utf8_lossy(&upstream.body), expected);

    // Streamed: event-stream frames in, Anthropic SSE out.
    let response = f.messages(&claude_code_body("bedrock-claude", true)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.first().unwrap().0, "message_start");
    assert_eq!(events.last().unwrap().0, "message_stop");
    assert!(f.last().path.ends_with("/invoke-with-response-stream"));
    assert!(!String::from_utf8_lossy(&f.last().body).contains("\"stream\""));
    // Claude on Bedrock reports Anthropic's usage, answers and streams alike.
    assert_eq!(
        common::token_counts(&f.dp, "bedrock-claude"),
        cached_counts(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_bedrock_claude_and_the_option_use_the_messages_endpoint() {
    let f = fixture().await;
    for alias in ["bedrock-new-claude", "bedrock-claude-messages"] {
        let response = f.messages(&claude_code_body(alias, false)).await;
        assert_eq!(
            response.status(),
            200,
            "{alias}: {}",
            response.text().await.unwrap()
        );
        let upstream = f.last();
        assert_eq!(upstream.path, "/anthropic/v1/messages", "{alias}");
        assert_eq!(upstream.header("anthropic-beta"), Some(BETAS));
        let body: Value = upstream.json();
        assert!(body["model"].as_str().unwrap().contains("anthropic.claude"));
        assert_eq!(
            common::token_counts(&f.dp, alias),
            cached_counts(1),
            "{alias}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_claude_uses_raw_predict() {
    let f = fixture().await;
    let sent = claude_code_body("vertex-claude", true);
    let response = f.messages(&sent).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(sse_events(&text).last().unwrap().0, "message_stop");
    let upstream = f.last();
    assert_eq!(
        upstream.path,
        "/v1/projects/llm-proxy-test/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict"
    );
    let expected = sent.replace(
        r#""model": "vertex-claude""#,
        &format!(r#""anthropic_version":"{VERTEX_VERSION}""#),
    );
    assert_eq!(String::from_utf8_lossy(&upstream.body), expected);
    assert_eq!(
        common::token_counts(&f.dp, "vertex-claude"),
        cached_counts(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_in_anthropic_shape() {
    let f = fixture().await;
    let error_of = |value: &Value| (value["type"].clone(), value["error"]["type"].clone());

    let response = f
        .http
        .post(format!("{}/v1/messages", f.base))
        .header("x-api-key", "vk-wrong")
        .body(claude_code_body("claude", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        error_of(&body),
        (json!("error"), json!("authentication_error"))
    );

    let response = f.messages(&claude_code_body("no-such-alias", false)).await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_of(&body), (json!("error"), json!("not_found_error")));

    let overloaded = claude_code_body("claude", false).replace("say hi", "OVERLOADME");
    let response = f.messages(&overloaded).await;
    assert_eq!(response.status(), 529);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_of(&body), (json!("error"), json!("overloaded_error")));

    let limited = claude_code_body("claude", false).replace("say hi", "RATELIMITME");
    let response = f.messages(&limited).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_of(&body), (json!("error"), json!("rate_limit_error")));

    let broken = claude_code_body("claude", true).replace("say hi", "MIDSTREAMERROR");
    let response = f.messages(&broken).await;
    assert_eq!(response.status(), 200);
    let events = sse_events(&response.text().await.unwrap());
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["error"]["type"], "overloaded_error");

    let truncated = claude_code_body("claude", true).replace("say hi", "TRUNCATEME");
    let response = f.messages(&truncated).await;
    let events = sse_events(&response.text().await.unwrap());
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["type"], "error");
    assert!(
        data["error"]["message"]
            .as_str()
            .unwrap()
            .contains("message_stop")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_is_forwarded_or_estimated() {
    let f = fixture().await;
    let body =
        r#"{"model":"claude","messages":[{"role":"user","content":"how many tokens is this?"}]}"#;
    let count = |body: String| {
        f.http
            .post(format!("{}/v1/messages/count_tokens?beta=true", f.base))
            .header("x-api-key", CLIENT_KEY)
            .header("anthropic-version", "2023-06-01")
            .body(body)
            .send()
    };
    let response = count(body.to_owned()).await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(f.last().path, "/v1/messages/count_tokens");
    f.mock.state.clear();

    // An OpenAI model has no count_tokens: estimated locally, nothing sent upstream.
    let response = count(body.replace("\"claude\"", "\"gpt\"")).await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["input_tokens"].as_u64().unwrap() > 0);
    assert!(f.mock.requests().is_empty());

    // An `anthropic` upstream that cannot be reached: estimated locally too.
    let response = count(body.replace("\"claude\"", "\"claude-down\""))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["input_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_come_in_anthropic_shape_when_asked_so() {
    let f = fixture().await;
    let list: Value = f
        .http
        .get(format!("{}/v1/models", f.base))
        .header("x-api-key", CLIENT_KEY)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["has_more"], false);
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["type"] == "model" && m["id"] == "claude")
    );
    let list: Value = f
        .http
        .get(format!("{}/v1/models", f.base))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_clients_reach_openai_models_through_translation() {
    let f = fixture().await;
    let body = r#"{"model":"gpt","max_tokens":256,"messages":[{"role":"user","content":"what is the weather in Paris?"}],"tools":[{"name":"get_weather","description":"weather","input_schema":{"type":"object","properties":{"location":{"type":"string"}}}}],"thinking":{"type":"enabled","budget_tokens":1024},"context_management":{"edits":[]}}"#;
    let response = f.messages(body).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["stop_reason"], "tool_use");
    let upstream: Value = f.last().json();
    assert_eq!(f.last().path, "/v1/chat/completions");
    assert_eq!(upstream["model"], "gpt-4o");
    assert_eq!(upstream["tools"][0]["function"]["name"], "get_weather");
    // gpt-4o is not a reasoning model: `max_tokens`, which every API version takes.
    assert_eq!(upstream["max_tokens"], 256);
    assert!(upstream.get("max_completion_tokens").is_none());
    // gpt-4o takes no reasoning_effort: the thinking request is dropped for it.
    assert!(upstream.get("reasoning_effort").is_none());
    assert!(upstream.get("context_management").is_none());

    // Streamed: the tool call's arguments arrive complete as input_json_delta.
    let streamed = body.replacen("{\"model\"", "{\"stream\":true,\"model\"", 1);
    let text = f.messages(&streamed).await.text().await.unwrap();
    let events = sse_events(&text);
    let json: String = events
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_owned())
        .collect();
    let input: Value = serde_json::from_str(&json).unwrap();
    assert!(input.is_object());
    let stop = events
        .iter()
        .find(|(n, _)| n == "message_delta")
        .map(|(_, d)| d["delta"]["stop_reason"].clone());
    assert_eq!(stop, Some(json!("tool_use")));
    assert_eq!(events[0].1["message"]["model"], "gpt-4o");
    assert_eq!(events.last().unwrap().0, "message_stop");
    // The mock's defaults: 8 + 9 answered, 12 + 3 streamed.
    assert_eq!(
        common::token_counts(&f.dp, "gpt"),
        common::kinds(&[("prompt", 8 + 12), ("completion", 9 + 3)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_and_reasoning_tokens_of_openai_models_reach_messages_clients_and_the_metrics() {
    let f = fixture().await;
    // `usage-P-C-K-R`: the mock reports P prompt tokens (K cached), C completion (R reasoning).
    let body = r#"{"model":"gpt","max_tokens":256,"messages":[{"role":"user","content":"usage-1036-100-1024-64"}]}"#;
    let response = f.messages(body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    // Anthropic's split: input_tokens without the cached ones.
    assert_eq!(
        answer["usage"],
        json!({"input_tokens": 12, "output_tokens": 100, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 1024})
    );
    let streamed = body.replacen("{\"model\"", "{\"stream\":true,\"model\"", 1);
    let text = f.messages(&streamed).await.text().await.unwrap();
    assert_eq!(sse_events(&text).last().unwrap().0, "message_stop");
    assert_eq!(
        common::token_counts(&f.dp, "gpt"),
        common::kinds(&[
            ("prompt", 2 * 1036),
            ("completion", 2 * 100),
            ("cache_read", 2 * 1024),
            ("reasoning", 2 * 64),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_clients_reach_claude_through_translation() {
    let f = fixture().await;
    let body = r#"{"model":"claude","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"what is the weather?"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"location":{"type":"string"}}}}}]}"#;
    let response = common::post_json(
        &f.http,
        format!("{}/v1/chat/completions", f.base),
        CLIENT_KEY,
        body,
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        answer["choices"][0]["message"]["tool_calls"][0]["id"],
        TOOL_USE_ID
    );
    let upstream = f.last();
    assert_eq!(upstream.path, "/v1/messages");
    let sent: Value = upstream.json();
    assert_eq!(sent["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(sent["system"][0]["text"], "be brief");
    assert!(sent["max_tokens"].as_u64().is_some());

    let streamed = body.replacen("{\"model\"", "{\"stream\":true,\"model\"", 1);
    let response = common::post_json(
        &f.http,
        format!("{}/v1/chat/completions", f.base),
        CLIENT_KEY,
        &streamed,
    )
    .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let data = common::sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let arguments: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        json!({"location":"Paris"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translation_to_anthropic_version_2026_10_21_drops_sampling_parameters() {
    let f = fixture().await;
    // The mock refuses `temperature` under this version, as Anthropic does.
    let body = r#"{"model":"claude-2026","temperature":0.2,"top_p":0.9,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = common::post_json(
        &f.http,
        format!("{}/v1/chat/completions", f.base),
        CLIENT_KEY,
        body,
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let upstream = f.last();
    assert_eq!(upstream.header("anthropic-version"), Some("2026-10-21"));
    let sent: Value = upstream.json();
    assert!(sent.get("temperature").is_none() && sent.get("top_p").is_none());
}
