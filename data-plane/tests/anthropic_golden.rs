//! Golden tests of the Anthropic Messages converter (`conversation::anthropic`, DESIGN §17): each
//! fixture in `mock-upstream/fixtures/golden/anthropic/` holds a Messages request, a Claude answer
//! or a Claude stream as input, and snapshots of what the converter makes of them:
//! - `request`: the request read into the model and written back for Anthropic
//!   (`anthropic_request`) and for Bedrock InvokeModel (`bedrock_request`: no `model`, an
//!   `anthropic_version` in the body);
//! - `rejection`: the error a client gets for a request that cannot cross (`anthropic_error`);
//! - `reply`: the answer read into the model and written back (`anthropic_answer`);
//! - `stream`: the events (as Anthropic frames them) read into the model and written back as the
//!   client gets them (`anthropic_stream`, and `stream_error` when the stream fails).
//!
//! After an intended change, `UPDATE_GOLDEN=1 cargo test --test anthropic_golden` rewrites the
//! snapshots; review the diff like code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use llm_proxy_data_plane::body;
use llm_proxy_data_plane::conversation::Translate;
use llm_proxy_data_plane::conversation::anthropic::{
    self, AnthropicEventReader, AnthropicEventWriter, AnthropicTarget,
};
use llm_proxy_data_plane::errors::ApiError;
use llm_proxy_data_plane::sse::StreamTranslator as _;
use serde_json::{Map, Value, json};

mod golden_support;

/// Fixture members that are inputs; every other member is a snapshot.
const INPUTS: &[&str] = &["kind", "model", "alias", "request", "answer", "stream"];

/// The upstream model of fixtures that name none.
const MODEL: &str = "claude-sonnet-4-5-20250929";
/// The alias the client asked for, when the fixture names none.
const ALIAS: &str = "claude-sonnet-4-5";

/// An error as an Anthropic client gets it.
fn anthropic_error(err: &ApiError) -> Value {
    json!({
        "status": err.anthropic_status().as_u16(),
        "body": serde_json::from_str::<Value>(&err.anthropic_body_json()).unwrap(),
        "param": err.param,
    })
}

/// Anthropic SSE bytes as `{"event": name, "data": json}` objects.
fn anthropic_events(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .expect("SSE is UTF-8")
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').expect("event and data lines");
            json!({
                "event": name.strip_prefix("event: ").expect("event line"),
                "data": serde_json::from_str::<Value>(data.strip_prefix("data: ").expect("data line")).unwrap(),
            })
        })
        .collect()
}

fn produce(case: &Value) -> Map<String, Value> {
    let kind = case["kind"].as_str().expect("kind");
    let model = case["model"].as_str().unwrap_or(MODEL);
    let alias = case["alias"].as_str().unwrap_or(ALIAS);
    let mut out = Map::new();
    match kind {
        "request" | "rejection" => {
            let bytes = serde_json::to_vec(&case["request"]).unwrap();
            let parsed = body::parse(
                &bytes,
                true,
                llm_proxy_data_plane::limits::Limits::default().max_top_level_keys,
            )
            .unwrap();
            let request = match anthropic::parse_request(&parsed) {
                Ok(request) => request,
                Err(err) => {
                    out.insert("anthropic_error".into(), anthropic_error(&err));
                    return out;
                }
            };
            for (member, target) in [
                (
                    "anthropic_request",
                    AnthropicTarget {
                        model: Some(model),
                        anthropic_version_in_body: None,
                    },
                ),
                (
                    "bedrock_request",
                    AnthropicTarget {
                        model: None,
                        anthropic_version_in_body: Some("bedrock-2023-05-31"),
                    },
                ),
            ] {
                let value = match anthropic::write_request(&request, &target) {
                    Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
                    Err(err) => anthropic_error(&err),
                };
                out.insert(member.into(), value);
            }
        }
        "reply" => {
            let bytes = serde_json::to_vec(&case["answer"]).unwrap();
            match anthropic::parse_reply(&bytes) {
                Ok(mut reply) => {
                    let usage = reply.usage.to_usage();
                    reply.model = alias.to_owned();
                    out.insert(
                        "anthropic_answer".into(),
                        serde_json::from_slice(&anthropic::write_reply(&reply)).unwrap(),
                    );
                    out.insert(
                        "usage_counted".into(),
                        json!([
                            usage.prompt_tokens,
                            usage.completion_tokens,
                            usage.cache_read_tokens,
                            usage.cache_write_tokens
                        ]),
                    );
                }
                Err(err) => {
                    out.insert("anthropic_error".into(), anthropic_error(&err));
                }
            }
        }
        "stream" => {
            let mut translator = Translate::new(
                AnthropicEventReader::new("anthropic", llm_proxy_data_plane::sse::MAX_EVENT_BYTES),
                AnthropicEventWriter::new(alias),
            );
            let mut client = BytesMut::new();
            let mut error = None;
            for event in case["stream"].as_array().expect("stream events") {
                let name = event["type"].as_str().expect("event type");
                let frame = format!("event: {name}\ndata: {event}\n\n");
                // Odd-sized pieces: events must not depend on how the upstream chunks them.
                for piece in frame.as_bytes().chunks(5) {
                    if let Err(err) = translator.push(piece, &mut client) {
                        error = Some(err);
                        break;
                    }
                }
                if error.is_some() {
                    break;
                }
            }
            if error.is_none()
                && let Err(err) = translator.finish(&mut client)
            {
                error = Some(err);
            }
            if let Some(err) = &error {
                translator.write_error(err, &mut client);
                out.insert("stream_error".into(), anthropic_error(err));
            }
            out.insert(
                "anthropic_stream".into(),
                Value::Array(anthropic_events(&client)),
            );
            out.insert(
                "usage_counted".into(),
                json!(translator.usage().map(|u| [
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.cache_read_tokens,
                    u.cache_write_tokens
                ])),
            );
        }
        other => panic!("unknown fixture kind {other}"),
    }
    out
}

golden_tests!("anthropic", INPUTS, produce;
    claude_code_request,
    tool_history_request,
    rejection_document_block,
    rejection_forced_hosted_tool,
    rejection_missing_max_tokens,
    reply_thinking_and_tool_use,
    reply_stop_sequence,
    stream_thinking_text_tool_use,
    stream_error_event,
    stream_truncated,
);
