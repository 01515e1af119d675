//! Anthropic Messages API upstreams (DESIGN §17): the Anthropic API and Azure Foundry's Claude
//! endpoint, Claude on Bedrock (InvokeModel and Bedrock's Messages endpoint) and Claude on Vertex.
//!
//! Served paths, one answer engine:
//! - Anthropic API `POST /v1/messages` and `/v1/messages/count_tokens`, Foundry the same under
//!   `/anthropic` (`/anthropic/v1/messages`, …): `x-api-key` must be [`ANTHROPIC_KEY`] or
//!   [`ANTHROPIC_SECOND_KEY`] (else 401 `authentication_error`), `anthropic-version` is required.
//!   The body needs `model`, `max_tokens` and a non-empty `messages`.
//! - Bedrock's Messages endpoint, also `POST /anthropic/v1/messages`: told apart from Foundry by
//!   its credentials (SigV4 `AWS4-HMAC-SHA256`, or a Bedrock API key as Bearer, see
//!   [`has_bedrock_credentials`]); authenticated by [`crate::bedrock`], then answered as the
//!   Anthropic API does (body with `model`, `anthropic-version` header, plain SSE).
//! - Bedrock InvokeModel `POST /model/{id}/invoke` and `/invoke-with-response-stream`, for ids
//!   containing `anthropic.claude` (served through [`crate::bedrock`], which authenticates):
//!   the body carries `anthropic_version: "bedrock-2023-05-31"` ([`BEDROCK_VERSION`]) and no
//!   `model` nor `stream`, else a Bedrock `ValidationException`; `anthropic_beta` is an optional
//!   array. The stream is event-stream frames `:event-type: chunk` whose payload
//!   `{"bytes": base64}` holds one Anthropic event; the `message_stop` event carries
//!   `amazon-bedrock-invocationMetrics`.
//! - Vertex `POST /v1/projects/{p}/locations/{l}/publishers/anthropic/models/{m}:rawPredict` and
//!   `:streamRawPredict` (served through [`crate::google`], which checks the OAuth bearer token):
//!   `anthropic_version: "vertex-2023-10-16"` ([`VERTEX_VERSION`]) and no `model`; whether it
//!   streams follows the body's `stream`, as for the Anthropic API.
//!
//! The answer: a `thinking` block first when `thinking` is enabled (empty text
//! with `display: "omitted"`, always a [`THINKING_SIGNATURE`]); then, when tools are offered and
//! the last user turn mentions "weather", a `tool_use` of the first tool ([`TOOL_USE_ID`], input
//! `{"location":"Paris"}`, `stop_reason: tool_use`); when the last user turn carries a
//! `tool_result`, text quoting it; otherwise `Hello from mock anthropic: <last user text>`.
//! Usage is 25 input and 12 output tokens (`usage-P-C` in the model name or anywhere in the body
//! sets P and C, as in [`crate::openai`]), and [`CACHE_CREATION_TOKENS`] / [`CACHE_READ_TOKENS`]
//! when any part of the request has `cache_control` (0 otherwise). Streams follow Anthropic's
//! documented event sequence: `message_start` (output_tokens 1), the first
//! `content_block_start`, `ping`, the deltas (`text_delta`; `thinking_delta` then
//! `signature_delta`; `input_json_delta` in pieces, the first empty), `content_block_stop`, …,
//! `message_delta` (stop reason, `usage.output_tokens`), `message_stop`; every event is its own
//! chunk. `count_tokens` answers `{"input_tokens": body bytes / 4}` (at least 1).
//!
//! Words in the request body steer it: `RATELIMITME` (429 `rate_limit_error` with `retry-after`;
//! Bedrock: `ThrottlingException`; Vertex: google.rpc `RESOURCE_EXHAUSTED`), `OVERLOADME` (529
//! `overloaded_error`; Bedrock InvokeModel: 503 `ServiceUnavailableException`), `MIDSTREAMERROR`
//! (the stream sends its first text, then `event: error` with an `overloaded_error`, and ends;
//! Bedrock: a `modelStreamErrorException` frame), `TRUNCATEME` (the stream ends before
//! `message_stop`), `HOLDME` (wait for [`MockState::release`]), `SLOWSTREAM` (`message_start`,
//! then nothing until the client goes; signals [`MockState::stream_dropped`]). Models:
//! [`MISSING_MODEL`] is a 404 `not_found_error`, `server-error` a 500 `api_error`. With
//! `anthropic-version: 2026-10-21`, `temperature`, `top_p` and `top_k` are refused (DESIGN §17).
//!
//! Where each shape comes from: `fixtures/README.md`.

use crate::openai::{DropSignal, SERVER_ERROR_MODEL, requested_usage};
use crate::{MockState, Recorded, bedrock, json_response};
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse as _, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;

/// The Anthropic (and Foundry) `x-api-key` the mock accepts.
pub const ANTHROPIC_KEY: &str = "sk-ant-api03-mock-upstream-0123456789abcdefABCDEF-xyzAA";
/// A second accepted key, for tests needing two connections with distinct credentials.
pub const ANTHROPIC_SECOND_KEY: &str = "sk-ant-api03-mock-upstream-second-9876543210-zyxAA";
/// The `anthropic_version` body field Bedrock InvokeModel requires.
pub const BEDROCK_VERSION: &str = "bedrock-2023-05-31";
/// The `anthropic_version` body field Vertex requires.
pub const VERTEX_VERSION: &str = "vertex-2023-10-16";
/// The API version that refuses `temperature`, `top_p` and `top_k` (DESIGN §17).
pub const SAMPLING_FREE_VERSION: &str = "2026-10-21";
/// The beta that lets `messages` carry `role: "system"` turns (Claude Code sends it, and such
/// turns, since 2.1.x); without it a system turn is refused.
pub const MID_CONVERSATION_SYSTEM_BETA: &str = "mid-conversation-system-2026-04-07";
/// A model the Anthropic API does not know (404 `not_found_error`).
pub const MISSING_MODEL: &str = "claude-missing";
/// The id of the `tool_use` blocks the mock answers with.
pub const TOOL_USE_ID: &str = "toolu_01A09q90qw90lq917835lq9";
/// The text of the thinking blocks (unless `display: "omitted"`).
pub const THINKING_TEXT: &str = "The user greets me; a short friendly answer fits.";
/// The signature of the thinking blocks.
pub const THINKING_SIGNATURE: &str =
    "EqQBCkgIARABGAIiQMockSignatureOfTheThinkingBlock0123456789+/abcdefghijklmnopq==";
/// Cache tokens reported when any part of the request has `cache_control`.
pub const CACHE_CREATION_TOKENS: u64 = 1024;
pub const CACHE_READ_TOKENS: u64 = 2048;
/// Default usage: fresh input tokens (the cache tokens come on top) and output tokens.
pub const INPUT_TOKENS: u64 = 25;
pub const OUTPUT_TOKENS: u64 = 12;
/// The `request-id` header of the Anthropic API's answers.
const REQUEST_ID: &str = "req_011CMockAnthropicUpstream0001";

/// Which Anthropic-speaking upstream a request reached: it decides the body's required fields,
/// the error shapes and the stream framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// The Anthropic API or Foundry.
    Anthropic,
    /// Bedrock's Messages endpoint (`/anthropic/v1/messages`).
    BedrockMessages,
    /// Bedrock InvokeModel (`/model/{id}/invoke…`).
    BedrockInvoke,
    /// Vertex `:rawPredict` / `:streamRawPredict`.
    Vertex,
}

/// Whether `path` is a Messages API path: `/v1/messages` or `/v1/messages/count_tokens`,
/// optionally under Foundry's (and Bedrock's) `/anthropic` prefix.
pub fn is_messages_path(path: &str) -> bool {
    let path = path.strip_prefix("/anthropic").unwrap_or(path);
    matches!(path, "/v1/messages" | "/v1/messages/count_tokens")
}

/// Whether `recorded` carries Bedrock credentials (a SigV4 signature, or a bearer token shaped
/// like a Bedrock API key: long-term `ABSK…` or short-term `bedrock-api-key-…`): on
/// `/anthropic/v1/messages` they tell Bedrock's Messages endpoint from Foundry's.
pub fn has_bedrock_credentials(recorded: &Recorded) -> bool {
    let authorization = recorded.header("authorization").unwrap_or_default();
    authorization.starts_with("AWS4-HMAC-SHA256")
        || authorization
            .strip_prefix("Bearer ")
            .is_some_and(|token| token.starts_with("ABSK") || token.starts_with("bedrock-api-key-"))
}

/// The Anthropic API's (and Foundry's) answer to `recorded` (a path [`is_messages_path`]
/// accepted, without Bedrock credentials).
pub async fn answer(mock: &Arc<MockState>, recorded: Recorded) -> Response {
    let key = recorded.header("x-api-key");
    if !key.is_some_and(|k| k == ANTHROPIC_KEY || k == ANTHROPIC_SECOND_KEY) {
        return anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    messages_endpoint(mock, &recorded, Flavor::Anthropic).await
}

/// Bedrock's Messages endpoint, once [`crate::bedrock`] authenticated `recorded`.
pub(crate) async fn bedrock_messages(mock: &Arc<MockState>, recorded: &Recorded) -> Response {
    messages_endpoint(mock, recorded, Flavor::BedrockMessages).await
}

/// `/v1/messages` and `/v1/messages/count_tokens` of the Anthropic API, Foundry or Bedrock.
async fn messages_endpoint(mock: &Arc<MockState>, recorded: &Recorded, flavor: Flavor) -> Response {
    if recorded.method != axum::http::Method::POST {
        return anthropic_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed",
        );
    }
    let Some(version) = recorded.header("anthropic-version") else {
        return invalid_request("anthropic-version: header is required");
    };
    let Ok(request) = serde_json::from_slice::<Value>(&recorded.body) else {
        return invalid_request("There was an error parsing the body of your request: not JSON");
    };
    let count_tokens = recorded.path.ends_with("/count_tokens");
    let system_turns = header_has_system_beta(recorded);
    if let Err(problem) = check(&request, flavor, count_tokens, version, system_turns) {
        return refuse(flavor, &problem);
    }
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    if model == MISSING_MODEL {
        return anthropic_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("model: {model}"),
        );
    }
    if model == SERVER_ERROR_MODEL {
        return anthropic_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "Internal server error",
        );
    }
    if count_tokens {
        return with_request_id(json_response(
            StatusCode::OK,
            &json!({ "input_tokens": (recorded.body.len() as u64 / 4).max(1) }),
        ));
    }
    let streamed = request["stream"] == true;
    generate(mock, &request, &model, flavor, streamed).await
}

/// Bedrock InvokeModel for a Claude model id, once [`crate::bedrock`] authenticated the call
/// and checked the model.
pub(crate) async fn bedrock_invoke(
    mock: &Arc<MockState>,
    recorded: &Recorded,
    model_id: &str,
    streamed: bool,
) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&recorded.body) else {
        return bedrock::aws_error(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            "Malformed JSON",
        );
    };
    // InvokeModel takes the betas in the body.
    let system_turns = request["anthropic_beta"]
        .as_array()
        .is_some_and(|betas| betas.iter().any(|b| b == MID_CONVERSATION_SYSTEM_BETA));
    if let Err(problem) = check(&request, Flavor::BedrockInvoke, false, "", system_turns) {
        return refuse(Flavor::BedrockInvoke, &problem);
    }
    let mut response = generate(
        mock,
        &request,
        &anthropic_model_of(model_id),
        Flavor::BedrockInvoke,
        streamed,
    )
    .await;
    if !streamed && response.status() == StatusCode::OK {
        // InvokeModel repeats the usage in headers.
        let usage = usage_of(&request);
        for (name, value) in [
            ("x-amzn-bedrock-input-token-count", usage.input),
            ("x-amzn-bedrock-output-token-count", usage.output),
            ("x-amzn-bedrock-invocation-latency", 1200),
        ] {
            response
                .headers_mut()
                .insert(name, HeaderValue::from(value));
        }
    }
    response
}

/// Vertex `:rawPredict` / `:streamRawPredict` of `model`, once [`crate::google`] checked the
/// bearer token.
pub(crate) async fn vertex(
    mock: &Arc<MockState>,
    recorded: &Recorded,
    model: &str,
    method: &str,
) -> Response {
    if !matches!(method, "rawPredict" | "streamRawPredict") {
        return crate::google::google_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("method {method} not found"),
            Value::Null,
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(&recorded.body) else {
        return invalid_request("There was an error parsing the body of your request: not JSON");
    };
    let system_turns = header_has_system_beta(recorded);
    if let Err(problem) = check(&request, Flavor::Vertex, false, "", system_turns) {
        return refuse(Flavor::Vertex, &problem);
    }
    // Vertex names versions with `@`; its answers name the model with `-`.
    let model = model.replace('@', "-");
    let streamed = request["stream"] == true;
    generate(mock, &request, &model, Flavor::Vertex, streamed).await
}

/// The Anthropic model name Bedrock answers with for a Bedrock id
/// (`us.anthropic.claude-3-5-sonnet-20241022-v2:0` → `claude-3-5-sonnet-20241022`).
fn anthropic_model_of(model_id: &str) -> String {
    let name = model_id
        .split_once("anthropic.")
        .map_or(model_id, |(_, name)| name);
    // Drop the `-v2:0` style suffix.
    match name.rsplit_once("-v") {
        Some((base, version)) if version.contains(':') => base.to_owned(),
        _ => name.to_owned(),
    }
}

/// What is wrong with a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    Missing(&'static str),
    Extraneous(String),
    /// `anthropic_version` is not this value.
    Version(&'static str),
    NoMessages,
    Invalid(String, &'static str),
}

/// Whether the `anthropic-beta` header names [`MID_CONVERSATION_SYSTEM_BETA`].
fn header_has_system_beta(recorded: &Recorded) -> bool {
    recorded.header("anthropic-beta").is_some_and(|betas| {
        betas
            .split(',')
            .any(|b| b.trim() == MID_CONVERSATION_SYSTEM_BETA)
    })
}

/// What the upstream itself refuses in `request`; `system_turns`: whether the request's betas
/// allow `role: "system"` in `messages`.
fn check(
    request: &Value,
    flavor: Flavor,
    count_tokens: bool,
    version: &str,
    system_turns: bool,
) -> Result<(), Problem> {
    let Some(object) = request.as_object() else {
        return Err(Problem::Invalid(String::new(), "Input should be an object"));
    };
    match flavor {
        Flavor::Anthropic | Flavor::BedrockMessages => {
            if !object.get("model").is_some_and(Value::is_string) {
                return Err(Problem::Missing("model"));
            }
            // The body fields of Bedrock InvokeModel and Vertex: a gateway must not leak them
            // to the Anthropic API.
            if let Some(field) = ["anthropic_version", "anthropic_beta"]
                .into_iter()
                .find(|f| object.contains_key(*f))
            {
                return Err(Problem::Extraneous(field.to_owned()));
            }
        }
        Flavor::BedrockInvoke | Flavor::Vertex => {
            let expected = if flavor == Flavor::Vertex {
                VERTEX_VERSION
            } else {
                BEDROCK_VERSION
            };
            match object.get("anthropic_version") {
                None => return Err(Problem::Missing("anthropic_version")),
                Some(v) if v != expected => return Err(Problem::Version(expected)),
                Some(_) => {}
            }
            if object.contains_key("model") {
                return Err(Problem::Extraneous("model".to_owned()));
            }
        }
    }
    if flavor == Flavor::BedrockInvoke {
        if object.contains_key("stream") {
            return Err(Problem::Extraneous("stream".to_owned()));
        }
        if let Some(beta) = object.get("anthropic_beta")
            && !beta
                .as_array()
                .is_some_and(|b| b.iter().all(Value::is_string))
        {
            return Err(Problem::Invalid(
                "anthropic_beta".to_owned(),
                "expected an array of strings",
            ));
        }
    }
    if !count_tokens {
        match object.get("max_tokens") {
            None => return Err(Problem::Missing("max_tokens")),
            Some(max) if max.as_u64().is_none_or(|m| m < 1) => {
                return Err(Problem::Invalid(
                    "max_tokens".to_owned(),
                    "Input should be a positive integer",
                ));
            }
            Some(_) => {}
        }
    }
    let messages = match object.get("messages") {
        None => return Err(Problem::Missing("messages")),
        Some(Value::Array(messages)) if messages.is_empty() => return Err(Problem::NoMessages),
        Some(Value::Array(messages)) => messages,
        Some(_) => {
            return Err(Problem::Invalid(
                "messages".to_owned(),
                "Input should be a valid list",
            ));
        }
    };
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str();
        if !(matches!(role, Some("user" | "assistant")) || system_turns && role == Some("system")) {
            return Err(Problem::Invalid(
                format!("messages.{i}.role"),
                "Input should be 'user' or 'assistant'",
            ));
        }
        let content = &message["content"];
        if !(content.is_string() || content.is_array()) {
            let what = if content.is_null() {
                "Field required"
            } else {
                "Input should be a valid string or list"
            };
            return Err(Problem::Invalid(format!("messages.{i}.content"), what));
        }
    }
    if version == SAMPLING_FREE_VERSION
        && let Some(field) = ["temperature", "top_p", "top_k"]
            .into_iter()
            .find(|f| object.contains_key(*f))
    {
        return Err(Problem::Extraneous(field.to_owned()));
    }
    Ok(())
}

/// The refusal of `problem`: Anthropic's `invalid_request_error`, or Bedrock's
/// `ValidationException` for InvokeModel.
fn refuse(flavor: Flavor, problem: &Problem) -> Response {
    if flavor == Flavor::BedrockInvoke {
        let detail = match problem {
            Problem::Missing(field) => format!("#: required key [{field}] not found"),
            Problem::Extraneous(field) => format!("#: extraneous key [{field}] is not permitted"),
            Problem::Version(expected) => {
                format!("#/anthropic_version: {expected} is the only accepted value")
            }
            Problem::NoMessages => "#/messages: expected minimum item count: 1, found: 0".into(),
            Problem::Invalid(field, what) => format!("#/{field}: {what}"),
        };
        return bedrock::validation(&format!(
            "Malformed input request: {detail}, please reformat your input and try again."
        ));
    }
    invalid_request(&match problem {
        Problem::Missing(field) => format!("{field}: Field required"),
        Problem::Extraneous(field) => format!("{field}: Extra inputs are not permitted"),
        Problem::Version(expected) => format!("anthropic_version: Input should be '{expected}'"),
        Problem::NoMessages => "messages: at least one message is required".to_owned(),
        Problem::Invalid(field, what) => format!("{field}: {what}"),
    })
}

/// Anthropic's error body (`{"type":"error","error":{type,message},"request_id"}`) with
/// `status` and the `request-id` header.
pub fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    with_request_id(anthropic_json_response(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": REQUEST_ID}),
    ))
}

fn invalid_request(message: &str) -> Response {
    anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn with_request_id(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert("request-id", HeaderValue::from_static(REQUEST_ID));
    response
}

/// The token counts of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    input: u64,
    output: u64,
    cache_creation: u64,
    cache_read: u64,
}

fn usage_of(request: &Value) -> Usage {
    let text = request.to_string();
    let requested = requested_usage(&text);
    let count = |name: &str, default: u64| {
        requested
            .as_ref()
            .and_then(|u| u[name].as_u64())
            .unwrap_or(default)
    };
    // A `"cache_control"` key anywhere (system, messages, tools) marks a cacheable prefix.
    let cached = text.contains("\"cache_control\"");
    Usage {
        input: count("prompt_tokens", INPUT_TOKENS),
        output: count("completion_tokens", OUTPUT_TOKENS),
        cache_creation: if cached { CACHE_CREATION_TOKENS } else { 0 },
        cache_read: if cached { CACHE_READ_TOKENS } else { 0 },
    }
}

/// The answer the mock model gives to `request`: its content blocks and stop reason.
struct Reply {
    blocks: Vec<Value>,
    stop_reason: &'static str,
}

/// The text of a message's `content` (a string, or its `text` blocks joined).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn reply(request: &Value) -> Reply {
    let last_user = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .unwrap_or(&Value::Null);
    let content = &last_user["content"];
    let tool_result = content
        .as_array()
        .and_then(|blocks| blocks.iter().find(|b| b["type"] == "tool_result"));
    let mut blocks = Vec::new();
    let thinking = &request["thinking"];
    if matches!(thinking["type"].as_str(), Some("enabled" | "adaptive")) {
        let text = if thinking["display"] == "omitted" {
            ""
        } else {
            THINKING_TEXT
        };
        blocks.push(json!({"type": "thinking", "thinking": text, "signature": THINKING_SIGNATURE}));
    }
    let first_tool = request["tools"]
        .as_array()
        .and_then(|tools| tools.first())
        .and_then(|tool| tool["name"].as_str());
    let stop_reason = if let Some(result) = tool_result {
        let quoted = text_of(&result["content"]);
        blocks.push(json!({"type": "text", "text": format!("The tool said: {quoted}")}));
        "end_turn"
    } else if let Some(name) = first_tool.filter(|_| text_of(content).contains("weather")) {
        blocks.push(json!({"type": "tool_use", "id": TOOL_USE_ID, "name": name,
                           "input": {"location": "Paris"}}));
        "tool_use"
    } else {
        let text = format!("Hello from mock anthropic: {}", text_of(content));
        blocks.push(json!({"type": "text", "text": text}));
        "end_turn"
    };
    Reply {
        blocks,
        stop_reason,
    }
}

/// A `msg_…` id, distinct per answer.
fn message_id(mock: &MockState) -> String {
    format!("msg_01MockAnthropic{:010}", mock.next_request_number())
}

/// The full Message JSON.
fn message(id: &str, model: &str, reply: &Reply, usage: Usage) -> Value {
    json!({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": reply.blocks, "stop_reason": reply.stop_reason, "stop_sequence": null,
        "usage": {"input_tokens": usage.input, "cache_creation_input_tokens": usage.cache_creation,
                  "cache_read_input_tokens": usage.cache_read, "output_tokens": usage.output}
    })
}

/// `text` in up to three pieces cut at spaces (each piece keeps its trailing space).
pub(crate) fn pieces(text: &str, count: usize) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let per_piece = words.len().div_ceil(count).max(1);
    words.chunks(per_piece).map(|c| c.concat()).collect()
}

/// Anthropic's stream events for the answer, in order (each a JSON object with its `type`).
fn stream_events(id: &str, model: &str, reply: &Reply, usage: Usage) -> Vec<Value> {
    let mut events = vec![json!({"type": "message_start", "message": {
        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": usage.input, "cache_creation_input_tokens": usage.cache_creation,
                  "cache_read_input_tokens": usage.cache_read, "output_tokens": 1}}})];
    for (index, block) in reply.blocks.iter().enumerate() {
        let delta =
            |delta: Value| json!({"type": "content_block_delta", "index": index, "delta": delta});
        let (start, deltas) = match block["type"].as_str() {
            Some("thinking") => {
                let text = block["thinking"].as_str().unwrap_or_default();
                let mut deltas: Vec<Value> = pieces(text, 2)
                    .into_iter()
                    .map(|p| delta(json!({"type": "thinking_delta", "thinking": p})))
                    .collect();
                deltas.push(delta(json!({"type": "signature_delta",
                                         "signature": block["signature"]})));
                (
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    deltas,
                )
            }
            Some("tool_use") => {
                let input = block["input"].to_string();
                let cut = input.find(':').map_or(input.len(), |at| at + 1);
                let (head, tail) = input.split_at(cut);
                let deltas = ["", head, tail]
                    .into_iter()
                    .map(|p| delta(json!({"type": "input_json_delta", "partial_json": p})))
                    .collect();
                (
                    json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}),
                    deltas,
                )
            }
            _ => {
                let text = block["text"].as_str().unwrap_or_default();
                let deltas = pieces(text, 3)
                    .into_iter()
                    .map(|p| delta(json!({"type": "text_delta", "text": p})))
                    .collect();
                (json!({"type": "text", "text": ""}), deltas)
            }
        };
        events.push(json!({"type": "content_block_start", "index": index, "content_block": start}));
        if index == 0 {
            // Where Anthropic's documented example stream has its ping.
            events.push(json!({"type": "ping"}));
        }
        events.extend(deltas);
        events.push(json!({"type": "content_block_stop", "index": index}));
    }
    events.push(json!({"type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": null},
        "usage": {"output_tokens": usage.output}}));
    events.push(json!({"type": "message_stop"}));
    events
}

/// `value` as JSON text with `type` first in every object, as Anthropic (and OpenAI's Responses
/// stream) writes it (serde_json's maps are sorted, which would put `type` after `error`,
/// `delta`, `message`, …).
pub(crate) fn to_anthropic_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                out.push('{');
                let typed = map.get_key_value("type").into_iter();
                let rest = map.iter().filter(|(key, _)| *key != "type");
                for (i, (key, value)) in typed.chain(rest).enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write(value, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// `body` (see [`to_anthropic_json`]) as `application/json` with `status`.
fn anthropic_json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        to_anthropic_json(body),
    )
        .into_response()
}

/// One SSE event as Anthropic frames it: `event: <type>` then `data: <json>`.
fn sse_event(event: &Value) -> Bytes {
    let kind = event["type"].as_str().unwrap_or("message");
    Bytes::from(format!(
        "event: {kind}\ndata: {}\n\n",
        to_anthropic_json(event)
    ))
}

/// The overload error event a stream ends with on `MIDSTREAMERROR`.
fn overloaded_event() -> Value {
    json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
}

/// The answer to a valid generation request: the triggers' misbehaviours, else the Message or
/// its stream, framed for `flavor`.
async fn generate(
    mock: &Arc<MockState>,
    request: &Value,
    model: &str,
    flavor: Flavor,
    streamed: bool,
) -> Response {
    let text = request.to_string();
    if let Some(response) = refused_by_trigger(flavor, &text) {
        return response;
    }
    if text.contains("HOLDME") {
        mock.held.notify_one();
        mock.release.notified().await;
    }
    let usage = usage_of(request);
    let reply = reply(request);
    let id = message_id(mock);
    if !streamed {
        let response = anthropic_json_response(StatusCode::OK, &message(&id, model, &reply, usage));
        return match flavor {
            Flavor::Anthropic => with_request_id(response),
            _ => response,
        };
    }
    let mut events = stream_events(&id, model, &reply, usage);
    if text.contains("SLOWSTREAM") {
        events.truncate(1);
        return slow_stream(mock, flavor, events);
    }
    let midstream_error = text.contains("MIDSTREAMERROR");
    if midstream_error {
        // message_start, the first block's start, ping, its first delta.
        events.truncate(4);
    } else if text.contains("TRUNCATEME") {
        events.pop();
    }
    if flavor == Flavor::BedrockInvoke {
        if let Some(stop) = events.last_mut().filter(|e| e["type"] == "message_stop") {
            stop["amazon-bedrock-invocationMetrics"] = json!({
                "inputTokenCount": usage.input, "outputTokenCount": usage.output,
                "invocationLatency": 1200, "firstByteLatency": 300,
                "cacheReadInputTokenCount": usage.cache_read,
                "cacheWriteInputTokenCount": usage.cache_creation});
        }
        let mut frames: Vec<u8> = events.iter().flat_map(chunk_frame).collect();
        if midstream_error {
            frames.extend(bedrock::exception(
                "modelStreamErrorException",
                bedrock::MODEL_STREAM_ERROR,
            ));
        }
        return bedrock::event_stream(bedrock::in_odd_pieces(&frames));
    }
    if midstream_error {
        events.push(overloaded_event());
    }
    let chunks: Vec<Result<Bytes, Infallible>> = events.iter().map(|e| Ok(sse_event(e))).collect();
    sse_response(
        flavor,
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
}

/// The refusals asked for by `RATELIMITME` and `OVERLOADME`, in `flavor`'s shape.
fn refused_by_trigger(flavor: Flavor, text: &str) -> Option<Response> {
    if text.contains("RATELIMITME") {
        return Some(match flavor {
            Flavor::BedrockInvoke => bedrock::aws_error(
                StatusCode::TOO_MANY_REQUESTS,
                "ThrottlingException",
                bedrock::THROTTLED,
            ),
            Flavor::Vertex => crate::google::google_error(
                StatusCode::TOO_MANY_REQUESTS,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: anthropic-claude. Please submit a quota increase request.",
                Value::Null,
            ),
            Flavor::Anthropic | Flavor::BedrockMessages => {
                let mut response = anthropic_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "This request would exceed the rate limit for your organization of 50 requests per minute. Please retry after 7 seconds.",
                );
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from_static("7"));
                response
            }
        });
    }
    if text.contains("OVERLOADME") {
        return Some(if flavor == Flavor::BedrockInvoke {
            bedrock::aws_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
                "Bedrock is unable to process your request.",
            )
        } else {
            // 529 is Anthropic's own status for an overloaded API.
            let overloaded = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            anthropic_error(overloaded, "overloaded_error", "Overloaded")
        });
    }
    None
}

/// One InvokeModelWithResponseStream frame: `:event-type: chunk`, payload
/// `{"bytes": base64(event)}` (with Bedrock's padding field).
fn chunk_frame(event: &Value) -> Vec<u8> {
    let bytes = base64::engine::general_purpose::STANDARD.encode(to_anthropic_json(event));
    bedrock::event("chunk", json!({ "bytes": bytes }))
}

fn sse_response(flavor: Flavor, body: Body) -> Response {
    let response = ([("content-type", "text/event-stream; charset=utf-8")], body).into_response();
    match flavor {
        Flavor::Anthropic => with_request_id(response),
        _ => response,
    }
}

/// `events` (framed for `flavor`), then nothing until the client goes away, which signals
/// [`MockState::stream_dropped`].
fn slow_stream(mock: &Arc<MockState>, flavor: Flavor, events: Vec<Value>) -> Response {
    let first: Bytes = if flavor == Flavor::BedrockInvoke {
        events
            .iter()
            .flat_map(chunk_frame)
            .collect::<Vec<u8>>()
            .into()
    } else {
        events
            .iter()
            .flat_map(sse_event)
            .collect::<Vec<u8>>()
            .into()
    };
    let guard = DropSignal(mock.clone());
    let stream = futures_util::stream::unfold((Some(first), guard), |(first, guard)| async move {
        match first {
            Some(first) => Some((Ok::<_, Infallible>(first), (None, guard))),
            None => {
                std::future::pending::<()>().await;
                None
            }
        }
    });
    let body = Body::from_stream(stream);
    if flavor == Flavor::BedrockInvoke {
        bedrock::event_stream(body)
    } else {
        sse_response(flavor, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_paths_and_bedrock_model_names() {
        assert!(is_messages_path("/v1/messages"));
        assert!(is_messages_path("/anthropic/v1/messages/count_tokens"));
        assert!(!is_messages_path("/v1/messages/batches"));
        assert!(!is_messages_path("/v1/chat/completions"));
        assert_eq!(
            anthropic_model_of("us.anthropic.claude-3-5-sonnet-20241022-v2:0"),
            "claude-3-5-sonnet-20241022"
        );
        assert_eq!(
            anthropic_model_of("anthropic.claude-opus-4-6"),
            "claude-opus-4-6"
        );
    }

    #[test]
    fn json_is_written_type_first() {
        let event = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        assert_eq!(
            to_anthropic_json(&event),
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
        );
        let nested = json!({"a": [1, {"z": null, "type": "t"}], "type": "x", "s": "q\""});
        let written = to_anthropic_json(&nested);
        assert!(
            written.starts_with(r#"{"type":"x","a":[1,{"type":"t","z":null}]"#),
            "{written}"
        );
        assert_eq!(serde_json::from_str::<Value>(&written).unwrap(), nested);
    }

    #[test]
    fn text_pieces_join_back() {
        let text = "Hello from mock anthropic: hi there";
        let cut = pieces(text, 3);
        assert_eq!(cut.len(), 3);
        assert_eq!(cut.concat(), text);
        assert_eq!(pieces("", 3).concat(), "");
    }
}
