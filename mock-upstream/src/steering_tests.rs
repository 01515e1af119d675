//! The behaviours chosen by the remote model name (`server-error`, `usage-P-C`), the second
//! OpenAI key and the request gate, through the mock's whole HTTP surface.

use crate::openai::{OPENAI_KEY, OPENAI_SECOND_KEY};
use crate::{MockState, router};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt as _;

async fn call(state: &Arc<MockState>, key: &str, body: Value) -> (StatusCode, String) {
    let request = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn both_openai_keys_are_accepted_and_others_refused() {
    let state = Arc::new(MockState::default());
    for key in [OPENAI_KEY, OPENAI_SECOND_KEY] {
        let (status, _) = call(&state, key, json!({"model": "m", "messages": []})).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = call(&state, "sk-other", json!({"model": "m", "messages": []})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("invalid_api_key"), "{body}");
    assert_eq!(state.requests().len(), 3);
}

#[tokio::test]
async fn the_model_server_error_answers_openais_500_after_authentication() {
    let state = Arc::new(MockState::default());
    let (status, body) = call(
        &state,
        OPENAI_KEY,
        json!({"model": "server-error", "messages": []}),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(body["error"]["code"], Value::Null);
    let (status, _) = call(
        &state,
        "sk-other",
        json!({"model": "server-error", "messages": []}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn usage_p_c_sets_the_usage_of_answers_and_streams() {
    let state = Arc::new(MockState::default());
    let (status, body) = call(
        &state,
        OPENAI_KEY,
        json!({"model": "usage-40-10", "messages": []}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50})
    );
    assert_eq!(body["model"], "usage-40-10");

    let (_, text) = call(
        &state,
        OPENAI_KEY,
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "hi usage-9-3"}]}),
    )
    .await;
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let with_usage: Vec<&Value> = events.iter().filter(|e| e["usage"].is_object()).collect();
    assert_eq!(with_usage.len(), 1, "{text}");
    assert_eq!(
        with_usage[0]["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
    );
    assert!(text.ends_with("data: [DONE]\n\n"));

    // Without the marker, the defaults.
    let (_, body) = call(
        &state,
        OPENAI_KEY,
        json!({"model": "usage-x", "messages": []}),
    )
    .await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["usage"]["total_tokens"], 17);
}

#[tokio::test]
async fn usage_p_c_k_r_adds_cached_and_reasoning_details() {
    let state = Arc::new(MockState::default());
    let (status, body) = call(
        &state,
        OPENAI_KEY,
        json!({"model": "gpt-5", "messages": [{"role": "user", "content": "usage-1036-100-1024-64 hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 1036, "completion_tokens": 100, "total_tokens": 1136,
               "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 64, "audio_tokens": 0,
                   "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}})
    );
    // Three numbers are the plain form.
    let (_, body) = call(
        &state,
        OPENAI_KEY,
        json!({"model": "usage-40-10-5", "messages": []}),
    )
    .await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50})
    );
}

#[tokio::test]
#[allow(
    clippy::disallowed_methods,
    reason = "the handles are kept and awaited"
)]
async fn the_gate_holds_recorded_requests_until_permits_are_added() {
    let state = Arc::new(MockState::default());
    state.gate.forget_permits(usize::MAX);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let state = state.clone();
            tokio::spawn(async move {
                call(&state, OPENAI_KEY, json!({"model": "m", "messages": []})).await
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(10), async {
        while state.requests().len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the held requests were not recorded");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(held.iter().all(|h| !h.is_finished()), "a request passed");
    state.gate.add_permits(1);
    for request in held {
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .expect("a request stayed held")
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
}
