//! OpenAI and Azure OpenAI (wire formats §1, §2): chat completions (JSON and SSE, with the usage
//! chunk only when `stream_options.include_usage` asks for it, Azure's content-filter chunks and
//! `prompt_filter_results`) and embeddings (float or base64), behind OpenAI's `Authorization:
//! Bearer` or Azure's `api-key` and `api-version`.
//!
//! Words in the request body steer it: `RATELIMITME` (Azure 429 with `retry-after`), `BLOCKME`
//! (Azure content filter 400), `HOLDME` (wait for [`MockState::release`]), `SLOWHEAD` (never
//! answer), `SLOWBODY` (a 200 head and the start of its body, then nothing), `SLOWSTREAM` (one
//! event, then nothing), `REDIRECTME` (a 307 to this same path), and the upstream garbage of DESIGN §19:
//! `NOTJSON`, `TRUNCATEME`, `DECLARE200MB`, `UNDECLARED200MB`, `LINE50MB`, `ENDLESSERROR`.
//!
//! The remote model name the gateway sends steers the contents of an authenticated answer:
//! `server-error` answers OpenAI's 500 (`server_error`, as [`server_error`]), and `usage-P-C`
//! (e.g. `usage-40-10`) makes the chat completion, and the usage chunk of a stream, report P
//! prompt and C completion tokens instead of the defaults (8 + 9, 12 + 3 streamed);
//! `usage-P-C-K-R` adds the details of a reasoning model with a cache hit: K of the P prompt
//! tokens read from the cache (`prompt_tokens_details.cached_tokens`) and R of the C completion
//! tokens spent reasoning (`completion_tokens_details.reasoning_tokens`). A test whose model
//! name is asserted elsewhere can put the marker in a message instead: the first one anywhere
//! in the request body counts.
//!
//! Both [`OPENAI_KEY`] and [`OPENAI_SECOND_KEY`] are accepted, for tests needing two distinct
//! credentials.
//!
//! A chat request whose `tools` declare a function named `get_weather` gets a call to it
//! ([`WEATHER_CALL_ID`], arguments `{"city":"Paris"}`, `finish_reason: tool_calls`); streamed, the
//! call's arguments arrive in two `tool_calls` deltas after the one carrying its id and name.

use crate::{MockState, Recorded, json_response, lazy_body};
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse as _, Response};
use serde_json::{Value, json};
use std::sync::Arc;

/// The OpenAI key the mock accepts.
pub const OPENAI_KEY: &str = "sk-upstream-openai-0123456789";
/// A second OpenAI key the mock accepts (for two connections with distinct credentials).
pub const OPENAI_SECOND_KEY: &str = "sk-upstream-openai-second-9876543210";
/// The Azure `api-key` the mock accepts.
pub const AZURE_KEY: &str = "azure-upstream-key-abcdef";

const MIB: usize = 1024 * 1024;

/// An OpenAI chat completion from `model` (8 prompt, 9 completion tokens).
pub fn chat_completion(model: &str) -> Value {
    json!({
        "id": "chatcmpl-B9x1", "object": "chat.completion", "created": 1755133833, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": null, "annotations": []},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17},
        "service_tier": "default", "system_fingerprint": null
    })
}

/// OpenAI's error body with `status`.
pub fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: impl Into<Value>,
) -> Response {
    let code: Value = code.into();
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

fn event_stream(body: Body, request_id: Option<&'static str>) -> Response {
    let mut response =
        ([("content-type", "text/event-stream; charset=utf-8")], body).into_response();
    if let Some(id) = request_id {
        response
            .headers_mut()
            .insert("x-request-id", HeaderValue::from_static(id));
    }
    response
}

fn sse(events: &[Value], done: bool) -> String {
    let mut out = String::new();
    for e in events {
        out.push_str("data: ");
        out.push_str(&e.to_string());
        out.push_str("\n\n");
    }
    if done {
        out.push_str("data: [DONE]\n\n");
    }
    out
}

fn stream_events(model: &str, include_usage: bool, azure: bool) -> Vec<Value> {
    let usage = if include_usage {
        json!(null)
    } else {
        Value::Null
    };
    let mut events = Vec::new();
    if azure {
        events.push(json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": false, "severity": "safe"}}}]}));
    }
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1755137933, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = usage.clone();
        }
        c
    };
    events.push(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ));
    events.push(chunk(json!({"content": "Hi"}), Value::Null));
    events.push(chunk(json!({"content": " there"}), Value::Null));
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1755137933, "model": model,
            "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}));
    }
    events
}

/// Signals `stream_dropped` when the body holding it is dropped.
pub(crate) struct DropSignal(pub(crate) Arc<MockState>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.stream_dropped.notify_one();
    }
}

/// The answer of OpenAI or Azure (by path) to `recorded`.
pub async fn answer(mock: &Arc<MockState>, recorded: Recorded) -> Response {
    let Recorded {
        path,
        query,
        headers,
        body,
        ..
    } = recorded;
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let text = json.to_string();
    let azure = path.starts_with("/openai/deployments/");
    if azure {
        if headers.get("api-key").and_then(|v| v.to_str().ok()) != Some(AZURE_KEY) {
            return (StatusCode::UNAUTHORIZED, [("content-type", "application/json")],
                json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}}).to_string()).into_response();
        }
        if !query
            .as_deref()
            .unwrap_or_default()
            .contains("api-version=")
        {
            return (
                StatusCode::NOT_FOUND,
                json!({"error": {"code": "404", "message": "Resource not found"}}).to_string(),
            )
                .into_response();
        }
        let version = query.as_deref().unwrap_or_default();
        if json.get("stream_options").is_some()
            && version.contains("api-version=2024-05-01-preview")
        {
            return (StatusCode::BAD_REQUEST, [("content-type", "application/json")],
                json!({"error": {"message": "Unrecognized request argument supplied: stream_options", "type": "invalid_request_error", "param": null, "code": null}}).to_string()).into_response();
        }
        if path.contains("/deployments/missing/") {
            return (StatusCode::NOT_FOUND, [("content-type", "application/json")],
                json!({"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."}}).to_string()).into_response();
        }
        if text.contains("BLOCKME") {
            return (StatusCode::BAD_REQUEST, [("content-type", "application/json")],
                json!({"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.", "type": null, "param": "prompt", "code": "content_filter", "status": 400,
                    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {"jailbreak": {"filtered": true, "detected": true}}}}}).to_string()).into_response();
        }
        if text.contains("RATELIMITME") {
            return (StatusCode::TOO_MANY_REQUESTS, [("content-type", "application/json"), ("retry-after", "7"), ("retry-after-ms", "6500")],
                json!({"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-05-01-preview have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 7 seconds."}}).to_string()).into_response();
        }
    } else if !accepted_bearer(headers.get("authorization").and_then(|v| v.to_str().ok())) {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided: sk-up***789.",
            "invalid_request_error",
            "invalid_api_key",
        );
    }
    let model = json["model"].as_str().unwrap_or("unknown").to_owned();
    if model == SERVER_ERROR_MODEL {
        return server_error();
    }
    if text.contains("HOLDME") {
        mock.held.notify_one();
        mock.release.notified().await;
    }
    if text.contains("SLOWHEAD") {
        std::future::pending::<()>().await;
    }
    if text.contains("SLOWBODY") {
        let start = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(Bytes::from_static(b"{\"id\":\"chatcmpl-slow\","))
        });
        let body = futures_util::StreamExt::chain(start, futures_util::stream::pending());
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            Body::from_stream(body),
        )
            .into_response();
    }
    if text.contains("REDIRECTME") {
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [("location", path.to_owned())],
        )
            .into_response();
    }
    if let Some(response) = garbage_answer(mock, &text) {
        return response;
    }
    if path.ends_with("/embeddings") {
        let base64 = json["encoding_format"] == "base64";
        let vector = [0.25f32, -0.5, 1.0];
        let embedding = if base64 {
            use base64::Engine as _;
            let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(vector)
        };
        return (StatusCode::OK, [("content-type", "application/json")],
            json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
                   "model": model, "usage": {"prompt_tokens": 7, "total_tokens": 7}}).to_string()).into_response();
    }
    if wants_weather_call(&json) {
        return weather_call_answer(&model, &json);
    }
    if json["stream"] == true {
        let include_usage = json["stream_options"]["include_usage"] == true;
        let events = stream_events(&model, include_usage, azure);
        let events = with_requested_usage(events, &text);
        if text.contains("SLOWSTREAM") {
            let first = format!("data: {}\n\n", events[0]);
            let guard = DropSignal(mock.clone());
            let stream = futures_util::stream::unfold((0, guard), move |(i, guard)| {
                let first = first.clone();
                async move {
                    if i == 0 {
                        Some((Ok::<_, std::io::Error>(Bytes::from(first)), (1, guard)))
                    } else {
                        std::future::pending::<()>().await;
                        None
                    }
                }
            });
            return event_stream(Body::from_stream(stream), None);
        }
        return event_stream(
            Body::from(sse(&events, true)),
            Some("req_0b2a28d2d6414b5a94c1c7933cf7c1a6"),
        );
    }
    let mut answer = chat_completion(&model);
    if let Some(usage) = requested_usage(&text) {
        answer["usage"] = usage;
    }
    if azure {
        answer["prompt_filter_results"] =
            json!([{"prompt_index": 0, "content_filter_results": {}}]);
    }
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("x-request-id", "req_abc"),
        ],
        answer.to_string(),
    )
        .into_response()
}

/// The upstream garbage of DESIGN §19, by trigger word: a 200 that is not JSON, a stream that
/// ends without `[DONE]`, a 200 declaring 200 MB (and sending them if read), 200 MB without a
/// declared length, a 50 MB SSE line, an error answer with an endless body.
pub(crate) fn garbage_answer(mock: &MockState, text: &str) -> Option<Response> {
    let produced = mock.produced.clone();
    let answer = |status: StatusCode, content_type: &'static str, body: Body| {
        (status, [("content-type", content_type)], body).into_response()
    };
    Some(if text.contains("NOTJSON") {
        answer(
            StatusCode::OK,
            "text/html",
            Body::from("<html><body>upstream proxy error</body></html>"),
        )
    } else if text.contains("TRUNCATEME") {
        let mut events = stream_events("gpt-4-turbo-preview", true, false);
        events.truncate(3);
        answer(
            StatusCode::OK,
            "text/event-stream",
            Body::from(sse(&events, false)),
        )
    } else if text.contains("UNDECLARED200MB") {
        answer(
            StatusCode::OK,
            "application/json",
            lazy_body(b"{\"id\":\"", b'a', 200 * MIB, produced),
        )
    } else if text.contains("DECLARE200MB") {
        let mut response = answer(
            StatusCode::OK,
            "application/json",
            lazy_body(b"{\"id\":\"", b'a', 200 * MIB, produced),
        );
        response
            .headers_mut()
            .insert("content-length", HeaderValue::from(200 * MIB));
        response
    } else if text.contains("LINE50MB") {
        answer(
            StatusCode::OK,
            "text/event-stream",
            lazy_body(b"data: {\"id\":\"", b'a', 50 * MIB, produced),
        )
    } else if text.contains("ENDLESSERROR") {
        answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            lazy_body(b"the upstream is melting: ", b'a', 200 * MIB, produced),
        )
    } else {
        return None;
    })
}

/// The remote model name answered with OpenAI's 500.
pub const SERVER_ERROR_MODEL: &str = "server-error";

/// Whether `authorization` is `Bearer` with one of the OpenAI keys the mock accepts.
fn accepted_bearer(authorization: Option<&str>) -> bool {
    authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|key| key == OPENAI_KEY || key == OPENAI_SECOND_KEY)
}

/// OpenAI's 500 (`server_error`, with its usual message).
pub fn server_error() -> Response {
    openai_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        Value::Null,
    )
}

/// The usage object asked for by the first `usage-P-C` or `usage-P-C-K-R` in `text` (P prompt
/// tokens of which K cached, C completion tokens of which R reasoning), if any.
pub fn requested_usage(text: &str) -> Option<Value> {
    fn number(text: &str) -> Option<(u64, &str)> {
        let end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        Some((text[..end].parse().ok()?, &text[end..]))
    }
    text.match_indices("usage-").find_map(|(at, marker)| {
        let (prompt, rest) = number(&text[at + marker.len()..])?;
        let (completion, rest) = number(rest.strip_prefix('-')?)?;
        let mut usage = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        });
        let details = rest
            .strip_prefix('-')
            .and_then(number)
            .and_then(|(cached, rest)| Some((cached, number(rest.strip_prefix('-')?)?.0)));
        if let Some((cached, reasoning)) = details {
            // As OpenAI writes them (wire formats §1.7).
            usage["prompt_tokens_details"] = json!({"cached_tokens": cached, "audio_tokens": 0});
            usage["completion_tokens_details"] = json!({
                "reasoning_tokens": reasoning, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
            });
        }
        Some(usage)
    })
}

/// `events` with the usage of the last chunk carrying one replaced by [`requested_usage`].
fn with_requested_usage(mut events: Vec<Value>, text: &str) -> Vec<Value> {
    if let Some(usage) = requested_usage(text)
        && let Some(last) = events.iter_mut().rev().find(|e| e["usage"].is_object())
    {
        last["usage"] = usage;
    }
    events
}

/// The id of the `get_weather` call the mock makes.
pub const WEATHER_CALL_ID: &str = "call_1";

/// Whether the request's `tools` declare a `get_weather` function.
fn wants_weather_call(request: &Value) -> bool {
    request["tools"]
        .as_array()
        .is_some_and(|tools| tools.iter().any(|t| t["function"]["name"] == "get_weather"))
}

/// A call to `get_weather` for Paris (wire formats §1: `tool_calls` in the message, or in
/// `delta.tool_calls` with the id and name first and the arguments in pieces).
fn weather_call_answer(model: &str, request: &Value) -> Response {
    let call = |arguments: &str| {
        json!({"id": WEATHER_CALL_ID, "type": "function",
        "function": {"name": "get_weather", "arguments": arguments}})
    };
    if request["stream"] != true {
        let mut answer = chat_completion(model);
        answer["choices"][0]["message"] = json!({"role": "assistant", "content": null,
            "tool_calls": [call("{\"city\":\"Paris\"}")], "refusal": null, "annotations": []});
        answer["choices"][0]["finish_reason"] = json!("tool_calls");
        return json_response(StatusCode::OK, &answer);
    }
    let include_usage = request["stream_options"]["include_usage"] == true;
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1755137933, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let arguments =
        |piece: &str| json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]});
    let mut first = call("");
    first["index"] = json!(0);
    let mut events = vec![
        chunk(
            json!({"role": "assistant", "content": null, "tool_calls": [first]}),
            Value::Null,
        ),
        chunk(arguments("{\"city\":"), Value::Null),
        chunk(arguments("\"Paris\"}"), Value::Null),
        chunk(json!({}), json!("tool_calls")),
    ];
    if include_usage {
        events.push(json!({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1755137933, "model": model,
            "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}));
    }
    event_stream(Body::from(sse(&events, true)), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_declared_get_weather_function_gets_a_tool_call() {
        let weather = json!({"tools": [{"type": "function", "function": {"name": "get_weather"}}]});
        assert!(wants_weather_call(&weather));
        let other = json!({"tools": [{"type": "function", "function": {"name": "f"}}]});
        assert!(!wants_weather_call(&other));
        assert!(!wants_weather_call(&json!({"messages": []})));
    }
}
