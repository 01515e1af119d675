//! Golden tests of the Google translation (wire formats §6.1, §6.3, §6.4): each fixture in
//! `tests/golden/google/` holds an OpenAI request and a Gemini answer (or stream, or error) as
//! inputs, and the snapshots of what the gateway produces from them: the Gemini request and the
//! OpenAI answer. A test fails when the produced output differs from the snapshot.
//!
//! After an intended change, `UPDATE_GOLDEN=1 cargo test --test google_golden` rewrites the
//! snapshots; review the diff like code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::StatusCode;
use bytes::BytesMut;
use llm_proxy_data_plane::body;
use llm_proxy_data_plane::errors::ApiError;
use llm_proxy_data_plane::providers::google::{self, Api, chat, embeddings};
use llm_proxy_data_plane::sse::StreamTranslator as _;
use serde_json::{Map, Value, json};
use std::path::PathBuf;

/// Fixture members that are inputs; every other member is a snapshot.
const INPUTS: &[&str] = &[
    "kind", "model", "api", "request", "answer", "stream", "status", "body",
];

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/google")
        .join(format!("{name}.json"))
}

/// Replaces what is random or time-dependent: `created`, synthesised call and completion ids.
fn normalise(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "created" && v.is_number() {
                    *v = json!(0);
                } else {
                    normalise(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalise),
        Value::String(s) => {
            for prefix in ["call_", "chatcmpl-"] {
                if let Some(rest) = s.strip_prefix(prefix) {
                    let random: String = rest.chars().take(24).collect();
                    let after = &rest[random.len()..];
                    let generated = random.len() == 24
                        && random.chars().all(|c| c.is_ascii_alphanumeric())
                        && (after.is_empty() || after.starts_with("__thought__"));
                    if generated {
                        *s = format!("{prefix}<generated>{after}");
                    }
                }
            }
        }
        _ => {}
    }
}

fn error_json(err: &ApiError) -> Value {
    let headers: Map<String, Value> = err
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), json!(v.to_str().unwrap())))
        .collect();
    json!({
        "status": err.status.as_u16(),
        "body": serde_json::from_str::<Value>(&err.body_json()).unwrap(),
        "headers": headers,
    })
}

/// The snapshots a fixture's inputs produce.
fn produce(case: &Value) -> Map<String, Value> {
    let kind = case["kind"].as_str().expect("kind");
    let model = case["model"].as_str().unwrap_or("gemini-2.5-flash");
    let request_bytes = serde_json::to_vec(&case["request"]).unwrap();
    let mut out = Map::new();
    match kind {
        "chat" | "stream" | "rejection" => {
            let request = body::parse(&request_bytes, true).unwrap();
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
                match chat::answer(&answer, model) {
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
                let events: Vec<Value> = std::str::from_utf8(&client)
                    .unwrap()
                    .split("\n\n")
                    .filter(|e| !e.is_empty())
                    .map(|e| {
                        let data = e.strip_prefix("data: ").expect("data event");
                        serde_json::from_str(data).unwrap_or_else(|_| json!(data))
                    })
                    .collect();
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
            let request = body::parse(&request_bytes, true).unwrap();
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
    for value in out.values_mut() {
        normalise(value);
    }
    out
}

fn check(name: &str) {
    let path = fixture_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut case: Value = serde_json::from_str(&text).unwrap();
    let produced = produce(&case);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let object = case.as_object_mut().unwrap();
        object.retain(|key, _| INPUTS.contains(&key.as_str()));
        for (key, value) in produced {
            object.insert(key, value);
        }
        let mut pretty = serde_json::to_string_pretty(&case).unwrap();
        pretty.push('\n');
        std::fs::write(&path, pretty).unwrap();
        return;
    }
    for (key, value) in &produced {
        let expected = case.get(key).unwrap_or(&Value::Null);
        assert_eq!(
            value,
            expected,
            "{name}: `{key}` differs from the snapshot\nproduced:\n{}\nsnapshot:\n{}",
            serde_json::to_string_pretty(value).unwrap(),
            serde_json::to_string_pretty(expected).unwrap()
        );
    }
    for key in case.as_object().unwrap().keys() {
        assert!(
            INPUTS.contains(&key.as_str()) || produced.contains_key(key),
            "{name}: snapshot `{key}` is no longer produced"
        );
    }
}

macro_rules! golden {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*

        #[test]
        fn every_fixture_has_a_test() {
            let names = [$(stringify!($name)),*];
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/google");
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
                assert!(names.contains(&stem.as_str()), "fixture {stem} has no golden! entry");
            }
        }
    };
}

golden!(
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
