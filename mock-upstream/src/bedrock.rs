//! AWS Bedrock Runtime (wire formats §5): `POST /model/{percent-encoded model id}/converse` and
//! `/converse-stream`; for Claude ids (containing `anthropic.claude`) also InvokeModel
//! `/invoke` and `/invoke-with-response-stream`, and Bedrock's Messages endpoint
//! `/anthropic/v1/messages`, both authenticated here and answered by [`crate::anthropic`].
//!
//! Every call is authenticated first, as at AWS: a Bedrock API key as `Authorization: Bearer`
//! ([`API_KEY`]), or an AWS Signature V4 that [`crate::sigv4`] recomputes. Then the model:
//! [`SONNET`] and [`NOVA_PRO`] answer, [`OPUS`] is refused (`AccessDeniedException`), [`BUSY`] is throttled on
//! every call (429 `ThrottlingException`, streamed or not), [`FLAKY`] fails (424
//! `ModelErrorException` on Converse; on ConverseStream, a `modelStreamErrorException` frame after
//! the first text), any other id is invalid.
//! The body must be JSON that Converse itself would accept ([`check_converse_request`]).
//!
//! Answers: Converse JSON; ConverseStream as real binary `application/vnd.amazon.eventstream`
//! frames (both CRC32s, `:event-type` / `:content-type` / `:message-type` headers, the random
//! `"p"` padding field) sent in odd-sized pieces so that frames straddle chunks; errors as JSON
//! `{"message"}` named by `x-amzn-ErrorType`; `x-amzn-RequestId` on every answer (also recorded
//! in [`Recorded::request_id`]). Where each shape comes from: `fixtures/README.md`.
//!
//! Words in the request body steer it: `RATELIMITME` (429 `ThrottlingException`), and on
//! ConverseStream `THROTTLEFIRST` (an exception frame before any event), `THROTTLEMIDSTREAM` (an
//! exception frame after some text), `NOMETADATA` (the stream ends after `messageStop`),
//! `CORRUPTME` (a frame with a bad message CRC, then valid frames), `HUGEFRAME` (a prelude
//! declaring 4 GiB, then 200 MB counted in [`MockState::produced`]). A last turn asking about the
//! "weather" with tools offered gets tool calls; a tool result gets the final answer.

use crate::sigv4::{self, AuthFailure, refused};
use crate::{MockState, Recorded, json_response, lazy_body};
use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue as FrameValue, Message};
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// The Bedrock API key the mock accepts (long-term keys start with `ABSK`).
pub const API_KEY: &str =
    "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxlLWF0LTEyMzQ1Njc4OTAxMjpabTl2WW1GeVltRjZjWFY0";
/// A well-formed Bedrock API key the mock refuses, as a revoked one.
pub const REVOKED_API_KEY: &str =
    "ABSKQmVkcm9ja0FQSUtleS1yZXZva2VkLWF0LTEyMzQ1Njc4OTAxMjpjbVYyYjJ0bFpHdGxlUT09";
/// The model that answers: an inference-profile id (geo prefix and a `:`).
pub const SONNET: &str = "us.anthropic.claude-3-5-sonnet-20241022-v2:0";
pub const SONNET_CONVERSE_PATH: &str =
    "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse";
pub const SONNET_STREAM_PATH: &str =
    "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse-stream";
/// A model that is not Claude and answers Converse as [`SONNET`] does: the gateway calls Claude
/// ids through InvokeModel or the Messages endpoint (DESIGN §17), so tests of Converse itself use
/// this one.
pub const NOVA_PRO: &str = "amazon.nova-pro-v1:0";
/// A model the credentials have no access to.
pub const OPUS: &str = "anthropic.claude-opus-4-20250514-v1:0";
/// The ids of the tool calls the mock makes.
pub const TOOL_USE_ID: &str = "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q";
pub const TOOL_USE_ID_2: &str = "tooluse_Xq3vN0pLSa2iB7dWm9eK1g";
/// The message of `RATELIMITME`'s `ThrottlingException`.
pub const THROTTLED: &str = "Too many requests, please wait before trying again.";
/// The message of the `AccessDeniedException` for [`OPUS`].
pub const NO_ACCESS: &str = "You don't have access to the model with the specified model ID.";
/// The `ValidationException` of a conversation not starting with a user turn.
pub const START_WITH_USER: &str = "A conversation must start with a user message. Try again with a conversation that starts with a user message.";

/// The message of the exception frames.
const TOO_MANY_TOKENS: &str = "Too many tokens, please wait before trying again.";

/// `recorded` with the `x-amzn-RequestId` the mock will answer it with: a UUID, as AWS's; for
/// a golden fixture's request, the fixture's own id, or none when the fixture has none (its
/// snapshot was made without one).
pub async fn with_request_id(mock: &MockState, mut recorded: Recorded) -> Recorded {
    recorded.request_id = match golden_of(&recorded).await {
        Some(golden) => golden.case["request_id"].as_str().map(str::to_owned),
        None => {
            let n = mock.next_request_number();
            Some(format!("6f2d1c1e-3b7a-4c2e-9d41-{n:012x}"))
        }
    };
    recorded
}

/// The golden fixture whose Converse request `recorded` is (see [`crate::golden`]).
async fn golden_of(recorded: &Recorded) -> Option<&'static crate::golden::Golden> {
    let (segment, op) = recorded
        .path
        .strip_prefix("/model/")
        .and_then(|rest| rest.split_once('/'))?;
    let streamed = match op {
        "converse" => false,
        "converse-stream" => true,
        _ => return None,
    };
    let model = percent_decode(segment)?;
    let request = serde_json::from_slice::<Value>(&recorded.body).ok()?;
    crate::golden::find(
        crate::golden::GoldenProvider::Bedrock,
        &model,
        streamed,
        &request,
    )
    .await
}

/// A golden fixture's Converse answer: its `answer`, or its `stream` entries as binary frames
/// (`{"event"|"exception": name, "payload": {...}}`, `"corrupt_crc": true` flipping the message
/// CRC), sent in odd-sized pieces.
fn golden_answer(golden: &crate::golden::Golden) -> Response {
    let Some(entries) = golden.case["stream"].as_array() else {
        return json_response(StatusCode::OK, &golden.case["answer"]);
    };
    let mut bytes = Vec::new();
    for entry in entries {
        let (kind, name, message_type) =
            match (entry["event"].as_str(), entry["exception"].as_str()) {
                (Some(event), _) => (":event-type", event, "event"),
                (None, Some(exception)) => (":exception-type", exception, "exception"),
                (None, None) => continue,
            };
        let mut message = Message::new(entry["payload"].to_string().into_bytes());
        for (header, value) in [
            (kind, name),
            (":content-type", "application/json"),
            (":message-type", message_type),
        ] {
            message = message.add_header(Header::new(
                header,
                FrameValue::String(value.to_owned().into()),
            ));
        }
        let start = bytes.len();
        if write_message_to(&message, &mut bytes).is_err() {
            continue;
        }
        if entry["corrupt_crc"].as_bool() == Some(true)
            && let Some(last) = bytes.len().checked_sub(1).filter(|last| *last >= start)
        {
            bytes[last] ^= 0xff;
        }
    }
    event_stream(in_odd_pieces(&bytes))
}

/// The answer of Bedrock to `recorded`, with its [`Recorded::request_id`] (see
/// [`with_request_id`]) as `x-amzn-RequestId`.
pub async fn answer(mock: &Arc<MockState>, recorded: Recorded) -> Response {
    // Authentication comes first, as at AWS.
    let mut response = if let Err(failure) = authenticate(&recorded) {
        aws_error(StatusCode::FORBIDDEN, failure.kind, &failure.message)
    } else if let Some(golden) = golden_of(&recorded).await {
        golden_answer(golden)
    } else if let Some(response) = anthropic_answer(mock, &recorded).await {
        response
    } else {
        answer_without_id(mock, &recorded)
    };
    if let Some(id) = recorded
        .request_id
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        response.headers_mut().insert("x-amzn-requestid", id);
    }
    response
}

/// The Anthropic Messages operations (see [`crate::anthropic`]): InvokeModel on a Claude id,
/// and Bedrock's Messages endpoint; `None` for the other operations.
async fn anthropic_answer(mock: &Arc<MockState>, recorded: &Recorded) -> Option<Response> {
    if crate::anthropic::is_messages_path(&recorded.path) {
        return Some(crate::anthropic::bedrock_messages(mock, recorded).await);
    }
    let (segment, op) = recorded.path.strip_prefix("/model/")?.split_once('/')?;
    let streamed = match op {
        "invoke" => false,
        "invoke-with-response-stream" => true,
        _ => return None,
    };
    if recorded.method != Method::POST {
        return None;
    }
    let Some(model) = percent_decode(segment) else {
        return Some(validation("The provided model identifier is invalid."));
    };
    match model.as_str() {
        OPUS => {
            return Some(aws_error(
                StatusCode::FORBIDDEN,
                "AccessDeniedException",
                NO_ACCESS,
            ));
        }
        BUSY => return busy_or_flaky(BUSY, op),
        claude if claude.contains("anthropic.claude") => {}
        _ => return Some(validation("The provided model identifier is invalid.")),
    }
    if recorded.header("content-type") != Some("application/json") {
        return Some(aws_error(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            "Expected application/json",
        ));
    }
    Some(crate::anthropic::bedrock_invoke(mock, recorded, &model, streamed).await)
}

/// Converse and ConverseStream, once authenticated.
fn answer_without_id(mock: &MockState, recorded: &Recorded) -> Response {
    let route = recorded
        .path
        .strip_prefix("/model/")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(_, op)| matches!(*op, "converse" | "converse-stream"));
    let (Some((segment, op)), &Method::POST) = (route, &recorded.method) else {
        return aws_error(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "Unknown operation",
        );
    };
    let Some(model) = percent_decode(segment) else {
        return validation("The provided model identifier is invalid.");
    };
    if recorded.header("content-type") != Some("application/json") {
        return aws_error(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            "Expected application/json",
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(&recorded.body) else {
        return aws_error(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            "Malformed JSON",
        );
    };
    match model.as_str() {
        SONNET | NOVA_PRO => {}
        OPUS => return aws_error(StatusCode::FORBIDDEN, "AccessDeniedException", NO_ACCESS),
        BUSY | FLAKY => {}
        _ => return validation("The provided model identifier is invalid."),
    }
    if let Err(message) = check_converse_request(&request) {
        return validation(&message);
    }
    if let Some(response) = busy_or_flaky(&model, op) {
        return response;
    }
    if request.to_string().contains("RATELIMITME") {
        return aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            THROTTLED,
        );
    }
    if op == "converse" {
        converse(&request)
    } else {
        converse_stream(&request, mock)
    }
}

/// Bedrock's authentication: an API key as a bearer token, or a SigV4 signature.
pub(crate) fn authenticate(recorded: &Recorded) -> Result<(), AuthFailure> {
    let Some(authorization) = recorded.header("authorization") else {
        return Err(refused(
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    if let Some(token) = authorization.strip_prefix("Bearer ") {
        // The real message does not quote the token; this one does, so that a gateway relaying
        // the provider's message would be caught leaking the connection's credential.
        return if token == API_KEY {
            Ok(())
        } else {
            Err(refused(
                "UnrecognizedClientException",
                format!("The security token included in the request is invalid. ({token})"),
            ))
        };
    }
    sigv4::verify(recorded).map(|_| ())
}

/// A Bedrock error: `x-amzn-ErrorType` names the exception, the body carries the message.
pub(crate) fn aws_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let mut response = json_response(status, &json!({ "message": message }));
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    )) {
        response.headers_mut().insert("x-amzn-errortype", value);
    }
    response
}

pub(crate) fn validation(message: &str) -> Response {
    aws_error(StatusCode::BAD_REQUEST, "ValidationException", message)
}

/// The model id of a path segment (the SDKs percent-encode it: `:` is `%3A`).
pub(crate) fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(segment.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What Converse itself refuses (wire formats §5.2 validation quirks), as the
/// `ValidationException` message.
pub fn check_converse_request(request: &Value) -> Result<(), String> {
    const FIELDS: &[&str] = &[
        "messages",
        "system",
        "inferenceConfig",
        "toolConfig",
        "guardrailConfig",
        "additionalModelRequestFields",
        "promptVariables",
        "additionalModelResponseFieldPaths",
        "requestMetadata",
        "performanceConfig",
        "serviceTier",
        "outputConfig",
    ];
    let object = request
        .as_object()
        .ok_or("Malformed input request, please reformat your input and try again.")?;
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "Malformed input request: extraneous key [{unknown}] is not permitted, please reformat your input and try again."
        ));
    }
    let messages = object
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or(START_WITH_USER)?;
    let text = request.to_string();
    if (text.contains("\"toolUse\"") || text.contains("\"toolResult\""))
        && !object.contains_key("toolConfig")
    {
        return Err(
            "The toolConfig field must be defined when using toolUse and toolResult content blocks."
                .to_owned(),
        );
    }
    let mut pending_tool_ids: Vec<String> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str().unwrap_or_default();
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if i == 0 && role != "user" {
            return Err(START_WITH_USER.to_owned());
        }
        if role != expected {
            return Err("A conversation must alternate between user and assistant roles. Make sure the conversation alternates between user and assistant roles and try again.".to_owned());
        }
        let content = message["content"]
            .as_array()
            .filter(|c| !c.is_empty())
            .ok_or(format!(
                "The content field in the Message object at messages.{i} is empty. Add a ContentBlock object to the content field and try again."
            ))?;
        let mut tool_ids = Vec::new();
        let mut result_ids = Vec::new();
        for (j, block) in content.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            let members = block.as_object().map_or(0, Map::len);
            if members != 1 {
                return Err(format!(
                    "The ContentBlock object at {at} must set exactly one member."
                ));
            }
            if let Some(text) = block.get("text") {
                if text.as_str().is_none_or(|t| t.trim().is_empty()) {
                    return Err(format!(
                        "The text field in the ContentBlock object at {at} is blank. Add text to the text field, and try again."
                    ));
                }
            } else if let Some(tool_use) = block.get("toolUse") {
                let id = tool_use["toolUseId"].as_str().unwrap_or_default();
                if role != "assistant"
                    || id.is_empty()
                    || tool_use["name"].as_str().is_none()
                    || !tool_use["input"].is_object()
                {
                    return Err(format!("The toolUse block at {at} is invalid."));
                }
                tool_ids.push(id.to_owned());
            } else if let Some(result) = block.get("toolResult") {
                let id = result["toolUseId"].as_str().unwrap_or_default();
                if role != "user" || !pending_tool_ids.iter().any(|p| p == id) {
                    return Err(format!(
                        "The toolResult block at {at} has a toolUseId that does not match any toolUse in the previous turn."
                    ));
                }
                if !result["content"].is_array()
                    || !matches!(result["status"].as_str(), None | Some("success" | "error"))
                {
                    return Err(format!("The toolResult block at {at} is invalid."));
                }
                result_ids.push(id.to_owned());
            }
        }
        if let Some(missing) = pending_tool_ids.iter().find(|p| !result_ids.contains(p)) {
            return Err(format!(
                "Expected toolResult blocks at messages.{i}.content for the following Ids: {missing}"
            ));
        }
        pending_tool_ids = tool_ids;
    }
    if let Some(max) = request.pointer("/inferenceConfig/maxTokens")
        && max.as_u64().is_none_or(|m| m < 1)
    {
        return Err("The maximum tokens you requested must be at least 1.".to_owned());
    }
    if let Some(message) = out_of_range(request) {
        return Err(message);
    }
    if let Some(config) = object.get("toolConfig") {
        let tools = config["tools"].as_array().filter(|t| !t.is_empty()).ok_or(
            "The toolConfig field must have at least one tool in its tools field.".to_owned(),
        )?;
        for tool in tools {
            let spec = &tool["toolSpec"];
            let name = spec["name"].as_str().unwrap_or_default();
            let name_ok = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
            if !name_ok || !spec["inputSchema"]["json"].is_object() {
                return Err(format!("The toolSpec {name:?} is invalid."));
            }
        }
    }
    Ok(())
}

/// A model whose every call is throttled.
pub const BUSY: &str = "anthropic.claude-3-haiku-20240307-v1:0";
/// A model that fails: `ModelErrorException` on Converse, an exception frame mid-stream.
pub const FLAKY: &str = "amazon.nova-lite-v1:0";
/// The message of [`FLAKY`]'s `ModelErrorException`.
pub const MODEL_ERROR: &str = "The model produced an invalid response. Try your request again.";
/// The message of [`FLAKY`]'s `modelStreamErrorException` frame.
pub const MODEL_STREAM_ERROR: &str = "Model stream error: the model stopped unexpectedly.";

/// The answers of [`BUSY`] and [`FLAKY`] to operation `op` (`None`: answer normally).
fn busy_or_flaky(model: &str, op: &str) -> Option<Response> {
    match (model, op) {
        (BUSY, _) => Some(aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            THROTTLED,
        )),
        (FLAKY, "converse") => Some(aws_error(
            StatusCode::FAILED_DEPENDENCY,
            "ModelErrorException",
            MODEL_ERROR,
        )),
        (FLAKY, _) => {
            let frames = [
                message_start(),
                text_delta(0, "It is"),
                exception("modelStreamErrorException", MODEL_STREAM_ERROR),
            ];
            Some(event_stream(in_odd_pieces(&frames.concat())))
        }
        _ => None,
    }
}

/// Converse's range checks on `inferenceConfig.temperature` and `topP` (both at most 1, unlike
/// OpenAI's temperature), as the ValidationException message (§5.2).
fn out_of_range(request: &Value) -> Option<String> {
    ["temperature", "topP"].into_iter().find_map(|name| {
        let value = request["inferenceConfig"][name].as_f64()?;
        (!(0.0..=1.0).contains(&value)).then(|| {
            let bound = if value > 1.0 { "less than or equal to 1" } else { "greater than or equal to 0" };
            format!(
                "1 validation error detected: Value '{value}' at 'inferenceConfig.{name}' failed to satisfy constraint: Member must have value {bound}"
            )
        })
    })
}

/// The last turn (`Null` if none: [`check_converse_request`] refused such requests already).
fn last_message(request: &Value) -> &Value {
    request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .unwrap_or(&Value::Null)
}

fn has_block(message: &Value, kind: &str) -> bool {
    message["content"]
        .as_array()
        .is_some_and(|c| c.iter().any(|b| b.get(kind).is_some()))
}

/// Whether the model "decides" to call get_weather: tools offered and the last turn asks about
/// the weather.
fn wants_tool_call(request: &Value) -> bool {
    let last = last_message(request);
    request.get("toolConfig").is_some()
        && !has_block(last, "toolResult")
        && last.to_string().contains("weather")
}

/// Converse's answer (wire formats §5.3): a final answer to a tool result, a tool call, or a
/// joke with a reasoning block.
fn converse(request: &Value) -> Response {
    let last = last_message(request);
    let (content, stop_reason) = if has_block(last, "toolResult") {
        (
            json!([{"text": "It is 21°C and sunny in Paris."}]),
            "end_turn",
        )
    } else if wants_tool_call(request) {
        (
            json!([
                {"text": "Let me check."},
                {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "get_weather",
                             "input": {"city": "Paris", "unit": "celsius"}}}
            ]),
            "tool_use",
        )
    } else {
        (
            json!([
                {"reasoningContent": {"reasoningText": {"text": "A classic joke fits.",
                                                        "signature": "EqQBCkgIARABGAIiQL"}}},
                {"text": "Why did the chicken cross the road?"},
                {"text": " To get to the other side."}
            ]),
            "end_turn",
        )
    };
    json_response(
        StatusCode::OK,
        &json!({
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": stop_reason,
            "usage": {"inputTokens": 30, "outputTokens": 20, "totalTokens": 60,
                      "cacheReadInputTokens": 4, "cacheWriteInputTokens": 6},
            "metrics": {"latencyMs": 812}
        }),
    )
}

/// One event-stream message with string headers (wire formats §5.4).
fn frame(headers: &[(&'static str, &'static str)], payload: &[u8]) -> Vec<u8> {
    let mut message = Message::new(payload.to_vec());
    for (name, value) in headers {
        message = message.add_header(Header::new(*name, FrameValue::String((*value).into())));
    }
    let mut out = Vec::new();
    #[allow(
        clippy::expect_used,
        reason = "writing fails only past the format's 128 KiB of headers or 24 MiB of payload; \
                  the mock's frames are a few hundred bytes"
    )]
    write_message_to(&message, &mut out).expect("a small frame is always writable");
    out
}

/// An event frame; its JSON payload gets Bedrock's random `"p"` padding field.
pub(crate) fn event(event_type: &'static str, mut payload: Value) -> Vec<u8> {
    const LETTERS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let len = rand::random_range(1..=LETTERS.len());
    payload["p"] = json!(LETTERS.get(..len).unwrap_or(LETTERS));
    frame(
        &[
            (":event-type", event_type),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

pub(crate) fn exception(exception_type: &'static str, message: &str) -> Vec<u8> {
    frame(
        &[
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        json!({ "message": message }).to_string().as_bytes(),
    )
}

fn text_delta(index: u32, text: &str) -> Vec<u8> {
    event(
        "contentBlockDelta",
        json!({"contentBlockIndex": index, "delta": {"text": text}}),
    )
}

fn tool_input_delta(index: u32, input: &str) -> Vec<u8> {
    event(
        "contentBlockDelta",
        json!({"contentBlockIndex": index, "delta": {"toolUse": {"input": input}}}),
    )
}

fn tool_start(index: u32, id: &str) -> Vec<u8> {
    event(
        "contentBlockStart",
        json!({"contentBlockIndex": index,
               "start": {"toolUse": {"toolUseId": id, "name": "get_weather"}}}),
    )
}

fn block_stop(index: u32) -> Vec<u8> {
    event("contentBlockStop", json!({"contentBlockIndex": index}))
}

fn message_start() -> Vec<u8> {
    event("messageStart", json!({"role": "assistant"}))
}

fn message_stop(reason: &str) -> Vec<u8> {
    event("messageStop", json!({"stopReason": reason}))
}

fn metadata(input: u64, output: u64, cache_read: u64) -> Vec<u8> {
    event(
        "metadata",
        json!({"usage": {"inputTokens": input, "outputTokens": output,
                         "cacheReadInputTokens": cache_read, "cacheWriteInputTokens": 0,
                         "totalTokens": input + output + cache_read},
               "metrics": {"latencyMs": 1450}}),
    )
}

/// The body in odd-sized pieces, so that frames (and their preludes) straddle chunk boundaries.
pub(crate) fn in_odd_pieces(bytes: &[u8]) -> Body {
    const SIZES: [usize; 7] = [1, 7, 3, 13, 5, 29, 2];
    let mut pieces: Vec<Result<Bytes, std::convert::Infallible>> = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let (piece, after) = rest.split_at(SIZES[i % SIZES.len()].min(rest.len()));
        pieces.push(Ok(Bytes::copy_from_slice(piece)));
        rest = after;
        i += 1;
    }
    Body::from_stream(futures_util::stream::iter(pieces))
}

/// A frame prelude declaring 4 GiB (total and header lengths, prelude CRC), to be followed by
/// 200 MB that the gateway must not buffer.
const HUGE_FRAME_PRELUDE: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0x40, 0, 0, 0, 0];

pub(crate) fn event_stream(body: Body) -> Response {
    (
        [("content-type", "application/vnd.amazon.eventstream")],
        body,
    )
        .into_response()
}

/// ConverseStream's answer (wire formats §5.4), or the misbehaviour its trigger word asks for.
fn converse_stream(request: &Value, mock: &MockState) -> Response {
    let text = request.to_string();
    if text.contains("HUGEFRAME") {
        return event_stream(lazy_body(
            HUGE_FRAME_PRELUDE,
            0,
            200 * 1024 * 1024,
            mock.produced.clone(),
        ));
    }
    let frames: Vec<Vec<u8>> = if text.contains("THROTTLEFIRST") {
        vec![exception("throttlingException", TOO_MANY_TOKENS)]
    } else if wants_tool_call(request) {
        vec![
            message_start(),
            text_delta(0, "Checking."),
            block_stop(0),
            tool_start(1, TOOL_USE_ID),
            tool_input_delta(1, "{\"city\":"),
            tool_input_delta(1, " \"Paris\"}"),
            block_stop(1),
            tool_start(2, TOOL_USE_ID_2),
            tool_input_delta(2, "{\"city\": \"London\"}"),
            block_stop(2),
            message_stop("tool_use"),
            metadata(41, 36, 0),
        ]
    } else {
        let mut frames = vec![
            message_start(),
            text_delta(0, "It is"),
            text_delta(0, " 21°C."),
        ];
        let end = [block_stop(0), message_stop("end_turn"), metadata(9, 5, 3)];
        if text.contains("THROTTLEMIDSTREAM") {
            frames.push(exception("throttlingException", TOO_MANY_TOKENS));
        } else if text.contains("NOMETADATA") {
            // The upstream closes after messageStop, before the metadata with the usage.
            frames.extend([block_stop(0), message_stop("end_turn")]);
        } else if text.contains("CORRUPTME") {
            let mut corrupted = text_delta(0, " CORRUPTED");
            // The last byte belongs to the message CRC.
            if let Some(crc) = corrupted.last_mut() {
                *crc ^= 0x5a;
            }
            frames.push(corrupted);
            // Valid frames follow: the gateway must not resynchronise and finish the answer.
            frames.extend(end);
        } else {
            frames.extend(end);
        }
        frames
    };
    event_stream(in_odd_pieces(&frames.concat()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_eventstream::frame::read_message_from;

    #[test]
    fn model_ids_are_percent_decoded_from_the_path() {
        assert_eq!(
            percent_decode("us.anthropic.claude-3-5-sonnet-20241022-v2%3A0").as_deref(),
            Some(SONNET)
        );
        assert_eq!(percent_decode("bad%3"), None);
        assert_eq!(percent_decode("bad%zz"), None);
    }

    #[test]
    fn event_frames_carry_bedrock_headers_and_padding_and_read_back() {
        let bytes = text_delta(0, "It is");
        let message = read_message_from(&mut &bytes[..]).unwrap();
        let header = |name: &str| {
            message
                .headers()
                .iter()
                .find(|h| h.name().as_str() == name)
                .and_then(|h| h.value().as_string().ok())
                .map(|s| s.as_str().to_owned())
        };
        assert_eq!(header(":event-type").as_deref(), Some("contentBlockDelta"));
        assert_eq!(header(":message-type").as_deref(), Some("event"));
        assert_eq!(header(":content-type").as_deref(), Some("application/json"));
        let payload: Value = serde_json::from_slice(message.payload()).unwrap();
        assert_eq!(payload["delta"]["text"], "It is");
        assert!(payload["p"].as_str().is_some_and(|p| !p.is_empty()));
    }

    #[test]
    fn converse_refuses_what_bedrock_refuses() {
        let ok = json!({"messages": [{"role": "user", "content": [{"text": "Hi"}]}]});
        assert_eq!(check_converse_request(&ok), Ok(()));
        let assistant_first =
            json!({"messages": [{"role": "assistant", "content": [{"text": "Hi"}]}]});
        assert_eq!(
            check_converse_request(&assistant_first).unwrap_err(),
            START_WITH_USER
        );
        let extraneous = json!({"model": "x", "messages": ok["messages"]});
        assert!(
            check_converse_request(&extraneous)
                .unwrap_err()
                .contains("extraneous key [model]")
        );
        let tool_use_without_config = json!({"messages": [
            {"role": "user", "content": [{"text": "Hi"}]},
            {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t", "name": "f", "input": {}}}]}]});
        assert!(
            check_converse_request(&tool_use_without_config)
                .unwrap_err()
                .starts_with("The toolConfig field must be defined")
        );
        let too_hot = json!({"messages": ok["messages"], "inferenceConfig": {"temperature": 1.5}});
        assert_eq!(
            check_converse_request(&too_hot).unwrap_err(),
            "1 validation error detected: Value '1.5' at 'inferenceConfig.temperature' failed to satisfy constraint: Member must have value less than or equal to 1"
        );
    }
}
