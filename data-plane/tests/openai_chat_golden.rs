//! Golden tests of the OpenAI chat dialect of the conversation model (DESIGN §17): each fixture
//! in `mock-upstream/fixtures/golden/openai_chat/` holds an OpenAI chat request, answer or stream
//! as input, and the snapshots of what the converter makes of it: the conversation model (as
//! JSON) and the OpenAI chat written back from it. A test fails when the produced output differs
//! from the snapshot.
//!
//! Kinds: `request` (parse_request, then write_request for `remote_model`), `reply` (parse_reply,
//! then write_reply naming `alias`), `stream` (the `stream` data payloads, `[DONE]` as a string,
//! through `Translate<OpenAiChunkReader, OpenAiChunkWriter>`).
//!
//! After an intended change, `UPDATE_GOLDEN=1 cargo test --test openai_chat_golden` rewrites the
//! snapshots; review the diff like code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use llm_proxy_data_plane::body;
use llm_proxy_data_plane::conversation::openai_chat::{
    OpenAiChunkReader, OpenAiChunkWriter, parse_reply, parse_request, write_reply, write_request,
};
use llm_proxy_data_plane::conversation::{
    BlockKind, EventReader as _, Image, Part, Reply, Request, Role, StopReason, StreamEvent,
    TextBlock, TokenUsage, Translate,
};
use llm_proxy_data_plane::sse::StreamTranslator as _;
use serde_json::{Map, Value, json};

mod golden_support;

use golden_support::{error_json, sse_events};

/// Fixture members that are inputs; every other member is a snapshot.
const INPUTS: &[&str] = &[
    "kind",
    "provider",
    "remote_model",
    "reasoning_effort_accepted",
    "request",
    "answer",
    "alias",
    "include_usage",
    "stream",
];

fn raw_json(raw: &serde_json::value::RawValue) -> Value {
    serde_json::from_str(raw.get()).unwrap()
}

fn text_block_json(block: &TextBlock) -> Value {
    let mut out = json!({ "text": block.text });
    if let Some(cache_control) = &block.cache_control {
        out["cache_control"] = raw_json(cache_control);
    }
    out
}

fn part_json(part: &Part) -> Value {
    match part {
        Part::Text(block) => json!({ "text": text_block_json(block) }),
        Part::Image(Image::Base64 { media_type, data }) => {
            json!({ "image_base64": { "media_type": media_type, "data": data } })
        }
        Part::Image(Image::Url(url)) => json!({ "image_url": url }),
        Part::ToolCall(call) => json!({
            "tool_call": { "id": call.id, "name": call.name, "arguments": call.arguments }
        }),
        Part::ToolResult(result) => json!({
            "tool_result": {
                "call_id": result.call_id,
                "content": result.content.iter().map(part_json).collect::<Vec<_>>(),
                "is_error": result.is_error,
            }
        }),
        Part::Reasoning { text, signature } => {
            json!({ "reasoning": { "text": text, "signature": signature } })
        }
        Part::RedactedReasoning { data } => json!({ "redacted_reasoning": data }),
    }
}

fn usage_json(usage: &TokenUsage) -> Value {
    json!({
        "input": usage.input,
        "output": usage.output,
        "cache_read": usage.cache_read,
        "cache_write": usage.cache_write,
        "reasoning": usage.reasoning,
    })
}

fn stop_json(stop: &StopReason) -> Value {
    match stop {
        StopReason::EndTurn => json!("end_turn"),
        StopReason::MaxTokens => json!("max_tokens"),
        StopReason::StopSequence(sequence) => json!({ "stop_sequence": sequence }),
        StopReason::ToolUse => json!("tool_use"),
        StopReason::ContentFilter => json!("content_filter"),
        StopReason::Other(other) => json!({ "other": other }),
    }
}

/// The conversation model of a request, as JSON for the snapshot.
fn request_json(request: &Request) -> Value {
    json!({
        "model": request.model,
        "system": request.system.iter().map(text_block_json).collect::<Vec<_>>(),
        "messages": request.messages.iter().map(|m| json!({
            "role": match m.role { Role::User => "user", Role::Assistant => "assistant", Role::System => "system" },
            "content": m.content.iter().map(part_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "tools": request.tools.iter().map(|t| {
            let mut tool = json!({
                "name": t.name,
                "description": t.description,
                "parameters": raw_json(&t.parameters),
            });
            if let Some(cache_control) = &t.cache_control {
                tool["cache_control"] = raw_json(cache_control);
            }
            tool
        }).collect::<Vec<_>>(),
        "tool_choice": request.tool_choice.as_ref().map(|c| format!("{c:?}")),
        "parallel_tool_calls": request.parallel_tool_calls,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "stop_sequences": request.stop_sequences,
        "stream": request.stream,
        "reasoning": request.reasoning.as_ref().map(|r| json!({
            "budget_tokens": r.budget_tokens,
            "effort": r.effort,
        })),
        "json_schema": request.json_schema.as_ref().map(|s| json!({
            "name": s.name,
            "schema": raw_json(&s.schema),
            "strict": s.strict,
        })),
    })
}

fn reply_json(reply: &Reply) -> Value {
    json!({
        "id": reply.id,
        "model": reply.model,
        "content": reply.content.iter().map(part_json).collect::<Vec<_>>(),
        "stop": stop_json(&reply.stop),
        "usage": usage_json(&reply.usage),
    })
}

fn event_json(event: &StreamEvent) -> Value {
    match event {
        StreamEvent::Start { id, model, usage } => {
            json!({ "start": { "id": id, "model": model, "usage": usage_json(usage) } })
        }
        StreamEvent::BlockStart(kind) => json!({ "block_start": match kind {
            BlockKind::Text => json!("text"),
            BlockKind::Reasoning => json!("reasoning"),
            BlockKind::RedactedReasoning { data } => json!({ "redacted_reasoning": data }),
            BlockKind::ToolCall { id, name } => json!({ "tool_call": { "id": id, "name": name } }),
        }}),
        StreamEvent::TextDelta(text) => json!({ "text_delta": text }),
        StreamEvent::ReasoningDelta(text) => json!({ "reasoning_delta": text }),
        StreamEvent::SignatureDelta(text) => json!({ "signature_delta": text }),
        StreamEvent::ArgumentsDelta(text) => json!({ "arguments_delta": text }),
        StreamEvent::BlockStop => json!("block_stop"),
        StreamEvent::Finish { stop, usage } => {
            json!({ "finish": { "stop": stop_json(stop), "usage": usage_json(usage) } })
        }
    }
}

/// The upstream's SSE bytes for the fixture's `stream` payloads.
fn upstream_stream(case: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    for payload in case["stream"].as_array().expect("stream payloads") {
        let data = match payload {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        bytes.extend_from_slice(format!("data: {data}\n\n").as_bytes());
    }
    bytes
}

/// The snapshots a fixture's inputs produce.
fn produce(case: &Value) -> Map<String, Value> {
    let kind = case["kind"].as_str().expect("kind");
    let provider = case["provider"].as_str().unwrap_or("anthropic");
    let alias = case["alias"].as_str().unwrap_or("my-alias");
    let mut out = Map::new();
    match kind {
        "request" => {
            let bytes = serde_json::to_vec(&case["request"]).unwrap();
            let parsed = body::parse(
                &bytes,
                true,
                llm_proxy_data_plane::limits::Limits::default().max_top_level_keys,
            )
            .unwrap();
            match parse_request(&parsed, provider) {
                Ok(request) => {
                    out.insert("conversation_model".into(), request_json(&request));
                    let written = write_request(
                        &request,
                        case["remote_model"].as_str().unwrap_or("gpt-5"),
                        case["reasoning_effort_accepted"].as_bool().unwrap_or(true),
                    );
                    out.insert(
                        "openai_request".into(),
                        serde_json::from_slice(&written).unwrap(),
                    );
                }
                Err(err) => {
                    out.insert("openai_error".into(), error_json(&err));
                }
            }
        }
        "reply" => {
            let bytes = serde_json::to_vec(&case["answer"]).unwrap();
            match parse_reply(&bytes, provider) {
                Ok(reply) => {
                    out.insert("conversation_reply".into(), reply_json(&reply));
                    out.insert(
                        "openai_answer".into(),
                        serde_json::from_slice(&write_reply(&reply, alias)).unwrap(),
                    );
                }
                Err(err) => {
                    out.insert("openai_error".into(), error_json(&err));
                }
            }
        }
        "stream" => {
            let upstream = upstream_stream(case);
            let max = llm_proxy_data_plane::limits::Limits::default().max_stream_event_bytes;
            // The model's events, read on their own.
            let mut reader = OpenAiChunkReader::new("openai", max);
            let mut events = Vec::new();
            let read = reader
                .push(&upstream, &mut events)
                .and_then(|()| reader.finish(&mut events));
            out.insert(
                "conversation_events".into(),
                Value::Array(events.iter().map(event_json).collect()),
            );
            // What the client gets, the upstream fed in odd pieces.
            let include_usage = case["include_usage"].as_bool().unwrap_or(true);
            let mut translate = Translate::new(
                OpenAiChunkReader::new("openai", max),
                OpenAiChunkWriter::new(alias, include_usage),
            );
            let mut client = BytesMut::new();
            let mut error = None;
            for piece in upstream.chunks(7) {
                if let Err(err) = translate.push(piece, &mut client) {
                    error = Some(err);
                    break;
                }
            }
            if error.is_none()
                && let Err(err) = translate.finish(&mut client)
            {
                error = Some(err);
            }
            assert_eq!(
                read.as_ref().err().map(|e| e.message.clone()),
                error.as_ref().map(|e| e.message.clone()),
                "the reader fails the same way whole or in pieces"
            );
            if let Some(err) = &error {
                translate.write_error(err, &mut client);
                out.insert("stream_error".into(), error_json(err));
            }
            out.insert("openai_stream".into(), Value::Array(sse_events(&client)));
            out.insert(
                "usage_counted".into(),
                json!(translate.usage().map(|u| [
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.total_tokens,
                    u.cache_read_tokens
                ])),
            );
        }
        other => panic!("unknown fixture kind {other}"),
    }
    out
}

golden_tests!("openai_chat", INPUTS, produce;
    request_plain,
    request_system_and_developer,
    request_images,
    request_tools_named_choice,
    request_tool_round_trip,
    request_json_schema_and_reasoning,
    request_limits_stop_and_dropped_fields,
    request_reasoning_not_accepted,
    rejection_n,
    rejection_json_object,
    rejection_audio_part,
    rejection_functions,
    reply_text_with_cached_usage,
    reply_tool_calls,
    reply_reasoning_content,
    reply_refusal,
    reply_without_choices,
    stream_text_with_usage,
    stream_text_then_tool_calls,
    stream_without_usage,
    stream_reasoning_content,
    stream_without_done,
    stream_truncated,
    stream_error_event,
);
