//! The benchmark mode (`llm-proxy-mock-upstream --bench`, `scripts/bench.sh`): the same OpenAI
//! chat completion for every POST, or a stream of four events when the body asks for
//! `"stream": true`; on the Anthropic Messages paths (`/v1/messages`, `/anthropic/v1/messages`)
//! the same Anthropic Message, or its stream (seven events in four writes, as the chat stream's four), and `{"input_tokens":8}` for
//! `count_tokens`; on paths ending in `/responses` (OpenAI's `/v1/responses`, Azure's
//! `/openai/v1/responses` and `/openai/responses`) the same Responses API Response object, or its
//! stream (the chat stream's answer, "Hello" with 8 input and 2 output tokens, as nine events from
//! `response.created` to `response.completed` in the same four writes); with nothing recorded or
//! checked (no key, no `previous_response_id`, nothing stored), so that the mock costs the load
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

/// The fixed Anthropic Message for `/v1/messages` (and `/anthropic/v1/messages`).
const ANTHROPIC_ANSWER: &str = r#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-bench","content":[{"type":"text","text":"Hello!"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":8,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":2}}"#;

/// Its stream: the same answer as [`EVENTS`] in as many writes (4), so that both streams cost
/// the proxy the same reads and flushes and the comparison is per event; Anthropic's API also
/// sends the opening events (`message_start`, `content_block_start`, `ping`) together.
const ANTHROPIC_EVENTS: [&str; 4] = [
    concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_bench\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-bench\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":8,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
    ),
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello!\"}}\n\n",
    concat!(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n",
    ),
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

/// The fixed Response object for paths ending in `/responses`.
const RESPONSES_ANSWER: &str = r#"{"id":"resp_bench","object":"response","created_at":1741476542,"status":"completed","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"gpt-4o-mini","output":[{"id":"msg_bench","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","annotations":[],"text":"Hello!"}]}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":false,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":8,"input_tokens_details":{"cached_tokens":0},"output_tokens":2,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":10},"user":null,"metadata":{}}"#;

/// Its stream: the answer of [`EVENTS`] in as many writes (4), so that the comparison with the
/// chat stream is per event; the opening events go together, as the Anthropic stream's do.
const RESPONSES_EVENTS: [&str; 4] = [
    concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_bench\",\"object\":\"response\",\"created_at\":1741476542,\"status\":\"in_progress\",\"model\":\"gpt-4o-mini\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.in_progress\ndata: {\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{\"id\":\"resp_bench\",\"object\":\"response\",\"created_at\":1741476542,\"status\":\"in_progress\",\"model\":\"gpt-4o-mini\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"sequence_number\":2,\"output_index\":0,\"item\":{\"id\":\"msg_bench\",\"type\":\"message\",\"status\":\"in_progress\",\"role\":\"assistant\",\"content\":[]}}\n\n",
        "event: response.content_part.added\ndata: {\"type\":\"response.content_part.added\",\"sequence_number\":3,\"item_id\":\"msg_bench\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"annotations\":[],\"text\":\"\"}}\n\n",
    ),
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_bench\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hello\"}\n\n",
    concat!(
        "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"sequence_number\":5,\"item_id\":\"msg_bench\",\"output_index\":0,\"content_index\":0,\"text\":\"Hello\"}\n\n",
        "event: response.content_part.done\ndata: {\"type\":\"response.content_part.done\",\"sequence_number\":6,\"item_id\":\"msg_bench\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"annotations\":[],\"text\":\"Hello\"}}\n\n",
        "event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"sequence_number\":7,\"output_index\":0,\"item\":{\"id\":\"msg_bench\",\"type\":\"message\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"text\":\"Hello\"}]}}\n\n",
    ),
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":8,\"response\":{\"id\":\"resp_bench\",\"object\":\"response\",\"created_at\":1741476542,\"status\":\"completed\",\"model\":\"gpt-4o-mini\",\"output\":[{\"id\":\"msg_bench\",\"type\":\"message\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"text\":\"Hello\"}]}],\"usage\":{\"input_tokens\":8,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":10}}}\n\n",
];

/// The fixed answer of `/v1/messages/count_tokens`.
const COUNT_TOKENS_ANSWER: &str = r#"{"input_tokens":8}"#;

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

/// The fixed answer to a POST of `body` to `path`: on the Anthropic Messages paths an
/// Anthropic Message (or its stream, or a token count), on paths ending in `/responses` a
/// Response object (or its stream), elsewhere a chat completion (or its stream) when the body
/// asks for one.
pub async fn answer(timing: Timing, path: &str, body: Bytes) -> Response {
    if !timing.delay.is_zero() {
        tokio::time::sleep(timing.delay).await;
    }
    let anthropic = crate::anthropic::is_messages_path(path);
    let (answer, events): (&'static str, &'static [&'static str]) =
        match (anthropic, path.ends_with("/count_tokens")) {
            (true, true) => (COUNT_TOKENS_ANSWER, &[]),
            (true, false) => (ANTHROPIC_ANSWER, &ANTHROPIC_EVENTS),
            (false, _) if path.ends_with("/responses") => (RESPONSES_ANSWER, &RESPONSES_EVENTS),
            (false, _) => (ANSWER, &EVENTS),
        };
    let (content_type, body) = if !events.is_empty() && wants_stream(&body) {
        let chunk_delay = timing.chunk_delay;
        let events = futures_util::stream::unfold(0usize, move |i| async move {
            let event = events.get(i)?;
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
        ("application/json", Body::from(answer))
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
    use super::*;

    async fn text(path: &str, body: &'static str) -> String {
        let timing = Timing {
            delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
        };
        let response = answer(timing, path, Bytes::from_static(body.as_bytes())).await;
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn anthropic_paths_get_the_fixed_message_its_stream_or_a_count() {
        let message: serde_json::Value =
            serde_json::from_str(&text("/v1/messages", r#"{"model":"m"}"#).await).unwrap();
        assert_eq!(message["type"], "message");
        assert_eq!(message["usage"]["output_tokens"], 2);
        let stream = text("/anthropic/v1/messages", r#"{"stream":true}"#).await;
        let names: Vec<&str> = stream
            .split_terminator("\n\n")
            .map(|e| e.lines().next().unwrap().strip_prefix("event: ").unwrap())
            .collect();
        assert_eq!(names.first(), Some(&"message_start"));
        assert_eq!(names.last(), Some(&"message_stop"));
        for event in stream.split_terminator("\n\n") {
            let data = event
                .lines()
                .nth(1)
                .unwrap()
                .strip_prefix("data: ")
                .unwrap();
            serde_json::from_str::<serde_json::Value>(data).unwrap();
        }
        assert_eq!(
            text("/v1/messages/count_tokens", r#"{"stream":true}"#).await,
            r#"{"input_tokens":8}"#
        );
        assert!(
            text("/v1/chat/completions", r#"{"stream":true}"#)
                .await
                .ends_with("data: [DONE]\n\n")
        );
    }

    #[tokio::test]
    async fn responses_paths_get_the_fixed_response_or_its_stream_in_four_writes() {
        let response: serde_json::Value =
            serde_json::from_str(&text("/v1/responses", r#"{"model":"m"}"#).await).unwrap();
        assert_eq!(response["object"], "response");
        assert_eq!(
            response["usage"]["output_tokens_details"]["reasoning_tokens"],
            0
        );
        assert_eq!(RESPONSES_EVENTS.len(), EVENTS.len());
        let stream = text("/openai/v1/responses", r#"{"stream":true}"#).await;
        let mut numbers = Vec::new();
        for event in stream.split_terminator("\n\n") {
            let (name, data) = event.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap();
            let data: serde_json::Value =
                serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name);
            numbers.push(data["sequence_number"].as_u64().unwrap());
        }
        assert_eq!(numbers, (0..9).collect::<Vec<u64>>());
        let completed: serde_json::Value = serde_json::from_str(
            stream
                .rsplit_terminator("\n\n")
                .next()
                .unwrap()
                .split_once("data: ")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(completed["type"], "response.completed");
        assert_eq!(completed["response"]["usage"]["total_tokens"], 10);
        assert_eq!(
            completed["response"]["output"][0]["content"][0]["text"],
            "Hello"
        );
    }

    #[test]
    fn detects_stream_flag() {
        assert!(wants_stream(br#"{"model":"m","stream":true}"#));
        assert!(wants_stream(br#"{"stream" : true,"model":"m"}"#));
        assert!(!wants_stream(br#"{"model":"m","stream":false}"#));
        assert!(!wants_stream(br#"{"model":"m"}"#));
        assert!(!wants_stream(br#"{"stream_options":{"x":true}}"#));
    }
}
