//! Google AI Studio (Gemini API, wire formats §3) and Vertex AI (§4), with Google's OAuth token
//! endpoint.
//!
//! Served paths (a `…/models/{model}:{method}` suffix or `/token`, see [`is_google_path`]):
//! - Gemini API `/v1beta/models/{m}:…` behind `x-goog-api-key: `[`GEMINI_KEY`];
//! - Vertex express `/v1/publishers/google/models/{m}:…` behind `x-goog-api-key: `[`EXPRESS_KEY`];
//! - Vertex project `/v1/projects/{p}/locations/{l}/publishers/google/models/{m}:…` behind
//!   `Authorization: Bearer` with [`VERTEX_TOKEN`] or a token the token endpoint issued;
//! - Claude on Vertex, `/v1/projects/{p}/locations/{l}/publishers/anthropic/models/{m}:rawPredict`
//!   and `:streamRawPredict`, behind the same bearer tokens, answered by [`crate::anthropic`];
//! - methods `generateContent`, `streamGenerateContent` (`alt=sse`: `\r\n\r\n`-separated events
//!   without `[DONE]`, cut into 7-byte pieces so terminators and UTF-8 straddle chunks; without
//!   it, a JSON array), `batchEmbedContents` (Gemini API) and `predict` (Vertex embeddings);
//! - `POST /token`: the JWT-bearer exchange. The assertion must be RS256-signed by the test
//!   service account ([`SERVICE_ACCOUNT_JSON`], verified with [`SERVICE_ACCOUNT_PUBLIC_KEY`]),
//!   carry its `kid`, `typ: JWT`, the cloud-platform scope, `exp = iat + 3600`, one of the
//!   known `iss` ([`SA_EMAIL`], [`COLD_SA_EMAIL`], [`FOREVER_SA_EMAIL`]) and as `aud` the URL it
//!   was posted to (`http://{Host}/token`, the `token_uri` tests put in the key file). Accepted
//!   and refused exchanges are kept in [`TokenBook`] (`MockState::google_tokens`).
//!
//! Requests are checked like Google does ([`check_generate_request`]: unknown fields, roles,
//! empty contents; `content-type: application/json`), and refused with google.rpc errors.
//!
//! Words in the request body steer it: `RATELIMITME` (429 `RESOURCE_EXHAUSTED` with
//! `QuotaFailure`, `Help` and `RetryInfo` of 7 s), `HUGEINDEX` (a candidate `index` of 4e9,
//! streamed or not), `BREAKME` (a stream whose second event is an `UNAVAILABLE` error),
//! `TRUNCATEME` (a stream that ends before its `finishReason`). A request with `tools` gets a
//! function call until the last turn carries the `functionResponse`. `BLOCKME` gets a prompt
//! blocked by the safety filter (`promptFeedback.blockReason: PROHIBITED_CONTENT`, no candidates;
//! streamed, as the only event). The model [`MISSING_MODEL`] does not exist (404 `NOT_FOUND`).
//! Embeddings honour `outputDimensionality` (the vector's first values).
//!
//! Where each shape comes from (also in `fixtures/README.md`): bodies, usage, thoughts and
//! signatures from §3.3; streaming from §3.4; embeddings from §3.5 and Vertex `predict` from the
//! Vertex text-embeddings API reference; errors from §3.6 (the Vertex `UNAUTHENTICATED` one from
//! real answers quoted in public issues); the token exchange from §4.2 (google-auth's
//! `service_account.py`). "§" are sections of the provider wire-formats notes.

use crate::{MockState, Recorded};
use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;

/// The AI Studio key the mock accepts (`AIzaSy` + 33 characters, like real ones).
pub const GEMINI_KEY: &str = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW";
/// The Vertex express-mode key the mock accepts (`AQ.` keys).
pub const EXPRESS_KEY: &str = "AQ.Ab8RN6JexpressModeKey0123456789abcdefghijklmnopq";
/// A Vertex OAuth access token the mock accepts without an exchange.
pub const VERTEX_TOKEN: &str = "ya29.xxx";
/// Service-account emails the token endpoint accepts as `iss`: all share the fixture's key, and
/// another email is another credential for the gateway (another token cache entry).
pub const SA_EMAIL: &str = "gateway@llm-proxy-test.iam.gserviceaccount.com";
pub const COLD_SA_EMAIL: &str = "gateway-cold@llm-proxy-test.iam.gserviceaccount.com";
/// The token endpoint answers this account's exchanges with `expires_in: u64::MAX`.
pub const FOREVER_SA_EMAIL: &str = "gateway-forever@llm-proxy-test.iam.gserviceaccount.com";
/// The `private_key_id` of the fixture service account, expected as the JWT's `kid`.
pub const SA_KEY_ID: &str = "0123456789abcdef0123456789abcdef01234567";
/// The scope the assertion must ask for.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The signature of the function calls the mock makes (real ones are base64 with `+`, `/`, `=`).
pub const THOUGHT_SIGNATURE: &str = "CiQB0e2Kb+3x/Qk9T1hvdWdodFNpZ25hdHVyZQ==";
/// The test service account's key file (test-only credentials granting access to nothing);
/// tests rewrite its `token_uri` to the mock's `/token`.
pub const SERVICE_ACCOUNT_JSON: &str = include_str!("../fixtures/google/test-service-account.json");
/// Its public key, which verifies the JWT assertions.
pub const SERVICE_ACCOUNT_PUBLIC_KEY: &str =
    include_str!("../fixtures/google/test-service-account.pub.pem");

/// The token endpoint's bookkeeping, and a hook to hold an exchange.
#[derive(Debug, Default)]
pub struct TokenBook {
    /// The `iss` of each accepted assertion; the n-th got the token `ya29.mock-<n>`.
    issued: Mutex<Vec<String>>,
    /// Why refused exchanges were refused.
    refused: Mutex<Vec<String>>,
    /// When set, the first exchange signals `arrived` and answers only after `release`.
    pub hold_first: AtomicBool,
    /// Also signalled by a refusal, so that a test waiting for a held exchange proceeds (and
    /// fails on the refusal).
    pub arrived: Notify,
    pub release: Notify,
}

impl TokenBook {
    /// The `iss` of each accepted exchange, in order.
    pub fn issued(&self) -> Vec<String> {
        self.issued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why each refused exchange was refused, in order.
    pub fn refused(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether Vertex accepts `token`: [`VERTEX_TOKEN`] or one the token endpoint issued.
    pub fn access_token_is_valid(&self, token: &str) -> bool {
        if token == VERTEX_TOKEN {
            return true;
        }
        let issued = self
            .issued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        (1..=issued).any(|n| token == format!("ya29.mock-{n}"))
    }

    /// Records an accepted exchange by `iss`; returns its number (from 1).
    fn issue(&self, iss: String) -> usize {
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        issued.push(iss);
        issued.len()
    }

    fn refuse(&self, reason: String) {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(reason);
    }
}

/// Whether `path` is a Google API path: a model method (`…/models/{model}:{method}`) or the
/// OAuth token endpoint.
pub fn is_google_path(path: &str) -> bool {
    path == "/token"
        || path
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'))
}

/// `body` as JSON with Google's content type.
fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [("content-type", "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

fn event_stream(body: Body) -> Response {
    ([("content-type", "text/event-stream")], body).into_response()
}

/// A google.rpc error body as the Gemini API and Vertex AI send it (§3.6); `details` is left out
/// when `Null`.
pub fn google_error(
    status: StatusCode,
    rpc_status: &str,
    message: &str,
    details: Value,
) -> Response {
    let mut error = json!({"code": status.as_u16(), "message": message, "status": rpc_status});
    if details != Value::Null {
        error["details"] = details;
    }
    json_response(status, &json!({ "error": error }))
}

fn invalid_argument(message: &str) -> Response {
    google_error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        message,
        Value::Null,
    )
}

fn not_found(message: &str) -> Response {
    google_error(StatusCode::NOT_FOUND, "NOT_FOUND", message, Value::Null)
}

/// An invalid key is a 400, not a 401 (§3.6).
fn api_key_invalid(key: &str) -> Response {
    // The real message does not quote the key; this one does, so that a gateway relaying the
    // provider's message to its client would be caught leaking it.
    google_error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        &format!("API key not valid. Please pass a valid API key. (got {key})"),
        json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]),
    )
}

fn unauthenticated() -> Response {
    google_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                "metadata": {"service": "aiplatform.googleapis.com",
                             "method": "google.cloud.aiplatform.v1.PredictionService.GenerateContent"}}]),
    )
}

/// Which Google API a model path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Gemini,
    VertexExpress,
    VertexProject,
}

fn api_of(path: &str) -> Option<Api> {
    if path.starts_with("/v1beta/models/") {
        Some(Api::Gemini)
    } else if path.starts_with("/v1/publishers/google/models/") {
        Some(Api::VertexExpress)
    } else if path.starts_with("/v1/projects/") && path.contains("/publishers/google/models/") {
        Some(Api::VertexProject)
    } else {
        None
    }
}

/// The answer of Google to `recorded` (a path [`is_google_path`] accepted).
pub async fn answer(mock: &Arc<MockState>, recorded: Recorded) -> Response {
    if recorded.path == "/token" {
        return token_endpoint(&mock.google_tokens, &recorded).await;
    }
    if recorded.method != Method::POST {
        return google_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "method not allowed",
            Value::Null,
        );
    }
    let path = recorded.path.as_str();
    if path.starts_with("/v1/projects/") && path.contains("/publishers/anthropic/models/") {
        return vertex_claude(mock, &recorded).await;
    }
    let Some(api) = api_of(path) else {
        return not_found(&format!("no route for {path}"));
    };
    let key_header = recorded.header("x-goog-api-key");
    let bearer = recorded
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    let authenticated = match api {
        Api::Gemini => key_header == Some(GEMINI_KEY),
        Api::VertexExpress => key_header == Some(EXPRESS_KEY),
        Api::VertexProject => bearer.is_some_and(|t| mock.google_tokens.access_token_is_valid(t)),
    };
    if !authenticated {
        return match api {
            Api::VertexProject => unauthenticated(),
            Api::Gemini | Api::VertexExpress => api_key_invalid(key_header.unwrap_or_default()),
        };
    }
    if recorded.header("content-type") != Some("application/json") {
        return invalid_argument("Invalid JSON payload: expected application/json");
    }
    let Some((resource, method)) = path.rsplit_once(':') else {
        return not_found("no method");
    };
    let model = resource.rsplit('/').next().unwrap_or_default();
    let Ok(request) = serde_json::from_slice::<Value>(&recorded.body) else {
        return invalid_argument("Invalid JSON payload received.");
    };
    let vertex = api != Api::Gemini;
    if model == MISSING_MODEL {
        return model_not_found(model, method, vertex);
    }
    if method.ends_with("enerateContent")
        && let Some(golden) = crate::golden::find(
            crate::golden::GoldenProvider::Google,
            model,
            method == "streamGenerateContent",
            &request,
        )
        .await
    {
        return golden_answer(golden);
    }
    if method.ends_with("enerateContent") && request.to_string().contains("BLOCKME") {
        return blocked_prompt(model, method, recorded.query.as_deref());
    }
    match method {
        "generateContent" => match check_generate_request(&request) {
            Ok(()) => generate_content(&request, model, vertex),
            Err(message) => invalid_argument(&message),
        },
        "streamGenerateContent" => {
            if let Err(message) = check_generate_request(&request) {
                return invalid_argument(&message);
            }
            if recorded.query.as_deref() != Some("alt=sse") {
                // Without alt=sse Google streams a JSON array instead of SSE (§3.4).
                return json_response(StatusCode::OK, &json!([answer_text(model, vertex)]));
            }
            stream_generate_content(&request, model)
        }
        "batchEmbedContents" if api == Api::Gemini => batch_embed_contents(&request, model),
        "predict" if vertex => predict(&request),
        _ => not_found(&format!("method {method} not found")),
    }
}

/// Claude on Vertex (`…/publishers/anthropic/models/{m}:rawPredict` or `:streamRawPredict`),
/// behind the same bearer tokens as Vertex's Gemini models; answered by [`crate::anthropic`].
async fn vertex_claude(mock: &Arc<MockState>, recorded: &Recorded) -> Response {
    let bearer = recorded
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| mock.google_tokens.access_token_is_valid(t)) {
        return unauthenticated();
    }
    let Some((resource, method)) = recorded.path.rsplit_once(':') else {
        return not_found("no method");
    };
    let model = resource.rsplit('/').next().unwrap_or_default();
    crate::anthropic::vertex(mock, recorded, model, method).await
}

/// What the Gemini API itself refuses: unknown top-level fields, roles other than user/model,
/// no contents. The error is Google's message.
pub fn check_generate_request(request: &Value) -> Result<(), String> {
    const FIELDS: &[&str] = &[
        "contents",
        "systemInstruction",
        "tools",
        "toolConfig",
        "safetySettings",
        "generationConfig",
        "cachedContent",
        "labels",
    ];
    let Some(object) = request.as_object() else {
        return Err("Invalid JSON payload received.".to_owned());
    };
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "Invalid JSON payload received. Unknown name \"{unknown}\": Cannot find field."
        ));
    }
    let contents = object
        .get("contents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or("* GenerateContentRequest.contents: contents is not specified\n")?;
    if contents
        .iter()
        .any(|c| !matches!(c["role"].as_str(), Some("user" | "model")))
    {
        return Err("Please use a valid role: user, model.".to_owned());
    }
    Ok(())
}

/// 15 prompt tokens (5 cached), 6 candidate tokens after 40 of thinking (§3.3).
fn usage_metadata(vertex: bool) -> Value {
    let mut usage = json!({
        "promptTokenCount": 15, "candidatesTokenCount": 6, "thoughtsTokenCount": 40,
        "cachedContentTokenCount": 5, "totalTokenCount": 61,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 15}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 5}],
        "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 6}]
    });
    if vertex {
        usage["trafficType"] = json!("ON_DEMAND");
    }
    usage
}

/// Vertex adds `createTime` (§3.3).
fn with_vertex_fields(mut answer: Value, vertex: bool) -> Value {
    if vertex {
        answer["createTime"] = json!("2025-08-14T09:03:53.412345Z");
    }
    answer
}

/// The text answer "It is 21°C." after a thought part (§3.3).
pub fn answer_text(model: &str, vertex: bool) -> Value {
    with_vertex_fields(
        json!({
            "candidates": [{
                "content": {"role": "model", "parts": [
                    {"text": "Let me check the weather in Paris...", "thought": true},
                    {"text": "It is 21°C.", "thoughtSignature": "EjQKMgG7Pa1Vw=="}]},
                "finishReason": "STOP",
                "index": 0,
                "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}],
                "avgLogprobs": -0.12
            }],
            "usageMetadata": usage_metadata(vertex),
            "modelVersion": model,
            "responseId": "Il0taoSYJ5Cez7"
        }),
        vertex,
    )
}

/// A candidate whose `index` would size a 64 GB vector if believed (DESIGN §19).
fn huge_index_answer(model: &str) -> Value {
    json!({
        "candidates": [{"content": {"parts": [{"text": "It is"}], "role": "model"},
                        "finishReason": "STOP", "index": 4_000_000_000u64}],
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": model, "responseId": "r-huge"
    })
}

/// 429 `RESOURCE_EXHAUSTED` with the details of a free-tier quota (§3.6).
fn quota_exhausted(model: &str) -> Response {
    google_error(
        StatusCode::TOO_MANY_REQUESTS,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
        json!([
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": model}, "quotaValue": "10"}]},
            {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
        ]),
    )
}

fn generate_content(request: &Value, model: &str, vertex: bool) -> Response {
    let text = request.to_string();
    if text.contains("HUGEINDEX") {
        return json_response(StatusCode::OK, &huge_index_answer(model));
    }
    if text.contains("RATELIMITME") {
        return quota_exhausted(model);
    }
    let answered_tool = request["contents"]
        .as_array()
        .and_then(|c| c.last())
        .and_then(|last| last["parts"].as_array())
        .is_some_and(|parts| parts.iter().any(|p| p.get("functionResponse").is_some()));
    if request.get("tools").is_some() && !answered_tool {
        // Gemini 2.5 with thinking signs its function calls; finishReason stays STOP (§3.3).
        return json_response(
            StatusCode::OK,
            &json!({
                "candidates": [{
                    "content": {"role": "model", "parts": [{
                        "functionCall": {"id": "fc_7", "name": "get_weather", "args": {"city": "Paris"}},
                        "thoughtSignature": THOUGHT_SIGNATURE}]},
                    "finishReason": "STOP",
                    "index": 0
                }],
                "usageMetadata": {"promptTokenCount": 42, "candidatesTokenCount": 8,
                                  "thoughtsTokenCount": 20, "totalTokenCount": 70},
                "modelVersion": model,
                "responseId": "tool-1"
            }),
        );
    }
    if answered_tool {
        return json_response(
            StatusCode::OK,
            &json!({
                "candidates": [{
                    "content": {"role": "model", "parts": [{"text": "It is 21°C in Paris."}]},
                    "finishReason": "STOP",
                    "index": 0
                }],
                "usageMetadata": {"promptTokenCount": 60, "candidatesTokenCount": 7, "totalTokenCount": 67},
                "modelVersion": model,
                "responseId": "tool-2"
            }),
        );
    }
    json_response(StatusCode::OK, &answer_text(model, vertex))
}

/// `\r\n\r\n`-separated events, no `[DONE]` (§3.4), sent in small pieces so that event
/// terminators and UTF-8 characters straddle chunks.
fn stream_generate_content(request: &Value, model: &str) -> Response {
    let text = request.to_string();
    if text.contains("HUGEINDEX") {
        let event = huge_index_answer(model);
        return event_stream(Body::from(format!("data: {event}\r\n\r\n")));
    }
    let first = json!({
        "candidates": [{"content": {"parts": [{"text": "It is"}], "role": "model"}, "index": 0}],
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": model, "responseId": "r1"
    });
    if request.get("tools").is_some() {
        // A function call arrives whole in one event; older models send no call id (§3.4).
        let event = json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
                "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 42, "candidatesTokenCount": 8, "totalTokenCount": 50},
            "modelVersion": model, "responseId": "r2"
        });
        return event_stream(Body::from(format!("data: {event}\r\n\r\n")));
    }
    let last = if text.contains("BREAKME") {
        // Errors mid-stream are an event of their own (§3.4).
        json!({"error": {"code": 503, "message": "The model is overloaded. Please try again later.",
                         "status": "UNAVAILABLE"}})
    } else {
        json!({
            "candidates": [{"content": {"parts": [{"text": " 21°C."}], "role": "model"},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 5,
                              "thoughtsTokenCount": 12, "totalTokenCount": 26},
            "modelVersion": model, "responseId": "r1"
        })
    };
    // TRUNCATEME: the upstream closes before the event with the finishReason.
    let events = if text.contains("TRUNCATEME") {
        vec![first]
    } else {
        vec![first, last]
    };
    let mut body = Vec::new();
    for event in events {
        body.extend_from_slice(format!("data: {event}\r\n\r\n").as_bytes());
    }
    let pieces: Vec<Result<Bytes, std::convert::Infallible>> = body
        .chunks(7)
        .map(|piece| Ok(Bytes::copy_from_slice(piece)))
        .collect();
    event_stream(Body::from_stream(futures_util::stream::iter(pieces)))
}

/// The embedding of the `i`-th input: exact in float32, so both OpenAI encodings are exact.
pub fn vector(i: usize) -> Vec<f64> {
    vec![0.25, -0.5, 1.0 + i as f64]
}

/// `:batchEmbedContents` (§3.5): every request must name the path's model.
fn batch_embed_contents(request: &Value, model: &str) -> Response {
    let Some(requests) = request["requests"].as_array() else {
        return invalid_argument("* BatchEmbedContentsRequest.requests: requests is required");
    };
    let expected_model = format!("models/{model}");
    if requests
        .iter()
        .any(|r| r["model"] != expected_model.as_str())
    {
        return invalid_argument(&format!(
            "* BatchEmbedContentsRequest.requests: model must be {expected_model}"
        ));
    }
    let embeddings: Vec<Value> = (0..requests.len())
        .map(|i| json!({ "values": truncated(vector(i), &requests[i]["outputDimensionality"]) }))
        .collect();
    json_response(StatusCode::OK, &json!({ "embeddings": embeddings }))
}

/// Vertex `:predict` for text-embedding models (Vertex text-embeddings API reference): one
/// token per word, billed per non-blank character.
fn predict(request: &Value) -> Response {
    let Some(instances) = request["instances"].as_array() else {
        return invalid_argument("instances is required");
    };
    let mut characters = 0;
    let predictions: Vec<Value> = instances
        .iter()
        .enumerate()
        .map(|(i, instance)| {
            let content = instance["content"].as_str().unwrap_or_default();
            characters += content.chars().filter(|c| !c.is_whitespace()).count();
            let values = truncated(vector(i), &request["parameters"]["outputDimensionality"]);
            json!({"embeddings": {"values": values, "statistics": {
                "token_count": content.split_whitespace().count(), "truncated": false}}})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"predictions": predictions, "metadata": {"billableCharacterCount": characters}}),
    )
}

/// A model id the mock does not know.
pub const MISSING_MODEL: &str = "gemini-0.9-nope";

/// `values` cut to `dimensions` (an `outputDimensionality`) when it is a number.
fn truncated(mut values: Vec<f64>, dimensions: &Value) -> Vec<f64> {
    if let Some(n) = dimensions.as_u64().and_then(|n| usize::try_from(n).ok()) {
        values.truncate(n);
    }
    values
}

/// The 404 of a model that does not exist, as the Gemini API and Vertex AI word it (§3.6).
fn model_not_found(model: &str, method: &str, vertex: bool) -> Response {
    if vertex {
        not_found(&format!(
            "Publisher Model `publishers/google/models/{model}` was not found or your project does not have access to it. Please ensure you are using a valid model version."
        ))
    } else {
        not_found(&format!(
            "models/{model} is not found for API version v1beta, or is not supported for {method}. Call ListModels to see the list of available models and their supported methods."
        ))
    }
}

/// A prompt the safety filter blocks before generation (§3.3 `promptFeedback`): no candidates,
/// prompt-only usage; streamed (with `alt=sse`) as the only event.
fn blocked_prompt(model: &str, method: &str, query: Option<&str>) -> Response {
    let answer = json!({
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
        "modelVersion": model, "responseId": "blocked-1"
    });
    match (method, query) {
        ("streamGenerateContent", Some("alt=sse")) => {
            event_stream(Body::from(format!("data: {answer}\r\n\r\n")))
        }
        ("streamGenerateContent", _) => json_response(StatusCode::OK, &json!([answer])),
        _ => json_response(StatusCode::OK, &answer),
    }
}

/// Checks a JWT-bearer token request (§4.2) posted to `token_url`; returns the assertion's
/// issuer, or why it is refused.
fn verify_token_request(recorded: &Recorded, token_url: &str) -> Result<String, String> {
    if recorded.method != Method::POST {
        return Err(format!("method {}", recorded.method));
    }
    if recorded.header("content-type") != Some("application/x-www-form-urlencoded") {
        return Err(format!(
            "content-type {:?}",
            recorded.header("content-type")
        ));
    }
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&recorded.body)
        .into_owned()
        .collect();
    let [(grant_name, grant_type), (assertion_name, assertion)] = form.as_slice() else {
        return Err(format!("form fields {:?}", field_names(&form)));
    };
    if grant_name != "grant_type" || assertion_name != "assertion" {
        return Err(format!("form fields {:?}", field_names(&form)));
    }
    if grant_type != JWT_BEARER {
        return Err(format!("grant_type {grant_type}"));
    }
    let key = DecodingKey::from_rsa_pem(SERVICE_ACCOUNT_PUBLIC_KEY.as_bytes())
        .map_err(|e| format!("mock: the fixture's public key does not parse: {e}"))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[token_url]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let jwt = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|e| format!("invalid JWT: {e}"))?;
    if jwt.header.kid.as_deref() != Some(SA_KEY_ID) {
        return Err(format!("kid {:?}", jwt.header.kid));
    }
    if jwt.header.typ.as_deref() != Some("JWT") {
        return Err(format!("typ {:?}", jwt.header.typ));
    }
    let claims = &jwt.claims;
    if claims["scope"] != SCOPE {
        return Err(format!("scope {}", claims["scope"]));
    }
    let (iat, exp) = (claims["iat"].as_u64(), claims["exp"].as_u64());
    if !matches!((iat, exp), (Some(iat), Some(exp)) if exp.checked_sub(iat) == Some(3600)) {
        return Err(format!("iat {iat:?} exp {exp:?}"));
    }
    let iss = claims["iss"].as_str().unwrap_or_default();
    if ![SA_EMAIL, COLD_SA_EMAIL, FOREVER_SA_EMAIL].contains(&iss) {
        return Err(format!("iss {iss}"));
    }
    Ok(iss.to_owned())
}

fn field_names(form: &[(String, String)]) -> Vec<&str> {
    form.iter().map(|(k, _)| k.as_str()).collect()
}

/// The fake `oauth2.googleapis.com/token` (§4.2): the n-th accepted exchange gets
/// `ya29.mock-<n>`, valid 3599 s (or `u64::MAX` s for [`FOREVER_SA_EMAIL`]).
async fn token_endpoint(book: &TokenBook, recorded: &Recorded) -> Response {
    // The audience is the URL the gateway posted to, i.e. the key file's `token_uri`: the mock
    // does not know under which name its clients reach it.
    let token_url = format!(
        "http://{}/token",
        recorded.header("host").unwrap_or_default()
    );
    let iss = match verify_token_request(recorded, &token_url) {
        Ok(iss) => iss,
        Err(reason) => {
            book.refuse(reason);
            book.arrived.notify_one();
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
            );
        }
    };
    let expires_in = if iss == FOREVER_SA_EMAIL {
        json!(u64::MAX)
    } else {
        json!(3599)
    };
    let n = book.issue(iss);
    if n == 1 && book.hold_first.load(Ordering::SeqCst) {
        book.arrived.notify_one();
        book.release.notified().await;
    }
    json_response(
        StatusCode::OK,
        &json!({"access_token": format!("ya29.mock-{n}"), "expires_in": expires_in, "token_type": "Bearer"}),
    )
}

/// A golden fixture's Gemini answer: its `answer`, or its `stream` events as Google frames them
/// (`data: {json}` and CRLF CRLF, no `[DONE]`; wire formats §3.4).
fn golden_answer(golden: &crate::golden::Golden) -> Response {
    if let Some(events) = golden.case["stream"].as_array() {
        // One chunk per event, as Google flushes them: a client sees the events before a
        // failure that follows them.
        let chunks: Vec<Result<Bytes, std::convert::Infallible>> = events
            .iter()
            .map(|e| Ok(Bytes::from(format!("data: {e}\r\n\r\n"))))
            .collect();
        return (
            [("content-type", "text/event-stream")],
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
            .into_response();
    }
    json_response(StatusCode::OK, &golden.case["answer"])
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn token_request(host: &str, body: String) -> Recorded {
        let mut headers = HeaderMap::new();
        headers.insert("host", host.parse().unwrap());
        headers.insert(
            "content-type",
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        Recorded {
            method: Method::POST,
            path: "/token".to_owned(),
            query: None,
            headers,
            body: body.into(),
            request_id: None,
        }
    }

    /// An assertion signed with the fixture's private key, as google-auth makes it.
    fn assertion(aud: &str, iss: &str) -> String {
        let file: Value = serde_json::from_str(SERVICE_ACCOUNT_JSON).unwrap();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(
            file["private_key"].as_str().unwrap().as_bytes(),
        )
        .unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some(SA_KEY_ID.to_owned());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = json!({"iss": iss, "scope": SCOPE, "aud": aud, "iat": now, "exp": now + 3600});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    fn form(assertion: &str) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", JWT_BEARER)
            .append_pair("assertion", assertion)
            .finish()
    }

    #[test]
    fn google_paths_are_model_methods_and_the_token_endpoint() {
        assert!(is_google_path("/token"));
        assert!(is_google_path(
            "/v1beta/models/gemini-2.5-flash:generateContent"
        ));
        assert!(is_google_path(
            "/v1/projects/p/locations/l/publishers/google/models/text-embedding-005:predict"
        ));
        assert!(!is_google_path("/v1/chat/completions"));
        assert!(!is_google_path("/openai/deployments/d/chat/completions"));
    }

    #[test]
    fn the_fixture_key_pair_matches() {
        let file: Value = serde_json::from_str(SERVICE_ACCOUNT_JSON).unwrap();
        assert_eq!(file["private_key_id"], SA_KEY_ID);
        let request = token_request(
            "127.0.0.1:9",
            form(&assertion("http://127.0.0.1:9/token", SA_EMAIL)),
        );
        assert_eq!(
            verify_token_request(&request, "http://127.0.0.1:9/token"),
            Ok(SA_EMAIL.to_owned())
        );
    }

    #[tokio::test]
    async fn the_token_endpoint_issues_numbered_tokens_and_records_refusals() {
        let book = TokenBook::default();
        let good = token_request(
            "mock:9000",
            form(&assertion("http://mock:9000/token", COLD_SA_EMAIL)),
        );
        let response = token_endpoint(&book, &good).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(book.issued(), [COLD_SA_EMAIL]);
        assert!(book.access_token_is_valid("ya29.mock-1"));
        assert!(!book.access_token_is_valid("ya29.mock-2"));
        assert!(book.access_token_is_valid(VERTEX_TOKEN));

        let wrong_audience = token_request(
            "mock:9000",
            form(&assertion("https://oauth2.googleapis.com/token", SA_EMAIL)),
        );
        let unknown_account = token_request(
            "mock:9000",
            form(&assertion("http://mock:9000/token", "someone@example.com")),
        );
        for request in [wrong_audience, unknown_account] {
            let response = token_endpoint(&book, &request).await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        }
        let refused = book.refused();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].starts_with("invalid JWT"), "{refused:?}");
        assert_eq!(refused[1], "iss someone@example.com");
        assert_eq!(book.issued(), [COLD_SA_EMAIL]);
    }

    #[test]
    fn generate_requests_are_checked_like_google_does() {
        let ok = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
        assert_eq!(check_generate_request(&ok), Ok(()));
        let unknown = json!({"contents": ok["contents"], "stream": true});
        assert!(
            check_generate_request(&unknown)
                .unwrap_err()
                .contains("Unknown name \"stream\"")
        );
        let role = json!({"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]});
        assert_eq!(
            check_generate_request(&role),
            Err("Please use a valid role: user, model.".to_owned())
        );
        assert!(check_generate_request(&json!({"contents": []})).is_err());
    }

    #[test]
    fn embeddings_keep_the_requested_dimensions_and_missing_models_are_not_found() {
        assert_eq!(truncated(vector(1), &json!(2)), [0.25, -0.5]);
        assert_eq!(truncated(vector(0), &Value::Null), vector(0));
        let response = model_not_found(MISSING_MODEL, "generateContent", false);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let blocked = blocked_prompt(MISSING_MODEL, "streamGenerateContent", Some("alt=sse"));
        assert_eq!(blocked.headers()["content-type"], "text/event-stream");
    }
}
