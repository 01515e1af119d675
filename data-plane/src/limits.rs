//! The data plane's limits (DESIGN §19): one place for every cap on what clients and upstreams
//! may send, each with its flag and env var. Safe defaults; the README's limits table lists them.

use std::time::Duration;

/// Default `--max-body-bytes` (DESIGN §16).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Every limit the data plane enforces, resolved from [`LimitFlags`] (or [`Limits::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most top-level members of a request body's JSON object; more get 400.
    pub max_top_level_keys: usize,
    /// Deadline for a client's whole request head (a byte-at-a-time trickle is cut too).
    pub header_read_timeout: Duration,
    /// Deadline for a client's whole request body.
    pub body_read_timeout: Duration,
    /// A kept-alive client connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Open client connections; one past it is accepted, answered 503 `overloaded` and closed.
    pub max_connections: usize,
    /// Requests being served at once (streams until their last byte); past it: 503 `overloaded`.
    pub max_in_flight: usize,
    /// Concurrent streams per HTTP/2 client connection.
    pub http2_max_streams: u32,
    /// Largest non-streamed upstream answer; larger is a 502 `upstream_invalid_response`.
    pub max_upstream_body_bytes: usize,
    /// Largest upstream stream event (an SSE event or an event-stream frame).
    pub max_stream_event_bytes: usize,
    /// Largest array index or count an upstream may send (choice and tool-call indexes).
    pub max_upstream_index: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_top_level_keys: 1000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            max_connections: 10_000,
            max_in_flight: 4096,
            http2_max_streams: 100,
            max_upstream_body_bytes: 64 * 1024 * 1024,
            max_stream_event_bytes: 16 * 1024 * 1024,
            max_upstream_index: 1024,
        }
    }
}

/// The limit flags, shared by `llm-proxy-data-plane` and `llmctl serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitFlags {
    /// Largest accepted request body in bytes; larger ones get 413.
    #[arg(long, env = "LLM_PROXY_DP_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Most top-level members of a request body's JSON object; more get 400.
    #[arg(long, env = "LLM_PROXY_DP_MAX_TOP_LEVEL_KEYS", default_value_t = 1000)]
    pub max_top_level_keys: usize,
    /// Seconds a client has to send its whole request head.
    #[arg(long, env = "LLM_PROXY_DP_HEADER_READ_TIMEOUT_S", default_value_t = 10)]
    pub header_read_timeout_s: u64,
    /// Seconds a client has to send its whole request body.
    #[arg(long, env = "LLM_PROXY_DP_BODY_READ_TIMEOUT_S", default_value_t = 60)]
    pub body_read_timeout_s: u64,
    /// Seconds a kept-alive client connection may wait for its next request.
    #[arg(long, env = "LLM_PROXY_DP_IDLE_TIMEOUT_S", default_value_t = 90)]
    pub idle_timeout_s: u64,
    /// Open client connections; past it a new one is answered 503 `overloaded` and closed.
    #[arg(long, env = "LLM_PROXY_DP_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Requests served at once (a stream counts until it ends); past it: 503 `overloaded`.
    #[arg(long, env = "LLM_PROXY_DP_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,
    /// Concurrent streams per HTTP/2 client connection.
    #[arg(long, env = "LLM_PROXY_DP_HTTP2_MAX_STREAMS", default_value_t = 100)]
    pub http2_max_streams: u32,
    /// Largest non-streamed upstream answer in bytes; larger is a 502.
    #[arg(long, env = "LLM_PROXY_DP_MAX_UPSTREAM_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_upstream_body_bytes: usize,
    /// Largest upstream stream event in bytes (an SSE event or an event-stream frame).
    #[arg(long, env = "LLM_PROXY_DP_MAX_STREAM_EVENT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_stream_event_bytes: usize,
    /// Largest array index an upstream may send (choice and tool-call indexes).
    #[arg(long, env = "LLM_PROXY_DP_MAX_UPSTREAM_INDEX", default_value_t = 1024)]
    pub max_upstream_index: u32,
}

/// A limit flag with a value that would refuse or cut everything.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: must be at least 1")]
pub struct LimitError {
    pub flag: &'static str,
}

impl LimitFlags {
    /// The limits, each checked to be at least 1 (0 would refuse or cut every request).
    pub fn limits(&self) -> Result<Limits, LimitError> {
        let positive = [
            ("max-body-bytes", self.max_body_bytes as u64),
            ("max-top-level-keys", self.max_top_level_keys as u64),
            ("header-read-timeout-s", self.header_read_timeout_s),
            ("body-read-timeout-s", self.body_read_timeout_s),
            ("idle-timeout-s", self.idle_timeout_s),
            ("max-connections", self.max_connections as u64),
            ("max-in-flight", self.max_in_flight as u64),
            ("http2-max-streams", u64::from(self.http2_max_streams)),
            (
                "max-upstream-body-bytes",
                self.max_upstream_body_bytes as u64,
            ),
            ("max-stream-event-bytes", self.max_stream_event_bytes as u64),
            ("max-upstream-index", u64::from(self.max_upstream_index)),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(LimitError { flag });
        }
        Ok(Limits {
            max_body_bytes: self.max_body_bytes,
            max_top_level_keys: self.max_top_level_keys,
            header_read_timeout: Duration::from_secs(self.header_read_timeout_s),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_s),
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
            max_connections: self.max_connections,
            max_in_flight: self.max_in_flight,
            http2_max_streams: self.http2_max_streams,
            max_upstream_body_bytes: self.max_upstream_body_bytes,
            max_stream_event_bytes: self.max_stream_event_bytes,
            max_upstream_index: self.max_upstream_index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        limits: LimitFlags,
    }

    #[test]
    fn defaults_match_and_zero_is_refused_by_name() {
        let flags = Flags::try_parse_from(["dp"]).unwrap();
        assert_eq!(flags.limits.limits().unwrap(), Limits::default());
        let flags = Flags::try_parse_from(["dp", "--max-in-flight", "0"]).unwrap();
        assert_eq!(
            flags.limits.limits().unwrap_err().to_string(),
            "invalid --max-in-flight: must be at least 1"
        );
    }
}
