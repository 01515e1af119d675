//! Golden tests of the OpenAI Responses dialect (`conversation::responses`, DESIGN §17): each
//! fixture in `mock-upstream/fixtures/golden/responses/` holds a Responses request, an upstream
//! answer or an upstream stream as input, and snapshots of what the gateway makes of it:
//! - `request`: the request read into the model and written for a Claude upstream
//!   (`anthropic_request`) and as the OpenAI chat request the Gemini and Converse converters get
//!   (`openai_chat_request`);
//! - `rejection`: the error a Responses client gets for a request that cannot cross
//!   (`responses_error`);
//! - `reply`: a Claude (`upstream: anthropic`) or OpenAI chat (`upstream: openai_chat`) answer
//!   written as a Responses `response` object (`responses_answer`);
//! - `stream`: a Claude SSE stream, OpenAI chat chunks, a Gemini stream or a ConverseStream
//!   (binary event-stream frames), fed in odd-sized pieces, written as the Responses events the
//!   client gets (`responses_stream`, and `stream_error` when the stream fails). Every stream is
//!   also checked for strictly increasing `sequence_number`s and `.done` events that carry the
//!   whole text and arguments their deltas streamed.
//!
//! After an intended change, `UPDATE_GOLDEN=1 cargo test --test responses_golden` rewrites the
//! snapshots; review the diff like code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::BytesMut;
use llm_proxy_data_plane::body;
use llm_proxy_data_plane::conversation::EventWriter as _;
use llm_proxy_data_plane::conversation::anthropic::{self, AnthropicEventReader, AnthropicTarget};
use llm_proxy_data_plane::conversation::openai_chat::{self, OpenAiChunkReader};
use llm_proxy_data_plane::conversation::responses::{self, ResponsesEventWriter};
use llm_proxy_data_plane::conversation::{
    BlockKind, StopReason, StreamEvent, TokenUsage, Translate,
};
use llm_proxy_data_plane::errors::ApiError;
use llm_proxy_data_plane::providers::bedrock::stream::ConverseStream;
use llm_proxy_data_plane::providers::google::chat::GeminiStream;
use llm_proxy_data_plane::sse::{Chain, StreamTranslator};
use serde_json::{Map, Value, json};
use std::collections::HashMap;

mod golden_support;

use golden_support::error_json;

/// Fixture members that are inputs; every other member is a snapshot.
const INPUTS: &[&str] = &["kind", "model", "upstream", "request", "answer", "stream"];

/// The upstream model of fixtures that name none.
const MODEL: &str = "claude-sonnet-4-5-20250929";

/// Sizes the upstream's bytes are cut into, in turn: events must not depend on the chunking.
const PIECES: [usize; 4] = [1, 7, 13, 64];

fn max_event() -> usize {
    llm_proxy_data_plane::limits::Limits::default().max_stream_event_bytes
}

/// `created_at` is the time of writing.
fn normalise_time(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "created_at" && v.is_number() {
                    *v = json!(0);
                } else {
                    normalise_time(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalise_time),
        _ => {}
    }
}

/// Responses SSE bytes as `{"event": name, "data": json}` objects.
fn responses_events(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .expect("SSE is UTF-8")
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').expect("event and data lines");
            let name = name.strip_prefix("event: ").expect("event line");
            let data: Value =
                serde_json::from_str(data.strip_prefix("data: ").expect("data line")).unwrap();
            assert_eq!(data["type"], name, "the event line names the data's type");
            json!({ "event": name, "data": data })
        })
        .collect()
}

/// What every Responses stream promises: `sequence_number`s strictly increasing from 0, and
/// `.done` events (and the final response) carrying the whole text and arguments their deltas
/// streamed.
fn assert_stream_invariants(events: &[Value]) {
    let mut streamed: HashMap<String, String> = HashMap::new();
    let mut summaries: HashMap<String, String> = HashMap::new();
    let mut arguments: HashMap<String, String> = HashMap::new();
    let mut done_items: HashMap<String, Value> = HashMap::new();
    for (i, event) in events.iter().enumerate() {
        let data = &event["data"];
        assert_eq!(
            data["sequence_number"],
            json!(i),
            "sequence_number of event {i}"
        );
        let item_id = data["item_id"].as_str().unwrap_or_default().to_owned();
        let delta = data["delta"].as_str().unwrap_or_default();
        match data["type"].as_str().unwrap() {
            "response.output_text.delta" => streamed.entry(item_id).or_default().push_str(delta),
            "response.reasoning_summary_text.delta" => {
                summaries.entry(item_id).or_default().push_str(delta);
            }
            "response.function_call_arguments.delta" => {
                arguments.entry(item_id).or_default().push_str(delta);
            }
            "response.output_text.done" => {
                assert_eq!(
                    data["text"],
                    json!(streamed.get(&item_id).cloned().unwrap_or_default())
                );
            }
            "response.content_part.done" => {
                assert_eq!(
                    data["part"]["text"],
                    json!(streamed.get(&item_id).cloned().unwrap_or_default())
                );
            }
            "response.reasoning_summary_text.done" => {
                assert_eq!(
                    data["text"],
                    json!(summaries.get(&item_id).cloned().unwrap_or_default())
                );
            }
            "response.function_call_arguments.done" => {
                assert_eq!(
                    data["arguments"],
                    json!(arguments.get(&item_id).cloned().unwrap_or_default())
                );
            }
            "response.output_item.done" => {
                let item = &data["item"];
                let id = item["id"].as_str().unwrap().to_owned();
                match item["type"].as_str().unwrap() {
                    "message" => assert_eq!(
                        item["content"][0]["text"],
                        json!(streamed.get(&id).cloned().unwrap_or_default())
                    ),
                    "function_call" => assert_eq!(
                        item["arguments"],
                        json!(arguments.get(&id).cloned().unwrap_or_default())
                    ),
                    _ => {}
                }
                done_items.insert(id, item.clone());
            }
            "response.completed" | "response.incomplete" => {
                let response = &data["response"];
                let output = response["output"].as_array().unwrap();
                assert_eq!(
                    output.len(),
                    done_items.len(),
                    "every item is in the response"
                );
                for item in output {
                    assert_eq!(Some(item), done_items.get(item["id"].as_str().unwrap()));
                }
                let usage = &response["usage"];
                for member in [
                    "input_tokens",
                    "output_tokens",
                    "total_tokens",
                    "input_tokens_details",
                    "output_tokens_details",
                ] {
                    assert!(!usage[member].is_null(), "usage.{member} is present");
                }
                assert_eq!(i + 1, events.len(), "nothing follows the end");
            }
            _ => {}
        }
    }
}

/// One binary frame for a ConverseStream fixture entry `{"event": name, "payload": {...}}`.
fn converse_frame(entry: &Value) -> Vec<u8> {
    let string = |s: &str| HeaderValue::String(s.to_owned().into());
    let message = Message::new(entry["payload"].to_string().into_bytes())
        .add_header(Header::new(
            ":event-type",
            string(entry["event"].as_str().expect("event")),
        ))
        .add_header(Header::new(":content-type", string("application/json")))
        .add_header(Header::new(":message-type", string("event")));
    let mut bytes = Vec::new();
    write_message_to(&message, &mut bytes).unwrap();
    bytes
}

/// The upstream's stream bytes, as its wire frames them.
fn upstream_bytes(upstream: &str, stream: &[Value]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in stream {
        match upstream {
            "anthropic" => {
                let name = entry["type"].as_str().expect("event type");
                bytes.extend_from_slice(format!("event: {name}\ndata: {entry}\n\n").as_bytes());
            }
            "openai_chat" => {
                let data = match entry {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                bytes.extend_from_slice(format!("data: {data}\n\n").as_bytes());
            }
            // Google frames events with CRLF; no [DONE].
            "gemini" => bytes.extend_from_slice(format!("data: {entry}\r\n\r\n").as_bytes()),
            "converse" => bytes.extend_from_slice(&converse_frame(entry)),
            other => panic!("unknown upstream {other}"),
        }
    }
    bytes
}

/// Feeds `upstream` to `translator` in odd-sized pieces; the client's bytes and the error.
fn run<T: StreamTranslator>(translator: &mut T, upstream: &[u8]) -> (BytesMut, Option<ApiError>) {
    let mut client = BytesMut::new();
    let mut rest = upstream;
    let mut error = None;
    for size in PIECES.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((*size).min(rest.len()));
        rest = tail;
        if let Err(err) = translator.push(piece, &mut client) {
            error = Some(err);
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
    }
    (client, error)
}

fn produce(case: &Value) -> Map<String, Value> {
    let kind = case["kind"].as_str().expect("kind");
    let model = case["model"].as_str().unwrap_or(MODEL);
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
            let request = match responses::parse_request(&parsed) {
                Ok(request) => request,
                Err(err) => {
                    out.insert("responses_error".into(), error_json(&err));
                    return out;
                }
            };
            let target = AnthropicTarget {
                model: Some(model),
                anthropic_version_in_body: None,
            };
            let anthropic = match anthropic::write_request(&request, &target) {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
                Err(err) => error_json(&err),
            };
            out.insert("anthropic_request".into(), anthropic);
            out.insert(
                "openai_chat_request".into(),
                serde_json::from_slice(&openai_chat::write_request(
                    &request,
                    "gemini-2.5-pro",
                    true,
                ))
                .unwrap(),
            );
        }
        "reply" => {
            let bytes = serde_json::to_vec(&case["answer"]).unwrap();
            let reply = match case["upstream"].as_str().expect("upstream") {
                "anthropic" => anthropic::parse_reply(&bytes),
                "openai_chat" => openai_chat::parse_reply(&bytes, "openai"),
                other => panic!("unknown upstream {other}"),
            }
            .unwrap();
            let usage = reply.usage.to_usage();
            let mut answer: Value =
                serde_json::from_slice(&responses::write_reply(&reply, model)).unwrap();
            normalise_time(&mut answer);
            out.insert("responses_answer".into(), answer);
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
        "stream" => {
            let upstream = case["upstream"].as_str().expect("upstream");
            let bytes = upstream_bytes(upstream, case["stream"].as_array().expect("stream"));
            let writer = ResponsesEventWriter::new(model);
            let to_responses =
                |provider| Translate::new(OpenAiChunkReader::new(provider, max_event()), writer);
            let (client, error, usage) = match upstream {
                "anthropic" => {
                    let translator = Translate::new(
                        AnthropicEventReader::new("anthropic", max_event()),
                        ResponsesEventWriter::new(model),
                    );
                    run_with_usage(translator, &bytes)
                }
                "openai_chat" => run_with_usage(to_responses("openai"), &bytes),
                "gemini" => run_with_usage(
                    Chain::new(GeminiStream::new(model, true), to_responses("google")),
                    &bytes,
                ),
                "converse" => run_with_usage(
                    Chain::new(
                        ConverseStream::new(model, Some("req-1"), true),
                        to_responses("bedrock"),
                    ),
                    &bytes,
                ),
                other => panic!("unknown upstream {other}"),
            };
            let mut events = responses_events(&client);
            assert_stream_invariants(&events);
            events.iter_mut().for_each(normalise_time);
            if let Some(err) = &error {
                out.insert("stream_error".into(), error_json(err));
            }
            out.insert("responses_stream".into(), Value::Array(events));
            out.insert(
                "usage_counted".into(),
                json!(usage.map(|u| [
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

fn run_with_usage<T: StreamTranslator>(
    mut translator: T,
    bytes: &[u8],
) -> (
    BytesMut,
    Option<ApiError>,
    Option<llm_proxy_data_plane::usage::Usage>,
) {
    let (client, error) = run(&mut translator, bytes);
    let usage = translator.usage();
    (client, error, usage)
}

golden_tests!("responses", INPUTS, produce;
    request_codex,
    request_tool_history,
    request_json_schema_and_hosted_choice_dropped,
    rejection_previous_response_id,
    rejection_forced_web_search,
    rejection_input_file,
    rejection_json_object,
    reply_anthropic_thinking_text_tool_use,
    reply_anthropic_max_tokens,
    reply_openai_chat_tool_calls_with_usage_details,
    stream_anthropic_thinking_text_tool_call,
    stream_anthropic_redacted_then_max_tokens,
    stream_anthropic_truncated,
    stream_openai_chat_reasoning_with_cached_usage,
    stream_openai_chat_text_then_tool_calls,
    stream_gemini_tool_calls,
    stream_converse_reasoning_text_tool_use,
);

/// Sequence numbers and `.done` payloads, on a stream of every block kind written directly.
#[test]
fn sequence_numbers_increase_and_done_events_carry_everything() {
    let mut writer = ResponsesEventWriter::new("claude");
    let mut out = BytesMut::new();
    let usage = TokenUsage {
        input: 3,
        output: 40,
        cache_read: 100,
        cache_write: 0,
        reasoning: 0,
    };
    let events = [
        StreamEvent::Start {
            id: "msg_1".into(),
            model: "claude".into(),
            usage,
        },
        StreamEvent::BlockStart(BlockKind::Reasoning),
        StreamEvent::ReasoningDelta("think ".into()),
        StreamEvent::ReasoningDelta("hard".into()),
        StreamEvent::SignatureDelta("sig-a".into()),
        StreamEvent::SignatureDelta("sig-b".into()),
        StreamEvent::BlockStop,
        StreamEvent::BlockStart(BlockKind::RedactedReasoning {
            data: "opaque".into(),
        }),
        StreamEvent::BlockStop,
        StreamEvent::BlockStart(BlockKind::Text),
        StreamEvent::TextDelta("Hel".into()),
        StreamEvent::TextDelta("".into()),
        StreamEvent::TextDelta("lo".into()),
        StreamEvent::BlockStop,
        StreamEvent::BlockStart(BlockKind::ToolCall {
            id: "toolu_1".into(),
            name: "ls".into(),
        }),
        StreamEvent::ArgumentsDelta("{\"p\":".into()),
        StreamEvent::ArgumentsDelta("\".\"}".into()),
        // No BlockStop: the end closes the open item.
        StreamEvent::Finish {
            stop: StopReason::ToolUse,
            usage,
        },
    ];
    for event in &events {
        writer.write(event, &mut out);
    }
    let written = responses_events(&out);
    assert_stream_invariants(&written);
    let last = &written.last().unwrap()["data"];
    assert_eq!(last["type"], "response.completed");
    let output = last["response"]["output"].as_array().unwrap();
    assert_eq!(output[0]["summary"][0]["text"], "think hard");
    assert_eq!(output[0]["encrypted_content"], "sig-asig-b");
    assert_eq!(output[1]["encrypted_content"], "opaque");
    assert_eq!(output[1]["summary"], json!([]));
    assert_eq!(output[2]["content"][0]["text"], "Hello");
    assert_eq!(output[3]["arguments"], "{\"p\":\".\"}");
    assert_eq!(output[3]["call_id"], "toolu_1");
    assert_eq!(
        last["response"]["usage"],
        json!({
            "input_tokens": 103,
            "input_tokens_details": {"cached_tokens": 100},
            "output_tokens": 40,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 143,
        })
    );
}
