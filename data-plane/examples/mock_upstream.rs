//! A fast local stand-in for an OpenAI upstream, for benchmarks (`scripts/bench.sh`): answers every
//! POST with a fixed chat completion, or a short SSE stream when the body asks for `"stream":true`.
//!
//! Usage: `mock_upstream 127.0.0.1:9000`

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1755133833,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":2,"total_tokens":10}}"#;
const STREAM: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello\"},\"finish_reason\":null}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":2,\"total_tokens\":10}}\n\ndata: [DONE]\n\n";

async fn answer(body: Bytes) -> Response {
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    let (content_type, text) = if stream {
        ("text/event-stream", STREAM)
    } else {
        ("application/json", ANSWER)
    };
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let app = axum::Router::new().fallback(answer);
    axum::serve(listener, app).await
}
