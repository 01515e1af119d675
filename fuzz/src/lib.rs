//! The fuzz harness: one function per parser family, shared by the cargo-fuzz targets
//! (`fuzz_targets/`, nightly) and by `data-plane/tests/fuzz_regressions.rs`, which replays every
//! input under `fuzz/regressions/` on stable in the default test suite.
//!
//! Beyond "no panic", each function checks what the gateway promises about its output: a
//! translated request or answer is JSON, and every streamed event the client gets carries JSON or
//! `[DONE]`. Limits are set small so that the caps (DESIGN §19) are reached by short inputs;
//! libFuzzer's `-rss_limit_mb` and `-timeout` catch unbounded memory and superlinear time.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode};
use llm_proxy_data_plane::body;
use llm_proxy_data_plane::conversation::anthropic::{
    self as messages, AnthropicEventReader, AnthropicEventWriter, AnthropicTarget,
};
use llm_proxy_data_plane::conversation::openai_chat::{self, OpenAiChunkReader, OpenAiChunkWriter};
use llm_proxy_data_plane::conversation::responses::{self, ResponsesEventWriter};
use llm_proxy_data_plane::conversation::{
    BlockKind, EventWriter, StopReason, StreamEvent, TokenUsage, Translate,
};
use llm_proxy_data_plane::inbound::InboundDialect;
use llm_proxy_data_plane::limits::Limits;
use llm_proxy_data_plane::providers::anthropic::wire::{EventStreamReader, MessagesRelay};
use llm_proxy_data_plane::providers::bedrock::{converse, error as bedrock_error, stream};
use llm_proxy_data_plane::providers::google::{self, Api, chat, embeddings};
use llm_proxy_data_plane::providers::openai::responses::{ResponsesAnswer, untag_id};
use llm_proxy_data_plane::providers::openai::stream::OpenAiPassthrough;
use llm_proxy_data_plane::providers::{WireFormat, openai_usage, upstream_error};
use llm_proxy_data_plane::sse::{self, EventSplitter, StreamTranslator};

/// Small caps, so that short inputs reach them.
pub fn limits() -> Limits {
    Limits {
        max_top_level_keys: 64,
        max_stream_event_bytes: 4096,
        max_upstream_index: 16,
        ..Limits::default()
    }
}

/// A client's request body: the body parser, then every request translator on what it accepts.
pub fn request(data: &[u8]) {
    let limits = limits();
    let Ok(parsed) = body::parse(data, false, limits.max_top_level_keys) else {
        return;
    };
    // OpenAI and Azure: the client's body with `model` rewritten.
    assert_json(
        &parsed.object.write(&[("model", "\"remote\"")], &[]),
        "openai body",
    );
    for model in ["gemini-2.5-pro", "gemini-3-flash"] {
        if let Ok(out) = chat::request(&parsed, model) {
            assert_json(&out, "gemini request");
        }
    }
    for api in [Api::Gemini, Api::Vertex] {
        if let Ok((_, out, _)) = embeddings::request(&parsed, api, "text-embedding-005") {
            assert_json(&out, "embeddings request");
        }
    }
    for model in ["anthropic.claude-sonnet-4", "amazon.nova-pro-v1:0"] {
        if let Ok(out) = converse::request(&parsed, model) {
            assert_json(&out, "converse request");
        }
    }
    // Anthropic Messages: passthrough splices, and both conversation converters each way.
    if let Some(out) = body::replace_member(data, &parsed.object, "model", "\"model\":\"m\"") {
        assert_json(&out, "spliced messages body");
    }
    if let Some(out) = body::remove_member(data, &parsed.object, "stream") {
        assert_json(&out, "messages body without stream");
    }
    // OpenAI Responses passthrough: `model` and `previous_response_id` spliced in one pass.
    if let Some(out) = body::replace_members(
        data,
        &parsed.object,
        &[
            (
                "previous_response_id",
                "\"previous_response_id\":\"resp_1\"",
            ),
            ("model", "\"model\":\"m\""),
        ],
    ) {
        assert_json(&out, "spliced responses body");
    }
    if let Ok(request) = messages::parse_request(&parsed) {
        for accepted in [false, true] {
            assert_json(
                &openai_chat::write_request(&request, "gpt-4o", accepted),
                "openai chat request from messages",
            );
        }
    }
    // OpenAI Responses, for a translated upstream: to Claude and to the chat bridge.
    if let Ok(request) = responses::parse_request(&parsed) {
        assert_json(
            &openai_chat::write_request(&request, "gemini-2.5-pro", true),
            "openai chat request from responses",
        );
        if let Ok(out) = messages::write_request(
            &request,
            &AnthropicTarget {
                model: Some("claude"),
                anthropic_version_in_body: None,
            },
        ) {
            assert_json(&out, "messages request from responses");
        }
    }
    if let Ok(request) = openai_chat::parse_request(&parsed, "anthropic") {
        for target in [
            AnthropicTarget {
                model: Some("claude"),
                anthropic_version_in_body: None,
            },
            AnthropicTarget {
                model: None,
                anthropic_version_in_body: Some("bedrock-2023-05-31"),
            },
        ] {
            if let Ok(out) = messages::write_request(&request, &target) {
                assert_json(&out, "messages request from openai chat");
            }
        }
    }
}

/// An upstream SSE body (OpenAI and Azure passthrough, Gemini). The first byte picks how the
/// rest is cut into chunks, so that events straddle reads in every way.
pub fn sse(data: &[u8]) {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let limits = limits();
    let mut splitter = EventSplitter::new(limits.max_stream_event_bytes);
    for chunk in chunks(body, cut) {
        splitter.push(chunk);
        while let Some(event) = splitter.next_event() {
            let _ = sse::data_of(&event);
        }
        if splitter.overflowed() {
            break;
        }
    }
    let _ = splitter.finish();
    for wants_usage in [false, true] {
        drive(
            OpenAiPassthrough::new("openai", wants_usage)
                .with_max_event_bytes(limits.max_stream_event_bytes),
            body,
            cut,
            false,
        );
        drive(
            chat::GeminiStream::new("gemini-2.5-flash", wants_usage).with_limits(&limits),
            body,
            cut,
            true,
        );
        // Anthropic events to OpenAI chunks, and OpenAI chunks to Anthropic events.
        drive(
            Translate::new(
                AnthropicEventReader::new("anthropic", limits.max_stream_event_bytes),
                OpenAiChunkWriter::new("claude", wants_usage),
            ),
            body,
            cut,
            true,
        );
    }
    drive(
        Translate::new(
            OpenAiChunkReader::new("openai", limits.max_stream_event_bytes),
            AnthropicEventWriter::new("gpt-4o"),
        ),
        body,
        cut,
        true,
    );
    // Both readers to Responses events.
    drive(
        Translate::new(
            AnthropicEventReader::new("anthropic", limits.max_stream_event_bytes),
            ResponsesEventWriter::new("claude"),
        ),
        body,
        cut,
        true,
    );
    drive(
        Translate::new(
            OpenAiChunkReader::new("openai", limits.max_stream_event_bytes),
            ResponsesEventWriter::new("gpt-4o"),
        ),
        body,
        cut,
        true,
    );
    drive(
        MessagesRelay::sse("anthropic", limits.max_stream_event_bytes),
        body,
        cut,
        false,
    );
    // The Responses passthrough relay (ids tagged in lifecycle events).
    let relayed = ResponsesAnswer {
        connection_id: "conn-fuzz".to_owned(),
    };
    drive(
        relayed.relay("openai", limits.max_stream_event_bytes),
        body,
        cut,
        false,
    );
}

/// An upstream `application/vnd.amazon.eventstream` body (Bedrock ConverseStream).
pub fn event_stream(data: &[u8]) {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let limits = limits();
    for wants_usage in [false, true] {
        let translator =
            stream::ConverseStream::new("claude", Some("req-1"), wants_usage).with_limits(&limits);
        drive(translator, body, cut, true);
        // Claude through InvokeModelWithResponseStream, for OpenAI clients.
        let translator = Translate::new(
            EventStreamReader::new("bedrock", limits.max_stream_event_bytes),
            OpenAiChunkWriter::new("claude", wants_usage),
        );
        drive(translator, body, cut, true);
    }
    // ... and relayed to Messages clients as the SSE events the frames hold.
    drive(
        MessagesRelay::event_stream("bedrock", limits.max_stream_event_bytes),
        body,
        cut,
        true,
    );
}

/// A non-streamed upstream answer, and the same bytes as an error answer, through every
/// provider's mapping.
pub fn answer(data: &[u8]) {
    let limits = limits();
    let mut ids = HeaderMap::new();
    ids.insert("x-amzn-requestid", HeaderValue::from_static("req-1"));
    let _ = openai_usage(data, "openai");
    // A passed-through Responses answer: ids tagged, still JSON.
    let relayed = ResponsesAnswer {
        connection_id: "conn-fuzz".to_owned(),
    };
    if let Ok((out, _)) = relayed.translate(Bytes::copy_from_slice(data), "openai") {
        assert_json(&out, "responses answer");
    }
    // Response ids a client sends back: any text, never a panic.
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(tagged) = untag_id(text)
    {
        assert!(
            !tagged.upstream_id.contains('/'),
            "upstream ids go into URL paths"
        );
    }
    if let Ok((out, _)) = chat::answer(data, "gemini-2.5-flash", limits.max_upstream_index) {
        assert_json(&out, "gemini answer");
    }
    for api in [Api::Gemini, Api::Vertex] {
        let request = body::parse(br#"{"model":"e","input":["a","b"]}"#, true, 64);
        if let Ok(Ok((_, _, embeddings))) = request.map(|r| embeddings::request(&r, api, "e"))
            && let Ok((out, _)) = embeddings.translate(data)
        {
            assert_json(&out, "embeddings answer");
        }
    }
    if let Ok((out, _)) = converse::answer(data, "claude", Some("req-1")) {
        assert_json(&out, "converse answer");
    }
    for client in [InboundDialect::OpenAi, InboundDialect::Anthropic] {
        let _ = WireFormat::OpenAi.translate(
            &ids,
            Bytes::copy_from_slice(data),
            &limits,
            "openai",
            client,
        );
    }
    if let Ok(reply) = messages::parse_reply(data) {
        assert_json(
            &openai_chat::write_reply(&reply, "claude"),
            "openai answer from messages",
        );
    }
    if let Ok(reply) = openai_chat::parse_reply(data, "openai") {
        assert_json(
            &messages::write_reply(&reply),
            "messages answer from openai",
        );
        assert_json(
            &responses::write_reply(&reply, "gpt-4o"),
            "responses answer from openai",
        );
    }
    if let Ok(reply) = messages::parse_reply(data) {
        assert_json(
            &responses::write_reply(&reply, "claude"),
            "responses answer from messages",
        );
    }
    // Retry hints are read from headers: the first line of the input doubles as their value.
    let hint = data.split(|b| *b == b'\n').next().unwrap_or_default();
    if let Ok(value) = HeaderValue::from_bytes(hint) {
        for name in ["retry-after", "retry-after-ms", "x-ms-retry-after-ms"] {
            ids.insert(name, value.clone());
        }
    }
    for status in [400, 401, 403, 404, 408, 424, 429, 500, 503, 529] {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        let _ = upstream_error("openai", status, &ids, data);
        let _ = google::upstream_error(status, data);
        let _ = bedrock_error::upstream_error(status, &ids, data);
    }
    let _ = bedrock_error::exception_error("throttlingException", data);
}

/// Arbitrary model events (any order, any content, as a faulty reader might produce them)
/// through the Responses writer: each byte picks an event, the bytes after it up to the next
/// `0xff` its text. Every event written must be JSON with a `sequence_number` one past the last,
/// and nothing may follow the terminal event.
pub fn responses_events(data: &[u8]) {
    let mut writer = ResponsesEventWriter::new("model");
    let mut out = BytesMut::new();
    let mut failed = false;
    for piece in data.split(|b| *b == 0xff) {
        let Some((&op, rest)) = piece.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(rest).into_owned();
        let usage = TokenUsage {
            input: u64::from(op),
            output: rest.len() as u64,
            cache_read: u64::MAX - u64::from(op),
            cache_write: 0,
            reasoning: u64::MAX,
        };
        let event = match op % 14 {
            0 => StreamEvent::Start {
                id: text,
                model: String::new(),
                usage,
            },
            1 => StreamEvent::BlockStart(BlockKind::Text),
            2 => StreamEvent::BlockStart(BlockKind::Reasoning),
            3 => StreamEvent::BlockStart(BlockKind::RedactedReasoning { data: text }),
            4 => StreamEvent::BlockStart(BlockKind::ToolCall {
                id: text.clone(),
                name: text,
            }),
            5 => StreamEvent::TextDelta(text),
            6 => StreamEvent::ReasoningDelta(text),
            7 => StreamEvent::SignatureDelta(text),
            8 => StreamEvent::ArgumentsDelta(text),
            9 | 10 => StreamEvent::BlockStop,
            11 => StreamEvent::Finish {
                stop: match op / 14 {
                    0 => StopReason::MaxTokens,
                    1 => StopReason::ContentFilter,
                    2 => StopReason::ToolUse,
                    3 => StopReason::StopSequence(Some(text)),
                    4 => StopReason::Other(text),
                    _ => StopReason::EndTurn,
                },
                usage,
            },
            _ => {
                failed = true;
                writer.write_error(
                    &llm_proxy_data_plane::errors::ApiError::invalid_request(text),
                    &mut out,
                );
                continue;
            }
        };
        writer.write(&event, &mut out);
    }
    if !failed {
        writer.write_error(
            &llm_proxy_data_plane::errors::ApiError::internal("the end"),
            &mut out,
        );
    }
    assert_events(&out);
    let mut splitter = EventSplitter::new(usize::MAX);
    splitter.push(&out);
    let mut next = 0u64;
    let mut ended = false;
    while let Some(event) = splitter.next_event() {
        assert!(!ended, "an event after the terminal one");
        let data = sse::data_of(&event).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
        assert_eq!(value["sequence_number"].as_u64(), Some(next), "{data}");
        next += 1;
        ended = matches!(
            value["type"].as_str(),
            Some("response.completed" | "response.incomplete" | "response.failed" | "error")
        );
    }
}

/// Feeds `body` to `translator` in chunks and checks every event the client would get.
fn drive<T: StreamTranslator>(mut translator: T, body: &[u8], cut: u8, translated: bool) {
    let mut out = BytesMut::new();
    let mut failed = false;
    for chunk in chunks(body, cut) {
        if translator.push(chunk, &mut out).is_err() {
            failed = true;
            break;
        }
        if translator.complete() {
            break;
        }
    }
    if !failed {
        let _ = translator.finish(&mut out);
    }
    let _ = translator.usage();
    // Passthrough relays the upstream's events as they are; translated streams write their own.
    if translated {
        assert_events(&out);
    }
}

/// Cuts `body` into chunks of 1..=`cut`+1 bytes, varying by position.
fn chunks(body: &[u8], cut: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = body;
    let mut step = usize::from(cut);
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        step = step.wrapping_mul(31).wrapping_add(7) % (usize::from(cut) + 1) + 1;
        let (head, tail) = rest.split_at(step.min(rest.len()));
        rest = tail;
        Some(head)
    })
}

fn assert_json(bytes: &[u8], what: &str) {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        panic!(
            "{what} is not JSON ({e}): {}",
            String::from_utf8_lossy(bytes)
        );
    }
}

/// Every event the gateway wrote carries `[DONE]` or JSON.
fn assert_events(out: &[u8]) {
    let mut splitter = EventSplitter::new(usize::MAX);
    splitter.push(out);
    while let Some(event) = splitter.next_event() {
        let data = sse::data_of(&event)
            .unwrap_or_else(|| panic!("event without data: {}", String::from_utf8_lossy(&event)));
        if data != "[DONE]" {
            assert_json(data.as_bytes(), "streamed event");
        }
    }
    assert!(
        splitter.finish().is_none(),
        "the last event is not terminated: {}",
        String::from_utf8_lossy(out)
    );
}
