//! The data plane end to end against the mock Google server of `llm-proxy-mock-upstream` (Gemini
//! API, Vertex AI and the OAuth token endpoint), which records exactly what it receives (method,
//! path, query, headers, body) and answers with faithful Google bodies: `GenerateContentResponse`s,
//! `\r\n\r\n`-separated SSE without `[DONE]`, `batchEmbedContents` / `predict` answers,
//! google.rpc errors with `details`, and a token endpoint that verifies the service-account JWT
//! with the fixture's public key. Config comes from a real control plane (SQLite) through the real
//! config stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

mod common;

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use base64::Engine as _;
use common::{PATIENCE, Recorded, options, sse_data};
use llm_proxy_control_plane::server::RunningControlPlane;
use llm_proxy_data_plane::gateway::RunningGateway;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::google::{
    COLD_SA_EMAIL, EXPRESS_KEY, FOREVER_SA_EMAIL, GEMINI_KEY, SA_EMAIL, SA_KEY_ID,
    SERVICE_ACCOUNT_JSON, THOUGHT_SIGNATURE, TokenBook, VERTEX_TOKEN, vector,
};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;

const CLIENT_KEY: &str = "vk-google-front-5678";
/// An AI Studio key the mock refuses.
const REVOKED_KEY: &str = "AIzaSyRevokedRevokedRevokedRevoked00000";

// ---------------------------------------------------------------------------------------------
// Control plane + data plane

struct Fixture {
    mock: MockUpstream,
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
            .requests()
            .into_iter()
            .filter(|r| r.path != "/token")
            .collect()
    }

    fn token_calls(&self) -> Vec<Recorded> {
        self.mock
            .requests()
            .into_iter()
            .filter(|r| r.path == "/token")
            .collect()
    }

    /// The mock token endpoint's issued and refused exchanges.
    fn tokens(&self) -> &TokenBook {
        &self.mock.state.google_tokens
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
    let mock = MockUpstream::start().await.unwrap();
    let token_url = format!("{}/token", mock.base);
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
            service_account_json(&token_url, SA_EMAIL),
            options(&vertex_location),
        ),
        (
            "Vertex-SA-Cold",
            service_account_json(&token_url, COLD_SA_EMAIL),
            options(&vertex_location),
        ),
        (
            "Vertex-SA-Forever",
            service_account_json(&token_url, FOREVER_SA_EMAIL),
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

#[tokio::test(flavor = "multi_thread")]
async fn every_token_kind_gemini_reports_reaches_the_metrics() {
    let f = fixture().await;
    // Answered: 15 prompt tokens (5 cached), 6 candidate tokens after 40 of thinking.
    let response = f
        .post("/v1/chat/completions", &plain_chat("gemini-flash"))
        .await;
    assert_eq!(response.status(), 200);
    // Streamed: 9 prompt tokens, 5 candidate tokens after 12 of thinking; counted although the
    // client did not ask for usage.
    let text = f
        .post(
            "/v1/chat/completions",
            r#"{"model":"gemini-flash","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(
        common::token_counts(&f.dp, "gemini-flash"),
        common::kinds(&[
            ("prompt", 15 + 9),
            // Thoughts are completion tokens, and counted apart as reasoning.
            ("completion", 6 + 40 + 5 + 12),
            ("cache_read", 5),
            ("reasoning", 40 + 12),
        ])
    );
    // Vertex reports the same usageMetadata.
    let response = f
        .post("/v1/chat/completions", &plain_chat("express-flash"))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        common::token_counts(&f.dp, "express-flash"),
        common::kinds(&[
            ("prompt", 15),
            ("completion", 46),
            ("cache_read", 5),
            ("reasoning", 40),
        ])
    );
    // Vertex embeddings: prompt tokens only.
    let response = f
        .post(
            "/v1/embeddings",
            r#"{"model":"project-embed","input":["hello big world","bye"]}"#,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        common::token_counts(&f.dp, "project-embed"),
        common::kinds(&[("prompt", 4), ("completion", 0)])
    );
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
            f.tokens().refused()
        );
        let answer: Value = response.json().await.unwrap();
        assert_translated_text_answer(&answer, "gemini-2.5-flash");
    }
    assert_eq!(f.tokens().refused(), Vec::<String>::new());
    assert_eq!(
        f.tokens().issued(),
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
    f.tokens().hold_first.store(true, Ordering::SeqCst);
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
    tokio::time::timeout(PATIENCE, f.tokens().arrived.notified())
        .await
        .expect("no token exchange reached the token endpoint");
    f.tokens().release.notify_one();

    for task in tasks {
        let response = tokio::time::timeout(PATIENCE, task)
            .await
            .expect("a request did not finish")
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "refused exchanges: {:?}",
            f.tokens().refused()
        );
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "It is 21°C.");
    }
    assert_eq!(f.tokens().refused(), Vec::<String>::new());
    assert_eq!(
        f.tokens().issued(),
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
            f.tokens().refused()
        );
        assert_translated_text_answer(&serde_json::from_str(&body).unwrap(), "gemini-2.5-flash");
    }
    assert_eq!(
        f.tokens().issued(),
        [FOREVER_SA_EMAIL],
        "the token is reused"
    );
    f.assert_next_request_served().await;
}
