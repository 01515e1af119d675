//! A fast local stand-in for an OpenAI upstream, for benchmarks (`scripts/bench.sh`): answers every
//! POST with a fixed chat completion, or an SSE stream of four events when the body asks for
//! `"stream": true`. The stream's first event is sent at once and each later one after
//! `--chunk-delay-ms`, so that time to first byte and total time differ; `--delay-ms` delays every
//! answer (streamed or not) before its headers.
//!
//! Usage: `mock_upstream 127.0.0.1:9000 [--delay-ms 0] [--chunk-delay-ms 2]`
//!
//! It runs on one thread: the benchmark pins it to the load generator's core.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use axum::serve::ListenerExt as _;
use clap::Parser;
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

#[derive(Debug, Parser)]
#[command(about = "Fast mock OpenAI upstream for benchmarks")]
struct Args {
    /// Address to listen on.
    #[arg(default_value = "127.0.0.1:9000")]
    listen: String,
    /// Fixed delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Delay between the events of a streamed answer, in milliseconds.
    #[arg(long, default_value_t = 2)]
    chunk_delay_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    delay: Duration,
    chunk_delay: Duration,
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

async fn answer(timing: Timing, body: Bytes) -> Response {
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let timing = Timing {
        delay: Duration::from_millis(args.delay_ms),
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
    };
    // No Nagle: the SSE events are small writes, and waiting for the client's delayed ACK would
    // hold each one back by up to 40 ms.
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await?
        .tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                eprintln!("mock_upstream: cannot set TCP_NODELAY: {err}");
            }
        });
    let app = axum::Router::new().fallback(move |body: Bytes| answer(timing, body));
    axum::serve(listener, app).await
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
