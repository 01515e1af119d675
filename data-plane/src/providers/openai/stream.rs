//! OpenAI-format streams (OpenAI, Azure): events pass through byte for byte. The translator only
//! reads each chunk's `choices`/`usage` to count tokens and to drop two kinds of chunks OpenAI
//! clients do not expect: the usage chunk the gateway asked for when the client did not, and
//! Azure's content-filter-only chunks (`choices: []`).

use crate::errors::ApiError;
use crate::sse::{EventSplitter, StreamTranslator, data_of, event_too_large, stream_truncated};
use crate::usage::{OpenAiUsage, Usage};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::IgnoredAny;

#[derive(Deserialize)]
struct ChunkProbe {
    choices: Option<Vec<IgnoredAny>>,
    usage: Option<OpenAiUsage>,
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

    /// Refuses upstream events larger than `max_event_bytes` (default [`crate::sse::MAX_EVENT_BYTES`]).
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
                    if let Some(usage) = probe.usage {
                        self.usage = Some(usage.into());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{StreamEnd, relay};
    use futures_util::StreamExt as _;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

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
    async fn the_usage_chunk_gives_every_kind() {
        // wire formats §1.8: a gpt-5 stream's usage chunk, with a cache hit added.
        let chunks = vec![
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1036,\"completion_tokens\":100,\"total_tokens\":1136,\"prompt_tokens_details\":{\"cached_tokens\":1024,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":64,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}},\"obfuscation\":\"t9\"}\n\n",
            "data: [DONE]\n\n",
        ];
        let (_, end) = run(chunks, false).await;
        assert_eq!(
            end,
            Some((
                Some(Usage {
                    prompt_tokens: 1036,
                    completion_tokens: 100,
                    total_tokens: 1136,
                    cache_read_tokens: 1024,
                    cache_write_tokens: 0,
                    reasoning_tokens: 64,
                }),
                true
            ))
        );
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
