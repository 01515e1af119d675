//! Server-sent events: splitting an upstream byte stream into events, and the relay that passes
//! chat-completion chunks to the client as they arrive.
//!
//! The relay loop (idle timeout, broken upstreams, the end-of-stream hook) is shared; what becomes
//! of the upstream's bytes is a [`StreamTranslator`]'s business. OpenAI-format events are relayed
//! byte for byte: [`OpenAiPassthrough`] only reads each chunk's `choices`/`usage` to count tokens
//! and to drop two kinds of chunks OpenAI clients do not expect: the usage chunk the gateway asked
//! for when the client did not, and Azure's content-filter-only chunks (`choices: []`).

use crate::errors::ApiError;
use crate::providers::Usage;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use serde::Deserialize;
use serde::de::IgnoredAny;
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

    /// The next complete event (without its terminating blank line).
    pub fn next_event(&mut self) -> Option<Bytes> {
        let buf = &self.buffer[..];
        let mut i = self.scanned;
        while i + 1 < buf.len() {
            if buf[i] == b'\n' {
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
            i += 1;
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

#[derive(Deserialize)]
struct ChunkProbe {
    choices: Option<Vec<IgnoredAny>>,
    usage: Option<Usage>,
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
}

/// OpenAI-format upstreams (OpenAI, Azure): events pass through byte for byte, except the usage
/// chunk the gateway asked for when the client did not, and Azure's content-filter-only chunks.
#[derive(Debug)]
pub struct OpenAiPassthrough {
    provider: &'static str,
    splitter: EventSplitter,
    client_wants_usage: bool,
    usage: Option<Usage>,
    completed: bool,
}

impl OpenAiPassthrough {
    pub fn new(provider: &'static str, client_wants_usage: bool) -> Self {
        Self {
            provider,
            splitter: EventSplitter::default(),
            client_wants_usage,
            usage: None,
            completed: false,
        }
    }

    /// Refuses upstream events larger than `max_event_bytes` (default [`MAX_EVENT_BYTES`]).
    pub fn with_max_event_bytes(mut self, max_event_bytes: usize) -> Self {
        self.splitter = EventSplitter::new(max_event_bytes);
        self
    }

    /// Decides what of one event reaches the client.
    fn relay_event(&mut self, event: &Bytes, out: &mut BytesMut) {
        let keep = match data_of(event) {
            Some(data) if data.trim() == "[DONE]" => {
                // Nothing follows [DONE]; do not wait for the upstream to close.
                self.completed = true;
                true
            }
            Some(data) => match serde_json::from_str::<ChunkProbe>(&data) {
                Ok(probe) => {
                    if probe.usage.is_some() {
                        self.usage = probe.usage;
                    }
                    let no_choices = probe.choices.as_ref().is_some_and(Vec::is_empty);
                    !(no_choices && (probe.usage.is_none() || !self.client_wants_usage))
                }
                // Not a chunk we understand (e.g. an error object): pass it on untouched.
                Err(_) => true,
            },
            // Comments and keep-alives.
            None => true,
        };
        if keep {
            out.extend_from_slice(event);
            out.extend_from_slice(b"\n\n");
        }
    }
}

impl StreamTranslator for OpenAiPassthrough {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        self.splitter.push(chunk);
        while !self.completed
            && let Some(event) = self.splitter.next_event()
        {
            self.relay_event(&event, out);
        }
        if !self.completed && self.splitter.overflowed() {
            return Err(event_too_large(
                self.provider,
                self.splitter.max_event_bytes(),
            ));
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        if let Some(rest) = self.splitter.finish() {
            self.relay_event(&rest, out);
        }
        if !self.completed {
            // The client must not take a cut answer for a whole one (DESIGN §19).
            return Err(stream_truncated(self.provider, "[DONE]"));
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.completed
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
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
        write_data(&mut event, error.body_json().as_bytes());
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
                    Ok(Some(chunk)) => state.translator.push(&chunk, &mut batch),
                };
            state.emit(batch, result);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    type StreamOutcome = Option<(Option<Usage>, bool)>;

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<StreamOutcome>>);
    impl StreamEnd for Recorder {
        fn finished(self: Box<Self>, usage: Option<Usage>, completed: bool) {
            *self.0.lock().unwrap() = Some((usage, completed));
        }
    }

    async fn run(
        chunks: Vec<&'static str>,
        wants_usage: bool,
    ) -> (String, Option<(Option<Usage>, bool)>) {
        let upstream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes()))),
        );
        let recorder = Recorder::default();
        let out: Vec<_> = relay(
            upstream,
            OpenAiPassthrough::new("openai", wants_usage),
            Duration::from_secs(5),
            "openai",
            Box::new(recorder.clone()),
        )
        .collect()
        .await;
        let text: String = out
            .into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect();
        let end = *recorder.0.lock().unwrap();
        (text, end)
    }

    const USAGE_CHUNK: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n";

    #[tokio::test]
    async fn usage_chunk_is_kept_when_asked_and_dropped_otherwise() {
        let chunks = vec![
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            USAGE_CHUNK,
            "data: [DONE]\n\n",
        ];
        let (text, end) = run(chunks.clone(), true).await;
        assert!(text.contains("\"total_tokens\":7"));
        assert_eq!(end.unwrap().0.unwrap().total(), 7);
        assert!(end.unwrap().1, "completed");
        let (text, end) = run(chunks, false).await;
        assert!(!text.contains("total_tokens"), "{text}");
        assert!(text.contains("\"content\":\"Hi\"") && text.ends_with("data: [DONE]\n\n"));
        assert_eq!(end.unwrap().0.unwrap().total(), 7, "usage still counted");
    }

    #[tokio::test]
    async fn the_relay_ends_at_done_even_if_the_upstream_stays_open() {
        let upstream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
            Bytes::from_static(b"data: {\"choices\":[{\"index\":0}]}\n\ndata: [DONE]\n\n"),
        )])
        .chain(futures_util::stream::pending());
        let recorder = Recorder::default();
        let relayed = relay(
            Box::pin(upstream),
            OpenAiPassthrough::new("openai", false),
            Duration::from_secs(3600),
            "openai",
            Box::new(recorder.clone()),
        );
        let out: Vec<_> =
            tokio::time::timeout(Duration::from_secs(30), relayed.collect::<Vec<_>>())
                .await
                .expect("relay waited for the upstream after [DONE]");
        assert_eq!(out.len(), 1);
        assert_eq!(*recorder.0.lock().unwrap(), Some((None, true)));
    }

    #[tokio::test]
    async fn azure_filter_only_chunks_are_dropped() {
        let chunks = vec![
            "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n",
            "data: {\"choices\":[{\"content_filter_results\":{},\"delta\":{\"content\":\"Hello\",\"role\":\"assistant\"},\"finish_reason\":null,\"index\":0}],\"id\":\"chatcmpl-1\"}\n\n",
            "data: [DONE]\n\n",
        ];
        let (text, _) = run(chunks, false).await;
        assert!(!text.contains("prompt_filter_results"), "{text}");
        assert!(text.starts_with("data: {\"choices\":[{\"content_filter_results\""));
    }

    /// The `error` object of the last event of a client stream.
    fn final_error(text: &str) -> serde_json::Value {
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        let data = last.strip_prefix("data: ").unwrap();
        let value: serde_json::Value = serde_json::from_str(data).unwrap();
        value["error"].clone()
    }

    #[tokio::test]
    async fn a_stream_that_ends_without_done_gets_a_final_error_event() {
        let (text, end) = run(
            vec![
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
                USAGE_CHUNK,
            ],
            true,
        )
        .await;
        assert!(text.contains("\"content\":\"Hi\""), "{text}");
        assert!(!text.contains("data: [DONE]"), "{text}");
        let error = final_error(&text);
        assert_eq!(error["code"], "upstream_invalid_response", "{text}");
        assert!(
            error["message"].as_str().unwrap().contains("[DONE]"),
            "{error}"
        );
        let (usage, completed) = end.unwrap();
        assert_eq!(usage.unwrap().total(), 7, "the usage seen still counts");
        assert!(!completed);
    }

    #[tokio::test]
    async fn an_event_over_the_limit_ends_the_stream_and_stops_reading_the_upstream() {
        // An endless event without a terminator, 1 KiB at a time.
        let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = pulled.clone();
        let upstream = futures_util::stream::iter(std::iter::once(Bytes::from_static(b"data: ")))
            .chain(futures_util::stream::repeat_with(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Bytes::from(vec![b'a'; 1024])
            }))
            .map(Ok::<_, std::io::Error>);
        let recorder = Recorder::default();
        let out: Vec<_> = relay(
            Box::pin(upstream),
            OpenAiPassthrough::new("openai", false).with_max_event_bytes(64 * 1024),
            Duration::from_secs(5),
            "openai",
            Box::new(recorder.clone()),
        )
        .collect()
        .await;
        let text: String = out
            .into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect();
        let error = final_error(&text);
        assert_eq!(error["code"], "upstream_invalid_response", "{text}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("65536 bytes (--max-stream-event-bytes)"),
            "{error}"
        );
        assert_eq!(
            pulled.load(std::sync::atomic::Ordering::Relaxed),
            64,
            "read up to the limit, then no further"
        );
        assert_eq!(*recorder.0.lock().unwrap(), Some((None, false)));
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

    #[tokio::test]
    async fn a_broken_upstream_ends_with_an_error_event() {
        let upstream = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(
                b"data: {\"choices\":[{\"index\":0}]}\n\n",
            )),
            Err(std::io::Error::other("connection reset")),
        ]);
        let recorder = Recorder::default();
        let out: Vec<_> = relay(
            upstream,
            OpenAiPassthrough::new("openai", false),
            Duration::from_secs(5),
            "openai",
            Box::new(recorder.clone()),
        )
        .collect()
        .await;
        let last = String::from_utf8(out.last().unwrap().as_ref().unwrap().to_vec()).unwrap();
        assert!(last.starts_with("data: {\"error\":"), "{last}");
        assert!(last.contains("connection reset"));
        assert_eq!(*recorder.0.lock().unwrap(), Some((None, false)));
    }
}
