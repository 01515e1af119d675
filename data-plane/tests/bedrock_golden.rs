//! Golden tests of the Bedrock translation (wire formats §5, §6.2, §6.3, §6.4): each fixture in
//! `mock-upstream/fixtures/golden/bedrock/` holds an OpenAI request and a Converse answer, a ConverseStream (as
//! events that the test encodes into real binary event-stream frames, CRCs included, and feeds in
//! odd-sized pieces), or an error, and the snapshots of what the gateway produces from them.
//!
//! After an intended change, `UPDATE_GOLDEN=1 cargo test --test bedrock_golden` rewrites the
//! snapshots; review the diff like code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod golden_support;

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use bytes::BytesMut;
use golden_support::{error_json, sse_events};
use llm_proxy_data_plane::body;
use llm_proxy_data_plane::providers::bedrock::{converse, error, stream::ConverseStream};
use llm_proxy_data_plane::sse::StreamTranslator as _;
use serde_json::{Map, Value, json};

const INPUTS: &[&str] = &[
    "kind",
    "model",
    "request",
    "answer",
    "request_id",
    "stream",
    "status",
    "headers",
    "body",
];

/// One binary frame for a fixture stream entry: `{"event": name, "payload": {...}}`,
/// `{"exception": name, "payload": {...}}`, with `"corrupt_crc": true` to flip the message CRC.
fn frame(entry: &Value) -> Vec<u8> {
    let payload = entry["payload"].to_string();
    let string = |s: &str| HeaderValue::String(s.to_owned().into());
    let mut message = Message::new(payload.into_bytes());
    if let Some(event) = entry["event"].as_str() {
        message = message
            .add_header(Header::new(":event-type", string(event)))
            .add_header(Header::new(":content-type", string("application/json")))
            .add_header(Header::new(":message-type", string("event")));
    } else {
        let exception = entry["exception"].as_str().expect("event or exception");
        message = message
            .add_header(Header::new(":exception-type", string(exception)))
            .add_header(Header::new(":content-type", string("application/json")))
            .add_header(Header::new(":message-type", string("exception")));
    }
    let mut bytes = Vec::new();
    write_message_to(&message, &mut bytes).unwrap();
    if entry["corrupt_crc"].as_bool() == Some(true) {
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
    }
    bytes
}

fn produce(case: &Value) -> Map<String, Value> {
    let kind = case["kind"].as_str().expect("kind");
    let model = case["model"]
        .as_str()
        .unwrap_or("anthropic.claude-3-5-sonnet-20240620-v1:0");
    let request_id = case["request_id"].as_str();
    let request_bytes = serde_json::to_vec(&case["request"]).unwrap();
    let mut out = Map::new();
    match kind {
        "chat" | "stream" | "rejection" => {
            let request = body::parse(
                &request_bytes,
                true,
                llm_proxy_data_plane::limits::Limits::default().max_top_level_keys,
            )
            .unwrap();
            match converse::request(&request, model) {
                Ok(body) => {
                    out.insert(
                        "converse_request".into(),
                        serde_json::from_slice(&body).unwrap(),
                    );
                }
                Err(err) => {
                    out.insert("openai_error".into(), error_json(&err));
                    return out;
                }
            }
            if kind == "chat" {
                let answer = serde_json::to_vec(&case["answer"]).unwrap();
                let (translated, usage) = converse::answer(&answer, model, request_id).unwrap();
                out.insert(
                    "openai_answer".into(),
                    serde_json::from_slice(&translated).unwrap(),
                );
                out.insert(
                    "usage_counted".into(),
                    json!(usage.map(|u| [u.prompt_tokens, u.completion_tokens, u.total_tokens])),
                );
            }
            if kind == "stream" {
                let bytes: Vec<u8> = case["stream"]
                    .as_array()
                    .expect("stream entries")
                    .iter()
                    .flat_map(frame)
                    .collect();
                let mut translator = ConverseStream::new(model, request_id, request.include_usage);
                let mut client = BytesMut::new();
                // Odd-sized pieces: frames straddle reads, as on a real connection.
                let mut result = Ok(());
                for piece in bytes.chunks(37) {
                    result = translator.push(piece, &mut client);
                    if result.is_err() {
                        break;
                    }
                }
                if result.is_ok() {
                    result = translator.finish(&mut client);
                }
                out.insert("openai_stream".into(), Value::Array(sse_events(&client)));
                if let Err(err) = result {
                    out.insert("stream_error".into(), error_json(&err));
                }
                out.insert(
                    "usage_counted".into(),
                    json!(translator.usage().map(|u| [
                        u.prompt_tokens,
                        u.completion_tokens,
                        u.total_tokens
                    ])),
                );
            }
        }
        "error" => {
            let status = StatusCode::from_u16(case["status"].as_u64().unwrap() as u16).unwrap();
            let mut headers = HeaderMap::new();
            for (name, value) in case["headers"].as_object().into_iter().flatten() {
                headers.insert(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.as_str().unwrap().parse().unwrap(),
                );
            }
            let body = serde_json::to_vec(&case["body"]).unwrap();
            out.insert(
                "openai_error".into(),
                error_json(&error::upstream_error(status, &headers, &body)),
            );
        }
        other => panic!("unknown fixture kind {other}"),
    }
    out
}

golden_tests!("bedrock", INPUTS, produce;
    plain,
    system_and_alternation,
    images_and_documents,
    tools_required,
    tool_results_round_trip,
    history_without_tools,
    tool_choice_none,
    json_schema,
    json_object,
    stop_max_tokens_and_cache_usage,
    reasoning_claude,
    max_tokens_is_length,
    guardrail_intervened,
    unsupported_n,
    http_image_rejected,
    stream_text_with_usage,
    stream_tool_use,
    stream_exception_frame,
    stream_corrupted_crc,
    stream_truncated,
    error_throttling,
    error_validation,
    error_bad_signature,
    error_access_denied,
    error_model_error_424,
);
