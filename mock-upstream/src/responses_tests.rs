//! The Responses API of OpenAI and Azure through the mock's whole HTTP surface: the path forms
//! and their credentials, stored responses and their chains, the answers, the streams and the
//! trigger words.

use crate::openai::{AZURE_KEY, OPENAI_KEY, OPENAI_SECOND_KEY};
use crate::responses::{
    CACHED_TOKENS, ENCRYPTED_REASONING, INPUT_TOKENS, OUTPUT_TOKENS, REASONING_SUMMARY,
    REASONING_TOKENS, WEATHER_ARGUMENTS,
};
use crate::{MockState, router};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt as _;

const BEARER: &str = "Bearer sk-upstream-openai-0123456789";

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The output text of a Response object's message.
    fn output_text(&self) -> String {
        output_text(&self.json())
    }
}

fn output_text(response: &Value) -> String {
    let message = response["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["type"] == "message")
        .unwrap_or_else(|| panic!("no message in {response}"));
    message["content"][0]["text"].as_str().unwrap().to_owned()
}

fn request(method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Request<Body> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(body)).unwrap()
}

async fn send(state: &Arc<MockState>, request: Request<Body>) -> Answer {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

/// `method` on `path` with `headers` and a JSON `body` (none when `Null`).
async fn call(
    state: &Arc<MockState>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Answer {
    let bytes = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    send(state, request(method, path, headers, bytes)).await
}

/// A POST to OpenAI's `/v1/responses` with the accepted key.
async fn create(state: &Arc<MockState>, body: &Value) -> Answer {
    call(
        state,
        Method::POST,
        "/v1/responses",
        &[("authorization", BEARER)],
        body,
    )
    .await
}

async fn get(state: &Arc<MockState>, path: &str) -> Answer {
    call(
        state,
        Method::GET,
        path,
        &[("authorization", BEARER)],
        &Value::Null,
    )
    .await
}

fn hello(extra: Value) -> Value {
    let mut body = json!({"model": "gpt-4o", "input": "hi there"});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

fn usage(input: u64, cached: u64, output: u64, reasoning: u64) -> Value {
    json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": cached},
           "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
           "total_tokens": input + output})
}

/// The events of a Responses SSE body, checking that each `event:` names its data's `type` and
/// that the sequence numbers count from 0.
fn sse_events(text: &str) -> Vec<Value> {
    assert!(text.ends_with("\n\n"), "{text}");
    let events: Vec<Value> = text
        .split_terminator("\n\n")
        .map(|event| {
            let (name, data) = event.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name, "{event}");
            data
        })
        .collect();
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    events
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_response_has_openais_shape_and_the_request_is_recorded_byte_for_byte() {
    let state = Arc::new(MockState::default());
    // Unusual spacing, key order and Codex's extras: all recorded as sent, all accepted.
    let body = br#"{"input":[{"type":"message","role":"developer","content":[{"type":"input_text","text":"be brief"}]},{"role":"user","content":[{"type":"input_text","text":"hi"}]}],  "model":"gpt-4o","client_metadata":{"x":"1"},"prompt_cache_key":"pck","parallel_tool_calls":true,"text":{"verbosity":"low"},"tools":[{"type":"namespace","name":"ns","tools":[]},{"type":"web_search","external_web_access":false}],"instructions":"You are terse.","max_output_tokens":256}"#;
    let answer = send(
        &state,
        request(
            Method::POST,
            "/v1/responses?trace=1",
            &[("authorization", BEARER), ("originator", "codex_exec")],
            Bytes::from_static(body),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        answer
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let response = answer.json();
    let id = response["id"].as_str().unwrap();
    let hex = id.strip_prefix("resp_").unwrap();
    assert_eq!(hex.len(), 48);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(response["model"], "gpt-4o");
    assert_eq!(response["error"], Value::Null);
    assert_eq!(response["incomplete_details"], Value::Null);
    assert_eq!(response["store"], true);
    assert_eq!(response["previous_response_id"], Value::Null);
    assert_eq!(response["instructions"], "You are terse.");
    assert_eq!(response["max_output_tokens"], 256);
    assert_eq!(response["tool_choice"], "auto");
    assert_eq!(response["parallel_tool_calls"], true);
    assert_eq!(response["text"], json!({"verbosity": "low"}));
    assert_eq!(response["tools"].as_array().unwrap().len(), 2);
    assert_eq!(
        response["reasoning"],
        json!({"effort": null, "summary": null})
    );
    assert_eq!(response["truncation"], "disabled");
    assert_eq!(response["metadata"], json!({}));
    assert!(response["created_at"].is_u64());
    assert!(response.get("temperature").is_some() && response.get("top_p").is_some());
    let output = response["output"].as_array().unwrap();
    assert_eq!(output.len(), 1);
    let message = &output[0];
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(message["type"], "message");
    assert_eq!(message["status"], "completed");
    assert_eq!(message["role"], "assistant");
    assert_eq!(
        message["content"][0],
        json!({"type": "output_text", "text": "Hello from mock responses: turn 1",
               "annotations": [], "logprobs": []})
    );
    assert_eq!(response["usage"], usage(INPUT_TOKENS, 0, OUTPUT_TOKENS, 0));
    assert_eq!(response["usage"], usage(37, 0, 11, 0));

    let recorded = state.requests().pop().unwrap();
    assert_eq!(recorded.method, Method::POST);
    assert_eq!(recorded.path, "/v1/responses");
    assert_eq!(recorded.query.as_deref(), Some("trace=1"));
    assert_eq!(&recorded.body[..], &body[..]);
    assert_eq!(recorded.header("originator"), Some("codex_exec"));
}

#[tokio::test]
async fn openai_keys_are_checked() {
    let state = Arc::new(MockState::default());
    for key in [OPENAI_KEY, OPENAI_SECOND_KEY] {
        let bearer = format!("Bearer {key}");
        let answer = call(
            &state,
            Method::POST,
            "/v1/responses",
            &[("authorization", &bearer)],
            &hello(json!({})),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    for headers in [
        vec![("authorization", "Bearer sk-other")],
        vec![],
        // Azure's header is not OpenAI's.
        vec![("api-key", AZURE_KEY)],
    ] {
        for (method, path) in [
            (Method::POST, "/v1/responses"),
            (Method::GET, "/v1/responses/resp_1"),
            (Method::DELETE, "/v1/responses/resp_1"),
            (Method::GET, "/v1/responses/resp_1/input_items"),
        ] {
            let answer = call(&state, method, path, &headers, &hello(json!({}))).await;
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path}");
            let error = &answer.json()["error"];
            assert_eq!(error["type"], "invalid_request_error");
            assert_eq!(error["code"], "invalid_api_key");
            assert_eq!(error["param"], Value::Null);
            assert!(error["message"].is_string());
        }
    }
    assert_eq!(state.requests().len(), 2 + 3 * 4);
}

#[tokio::test]
async fn every_path_form_serves_the_whole_api() {
    let openai: &[(&str, &str)] = &[("authorization", BEARER)];
    let azure: &[(&str, &str)] = &[("api-key", AZURE_KEY)];
    /// What goes before `/responses`, the query, the credentials.
    type Form<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let forms: [Form; 8] = [
        ("/v1", "", openai),
        ("", "", openai),
        ("/gateway/path/v1", "", openai),
        ("/openai/v1", "", azure),
        ("/openai/v1", "?api-version=preview", azure),
        ("/openai/v1", "?api-version=latest", azure),
        ("/openai", "?api-version=2025-03-01-preview", azure),
        ("/openai", "?api-version=2025-04-01-preview", azure),
    ];
    for (prefix, query, headers) in forms {
        let state = Arc::new(MockState::default());
        let path = |rest: &str| format!("{prefix}/responses{rest}{query}");
        let created = call(&state, Method::POST, &path(""), headers, &hello(json!({}))).await;
        assert_eq!(
            created.status,
            StatusCode::OK,
            "{prefix}{query}: {}",
            created.text()
        );
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let fetched = call(
            &state,
            Method::GET,
            &path(&format!("/{id}")),
            headers,
            &Value::Null,
        )
        .await;
        assert_eq!(fetched.status, StatusCode::OK, "{prefix}{query}");
        assert_eq!(fetched.json(), created.json());
        let items = call(
            &state,
            Method::GET,
            &path(&format!("/{id}/input_items")),
            headers,
            &Value::Null,
        )
        .await;
        assert_eq!(items.status, StatusCode::OK, "{prefix}{query}");
        assert_eq!(items.json()["data"].as_array().unwrap().len(), 1);
        let deleted = call(
            &state,
            Method::DELETE,
            &path(&format!("/{id}")),
            headers,
            &Value::Null,
        )
        .await;
        assert_eq!(deleted.status, StatusCode::OK, "{prefix}{query}");
        assert_eq!(state.requests().len(), 4);
        assert!(state.responses.ids().is_empty());
    }
}

#[tokio::test]
async fn azure_checks_its_key_and_api_version() {
    let state = Arc::new(MockState::default());
    let azure = |path: &'static str, key: &'static str| {
        let state = state.clone();
        async move {
            call(
                &state,
                Method::POST,
                path,
                &[("api-key", key)],
                &hello(json!({})),
            )
            .await
        }
    };
    for path in [
        "/openai/v1/responses",
        "/openai/responses?api-version=2025-04-01-preview",
    ] {
        let refused = azure(path, "wrong-key").await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            refused.json(),
            json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}})
        );
        // OpenAI's Bearer key is not Azure's credential.
        let bearer = call(
            &state,
            Method::POST,
            path,
            &[("authorization", BEARER)],
            &hello(json!({})),
        )
        .await;
        assert_eq!(bearer.status, StatusCode::UNAUTHORIZED, "{path}");
    }

    let missing = azure("/openai/responses", AZURE_KEY).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing.json(),
        json!({"error": {"code": "404", "message": "Resource not found"}})
    );
    for path in [
        "/openai/responses?api-version=2024-12-01-preview",
        "/openai/responses?api-version=2024-10-21",
    ] {
        let early = azure(path, AZURE_KEY).await;
        assert_eq!(early.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            early.json(),
            json!({"error": {"code": "BadRequest", "message": "Azure OpenAI Responses API is enabled only for api-version 2025-03-01-preview and later"}})
        );
    }
    for path in [
        "/openai/responses?api-version=preview",
        "/openai/responses?api-version=someday",
        "/openai/v1/responses?api-version=2025-04-01-preview",
    ] {
        let unknown = azure(path, AZURE_KEY).await;
        assert_eq!(unknown.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            unknown.json(),
            json!({"error": {"code": "BadRequest", "message": "API version not supported"}})
        );
    }
    let later = azure(
        "/openai/responses?api-version=2026-01-01-preview",
        AZURE_KEY,
    )
    .await;
    assert_eq!(later.status, StatusCode::OK);
    // On Azure, `model` is the deployment name; it is answered as sent.
    assert_eq!(later.json()["model"], "gpt-4o");
}

#[tokio::test]
async fn stored_responses_are_retrieved_listed_and_deleted() {
    let state = Arc::new(MockState::default());
    let created = create(
        &state,
        &json!({"model": "gpt-4o", "input": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
            {"type": "message", "role": "user", "id": "msg_mine", "content": "second"},
        ]}),
    )
    .await
    .json();
    let id = created["id"].as_str().unwrap();
    assert_eq!(state.responses.get(id), Some(created.clone()));

    let fetched = get(&state, &format!("/v1/responses/{id}")).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.json(), created);

    // Newest first by default, as OpenAI lists them; each with an id.
    let items = get(&state, &format!("/v1/responses/{id}/input_items"))
        .await
        .json();
    assert_eq!(items["object"], "list");
    assert_eq!(items["has_more"], false);
    let data = items["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[0]["id"], "msg_mine");
    assert_eq!(
        data[0]["content"],
        json!([{"type": "input_text", "text": "second"}])
    );
    assert_eq!(data[1]["content"][0]["text"], "first");
    assert_eq!(data[2]["role"], "developer");
    assert_eq!(data[2]["type"], "message");
    assert!(data[2]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(items["first_id"], "msg_mine");
    assert_eq!(items["last_id"], data[2]["id"]);

    let ascending = get(
        &state,
        &format!("/v1/responses/{id}/input_items?order=asc&limit=2"),
    )
    .await
    .json();
    let ascending_data = ascending["data"].as_array().unwrap();
    assert_eq!(ascending_data.len(), 2);
    assert_eq!(ascending_data[0]["role"], "developer");
    assert_eq!(ascending["has_more"], true);
    let after = ascending["last_id"].as_str().unwrap();
    let rest = get(
        &state,
        &format!("/v1/responses/{id}/input_items?order=asc&after={after}"),
    )
    .await
    .json();
    assert_eq!(rest["data"][0]["id"], "msg_mine");
    assert_eq!(rest["has_more"], false);
    let bad_limit = get(&state, &format!("/v1/responses/{id}/input_items?limit=0")).await;
    assert_eq!(bad_limit.status, StatusCode::BAD_REQUEST);

    let deleted = call(
        &state,
        Method::DELETE,
        &format!("/v1/responses/{id}"),
        &[("authorization", BEARER)],
        &Value::Null,
    )
    .await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(
        deleted.json(),
        json!({"id": id, "object": "response", "deleted": true})
    );
    let not_found = json!({"error": {"message": format!("Response with id '{id}' not found."),
        "type": "invalid_request_error", "param": null, "code": null}});
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
    ] {
        let gone = get(&state, &path).await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(gone.json(), not_found);
    }
    let again = call(
        &state,
        Method::DELETE,
        &format!("/v1/responses/{id}"),
        &[("authorization", BEARER)],
        &Value::Null,
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.json(), not_found);

    // Other methods are refused.
    let put = call(
        &state,
        Method::PUT,
        "/v1/responses",
        &[("authorization", BEARER)],
        &hello(json!({})),
    )
    .await;
    assert_eq!(put.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(put.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn store_false_answers_but_keeps_nothing() {
    let state = Arc::new(MockState::default());
    let answer = create(&state, &hello(json!({"store": false}))).await.json();
    assert_eq!(answer["store"], false);
    assert_eq!(output_text(&answer), "Hello from mock responses: turn 1");
    let id = answer["id"].as_str().unwrap();
    assert!(state.responses.ids().is_empty());
    let fetched = get(&state, &format!("/v1/responses/{id}")).await;
    assert_eq!(fetched.status, StatusCode::NOT_FOUND);
    let chained = create(&state, &hello(json!({"previous_response_id": id}))).await;
    assert_eq!(chained.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        chained.json()["error"]["code"],
        "previous_response_not_found"
    );
}

#[tokio::test]
async fn a_chain_of_ten_turns_counts_its_user_messages_and_stays_in_its_account() {
    let state = Arc::new(MockState::default());
    let mut previous: Option<String> = None;
    for turn in 1..=10 {
        let mut body = json!({"model": "gpt-4o", "input": format!("message {turn}")});
        if let Some(previous) = &previous {
            body["previous_response_id"] = json!(previous);
        }
        let answer = create(&state, &body).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(
            answer.output_text(),
            format!("Hello from mock responses: turn {turn}")
        );
        let response = answer.json();
        assert_eq!(
            response["previous_response_id"],
            previous.as_deref().map_or(Value::Null, |p| json!(p))
        );
        previous = Some(response["id"].as_str().unwrap().to_owned());
    }
    let last = previous.unwrap();
    // The last response's input: the whole conversation, newest first (10 user messages and
    // the 9 answers before it).
    let items = get(
        &state,
        &format!("/v1/responses/{last}/input_items?limit=100"),
    )
    .await
    .json();
    let data = items["data"].as_array().unwrap();
    assert_eq!(data.len(), 19);
    assert_eq!(data[0]["content"][0]["text"], "message 10");
    assert_eq!(data[1]["role"], "assistant");
    assert_eq!(
        data[1]["content"][0]["text"],
        "Hello from mock responses: turn 9"
    );
    assert_eq!(data[18]["content"][0]["text"], "message 1");
    let first_page = get(&state, &format!("/v1/responses/{last}/input_items"))
        .await
        .json();
    assert_eq!(first_page["data"].as_array().unwrap().len(), 19);

    // Another mock is another account: it knows nothing of this chain.
    let other = Arc::new(MockState::default());
    let foreign = create(&other, &hello(json!({"previous_response_id": last}))).await;
    assert_eq!(foreign.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        foreign.json(),
        json!({"error": {"message": format!("Previous response with id '{last}' not found."),
            "type": "invalid_request_error", "param": "previous_response_id",
            "code": "previous_response_not_found"}})
    );
    assert_eq!(
        get(&other, &format!("/v1/responses/{last}")).await.status,
        StatusCode::NOT_FOUND
    );
    // Nothing was stored by the refusal.
    assert!(other.responses.ids().is_empty());
    assert_eq!(state.responses.ids().len(), 10);
}

fn weather_tools() -> Value {
    json!([{"type": "function", "name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
            "strict": true}])
}

#[tokio::test]
async fn a_function_call_round_trip() {
    let state = Arc::new(MockState::default());
    let asked = create(
        &state,
        &json!({"model": "gpt-4o", "tools": weather_tools(),
                "input": "What is the weather in Paris?"}),
    )
    .await
    .json();
    let output = asked["output"].as_array().unwrap();
    assert_eq!(output.len(), 1);
    let call = &output[0];
    assert_eq!(call["type"], "function_call");
    assert!(call["id"].as_str().unwrap().starts_with("fc_"));
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], WEATHER_ARGUMENTS);
    assert_eq!(call["arguments"], r#"{"location":"Paris"}"#);
    assert_eq!(call["status"], "completed");
    assert_eq!(asked["usage"], usage(37, 0, 11, 0));

    // The result, chained by id.
    let answered = create(
        &state,
        &json!({"model": "gpt-4o", "tools": weather_tools(), "previous_response_id": asked["id"],
                "input": [{"type": "function_call_output", "call_id": call["call_id"],
                           "output": "18C and sunny"}]}),
    )
    .await;
    assert_eq!(
        answered.output_text(),
        "Hello from mock responses: the tool said 18C and sunny"
    );

    // The same conversation sent whole, as Codex does (store false).
    let whole = create(
        &state,
        &json!({"model": "gpt-4o", "tools": weather_tools(), "store": false, "input": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": "call_x", "name": "get_weather",
             "arguments": WEATHER_ARGUMENTS},
            {"type": "function_call_output", "call_id": "call_x",
             "output": [{"type": "input_text", "text": "rainy"}]}]}),
    )
    .await;
    assert_eq!(
        whole.output_text(),
        "Hello from mock responses: the tool said rainy"
    );

    // Without the tool, or without the word, a text answer.
    let no_tool = create(&state, &hello(json!({"input": "What is the weather?"}))).await;
    assert_eq!(no_tool.output_text(), "Hello from mock responses: turn 1");
    let no_word = create(&state, &hello(json!({"tools": weather_tools()}))).await;
    assert_eq!(no_word.output_text(), "Hello from mock responses: turn 1");
}

#[tokio::test]
async fn reasoning_models_give_a_reasoning_item_and_reasoning_tokens() {
    let state = Arc::new(MockState::default());
    for model in ["o3", "o4-mini", "gpt-5", "gpt-5-codex"] {
        let answer = create(&state, &hello(json!({"model": model}))).await.json();
        let reasoning = &answer["output"][0];
        assert_eq!(reasoning["type"], "reasoning", "{model}");
        assert!(reasoning["id"].as_str().unwrap().starts_with("rs_"));
        assert_eq!(
            reasoning["summary"],
            json!([{"type": "summary_text", "text": REASONING_SUMMARY}])
        );
        assert_eq!(reasoning["summary"][0]["text"], "Thinking about it.");
        assert!(reasoning.get("encrypted_content").is_none(), "{model}");
        assert_eq!(answer["output"][1]["type"], "message");
        assert_eq!(
            answer["usage"],
            usage(
                INPUT_TOKENS,
                0,
                OUTPUT_TOKENS + REASONING_TOKENS,
                REASONING_TOKENS
            )
        );
        assert_eq!(answer["usage"], usage(37, 0, 75, 64));
        assert_eq!(answer["reasoning"]["effort"], "medium");
    }
    let included = create(
        &state,
        &hello(
            json!({"model": "gpt-5", "include": ["reasoning.encrypted_content"],
                      "reasoning": {"effort": "high", "summary": "auto"}}),
        ),
    )
    .await
    .json();
    assert_eq!(
        included["output"][0]["encrypted_content"],
        ENCRYPTED_REASONING
    );
    assert_eq!(
        included["reasoning"],
        json!({"effort": "high", "summary": "auto"})
    );
    // Reasoning before a function call too.
    let call = create(
        &state,
        &json!({"model": "o3", "tools": weather_tools(), "input": "weather?"}),
    )
    .await
    .json();
    assert_eq!(
        types(call["output"].as_array().unwrap()),
        ["reasoning", "function_call"]
    );
    // Other models do not reason.
    let plain = create(&state, &hello(json!({"model": "gpt-4.1"})))
        .await
        .json();
    assert_eq!(plain["output"].as_array().unwrap().len(), 1);
    assert_eq!(
        plain["usage"]["output_tokens_details"]["reasoning_tokens"],
        0
    );
}

#[tokio::test]
async fn cacheme_reports_cached_input_tokens() {
    let state = Arc::new(MockState::default());
    let answer = create(&state, &hello(json!({"input": "hi CACHEME"})))
        .await
        .json();
    assert_eq!(
        answer["usage"],
        usage(
            INPUT_TOKENS + CACHED_TOKENS,
            CACHED_TOKENS,
            OUTPUT_TOKENS,
            0
        )
    );
    assert_eq!(answer["usage"], usage(1061, 1024, 11, 0));
    let both = create(
        &state,
        &hello(json!({"model": "o3", "prompt_cache_key": "CACHEME"})),
    )
    .await
    .json();
    assert_eq!(both["usage"], usage(1061, 1024, 75, 64));
}

#[tokio::test]
async fn a_text_stream_follows_openais_event_sequence_one_write_per_event() {
    let state = Arc::new(MockState::default());
    let response = router(state.clone())
        .oneshot(request(
            Method::POST,
            "/v1/responses",
            &[("authorization", BEARER)],
            Bytes::from(hello(json!({"stream": true})).to_string()),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // Each event is its own chunk of the body.
    let chunks: Vec<Bytes> = response
        .into_body()
        .into_data_stream()
        .map(|chunk| chunk.unwrap())
        .collect()
        .await;
    for chunk in &chunks {
        let text = std::str::from_utf8(chunk).unwrap();
        assert!(
            text.starts_with("event: ") && text.ends_with("\n\n"),
            "{text}"
        );
        assert_eq!(text.matches("\n\n").count(), 1, "{text}");
    }
    let text: String = chunks
        .iter()
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let events = sse_events(&text);
    assert_eq!(chunks.len(), events.len());
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    // `type` comes first, as OpenAI writes it.
    assert!(text.contains("data: {\"type\":\"response.created\""));
    let created = &events[0]["response"];
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["output"], json!([]));
    assert_eq!(created["usage"], Value::Null);
    let added = &events[2];
    assert_eq!(added["output_index"], 0);
    assert_eq!(added["item"]["status"], "in_progress");
    assert_eq!(added["item"]["content"], json!([]));
    let item_id = &added["item"]["id"];
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| {
            assert_eq!(&e["item_id"], item_id);
            assert_eq!(e["content_index"], 0);
            e["delta"].as_str().unwrap()
        })
        .collect();
    assert_eq!(deltas, "Hello from mock responses: turn 1");
    assert_eq!(events[7]["text"], deltas);
    assert_eq!(events[8]["part"]["text"], deltas);
    assert_eq!(events[9]["item"]["status"], "completed");
    let completed = &events[10]["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["usage"], usage(37, 0, 11, 0));
    assert_eq!(output_text(completed), deltas);

    // The streamed response is stored as completed.
    let id = completed["id"].as_str().unwrap();
    assert_eq!(
        &get(&state, &format!("/v1/responses/{id}")).await.json(),
        completed
    );
}

#[tokio::test]
async fn reasoning_and_function_call_streams() {
    let state = Arc::new(MockState::default());
    let answer = create(
        &state,
        &json!({"model": "gpt-5", "stream": true, "tools": weather_tools(), "input": "weather in Paris?",
                "include": ["reasoning.encrypted_content"]}),
    )
    .await;
    let events = sse_events(&answer.text());
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.done",
            "response.reasoning_summary_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let summary: String = events
        .iter()
        .filter(|e| e["type"] == "response.reasoning_summary_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(summary, REASONING_SUMMARY);
    assert_eq!(events[6]["text"], REASONING_SUMMARY);
    assert_eq!(
        events[7]["part"],
        json!({"type": "summary_text", "text": REASONING_SUMMARY})
    );
    assert_eq!(events[8]["item"]["encrypted_content"], ENCRYPTED_REASONING);
    assert_eq!(events[9]["output_index"], 1);
    assert_eq!(events[9]["item"]["type"], "function_call");
    assert_eq!(events[9]["item"]["arguments"], "");
    assert_eq!(events[9]["item"]["name"], "get_weather");
    let arguments: String = events
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(arguments, WEATHER_ARGUMENTS);
    assert_eq!(events[12]["arguments"], WEATHER_ARGUMENTS);
    assert_eq!(events[13]["item"]["status"], "completed");
    assert_eq!(events[14]["response"]["usage"], usage(37, 0, 75, 64));
}

#[tokio::test]
async fn trigger_words_misbehave() {
    let state = Arc::new(MockState::default());
    let limited = create(&state, &hello(json!({"input": "RATELIMITME"}))).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.header("retry-after"), Some("7"));
    assert_eq!(limited.json()["error"]["code"], "rate_limit_exceeded");
    let azure_limited = call(
        &state,
        Method::POST,
        "/openai/v1/responses",
        &[("api-key", AZURE_KEY)],
        &hello(json!({"input": "RATELIMITME"})),
    )
    .await;
    assert_eq!(azure_limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(azure_limited.header("retry-after"), Some("7"));
    assert_eq!(azure_limited.json()["error"]["code"], "429");

    let overloaded = create(&state, &hello(json!({"input": "OVERLOADME"}))).await;
    assert_eq!(overloaded.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(overloaded.json()["error"]["type"], "server_error");

    let server_error = create(&state, &hello(json!({"model": "server-error"}))).await;
    assert_eq!(server_error.status, StatusCode::INTERNAL_SERVER_ERROR);

    let not_json = create(&state, &hello(json!({"input": "NOTJSON"}))).await;
    assert_eq!(not_json.status, StatusCode::OK);
    assert_eq!(not_json.header("content-type"), Some("text/html"));

    let broken = create(
        &state,
        &hello(json!({"stream": true, "input": "MIDSTREAMERROR"})),
    )
    .await;
    assert_eq!(broken.status, StatusCode::OK);
    let events = sse_events(&broken.text());
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.failed",
        ]
    );
    let failed = &events[5]["response"];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "server_error");
    assert!(failed["error"]["message"].is_string());
    let broken_sync = create(&state, &hello(json!({"input": "MIDSTREAMERROR"}))).await;
    assert_eq!(broken_sync.status, StatusCode::INTERNAL_SERVER_ERROR);

    let truncated = create(
        &state,
        &hello(json!({"stream": true, "input": "TRUNCATEME"})),
    )
    .await;
    let events = sse_events(&truncated.text());
    assert_eq!(types(&events).last(), Some(&"response.output_text.delta"));
    assert!(!types(&events).contains(&"response.completed"));
    let truncated_call = create(
        &state,
        &json!({"model": "gpt-4o", "stream": true, "tools": weather_tools(),
                "input": "weather TRUNCATEME"}),
    )
    .await;
    let events = sse_events(&truncated_call.text());
    assert_eq!(types(&events).last(), Some(&"response.output_item.done"));
    let truncated_sync = create(&state, &hello(json!({"input": "TRUNCATEME"}))).await;
    assert_eq!(truncated_sync.status, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&truncated_sync.body).is_err());
    assert!(truncated_sync.text().starts_with('{'));

    // Cut answers are not stored; the refusals store nothing either.
    assert!(state.responses.ids().is_empty());
}

#[tokio::test]
async fn bodies_are_checked_like_openai_does() {
    let state = Arc::new(MockState::default());
    let garbage = send(
        &state,
        request(
            Method::POST,
            "/v1/responses",
            &[("authorization", BEARER)],
            Bytes::from_static(b"{not json"),
        ),
    )
    .await;
    assert_eq!(garbage.status, StatusCode::BAD_REQUEST);
    assert_eq!(garbage.json()["error"]["type"], "invalid_request_error");
    let no_model = create(&state, &json!({"input": "hi"})).await;
    assert_eq!(no_model.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        no_model.json(),
        json!({"error": {"message": "Missing required parameter: 'model'.",
            "type": "invalid_request_error", "param": "model",
            "code": "missing_required_parameter"}})
    );
}

#[tokio::test]
#[allow(clippy::disallowed_methods, reason = "the handle is kept and awaited")]
async fn holdme_waits_for_the_release_and_slowstream_stalls() {
    let state = Arc::new(MockState::default());
    let held = {
        let state = state.clone();
        tokio::spawn(async move {
            create(&state, &hello(json!({"input": "HOLDME"})))
                .await
                .status
        })
    };
    state.held.notified().await;
    state.release.notify_one();
    assert_eq!(held.await.unwrap(), StatusCode::OK);

    let response = router(state.clone())
        .oneshot(request(
            Method::POST,
            "/v1/responses",
            &[("authorization", BEARER)],
            Bytes::from(hello(json!({"stream": true, "input": "SLOWSTREAM"})).to_string()),
        ))
        .await
        .unwrap();
    let mut body = response.into_body().into_data_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"event: response.created\n"));
    let next = tokio::time::timeout(std::time::Duration::from_millis(50), body.next()).await;
    assert!(next.is_err(), "the stream should stall");
    drop(body);
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        state.stream_dropped.notified(),
    )
    .await
    .unwrap();
}

#[tokio::test]
#[allow(clippy::disallowed_methods, reason = "the handle is kept and awaited")]
async fn the_gate_holds_responses_requests_too() {
    let state = Arc::new(MockState::default());
    state.gate.forget_permits(usize::MAX);
    let held = {
        let state = state.clone();
        tokio::spawn(async move { create(&state, &hello(json!({}))).await.status })
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while state.requests().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the held request was not recorded");
    assert!(!held.is_finished());
    state.gate.add_permits(1);
    assert_eq!(held.await.unwrap(), StatusCode::OK);
}
