//! Answers of targets that speak Anthropic Messages: relayed to Messages clients (the gateway
//! only reads usage from them), translated for OpenAI chat and Responses clients.
//!
//! Streams come as SSE (Anthropic, Foundry, Bedrock's Messages endpoint, Vertex) or as Bedrock
//! event-stream frames whose `chunk` events hold one Anthropic event each, base64 in `bytes`
//! (InvokeModelWithResponseStream); those are written to Messages clients as the SSE Anthropic
//! sends.

use crate::conversation::anthropic::AnthropicEventReader;
use crate::conversation::openai_chat::OpenAiChunkWriter;
use crate::conversation::responses::ResponsesEventWriter;
use crate::conversation::{self, EventReader, StreamEvent, Translate};
use crate::errors::ApiError;
use crate::inbound::InboundDialect;
use crate::limits::Limits;
use crate::providers::bedrock::frames::{self, FrameReader};
use crate::providers::{bedrock, primed_body, upstream_error};
use crate::sse::{self, EventSplitter, StreamEnd, StreamTranslator};
use crate::usage::Usage;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use std::time::Duration;

/// How the upstream frames its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Sse,
    /// Bedrock InvokeModelWithResponseStream.
    EventStream,
}

/// What the gateway does with a Messages answer.
#[derive(Debug)]
pub struct MessagesAnswer {
    /// The remote model, named in translated answers.
    pub model: String,
    pub framing: Framing,
    /// A `count_tokens` answer (`{"input_tokens": n}`): relayed, no usage.
    pub count_tokens: bool,
    /// Errors come in Bedrock's shape (InvokeModel and Bedrock's Messages endpoint).
    pub bedrock_errors: bool,
}

/// Anthropic's usage object (answers, `message_start.message.usage`, `message_delta.usage`).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(default)]
struct AnthropicUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Folds a later report in: `message_delta` repeats the counts it has (output tokens
    /// cumulatively); a zero input or cache count there does not undo `message_start`'s.
    fn merge(&mut self, later: AnthropicUsage) {
        let nonzero = |n: Option<u64>| n.filter(|n| *n > 0);
        self.input_tokens = nonzero(later.input_tokens).or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens =
            nonzero(later.cache_creation_input_tokens).or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens =
            nonzero(later.cache_read_input_tokens).or(self.cache_read_input_tokens);
    }

    fn usage(self) -> Usage {
        conversation::TokenUsage {
            input: self.input_tokens.unwrap_or(0),
            output: self.output_tokens.unwrap_or(0),
            cache_read: self.cache_read_input_tokens.unwrap_or(0),
            cache_write: self.cache_creation_input_tokens.unwrap_or(0),
            reasoning: 0,
        }
        .to_usage()
    }
}

#[derive(Deserialize)]
struct AnswerUsage {
    usage: Option<AnthropicUsage>,
}

/// The part of a stream event the relay reads.
#[derive(Deserialize)]
struct EventProbe {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<AnswerUsage>,
    usage: Option<AnthropicUsage>,
}

fn not_an_object(provider: &str) -> ApiError {
    ApiError::upstream_bad_answer(provider, "a 2xx answer that is not a JSON object")
}

impl MessagesAnswer {
    pub fn translate(
        &self,
        body: Bytes,
        client: InboundDialect,
        provider: &'static str,
    ) -> Result<(Bytes, Option<Usage>), ApiError> {
        match client {
            InboundDialect::Anthropic => {
                // Relayed as it is; a body the gateway cannot read is not passed on (DESIGN §19).
                let probe: AnswerUsage =
                    serde_json::from_slice(&body).map_err(|_| not_an_object(provider))?;
                let usage = if self.count_tokens {
                    None
                } else {
                    probe.usage.map(AnthropicUsage::usage)
                };
                Ok((body, usage))
            }
            InboundDialect::OpenAi => {
                let reply = conversation::anthropic::parse_reply(&body)?;
                let usage = reply.usage.reported_usage();
                Ok((
                    Bytes::from(conversation::openai_chat::write_reply(&reply, &self.model)),
                    usage,
                ))
            }
            InboundDialect::Responses => {
                let reply = conversation::anthropic::parse_reply(&body)?;
                let usage = reply.usage.reported_usage();
                Ok((
                    Bytes::from(conversation::responses::write_reply(&reply, &self.model)),
                    usage,
                ))
            }
        }
    }

    /// The error for a non-2xx answer. An overload (Anthropic's 529) becomes 503 `overloaded`,
    /// which the Messages route answers as 529 again (DESIGN §17).
    pub fn error(
        &self,
        provider: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> ApiError {
        if status.as_u16() == crate::errors::OVERLOADED {
            let mut err = upstream_error(provider, StatusCode::SERVICE_UNAVAILABLE, headers, body)
                .with_code("overloaded");
            err.kind = "server_error";
            return err;
        }
        if self.bedrock_errors && !is_anthropic_error(body) {
            return bedrock::error::upstream_error(status, headers, body);
        }
        upstream_error(provider, status, headers, body)
    }

    #[allow(clippy::too_many_arguments)] // one call site, the WireFormat's
    pub async fn stream<S, E>(
        &self,
        upstream: S,
        client: InboundDialect,
        client_wants_usage: bool,
        idle_timeout: Duration,
        provider: &'static str,
        on_end: Box<dyn StreamEnd>,
        limits: &Limits,
    ) -> Result<axum::body::Body, ApiError>
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let max_event = limits.max_stream_event_bytes;
        match (client, self.framing) {
            // Relayed as it comes: nothing to decide before the first byte.
            (InboundDialect::Anthropic, Framing::Sse) => {
                Ok(axum::body::Body::from_stream(sse::relay(
                    upstream,
                    MessagesRelay::sse(provider, max_event),
                    idle_timeout,
                    provider,
                    on_end,
                )))
            }
            (InboundDialect::Anthropic, Framing::EventStream) => {
                let relay = MessagesRelay::event_stream(provider, max_event);
                primed_body(upstream, relay, idle_timeout, provider, on_end).await
            }
            (InboundDialect::OpenAi, Framing::Sse) => {
                let translator = Translate::new(
                    AnthropicEventReader::new(provider, max_event),
                    OpenAiChunkWriter::new(&self.model, client_wants_usage),
                );
                primed_body(upstream, translator, idle_timeout, provider, on_end).await
            }
            (InboundDialect::OpenAi, Framing::EventStream) => {
                let translator = Translate::new(
                    EventStreamReader::new(provider, max_event),
                    OpenAiChunkWriter::new(&self.model, client_wants_usage),
                );
                primed_body(upstream, translator, idle_timeout, provider, on_end).await
            }
            (InboundDialect::Responses, Framing::Sse) => {
                let translator = Translate::new(
                    AnthropicEventReader::new(provider, max_event),
                    ResponsesEventWriter::new(&self.model),
                );
                primed_body(upstream, translator, idle_timeout, provider, on_end).await
            }
            (InboundDialect::Responses, Framing::EventStream) => {
                let translator = Translate::new(
                    EventStreamReader::new(provider, max_event),
                    ResponsesEventWriter::new(&self.model),
                );
                primed_body(upstream, translator, idle_timeout, provider, on_end).await
            }
        }
    }
}

/// Whether `body` is Anthropic's error shape (`{"type":"error",...}`).
fn is_anthropic_error(body: &[u8]) -> bool {
    serde_json::from_slice::<EventProbe>(body).is_ok_and(|p| p.kind.as_deref() == Some("error"))
}

/// The payload of a Bedrock `chunk` event.
#[derive(Deserialize)]
struct ChunkPayload {
    bytes: String,
}

/// One Anthropic event's JSON out of a Bedrock `chunk` frame; `None` for other events.
fn chunk_event(
    message: &aws_smithy_types::event_stream::Message,
    provider: &str,
) -> Result<Option<Vec<u8>>, ApiError> {
    let event = frames::event_type(message, bedrock::error::exception_error)?;
    if event != "chunk" {
        return Ok(None);
    }
    let payload: ChunkPayload =
        serde_json::from_slice(message.payload().as_ref()).map_err(|e| {
            ApiError::upstream_bad_answer(provider, format!("a chunk event is not valid: {e}"))
        })?;
    base64::engine::general_purpose::STANDARD
        .decode(payload.bytes.as_bytes())
        .map(Some)
        .map_err(|e| {
            ApiError::upstream_bad_answer(
                provider,
                format!("a chunk event's bytes are not base64: {e}"),
            )
        })
}

/// Relays a Messages stream to a Messages client: SSE events pass byte for byte, Bedrock frames
/// become the SSE events they hold. Reads usage from `message_start` and `message_delta`, and ends
/// at `message_stop` or an `error` event (which the client gets, as Anthropic sends it).
pub struct MessagesRelay {
    provider: &'static str,
    framing: RelayFraming,
    scan: UsageScan,
}

enum RelayFraming {
    Sse(EventSplitter),
    EventStream(FrameReader),
}

/// What the relay learns from the events it passes on.
#[derive(Default)]
struct UsageScan {
    usage: Option<AnthropicUsage>,
    completed: bool,
}

impl UsageScan {
    /// Reads what the relay needs from one event's JSON; returns its type.
    fn read(&mut self, json: &[u8]) -> Option<String> {
        let probe: EventProbe = serde_json::from_slice(json).ok()?;
        let kind = probe.kind?;
        let reported = match kind.as_str() {
            "message_start" => probe.message.and_then(|m| m.usage),
            "message_delta" => probe.usage,
            "message_stop" | "error" => {
                self.completed = true;
                None
            }
            _ => None,
        };
        if let Some(reported) = reported {
            self.usage.get_or_insert_default().merge(reported);
        }
        Some(kind)
    }

    /// Reads one SSE event. Only `message_start` and `message_delta` carry usage, so the content
    /// events (most of a stream) are named by their `event:` line and not parsed.
    fn read_sse(&mut self, event: &[u8]) {
        match sse_event_name(event) {
            Some(
                b"content_block_delta" | b"content_block_start" | b"content_block_stop" | b"ping",
            ) => {}
            Some(b"message_stop") => self.completed = true,
            _ => {
                if let Some(data) = sse::data_of(event) {
                    self.read(data.as_bytes());
                }
            }
        }
    }
}

/// The name on an SSE event's first line (`event: <name>`), if it has one.
fn sse_event_name(event: &[u8]) -> Option<&[u8]> {
    let line = event.split(|b| *b == b'\n').next()?;
    line.strip_prefix(b"event:").map(<[u8]>::trim_ascii)
}

impl MessagesRelay {
    pub fn sse(provider: &'static str, max_event_bytes: usize) -> Self {
        Self {
            provider,
            framing: RelayFraming::Sse(EventSplitter::new(max_event_bytes)),
            scan: UsageScan::default(),
        }
    }

    pub fn event_stream(provider: &'static str, max_event_bytes: usize) -> Self {
        Self {
            provider,
            framing: RelayFraming::EventStream(FrameReader::new(max_event_bytes)),
            scan: UsageScan::default(),
        }
    }
}

impl StreamTranslator for MessagesRelay {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        match &mut self.framing {
            RelayFraming::Sse(splitter) => {
                splitter.push(chunk);
                while !self.scan.completed
                    && let Some(event) = splitter.next_event()
                {
                    self.scan.read_sse(&event);
                    out.extend_from_slice(&event);
                    out.extend_from_slice(b"\n\n");
                }
                if splitter.overflowed() {
                    return Err(sse::event_too_large(
                        self.provider,
                        splitter.max_event_bytes(),
                    ));
                }
            }
            RelayFraming::EventStream(frames) => {
                frames.push(chunk);
                let mut jsons = Vec::new();
                // Events decoded before a failing frame still reach the client, then the error.
                let mut failed = None;
                loop {
                    match frames.next_message() {
                        Ok(Some(message)) => match chunk_event(&message, self.provider) {
                            Ok(Some(json)) => jsons.push(json),
                            Ok(None) => {}
                            Err(err) => {
                                failed = Some(err);
                                break;
                            }
                        },
                        Ok(None) => break,
                        Err(err) => {
                            failed = Some(err);
                            break;
                        }
                    }
                }
                for json in jsons {
                    if self.scan.completed {
                        break;
                    }
                    // Only events the gateway can read reach the client (DESIGN §19).
                    let kind = self.scan.read(&json).filter(|kind| {
                        kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    });
                    let Some(kind) = kind else {
                        return Err(ApiError::upstream_bad_answer(
                            self.provider,
                            "a chunk event does not hold an Anthropic event",
                        ));
                    };
                    // One event is one `data:` line: a JSON with line breaks is written compact.
                    let json = if json.iter().any(|b| matches!(b, b'\n' | b'\r')) {
                        serde_json::from_slice::<serde_json::Value>(&json)
                            .and_then(|value| serde_json::to_vec(&value))
                            .map_err(|e| ApiError::upstream_bad_answer(self.provider, e))?
                    } else {
                        json
                    };
                    out.extend_from_slice(b"event: ");
                    out.extend_from_slice(kind.as_bytes());
                    out.extend_from_slice(b"\ndata: ");
                    out.extend_from_slice(&json);
                    out.extend_from_slice(b"\n\n");
                }
                if let Some(err) = failed {
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut BytesMut) -> Result<(), ApiError> {
        if let RelayFraming::EventStream(frames) = &self.framing {
            frames.finish()?;
        }
        if !self.scan.completed {
            return Err(sse::stream_truncated(self.provider, "message_stop"));
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.scan.completed
    }

    fn usage(&self) -> Option<Usage> {
        self.scan.usage.map(AnthropicUsage::usage)
    }

    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        // As Anthropic ends a failed stream.
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(error.anthropic_body_json().as_bytes());
        out.extend_from_slice(b"\n\n");
    }
}

/// Bedrock InvokeModelWithResponseStream read into model events: frames → the Anthropic events
/// they hold → [`AnthropicEventReader`].
pub struct EventStreamReader {
    provider: &'static str,
    frames: FrameReader,
    events: AnthropicEventReader,
}

impl EventStreamReader {
    pub fn new(provider: &'static str, max_event_bytes: usize) -> Self {
        Self {
            provider,
            frames: FrameReader::new(max_event_bytes),
            events: AnthropicEventReader::new(provider, max_event_bytes),
        }
    }
}

impl EventReader for EventStreamReader {
    fn push(&mut self, chunk: &[u8], events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        self.frames.push(chunk);
        while let Some(message) = self.frames.next_message()? {
            if let Some(json) = chunk_event(&message, self.provider)? {
                self.events.push_event_json(&json, events)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        self.frames.finish()?;
        self.events.finish(events)
    }

    fn complete(&self) -> bool {
        self.events.complete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":1024,\"cache_read_input_tokens\":2048,\"output_tokens\":1}}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":0,\"output_tokens\":12}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn sse_is_relayed_byte_for_byte_and_usage_read() {
        for piece in [1, 3, 7, STREAM.len()] {
            let mut relay = MessagesRelay::sse("anthropic", 1 << 16);
            let mut out = BytesMut::new();
            for chunk in STREAM.as_bytes().chunks(piece) {
                relay.push(chunk, &mut out).unwrap();
            }
            relay.finish(&mut out).unwrap();
            assert!(relay.complete());
            assert_eq!(
                std::str::from_utf8(&out).unwrap(),
                STREAM,
                "pieces of {piece}"
            );
            // A zero input count in message_delta does not undo message_start's.
            assert_eq!(relay.usage(), Some(CACHED_USAGE));
        }
    }

    /// 25 fresh input tokens, 1024 written to the cache, 2048 read from it, 12 output.
    const CACHED_USAGE: Usage = Usage {
        prompt_tokens: 25 + 1024 + 2048,
        completion_tokens: 12,
        total_tokens: 25 + 1024 + 2048 + 12,
        cache_read_tokens: 2048,
        cache_write_tokens: 1024,
        // Anthropic counts thinking in `output_tokens` without reporting it apart.
        reasoning_tokens: 0,
    };

    #[test]
    fn answers_report_every_kind_to_every_client() {
        let answer = MessagesAnswer {
            model: "claude-sonnet-4-5".into(),
            framing: Framing::Sse,
            count_tokens: false,
            bedrock_errors: false,
        };
        let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"thinking","thinking":"Hm.","signature":"c2ln"},{"type":"text","text":"Hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":1024,"cache_read_input_tokens":2048,"output_tokens":12,"service_tier":"standard"}}"#;
        for client in [
            InboundDialect::Anthropic,
            InboundDialect::OpenAi,
            InboundDialect::Responses,
        ] {
            let (_, usage) = answer
                .translate(Bytes::from_static(body.as_bytes()), client, "anthropic")
                .unwrap();
            assert_eq!(usage, Some(CACHED_USAGE), "{client:?}");
        }
    }

    #[test]
    fn a_stream_without_message_stop_is_truncated_and_an_error_event_ends_it() {
        let cut = &STREAM[..STREAM.find("event: message_stop").unwrap()];
        let mut relay = MessagesRelay::sse("anthropic", 1 << 16);
        let mut out = BytesMut::new();
        relay.push(cut.as_bytes(), &mut out).unwrap();
        let err = relay.finish(&mut out).unwrap_err();
        assert!(err.message.contains("message_stop"), "{}", err.message);

        let mut relay = MessagesRelay::sse("anthropic", 1 << 16);
        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        relay.push(error.as_bytes(), &mut out).unwrap();
        assert!(relay.complete());
    }
}
