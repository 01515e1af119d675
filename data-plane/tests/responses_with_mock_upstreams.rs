//! The OpenAI Responses API (`/v1/responses`, DESIGN §17) end to end against the mock upstreams
//! of `llm-proxy-mock-upstream`, which record what they receive and keep stored responses per
//! mock (one mock = one OpenAI account): passthrough to OpenAI and Azure (v1 and dated routes),
//! byte for byte except `model` and `previous_response_id`; response ids tagged with their
//! connection so that chains, retrieve, delete and input items reach the connection that stored
//! the response, also in a pool of two accounts; translation to Anthropic, Gemini and Bedrock
//! Converse with the whole event sequence and complete usage; errors and metrics. Config comes
//! from a real control plane (SQLite) through the real config stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::options;
use llm_proxy_control_plane::server::RunningControlPlane;
use llm_proxy_control_plane::store::{NewAssignment, NewModel};
use llm_proxy_data_plane::gateway::RunningGateway;
use llm_proxy_data_plane::providers::openai::responses::untag_id;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::anthropic::ANTHROPIC_KEY;
use llm_proxy_mock_upstream::google::GEMINI_KEY;
use llm_proxy_mock_upstream::openai::{AZURE_KEY, OPENAI_KEY, OPENAI_SECOND_KEY};
use llm_proxy_mock_upstream::responses::{
    CACHED_TOKENS, INPUT_TOKENS, OUTPUT_TOKENS, REASONING_TOKENS, TEXT_PREFIX, WEATHER_ARGUMENTS,
};
use serde_json::{Value, json};

const CLIENT_KEY: &str = "vk-codex-5150";
const OTHER_KEY: &str = "vk-no-gpt-0000";
const BEDROCK_MODEL: &str = "amazon.nova-pro-v1:0";

struct Fixture {
    mock: MockUpstream,
    /// The second OpenAI account of the pool.
    second: MockUpstream,
    cp: RunningControlPlane,
    dp: RunningGateway,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let mock = MockUpstream::start().await.unwrap();
    let second = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    let store = &cp.store;
    common::add_connections(
        store,
        "openai",
        &mock.base,
        [("OpenAI", OPENAI_KEY.to_owned(), options(&[]))],
    )
    .await;
    common::add_connections(
        store,
        "openai",
        &second.base,
        [("OpenAI-2", OPENAI_SECOND_KEY.to_owned(), options(&[]))],
    )
    .await;
    common::add_connections(
        store,
        "azure",
        &mock.base,
        [
            (
                "Azure-v1",
                AZURE_KEY.to_owned(),
                options(&[("api_version", "v1")]),
            ),
            ("Azure-Dated", AZURE_KEY.to_owned(), options(&[])),
        ],
    )
    .await;
    common::add_connections(
        store,
        "anthropic",
        &mock.base,
        [("Anthropic", ANTHROPIC_KEY.to_owned(), options(&[]))],
    )
    .await;
    common::add_connections(
        store,
        "google",
        &mock.base,
        [(
            "Gemini",
            GEMINI_KEY.to_owned(),
            options(&[("api", "gemini")]),
        )],
    )
    .await;
    common::add_connections(
        store,
        "bedrock",
        &mock.base,
        [(
            "Bedrock",
            llm_proxy_mock_upstream::bedrock::API_KEY.to_owned(),
            options(&[("region", "us-east-1")]),
        )],
    )
    .await;
    let models = [
        ("OpenAI", "gpt", "gpt-4.1"),
        ("OpenAI", "gpt-reasoning", "gpt-5"),
        ("Anthropic", "claude", "claude-sonnet-4-5-20250929"),
        ("Gemini", "gemini", "gemini-2.5-flash"),
        ("Bedrock", "converse", BEDROCK_MODEL),
    ];
    common::add_models_for_key(store, "Codex", CLIENT_KEY, &models).await;
    for (connection, name, deployment) in [
        ("Azure-v1", "azure-v1", "gpt41-v1"),
        ("Azure-Dated", "azure-dated", "gpt41-dated"),
    ] {
        store
            .create_model(NewModel {
                connection: connection.into(),
                name: name.into(),
                remote: "gpt-4.1".into(),
                deployment: Some(deployment.into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    store
        .create_model(NewModel {
            connection: "OpenAI-2".into(),
            name: "gpt-second".into(),
            remote: "gpt-4.1".into(),
            deployment: None,
            ..Default::default()
        })
        .await
        .unwrap();
    // `pool`: the same model on two accounts, equal weights.
    for (model, alias) in [
        ("azure-v1", "azure-v1"),
        ("azure-dated", "azure-dated"),
        ("gpt", "pool"),
        ("gpt-second", "pool"),
    ] {
        store
            .create_assignment(NewAssignment {
                vkey: "Codex".into(),
                model: model.into(),
                alias: Some(alias.into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // A key that may call Claude only: stored OpenAI responses are not its business.
    common::add_models_for_key(store, "No-GPT", OTHER_KEY, &[]).await;
    store
        .create_assignment(NewAssignment {
            vkey: "No-GPT".into(),
            model: "claude".into(),
            alias: Some("claude".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let dp = common::start_data_plane(&cp, "dp-responses-test", None).await;
    let fixture = Fixture {
        mock,
        second,
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
    async fn post(&self, body: &str) -> reqwest::Response {
        common::post_json(
            &self.http,
            format!("{}/v1/responses", self.base),
            CLIENT_KEY,
            body,
        )
        .await
    }

    async fn create(&self, body: Value) -> Value {
        let response = self.post(&body.to_string()).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn stored(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::Response {
        self.http
            .request(method, format!("{}/v1/responses/{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    /// The connection id behind a connection name.
    async fn connection_id(&self, name: &str) -> String {
        self.cp
            .store
            .list_connections()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap()
            .id
    }
}

/// The answer's output text (every `output_text` part of every message item).
fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().unwrap().iter())
        .filter_map(|part| part["text"].as_str())
        .collect()
}

/// A client SSE body as (event name, data) pairs; every event must name itself on both lines.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    assert!(text.ends_with("\n\n"), "unterminated stream: {text:?}");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            let (name, data) = event.split_once('\n').expect("event and data lines");
            let name = name.strip_prefix("event: ").expect("event line").to_owned();
            let data: Value =
                serde_json::from_str(data.strip_prefix("data: ").expect("data line")).unwrap();
            assert_eq!(data["type"], name.as_str(), "{event}");
            (name, data)
        })
        .collect()
}

/// A Codex-like request, with odd spacing so that byte-for-byte relaying shows.
fn codex_body(model: &str, stream: bool, text: &str) -> String {
    format!(
        r#"{{"model": "{model}" ,"instructions":"You are Codex.","input":[{{"type":"message","role":"developer","content":[{{"type":"input_text","text":"sandbox: read-only"}}]}},{{"type":"message","role":"user","content":[{{"type":"input_text","text":"{text}"}}]}}],"tools":[{{"type":"function","name":"get_weather","description":"Weather in a city","strict":false,"parameters":{{"type":"object","properties":{{"location":{{"type":"string"}}}},"required":["location"]}}}},{{"type":"web_search","external_web_access":false}}],"tool_choice":"auto","parallel_tool_calls":true,"reasoning":{{"summary":"auto"}},"store":false,"stream":{stream},"include":["reasoning.encrypted_content"],"prompt_cache_key":"abc-123","client_metadata":{{"session":"s1"}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_passthrough_keeps_the_body_and_tags_the_id() {
    let f = fixture().await;
    let sent = codex_body("gpt", false, "say hi");
    let response = f.post(&sent).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(output_text(&answer), format!("{TEXT_PREFIX}turn 1"));

    let upstream = f.mock.last().unwrap();
    assert_eq!(upstream.path, "/v1/responses");
    assert_eq!(
        String::from_utf8_lossy(&upstream.body),
        sent.replace(r#""model": "gpt""#, r#""model":"gpt-4.1""#)
    );
    assert_eq!(
        upstream.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    common::assert_key_not_forwarded(&upstream, CLIENT_KEY);

    // The id the client sees is the upstream's, tagged with the connection.
    let id = answer["id"].as_str().unwrap();
    let tagged = untag_id(id).expect("a tagged id");
    assert_eq!(tagged.connection_id, f.connection_id("OpenAI").await);
    assert!(tagged.upstream_id.starts_with("resp_") && tagged.upstream_id != id);
    // Everything else is the upstream's answer as it came.
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["model"], "gpt-4.1");

    // Neither cached nor reasoning tokens reported: no series of them.
    assert_eq!(
        common::token_counts(&f.dp, "gpt"),
        common::kinds(&[("prompt", INPUT_TOKENS), ("completion", OUTPUT_TOKENS)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_passthrough_streams_relay_the_events_with_tagged_ids_and_usage() {
    let f = fixture().await;
    let response = f
        .post(&codex_body(
            "gpt-reasoning",
            true,
            "CACHEME what is the weather in Paris?",
        ))
        .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    assert!(names.contains(&"response.function_call_arguments.delta"));
    let numbers: Vec<u64> = events
        .iter()
        .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    let created = &events[0].1["response"]["id"];
    let completed = &events.last().unwrap().1["response"];
    assert_eq!(&completed["id"], created);
    let tagged = untag_id(created.as_str().unwrap()).unwrap();
    assert_eq!(tagged.connection_id, f.connection_id("OpenAI").await);
    let call = completed["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap();
    assert_eq!(call["arguments"], WEATHER_ARGUMENTS);

    // Usage from response.completed: cached tokens are part of the prompt, reasoning tokens
    // of the completion.
    assert_eq!(
        common::token_counts(&f.dp, "gpt-reasoning"),
        common::kinds(&[
            ("prompt", INPUT_TOKENS + CACHED_TOKENS),
            ("completion", OUTPUT_TOKENS + REASONING_TOKENS),
            ("cache_read", CACHED_TOKENS),
            ("reasoning", REASONING_TOKENS),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_ten_turns_through_a_pool_of_two_accounts_always_reaches_its_account() {
    let f = fixture().await;
    for _run in 0..3 {
        let mut previous: Option<String> = None;
        let mut ids = Vec::new();
        for turn in 1..=10 {
            let mut body = json!({"model": "pool", "input": format!("turn please {turn}")});
            if let Some(previous) = &previous {
                body["previous_response_id"] = json!(previous);
            }
            let answer = f.create(body).await;
            assert_eq!(output_text(&answer), format!("{TEXT_PREFIX}turn {turn}"));
            let id = answer["id"].as_str().unwrap().to_owned();
            if let Some(previous) = &previous {
                assert_eq!(answer["previous_response_id"], previous.as_str());
            }
            ids.push(id.clone());
            previous = Some(id);
        }
        // Every turn of the chain went to the account of the first.
        let accounts: Vec<String> = ids
            .iter()
            .map(|id| untag_id(id).unwrap().connection_id)
            .collect();
        assert!(accounts.windows(2).all(|w| w[0] == w[1]), "{accounts:?}");
        let last = previous.unwrap();
        let retrieved = f.stored(reqwest::Method::GET, &last, CLIENT_KEY).await;
        assert_eq!(retrieved.status(), 200);
        let retrieved: Value = retrieved.json().await.unwrap();
        assert_eq!(retrieved["id"], last.as_str());
        assert_eq!(output_text(&retrieved), format!("{TEXT_PREFIX}turn 10"));
        let items = f
            .stored(
                reqwest::Method::GET,
                &format!("{last}/input_items"),
                CLIENT_KEY,
            )
            .await;
        assert_eq!(items.status(), 200);
        let items: Value = items.json().await.unwrap();
        assert_eq!(items["object"], "list");
        assert!(!items["data"].as_array().unwrap().is_empty());
        let deleted = f.stored(reqwest::Method::DELETE, &last, CLIENT_KEY).await;
        assert_eq!(deleted.status(), 200);
        let deleted: Value = deleted.json().await.unwrap();
        assert_eq!(deleted["id"], last.as_str());
        assert_eq!(deleted["deleted"], true);
        let gone = f.stored(reqwest::Method::GET, &last, CLIENT_KEY).await;
        assert_eq!(gone.status(), 404);
        let gone: Value = gone.json().await.unwrap();
        // The message names the id the client knows, not the upstream's.
        let message = gone["error"]["message"].as_str().unwrap();
        assert!(message.contains(&last), "{message}");
    }
    // Every turn was stored in one of the two accounts (the pool's first pick is random, so only
    // the stickiness above is asserted, not the spread).
    let first = f.mock.state.responses.ids().len();
    let second = f.second.state.responses.ids().len();
    assert_eq!(first + second, 3 * 10 - 3, "stored minus the 3 deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_v1_and_dated_routes_take_the_deployment_in_the_body() {
    let f = fixture().await;
    for (alias, path, query, deployment) in [
        ("azure-v1", "/openai/v1/responses", None, "gpt41-v1"),
        (
            "azure-dated",
            "/openai/responses",
            Some("api-version=2025-04-01-preview"),
            "gpt41-dated",
        ),
    ] {
        let first = f
            .create(json!({"model": alias, "input": "hello azure"}))
            .await;
        let upstream = f.mock.last().unwrap();
        assert_eq!(upstream.path, path);
        assert_eq!(upstream.query.as_deref(), query);
        assert_eq!(upstream.header("api-key"), Some(AZURE_KEY));
        assert_eq!(upstream.json()["model"], deployment);
        let id = first["id"].as_str().unwrap();
        let second = f
            .create(json!({"model": alias, "input": "again", "previous_response_id": id}))
            .await;
        assert_eq!(output_text(&second), format!("{TEXT_PREFIX}turn 2"));
        assert_eq!(
            f.mock.last().unwrap().json()["previous_response_id"],
            untag_id(id).unwrap().upstream_id.as_str()
        );
        let retrieved = f.stored(reqwest::Method::GET, id, CLIENT_KEY).await;
        assert_eq!(retrieved.status(), 200);
        let upstream = f.mock.last().unwrap();
        assert_eq!(
            upstream.path,
            format!("{path}/{}", untag_id(id).unwrap().upstream_id)
        );
        assert_eq!(upstream.query.as_deref(), query);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_responses_answer_404_to_other_ids_and_to_keys_without_the_connection() {
    let f = fixture().await;
    let answer = f.create(json!({"model": "gpt", "input": "keep me"})).await;
    let id = answer["id"].as_str().unwrap();
    let upstream_id = untag_id(id).unwrap().upstream_id;
    let before = f.mock.requests().len();
    for (path, key) in [
        (upstream_id.as_str(), CLIENT_KEY), // untagged: not an id the gateway issued
        ("resp_bm90LWEtdGFn", CLIENT_KEY),
        (id, OTHER_KEY), // tagged, but this key has no assignment on that connection
    ] {
        let response = f.stored(reqwest::Method::GET, path, key).await;
        assert_eq!(response.status(), 404, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    assert_eq!(f.mock.requests().len(), before, "nothing went upstream");
    let response = f
        .stored(
            reqwest::Method::GET,
            &format!("{id}?stream=true"),
            CLIENT_KEY,
        )
        .await;
    assert_eq!(response.status(), 400);
    let response = f.stored(reqwest::Method::GET, id, "vk-wrong-key").await;
    assert_eq!(response.status(), 401);
    // A query passes on (without api-version).
    let response = f
        .stored(
            reqwest::Method::GET,
            &format!("{id}/input_items?limit=1&api-version=evil"),
            CLIENT_KEY,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(f.mock.last().unwrap().query.as_deref(), Some("limit=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_response_of_a_connection_outside_the_pool_is_a_400() {
    let f = fixture().await;
    let answer = f
        .create(json!({"model": "azure-v1", "input": "first"}))
        .await;
    let response = f
        .post(
            &json!({"model": "gpt", "input": "next", "previous_response_id": answer["id"]})
                .to_string(),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "previous_response_id");
    assert_eq!(body["error"]["code"], "previous_response_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_keep_their_status_and_mid_stream_failures_end_with_an_error_event() {
    let f = fixture().await;
    let response = f
        .post(&json!({"model": "gpt", "input": "RATELIMITME"}).to_string())
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");

    let response = f
        .post(&json!({"model": "gpt", "input": "TRUNCATEME", "stream": true}).to_string())
        .await;
    assert_eq!(response.status(), 200);
    let events = sse_events(&response.text().await.unwrap());
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["code"], "upstream_invalid_response");
    let previous = events[events.len() - 2].1["sequence_number"]
        .as_u64()
        .unwrap();
    assert_eq!(data["sequence_number"], previous + 1);

    // The upstream's own failure event is relayed, and ends the stream.
    let response = f
        .post(&json!({"model": "gpt", "input": "MIDSTREAMERROR", "stream": true}).to_string())
        .await;
    let events = sse_events(&response.text().await.unwrap());
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "response.failed");
    assert_eq!(data["response"]["status"], "failed");
    assert!(untag_id(data["response"]["id"].as_str().unwrap()).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_targets_answer_with_store_false_and_complete_usage() {
    let f = fixture().await;
    // The kinds each mock reports: Claude plain counts (no cache_control sent); Gemini's tool
    // call 42 prompt and 8 + 20 thinking tokens; Converse 30 + 4 cache read + 6 cache write in
    // and 20 out.
    for (alias, upstream_path, counted) in [
        (
            "claude",
            "/v1/messages",
            common::kinds(&[("prompt", 25), ("completion", 12)]),
        ),
        (
            "gemini",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            common::kinds(&[("prompt", 42), ("completion", 28), ("reasoning", 20)]),
        ),
        (
            "converse",
            "/model/amazon.nova-pro-v1%3A0/converse",
            common::kinds(&[
                ("prompt", 40),
                ("completion", 20),
                ("cache_read", 4),
                ("cache_write", 6),
            ]),
        ),
    ] {
        let answer = f
            .create(serde_json::from_str(&codex_body(alias, false, "say hi")).unwrap())
            .await;
        assert_eq!(answer["object"], "response", "{alias}");
        assert_eq!(answer["store"], false, "{alias}");
        assert_eq!(answer["status"], "completed", "{alias}");
        // Gemini's mock calls the offered tool; the others answer text.
        assert!(
            !answer["output"].as_array().unwrap().is_empty(),
            "{alias}: {answer}"
        );
        let usage = &answer["usage"];
        assert!(
            usage["input_tokens"].as_u64().unwrap() > 0,
            "{alias}: {usage}"
        );
        assert!(
            usage["input_tokens_details"]["cached_tokens"].is_u64(),
            "{alias}"
        );
        assert!(
            usage["output_tokens_details"]["reasoning_tokens"].is_u64(),
            "{alias}"
        );
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
            )
        );
        let upstream = f.mock.last().unwrap();
        assert_eq!(upstream.path, upstream_path, "{alias}");
        // Only the function tool was offered; Codex's extras stayed behind.
        let body = String::from_utf8_lossy(&upstream.body);
        assert!(body.contains("get_weather"), "{alias}: {body}");
        for dropped in ["web_search", "client_metadata", "prompt_cache_key"] {
            assert!(!body.contains(dropped), "{alias}: {dropped} in {body}");
        }
        assert_eq!(common::token_counts(&f.dp, alias), counted, "{alias}");
    }
    // The developer message and the instructions became Claude's system prompt.
    let answer = f
        .create(serde_json::from_str(&codex_body("claude", false, "say hi")).unwrap())
        .await;
    assert_eq!(answer["store"], false);
    let upstream = f.mock.last().unwrap().json();
    let system = upstream["system"].to_string();
    assert!(
        system.contains("You are Codex.") && system.contains("sandbox: read-only"),
        "{system}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_streams_carry_the_whole_event_sequence_and_function_call_arguments() {
    let f = fixture().await;
    for alias in ["claude", "gemini", "converse"] {
        let response = f
            .post(&codex_body(alias, true, "what is the weather in Paris?"))
            .await;
        assert_eq!(response.status(), 200, "{alias}");
        let events = sse_events(&response.text().await.unwrap());
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            &names[..2],
            &["response.created", "response.in_progress"],
            "{alias}"
        );
        assert_eq!(
            names.last(),
            Some(&"response.completed"),
            "{alias}: {names:?}"
        );
        let numbers: Vec<u64> = events
            .iter()
            .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
            .collect();
        assert!(
            numbers.windows(2).all(|w| w[1] > w[0]),
            "{alias}: {numbers:?}"
        );
        // Per function call item: its deltas joined == its `.done` arguments == the completed
        // output item's arguments (the Converse mock calls two tools in parallel).
        let completed = &events.last().unwrap().1["response"];
        let calls: Vec<&Value> = completed["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        assert!(!calls.is_empty(), "{alias}: {completed}");
        for call in calls {
            let item = call["id"].as_str().unwrap();
            let deltas: String = events
                .iter()
                .filter(|(n, d)| {
                    n == "response.function_call_arguments.delta" && d["item_id"] == item
                })
                .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
                .collect();
            let done = events
                .iter()
                .find(|(n, d)| n == "response.function_call_arguments.done" && d["item_id"] == item)
                .unwrap_or_else(|| panic!("{alias}: no arguments.done for {item} in {names:?}"));
            assert_eq!(done.1["arguments"].as_str().unwrap(), deltas, "{alias}");
            assert_eq!(call["arguments"].as_str().unwrap(), deltas, "{alias}");
            let arguments: Value = serde_json::from_str(&deltas).unwrap();
            assert!(arguments.is_object(), "{alias}");
            assert_eq!(call["name"], "get_weather", "{alias}");
        }
        assert_eq!(completed["store"], false);
        assert!(completed["usage"]["output_tokens_details"]["reasoning_tokens"].is_u64());
        assert!(
            completed["usage"]["input_tokens"].as_u64().unwrap() > 0,
            "{alias}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_response_id_on_a_translated_target_asks_for_the_whole_input() {
    let f = fixture().await;
    let before = f.mock.requests().len();
    for alias in ["claude", "gemini", "converse"] {
        let response = f
            .post(
                &json!({"model": alias, "input": "next", "previous_response_id": "resp_abc"})
                    .to_string(),
            )
            .await;
        assert_eq!(response.status(), 400, "{alias}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unsupported_parameter", "{alias}");
        assert_eq!(body["error"]["param"], "previous_response_id", "{alias}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("input"),
            "{body}"
        );
    }
    // A forced hosted tool the target cannot run is refused by name.
    let response = f
        .post(
            &json!({"model": "claude", "input": "search", "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}})
                .to_string(),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("web_search"),
        "{body}"
    );
    assert_eq!(f.mock.requests().len(), before, "nothing went upstream");
}
