//! The data plane end to end against a mock Google server (Gemini API, Vertex AI and the OAuth
//! token endpoint) that records exactly what it receives (method, path, query, headers, body)
//! and answers with faithful Google bodies: `GenerateContentResponse`s, `\r\n\r\n`-separated SSE
//! without `[DONE]`, `batchEmbedContents` / `predict` answers, google.rpc errors with `details`,
//! and a token endpoint that verifies the service-account JWT with the fixture's public key.
//! Config comes from a real control plane (SQLite) through the real config stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

mod common;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use common::{PATIENCE, Recorded, options, sse_data};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use llm_proxy_control_plane::server::RunningControlPlane;
use llm_proxy_data_plane::gateway::RunningGateway;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

const CLIENT_KEY: &str = "vk-google-front-5678";
/// AI Studio keys are `AIzaSy` + 33 characters.
const GEMINI_KEY: &str = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW";
const REVOKED_KEY: &str = "AIzaSyRevokedRevokedRevokedRevoked00000";
const EXPRESS_KEY: &str = "AQ.Ab8RN6JexpressModeKey0123456789abcdefghijklmnopq";
const VERTEX_TOKEN: &str = "ya29.xxx";
const SA_EMAIL: &str = "gateway@llm-proxy-test.iam.gserviceaccount.com";
const COLD_SA_EMAIL: &str = "gateway-cold@llm-proxy-test.iam.gserviceaccount.com";
/// The token endpoint answers this account's exchanges with `expires_in: u64::MAX`.
const FOREVER_SA_EMAIL: &str = "gateway-forever@llm-proxy-test.iam.gserviceaccount.com";
const SA_KEY_ID: &str = "0123456789abcdef0123456789abcdef01234567";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Real signatures are base64 and contain `+`, `/` and `=`.
const THOUGHT_SIGNATURE: &str = "CiQB0e2Kb+3x/Qk9T1hvdWdodFNpZ25hdHVyZQ==";
const SERVICE_ACCOUNT_JSON: &str = include_str!("fixtures/google/test-service-account.json");
const SERVICE_ACCOUNT_PUBLIC_KEY: &str =
    include_str!("fixtures/google/test-service-account.pub.pem");

// ---------------------------------------------------------------------------------------------
// The mock Google server

/// The fake `oauth2.googleapis.com/token`.
#[derive(Default)]
struct TokenEndpoint {
    /// The `iss` of each accepted assertion; the n-th got the token `ya29.mock-<n>`.
    issued: Mutex<Vec<String>>,
    /// Why refused exchanges were refused.
    refused: Mutex<Vec<String>>,
    /// When set, the first exchange signals `arrived` and answers only after `release`.
    hold_first: AtomicBool,
    arrived: Notify,
    release: Notify,
}

#[derive(Clone)]
struct Mock {
    /// `http://127.0.0.1:<port>`.
    base: String,
    seen: Arc<Mutex<Vec<Recorded>>>,
    token: Arc<TokenEndpoint>,
}

impl Mock {
    fn token_url(&self) -> String {
        format!("{}/token", self.base)
    }

    fn issued(&self) -> Vec<String> {
        self.token.issued.lock().unwrap().clone()
    }

    fn refused(&self) -> Vec<String> {
        self.token.refused.lock().unwrap().clone()
    }

    fn access_token_is_valid(&self, token: &str) -> bool {
        if token == VERTEX_TOKEN {
            return true;
        }
        let issued = self.token.issued.lock().unwrap().len();
        (1..=issued).any(|n| token == format!("ya29.mock-{n}"))
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    common::json_response(status, "application/json; charset=UTF-8", body)
}

/// A google.rpc error body as the Gemini API and Vertex AI send it.
fn google_error(status: StatusCode, rpc_status: &str, message: &str, details: Value) -> Response {
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

async fn mock_handler(State(mock): State<Mock>, request: Request) -> Response {
    let recorded = Recorded::read(request).await.unwrap();
    mock.seen.lock().unwrap().push(recorded.clone());
    if recorded.path == "/token" {
        return token_endpoint(&mock, &recorded).await;
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
    let (api, key_header) = (
        if path.starts_with("/v1beta/models/") {
            "gemini"
        } else if path.starts_with("/v1/publishers/google/models/") {
            "vertex-express"
        } else if path.starts_with("/v1/projects/") && path.contains("/publishers/google/models/") {
            "vertex-project"
        } else {
            return google_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                &format!("no route for {path}"),
                Value::Null,
            );
        },
        recorded.header("x-goog-api-key"),
    );
    let bearer = recorded
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    match api {
        "gemini" if key_header != Some(GEMINI_KEY) => {
            return api_key_invalid(key_header.unwrap_or_default());
        }
        "vertex-express" if key_header != Some(EXPRESS_KEY) => {
            return api_key_invalid(key_header.unwrap_or_default());
        }
        "vertex-project" if !bearer.is_some_and(|t| mock.access_token_is_valid(t)) => {
            return unauthenticated();
        }
        _ => {}
    }
    if recorded.header("content-type") != Some("application/json") {
        return invalid_argument("Invalid JSON payload: expected application/json");
    }
    let Some((resource, method)) = path.rsplit_once(':') else {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no method", Value::Null);
    };
    let model = resource.rsplit('/').next().unwrap_or_default().to_owned();
    let Ok(request) = serde_json::from_slice::<Value>(&recorded.body) else {
        return invalid_argument("Invalid JSON payload received.");
    };
    let vertex = api != "gemini";
    match method {
        "generateContent" => {
            if let Err(message) = check_generate_request(&request) {
                return invalid_argument(&message);
            }
            generate_content(&request, &model, vertex)
        }
        "streamGenerateContent" => {
            if let Err(message) = check_generate_request(&request) {
                return invalid_argument(&message);
            }
            if recorded.query.as_deref() != Some("alt=sse") {
                // Without alt=sse Google streams a JSON array instead of SSE.
                return json_response(StatusCode::OK, &json!([answer_text(&model, vertex)]));
            }
            stream_generate_content(&request, &model)
        }
        "batchEmbedContents" if api == "gemini" => batch_embed_contents(&request, &model),
        "predict" if vertex => predict(&request),
        _ => google_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("method {method} not found"),
            Value::Null,
        ),
    }
}

/// What the Gemini API itself refuses: unknown top-level fields, roles other than user/model,
/// no contents.
fn check_generate_request(request: &Value) -> Result<(), String> {
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

fn with_vertex_fields(mut answer: Value, vertex: bool) -> Value {
    if vertex {
        answer["createTime"] = json!("2025-08-14T09:03:53.412345Z");
    }
    answer
}

/// A text answer after some thinking (§3.3).
fn answer_text(model: &str, vertex: bool) -> Value {
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

/// A candidate whose `index` would size a 64 GB vector if believed.
fn huge_index_answer(model: &str) -> Value {
    json!({
        "candidates": [{"content": {"parts": [{"text": "It is"}], "role": "model"},
                        "finishReason": "STOP", "index": 4_000_000_000u64}],
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": model, "responseId": "r-huge"
    })
}

fn generate_content(request: &Value, model: &str, vertex: bool) -> Response {
    let text = request.to_string();
    if text.contains("HUGEINDEX") {
        return json_response(StatusCode::OK, &huge_index_answer(model));
    }
    if text.contains("RATELIMITME") {
        return google_error(
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
        );
    }
    let answered_tool = request["contents"]
        .as_array()
        .and_then(|c| c.last())
        .and_then(|last| last["parts"].as_array())
        .is_some_and(|parts| parts.iter().any(|p| p.get("functionResponse").is_some()));
    if request.get("tools").is_some() && !answered_tool {
        // Gemini 2.5 with thinking signs its function calls; finishReason stays STOP.
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
    if request.to_string().contains("HUGEINDEX") {
        let event = huge_index_answer(model);
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(format!("data: {event}\r\n\r\n")))
            .unwrap();
    }
    let first = json!({
        "candidates": [{"content": {"parts": [{"text": "It is"}], "role": "model"}, "index": 0}],
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": model, "responseId": "r1"
    });
    if request.get("tools").is_some() {
        // A function call arrives whole in one event; older models send no call id.
        let event = json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
                "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 42, "candidatesTokenCount": 8, "totalTokenCount": 50},
            "modelVersion": model, "responseId": "r2"
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(format!("data: {event}\r\n\r\n")))
            .unwrap();
    }
    let last = if request.to_string().contains("BREAKME") {
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
    let mut text = Vec::new();
    // TRUNCATEME: the upstream closes before the event with the finishReason.
    let events = if request.to_string().contains("TRUNCATEME") {
        vec![first]
    } else {
        vec![first, last]
    };
    for event in events {
        text.extend_from_slice(format!("data: {event}\r\n\r\n").as_bytes());
    }
    let pieces: Vec<Result<Bytes, std::convert::Infallible>> = text
        .chunks(7)
        .map(|piece| Ok(Bytes::copy_from_slice(piece)))
        .collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures_util::stream::iter(pieces)))
        .unwrap()
}

/// The embedding of the `i`-th input: exact in float32.
fn vector(i: usize) -> Vec<f64> {
    vec![0.25, -0.5, 1.0 + i as f64]
}

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
        .map(|i| json!({ "values": vector(i) }))
        .collect();
    json_response(StatusCode::OK, &json!({ "embeddings": embeddings }))
}

/// Vertex `:predict` for text-embedding models: one token per word.
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
            json!({"embeddings": {"values": vector(i), "statistics": {
                "token_count": content.split_whitespace().count(), "truncated": false}}})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"predictions": predictions, "metadata": {"billableCharacterCount": characters}}),
    )
}

/// Checks a JWT-bearer token request (§4.2); returns the assertion's issuer.
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
    let names: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    if names != ["grant_type", "assertion"] {
        return Err(format!("form fields {names:?}"));
    }
    if form[0].1 != JWT_BEARER {
        return Err(format!("grant_type {}", form[0].1));
    }
    let key = DecodingKey::from_rsa_pem(SERVICE_ACCOUNT_PUBLIC_KEY.as_bytes()).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[token_url]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let jwt = jsonwebtoken::decode::<Value>(&form[1].1, &key, &validation)
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

async fn token_endpoint(mock: &Mock, recorded: &Recorded) -> Response {
    let iss = match verify_token_request(recorded, &mock.token_url()) {
        Ok(iss) => iss,
        Err(reason) => {
            mock.token.refused.lock().unwrap().push(reason);
            // A test waiting for the held exchange proceeds (and fails on the refusal).
            mock.token.arrived.notify_one();
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
    let n = {
        let mut issued = mock.token.issued.lock().unwrap();
        issued.push(iss);
        issued.len()
    };
    if n == 1 && mock.token.hold_first.load(Ordering::SeqCst) {
        mock.token.arrived.notify_one();
        mock.token.release.notified().await;
    }
    json_response(
        StatusCode::OK,
        &json!({"access_token": format!("ya29.mock-{n}"), "expires_in": expires_in, "token_type": "Bearer"}),
    )
}

async fn start_mock() -> Mock {
    common::start_mock(mock_handler, |base| Mock {
        base,
        seen: Arc::default(),
        token: Arc::default(),
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Control plane + data plane

struct Fixture {
    mock: Mock,
    cp: RunningControlPlane,
    dp: RunningGateway,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn wait_applied(&self) {
        common::wait_applied(&self.cp, &self.dp).await;
    }

    /// Every request the mock saw except token exchanges.
    fn model_calls(&self) -> Vec<Recorded> {
        self.mock
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path != "/token")
            .cloned()
            .collect()
    }

    fn token_calls(&self) -> Vec<Recorded> {
        self.mock
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == "/token")
            .cloned()
            .collect()
    }

    fn last(&self) -> Recorded {
        self.model_calls()
            .pop()
            .expect("the mock saw no model request")
    }

    async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        common::post_json(&self.http, format!("{}{path}", self.base), CLIENT_KEY, body).await
    }
}

/// The fixture's service-account key file, with its token endpoint on the mock and the given
/// `client_email` (another email = another credential, so another token cache entry).
fn service_account_json(token_url: &str, client_email: &str) -> String {
    let mut file: Value = serde_json::from_str(SERVICE_ACCOUNT_JSON).unwrap();
    assert_eq!(file["project_id"], "llm-proxy-test");
    assert_eq!(file["private_key_id"], SA_KEY_ID);
    file["token_uri"] = json!(token_url);
    file["client_email"] = json!(client_email);
    serde_json::to_string_pretty(&file).unwrap()
}

async fn fixture() -> Fixture {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    let store = &cp.store;
    let vertex_location = [("api", "vertex"), ("location", "us-central1")];
    let connections = [
        (
            "Gemini-Studio",
            GEMINI_KEY.to_owned(),
            options(&[("api", "gemini")]),
        ),
        (
            "Gemini-Revoked",
            REVOKED_KEY.to_owned(),
            options(&[("api", "gemini")]),
        ),
        (
            "Vertex-Express",
            EXPRESS_KEY.to_owned(),
            options(&[("api", "vertex")]),
        ),
        (
            "Vertex-Project",
            VERTEX_TOKEN.to_owned(),
            options(&[
                ("api", "vertex"),
                ("project", "my-proj"),
                ("location", "us-central1"),
            ]),
        ),
        (
            "Vertex-SA",
            service_account_json(&mock.token_url(), SA_EMAIL),
            options(&vertex_location),
        ),
        (
            "Vertex-SA-Cold",
            service_account_json(&mock.token_url(), COLD_SA_EMAIL),
            options(&vertex_location),
        ),
        (
            "Vertex-SA-Forever",
            service_account_json(&mock.token_url(), FOREVER_SA_EMAIL),
            options(&vertex_location),
        ),
    ];
    common::add_connections(store, "google", &mock.base, connections).await;
    // (connection, model name = alias, remote)
    let models = [
        ("Gemini-Studio", "gemini-flash", "gemini-2.5-flash"),
        ("Gemini-Studio", "gemini-embed", "gemini-embedding-001"),
        ("Gemini-Revoked", "revoked-flash", "gemini-2.5-flash"),
        ("Vertex-Express", "express-flash", "gemini-2.5-flash"),
        ("Vertex-Project", "project-pro", "gemini-2.5-pro"),
        ("Vertex-Project", "project-embed", "text-embedding-005"),
        ("Vertex-SA", "sa-flash", "gemini-2.5-flash"),
        ("Vertex-SA-Cold", "sa-cold-flash", "gemini-2.5-flash"),
        ("Vertex-SA-Forever", "sa-forever-flash", "gemini-2.5-flash"),
    ];
    common::add_models_for_key(store, "Google-App", CLIENT_KEY, &models).await;
    let dp = common::start_data_plane(&cp, "dp-google-test", None).await;
    let fixture = Fixture {
        mock,
        base: format!("http://{}", dp.addr),
        cp,
        dp,
        http: reqwest::Client::new(),
        _dir: dir,
    };
    fixture.wait_applied().await;
    fixture
}

fn assert_no_client_key(recorded: &Recorded) {
    common::assert_key_not_forwarded(recorded, CLIENT_KEY);
    assert!(
        !recorded
            .query
            .as_deref()
            .unwrap_or_default()
            .contains(CLIENT_KEY)
    );
}

/// Asserts the upstream call authenticated with `x-goog-api-key: key` and nothing else.
fn assert_api_key_auth(recorded: &Recorded, key: &str) {
    assert_eq!(recorded.header("x-goog-api-key"), Some(key));
    assert_eq!(recorded.header("authorization"), None);
    assert_no_client_key(recorded);
}

/// Asserts the upstream call authenticated with `Authorization: Bearer token` and nothing else.
fn assert_bearer_auth(recorded: &Recorded, token: &str) {
    assert_eq!(
        recorded.header("authorization"),
        Some(format!("Bearer {token}").as_str())
    );
    assert_eq!(recorded.header("x-goog-api-key"), None);
    assert_no_client_key(recorded);
}

/// The OpenAI base64 form of float32 embeddings.
fn base64_f32(values: &[f64]) -> String {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|v| (*v as f32).to_le_bytes())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The text answer every plain chat request gets, as the client must see it (§6.1).
fn assert_translated_text_answer(answer: &Value, model: &str) {
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], model);
    let id = answer["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    assert_eq!(answer["choices"].as_array().unwrap().len(), 1);
    let choice = &answer["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    // The thought part is not content.
    assert_eq!(choice["message"]["content"], "It is 21°C.");
    assert!(choice["message"].get("tool_calls").is_none());
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &answer["usage"];
    assert_eq!(usage["prompt_tokens"], 15);
    assert_eq!(usage["completion_tokens"], 6 + 40, "candidates + thoughts");
    assert_eq!(usage["total_tokens"], 61);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 40);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 5);
}

const PLAIN_CHAT: &str =
    r#"{"model":"MODEL","messages":[{"role":"user","content":"What's the weather in Paris?"}]}"#;

fn plain_chat(alias: &str) -> String {
    PLAIN_CHAT.replace("MODEL", alias)
}

// ---------------------------------------------------------------------------------------------
// AI Studio

#[tokio::test(flavor = "multi_thread")]
async fn ai_studio_chat_calls_generate_content_with_the_api_key_header_and_translates_the_answer() {
    let f = fixture().await;
    let body = r#"{"model":"gemini-flash","messages":[
        {"role":"system","content":"You are terse."},
        {"role":"user","content":"What's the weather in Paris?"}],
        "temperature":0.2,"max_tokens":256,"stop":"END","user":"u-1"}"#;
    let response = f.post("/v1/chat/completions", body).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let answer: Value = response.json().await.unwrap();
    assert_translated_text_answer(&answer, "gemini-2.5-flash");
    assert_eq!(answer["id"], "chatcmpl-Il0taoSYJ5Cez7");

    let seen = f.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(seen.query, None);
    assert_api_key_auth(&seen, GEMINI_KEY);
    assert_eq!(
        seen.json(),
        json!({
            "contents": [{"role": "user", "parts": [{"text": "What's the weather in Paris?"}]}],
            "systemInstruction": {"parts": [{"text": "You are terse."}]},
            "generationConfig": {"temperature": 0.2, "maxOutputTokens": 256, "stopSequences": ["END"]}
        })
    );
    assert!(f.token_calls().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn ai_studio_stream_uses_alt_sse_and_becomes_openai_chunks_with_usage_only_on_request() {
    let f = fixture().await;
    for include_usage in [false, true] {
        let body = format!(
            r#"{{"model":"gemini-flash","stream":true,"stream_options":{{"include_usage":{include_usage}}},"messages":[{{"role":"user","content":"What's the weather in Paris?"}}]}}"#
        );
        let response = f.post("/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = response.text().await.unwrap();

        let seen = f.last();
        assert_eq!(
            seen.path,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
        );
        assert_eq!(seen.query.as_deref(), Some("alt=sse"));
        assert_api_key_auth(&seen, GEMINI_KEY);
        assert_eq!(
            seen.json(),
            json!({"contents": [{"role": "user", "parts": [{"text": "What's the weather in Paris?"}]}]}),
            "stream and stream_options are not Gemini fields"
        );

        let events = sse_data(&text);
        assert_eq!(events.last().unwrap(), "[DONE]", "{text}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks.len(), if include_usage { 5 } else { 4 }, "{text}");
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], chunks[0]["id"], "one id for the whole stream");
            assert_eq!(chunk["created"], chunks[0]["created"]);
            assert_eq!(chunk["model"], "gemini-2.5-flash");
            if include_usage {
                assert!(chunk.get("usage").is_some(), "{chunk}");
            } else {
                assert!(
                    chunk.get("usage").is_none_or(Value::is_null),
                    "no usage without include_usage: {chunk}"
                );
            }
        }
        assert!(chunks[0]["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let delta = |i: usize| chunks[i]["choices"][0]["delta"].clone();
        let finish = |i: usize| chunks[i]["choices"][0]["finish_reason"].clone();
        assert_eq!(delta(0), json!({"role": "assistant", "content": ""}));
        assert_eq!(finish(0), Value::Null);
        assert_eq!(delta(1), json!({"content": "It is"}));
        assert_eq!(delta(2), json!({"content": " 21°C."}));
        assert_eq!(finish(2), Value::Null);
        assert_eq!(delta(3), json!({}));
        assert_eq!(finish(3), "stop");
        if include_usage {
            assert_eq!(chunks[4]["choices"], json!([]));
            let usage = &chunks[4]["usage"];
            assert_eq!(usage["prompt_tokens"], 9);
            assert_eq!(usage["completion_tokens"], 5 + 12);
            assert_eq!(usage["total_tokens"], 26);
            assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 12);
            for chunk in &chunks[..4] {
                assert_eq!(chunk["usage"], Value::Null);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ai_studio_embeddings_use_batch_embed_contents_in_float_and_base64() {
    let f = fixture().await;
    for format in ["float", "base64"] {
        let body = format!(
            r#"{{"model":"gemini-embed","input":["hello","world"],"encoding_format":"{format}"}}"#
        );
        let response = f.post("/v1/embeddings", &body).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();

        let seen = f.last();
        assert_eq!(
            seen.path,
            "/v1beta/models/gemini-embedding-001:batchEmbedContents"
        );
        assert_eq!(seen.query, None);
        assert_api_key_auth(&seen, GEMINI_KEY);
        assert_eq!(
            seen.json(),
            json!({"requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "hello"}]}},
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "world"}]}}
            ]})
        );

        assert_eq!(answer["object"], "list");
        let data = answer["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        for (i, item) in data.iter().enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            let expected = if format == "base64" {
                json!(base64_f32(&vector(i)))
            } else {
                json!(vector(i))
            };
            assert_eq!(item["embedding"], expected, "{format} #{i}");
        }
        assert_eq!(
            answer["usage"]["prompt_tokens"], answer["usage"]["total_tokens"],
            "{answer}"
        );
    }
    assert_eq!(base64_f32(&vector(0)), "AACAPgAAAL8AAIA/");
}

// ---------------------------------------------------------------------------------------------
// Vertex AI

#[tokio::test(flavor = "multi_thread")]
async fn vertex_express_key_uses_the_publisher_path_and_the_api_key_header() {
    let f = fixture().await;
    let response = f
        .post("/v1/chat/completions", &plain_chat("express-flash"))
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_translated_text_answer(&answer, "gemini-2.5-flash");

    let seen = f.last();
    assert_eq!(
        seen.path,
        "/v1/publishers/google/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(seen.query, None);
    assert_api_key_auth(&seen, EXPRESS_KEY);
}

#[tokio::test(flavor = "multi_thread")]
async fn vertex_oauth_token_uses_the_project_path_and_bearer_auth() {
    let f = fixture().await;
    let response = f
        .post("/v1/chat/completions", &plain_chat("project-pro"))
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_translated_text_answer(&answer, "gemini-2.5-pro");

    let seen = f.last();
    assert_eq!(
        seen.path,
        "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent"
    );
    assert_eq!(seen.query, None);
    assert_bearer_auth(&seen, VERTEX_TOKEN);
    assert!(
        f.token_calls().is_empty(),
        "an access token needs no exchange"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vertex_embeddings_use_predict_and_report_the_token_counts() {
    let f = fixture().await;
    let response = f
        .post(
            "/v1/embeddings",
            r#"{"model":"project-embed","input":["hello big world","bye"]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();

    let seen = f.last();
    assert_eq!(
        seen.path,
        "/v1/projects/my-proj/locations/us-central1/publishers/google/models/text-embedding-005:predict"
    );
    assert_bearer_auth(&seen, VERTEX_TOKEN);
    assert_eq!(
        seen.json(),
        json!({"instances": [{"content": "hello big world"}, {"content": "bye"}]})
    );

    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"], json!(vector(i)));
    }
    // statistics.token_count: 3 + 1.
    assert_eq!(answer["usage"]["prompt_tokens"], 4);
    assert_eq!(answer["usage"]["total_tokens"], 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn vertex_service_account_exchanges_a_signed_jwt_once_and_reuses_the_token() {
    let f = fixture().await;
    for _ in 0..2 {
        let response = f
            .post("/v1/chat/completions", &plain_chat("sa-flash"))
            .await;
        assert_eq!(
            response.status(),
            200,
            "refused exchanges: {:?}",
            f.mock.refused()
        );
        let answer: Value = response.json().await.unwrap();
        assert_translated_text_answer(&answer, "gemini-2.5-flash");
    }
    assert_eq!(f.mock.refused(), Vec::<String>::new());
    assert_eq!(
        f.mock.issued(),
        [SA_EMAIL],
        "one exchange, for the connection's account"
    );
    let token_calls = f.token_calls();
    assert_eq!(token_calls.len(), 1);
    assert_no_client_key(&token_calls[0]);

    let calls = f.model_calls();
    assert_eq!(calls.len(), 2);
    for seen in &calls {
        // The project comes from the key file's project_id.
        assert_eq!(
            seen.path,
            "/v1/projects/llm-proxy-test/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
        );
        assert_bearer_auth(seen, "ya29.mock-1");
        let body = String::from_utf8_lossy(&seen.body);
        assert!(!body.contains("PRIVATE KEY") && !body.contains(SA_EMAIL));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_on_a_cold_service_account_share_one_token_exchange() {
    const REQUESTS: usize = 20;
    let f = fixture().await;
    f.mock.token.hold_first.store(true, Ordering::SeqCst);
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let url = format!("{}/v1/chat/completions", f.base);
    let mut tasks = Vec::new();
    for i in 0..REQUESTS {
        let (http, url, sent) = (f.http.clone(), url.clone(), sent_tx.clone());
        tasks.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"model":"sa-cold-flash","messages":[{{"role":"user","content":"request {i}"}}]}}"#
            );
            // Signals once the client has handed the whole body to the connection.
            let stream = futures_util::stream::unfold(Some(body), move |body| {
                let sent = sent.clone();
                async move {
                    match body {
                        Some(body) => Some((Ok::<_, std::io::Error>(Bytes::from(body)), None)),
                        None => {
                            let _ = sent.send(());
                            None
                        }
                    }
                }
            });
            http.post(url)
                .bearer_auth(CLIENT_KEY)
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .unwrap()
        }));
    }
    drop(sent_tx);
    // The first exchange is held at the token endpoint until every request was sent and the
    // exchange has begun, so the requests overlap the exchange instead of finding a cached token.
    tokio::time::timeout(PATIENCE, async {
        for _ in 0..REQUESTS {
            sent_rx.recv().await.expect("a request task ended early");
        }
    })
    .await
    .expect("the requests were not all sent");
    tokio::time::timeout(PATIENCE, f.mock.token.arrived.notified())
        .await
        .expect("no token exchange reached the token endpoint");
    f.mock.token.release.notify_one();

    for task in tasks {
        let response = tokio::time::timeout(PATIENCE, task)
            .await
            .expect("a request did not finish")
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "refused exchanges: {:?}",
            f.mock.refused()
        );
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "It is 21°C.");
    }
    assert_eq!(f.mock.refused(), Vec::<String>::new());
    assert_eq!(
        f.mock.issued(),
        [COLD_SA_EMAIL],
        "exactly one token exchange for {REQUESTS} concurrent requests"
    );
    let calls = f.model_calls();
    assert_eq!(calls.len(), REQUESTS);
    for seen in &calls {
        assert_eq!(
            seen.path,
            "/v1/projects/llm-proxy-test/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
        );
        assert_bearer_auth(seen, "ya29.mock-1");
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test(flavor = "multi_thread")]
async fn gemini_quota_exhaustion_becomes_429_with_retry_after_from_retry_info() {
    let f = fixture().await;
    let response = f
        .post(
            "/v1/chat/completions",
            r#"{"model":"gemini-flash","messages":[{"role":"user","content":"RATELIMITME"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = response.json().await.unwrap();
    let error = body["error"].as_object().expect("OpenAI-shaped error");
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("exceeded your current quota"),
        "{body}"
    );
    assert_eq!(
        f.model_calls().len(),
        1,
        "a 429 is not retried by the gateway"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_upstream_key_becomes_502_without_quoting_the_key() {
    let f = fixture().await;
    let response = f
        .post("/v1/chat/completions", &plain_chat("revoked-flash"))
        .await;
    assert_eq!(response.status(), 502);
    let text = response.text().await.unwrap();
    assert!(!text.contains(REVOKED_KEY), "upstream key leaked: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], "upstream_credential_refused");
    assert_eq!(body["error"]["type"], "server_error");
    assert_api_key_auth(&f.last(), REVOKED_KEY);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mid_stream_error_event_ends_the_client_stream_with_an_error_and_no_done() {
    let f = fixture().await;
    let response = f
        .post(
            "/v1/chat/completions",
            r#"{"model":"gemini-flash","stream":true,"messages":[{"role":"user","content":"BREAKME"}]}"#,
        )
        .await;
    assert_eq!(response.status(), 200, "the stream had started");
    let text = response.text().await.unwrap();
    assert_eq!(f.last().query.as_deref(), Some("alt=sse"));
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(
        events
            .iter()
            .any(|e| e.contains(r#""delta":{"content":"It is"}"#)),
        "content before the error is delivered: {text}"
    );
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = last["error"].as_object().expect("a final error event");
    assert!(
        error["message"].as_str().unwrap().contains("overloaded"),
        "{last}"
    );
    assert!(
        error.contains_key("type") && error.contains_key("code"),
        "{last}"
    );
    assert!(last.get("choices").is_none());
}

// ---------------------------------------------------------------------------------------------
// Tools

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_round_trip_with_the_thought_signature_and_the_function_name() {
    let f = fixture().await;
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let question = json!({"role": "user", "content": "What's the weather in Paris?"});
    let first = json!({"model": "gemini-flash", "messages": [question], "tools": tools, "tool_choice": "auto"});
    let response = f.post("/v1/chat/completions", &first.to_string()).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();

    let sent = f.last().json();
    assert_eq!(
        sent["tools"],
        json!([{"functionDeclarations": [{"name": "get_weather", "description": "Current weather in a city",
            "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]}])
    );
    assert_eq!(
        sent["toolConfig"],
        json!({"functionCallingConfig": {"mode": "AUTO"}})
    );

    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris"}));
    let call_id = call["id"].as_str().unwrap();
    assert!(!call_id.is_empty());
    assert_eq!(answer["usage"]["completion_tokens"], 8 + 20);

    // The client sends the call back as it got it, with the tool's result.
    let second = json!({"model": "gemini-flash", "tools": tools, "messages": [
        question,
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "{\"temp_c\":21}"}
    ]});
    let response = f.post("/v1/chat/completions", &second.to_string()).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "It is 21°C in Paris."
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");

    let seen = f.last();
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    let contents = seen.json()["contents"].clone();
    assert_eq!(contents.as_array().unwrap().len(), 3, "{contents}");
    assert_eq!(
        contents[0],
        json!({"role": "user", "parts": [{"text": "What's the weather in Paris?"}]})
    );
    assert_eq!(
        contents[1],
        json!({"role": "model", "parts": [{
            "functionCall": {"id": "fc_7", "name": "get_weather", "args": {"city": "Paris"}},
            "thoughtSignature": THOUGHT_SIGNATURE}]}),
        "the call goes back in a model turn with Gemini's id and its signature echoed"
    );
    assert_eq!(contents[2]["role"], "user");
    let response_part = &contents[2]["parts"][0]["functionResponse"];
    assert_eq!(response_part["name"], "get_weather");
    assert_eq!(response_part["id"], "fc_7");
    assert_eq!(
        response_part["response"],
        json!({"output": "{\"temp_c\":21}"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_function_call_becomes_one_tool_call_delta_and_finishes_with_tool_calls() {
    let f = fixture().await;
    let body = json!({"model": "gemini-flash", "stream": true, "messages": [
            {"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
    let response = f.post("/v1/chat/completions", &body.to_string()).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let seen = f.last();
    assert_eq!(
        seen.path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    );
    assert_eq!(seen.query.as_deref(), Some("alt=sse"));

    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]", "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks.len(), 3, "{text}");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let calls = chunks[1]["choices"][0]["delta"]["tool_calls"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris"}));
    // Gemini gave no id: the gateway makes one up.
    assert!(
        calls[0]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_") && id.len() > 5),
        "{text}"
    );
    assert_eq!(chunks[2]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "tool_calls");
}

// ---------------------------------------------------------------------------------------------
// Upstream garbage (DESIGN §19)

/// Bound on each garbage answer: they take milliseconds; seconds would mean a stall.
const WITHIN_SECONDS: std::time::Duration = std::time::Duration::from_secs(10);

fn chat_saying(alias: &str, content: &str, stream: bool) -> String {
    json!({"model": alias, "stream": stream, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

impl Fixture {
    /// Posts `body` and reads the whole answer within [`WITHIN_SECONDS`].
    async fn answer_within_seconds(&self, body: &str) -> (StatusCode, String) {
        tokio::time::timeout(WITHIN_SECONDS, async {
            let response = self.post("/v1/chat/completions", body).await;
            let status = response.status();
            (status, response.text().await.unwrap())
        })
        .await
        .expect("no whole answer within seconds")
    }

    async fn assert_next_request_served(&self) {
        let (status, body) = self
            .answer_within_seconds(&plain_chat("gemini-flash"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_translated_text_answer(&serde_json::from_str(&body).unwrap(), "gemini-2.5-flash");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_candidate_index_of_4e9_is_a_502_streamed_or_not() {
    let f = fixture().await;
    for stream in [false, true] {
        let (status, body) = f
            .answer_within_seconds(&chat_saying("gemini-flash", "HUGEINDEX", stream))
            .await;
        // A stream fails on its first event, before its head: a 502 too.
        assert_eq!(status, 502, "stream {stream}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "upstream_invalid_response", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(
                "candidate index 4000000000 exceeds the limit of 1024 (--max-upstream-index)"
            ),
            "{body}"
        );
        f.assert_next_request_served().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gemini_stream_without_its_finish_reason_gets_a_final_error_event() {
    let f = fixture().await;
    let (status, text) = f
        .answer_within_seconds(&chat_saying("gemini-flash", "TRUNCATEME", true))
        .await;
    assert_eq!(status, 200, "the stream had started");
    let events = sse_data(&text);
    assert!(
        events.iter().any(|e| e.contains(r#""content":"It is""#)),
        "{text}"
    );
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_invalid_response", "{text}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("finishReason"),
        "{text}"
    );
    f.assert_next_request_served().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_endpoint_answering_a_huge_expires_in_neither_panics_nor_stalls() {
    let f = fixture().await;
    // Not a synchronisation: the token cache's monotonic clock starts with the data plane, and
    // `now + u64::MAX seconds` overflows (and used to panic) only once it reads a second or more.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for _ in 0..2 {
        let (status, body) = f
            .answer_within_seconds(&plain_chat("sa-forever-flash"))
            .await;
        assert_eq!(
            status,
            200,
            "refused exchanges: {:?}: {body}",
            f.mock.refused()
        );
        assert_translated_text_answer(&serde_json::from_str(&body).unwrap(), "gemini-2.5-flash");
    }
    assert_eq!(f.mock.issued(), [FOREVER_SA_EMAIL], "the token is reused");
    f.assert_next_request_served().await;
}
