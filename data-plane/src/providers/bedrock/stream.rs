//! ConverseStream: `application/vnd.amazon.eventstream` frames → OpenAI chunks (wire formats
//! §5.4, §6.3).
//!
//! Frames are decoded by `aws-smithy-eventstream` (prelude and message CRC32 checked); the gateway
//! adds a frame-size limit before buffering. `messageStart` opens the choice, text deltas become
//! `content` deltas, a `toolUse` block start becomes a tool call with its id and name and each of
//! its input fragments an `arguments` delta, `messageStop` the finish chunk, and `metadata` (which
//! follows it) the usage chunk, sent only when the client asked. Exception frames end the stream
//! with an error event.

use super::converse::{TokenUsage, completion_id, finish_reason, now_unix};
use super::error::exception_error;
use crate::errors::ApiError;
use crate::providers::Usage;
use crate::sse::{ChunkWriter, StreamTranslator};
use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::{HeaderValue, Message};
use bytes::{Buf as _, BytesMut};
use serde::Deserialize;
use serde_json::{Value, json};

const PROVIDER: &str = "bedrock";

/// Largest frame accepted: Bedrock's limits are 128 KiB of headers and 24 MiB of payload.
pub const MAX_FRAME_BYTES: usize = 24 * 1024 * 1024 + 128 * 1024 + 16;

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
    buffer: BytesMut,
    decoder: MessageFrameDecoder,
    /// The current frame's length was checked against [`MAX_FRAME_BYTES`].
    frame_checked: bool,
    writer: ChunkWriter,
    started: bool,
    finished: bool,
    /// `contentBlockIndex` → OpenAI tool call index, for tool-use blocks.
    tool_blocks: Vec<(u32, usize)>,
    usage: Option<TokenUsage>,
    complete: bool,
}

impl ConverseStream {
    pub fn new(model: &str, request_id: Option<&str>, client_wants_usage: bool) -> Self {
        Self {
            buffer: BytesMut::new(),
            decoder: MessageFrameDecoder::new(),
            frame_checked: false,
            writer: ChunkWriter {
                id: completion_id(request_id),
                created: now_unix(),
                model: model.to_owned(),
                client_wants_usage,
            },
            started: false,
            finished: false,
            tool_blocks: Vec::new(),
            usage: None,
            complete: false,
        }
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
        let header = |name: &str| {
            message
                .headers()
                .iter()
                .find(|h| h.name().as_str() == name)
                .and_then(|h| match h.value() {
                    HeaderValue::String(s) => Some(s.as_str().to_owned()),
                    _ => None,
                })
        };
        let payload = message.payload().as_ref();
        match header(":message-type").as_deref() {
            Some("event") => {}
            Some("exception") => {
                let kind = header(":exception-type").unwrap_or_default();
                return Err(exception_error(&kind, payload));
            }
            Some("error") => {
                let code = header(":error-code").unwrap_or_default();
                let text = header(":error-message").unwrap_or_default();
                return Err(ApiError::upstream_bad_answer(
                    PROVIDER,
                    format!("stream error {code}: {text}"),
                ));
            }
            other => {
                return Err(ApiError::upstream_bad_answer(
                    PROVIDER,
                    format!("unexpected event-stream message type {other:?}"),
                ));
            }
        }
        let event = header(":event-type").unwrap_or_default();
        match event.as_str() {
            "messageStart" => self.start(out),
            "contentBlockStart" => {
                self.start(out);
                let start: BlockStart = Self::parse(&event, payload)?;
                if let Some(tool) = start.start.and_then(|s| s.tool_use) {
                    let k = self.tool_blocks.len();
                    self.tool_blocks
                        .push((start.content_block_index.unwrap_or_default(), k));
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
                let block = delta.content_block_index.unwrap_or_default();
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
            }
            // Events added to the API later carry nothing a chat completion has.
            _ => {}
        }
        Ok(())
    }
}

impl StreamTranslator for ConverseStream {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        self.buffer.extend_from_slice(chunk);
        loop {
            if !self.frame_checked && self.buffer.len() >= 4 {
                let total = (&self.buffer[..4]).get_u32() as usize;
                if total > MAX_FRAME_BYTES {
                    return Err(ApiError::upstream_bad_answer(
                        PROVIDER,
                        format!(
                            "an event-stream frame of {total} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"
                        ),
                    ));
                }
                self.frame_checked = true;
            }
            match self.decoder.decode_frame(&mut self.buffer) {
                Ok(DecodedFrame::Complete(message)) => {
                    self.frame_checked = false;
                    self.message(&message, out)?;
                }
                Ok(DecodedFrame::Incomplete) => return Ok(()),
                Err(e) => {
                    return Err(ApiError::upstream_bad_answer(
                        PROVIDER,
                        format!("invalid event-stream frame: {e}"),
                    ));
                }
            }
        }
    }

    fn finish(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        if !self.buffer.is_empty() || self.frame_checked {
            return Err(ApiError::upstream_bad_answer(
                PROVIDER,
                "the stream ended inside an event-stream frame",
            ));
        }
        if !self.finished {
            return Err(ApiError::upstream_bad_answer(
                PROVIDER,
                "the stream ended before the answer finished",
            ));
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
