//! Server-sent events: splitting an upstream byte stream into events, and the relay that passes
//! chat-completion chunks to the client as they arrive.
//!
//! The relay loop (idle timeout, broken upstreams, the end-of-stream hook) is shared; what becomes
//! of the upstream's bytes is a [`StreamTranslator`]'s business (one per upstream wire format, in
//! its provider's module).

use crate::errors::ApiError;
use crate::usage::Usage;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use std::collections::VecDeque;
use std::time::Duration;

/// Default largest event the relay buffers (`--max-stream-event-bytes`); a bigger one means the
/// upstream is not sending SSE.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Incremental splitter on blank lines (`\n\n` or `\r\n\r\n`). Each byte is scanned once, and
/// the pending event is bounded: past `max_event_bytes` (plus the chunk that crossed it) the
/// splitter reports [`overflowed`](Self::overflowed) and the caller ends the stream.
#[derive(Debug)]
pub struct EventSplitter {
    buffer: BytesMut,
    /// Bytes already scanned without finding a terminator (minus the two that may start one).
    scanned: usize,
    max_event_bytes: usize,
}

impl Default for EventSplitter {
    fn default() -> Self {
        Self::new(MAX_EVENT_BYTES)
    }
}

impl EventSplitter {
    /// A splitter that refuses events larger than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            scanned: 0,
            max_event_bytes,
        }
    }

    /// The largest event accepted.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// True when the pending, unterminated event exceeds the limit.
    pub fn overflowed(&self) -> bool {
        self.buffer.len() > self.max_event_bytes
    }

    /// The next complete event (without its terminating blank line). Line ends are found with
    /// `memchr` (vectorised): most bytes of a stream are inside long `data:` lines.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let buf = &self.buffer[..];
        let start = self.scanned.min(buf.len());
        for i in memchr::memchr_iter(b'\n', &buf[start..]).map(|at| start + at) {
            if i + 1 >= buf.len() {
                break;
            }
            if buf[i + 1] == b'\n' {
                let event = self.buffer.split_to(i).freeze();
                let _ = self.buffer.split_to(2);
                self.scanned = 0;
                return Some(event);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                let event = self.buffer.split_to(i).freeze();
                let _ = self.buffer.split_to(3);
                self.scanned = 0;
                return Some(strip_cr(event));
            }
        }
        // Resume next time just before the end: a terminator may straddle two chunks.
        self.scanned = buf.len().saturating_sub(2);
        None
    }

    /// What is left when the stream ends without a final blank line.
    pub fn finish(&mut self) -> Option<Bytes> {
        let rest = self.buffer.split().freeze();
        let trimmed = trim_ascii_end(&rest);
        (!trimmed.is_empty()).then(|| rest.slice(0..trimmed.len()))
    }
}

fn trim_ascii_end(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && bytes[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    &bytes[..end]
}

fn strip_cr(event: Bytes) -> Bytes {
    if event.ends_with(b"\r") {
        event.slice(0..event.len() - 1)
    } else {
        event
    }
}

/// The `data:` payload of an event (lines joined with `\n`), if any.
pub fn data_of(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(existing) => {
                    existing.push('\n');
                    existing.push_str(rest);
                }
                None => data = Some(rest.to_owned()),
            }
        }
    }
    data
}

/// Called once when a relayed stream ends, fails or is dropped by the client.
pub trait StreamEnd: Send + 'static {
    /// The first bytes of the answer are handed to the client (time to first token).
    fn first_bytes(&mut self) {}
    fn finished(self: Box<Self>, usage: Option<Usage>, completed: bool);
}

/// Turns an upstream's streamed answer into OpenAI chat-completion SSE, chunk by chunk.
pub trait StreamTranslator: Send + 'static {
    /// Consumes bytes from the upstream and appends what the client gets to `out`. An error ends
    /// the stream with a final error event (after what `out` holds).
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError>;
    /// The upstream closed its body; appends the tail of the answer.
    fn finish(&mut self, out: &mut BytesMut) -> Result<(), ApiError>;
    /// True once the answer is whole: nothing more is read from the upstream.
    fn complete(&self) -> bool;
    /// Token usage reported so far.
    fn usage(&self) -> Option<Usage>;
    /// A failure after the stream started, as the client's dialect ends a stream with an error
    /// (OpenAI: one `data:` event with the error body).
    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        write_data(out, error.body_json().as_bytes());
    }
}

/// Two translators in a row: `first`'s output is `second`'s input (e.g. Gemini → OpenAI chunks →
/// Anthropic events, for a Messages client of a Gemini model). Errors end the stream in
/// `second`'s dialect.
pub struct Chain<A, B> {
    first: A,
    second: B,
    between: BytesMut,
}

impl<A: StreamTranslator, B: StreamTranslator> Chain<A, B> {
    pub fn new(first: A, second: B) -> Self {
        Self {
            first,
            second,
            between: BytesMut::new(),
        }
    }

    fn pass_on(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        if self.between.is_empty() {
            return Ok(());
        }
        let between = self.between.split();
        self.second.push(&between, out)
    }
}

impl<A: StreamTranslator, B: StreamTranslator> StreamTranslator for Chain<A, B> {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        let first = self.first.push(chunk, &mut self.between);
        // What `first` produced before failing still reaches the client.
        self.pass_on(out)?;
        first
    }

    fn finish(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        let first = self.first.finish(&mut self.between);
        self.pass_on(out)?;
        first?;
        self.second.finish(out)
    }

    fn complete(&self) -> bool {
        self.second.complete()
    }

    fn usage(&self) -> Option<Usage> {
        self.second.usage().or_else(|| self.first.usage())
    }

    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        self.second.write_error(error, out);
    }
}

/// The error for an upstream event beyond `max` bytes (`--max-stream-event-bytes`).
pub fn event_too_large(provider: &str, max: usize) -> ApiError {
    ApiError::upstream_bad_answer(
        provider,
        format!("a stream event exceeded the limit of {max} bytes (--max-stream-event-bytes)"),
    )
}

/// The error for a stream that ended before its terminal event (`terminal` names it).
pub fn stream_truncated(provider: &str, terminal: &str) -> ApiError {
    ApiError::upstream_bad_answer(
        provider,
        format!("the stream ended before its terminal event ({terminal})"),
    )
}

/// The error for an index or count past `max` (`--max-upstream-index`) in an upstream answer.
pub fn index_too_large(provider: &str, what: &str, value: u64, max: u32) -> ApiError {
    ApiError::upstream_bad_answer(
        provider,
        format!("{what} {value} exceeds the limit of {max} (--max-upstream-index)"),
    )
}

/// Writes OpenAI chat-completion chunks for translated streams: the same `id`, `created` and
/// `model` on every chunk, `usage: null` on each when the client asked for usage (as OpenAI
/// does), the usage chunk and `[DONE]` at the end.
#[derive(Debug)]
pub struct ChunkWriter {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub client_wants_usage: bool,
}

impl ChunkWriter {
    /// One chunk with `choices`.
    pub fn choices(&self, choices: serde_json::Value, out: &mut BytesMut) {
        let mut chunk = serde_json::json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.client_wants_usage {
            chunk["usage"] = serde_json::Value::Null;
        }
        write_data(out, &serde_json::to_vec(&chunk).unwrap_or_default());
    }

    /// The end of the stream: the usage chunk (only when the client asked), then `[DONE]`.
    pub fn end(&self, usage: serde_json::Value, out: &mut BytesMut) {
        if self.client_wants_usage {
            let chunk = serde_json::json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            });
            write_data(out, &serde_json::to_vec(&chunk).unwrap_or_default());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

/// Appends one SSE event `data: <json>` to `out`.
pub fn write_data(out: &mut BytesMut, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

struct RelayState<S, T: StreamTranslator> {
    upstream: S,
    translator: T,
    out: VecDeque<Bytes>,
    idle_timeout: Duration,
    provider: &'static str,
    done: bool,
    /// Some bytes went to the client already.
    started: bool,
    on_end: Option<Box<dyn StreamEnd>>,
}

impl<S, T: StreamTranslator> Drop for RelayState<S, T> {
    fn drop(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end.finished(self.translator.usage(), self.translator.complete());
        }
    }
}

impl<S, T: StreamTranslator> RelayState<S, T> {
    /// Queues what the translator produced, then ends the stream on an error or a whole answer.
    fn emit(&mut self, batch: BytesMut, result: Result<(), ApiError>) {
        if !batch.is_empty() {
            self.out.push_back(batch.freeze());
        }
        match result {
            Err(error) => self.fail(error),
            Ok(()) if self.translator.complete() => self.done = true,
            Ok(()) => {}
        }
    }

    fn fail(&mut self, error: ApiError) {
        let mut event = BytesMut::new();
        self.translator.write_error(&error, &mut event);
        self.out.push_back(event.freeze());
        self.done = true;
    }
}

/// Relays an upstream streamed answer to the client through `translator`, chunk by chunk.
/// `idle_timeout` bounds the wait for each upstream chunk.
pub fn relay<S, E, T>(
    upstream: S,
    translator: T,
    idle_timeout: Duration,
    provider: &'static str,
    on_end: Box<dyn StreamEnd>,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display + Send,
    T: StreamTranslator,
{
    relay_primed(
        upstream,
        translator,
        Primed::default(),
        idle_timeout,
        provider,
        on_end,
    )
}

/// What [`prime`] read before the response head was sent.
#[derive(Debug, Default)]
pub struct Primed {
    /// The client's first bytes.
    pub first: BytesMut,
    /// The upstream body already ended.
    pub ended: bool,
}

/// Reads the upstream until `translator` produces its first bytes for the client. Until then no
/// response head has been sent, so an answer refused before generation (a blocked prompt) or an
/// error in the first event can still get its own HTTP status instead of a 200 stream.
pub async fn prime<S, E, T>(
    upstream: &mut S,
    translator: &mut T,
    idle_timeout: Duration,
    provider: &'static str,
) -> Result<Primed, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display + Send,
    T: StreamTranslator,
{
    let mut first = BytesMut::new();
    loop {
        match next_chunk(upstream, idle_timeout, provider).await? {
            None => {
                translator.finish(&mut first)?;
                return Ok(Primed { first, ended: true });
            }
            Some(chunk) => {
                translator.push(&chunk, &mut first)?;
                if !first.is_empty() {
                    return Ok(Primed {
                        first,
                        ended: false,
                    });
                }
            }
        }
    }
}

/// The upstream's next chunk (`None` at its end), waiting at most `idle_timeout`.
async fn next_chunk<S, E>(
    upstream: &mut S,
    idle_timeout: Duration,
    provider: &'static str,
) -> Result<Option<Bytes>, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    match tokio::time::timeout(idle_timeout, upstream.next()).await {
        Err(_) => Err(ApiError::upstream_timeout(provider, idle_timeout)),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(ApiError::upstream_unreachable(
            provider,
            format!("stream broken: {e}"),
        )),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
    }
}

/// [`relay`] after [`prime`]: sends the primed bytes first.
pub fn relay_primed<S, E, T>(
    upstream: S,
    translator: T,
    primed: Primed,
    idle_timeout: Duration,
    provider: &'static str,
    on_end: Box<dyn StreamEnd>,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display + Send,
    T: StreamTranslator,
{
    let done = primed.ended || translator.complete();
    let mut out = VecDeque::new();
    if !primed.first.is_empty() {
        out.push_back(primed.first.freeze());
    }
    let state = RelayState {
        upstream,
        translator,
        out,
        idle_timeout,
        provider,
        done,
        started: false,
        on_end: Some(on_end),
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(bytes) = state.out.pop_front() {
                if !state.started {
                    state.started = true;
                    if let Some(on_end) = state.on_end.as_mut() {
                        on_end.first_bytes();
                    }
                }
                return Some((Ok(bytes), state));
            }
            if state.done {
                return None;
            }
            let mut batch = BytesMut::new();
            let result =
                match next_chunk(&mut state.upstream, state.idle_timeout, state.provider).await {
                    Err(err) => Err(err),
                    Ok(None) => {
                        let result = state.translator.finish(&mut batch);
                        state.done = true;
                        result
                    }
                    Ok(Some(chunk)) => {
                        // Translators write about as much as they read: one allocation for the
                        // batch rather than a growth per event.
                        batch.reserve(chunk.len() + 128);
                        state.translator.push(&chunk, &mut batch)
                    }
                };
            state.emit(batch, result);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_lf_and_crlf_across_chunk_boundaries() {
        let mut s = EventSplitter::default();
        s.push(b"data: a\n");
        assert!(s.next_event().is_none());
        s.push(b"\ndata: b\r\n\r\ndata: c");
        assert_eq!(s.next_event().unwrap(), Bytes::from_static(b"data: a"));
        assert_eq!(s.next_event().unwrap(), Bytes::from_static(b"data: b"));
        assert!(s.next_event().is_none());
        assert_eq!(s.finish().unwrap(), Bytes::from_static(b"data: c"));
    }

    #[test]
    fn terminators_split_across_many_small_chunks_are_found() {
        let mut s = EventSplitter::default();
        let text = b"data: {\"a\":1}\r\n\r\ndata: x\n\n";
        let mut events = Vec::new();
        for byte in text {
            s.push(&[*byte]);
            while let Some(e) = s.next_event() {
                events.push(e);
            }
        }
        assert_eq!(
            events,
            [
                Bytes::from_static(b"data: {\"a\":1}"),
                Bytes::from_static(b"data: x")
            ]
        );
        assert!(s.finish().is_none());
    }

    #[test]
    fn data_lines_are_joined() {
        assert_eq!(
            data_of(b"event: x\ndata: {\"a\":\ndata:1}").unwrap(),
            "{\"a\":\n1}"
        );
        assert_eq!(data_of(b": keep-alive"), None);
    }

    #[test]
    fn the_splitter_overflows_past_its_own_limit_only() {
        let mut s = EventSplitter::new(10);
        s.push(b"data: 1234");
        assert!(s.next_event().is_none());
        assert!(!s.overflowed(), "exactly the limit");
        s.push(b"5");
        assert!(s.overflowed());
        let mut s = EventSplitter::new(10);
        s.push(b"data: 1\n\ndata: 2\n\n");
        while s.next_event().is_some() {}
        assert!(!s.overflowed(), "complete events do not count");
    }
}
