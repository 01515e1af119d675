//! `application/vnd.amazon.eventstream` framing, shared by ConverseStream and Claude's
//! InvokeModelWithResponseStream (wire formats §5.4).
//!
//! Frames are decoded by `aws-smithy-eventstream` (prelude and message CRC32 checked); each
//! frame's declared length is checked against `--max-stream-event-bytes` as soon as its first four
//! bytes arrive, before the rest is buffered (the decoder allocates nothing up front: it waits
//! until the buffer holds the whole frame).

use crate::errors::ApiError;
use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::{HeaderValue, Message};
use bytes::{Buf as _, BytesMut};

const PROVIDER: &str = llm_proxy_catalog::Provider::Bedrock.as_str();

/// Splits an event-stream body into messages.
#[derive(Debug)]
pub struct FrameReader {
    buffer: BytesMut,
    decoder: MessageFrameDecoder,
    /// The current frame's length was checked against `max_frame_bytes`.
    frame_checked: bool,
    max_frame_bytes: usize,
}

impl FrameReader {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            decoder: MessageFrameDecoder::new(),
            frame_checked: false,
            max_frame_bytes,
        }
    }

    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// Appends bytes from the upstream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next whole message, if the buffer holds one.
    pub fn next_message(&mut self) -> Result<Option<Message>, ApiError> {
        if !self.frame_checked && self.buffer.len() >= 4 {
            let total = u64::from((&self.buffer[..4]).get_u32());
            if total > self.max_frame_bytes as u64 {
                return Err(ApiError::upstream_bad_answer(
                    PROVIDER,
                    format!(
                        "an event-stream frame of {total} bytes exceeds the limit of {} bytes (--max-stream-event-bytes)",
                        self.max_frame_bytes
                    ),
                ));
            }
            self.frame_checked = true;
        }
        match self.decoder.decode_frame(&mut self.buffer) {
            Ok(DecodedFrame::Complete(message)) => {
                self.frame_checked = false;
                Ok(Some(message))
            }
            Ok(DecodedFrame::Incomplete) => Ok(None),
            Err(e) => Err(ApiError::upstream_bad_answer(
                PROVIDER,
                format!("invalid event-stream frame: {e}"),
            )),
        }
    }

    /// The upstream closed its body: an error when it stopped inside a frame.
    pub fn finish(&self) -> Result<(), ApiError> {
        if !self.buffer.is_empty() || self.frame_checked {
            return Err(ApiError::upstream_bad_answer(
                PROVIDER,
                "the stream ended inside an event-stream frame",
            ));
        }
        Ok(())
    }
}

/// A string header of `message`.
pub fn header(message: &Message, name: &str) -> Option<String> {
    message
        .headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| match h.value() {
            HeaderValue::String(s) => Some(s.as_str().to_owned()),
            _ => None,
        })
}

/// The event type of an `event` message; an `exception` or `error` message becomes its error
/// (`exception` built by `exception_error`).
pub fn event_type(
    message: &Message,
    exception_error: impl Fn(&str, &[u8]) -> ApiError,
) -> Result<String, ApiError> {
    match header(message, ":message-type").as_deref() {
        Some("event") => Ok(header(message, ":event-type").unwrap_or_default()),
        Some("exception") => {
            let kind = header(message, ":exception-type").unwrap_or_default();
            Err(exception_error(&kind, message.payload().as_ref()))
        }
        Some("error") => {
            let code = header(message, ":error-code").unwrap_or_default();
            let text = header(message, ":error-message").unwrap_or_default();
            Err(ApiError::upstream_bad_answer(
                PROVIDER,
                format!("stream error {code}: {text}"),
            ))
        }
        other => Err(ApiError::upstream_bad_answer(
            PROVIDER,
            format!("unexpected event-stream message type {other:?}"),
        )),
    }
}
