//! The data plane end to end against the mock AWS Bedrock Runtime of `llm-proxy-mock-upstream`,
//! which records exactly what it receives (method, raw percent-encoded path, query, headers,
//! body) and answers like Bedrock (wire formats §5): Converse JSON with `x-amzn-RequestId`,
//! ConverseStream as real binary `application/vnd.amazon.eventstream` frames sent in odd-sized
//! pieces, exception frames, and errors with `x-amzn-ErrorType`. The mock authenticates every
//! call: Bedrock API keys as `Authorization: Bearer`, and AWS Signature V4 which it verifies by
//! recomputing the signature independently of the `aws-sigv4` crate the gateway signs with
//! (§5.6). Config comes from a real control plane (SQLite) through the real config stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use common::{Recorded, options, sse_data};
use llm_proxy_control_plane::server::RunningControlPlane;
use llm_proxy_data_plane::gateway::RunningGateway;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::bedrock::{
    API_KEY, NO_ACCESS, OPUS, REVOKED_API_KEY, SONNET, SONNET_CONVERSE_PATH, SONNET_STREAM_PATH,
    START_WITH_USER, THROTTLED, TOOL_USE_ID, TOOL_USE_ID_2,
};
use llm_proxy_mock_upstream::sigv4::{
    self, ACCESS_KEY_ID, IAM_ACCESS_KEY_ID, IAM_SECRET_ACCESS_KEY, REGION, SECRET_ACCESS_KEY,
    SESSION_TOKEN, SIGNATURE_MISMATCH, SigV4, is_amz_date,
};
use serde_json::{Map, Value, json};
use std::sync::atomic::Ordering;

const CLIENT_KEY: &str = "vk-bedrock-front-9012";

// ---------------------------------------------------------------------------------------------
// Control plane + data plane

struct Fixture {
    mock: MockUpstream,
    cp: RunningControlPlane,
    dp: RunningGateway,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn wait_applied(&self) {
        common::wait_applied(&self.cp, &self.dp).await;
    }

    fn calls(&self) -> Vec<Recorded> {
        self.mock.requests()
    }

    fn last(&self) -> Recorded {
        self.mock.last().expect("the mock saw no request")
    }

    async fn post(&self, body: &str) -> reqwest::Response {
        let url = format!("{}/v1/chat/completions", self.base);
        common::post_json(&self.http, url, CLIENT_KEY, body).await
    }

    /// Sends `recorded` to the mock again, with its headers (reqwest sets the same host and
    /// the new body's content-length).
    async fn replay(&self, recorded: &Recorded) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{}", self.mock.base, recorded.path));
        for (name, value) in &recorded.headers {
            if name != "host" && name != "content-length" {
                request = request.header(name, value);
            }
        }
        request.body(recorded.body.clone()).send().await.unwrap()
    }
}

async fn fixture() -> Fixture {
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    let store = &cp.store;
    let keys = format!("{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}");
    let session = format!("{keys}:{SESSION_TOKEN}");
    // The endpoint is the mock, so the region must come from the option.
    let connections = [
        ("Bedrock-Keys", keys, options(&[("region", REGION)])),
        ("Bedrock-Session", session, options(&[("region", REGION)])),
        (
            "Bedrock-IAM-User",
            format!("{IAM_ACCESS_KEY_ID}:{IAM_SECRET_ACCESS_KEY}"),
            options(&[("region", REGION)]),
        ),
        (
            "Bedrock-ApiKey",
            API_KEY.to_owned(),
            options(&[("region", REGION)]),
        ),
        (
            "Bedrock-Revoked",
            REVOKED_API_KEY.to_owned(),
            options(&[("region", REGION)]),
        ),
    ];
    common::add_connections(store, "bedrock", &mock.base, connections).await;
    // (connection, model name = alias, remote)
    let models = [
        ("Bedrock-Keys", "sonnet-sigv4", SONNET),
        ("Bedrock-Session", "sonnet-session", SONNET),
        ("Bedrock-IAM-User", "sonnet-iam", SONNET),
        ("Bedrock-ApiKey", "sonnet", SONNET),
        ("Bedrock-ApiKey", "opus", OPUS),
        ("Bedrock-Revoked", "sonnet-revoked", SONNET),
    ];
    common::add_models_for_key(store, "Bedrock-App", CLIENT_KEY, &models).await;
    let dp = common::start_data_plane(&cp, "dp-bedrock-test", None).await;
    let fixture = Fixture {
        mock,
        base: format!("http://{}", dp.addr),
        cp,
        dp,
        http: reqwest::Client::new(),
        _dir: dir,
    };
    fixture.wait_applied().await;
    fixture
}

// ---------------------------------------------------------------------------------------------
// Assertions

fn assert_no_client_key(recorded: &Recorded) {
    common::assert_key_not_forwarded(recorded, CLIENT_KEY);
}

/// Asserts a call signed with `access_key_id` (and the session token if `with_session_token`)
/// that the mock's verifier accepts, and returns its parts.
fn assert_sigv4(recorded: &Recorded, access_key_id: &str, with_session_token: bool) -> SigV4 {
    let authorization = recorded.header("authorization").expect("no authorization");
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential="),
        "not SigV4: {authorization}"
    );
    for (name, value) in &recorded.headers {
        let value = value.to_str().unwrap_or_default();
        assert!(
            !value.contains(SECRET_ACCESS_KEY) && !value.contains(IAM_SECRET_ACCESS_KEY),
            "the secret key itself was sent in {name}"
        );
    }
    let amz_date = recorded.header("x-amz-date").expect("no x-amz-date");
    assert!(is_amz_date(amz_date), "{amz_date}");
    let sig = sigv4::verify(recorded).unwrap_or_else(|f| panic!("signature refused: {f:?}"));
    assert_eq!(
        sig.credential,
        format!(
            "{access_key_id}/{}/us-east-1/bedrock/aws4_request",
            &amz_date[..8]
        )
    );
    for name in ["content-type", "host", "x-amz-date"] {
        assert!(
            sig.signed_headers.iter().any(|h| h == name),
            "{name} is not signed: {:?}",
            sig.signed_headers
        );
    }
    assert_eq!(recorded.header("content-type"), Some("application/json"));
    if with_session_token {
        assert_eq!(recorded.header("x-amz-security-token"), Some(SESSION_TOKEN));
        assert!(
            sig.signed_headers
                .iter()
                .any(|h| h == "x-amz-security-token"),
            "the session token is not signed: {:?}",
            sig.signed_headers
        );
    } else {
        assert_eq!(recorded.header("x-amz-security-token"), None);
    }
    assert_no_client_key(recorded);
    sig
}

fn assert_bearer(recorded: &Recorded, key: &str) {
    assert_eq!(
        recorded.header("authorization"),
        Some(format!("Bearer {key}").as_str())
    );
    assert_eq!(recorded.header("x-amz-date"), None);
    assert_eq!(recorded.header("x-amz-security-token"), None);
    assert_no_client_key(recorded);
}

fn assert_event_stream(response: &reqwest::Response) {
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{:?}",
        response.headers()
    );
}

/// The `error` object of an OpenAI-shaped error body, which has exactly OpenAI's four members.
fn openai_error(body: &Value) -> Map<String, Value> {
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("not an OpenAI error: {body}"))
        .clone();
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    error
}

async fn error_of(response: reqwest::Response) -> Map<String, Value> {
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    openai_error(&response.json().await.unwrap())
}

const WEATHER_TOOL: &str = r#"{"type":"function","function":{"name":"get_weather","description":"Current weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string","enum":["celsius","fahrenheit"]}},"required":["city"]}}}"#;

fn weather_tool_spec() -> Value {
    json!({"toolSpec": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "inputSchema": {"json": {"type": "object",
            "properties": {"city": {"type": "string"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}
    }})
}

fn chat(alias: &str, content: &str) -> String {
    json!({"model": alias, "messages": [{"role": "user", "content": content}]}).to_string()
}

fn stream_chat(alias: &str, content: &str) -> String {
    json!({"model": alias, "stream": true, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

/// The `x-amzn-RequestId` the mock answered `recorded` with.
fn request_id(recorded: &Recorded) -> &str {
    recorded
        .request_id
        .as_deref()
        .expect("the mock answers every Bedrock call with a request id")
}

/// The joke answer of the mock's Converse, as the client must see it.
fn assert_joke_answer(answer: &Value, recorded: &Recorded) {
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["id"], format!("chatcmpl-{}", request_id(recorded)));
    assert_eq!(answer["model"], SONNET);
    assert_eq!(answer["choices"].as_array().unwrap().len(), 1);
    let choice = &answer["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        "Why did the chicken cross the road? To get to the other side.",
        "text blocks joined, reasoning dropped"
    );
    assert!(choice["message"].get("tool_calls").is_none());
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &answer["usage"];
    assert_eq!(
        usage["prompt_tokens"],
        30 + 4 + 6,
        "input + cache read + cache write"
    );
    assert_eq!(usage["completion_tokens"], 20);
    assert_eq!(usage["total_tokens"], 60);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 4);
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// Asserts that the call carries a SigV4 Authorization header (naming only the scheme used
/// otherwise: the header may hold the secret).
fn assert_signed(recorded: &Recorded) {
    let authorization = recorded.header("authorization").unwrap_or_default();
    let scheme = authorization.split(' ').next().unwrap_or_default();
    assert_eq!(
        scheme, "AWS4-HMAC-SHA256",
        "an ACCESS_KEY_ID:SECRET credential must be signed, not sent as {scheme:?}"
    );
}

/// Asserts a 200 and returns the JSON body (the body is shown when the status differs).
async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigv4_access_keys_sign_for_bedrock_in_the_region_option_and_the_mock_verifies_it() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet-sigv4", "Tell me a joke.")).await;
    let seen = f.last();
    assert_signed(&seen);
    let answer = ok_json(response).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_eq!(seen.query, None);
    let sig = assert_sigv4(&seen, ACCESS_KEY_ID, false);
    assert!(
        sig.canonical_request.starts_with(
            "POST\n/model/us.anthropic.claude-3-5-sonnet-20241022-v2%253A0/converse\n\n"
        ),
        "{}",
        sig.canonical_request
    );
    assert_joke_answer(&answer, &seen);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigv4_with_a_session_token_sends_and_signs_x_amz_security_token() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet-session", "Tell me a joke.")).await;
    let seen = f.last();
    assert_signed(&seen);
    let answer = ok_json(response).await;
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_sigv4(&seen, ACCESS_KEY_ID, true);
    assert_joke_answer(&answer, &seen);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigv4_signs_converse_and_converse_stream_and_the_mock_verifies_both() {
    let f = fixture().await;
    let answer = ok_json(f.post(&chat("sonnet-iam", "Tell me a joke.")).await).await;
    let seen = f.last();
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_sigv4(&seen, IAM_ACCESS_KEY_ID, false);
    assert_joke_answer(&answer, &seen);

    let response = f
        .post(&stream_chat("sonnet-iam", "What's it like in Paris?"))
        .await;
    assert_eq!(response.status(), 200, "the mock refused the call");
    assert_event_stream(&response);
    let text = response.text().await.unwrap();
    assert_eq!(sse_data(&text).last().unwrap(), "[DONE]", "{text}");
    let seen = f.last();
    assert_eq!(seen.path, SONNET_STREAM_PATH);
    let sig = assert_sigv4(&seen, IAM_ACCESS_KEY_ID, false);
    assert!(
        sig.canonical_request.starts_with(
            "POST\n/model/us.anthropic.claude-3-5-sonnet-20241022-v2%253A0/converse-stream\n\n"
        ),
        "{}",
        sig.canonical_request
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mock_refuses_a_signed_request_whose_body_or_signed_headers_were_altered() {
    let f = fixture().await;
    ok_json(f.post(&chat("sonnet-iam", "Tell me a joke.")).await).await;
    let original = f.last();
    assert_sigv4(&original, IAM_ACCESS_KEY_ID, false);

    // The very same request again is accepted: what follows fails because of the alteration.
    let replayed = f.replay(&original).await;
    assert_eq!(replayed.status(), 200);

    let mut body = original.body.to_vec();
    let at = body.windows(4).position(|w| w == b"joke").unwrap();
    body[at] = b'p';
    let tampered_body = Recorded {
        body: Bytes::from(body),
        ..original.clone()
    };
    let failure = sigv4::verify(&tampered_body).unwrap_err();
    assert_eq!(failure.kind, "InvalidSignatureException");
    assert_eq!(failure.message, SIGNATURE_MISMATCH);

    let mut tampered_date = original.clone();
    let date = original.header("x-amz-date").unwrap();
    let other_second = if date.ends_with("0Z") { "1Z" } else { "0Z" };
    tampered_date.headers.insert(
        "x-amz-date",
        format!("{}{other_second}", &date[..14]).parse().unwrap(),
    );
    assert_eq!(
        sigv4::verify(&tampered_date).unwrap_err().kind,
        "InvalidSignatureException"
    );

    for tampered in [&tampered_body, &tampered_date] {
        let response = f.replay(tampered).await;
        assert_eq!(response.status(), 403);
        assert!(
            response.headers()["x-amzn-errortype"]
                .to_str()
                .unwrap()
                .starts_with("InvalidSignatureException"),
            "{:?}",
            response.headers()
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["message"], SIGNATURE_MISMATCH);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bedrock_api_key_is_sent_as_authorization_bearer_without_signing() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet", "Tell me a joke.")).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let seen = f.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_bearer(&seen, API_KEY);
    assert_joke_answer(&answer, &seen);
}

// ---------------------------------------------------------------------------------------------
// Converse

#[tokio::test(flavor = "multi_thread")]
async fn chat_becomes_a_converse_request_and_the_answer_an_openai_chat_completion() {
    let f = fixture().await;
    let body = format!(
        r#"{{"model":"sonnet","messages":[
            {{"role":"system","content":"You are terse."}},
            {{"role":"developer","content":"Answer in English."}},
            {{"role":"user","content":"Hi"}},
            {{"role":"assistant","content":"Hello! How can I help?"}},
            {{"role":"user","content":"Tell me a joke."}},
            {{"role":"user","content":[{{"type":"text","text":"A short one."}}]}}],
            "temperature":0.5,"top_p":0.9,"max_tokens":256,"stop":["END","STOP"],
            "tools":[{WEATHER_TOOL}],"tool_choice":"auto","user":"u-1"}}"#
    );
    let response = f.post(&body).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let answer: Value = response.json().await.unwrap();
    let seen = f.last();
    assert_joke_answer(&answer, &seen);

    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_bearer(&seen, API_KEY);
    assert_eq!(
        seen.json(),
        json!({
            "messages": [
                {"role": "user", "content": [{"text": "Hi"}]},
                {"role": "assistant", "content": [{"text": "Hello! How can I help?"}]},
                {"role": "user", "content": [{"text": "Tell me a joke."}, {"text": "A short one."}]}
            ],
            "system": [{"text": "You are terse."}, {"text": "Answer in English."}],
            "inferenceConfig": {"maxTokens": 256, "temperature": 0.5, "topP": 0.9,
                                "stopSequences": ["END", "STOP"]},
            "toolConfig": {"tools": [weather_tool_spec()], "toolChoice": {"auto": {}}}
        }),
        "consecutive user messages merge into one turn; model, user and stream are not Converse fields"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_round_trip_through_tool_use_and_tool_result_blocks() {
    let f = fixture().await;
    let question = json!({"role": "user", "content": "What's the weather in Paris?"});
    let tool: Value = serde_json::from_str(WEATHER_TOOL).unwrap();
    let first =
        json!({"model": "sonnet", "messages": [question], "tools": [tool], "tool_choice": "auto"});
    let response = f.post(&first.to_string()).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let seen = f.last();
    assert_eq!(
        seen.json()["toolConfig"],
        json!({"tools": [weather_tool_spec()], "toolChoice": {"auto": {}}})
    );
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let message = &choice["message"];
    assert_eq!(message["content"], "Let me check.");
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{answer}");
    assert_eq!(calls[0]["id"], TOOL_USE_ID);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris", "unit": "celsius"}));

    // The client sends the assistant message back as it got it, with the tool's result; once
    // with the tools again, once without (the gateway then declares the tool itself).
    for with_tools in [true, false] {
        let tool_result =
            json!({"role": "tool", "tool_call_id": TOOL_USE_ID, "content": "21°C, sunny"});
        let mut second = json!({"model": "sonnet", "messages": [question, message, tool_result]});
        if with_tools {
            second["tools"] = json!([tool]);
        }
        let response = f.post(&second.to_string()).await;
        assert_eq!(response.status(), 200, "with_tools={with_tools}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            "It is 21°C and sunny in Paris."
        );
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");

        let seen = f.last().json();
        assert_eq!(
            seen["messages"],
            json!([
                {"role": "user", "content": [{"text": "What's the weather in Paris?"}]},
                {"role": "assistant", "content": [
                    {"text": "Let me check."},
                    {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "get_weather",
                                 "input": {"city": "Paris", "unit": "celsius"}}}]},
                {"role": "user", "content": [
                    {"toolResult": {"toolUseId": TOOL_USE_ID, "content": [{"text": "21°C, sunny"}],
                                    "status": "success"}}]}
            ])
        );
        let tools = seen["toolConfig"]["tools"].as_array().unwrap();
        if with_tools {
            assert_eq!(tools, &[weather_tool_spec()]);
        } else {
            assert_eq!(tools.len(), 1, "{seen}");
            assert_eq!(tools[0]["toolSpec"]["name"], "get_weather");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ConverseStream

#[tokio::test(flavor = "multi_thread")]
async fn every_token_kind_converse_reports_reaches_the_metrics() {
    let f = fixture().await;
    // Answered: 30 input tokens, 4 read from the cache, 6 written to it; 20 output tokens.
    let answer = ok_json(
        f.post(r#"{"model":"sonnet","messages":[{"role":"user","content":"Tell me a joke."}]}"#)
            .await,
    )
    .await;
    assert_eq!(
        answer["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 4, "cache_write_tokens": 6})
    );
    // Streamed: 9 input tokens, 3 read from the cache; 5 output tokens.
    let text = f
        .post(r#"{"model":"sonnet","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#)
        .await
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(
        common::token_counts(&f.dp, "sonnet"),
        common::kinds(&[
            ("prompt", 30 + 4 + 6 + 9 + 3),
            ("completion", 20 + 5),
            ("cache_read", 4 + 3),
            ("cache_write", 6),
        ])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn converse_stream_frames_split_across_chunks_become_openai_chunks_with_usage_only_on_request()
 {
    let f = fixture().await;
    for include_usage in [false, true] {
        let body = json!({"model": "sonnet", "stream": true,
                          "stream_options": {"include_usage": include_usage},
                          "messages": [{"role": "user", "content": "What's it like in Paris?"}]});
        let response = f.post(&body.to_string()).await;
        assert_eq!(response.status(), 200);
        assert_event_stream(&response);
        let text = response.text().await.unwrap();

        let seen = f.last();
        assert_eq!(seen.path, SONNET_STREAM_PATH);
        assert_bearer(&seen, API_KEY);
        assert_eq!(
            seen.json(),
            json!({"messages": [{"role": "user", "content": [{"text": "What's it like in Paris?"}]}]}),
            "stream and stream_options are not Converse fields"
        );

        let events = sse_data(&text);
        assert_eq!(events.last().unwrap(), "[DONE]", "{text}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks.len(), if include_usage { 5 } else { 4 }, "{text}");
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], format!("chatcmpl-{}", request_id(&seen)));
            assert_eq!(chunk["created"], chunks[0]["created"]);
            assert_eq!(chunk["model"], SONNET);
            if !include_usage {
                assert!(
                    chunk.get("usage").is_none_or(Value::is_null),
                    "no usage without include_usage: {chunk}"
                );
            }
        }
        let delta = |i: usize| chunks[i]["choices"][0]["delta"].clone();
        let finish = |i: usize| chunks[i]["choices"][0]["finish_reason"].clone();
        assert_eq!(delta(0), json!({"role": "assistant", "content": ""}));
        assert_eq!(finish(0), Value::Null);
        assert_eq!(delta(1), json!({"content": "It is"}));
        assert_eq!(delta(2), json!({"content": " 21°C."}));
        assert_eq!(finish(2), Value::Null);
        assert_eq!(delta(3), json!({}));
        assert_eq!(finish(3), "stop");
        if include_usage {
            for chunk in &chunks[..4] {
                assert_eq!(chunk["usage"], Value::Null, "{chunk}");
            }
            assert_eq!(chunks[4]["choices"], json!([]));
            let usage = &chunks[4]["usage"];
            assert_eq!(usage["prompt_tokens"], 9 + 3, "input + cache read");
            assert_eq!(usage["completion_tokens"], 5);
            assert_eq!(usage["total_tokens"], 17);
            assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 3);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_tool_use_becomes_tool_call_deltas_with_id_and_name_first_and_finishes_with_tool_calls()
 {
    let f = fixture().await;
    let body = format!(
        r#"{{"model":"sonnet","stream":true,"tools":[{WEATHER_TOOL}],
            "messages":[{{"role":"user","content":"What's the weather in Paris and London?"}}]}}"#
    );
    let response = f.post(&body).await;
    assert_eq!(response.status(), 200);
    assert_event_stream(&response);
    let text = response.text().await.unwrap();
    let seen = f.last();
    assert_eq!(seen.path, SONNET_STREAM_PATH);
    assert_eq!(
        seen.json()["toolConfig"]["tools"],
        json!([weather_tool_spec()])
    );

    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]", "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let deltas: Vec<Value> = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"].clone())
        .collect();
    assert_eq!(
        deltas,
        [
            json!({"role": "assistant", "content": ""}),
            json!({"content": "Checking."}),
            json!({"tool_calls": [{"index": 0, "id": TOOL_USE_ID, "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": " \"Paris\"}"}}]}),
            json!({"tool_calls": [{"index": 1, "id": TOOL_USE_ID_2, "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]}),
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"city\": \"London\"}"}}]}),
            json!({}),
        ],
        "{text}"
    );
    let finishes: Vec<Value> = chunks
        .iter()
        .map(|c| c["choices"][0]["finish_reason"].clone())
        .collect();
    assert!(finishes[..finishes.len() - 1].iter().all(Value::is_null));
    assert_eq!(finishes.last().unwrap(), "tool_calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exception_frame_after_text_ends_the_client_stream_with_an_error_event_and_no_done() {
    let f = fixture().await;
    let response = f.post(&stream_chat("sonnet", "THROTTLEMIDSTREAM")).await;
    assert_eq!(response.status(), 200, "the stream had started");
    assert_event_stream(&response);
    let text = response.text().await.unwrap();
    assert_eq!(f.last().path, SONNET_STREAM_PATH);
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(
        events
            .iter()
            .any(|e| e.contains(r#""delta":{"content":"It is"}"#)),
        "content before the error is delivered: {text}"
    );
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = openai_error(&last);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Too many tokens"),
        "{last}"
    );
    assert_eq!(error["type"], "rate_limit_error");
    assert!(last.get("choices").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exception_frame_before_any_output_becomes_an_http_429_with_an_openai_error() {
    let f = fixture().await;
    let response = f.post(&stream_chat("sonnet", "THROTTLEFIRST")).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let error = error_of(response).await;
    assert_eq!(error["type"], "rate_limit_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Too many tokens"),
        "{error:?}"
    );
    assert_eq!(f.last().path, SONNET_STREAM_PATH);
    assert_eq!(f.calls().len(), 1, "a 429 is not retried by the gateway");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_with_a_corrupted_crc_ends_the_client_stream_with_an_error_event_and_no_done() {
    let f = fixture().await;
    let response = f.post(&stream_chat("sonnet", "CORRUPTME")).await;
    assert_eq!(response.status(), 200, "the stream had started");
    let text = response.text().await.unwrap();
    assert_eq!(f.last().path, SONNET_STREAM_PATH);
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    assert!(
        events
            .iter()
            .any(|e| e.contains(r#""delta":{"content":" 21°C."}"#)),
        "content before the bad frame is delivered: {text}"
    );
    assert!(!text.contains("CORRUPTED"), "{text}");
    assert!(
        !text.contains(r#""finish_reason":"stop""#),
        "nothing after the bad frame: {text}"
    );
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = openai_error(&last);
    assert_eq!(error["type"], "server_error", "{last}");
    assert_eq!(error["code"], "upstream_invalid_response", "{last}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("checksum"),
        "the bad CRC is what failed: {last}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test(flavor = "multi_thread")]
async fn throttling_becomes_429_with_retry_after_and_an_openai_error() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet", "RATELIMITME")).await;
    assert_eq!(response.status(), 429);
    let retry_after = response.headers()["retry-after"].to_str().unwrap();
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
        "{retry_after}"
    );
    let error = error_of(response).await;
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["message"], THROTTLED);
    assert_eq!(f.calls().len(), 1, "a 429 is not retried by the gateway");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_validation_exception_becomes_400_with_the_bedrock_message() {
    let f = fixture().await;
    let body = r#"{"model":"sonnet","messages":[
        {"role":"assistant","content":"Hello!"},{"role":"user","content":"Hi"}]}"#;
    let response = f.post(body).await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["message"], START_WITH_USER);
    let seen = f.last();
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_eq!(seen.json()["messages"][0]["role"], "assistant");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unrecognized_client_becomes_502_without_quoting_the_credential() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet-revoked", "Tell me a joke.")).await;
    assert_eq!(response.status(), 502);
    let text = response.text().await.unwrap();
    assert!(!text.contains(REVOKED_API_KEY), "credential leaked: {text}");
    let error = openai_error(&serde_json::from_str(&text).unwrap());
    assert_eq!(error["code"], "upstream_credential_refused");
    assert_eq!(error["type"], "server_error");
    assert_bearer(&f.last(), REVOKED_API_KEY);
    assert_eq!(f.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn access_denied_stays_403_and_says_the_connections_credential_was_refused() {
    let f = fixture().await;
    let response = f.post(&chat("opus", "Tell me a joke.")).await;
    assert_eq!(response.status(), 403);
    let error = error_of(response).await;
    assert_eq!(error["type"], "permission_error");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("connection's credential"), "{message}");
    assert!(message.contains(NO_ACCESS), "{message}");
    assert!(!message.contains(API_KEY));
    let seen = f.last();
    assert_eq!(
        seen.path,
        "/model/anthropic.claude-opus-4-20250514-v1%3A0/converse"
    );
    assert_bearer(&seen, API_KEY);
}

// ---------------------------------------------------------------------------------------------
// Upstream garbage (DESIGN §19)

/// Bound on each garbage answer: they take milliseconds; seconds would mean a stall.
const WITHIN_SECONDS: std::time::Duration = std::time::Duration::from_secs(10);

impl Fixture {
    async fn answer_within_seconds(&self, body: &str) -> (StatusCode, String) {
        tokio::time::timeout(WITHIN_SECONDS, async {
            let response = self.post(body).await;
            let status = response.status();
            (status, response.text().await.unwrap())
        })
        .await
        .expect("no whole answer within seconds")
    }

    async fn assert_next_stream_served(&self) {
        let (status, text) = self
            .answer_within_seconds(&stream_chat("sonnet", "hi"))
            .await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(sse_data(&text).last().unwrap(), "[DONE]", "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_declaring_4_gib_is_refused_from_its_prelude() {
    let f = fixture().await;
    let (status, body) = f
        .answer_within_seconds(&stream_chat("sonnet", "HUGEFRAME"))
        .await;
    // The first frame fails before the stream's head: a 502.
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "upstream_invalid_response", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&format!(
            "frame of 4294967295 bytes exceeds the limit of {} bytes (--max-stream-event-bytes)",
            common::TEST_MAX_STREAM_EVENT_BYTES
        )),
        "{body}"
    );
    let produced = f.mock.state.produced.load(Ordering::Relaxed);
    assert!(
        produced < 32 * 1024 * 1024,
        "the mock sent {produced} of its 200 MB"
    );
    f.assert_next_stream_served().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_without_its_metadata_gets_a_final_error_event() {
    let f = fixture().await;
    let (status, text) = f
        .answer_within_seconds(&stream_chat("sonnet", "NOMETADATA"))
        .await;
    assert_eq!(status, 200, "the stream had started");
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = openai_error(&last);
    assert_eq!(error["code"], "upstream_invalid_response", "{last}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("terminal event (messageStop and metadata)"),
        "{last}"
    );
    f.assert_next_stream_served().await;
}
