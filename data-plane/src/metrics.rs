//! Prometheus metrics of the data plane (DESIGN §16), served on the metrics port.
//!
//! Label sets are bounded: aliases and providers come from the config (never from the client's
//! text), status is the exact HTTP status code the gateway answered (`429`, not `4xx`: a short
//! set, since the gateway answers few codes), and error kinds and decisions are fixed lists.
//! Requests refused before routing (no key, unknown alias) carry empty `alias` and `provider`;
//! a request refused by a rate limit carries the alias and the provider of the last target tried.

use crate::ratelimit::AnyLimiter;
use crate::sync::ConfigHandle;
use crate::usage::Usage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// `Content-Type` of the exposition: prometheus-client writes OpenMetrics text (`# EOF`, counters
/// typed without their `_total` suffix), which the classic text parser would misread.
pub const CONTENT_TYPE: &str = llm_proxy_telemetry::METRICS_CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub alias: Arc<str>,
    pub provider: &'static str,
    /// The exact HTTP status answered (DESIGN §16): operators alert on 429s and 401s separately.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub alias: Arc<str>,
    pub provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub alias: Arc<str>,
    pub provider: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub provider: &'static str,
    pub kind: &'static str,
}

/// Rate-limit decision results (`llm_proxy_ratelimit_decisions_total{result}`).
#[derive(Debug, Clone, Copy)]
pub enum LimitResult {
    Allowed,
    Limited,
    /// Shared limiter down with fail mode `closed`.
    Unavailable,
}

/// Why an upstream call failed (`llm_proxy_upstream_errors_total{kind}`).
#[derive(Debug, Clone, Copy)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    /// The upstream answered with an error status.
    Status4xx,
    Status5xx,
    /// Unreadable or untranslatable answer, or a broken stream.
    InvalidResponse,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
}

/// The front door's state (DESIGN §19): open connections, requests in flight, load shedding,
/// client timeouts, panics, and restarts of supervised background tasks. Clones share the series.
#[derive(Debug, Clone, Default)]
pub struct FrontDoorMetrics {
    /// Open client connections of the API port (the `--max-connections` count).
    pub open_connections: Gauge,
    /// Requests being served, streams until their last byte (the `--max-in-flight` count).
    pub in_flight: Gauge,
    /// Panics caught while serving a request or producing an answer.
    pub panics: Counter,
    shed: Family<ReasonLabels, Counter>,
    client_timeouts: Family<PhaseLabels, Counter>,
    task_restarts: Family<TaskLabels, Counter>,
}

impl FrontDoorMetrics {
    /// A connection past `--max-connections` was answered 503 and closed.
    pub fn shed_connection(&self) {
        self.shed
            .get_or_create(&ReasonLabels {
                reason: "connections",
            })
            .inc();
    }

    /// A request past `--max-in-flight` was answered 503.
    pub fn shed_request(&self) {
        self.shed
            .get_or_create(&ReasonLabels {
                reason: "in_flight",
            })
            .inc();
    }

    /// A client connection or request cut at a deadline: `header`, `body` or `idle`.
    pub fn client_timeout(&self, phase: &'static str) {
        self.client_timeouts
            .get_or_create(&PhaseLabels { phase })
            .inc();
    }

    /// A supervised background task ended unexpectedly and was restarted.
    pub fn task_restart(&self, task: &'static str) {
        self.task_restarts.get_or_create(&TaskLabels { task }).inc();
    }

    #[cfg(test)]
    pub(crate) fn register_for_tests(&self, registry: &mut Registry) {
        self.register(registry);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "llm_proxy_open_connections",
            "Open client connections on the API port",
            self.open_connections.clone(),
        );
        registry.register(
            "llm_proxy_in_flight_requests",
            "Requests being served (a stream until its last byte)",
            self.in_flight.clone(),
        );
        registry.register(
            "llm_proxy_panics",
            "Panics caught while serving a request; the process served on",
            self.panics.clone(),
        );
        registry.register(
            "llm_proxy_load_shed",
            "Connections and requests answered 503 overloaded, by reason (connections, in_flight)",
            self.shed.clone(),
        );
        registry.register(
            "llm_proxy_client_timeouts",
            "Client connections or requests cut at a deadline, by phase (header, body, idle)",
            self.client_timeouts.clone(),
        );
        registry.register(
            "llm_proxy_task_restarts",
            "Background tasks restarted after they ended unexpectedly, by task",
            self.task_restarts.clone(),
        );
    }
}

/// A cost in pico-USD as the counter's float USD.
fn usd_of(pico_usd: u128) -> f64 {
    #[allow(
        clippy::cast_precision_loss,
        reason = "a dashboard figure: f64 holds any single request's cost to far below a micro-USD"
    )]
    let usd = pico_usd as f64 / 1e12;
    usd
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The series of one route (alias × provider) that every answered request updates, each made on
/// first use (as a family lookup would make it) and then updated without a lookup: a lookup
/// hashes the labels and takes the family's lock, and a request made seven of them. Held by the
/// config index's routes, so made per index; the handles share the series of the families.
#[derive(Debug)]
pub struct RouteMetrics {
    alias: Arc<str>,
    provider: &'static str,
    answered_ok: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
    prompt_tokens: OnceLock<Counter>,
    completion_tokens: OnceLock<Counter>,
    cost_usd: OnceLock<Counter<f64, AtomicU64>>,
}

impl RouteMetrics {
    pub fn new(alias: Arc<str>, provider: &'static str) -> Self {
        Self {
            alias,
            provider,
            answered_ok: OnceLock::new(),
            duration: OnceLock::new(),
            upstream_duration: OnceLock::new(),
            prompt_tokens: OnceLock::new(),
            completion_tokens: OnceLock::new(),
            cost_usd: OnceLock::new(),
        }
    }

    fn labels(&self) -> RouteLabels {
        RouteLabels {
            alias: self.alias.clone(),
            provider: self.provider,
        }
    }

    fn tokens<'a>(
        &'a self,
        slot: &'a OnceLock<Counter>,
        metrics: &Metrics,
        kind: &'static str,
    ) -> &'a Counter {
        slot.get_or_init(|| {
            metrics
                .tokens
                .get_or_create(&TokenLabels {
                    alias: self.alias.clone(),
                    provider: self.provider,
                    kind,
                })
                .clone()
        })
    }
}

fn latency_buckets() -> Histogram {
    // LLM calls: tens of milliseconds to minutes.
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ])
}

fn overhead_buckets() -> Histogram {
    // The gateway's own share: microseconds to milliseconds.
    Histogram::new([
        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
        0.1,
    ])
}

/// Every data plane metric; clones share the series.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The `alias` label of requests refused before routing.
    pub no_alias: Arc<str>,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    upstream_duration: HistogramFamily<ProviderLabels>,
    overhead: Histogram,
    time_to_first_token: HistogramFamily<RouteLabels>,
    tokens: Family<TokenLabels, Counter>,
    cost_usd: Family<RouteLabels, Counter<f64, AtomicU64>>,
    ratelimit_decisions: Family<DecisionLabels, Counter>,
    /// The series of `ratelimit_decisions` by [`LimitResult`], made on first use.
    decisions: Arc<[OnceLock<Counter>; 3]>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    usage_dropped: Counter,
    usage_batches: Family<UsageBatchLabels, Counter>,
    pub front_door: FrontDoorMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageBatchLabels {
    result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            no_alias: Arc::from(""),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_buckets),
            upstream_duration: Family::new_with_constructor(latency_buckets),
            overhead: overhead_buckets(),
            time_to_first_token: Family::new_with_constructor(latency_buckets),
            tokens: Family::default(),
            cost_usd: Family::default(),
            ratelimit_decisions: Family::default(),
            decisions: Arc::default(),
            upstream_errors: Family::default(),
            usage_dropped: Counter::default(),
            usage_batches: Family::default(),
            front_door: FrontDoorMetrics::default(),
        }
    }

    /// One finished request (the head of the answer is out).
    pub fn request(
        &self,
        alias: &Arc<str>,
        provider: &'static str,
        status: u16,
        duration: Duration,
        upstream: Option<Duration>,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                alias: alias.clone(),
                provider,
                status,
            })
            .inc();
        if provider.is_empty() {
            return;
        }
        self.request_duration
            .get_or_create(&RouteLabels {
                alias: alias.clone(),
                provider,
            })
            .observe(duration.as_secs_f64());
        if let Some(upstream) = upstream {
            self.upstream_duration
                .get_or_create(&ProviderLabels { provider })
                .observe(upstream.as_secs_f64());
            self.overhead
                .observe(duration.saturating_sub(upstream).as_secs_f64());
        }
    }

    /// [`Self::request`] of a routed request, through its route's handles.
    pub fn routed_request(
        &self,
        route: &RouteMetrics,
        status: u16,
        duration: Duration,
        upstream: Option<Duration>,
    ) {
        if status != 200 {
            return self.request(&route.alias, route.provider, status, duration, upstream);
        }
        route
            .answered_ok
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        alias: route.alias.clone(),
                        provider: route.provider,
                        status,
                    })
                    .clone()
            })
            .inc();
        route
            .duration
            .get_or_init(|| self.request_duration.get_or_create(&route.labels()).clone())
            .observe(duration.as_secs_f64());
        if let Some(upstream) = upstream {
            route
                .upstream_duration
                .get_or_init(|| {
                    self.upstream_duration
                        .get_or_create(&ProviderLabels {
                            provider: route.provider,
                        })
                        .clone()
                })
                .observe(upstream.as_secs_f64());
            self.overhead
                .observe(duration.saturating_sub(upstream).as_secs_f64());
        }
    }

    /// [`Self::tokens`] and [`Self::cost`] (with `pico_usd`) of a routed answer, through its
    /// route's handles.
    pub fn routed_usage(&self, route: &RouteMetrics, usage: &Usage, pico_usd: Option<u128>) {
        route
            .tokens(&route.prompt_tokens, self, "prompt")
            .inc_by(usage.prompt_tokens);
        route
            .tokens(&route.completion_tokens, self, "completion")
            .inc_by(usage.completion_tokens);
        let subsets = [
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
            ("reasoning", usage.reasoning_tokens),
        ];
        for (kind, count) in subsets {
            if count > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        alias: route.alias.clone(),
                        provider: route.provider,
                        kind,
                    })
                    .inc_by(count);
            }
        }
        if let Some(pico_usd) = pico_usd {
            route
                .cost_usd
                .get_or_init(|| self.cost_usd.get_or_create(&route.labels()).clone())
                .inc_by(usd_of(pico_usd));
        }
    }

    pub fn time_to_first_token(&self, alias: &Arc<str>, provider: &'static str, time: Duration) {
        self.time_to_first_token
            .get_or_create(&RouteLabels {
                alias: alias.clone(),
                provider,
            })
            .observe(time.as_secs_f64());
    }

    /// Counts one answer's tokens by kind (DESIGN §18). `prompt` and `completion` (every token,
    /// cached or reasoning included) are counted on every answer with usage; their subsets
    /// `cache_read`, `cache_write` (of prompt) and `reasoning` (of completion) only when the
    /// answer had some, so that an alias whose provider never reports a kind exports no series
    /// of it (a missing series says "never reported", not "reported zero").
    pub fn tokens(&self, alias: &Arc<str>, provider: &'static str, usage: &Usage) {
        let kinds = [
            ("prompt", usage.prompt_tokens, true),
            ("completion", usage.completion_tokens, true),
            ("cache_read", usage.cache_read_tokens, false),
            ("cache_write", usage.cache_write_tokens, false),
            ("reasoning", usage.reasoning_tokens, false),
        ];
        for (kind, count, always) in kinds {
            if always || count > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        alias: alias.clone(),
                        provider,
                        kind,
                    })
                    .inc_by(count);
            }
        }
    }

    /// The cost of one answer (DESIGN §18), exact in pico-USD until this float counter: the
    /// accounting of record is the control plane's, this is for dashboards.
    pub fn cost(&self, alias: &Arc<str>, provider: &'static str, pico_usd: u128) {
        let usd = usd_of(pico_usd);
        self.cost_usd
            .get_or_create(&RouteLabels {
                alias: alias.clone(),
                provider,
            })
            .inc_by(usd);
    }

    pub fn ratelimit_decision(&self, result: LimitResult) {
        let slot = &self.decisions[result as usize];
        slot.get_or_init(|| {
            let result = match result {
                LimitResult::Allowed => "allowed",
                LimitResult::Limited => "limited",
                LimitResult::Unavailable => "unavailable",
            };
            self.ratelimit_decisions
                .get_or_create(&DecisionLabels { result })
                .clone()
        })
        .inc();
    }

    pub fn upstream_error(&self, provider: &'static str, kind: UpstreamErrorKind) {
        let kind = match kind {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Status4xx => "status_4xx",
            UpstreamErrorKind::Status5xx => "status_5xx",
            UpstreamErrorKind::InvalidResponse => "invalid_response",
        };
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels { provider, kind })
            .inc();
    }

    /// Usage rows dropped from a full queue (or refused by the control plane).
    pub fn usage_dropped(&self, rows: u64) {
        self.usage_dropped.inc_by(rows);
    }

    pub fn usage_dropped_total(&self) -> u64 {
        self.usage_dropped.get()
    }

    /// One `ReportUsage` call by result: `sent`, `duplicate` or `failed`.
    pub fn usage_batch(&self, result: &'static str) {
        self.usage_batches
            .get_or_create(&UsageBatchLabels { result })
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "llm_proxy_usage_dropped",
            "Usage rows dropped before the control plane acknowledged them (queue full, or refused)",
            self.usage_dropped.clone(),
        );
        registry.register(
            "llm_proxy_usage_batches",
            "ReportUsage calls by result (sent, duplicate, failed)",
            self.usage_batches.clone(),
        );
        registry.register(
            "llm_proxy_requests",
            "Requests answered, by alias, provider and exact HTTP status code",
            self.requests.clone(),
        );
        registry.register(
            "llm_proxy_request_duration_seconds",
            "Time from the request to the head of the answer (streams: to the first bytes)",
            self.request_duration.clone(),
        );
        registry.register(
            "llm_proxy_upstream_duration_seconds",
            "Time the upstream took: to its whole answer, or to the head of a stream",
            self.upstream_duration.clone(),
        );
        registry.register(
            "llm_proxy_overhead_seconds",
            "Time the gateway added to a routed request (request duration minus upstream time)",
            self.overhead.clone(),
        );
        registry.register(
            "llm_proxy_time_to_first_token_seconds",
            "Streams: time from the request to the first bytes of the answer sent to the client",
            self.time_to_first_token.clone(),
        );
        registry.register(
            "llm_proxy_tokens",
            "Tokens reported by upstreams, by kind: prompt and completion (all of them), and their parts cache_read, cache_write (of prompt) and reasoning (of completion), a part's series appearing with its first nonzero count",
            self.tokens.clone(),
        );
        registry.register(
            "llm_proxy_cost_usd",
            "Cost of upstream answers in USD from the provider model's prices (models without prices add nothing)",
            self.cost_usd.clone(),
        );
        registry.register(
            "llm_proxy_ratelimit_decisions",
            "Rate-limit decisions by result (allowed, limited, unavailable)",
            self.ratelimit_decisions.clone(),
        );
        registry.register(
            "llm_proxy_upstream_errors",
            "Failed upstream calls by kind (connect, timeout, status_4xx, status_5xx, invalid_response)",
            self.upstream_errors.clone(),
        );
        self.front_door.register(registry);
    }

    /// The Prometheus text exposition of the request metrics, config state and limiter state.
    pub fn render(&self, config: &ConfigHandle, limiter: &AnyLimiter) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        config.register_metrics(&mut registry);
        if let AnyLimiter::Redis(redis) = limiter {
            let stats = redis.stats();
            let counter = |value: u64| {
                let c: Counter = Counter::default();
                c.inc_by(value);
                c
            };
            registry.register(
                "llm_proxy_redis_errors",
                "Redis limiter calls that failed or ran over their time budget",
                counter(stats.redis_errors),
            );
            registry.register(
                "llm_proxy_ratelimit_fallback_decisions",
                "Rate-limit decisions made by the fail mode instead of Redis",
                counter(stats.fallback_decisions),
            );
            registry.register(
                "llm_proxy_ratelimit_mode_switches",
                "Switches between Redis and the fail mode (either way)",
                counter(stats.mode_switches),
            );
            let live: Gauge = Gauge::default();
            live.set(config.live_data_planes());
            registry.register(
                "llm_proxy_ratelimit_live_data_planes",
                "Live data planes the control plane last reported; the `local` fail mode divides each limit by it",
                live,
            );
            let degraded: Gauge = Gauge::default();
            degraded.set(i64::from(redis.is_degraded()));
            registry.register(
                "llm_proxy_ratelimit_degraded",
                "1 while the Redis limiter answers from its fail mode",
                degraded,
            );
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sorted `llm_proxy_tokens_total` lines of the exposition.
    fn token_lines(metrics: &Metrics) -> Vec<String> {
        let mut lines = sample_lines(metrics);
        lines.retain(|l| l.starts_with("llm_proxy_tokens_total{"));
        lines
    }

    /// The sorted sample lines of the whole exposition (without `_created` times).
    fn sample_lines(metrics: &Metrics) -> Vec<String> {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        let mut lines: Vec<String> = out
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_created"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_routes_handles_update_the_series_a_lookup_would() {
        let by_lookup = Metrics::new();
        let by_route = Metrics::new();
        let alias: Arc<str> = Arc::from("chat");
        let route = RouteMetrics::new(alias.clone(), "anthropic");
        let cached = Usage {
            prompt_tokens: 1036,
            completion_tokens: 100,
            total_tokens: 1136,
            cache_read_tokens: 1024,
            reasoning_tokens: 7,
            ..Usage::default()
        };
        for (status, upstream, usage, cost) in [
            (200, Some(3), Usage::default(), None),
            (200, None, cached, Some(4_097_291_705_200)),
            (429, None, Usage::default(), None),
            (200, Some(1), cached, Some(1)),
            (502, Some(2), Usage::default(), None),
        ] {
            let duration = Duration::from_millis(5);
            let upstream = upstream.map(Duration::from_millis);
            by_lookup.request(&alias, "anthropic", status, duration, upstream);
            by_route.routed_request(&route, status, duration, upstream);
            if status == 200 {
                by_lookup.tokens(&alias, "anthropic", &usage);
                if let Some(cost) = cost {
                    by_lookup.cost(&alias, "anthropic", cost);
                }
                by_route.routed_usage(&route, &usage, cost);
            }
        }
        for result in [
            LimitResult::Allowed,
            LimitResult::Limited,
            LimitResult::Allowed,
        ] {
            by_lookup.ratelimit_decision(result);
            by_route.ratelimit_decision(result);
        }
        let lines = sample_lines(&by_route);
        assert_eq!(lines, sample_lines(&by_lookup));
        assert!(
            lines.contains(
                &r#"llm_proxy_requests_total{alias="chat",provider="anthropic",status="200"} 3"#
                    .to_owned()
            )
        );
        assert!(lines.contains(
            &r#"llm_proxy_tokens_total{alias="chat",provider="anthropic",kind="cache_read"} 2048"#
                .to_owned()
        ));
        assert!(
            lines
                .contains(&r#"llm_proxy_ratelimit_decisions_total{result="allowed"} 2"#.to_owned())
        );
        // Series appear on first use only, as with lookups.
        assert!(!lines.iter().any(|l| l.contains("unavailable")));
    }

    #[test]
    fn token_kinds_are_counted_and_parts_appear_once_reported() {
        let metrics = Metrics::new();
        let alias: Arc<str> = Arc::from("chat");
        let plain = Usage {
            prompt_tokens: 8,
            completion_tokens: 9,
            total_tokens: 17,
            ..Usage::default()
        };
        metrics.tokens(&alias, "openai", &plain);
        assert_eq!(
            token_lines(&metrics),
            [
                r#"llm_proxy_tokens_total{alias="chat",provider="openai",kind="completion"} 9"#,
                r#"llm_proxy_tokens_total{alias="chat",provider="openai",kind="prompt"} 8"#,
            ]
        );
        // Even an answer of zero tokens has its prompt and completion series.
        metrics.tokens(&Arc::from("empty"), "openai", &Usage::default());
        metrics.tokens(
            &alias,
            "openai",
            &Usage {
                prompt_tokens: 1036,
                completion_tokens: 100,
                total_tokens: 1136,
                cache_read_tokens: 1024,
                cache_write_tokens: 6,
                reasoning_tokens: 64,
            },
        );
        assert_eq!(
            token_lines(&metrics),
            [
                r#"llm_proxy_tokens_total{alias="chat",provider="openai",kind="cache_read"} 1024"#,
                r#"llm_proxy_tokens_total{alias="chat",provider="openai",kind="cache_write"} 6"#,
                r#"llm_proxy_tokens_total{alias="chat",provider="openai",kind="completion"} 109"#,
                r#"llm_proxy_tokens_total{alias="chat",provider="openai",kind="prompt"} 1044"#,
                r#"llm_proxy_tokens_total{alias="chat",provider="openai",kind="reasoning"} 64"#,
                r#"llm_proxy_tokens_total{alias="empty",provider="openai",kind="completion"} 0"#,
                r#"llm_proxy_tokens_total{alias="empty",provider="openai",kind="prompt"} 0"#,
            ]
        );
    }

    #[test]
    fn requests_are_counted_by_exact_status_code() {
        let metrics = Metrics::new();
        let chat: Arc<str> = Arc::from("chat");
        for status in [200, 200, 429, 401, 404] {
            metrics.request(&chat, "openai", status, Duration::from_millis(5), None);
        }
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for (status, count) in [("200", 2), ("429", 1), ("401", 1), ("404", 1)] {
            let series = format!(
                "llm_proxy_requests_total{{alias=\"chat\",provider=\"openai\",status=\"{status}\"}} {count}\n"
            );
            assert!(text.contains(&series), "{series} missing in:\n{text}");
        }
        assert!(!text.contains("xx\""), "a status class in:\n{text}");
        assert!(
            text.contains(
                "# HELP llm_proxy_requests Requests answered, by alias, provider and exact HTTP status code.\n"
            ),
            "{text}"
        );
    }
}
