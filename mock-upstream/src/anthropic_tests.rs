//! The Anthropic Messages upstreams through the mock's whole HTTP surface: the Anthropic API and
//! Foundry, Bedrock InvokeModel and Messages, Vertex rawPredict; authentication, validation,
//! the stream sequences and the trigger words.

use crate::anthropic::{
    ANTHROPIC_KEY, ANTHROPIC_SECOND_KEY, BEDROCK_VERSION, CACHE_CREATION_TOKENS, CACHE_READ_TOKENS,
    THINKING_SIGNATURE, THINKING_TEXT, TOOL_USE_ID, VERTEX_VERSION,
};
use crate::bedrock::{API_KEY, REVOKED_API_KEY, SONNET};
use crate::google::VERTEX_TOKEN;
use crate::{MockState, router};
use aws_smithy_eventstream::frame::read_message_from;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use base64::Engine as _;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt as _;

const VERSION: &str = "2023-06-01";
const BETA: &str = "interleaved-thinking-2025-05-14,context-management-2025-06-27";
const INVOKE_PATH: &str = "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/invoke";
const INVOKE_STREAM_PATH: &str =
    "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/invoke-with-response-stream";
const VERTEX_PATH: &str =
    "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929";

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn send(state: &Arc<MockState>, request: Request<Body>) -> Answer {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

/// A POST of `body` to `path` with `headers`.
async fn post(
    state: &Arc<MockState>,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut request = Request::post(path).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(state, request.body(Body::from(body.into())).unwrap()).await
}

/// A POST to the Anthropic API with the accepted key and headers.
async fn anthropic(state: &Arc<MockState>, path: &str, body: &Value) -> Answer {
    post(
        state,
        path,
        &[("x-api-key", ANTHROPIC_KEY), ("anthropic-version", VERSION)],
        body.to_string(),
    )
    .await
}

fn hello(extra: Value) -> Value {
    let mut body = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024,
                          "messages": [{"role": "user", "content": "hi there"}]});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

/// The events of an Anthropic SSE body, checking that each `event:` names its data's `type`.
fn sse_events(text: &str) -> Vec<Value> {
    assert!(text.ends_with("\n\n"), "{text}");
    text.split_terminator("\n\n")
        .map(|event| {
            let (name, data) = event.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name, "{event}");
            data
        })
        .collect()
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// Decodes an InvokeModelWithResponseStream body: each frame's headers, and the Anthropic event
/// its `bytes` hold (or the exception's payload).
fn invoke_frames(mut bytes: &[u8]) -> Vec<(String, String, Value)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let message = read_message_from(&mut bytes).unwrap();
        let header = |name: &str| {
            message
                .headers()
                .iter()
                .find(|h| h.name().as_str() == name)
                .map(|h| h.value().as_string().unwrap().as_str().to_owned())
        };
        let payload: Value = serde_json::from_slice(message.payload()).unwrap();
        let kind = header(":event-type")
            .or_else(|| header(":exception-type"))
            .unwrap();
        let message_type = header(":message-type").unwrap();
        let event = match payload["bytes"].as_str() {
            Some(b64) => serde_json::from_slice(
                &base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            )
            .unwrap(),
            None => payload,
        };
        frames.push((kind, message_type, event));
    }
    frames
}

#[tokio::test]
async fn the_anthropic_api_answers_a_message_and_records_the_request_byte_for_byte() {
    let state = Arc::new(MockState::default());
    // Unusual spacing and key order: the recording must keep the bytes.
    let body = br#"{"max_tokens": 64,  "messages":[{"role":"user","content":[{"type":"text","text":"hi there"}]}],"model":"claude-sonnet-4-5","zzz_unknown":{"a":1}}"#;
    let answer = post(
        &state,
        "/v1/messages?beta=true",
        &[
            ("x-api-key", ANTHROPIC_KEY),
            ("anthropic-version", VERSION),
            ("anthropic-beta", BETA),
        ],
        &body[..],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(answer.header("request-id").unwrap().starts_with("req_"));
    let message = answer.json();
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], "claude-sonnet-4-5");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "Hello from mock anthropic: hi there"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["stop_sequence"], Value::Null);
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 25, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 0, "output_tokens": 12})
    );

    let recorded = state.requests().pop().unwrap();
    assert_eq!(recorded.path, "/v1/messages");
    assert_eq!(recorded.query.as_deref(), Some("beta=true"));
    assert_eq!(&recorded.body[..], &body[..]);
    assert_eq!(recorded.header("anthropic-beta"), Some(BETA));
    assert_eq!(recorded.header("anthropic-version"), Some(VERSION));

    // The control endpoint reports the exact bytes too.
    let listed = send(
        &state,
        Request::get("/__mock/requests")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .json();
    let b64 = listed[0]["body_base64"].as_str().unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        body
    );
    assert_eq!(listed[0]["headers"]["anthropic-beta"], BETA);
}

#[tokio::test]
async fn keys_and_the_version_header_are_required() {
    let state = Arc::new(MockState::default());
    let body = hello(json!({})).to_string();
    let unauthorized = json!({"type": "error", "error": {"type": "authentication_error",
                                                       "message": "invalid x-api-key"}});
    for headers in [
        vec![("anthropic-version", VERSION)],
        vec![
            ("x-api-key", "sk-ant-other"),
            ("anthropic-version", VERSION),
        ],
        // The key belongs in x-api-key, not in a bearer token.
        vec![
            ("authorization", "Bearer sk-ant-api03-mock"),
            ("anthropic-version", VERSION),
        ],
    ] {
        let answer = post(&state, "/v1/messages", &headers, body.clone()).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        let mut error = answer.json();
        assert!(error["request_id"].is_string());
        error.as_object_mut().unwrap().remove("request_id");
        assert_eq!(error, unauthorized);
    }
    let answer = post(
        &state,
        "/v1/messages",
        &[("x-api-key", ANTHROPIC_SECOND_KEY)],
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json()["error"],
        json!({"type": "invalid_request_error", "message": "anthropic-version: header is required"})
    );
    let answer = post(
        &state,
        "/v1/messages",
        &[
            ("x-api-key", ANTHROPIC_SECOND_KEY),
            ("anthropic-version", VERSION),
        ],
        body,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        state.requests().len(),
        5,
        "refused requests are recorded too"
    );
}

#[tokio::test]
async fn bodies_are_validated_like_anthropic_does() {
    let state = Arc::new(MockState::default());
    let messages = json!([{"role": "user", "content": "hi"}]);
    for (body, message) in [
        (
            json!({"max_tokens": 5, "messages": messages}),
            "model: Field required",
        ),
        (
            json!({"model": "m", "messages": messages}),
            "max_tokens: Field required",
        ),
        (
            json!({"model": "m", "max_tokens": 5}),
            "messages: Field required",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            "messages: at least one message is required",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": messages, "anthropic_beta": ["b"]}),
            "anthropic_beta: Extra inputs are not permitted",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
    ] {
        let answer = anthropic(&state, "/v1/messages", &body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer.json()["type"], "error");
        assert_eq!(
            answer.json()["error"],
            json!({"type": "invalid_request_error", "message": message})
        );
    }
    // System turns in `messages` need the mid-conversation-system beta (Claude Code sends both).
    let system_turn = hello(json!({"messages": [
        {"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi again"}]}))
    .to_string();
    let with_beta = post(
        &state,
        "/v1/messages",
        &[
            ("x-api-key", ANTHROPIC_KEY),
            ("anthropic-version", "2023-06-01"),
            (
                "anthropic-beta",
                "claude-code-20250219,mid-conversation-system-2026-04-07",
            ),
        ],
        system_turn.clone(),
    )
    .await;
    assert_eq!(with_beta.status, StatusCode::OK, "{}", with_beta.text());
    let without = post(
        &state,
        "/v1/messages",
        &[
            ("x-api-key", ANTHROPIC_KEY),
            ("anthropic-version", "2023-06-01"),
        ],
        system_turn,
    )
    .await;
    assert_eq!(without.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        without.json()["error"]["message"],
        "messages.1.role: Input should be 'user' or 'assistant'"
    );
    // The newest version refuses the sampling parameters.
    let answer = post(
        &state,
        "/v1/messages",
        &[
            ("x-api-key", ANTHROPIC_KEY),
            ("anthropic-version", "2026-10-21"),
        ],
        hello(json!({"temperature": 0.5})).to_string(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json()["error"]["message"],
        "temperature: Extra inputs are not permitted"
    );
    let missing = anthropic(
        &state,
        "/v1/messages",
        &hello(json!({"model": "claude-missing"})),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"]["type"], "not_found_error");
    let broken = anthropic(
        &state,
        "/v1/messages",
        &hello(json!({"model": "server-error"})),
    )
    .await;
    assert_eq!(broken.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(broken.json()["error"]["type"], "api_error");
}

#[tokio::test]
async fn a_text_stream_follows_anthropics_event_sequence() {
    let state = Arc::new(MockState::default());
    let answer = anthropic(&state, "/v1/messages", &hello(json!({"stream": true}))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let events = sse_events(&answer.text());
    assert_eq!(
        types(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let start = &events[0]["message"];
    assert_eq!(start["model"], "claude-sonnet-4-5");
    assert_eq!(start["content"], json!([]));
    assert_eq!(
        start["usage"],
        json!({"input_tokens": 25, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 0, "output_tokens": 1})
    );
    assert_eq!(
        events[1]["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| {
            assert_eq!(e["delta"]["type"], "text_delta");
            e["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Hello from mock anthropic: hi there");
    assert_eq!(
        events[7],
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": 12}})
    );
}

#[tokio::test]
async fn thinking_tool_use_and_cache_control_streamed_and_not() {
    let state = Arc::new(MockState::default());
    let request = json!({
        "model": "claude-opus-4-6", "max_tokens": 2048,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "lookup_weather", "description": "d",
                   "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}},
                  {"name": "other", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]
    });
    let message = anthropic(&state, "/v1/messages", &request).await.json();
    assert_eq!(
        message["content"],
        json!([
            {"type": "thinking", "thinking": THINKING_TEXT, "signature": THINKING_SIGNATURE},
            {"type": "tool_use", "id": TOOL_USE_ID, "name": "lookup_weather", "input": {"location": "Paris"}}
        ])
    );
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(
        message["usage"]["cache_creation_input_tokens"],
        CACHE_CREATION_TOKENS
    );
    assert_eq!(
        message["usage"]["cache_read_input_tokens"],
        CACHE_READ_TOKENS
    );

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = sse_events(&anthropic(&state, "/v1/messages", &streamed).await.text());
    let deltas: Vec<&str> = events
        .iter()
        .filter_map(|e| e["delta"]["type"].as_str())
        .collect();
    assert_eq!(
        deltas,
        [
            "thinking_delta",
            "thinking_delta",
            "signature_delta",
            "input_json_delta",
            "input_json_delta",
            "input_json_delta"
        ]
    );
    assert_eq!(
        types(&events)[..3],
        ["message_start", "content_block_start", "ping"]
    );
    assert_eq!(
        events[1]["content_block"],
        json!({"type": "thinking", "thinking": "", "signature": ""})
    );
    let thinking: String = events
        .iter()
        .filter_map(|e| e["delta"]["thinking"].as_str())
        .collect();
    assert_eq!(thinking, THINKING_TEXT);
    let tool_start = events
        .iter()
        .find(|e| e["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(tool_start["index"], 1);
    assert_eq!(
        tool_start["content_block"],
        json!({"type": "tool_use", "id": TOOL_USE_ID, "name": "lookup_weather", "input": {}})
    );
    let partial: Vec<&str> = events
        .iter()
        .filter_map(|e| e["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(partial[0], "");
    assert!(partial.len() >= 3);
    let input: Value = serde_json::from_str(&partial.concat()).unwrap();
    assert_eq!(input, json!({"location": "Paris"}));
    assert_eq!(
        events[0]["message"]["usage"]["cache_read_input_tokens"],
        CACHE_READ_TOKENS
    );
    let stop = &events[events.len() - 2];
    assert_eq!(stop["delta"]["stop_reason"], "tool_use");

    // The tool result gets a text quoting it; omitted thinking has empty text.
    let result = json!({
        "model": "claude-opus-4-6", "max_tokens": 2048,
        "thinking": {"type": "enabled", "budget_tokens": 1024, "display": "omitted"},
        "tools": request["tools"],
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [message["content"][0].clone(), message["content"][1].clone()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": TOOL_USE_ID,
                                          "content": [{"type": "text", "text": "21°C, sunny"}]}]}
        ]
    });
    let answer = anthropic(&state, "/v1/messages", &result).await.json();
    assert_eq!(
        answer["content"],
        json!([
            {"type": "thinking", "thinking": "", "signature": THINKING_SIGNATURE},
            {"type": "text", "text": "The tool said: 21°C, sunny"}
        ])
    );
    assert_eq!(answer["stop_reason"], "end_turn");
}

#[tokio::test]
async fn trigger_words_misbehave() {
    let state = Arc::new(MockState::default());
    let ask = |text: &str, stream: bool| {
        hello(json!({"stream": stream, "messages": [{"role": "user", "content": text}]}))
    };
    let limited = anthropic(&state, "/v1/messages", &ask("RATELIMITME", false)).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.header("retry-after"), Some("7"));
    assert_eq!(limited.json()["error"]["type"], "rate_limit_error");

    let overloaded = anthropic(&state, "/v1/messages", &ask("OVERLOADME", true)).await;
    assert_eq!(overloaded.status.as_u16(), 529);
    assert_eq!(
        overloaded.json()["error"],
        json!({"type": "overloaded_error", "message": "Overloaded"})
    );

    let broken = anthropic(&state, "/v1/messages", &ask("MIDSTREAMERROR", true)).await;
    assert_eq!(broken.status, StatusCode::OK);
    let events = sse_events(&broken.text());
    assert_eq!(
        types(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "error"
        ]
    );
    assert!(broken.text().ends_with(
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
    ));

    let truncated = anthropic(&state, "/v1/messages", &ask("TRUNCATEME", true)).await;
    let events = sse_events(&truncated.text());
    assert_eq!(types(&events).last(), Some(&"message_delta"));

    let usage = anthropic(
        &state,
        "/v1/messages",
        &hello(json!({"model": "usage-40-10"})),
    )
    .await;
    assert_eq!(usage.json()["usage"]["input_tokens"], 40);
    assert_eq!(usage.json()["usage"]["output_tokens"], 10);
}

#[tokio::test]
#[allow(clippy::disallowed_methods, reason = "the handle is kept and awaited")]
async fn holdme_waits_for_the_release_and_slowstream_stalls() {
    let state = Arc::new(MockState::default());
    let held = {
        let state = state.clone();
        tokio::spawn(async move {
            anthropic(
                &state,
                "/v1/messages",
                &hello(json!({"messages": [{"role": "user", "content": "HOLDME"}]})),
            )
            .await
            .status
        })
    };
    state.held.notified().await;
    state.release.notify_one();
    assert_eq!(held.await.unwrap(), StatusCode::OK);

    let request = Request::post("/v1/messages")
        .header("x-api-key", ANTHROPIC_KEY)
        .header("anthropic-version", VERSION)
        .body(Body::from(
            hello(json!({"stream": true, "messages": [{"role": "user", "content": "SLOWSTREAM"}]}))
                .to_string(),
        ))
        .unwrap();
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let mut body = response.into_body().into_data_stream();
    use futures_util::StreamExt as _;
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"event: message_start\n"));
    let next = tokio::time::timeout(std::time::Duration::from_millis(50), body.next()).await;
    assert!(next.is_err(), "the stream should stall");
    drop(body);
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        state.stream_dropped.notified(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn count_tokens_and_foundry_share_the_api() {
    let state = Arc::new(MockState::default());
    let body =
        json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]});
    for path in [
        "/v1/messages/count_tokens",
        "/anthropic/v1/messages/count_tokens",
    ] {
        let answer = anthropic(&state, path, &body).await;
        assert_eq!(answer.status, StatusCode::OK);
        let expected = body.to_string().len() as u64 / 4;
        assert_eq!(answer.json(), json!({"input_tokens": expected}));
    }
    let refused = post(
        &state,
        "/anthropic/v1/messages/count_tokens",
        &[("anthropic-version", VERSION)],
        body.to_string(),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // Foundry: the Anthropic API under /anthropic, with x-api-key.
    let foundry = anthropic(&state, "/anthropic/v1/messages", &hello(json!({}))).await;
    assert_eq!(foundry.status, StatusCode::OK);
    assert_eq!(foundry.json()["model"], "claude-sonnet-4-5");
    assert!(foundry.header("x-amzn-requestid").is_none());
}

fn invoke_body(extra: Value) -> Value {
    let mut body = json!({"anthropic_version": BEDROCK_VERSION, "max_tokens": 256,
                          "anthropic_beta": ["interleaved-thinking-2025-05-14"],
                          "messages": [{"role": "user", "content": "hi there"}]});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

async fn invoke(state: &Arc<MockState>, path: &str, body: &Value) -> Answer {
    post(
        state,
        path,
        &[("authorization", &format!("Bearer {API_KEY}"))],
        body.to_string(),
    )
    .await
}

#[tokio::test]
async fn bedrock_invoke_model_answers_claude_messages() {
    let state = Arc::new(MockState::default());
    let answer = invoke(&state, INVOKE_PATH, &invoke_body(json!({}))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(answer.header("x-amzn-requestid").is_some());
    assert_eq!(
        answer.header("x-amzn-bedrock-input-token-count"),
        Some("25")
    );
    assert_eq!(
        answer.header("x-amzn-bedrock-output-token-count"),
        Some("12")
    );
    let message = answer.json();
    assert_eq!(message["type"], "message");
    assert_eq!(message["model"], "claude-3-5-sonnet-20241022");
    assert_eq!(
        message["content"][0]["text"],
        "Hello from mock anthropic: hi there"
    );
    let recorded = state.requests().pop().unwrap();
    assert_eq!(recorded.json(), invoke_body(json!({})));

    for (body, message) in [
        (
            invoke_body(json!({"model": SONNET})),
            "Malformed input request: #: extraneous key [model] is not permitted, please reformat your input and try again.",
        ),
        (
            invoke_body(json!({"stream": true})),
            "Malformed input request: #: extraneous key [stream] is not permitted, please reformat your input and try again.",
        ),
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            "Malformed input request: #: required key [anthropic_version] not found, please reformat your input and try again.",
        ),
        (
            invoke_body(json!({"anthropic_version": VERTEX_VERSION})),
            "Malformed input request: #/anthropic_version: bedrock-2023-05-31 is the only accepted value, please reformat your input and try again.",
        ),
        (
            json!({"anthropic_version": BEDROCK_VERSION, "messages": [{"role": "user", "content": "hi"}]}),
            "Malformed input request: #: required key [max_tokens] not found, please reformat your input and try again.",
        ),
        (
            invoke_body(json!({"anthropic_beta": "x"})),
            "Malformed input request: #/anthropic_beta: expected an array of strings, please reformat your input and try again.",
        ),
    ] {
        let answer = invoke(&state, INVOKE_PATH, &body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            answer
                .header("x-amzn-errortype")
                .unwrap()
                .starts_with("ValidationException:")
        );
        assert_eq!(answer.json(), json!({ "message": message }));
    }

    let unsigned = post(&state, INVOKE_PATH, &[], invoke_body(json!({})).to_string()).await;
    assert_eq!(unsigned.status, StatusCode::FORBIDDEN);
    let revoked = post(
        &state,
        INVOKE_PATH,
        &[("authorization", &format!("Bearer {REVOKED_API_KEY}"))],
        invoke_body(json!({})).to_string(),
    )
    .await;
    assert_eq!(revoked.status, StatusCode::FORBIDDEN);
    let nova = invoke(
        &state,
        "/model/amazon.nova-lite-v1%3A0/invoke",
        &invoke_body(json!({})),
    )
    .await;
    assert_eq!(nova.status, StatusCode::BAD_REQUEST);
    let busy = invoke(
        &state,
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke",
        &invoke_body(json!({})),
    )
    .await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
    let limited = invoke(
        &state,
        INVOKE_PATH,
        &invoke_body(json!({"messages": [{"role": "user", "content": "RATELIMITME"}]})),
    )
    .await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        limited
            .header("x-amzn-errortype")
            .unwrap()
            .starts_with("ThrottlingException:")
    );
}

#[tokio::test]
async fn bedrock_invoke_streams_anthropic_events_in_chunk_frames() {
    let state = Arc::new(MockState::default());
    let body = invoke_body(json!({"thinking": {"type": "enabled", "budget_tokens": 1024}}));
    let answer = invoke(&state, INVOKE_STREAM_PATH, &body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.header("content-type"),
        Some("application/vnd.amazon.eventstream")
    );
    let frames = invoke_frames(&answer.body);
    assert!(
        frames
            .iter()
            .all(|(kind, message_type, _)| kind == "chunk" && message_type == "event")
    );
    let events: Vec<Value> = frames.into_iter().map(|(_, _, event)| event).collect();
    assert_eq!(
        types(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(events[0]["message"]["model"], "claude-3-5-sonnet-20241022");
    let metrics = &events[13]["amazon-bedrock-invocationMetrics"];
    assert_eq!(metrics["inputTokenCount"], 25);
    assert_eq!(metrics["outputTokenCount"], 12);
    assert!(metrics["invocationLatency"].is_u64());
    assert!(metrics["firstByteLatency"].is_u64());

    let broken = invoke(
        &state,
        INVOKE_STREAM_PATH,
        &invoke_body(json!({"messages": [{"role": "user", "content": "MIDSTREAMERROR"}]})),
    )
    .await;
    let frames = invoke_frames(&broken.body);
    let (kind, message_type, _) = frames.last().unwrap();
    assert_eq!(
        (kind.as_str(), message_type.as_str()),
        ("modelStreamErrorException", "exception")
    );
    assert_eq!(frames[frames.len() - 2].2["type"], "content_block_delta");

    let truncated = invoke(
        &state,
        INVOKE_STREAM_PATH,
        &invoke_body(json!({"messages": [{"role": "user", "content": "TRUNCATEME"}]})),
    )
    .await;
    let frames = invoke_frames(&truncated.body);
    assert_eq!(frames.last().unwrap().2["type"], "message_delta");
}

#[tokio::test]
async fn bedrocks_messages_endpoint_takes_sigv4_or_api_keys_and_speaks_sse() {
    let state = Arc::new(MockState::default());
    let body = hello(json!({"model": SONNET, "stream": true})).to_string();
    let mut headers = HeaderMap::new();
    headers.insert("anthropic-version", VERSION.parse().unwrap());
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert(
        "host",
        "bedrock-runtime.us-east-1.amazonaws.com".parse().unwrap(),
    );
    headers.insert("x-amz-date", "20250101T120000Z".parse().unwrap());
    let authorization =
        crate::sigv4::test_authorization("/anthropic/v1/messages", &headers, body.as_bytes());
    let mut request = Request::post("/anthropic/v1/messages");
    for (name, value) in &headers {
        request = request.header(name, value);
    }
    let request = request
        .header("authorization", authorization)
        .body(Body::from(body.clone()))
        .unwrap();
    let answer = send(&state, request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        answer.header("x-amzn-requestid").is_some(),
        "served by Bedrock"
    );
    let events = sse_events(&answer.text());
    assert_eq!(events[0]["message"]["model"], SONNET);
    assert_eq!(types(&events).last(), Some(&"message_stop"));

    let with_key = post(
        &state,
        "/anthropic/v1/messages",
        &[
            ("authorization", &format!("Bearer {API_KEY}")),
            ("anthropic-version", VERSION),
        ],
        hello(json!({"model": SONNET})).to_string(),
    )
    .await;
    assert_eq!(with_key.status, StatusCode::OK);
    assert_eq!(with_key.json()["model"], SONNET);

    let revoked = post(
        &state,
        "/anthropic/v1/messages",
        &[
            ("authorization", &format!("Bearer {REVOKED_API_KEY}")),
            ("anthropic-version", VERSION),
        ],
        hello(json!({"model": SONNET})).to_string(),
    )
    .await;
    assert_eq!(revoked.status, StatusCode::FORBIDDEN);
    assert!(revoked.header("x-amzn-errortype").is_some());

    let no_model = post(
        &state,
        "/anthropic/v1/messages",
        &[
            ("authorization", &format!("Bearer {API_KEY}")),
            ("anthropic-version", VERSION),
        ],
        invoke_body(json!({})).to_string(),
    )
    .await;
    assert_eq!(no_model.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_model.json()["error"]["message"], "model: Field required");
}

async fn vertex(state: &Arc<MockState>, method: &str, token: &str, body: &Value) -> Answer {
    post(
        state,
        &format!("{VERTEX_PATH}:{method}"),
        &[("authorization", &format!("Bearer {token}"))],
        body.to_string(),
    )
    .await
}

#[tokio::test]
async fn vertex_serves_claude_with_raw_predict() {
    let state = Arc::new(MockState::default());
    let body = json!({"anthropic_version": VERTEX_VERSION, "max_tokens": 64,
                      "messages": [{"role": "user", "content": "hi there"}]});
    let answer = vertex(&state, "rawPredict", VERTEX_TOKEN, &body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(
        answer.json()["content"][0]["text"],
        "Hello from mock anthropic: hi there"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let answer = vertex(&state, "streamRawPredict", VERTEX_TOKEN, &streamed).await;
    assert_eq!(answer.status, StatusCode::OK);
    let events = sse_events(&answer.text());
    assert_eq!(types(&events)[0], "message_start");
    assert_eq!(types(&events).last(), Some(&"message_stop"));

    let mut with_model = body.clone();
    with_model["model"] = json!("claude-sonnet-4-5");
    let refused = vertex(&state, "rawPredict", VERTEX_TOKEN, &with_model).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.json()["error"],
        json!({"type": "invalid_request_error", "message": "model: Extra inputs are not permitted"})
    );
    let unversioned = json!({"max_tokens": 64, "messages": body["messages"]});
    let refused = vertex(&state, "rawPredict", VERTEX_TOKEN, &unversioned).await;
    assert_eq!(
        refused.json()["error"]["message"],
        "anthropic_version: Field required"
    );
    let unauthenticated = vertex(&state, "rawPredict", "ya29.unknown", &body).await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unauthenticated.json()["error"]["status"], "UNAUTHENTICATED");
    let mut limited = body.clone();
    limited["messages"][0]["content"] = json!("RATELIMITME");
    let limited = vertex(&state, "rawPredict", VERTEX_TOKEN, &limited).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.json()["error"]["status"], "RESOURCE_EXHAUSTED");
}
