//! The benchmark mode (`llm-proxy-mock-upstream --bench`, `scripts/bench.sh`): the same OpenAI
//! chat completion for every POST, or a stream of four events when the body asks for
//! `"stream": true`, with nothing recorded or checked, so that the mock costs the load
//! generator's core as little as possible. The stream's first event is sent at once and each
//! later one after `chunk_delay`, so that time to first byte and total time differ.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use std::convert::Infallible;
use std::time::Duration;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1755133833,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":2,"total_tokens":10}}"#;

/// The SSE events of a streamed answer, sent one by one.
const EVENTS: [&str; 4] = [
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":2,\"total_tokens\":10}}\n\n",
    "data: [DONE]\n\n",
];

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Before every answer's headers.
    pub delay: Duration,
    /// Between the events of a streamed answer.
    pub chunk_delay: Duration,
}

/// Whether a JSON body has `"stream": true` at any level (tolerates whitespace around the colon;
/// the bodies here are small and flat, so a byte scan is enough and cheaper than parsing).
fn wants_stream(body: &[u8]) -> bool {
    const KEY: &[u8] = b"\"stream\"";
    let mut rest = body;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let after: &[u8] = rest.trim_ascii_start();
        if let Some(value) = after.strip_prefix(b":")
            && value.trim_ascii_start().starts_with(b"true")
        {
            return true;
        }
    }
    false
}

/// The fixed answer to `body`: a chat completion, or its stream when the body asks for one.
pub async fn answer(timing: Timing, body: Bytes) -> Response {
    if !timing.delay.is_zero() {
        tokio::time::sleep(timing.delay).await;
    }
    let (content_type, body) = if wants_stream(&body) {
        let chunk_delay = timing.chunk_delay;
        let events = futures_util::stream::unfold(0usize, move |i| async move {
            let event = EVENTS.get(i)?;
            if i > 0 && !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            Some((
                Ok::<_, Infallible>(Bytes::from_static(event.as_bytes())),
                i + 1,
            ))
        });
        ("text/event-stream", Body::from_stream(events))
    } else {
        ("application/json", Body::from(ANSWER))
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::wants_stream;

    #[test]
    fn detects_stream_flag() {
        assert!(wants_stream(br#"{"model":"m","stream":true}"#));
        assert!(wants_stream(br#"{"stream" : true,"model":"m"}"#));
        assert!(!wants_stream(br#"{"model":"m","stream":false}"#));
        assert!(!wants_stream(br#"{"model":"m"}"#));
        assert!(!wants_stream(br#"{"stream_options":{"x":true}}"#));
    }
}
