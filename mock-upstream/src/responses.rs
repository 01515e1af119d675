//! The OpenAI Responses API as OpenAI and Azure OpenAI serve it (DESIGN §17): create, retrieve,
//! delete and list the input items of stored responses, JSON and SSE.
//!
//! Paths (the method picks the operation; any other method is a 405):
//! - OpenAI: `POST …/responses`, `GET` / `DELETE …/responses/{id}`, `GET
//!   …/responses/{id}/input_items`, under any prefix (`/v1/responses`, `/responses`,
//!   `/proxy/v1/responses`, …), with `Authorization: Bearer` [`OPENAI_KEY`] or
//!   [`OPENAI_SECOND_KEY`] (else OpenAI's 401 `invalid_api_key`).
//! - Azure v1: the same under `/openai/v1/` (`/openai/v1/responses`, …) with `api-key`
//!   [`AZURE_KEY`] (else Azure's 401); `api-version` may be absent, `preview` or `latest`, anything
//!   else is a 400 `API version not supported`.
//! - Azure dated: the same under `/openai/` (`/openai/responses?api-version=V`, …) with `api-key`;
//!   V must be [`MIN_DATED_API_VERSION`]`-preview` or later (the date counts), else a 400
//!   `BadRequest` (an earlier date: "Azure OpenAI Responses API is enabled only for api-version
//!   2025-03-01-preview and later"; not a date: "API version not supported"); without
//!   `api-version`, Azure's 404 `Resource not found`.
//!
//! State: each [`MockState`] keeps its own [`Store`] (id → response and the items that went
//! into it), so two mocks are two accounts that know nothing of each other's responses. A
//! response is stored unless the request says `"store": false` (its answer then says so too);
//! answers cut by `MIDSTREAMERROR` or `TRUNCATEME` are not stored. `previous_response_id` must
//! name a response stored here (else 400 `previous_response_not_found`); the conversation is
//! then that response's input items and output, then this request's `input` (a string is one
//! user message). `instructions` are not carried over, as OpenAI documents.
//!
//! The answer, from the whole conversation:
//! - models whose name starts with `o` and a digit, or with `gpt-5`, first give a `reasoning`
//!   item (`rs_…`, summary [`REASONING_SUMMARY`], and [`ENCRYPTED_REASONING`] as
//!   `encrypted_content` only when `include` has `reasoning.encrypted_content`);
//! - when the conversation ends with a `function_call_output`: a message `Hello from mock
//!   responses: the tool said <output>`;
//! - else when `tools` declare a function `get_weather` and the last user message mentions
//!   "weather": a `function_call` item (`fc_…`, `call_…`, `get_weather`, [`WEATHER_ARGUMENTS`]);
//! - else a message `Hello from mock responses: turn N`, N the number of user messages in the
//!   conversation.
//!
//! Usage is fixed: [`INPUT_TOKENS`] in, [`OUTPUT_TOKENS`] out; reasoning models add
//! [`REASONING_TOKENS`] to the output (and report them as `reasoning_tokens`); a body containing
//! `CACHEME` adds [`CACHED_TOKENS`] to the input (and reports them as `cached_tokens`).
//!
//! A stream (`"stream": true`) is `event: <type>` + `data:` events with `sequence_number` 0, 1, …:
//! `response.created`, `response.in_progress`, then per output item `response.output_item.added`,
//! its own events (reasoning: `response.reasoning_summary_part.added`, two
//! `response.reasoning_summary_text.delta`, `….done`, `response.reasoning_summary_part.done`;
//! message: `response.content_part.added`, up to three `response.output_text.delta`,
//! `response.output_text.done`, `response.content_part.done`; function call: two
//! `response.function_call_arguments.delta`, `….done`), `response.output_item.done`; and
//! `response.completed` with the whole response. Each event goes out in its own write.
//!
//! Words in the request body steer it: `RATELIMITME` (429 with `retry-after: 7`; Azure's shape on
//! Azure paths), `OVERLOADME` (503), `MIDSTREAMERROR` (the stream's first five events, then
//! `response.failed` with a `server_error`; not streamed: OpenAI's 500), `TRUNCATEME` (the stream
//! ends before `response.output_text.done`, or before `response.completed` for a function call;
//! not streamed: the JSON cut in half), `HOLDME` (wait for [`MockState::release`]),
//! `SLOWSTREAM` (`response.created`, then nothing until the client goes; signals
//! [`MockState::stream_dropped`]), and `NOTJSON` and the other garbage words of
//! [`crate::openai`]. The model `server-error` answers OpenAI's 500.
//!
//! Where each shape comes from: `fixtures/README.md`.

use crate::anthropic::{pieces, to_anthropic_json};
use crate::openai::{
    AZURE_KEY, DropSignal, OPENAI_KEY, OPENAI_SECOND_KEY, SERVER_ERROR_MODEL, garbage_answer,
    openai_error, server_error,
};
use crate::{MockState, Recorded, json_response};
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

/// Input tokens of every answer (plus [`CACHED_TOKENS`] with `CACHEME`).
pub const INPUT_TOKENS: u64 = 37;
/// Output tokens of every answer (plus [`REASONING_TOKENS`] for reasoning models).
pub const OUTPUT_TOKENS: u64 = 11;
/// Reasoning tokens of a reasoning model's answer, counted in its output tokens.
pub const REASONING_TOKENS: u64 = 64;
/// Cached input tokens reported when the body contains `CACHEME`, counted in the input tokens.
pub const CACHED_TOKENS: u64 = 1024;
/// The start of every answer text.
pub const TEXT_PREFIX: &str = "Hello from mock responses: ";
/// The text of the reasoning items' summary.
pub const REASONING_SUMMARY: &str = "Thinking about it.";
/// The `encrypted_content` of the reasoning items, when `include` asks for it.
pub const ENCRYPTED_REASONING: &str =
    "gAAAAABmockEncryptedReasoning0123456789abcdefghijklmnopqrstuvwxyzABCDEF==";
/// The arguments of the `get_weather` calls.
pub const WEATHER_ARGUMENTS: &str = r#"{"location":"Paris"}"#;
/// The first date of the dated Azure API versions that serve `/openai/responses`.
pub const MIN_DATED_API_VERSION: &str = "2025-03-01";
/// The `include` value that adds `encrypted_content` to reasoning items.
const INCLUDE_ENCRYPTED: &str = "reasoning.encrypted_content";
/// A fixed `created_at` (that of OpenAI's reference example), so answers are reproducible.
const CREATED_AT: u64 = 1_741_476_542;

/// The responses stored by one mock (one "account"): id → the response object and the items
/// that went into it (the previous responses' items and outputs, then its own input), oldest
/// first.
#[derive(Debug, Default)]
pub struct Store(Mutex<HashMap<String, Stored>>);

#[derive(Debug, Clone)]
struct Stored {
    response: Value,
    input_items: Vec<Value>,
}

impl Store {
    /// The stored response object with `id`, if any.
    pub fn get(&self, id: &str) -> Option<Value> {
        self.lock().get(id).map(|stored| stored.response.clone())
    }

    /// The ids of the stored responses, in no particular order.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stored(&self, id: &str) -> Option<Stored> {
        self.lock().get(id).cloned()
    }

    fn insert(&self, id: String, stored: Stored) {
        self.lock().insert(id, stored);
    }

    fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }
}

/// The operation a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    /// `…/responses`.
    Create,
    /// `…/responses/{id}`.
    Response(&'a str),
    /// `…/responses/{id}/input_items`.
    InputItems(&'a str),
}

fn route_of(path: &str) -> Option<Route<'_>> {
    if path.ends_with("/responses") {
        return Some(Route::Create);
    }
    let (head, last) = path.rsplit_once('/')?;
    if last == "input_items" {
        let (head, id) = head.rsplit_once('/')?;
        return (head.ends_with("/responses") && !id.is_empty()).then_some(Route::InputItems(id));
    }
    (head.ends_with("/responses") && !last.is_empty()).then_some(Route::Response(last))
}

/// Whether `path` is a Responses API path: it ends in `/responses`, `/responses/{id}` or
/// `/responses/{id}/input_items`.
pub fn is_responses_path(path: &str) -> bool {
    route_of(path).is_some()
}

/// Whose Responses API a path reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Account {
    OpenAi,
    /// `/openai/v1/…`.
    AzureV1,
    /// `/openai/…?api-version=`.
    AzureDated,
}

fn account_of(path: &str) -> Account {
    if path.starts_with("/openai/v1/") {
        Account::AzureV1
    } else if path.starts_with("/openai/") {
        Account::AzureDated
    } else {
        Account::OpenAi
    }
}

/// The answer of OpenAI or Azure (by path) to `recorded`, a path [`is_responses_path`] accepted.
pub async fn answer(mock: &Arc<MockState>, recorded: Recorded) -> Response {
    let Some(route) = route_of(&recorded.path) else {
        return invalid_url(&recorded);
    };
    let account = account_of(&recorded.path);
    if let Some(refusal) = refuse_credentials_or_version(account, &recorded) {
        return refusal;
    }
    match (route, &recorded.method) {
        (Route::Create, &Method::POST) => create(mock, &recorded, account).await,
        (Route::Response(id), &Method::GET) => match mock.responses.get(id) {
            Some(response) => json_response(StatusCode::OK, &response),
            None => response_not_found(id),
        },
        (Route::Response(id), &Method::DELETE) => {
            if mock.responses.remove(id) {
                json_response(
                    StatusCode::OK,
                    &json!({"id": id, "object": "response", "deleted": true}),
                )
            } else {
                response_not_found(id)
            }
        }
        (Route::InputItems(id), &Method::GET) => match mock.responses.stored(id) {
            Some(stored) => list_input_items(&stored.input_items, recorded.query.as_deref()),
            None => response_not_found(id),
        },
        _ => openai_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!(
                "Invalid method for URL ({} {})",
                recorded.method, recorded.path
            ),
            "invalid_request_error",
            Value::Null,
        ),
    }
}

fn invalid_url(recorded: &Recorded) -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        &format!("Invalid URL ({} {})", recorded.method, recorded.path),
        "invalid_request_error",
        Value::Null,
    )
}

/// Azure's `{"error":{"code","message"}}` with `status`.
fn azure_error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

/// The value of `name` in `query`, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The refusal of a request without the account's credentials, or with an `api-version` the
/// Azure route does not serve.
fn refuse_credentials_or_version(account: Account, recorded: &Recorded) -> Option<Response> {
    if account == Account::OpenAi {
        let accepted = recorded
            .header("authorization")
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|key| key == OPENAI_KEY || key == OPENAI_SECOND_KEY);
        return (!accepted).then(|| {
            openai_error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided: sk-up***789.",
                "invalid_request_error",
                "invalid_api_key",
            )
        });
    }
    if recorded.header("api-key") != Some(AZURE_KEY) {
        return Some(azure_error(
            StatusCode::UNAUTHORIZED,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint.",
        ));
    }
    let version = query_param(recorded.query.as_deref(), "api-version");
    let unsupported = || {
        Some(azure_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "API version not supported",
        ))
    };
    match (account, version.as_deref()) {
        (Account::AzureV1, None | Some("preview" | "latest")) => None,
        (Account::AzureV1, Some(_)) => unsupported(),
        (_, None) => Some(azure_error(
            StatusCode::NOT_FOUND,
            "404",
            "Resource not found",
        )),
        (_, Some(version)) => match dated(version) {
            Some(date) if date >= MIN_DATED_API_VERSION => None,
            Some(_) => Some(azure_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "Azure OpenAI Responses API is enabled only for api-version 2025-03-01-preview and later",
            )),
            None => unsupported(),
        },
    }
}

/// The `YYYY-MM-DD` date of an Azure API version (`2025-04-01-preview` → `2025-04-01`).
fn dated(version: &str) -> Option<&str> {
    let date = version.get(..10)?;
    let rest = &version[10..];
    let shaped = date.bytes().enumerate().all(|(i, b)| {
        if i == 4 || i == 7 {
            b == b'-'
        } else {
            b.is_ascii_digit()
        }
    });
    (shaped && (rest.is_empty() || rest == "-preview")).then_some(date)
}

fn response_not_found(id: &str) -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        &format!("Response with id '{id}' not found."),
        "invalid_request_error",
        Value::Null,
    )
}

/// OpenAI's 400 with `param` and `code`.
fn invalid_request(message: &str, param: Value, code: Value) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}),
    )
}

/// `GET …/input_items`: OpenAI's list, newest first unless `order=asc`, `limit` (1 to 100,
/// default 20) items after the item `after`.
fn list_input_items(items: &[Value], query: Option<&str>) -> Response {
    let ascending = match query_param(query, "order").as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return invalid_request(
                &format!("Invalid value: '{other}'. Supported values are: 'asc' and 'desc'."),
                json!("order"),
                json!("invalid_value"),
            );
        }
    };
    let limit = match query_param(query, "limit") {
        None => 20,
        Some(text) => match text.parse::<usize>() {
            Ok(limit @ 1..=100) => limit,
            _ => {
                return invalid_request(
                    &format!("Invalid 'limit': integer between 1 and 100 expected, got '{text}'."),
                    json!("limit"),
                    json!("invalid_value"),
                );
            }
        },
    };
    let mut ordered: Vec<&Value> = items.iter().collect();
    if !ascending {
        ordered.reverse();
    }
    if let Some(after) = query_param(query, "after") {
        let at = ordered.iter().position(|item| item["id"] == after.as_str());
        ordered = at.map_or_else(Vec::new, |at| ordered.split_off(at + 1));
    }
    let has_more = ordered.len() > limit;
    ordered.truncate(limit);
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": ordered,
            "first_id": ordered.first().map(|item| &item["id"]),
            "last_id": ordered.last().map(|item| &item["id"]),
            "has_more": has_more,
        }),
    )
}

/// A fresh id: `prefix`, then 48 hex digits as OpenAI's ids have.
fn new_id(prefix: &str) -> String {
    let bytes: [u8; 24] = rand::random();
    let mut id = String::with_capacity(prefix.len() + 48);
    id.push_str(prefix);
    for byte in bytes {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

/// A fresh `call_…` id (24 letters and digits, as OpenAI's call ids).
fn new_call_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let letters: String = (0..24)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect();
    format!("call_{letters}")
}

/// `input` as stored items: a string is one user message; messages get `type: "message"`, and
/// their string content becomes one `input_text` part (`output_text` for the assistant); every
/// item gets an id if it has none.
fn input_items(input: &Value) -> Vec<Value> {
    let items = match input {
        Value::Null => Vec::new(),
        Value::String(text) => vec![json!({"role": "user", "content": text})],
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    items
        .into_iter()
        .map(|mut item| {
            let is_message =
                item.get("type").is_none_or(|kind| kind == "message") && item.get("role").is_some();
            if is_message {
                item["type"] = json!("message");
                if let Some(text) = item["content"].as_str() {
                    let part = if item["role"] == "assistant" {
                        json!({"type": "output_text", "text": text, "annotations": []})
                    } else {
                        json!({"type": "input_text", "text": text})
                    };
                    item["content"] = json!([part]);
                }
            }
            if item.get("id").is_none_or(Value::is_null) && item.is_object() {
                let prefix = match item["type"].as_str() {
                    Some("function_call") => "fc_",
                    Some("function_call_output") => "fco_",
                    Some("reasoning") => "rs_",
                    _ => "msg_",
                };
                item["id"] = json!(new_id(prefix));
            }
            item
        })
        .collect()
}

/// The text of a message's content (a string, or its parts' `text` joined with spaces).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn is_user_message(item: &Value) -> bool {
    item["role"] == "user" && item.get("type").is_none_or(|kind| kind == "message")
}

/// Whether `model` reasons: `o` and a digit (`o3`, `o4-mini`), or `gpt-5…`.
fn is_reasoning_model(model: &str) -> bool {
    let mut chars = model.chars();
    (chars.next() == Some('o') && chars.next().is_some_and(|c| c.is_ascii_digit()))
        || model.starts_with("gpt-5")
}

/// Whether `tools` declare a function `get_weather` (at the top level or in a namespace).
fn offers_weather(tools: &Value) -> bool {
    tools.as_array().is_some_and(|tools| {
        tools.iter().any(|tool| {
            (tool["type"] == "function" && tool["name"] == "get_weather")
                || offers_weather(&tool["tools"])
        })
    })
}

/// The token counts of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    input: u64,
    cached: u64,
    output: u64,
    reasoning: u64,
}

impl Usage {
    fn to_json(self) -> Value {
        json!({
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input + self.output,
        })
    }
}

/// The output items the mock model gives for `conversation` (oldest first).
fn reply(request: &Value, model: &str, conversation: &[Value]) -> Vec<Value> {
    let mut output = Vec::new();
    if is_reasoning_model(model) {
        let mut reasoning = json!({"id": new_id("rs_"), "type": "reasoning",
            "summary": [{"type": "summary_text", "text": REASONING_SUMMARY}]});
        let include = request["include"].as_array();
        if include.is_some_and(|include| include.iter().any(|i| i == INCLUDE_ENCRYPTED)) {
            reasoning["encrypted_content"] = json!(ENCRYPTED_REASONING);
        }
        output.push(reasoning);
    }
    let last_user = conversation.iter().rev().find(|item| is_user_message(item));
    let mentions_weather =
        last_user.is_some_and(|item| text_of(&item["content"]).to_lowercase().contains("weather"));
    let text = match conversation.last() {
        Some(last) if last["type"] == "function_call_output" => {
            let said = match &last["output"] {
                Value::String(text) => text.clone(),
                other => text_of(other),
            };
            format!("{TEXT_PREFIX}the tool said {said}")
        }
        _ if mentions_weather && offers_weather(&request["tools"]) => {
            output.push(
                json!({"id": new_id("fc_"), "type": "function_call", "status": "completed",
                "arguments": WEATHER_ARGUMENTS, "call_id": new_call_id(), "name": "get_weather"}),
            );
            return output;
        }
        _ => {
            let turns = conversation
                .iter()
                .filter(|item| is_user_message(item))
                .count();
            format!("{TEXT_PREFIX}turn {turns}")
        }
    };
    output.push(
        json!({"id": new_id("msg_"), "type": "message", "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]}),
    );
    output
}

/// A request field, or `default` when the request has none.
fn field_or(request: &Value, name: &str, default: Value) -> Value {
    match request.get(name) {
        Some(value) if !value.is_null() => value.clone(),
        _ => default,
    }
}

/// The Response object, as OpenAI's reference shows it.
fn response_object(
    id: &str,
    request: &Value,
    model: &str,
    output: &[Value],
    usage: Usage,
    store: bool,
) -> Value {
    let reasoning = if is_reasoning_model(model) {
        json!({"effort": field_or(&request["reasoning"], "effort", json!("medium")),
               "summary": field_or(&request["reasoning"], "summary", Value::Null)})
    } else {
        json!({"effort": null, "summary": null})
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": CREATED_AT,
        "status": "completed",
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": field_or(request, "instructions", Value::Null),
        "max_output_tokens": field_or(request, "max_output_tokens", Value::Null),
        "max_tool_calls": field_or(request, "max_tool_calls", Value::Null),
        "model": model,
        "output": output,
        "parallel_tool_calls": field_or(request, "parallel_tool_calls", json!(true)),
        "previous_response_id": field_or(request, "previous_response_id", Value::Null),
        "prompt_cache_key": field_or(request, "prompt_cache_key", Value::Null),
        "reasoning": reasoning,
        "safety_identifier": field_or(request, "safety_identifier", Value::Null),
        "service_tier": "default",
        "store": store,
        "temperature": field_or(request, "temperature", json!(1.0)),
        "text": field_or(request, "text", json!({"format": {"type": "text"}})),
        "tool_choice": field_or(request, "tool_choice", json!("auto")),
        "tools": field_or(request, "tools", json!([])),
        "top_logprobs": field_or(request, "top_logprobs", json!(0)),
        "top_p": field_or(request, "top_p", json!(1.0)),
        "truncation": field_or(request, "truncation", json!("disabled")),
        "usage": usage.to_json(),
        "user": field_or(request, "user", Value::Null),
        "metadata": field_or(request, "metadata", json!({})),
    })
}

/// `response` as it is while in progress: no output, no usage.
fn in_progress(response: &Value) -> Value {
    let mut response = response.clone();
    response["status"] = json!("in_progress");
    response["output"] = json!([]);
    response["usage"] = Value::Null;
    response
}

/// The stream events of `response` (each with its `type`, without `sequence_number` yet).
fn stream_events(response: &Value) -> Vec<Value> {
    let mut events = vec![
        json!({"type": "response.created", "response": in_progress(response)}),
        json!({"type": "response.in_progress", "response": in_progress(response)}),
    ];
    let output = response["output"].as_array().map_or(&[][..], Vec::as_slice);
    for (index, item) in output.iter().enumerate() {
        let id = &item["id"];
        let mut added = item.clone();
        match item["type"].as_str() {
            Some("reasoning") => {
                added["summary"] = json!([]);
                if let Some(added) = added.as_object_mut() {
                    added.remove("encrypted_content");
                }
                events.push(json!({"type": "response.output_item.added", "output_index": index, "item": added}));
                let text = item["summary"][0]["text"].as_str().unwrap_or_default();
                let part = |text: &str| json!({"type": "summary_text", "text": text});
                events.push(
                    json!({"type": "response.reasoning_summary_part.added", "item_id": id,
                    "output_index": index, "summary_index": 0, "part": part("")}),
                );
                for piece in pieces(text, 2) {
                    events.push(
                        json!({"type": "response.reasoning_summary_text.delta", "item_id": id,
                        "output_index": index, "summary_index": 0, "delta": piece}),
                    );
                }
                events.push(
                    json!({"type": "response.reasoning_summary_text.done", "item_id": id,
                    "output_index": index, "summary_index": 0, "text": text}),
                );
                events.push(
                    json!({"type": "response.reasoning_summary_part.done", "item_id": id,
                    "output_index": index, "summary_index": 0, "part": part(text)}),
                );
            }
            Some("function_call") => {
                added["status"] = json!("in_progress");
                added["arguments"] = json!("");
                events.push(json!({"type": "response.output_item.added", "output_index": index, "item": added}));
                let arguments = item["arguments"].as_str().unwrap_or_default();
                let cut = arguments.find(':').map_or(arguments.len(), |at| at + 1);
                let (head, tail) = arguments.split_at(cut);
                for piece in [head, tail] {
                    events.push(json!({"type": "response.function_call_arguments.delta",
                        "item_id": id, "output_index": index, "delta": piece}));
                }
                events.push(
                    json!({"type": "response.function_call_arguments.done", "item_id": id,
                    "output_index": index, "name": item["name"], "arguments": arguments}),
                );
            }
            _ => {
                added["status"] = json!("in_progress");
                added["content"] = json!([]);
                events.push(json!({"type": "response.output_item.added", "output_index": index, "item": added}));
                let part = &item["content"][0];
                let text = part["text"].as_str().unwrap_or_default();
                let mut empty = part.clone();
                empty["text"] = json!("");
                let event = |kind: &str, extra: Value| {
                    let mut event = json!({"type": kind, "item_id": id, "output_index": index,
                                           "content_index": 0});
                    if let (Some(event), Some(extra)) = (event.as_object_mut(), extra.as_object()) {
                        event.extend(extra.clone());
                    }
                    event
                };
                events.push(event("response.content_part.added", json!({"part": empty})));
                for piece in pieces(text, 3) {
                    events.push(event(
                        "response.output_text.delta",
                        json!({"delta": piece, "logprobs": []}),
                    ));
                }
                events.push(event(
                    "response.output_text.done",
                    json!({"text": text, "logprobs": []}),
                ));
                events.push(event("response.content_part.done", json!({"part": part})));
            }
        }
        events.push(
            json!({"type": "response.output_item.done", "output_index": index, "item": item}),
        );
    }
    events.push(json!({"type": "response.completed", "response": response}));
    events
}

/// One SSE event: `event: <type>`, then `data:` with the event's JSON, `type` first as OpenAI
/// writes it.
fn sse_event(event: &Value) -> Bytes {
    let kind = event["type"].as_str().unwrap_or("message");
    Bytes::from(format!(
        "event: {kind}\ndata: {}\n\n",
        to_anthropic_json(event)
    ))
}

/// `events` numbered from 0 by `sequence_number`.
fn numbered(events: Vec<Value>) -> Vec<Value> {
    events
        .into_iter()
        .enumerate()
        .map(|(number, mut event)| {
            event["sequence_number"] = json!(number);
            event
        })
        .collect()
}

/// A body sending each of `chunks` in its own write.
fn one_write_each(chunks: Vec<Bytes>) -> Body {
    let stream = futures_util::stream::unfold(chunks.into_iter(), |mut rest| async move {
        let chunk = rest.next()?;
        // Pending once before each chunk: the connection then flushes what it holds, so the
        // previous event leaves in a write of its own instead of being batched with this one.
        tokio::task::yield_now().await;
        Some((Ok::<_, Infallible>(chunk), rest))
    });
    Body::from_stream(stream)
}

fn event_stream(body: Body) -> Response {
    let mut response =
        ([("content-type", "text/event-stream; charset=utf-8")], body).into_response();
    response.headers_mut().insert(
        "x-request-id",
        HeaderValue::from_static("req_mockresponses0001"),
    );
    response
}

/// The refusals asked for by `RATELIMITME` and `OVERLOADME`, in the account's shape.
fn refused_by_trigger(account: Account, text: &str, model: &str) -> Option<Response> {
    if text.contains("RATELIMITME") {
        let mut response = if account == Account::OpenAi {
            json_response(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({"error": {"message": format!("Rate limit reached for {model} in organization org-mock on tokens per min (TPM): Limit 30000, Used 30000, Requested {INPUT_TOKENS}. Please try again in 7s. Visit https://platform.openai.com/account/rate-limits to learn more."),
                    "type": "tokens", "param": null, "code": "rate_limit_exceeded"}}),
            )
        } else {
            let mut response = azure_error(
                StatusCode::TOO_MANY_REQUESTS,
                "429",
                "Requests to the Responses_Create Operation under Azure OpenAI API version 2025-04-01-preview have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 7 seconds.",
            );
            response
                .headers_mut()
                .insert("retry-after-ms", HeaderValue::from_static("6500"));
            response
        };
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("7"));
        return Some(response);
    }
    if text.contains("OVERLOADME") {
        return Some(openai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is overloaded or not ready yet.",
            "server_error",
            Value::Null,
        ));
    }
    None
}

/// `POST …/responses`.
async fn create(mock: &Arc<MockState>, recorded: &Recorded, account: Account) -> Response {
    let request = match serde_json::from_slice::<Value>(&recorded.body) {
        Ok(request) if request.is_object() => request,
        _ => {
            return invalid_request(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)",
                Value::Null,
                Value::Null,
            );
        }
    };
    let Some(model) = request["model"].as_str() else {
        return invalid_request(
            "Missing required parameter: 'model'.",
            json!("model"),
            json!("missing_required_parameter"),
        );
    };
    if model == SERVER_ERROR_MODEL {
        return server_error();
    }
    let text = String::from_utf8_lossy(&recorded.body);
    if let Some(refusal) = refused_by_trigger(account, &text, model) {
        return refusal;
    }
    if text.contains("HOLDME") {
        mock.held.notify_one();
        mock.release.notified().await;
    }
    // TRUNCATEME is this module's own (a cut Responses stream), not the chat stream's.
    if !text.contains("TRUNCATEME")
        && let Some(garbage) = garbage_answer(mock, &text)
    {
        return garbage;
    }
    let mut conversation = Vec::new();
    if let Some(previous) = request["previous_response_id"].as_str() {
        let Some(stored) = mock.responses.stored(previous) else {
            return invalid_request(
                &format!("Previous response with id '{previous}' not found."),
                json!("previous_response_id"),
                json!("previous_response_not_found"),
            );
        };
        conversation = stored.input_items;
        conversation.extend(
            stored.response["output"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
    }
    conversation.extend(input_items(&request["input"]));

    let output = reply(&request, model, &conversation);
    let reasoning = if is_reasoning_model(model) {
        REASONING_TOKENS
    } else {
        0
    };
    let cached = if text.contains("CACHEME") {
        CACHED_TOKENS
    } else {
        0
    };
    let usage = Usage {
        input: INPUT_TOKENS + cached,
        cached,
        output: OUTPUT_TOKENS + reasoning,
        reasoning,
    };
    let store = request["store"] != false;
    let id = new_id("resp_");
    let response = response_object(&id, &request, model, &output, usage, store);
    let midstream_error = text.contains("MIDSTREAMERROR");
    let truncated = text.contains("TRUNCATEME");
    if store && !midstream_error && !truncated {
        mock.responses.insert(
            id,
            Stored {
                response: response.clone(),
                input_items: conversation,
            },
        );
    }

    if request["stream"] != true {
        if midstream_error {
            return server_error();
        }
        if truncated {
            let whole = Bytes::from(response.to_string());
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                whole.slice(..whole.len() / 2),
            )
                .into_response();
        }
        return json_response(StatusCode::OK, &response);
    }
    let mut events = stream_events(&response);
    if text.contains("SLOWSTREAM") {
        return slow_stream(mock, &numbered(events)[0]);
    }
    if midstream_error {
        events.truncate(5);
        let mut failed = in_progress(&response);
        failed["status"] = json!("failed");
        failed["error"] =
            json!({"code": "server_error", "message": "The model failed to generate a response."});
        events.push(json!({"type": "response.failed", "response": failed}));
    } else if truncated {
        let end = events
            .iter()
            .position(|e| e["type"] == "response.output_text.done")
            .unwrap_or(events.len() - 1);
        events.truncate(end);
    }
    let chunks = numbered(events).iter().map(sse_event).collect();
    event_stream(one_write_each(chunks))
}

/// `first`, then nothing until the client goes away, which signals
/// [`MockState::stream_dropped`].
fn slow_stream(mock: &Arc<MockState>, first: &Value) -> Response {
    let first = sse_event(first);
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
    event_stream(Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_operation_and_account() {
        assert_eq!(route_of("/v1/responses"), Some(Route::Create));
        assert_eq!(route_of("/responses"), Some(Route::Create));
        assert_eq!(route_of("/proxy/v1/responses"), Some(Route::Create));
        assert_eq!(
            route_of("/v1/responses/resp_1"),
            Some(Route::Response("resp_1"))
        );
        assert_eq!(
            route_of("/openai/v1/responses/resp_1/input_items"),
            Some(Route::InputItems("resp_1"))
        );
        assert_eq!(route_of("/v1/responses/"), None);
        assert_eq!(route_of("/v1/chat/completions"), None);
        assert_eq!(route_of("/v1/responses/a/b"), None);
        assert_eq!(account_of("/v1/responses"), Account::OpenAi);
        assert_eq!(account_of("/openai/v1/responses"), Account::AzureV1);
        assert_eq!(account_of("/openai/responses"), Account::AzureDated);
    }

    #[test]
    fn azure_versions_are_read_by_date() {
        assert_eq!(dated("2025-04-01-preview"), Some("2025-04-01"));
        assert_eq!(dated("2024-10-21"), Some("2024-10-21"));
        assert_eq!(dated("preview"), None);
        assert_eq!(dated("2025-04-01-beta"), None);
        assert_eq!(dated("2025/04/01"), None);
    }

    #[test]
    fn reasoning_models_are_o_digit_and_gpt_5() {
        for model in ["o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5.1-codex"] {
            assert!(is_reasoning_model(model), "{model}");
        }
        for model in ["gpt-4o", "omni", "o", "gpt-4.1"] {
            assert!(!is_reasoning_model(model), "{model}");
        }
    }

    #[test]
    fn ids_have_48_hex_digits() {
        let id = new_id("resp_");
        let hex = id.strip_prefix("resp_").unwrap();
        assert_eq!(hex.len(), 48);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(new_id("resp_"), id);
        let call = new_call_id();
        assert_eq!(call.len(), "call_".len() + 24);
    }

    #[test]
    fn string_content_becomes_parts_and_items_get_ids() {
        let items = input_items(&json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "message", "id": "msg_kept", "role": "developer",
             "content": [{"type": "input_text", "text": "be brief"}]},
        ]));
        assert_eq!(items[0]["type"], "message");
        assert_eq!(
            items[0]["content"],
            json!([{"type": "input_text", "text": "hi"}])
        );
        assert_eq!(items[1]["content"][0]["type"], "output_text");
        assert!(items[2]["id"].as_str().unwrap().starts_with("fco_"));
        assert_eq!(items[3]["id"], "msg_kept");
        assert!(items[0]["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(input_items(&json!("hi")).len(), 1);
        assert!(input_items(&Value::Null).is_empty());
    }
}
