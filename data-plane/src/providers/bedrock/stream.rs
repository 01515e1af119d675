//! ConverseStream: `application/vnd.amazon.eventstream` frames → OpenAI chunks (wire formats
//! §5.4, §6.3).
//!
//! Frames are split by [`super::frames::FrameReader`] (bounded by `--max-stream-event-bytes`).
//! `messageStart` opens the choice, text deltas
//! become `content` deltas, a `toolUse` block start becomes a tool call with its id and name and
//! each of its input fragments an `arguments` delta, `messageStop` the finish chunk, and
//! `metadata` (which follows it) the usage chunk, sent only when the client asked. A stream is
//! whole once both arrived. Exception frames end the stream with an error event. Content block
//! indexes and the tool-call count are bounded by `--max-upstream-index`.

use super::converse::{TokenUsage, completion_id, finish_reason, now_unix};
use super::error::exception_error;
use super::frames::{self, FrameReader};
use crate::errors::ApiError;
use crate::limits::Limits;
use crate::sse::{self, ChunkWriter, StreamTranslator};
use crate::usage::Usage;
use aws_smithy_types::event_stream::Message;
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Value, json};

const PROVIDER: &str = llm_proxy_catalog::Provider::Bedrock.as_str();

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockStart {
    content_block_index: Option<u32>,
    start: Option<StartUnion>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartUnion {
    tool_use: Option<ToolUseStart>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolUseStart {
    tool_use_id: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockDelta {
    content_block_index: Option<u32>,
    delta: Option<DeltaUnion>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeltaUnion {
    text: Option<String>,
    tool_use: Option<ToolUseDelta>,
}

#[derive(Debug, Deserialize)]
struct ToolUseDelta {
    #[serde(default)]
    input: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageStop {
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    usage: Option<TokenUsage>,
}

/// Translates a ConverseStream body (see the module doc).
#[derive(Debug)]
pub struct ConverseStream {
    frames: FrameReader,
    writer: ChunkWriter,
    started: bool,
    /// `messageStop` arrived.
    finished: bool,
    /// `metadata` arrived (it follows `messageStop`).
    metadata_seen: bool,
    /// `contentBlockIndex` → OpenAI tool call index, for tool-use blocks; at most
    /// `max_index + 1` entries.
    tool_blocks: Vec<(u32, usize)>,
    usage: Option<TokenUsage>,
    complete: bool,
    max_index: u32,
}

impl ConverseStream {
    /// A translator with the default [`Limits`]; see [`with_limits`](Self::with_limits).
    pub fn new(model: &str, request_id: Option<&str>, client_wants_usage: bool) -> Self {
        let defaults = Limits::default();
        Self {
            frames: FrameReader::new(defaults.max_stream_event_bytes),
            writer: ChunkWriter {
                id: completion_id(request_id),
                created: now_unix(),
                model: model.to_owned(),
                client_wants_usage,
            },
            started: false,
            finished: false,
            metadata_seen: false,
            tool_blocks: Vec::new(),
            usage: None,
            complete: false,
            max_index: defaults.max_upstream_index,
        }
    }

    /// Applies `--max-stream-event-bytes` (to whole frames) and `--max-upstream-index`.
    pub fn with_limits(mut self, limits: &Limits) -> Self {
        self.frames
            .set_max_frame_bytes(limits.max_stream_event_bytes);
        self.max_index = limits.max_upstream_index;
        self
    }

    /// A content block index from the upstream, refused past `max_index`.
    fn block_index(&self, index: Option<u32>) -> Result<u32, ApiError> {
        let index = index.unwrap_or_default();
        if index > self.max_index {
            return Err(sse::index_too_large(
                PROVIDER,
                "content block index",
                u64::from(index),
                self.max_index,
            ));
        }
        Ok(index)
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, out: &mut BytesMut) {
        self.writer.choices(
            json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }]),
            out,
        );
    }

    fn start(&mut self, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            self.chunk(json!({ "role": "assistant", "content": "" }), None, out);
        }
    }

    fn parse<T: for<'de> Deserialize<'de>>(event: &str, payload: &[u8]) -> Result<T, ApiError> {
        serde_json::from_slice(payload).map_err(|e| {
            ApiError::upstream_bad_answer(PROVIDER, format!("a {event} event is not valid: {e}"))
        })
    }

    fn message(&mut self, message: &Message, out: &mut BytesMut) -> Result<(), ApiError> {
        let event = frames::event_type(message, exception_error)?;
        let payload = message.payload().as_ref();
        match event.as_str() {
            "messageStart" => self.start(out),
            "contentBlockStart" => {
                self.start(out);
                let start: BlockStart = Self::parse(&event, payload)?;
                let block = self.block_index(start.content_block_index)?;
                if let Some(tool) = start.start.and_then(|s| s.tool_use) {
                    let k = self.tool_blocks.len();
                    if k > self.max_index as usize {
                        return Err(sse::index_too_large(
                            PROVIDER,
                            "tool call index",
                            k as u64,
                            self.max_index,
                        ));
                    }
                    self.tool_blocks.push((block, k));
                    self.chunk(
                        json!({ "tool_calls": [{ "index": k, "id": tool.tool_use_id, "type": "function",
                                                 "function": { "name": tool.name, "arguments": "" } }] }),
                        None,
                        out,
                    );
                }
            }
            "contentBlockDelta" => {
                self.start(out);
                let delta: BlockDelta = Self::parse(&event, payload)?;
                let block = self.block_index(delta.content_block_index)?;
                match delta.delta {
                    Some(DeltaUnion {
                        text: Some(text), ..
                    }) if !text.is_empty() => {
                        self.chunk(json!({ "content": text }), None, out);
                    }
                    Some(DeltaUnion {
                        tool_use: Some(tool),
                        ..
                    }) => {
                        let k = self
                            .tool_blocks
                            .iter()
                            .find(|(b, _)| *b == block)
                            .map(|(_, k)| *k)
                            .ok_or_else(|| {
                                ApiError::upstream_bad_answer(
                                    PROVIDER,
                                    format!("tool input for block {block}, which did not start a tool call"),
                                )
                            })?;
                        self.chunk(
                            json!({ "tool_calls": [{ "index": k, "function": { "arguments": tool.input } }] }),
                            None,
                            out,
                        );
                    }
                    // Reasoning and citation deltas have no OpenAI chunk.
                    _ => {}
                }
            }
            "contentBlockStop" => {}
            "messageStop" => {
                self.start(out);
                let stop: MessageStop = Self::parse(&event, payload)?;
                let mut reason = finish_reason(stop.stop_reason.as_deref().unwrap_or("end_turn"));
                if reason == "stop" && !self.tool_blocks.is_empty() {
                    reason = "tool_calls";
                }
                self.finished = true;
                self.chunk(json!({}), Some(reason), out);
            }
            "metadata" => {
                let metadata: Metadata = Self::parse(&event, payload)?;
                if metadata.usage.is_some() {
                    self.usage = metadata.usage;
                }
                self.metadata_seen = true;
            }
            // Events added to the API later carry nothing a chat completion has.
            _ => {}
        }
        Ok(())
    }
}

impl StreamTranslator for ConverseStream {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        self.frames.push(chunk);
        while let Some(message) = self.frames.next_message()? {
            self.message(&message, out)?;
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        self.frames.finish()?;
        if !(self.finished && self.metadata_seen) {
            return Err(sse::stream_truncated(PROVIDER, "messageStop and metadata"));
        }
        self.writer
            .end(self.usage.unwrap_or_default().to_json(), out);
        self.complete = true;
        Ok(())
    }

    fn complete(&self) -> bool {
        self.complete
    }

    fn usage(&self) -> Option<Usage> {
        self.usage.map(|u| u.usage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_eventstream::frame::write_message_to;
    use aws_smithy_types::event_stream::{Header, HeaderValue};

    fn frame(event: &str, payload: &str) -> Vec<u8> {
        let message = Message::new(payload.as_bytes().to_vec())
            .add_header(Header::new(
                ":message-type",
                HeaderValue::String("event".into()),
            ))
            .add_header(Header::new(
                ":event-type",
                HeaderValue::String(event.to_owned().into()),
            ));
        let mut out = Vec::new();
        write_message_to(&message, &mut out).unwrap();
        out
    }

    #[test]
    fn a_huge_declared_frame_is_refused_from_its_first_bytes() {
        let mut stream = ConverseStream::new("m", None, false);
        let mut out = BytesMut::new();
        // A prelude declaring 4 GiB, and a few bytes of it.
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 60]);
        let err = stream.push(&bytes, &mut out).unwrap_err();
        assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
        assert!(
            err.message.contains(
                "frame of 4294967295 bytes exceeds the limit of 16777216 bytes (--max-stream-event-bytes)"
            ),
            "{}",
            err.message
        );
        // The limit is the flag's: a 200-byte frame passes a 200-byte limit, not a 199-byte one.
        let start = frame("messageStart", r#"{"role":"assistant"}"#);
        let limits = |max| Limits {
            max_stream_event_bytes: max,
            ..Limits::default()
        };
        let len = start.len();
        let mut stream = ConverseStream::new("m", None, false).with_limits(&limits(len));
        stream.push(&start, &mut out).unwrap();
        let mut stream = ConverseStream::new("m", None, false).with_limits(&limits(len - 1));
        assert!(stream.push(&start, &mut out).is_err());
    }

    #[test]
    fn content_block_indexes_and_tool_counts_are_bounded() {
        let limits = Limits {
            max_upstream_index: 1,
            ..Limits::default()
        };
        let mut out = BytesMut::new();
        let mut stream = ConverseStream::new("m", None, false).with_limits(&limits);
        let err = stream
            .push(
                &frame(
                    "contentBlockDelta",
                    r#"{"contentBlockIndex":4000000000,"delta":{"text":"x"}}"#,
                ),
                &mut out,
            )
            .unwrap_err();
        assert!(
            err.message.contains(
                "content block index 4000000000 exceeds the limit of 1 (--max-upstream-index)"
            ),
            "{}",
            err.message
        );
        let mut stream = ConverseStream::new("m", None, false).with_limits(&limits);
        let tool = |i: u32| {
            frame(
                "contentBlockStart",
                &format!(
                    r#"{{"contentBlockIndex":{i},"start":{{"toolUse":{{"toolUseId":"t{i}","name":"f"}}}}}}"#
                ),
            )
        };
        stream.push(&tool(0), &mut out).unwrap();
        stream.push(&tool(1), &mut out).unwrap();
        // A third tool block (index 2 is past the limit whatever its block index).
        let err = stream.push(&tool(1), &mut out).unwrap_err();
        assert!(
            err.message
                .contains("tool call index 2 exceeds the limit of 1"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_stream_is_whole_only_with_message_stop_and_metadata() {
        let mut out = BytesMut::new();
        let start = frame("messageStart", r#"{"role":"assistant"}"#);
        let stop = frame("messageStop", r#"{"stopReason":"end_turn"}"#);
        let metadata = frame(
            "metadata",
            r#"{"usage":{"inputTokens":3,"outputTokens":4,"totalTokens":7}}"#,
        );
        for (frames, whole) in [
            (vec![&start], false),
            (vec![&start, &stop], false),
            (vec![&start, &stop, &metadata], true),
        ] {
            let mut stream = ConverseStream::new("m", None, false);
            for f in frames {
                stream.push(f, &mut out).unwrap();
            }
            match stream.finish(&mut out) {
                Ok(()) => assert!(whole && stream.complete()),
                Err(err) => {
                    assert!(!whole);
                    assert!(
                        err.message.contains("messageStop and metadata"),
                        "{}",
                        err.message
                    );
                }
            }
        }
    }

    #[test]
    fn the_metadata_usage_has_the_cache_kinds() {
        let mut out = BytesMut::new();
        let mut stream = ConverseStream::new("m", None, true);
        for f in [
            frame("messageStart", r#"{"role":"assistant"}"#),
            frame(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"text":"Hi"}}"#,
            ),
            frame("messageStop", r#"{"stopReason":"end_turn"}"#),
            frame(
                "metadata",
                r#"{"usage":{"inputTokens":41,"outputTokens":36,"totalTokens":2125,"cacheReadInputTokens":2000,"cacheWriteInputTokens":48},"metrics":{"latencyMs":1450}}"#,
            ),
        ] {
            stream.push(&f, &mut out).unwrap();
        }
        stream.finish(&mut out).unwrap();
        assert_eq!(
            stream.usage(),
            Some(Usage {
                prompt_tokens: 41 + 2000 + 48,
                completion_tokens: 36,
                total_tokens: 41 + 2000 + 48 + 36,
                cache_read_tokens: 2000,
                cache_write_tokens: 48,
                reasoning_tokens: 0,
            })
        );
        // The usage chunk carries them for the readers of Anthropic and Responses clients.
        let text = String::from_utf8(out.to_vec()).unwrap();
        let usage: Vec<serde_json::Value> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .filter(|chunk| chunk["usage"].is_object())
            .map(|chunk| chunk["usage"].clone())
            .collect();
        assert_eq!(
            usage,
            [serde_json::json!({
                "prompt_tokens": 2089, "completion_tokens": 36, "total_tokens": 2125,
                "prompt_tokens_details": {"cached_tokens": 2000, "cache_write_tokens": 48}
            })]
        );
    }

    #[test]
    fn usage_sums_saturate() {
        let usage: TokenUsage = serde_json::from_str(&format!(
            r#"{{"inputTokens":{max},"outputTokens":{max},"cacheReadInputTokens":{max}}}"#,
            max = u64::MAX
        ))
        .unwrap();
        let usage = usage.usage();
        assert_eq!(usage.prompt_tokens, u64::MAX);
        assert_eq!(usage.total_tokens, u64::MAX);
    }
}
