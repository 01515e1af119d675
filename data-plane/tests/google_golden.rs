//! Golden tests of the Google translation (wire formats §6.1, §6.3, §6.4): each fixture in
//! `mock-upstream/fixtures/golden/google/` holds an OpenAI request and a Gemini answer (or stream, or error) as
//! inputs, and the snapshots of what the gateway produces from them: the Gemini request and the
//! OpenAI answer. A test fails when the produced output differs from the snapshot.
//!
//! After an intended change, `UPDATE_GOLDEN=1 cargo test --test google_golden` rewrites the
//! snapshots; review the diff like code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::StatusCode;
use bytes::BytesMut;
use llm_proxy_data_plane::body;
use llm_proxy_data_plane::providers::google::{self, Api, chat, embeddings};
use llm_proxy_data_plane::sse::StreamTranslator as _;
use serde_json::{Map, Value, json};

mod golden_support;

use golden_support::{error_json, sse_events};

/// Fixture members that are inputs; every other member is a snapshot.
const INPUTS: &[&str] = &[
    "kind", "model", "api", "request", "answer", "stream", "status", "body",
];

/// The snapshots a fixture's inputs produce.
fn produce(case: &Value) -> Map<String, Value> {
    let kind = case["kind"].as_str().expect("kind");
    let model = case["model"].as_str().unwrap_or("gemini-2.5-flash");
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
            match chat::request(&request, model) {
                Ok(gemini) => {
                    out.insert(
                        "gemini_request".into(),
                        serde_json::from_slice(&gemini).unwrap(),
                    );
                }
                Err(err) => {
                    out.insert("openai_error".into(), error_json(&err));
                    return out;
                }
            }
            if kind == "chat" {
                let answer = serde_json::to_vec(&case["answer"]).unwrap();
                match chat::answer(
                    &answer,
                    model,
                    llm_proxy_data_plane::limits::Limits::default().max_upstream_index,
                ) {
                    Ok((translated, usage)) => {
                        out.insert(
                            "openai_answer".into(),
                            serde_json::from_slice(&translated).unwrap(),
                        );
                        out.insert(
                            "usage_counted".into(),
                            json!(usage.map(|u| [
                                u.prompt_tokens,
                                u.completion_tokens,
                                u.total_tokens
                            ])),
                        );
                    }
                    Err(err) => {
                        out.insert("openai_error".into(), error_json(&err));
                    }
                }
            }
            if kind == "stream" {
                let mut stream = chat::GeminiStream::new(model, request.include_usage);
                let mut client = BytesMut::new();
                let mut error = None;
                for event in case["stream"].as_array().expect("stream events") {
                    // Google frames events with CRLF; no [DONE].
                    let frame = format!("data: {event}\r\n\r\n");
                    if let Err(err) = stream.push(frame.as_bytes(), &mut client) {
                        error = Some(err);
                        break;
                    }
                }
                if error.is_none()
                    && let Err(err) = stream.finish(&mut client)
                {
                    error = Some(err);
                }
                let events = sse_events(&client);
                out.insert("openai_stream".into(), Value::Array(events));
                if let Some(err) = error {
                    out.insert("stream_error".into(), error_json(&err));
                }
                out.insert(
                    "usage_counted".into(),
                    json!(stream.usage().map(|u| [
                        u.prompt_tokens,
                        u.completion_tokens,
                        u.total_tokens
                    ])),
                );
            }
        }
        "embeddings" => {
            let api = match case["api"].as_str() {
                Some("vertex") => Api::Vertex,
                _ => Api::Gemini,
            };
            let request = body::parse(
                &request_bytes,
                true,
                llm_proxy_data_plane::limits::Limits::default().max_top_level_keys,
            )
            .unwrap();
            let (method, upstream, answer) = embeddings::request(&request, api, model).unwrap();
            out.insert("upstream_method".into(), json!(method));
            out.insert(
                "upstream_request".into(),
                serde_json::from_slice(&upstream).unwrap(),
            );
            let (translated, _) = answer
                .translate(&serde_json::to_vec(&case["answer"]).unwrap())
                .unwrap();
            out.insert(
                "openai_answer".into(),
                serde_json::from_slice(&translated).unwrap(),
            );
        }
        "error" => {
            let status = StatusCode::from_u16(case["status"].as_u64().unwrap() as u16).unwrap();
            let body = serde_json::to_vec(&case["body"]).unwrap();
            out.insert(
                "openai_error".into(),
                error_json(&google::upstream_error(status, &body)),
            );
        }
        other => panic!("unknown fixture kind {other}"),
    }
    out
}

golden_tests!("google", INPUTS, produce;
    plain,
    system_and_developer,
    multi_turn,
    image_inputs,
    tools_named_choice,
    tool_results,
    parallel_calls,
    json_schema,
    json_object,
    stop_n_max_tokens,
    reasoning_gemini_2_5_pro,
    reasoning_gemini_3,
    blocked_prompt,
    unsupported_field,
    stream_text_with_usage,
    stream_tool_call,
    stream_error_event,
    stream_blocked,
    embeddings_gemini_base64,
    embeddings_vertex_float,
    error_rate_limited,
    error_invalid_key,
    error_invalid_argument,
    error_unknown_model,
);
