//! The OpenAI-compatible HTTP API (DESIGN §8): authenticate, route, rate-limit, call the upstream
//! through its adapter, and relay the answer.

use crate::body::{self, ParsedRequest};
use crate::budget::{BudgetReservation, Budgets};
use crate::cost::Prices;
use crate::errors::ApiError;
use crate::inbound::{InboundDialect, InboundRequest};
use crate::index::{ConfigIndex, ConnectionEntry, KeyEntry, Target, UsageTarget};
use crate::limits::Limits;
use crate::metrics::{LimitResult, Metrics, RouteMetrics, UpstreamErrorKind};
use crate::providers::capped::{self, CappedReadError};
use crate::providers::{self, CallContext, Operation, Upstreams};
use crate::ratelimit::{AnyLimiter, Decision, LimitSpec, RateLimiter as _, Reservation};
use crate::sse::StreamEnd;
use crate::sync::ConfigHandle;
use crate::trace::TraceContext;
use crate::upstream_http::{UpstreamHttp, UpstreamResponse};
use crate::usage::Usage;
use crate::usage_report::UsageAggregator;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use llm_proxy_catalog::Provider;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::Instrument as _;
use tracing::field::Empty;

/// Tokens reserved for the answer when the request sets no `max_tokens` (TPM limits only).
const DEFAULT_OUTPUT_TOKEN_ESTIMATE: u64 = 1024;

#[derive(Clone)]
pub struct AppState {
    /// Set while the data plane drains before shutdown: answers carry `Connection: close`.
    pub draining: Arc<AtomicBool>,
    pub config: Arc<ConfigHandle>,
    pub limiter: Arc<AnyLimiter>,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Usage per (virtual key, assignment, hour), shipped to the control plane (DESIGN §18).
    pub usage: Arc<UsageAggregator>,
    /// The budget counters of virtual keys (DESIGN §18).
    pub budgets: Arc<Budgets>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("limits", &self.limits)
            .finish()
    }
}

/// The shared upstream client: keep-alive pools, connect timeout; per-call timeouts come from the
/// connection (`timeout_s`).
pub fn upstream_client() -> Result<reqwest::Client, reqwest::Error> {
    use crate::upstream_http::{CONNECT_TIMEOUT, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST};
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        // A redirect would carry provider credentials (e.g. Azure's `api-key`) to another host
        // and turn POSTs into GETs; a 3xx answer becomes a 502 instead.
        .redirect(reqwest::redirect::Policy::none())
        // No retries inside the client: the gateway decides (failover to the pool's next target
        // on a connect error or a 5xx). Off also spares every call the request copy (headers,
        // extensions) the retry layer makes up front in case it retries.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .tcp_nodelay(true)
        .build()
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/responses", post(responses))
        .route("/responses", post(responses))
        .route(
            "/v1/responses/{id}",
            get(response_by_id).delete(response_by_id),
        )
        .route(
            "/responses/{id}",
            get(response_by_id).delete(response_by_id),
        )
        .route("/v1/responses/{id}/input_items", get(response_input_items))
        .route("/responses/{id}/input_items", get(response_input_items))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route(
            "/openai/deployments/{alias}/chat/completions",
            post(azure_chat),
        )
        .route(
            "/openai/deployments/{alias}/embeddings",
            post(azure_embeddings),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The POST routes every inference request takes, served by the front door without the router
/// ([`crate::front_door::HotRoutes`]); the router serves the same paths the same way.
pub struct HotRoutes(pub AppState);

impl HotRoutes {
    /// The inbound request of a hot path, as `chat`, `messages` and `responses` make it.
    fn inbound(path: &str) -> Option<InboundRequest> {
        match path {
            "/v1/chat/completions" => Some(InboundRequest::openai(Operation::ChatCompletions)),
            "/v1/messages" => Some(InboundRequest::anthropic(Operation::Messages)),
            "/v1/responses" => Some(InboundRequest::responses()),
            _ => None,
        }
    }
}

impl crate::front_door::HotRoutes for HotRoutes {
    fn takes(&self, method: &Method, path: &str) -> bool {
        method == Method::POST && Self::inbound(path).is_some()
    }

    fn call(&self, request: Request) -> futures_util::future::BoxFuture<'static, Response> {
        let Some(inbound) = Self::inbound(request.uri().path()) else {
            // Not taken (see `takes`): the router's answer for an unknown path.
            return Box::pin(std::future::ready(with_request_id(
                request.headers(),
                unknown_path(),
            )));
        };
        let (parts, body) = request.into_parts();
        Box::pin(handle(self.0.clone(), parts.headers, body, inbound))
    }
}

/// An answer outside the request handlers, with the `x-request-id` every answer carries.
fn with_request_id(headers: &HeaderMap, response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response
        .headers_mut()
        .insert(X_REQUEST_ID, request_id(headers));
    response
}

async fn not_found(headers: HeaderMap) -> Response {
    with_request_id(&headers, unknown_path())
}

fn unknown_path() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown path; the gateway serves /v1/chat/completions, /v1/embeddings, /v1/messages, /v1/messages/count_tokens, /v1/responses and /v1/models",
    )
    .with_code("unknown_url")
}

async fn method_not_allowed(headers: HeaderMap) -> Response {
    with_request_id(&headers, wrong_method())
}

fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed: chat, embeddings, messages and responses take POST, models takes GET, a stored response GET or DELETE",
    )
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The caller's key. OpenAI routes: `Authorization: Bearer`, else `api-key`, else
/// `x-goog-api-key`. Anthropic routes: `x-api-key` (Claude Code), else as OpenAI routes (the
/// current anthropic SDK sends Bearer).
fn presented_key(headers: &HeaderMap, dialect: InboundDialect) -> Option<&str> {
    if dialect == InboundDialect::Anthropic
        && let Some(key) = headers.get(X_API_KEY).and_then(|v| v.to_str().ok())
    {
        return Some(key.trim());
    }
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let value = value.trim();
        if let Some(key) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        {
            return Some(key.trim());
        }
    }
    [API_KEY, X_GOOG_API_KEY]
        .into_iter()
        .find_map(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

fn authenticate<'a>(
    index: &'a ConfigIndex,
    headers: &HeaderMap,
    dialect: InboundDialect,
) -> Result<KeyEntry<'a>, ApiError> {
    let key = presented_key(headers, dialect)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| match dialect {
            InboundDialect::OpenAi | InboundDialect::Responses => ApiError::missing_key(),
            InboundDialect::Anthropic => ApiError::missing_key().with_message(
                "missing API key: send it as `x-api-key` or `Authorization: Bearer <key>`",
            ),
        })?;
    index
        .authenticate(key, now_unix())
        .map_err(|e| ApiError::invalid_key(&e.to_string()))
}

fn current_config(state: &AppState) -> Result<Arc<ConfigIndex>, ApiError> {
    state.config.current().ok_or_else(ApiError::no_config)
}

/// Reads the request body once its key was accepted (DESIGN §19): refused at once when its
/// declared length is over `--max-body-bytes`, cut when it grows past it or when it is not complete
/// within `--body-read-timeout-s`.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limits: &Limits,
    metrics: &Metrics,
) -> Result<Bytes, ApiError> {
    let limit = limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::body_too_large(limit));
    }
    match tokio::time::timeout(
        limits.body_read_timeout,
        collect_body(body, limit, declared),
    )
    .await
    {
        Ok(read) => read,
        Err(_) => {
            metrics.front_door.client_timeout("body");
            Err(ApiError::body_timeout(limits.body_read_timeout))
        }
    }
}

/// The body's bytes, without a copy when they arrive in one frame.
async fn collect_body(body: Body, limit: usize, declared: Option<u64>) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut total: usize = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::invalid_request(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(ApiError::body_too_large(limit));
        }
        match (&mut joined, first.take()) {
            (Some(joined), _) => joined.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let capacity = declared.map_or(total, |n| usize::try_from(n).unwrap_or(total));
                let mut buffer = bytes::BytesMut::with_capacity(capacity.clamp(total, limit));
                buffer.extend_from_slice(&earlier);
                buffer.extend_from_slice(&data);
                joined = Some(buffer);
            }
        }
    }
    Ok(joined.map_or_else(|| first.unwrap_or_default(), bytes::BytesMut::freeze))
}

async fn chat(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let inbound = InboundRequest::openai(Operation::ChatCompletions);
    handle(state, parts.headers, body, inbound).await
}

async fn messages(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let inbound = InboundRequest::anthropic(Operation::Messages);
    handle(state, parts.headers, body, inbound).await
}

async fn count_tokens(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let inbound = InboundRequest::anthropic(Operation::CountTokens);
    handle(state, parts.headers, body, inbound).await
}

async fn responses(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    handle(state, parts.headers, body, InboundRequest::responses()).await
}

/// `GET` (retrieve) and `DELETE` of a stored response.
async fn response_by_id(
    State(state): State<AppState>,
    method: Method,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let call = StoredCall {
        method,
        id,
        suffix: "",
        query,
    };
    stored_response(state, headers, call).await
}

async fn response_input_items(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let call = StoredCall {
        method: Method::GET,
        id,
        suffix: "/input_items",
        query,
    };
    stored_response(state, headers, call).await
}

async fn embeddings(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let inbound = InboundRequest::openai(Operation::Embeddings);
    handle(state, parts.headers, body, inbound).await
}

#[derive(serde::Deserialize)]
struct AzureQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

async fn azure_chat(
    State(state): State<AppState>,
    Path(alias): Path<String>,
    Query(query): Query<AzureQuery>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let inbound = InboundRequest::azure(Operation::ChatCompletions, alias, query.api_version);
    handle(state, parts.headers, body, inbound).await
}

async fn azure_embeddings(
    State(state): State<AppState>,
    Path(alias): Path<String>,
    Query(query): Query<AzureQuery>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let inbound = InboundRequest::azure(Operation::Embeddings, alias, query.api_version);
    handle(state, parts.headers, body, inbound).await
}

/// The key's aliases: in OpenAI's list shape, or in Anthropic's when the request carries
/// `anthropic-version` (DESIGN §17).
async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let dialect = if headers.contains_key("anthropic-version") {
        InboundDialect::Anthropic
    } else {
        InboundDialect::OpenAi
    };
    let result = (|| {
        let index = current_config(&state)?;
        let key = authenticate(&index, &headers, dialect)?;
        let aliases = key.alias_names();
        let list = match dialect {
            InboundDialect::OpenAi | InboundDialect::Responses => {
                let data: Vec<serde_json::Value> = aliases
                    .iter()
                    .map(|alias| {
                        serde_json::json!({"id": alias, "object": "model", "created": 0, "owned_by": "llm-proxy"})
                    })
                    .collect();
                serde_json::json!({"object": "list", "data": data})
            }
            InboundDialect::Anthropic => {
                let data: Vec<serde_json::Value> = aliases
                    .iter()
                    .map(|alias| {
                        serde_json::json!({"type": "model", "id": alias, "display_name": alias, "created_at": "1970-01-01T00:00:00Z"})
                    })
                    .collect();
                serde_json::json!({
                    "data": data,
                    "has_more": false,
                    "first_id": aliases.first(),
                    "last_id": aliases.last(),
                })
            }
        };
        Ok::<_, ApiError>(axum::Json(list))
    })();
    let response = match result {
        Ok(json) => with_request_id(&headers, json),
        Err(err) => with_request_id(&headers, dialect.error_response(err)),
    };
    closing_if_draining(&state, response)
}

fn limit_spec(target: &Target<'_>) -> LimitSpec {
    LimitSpec {
        tps: target.limits.tps,
        burst: target.limits.burst,
        tpm: target.limits.tpm,
    }
}

/// A rough token estimate for TPM reservations: ~4 bytes per token for the prompt plus the
/// requested output cap. Settled against the real usage afterwards.
fn estimate_tokens(body_len: usize, request: &ParsedRequest<'_>) -> u64 {
    // Saturating: `max_tokens` is the client's number, up to u64::MAX.
    (body_len as u64).div_ceil(4).saturating_add(
        request
            .max_output_tokens
            .unwrap_or(DEFAULT_OUTPUT_TOKEN_ESTIMATE),
    )
}

/// The cost a budgeted request reserves (DESIGN §18): its estimated tokens (~4 bytes of body per
/// prompt token, the requested output cap or [`DEFAULT_OUTPUT_TOKEN_ESTIMATE`]) at the prices of
/// the dearest model of its pool, since any of them may answer.
fn estimate_cost_pico(
    pool: &crate::index::Pool<'_>,
    body_len: usize,
    request: &ParsedRequest<'_>,
) -> u128 {
    let usage = Usage {
        prompt_tokens: (body_len as u64).div_ceil(4),
        completion_tokens: request
            .max_output_tokens
            .unwrap_or(DEFAULT_OUTPUT_TOKEN_ESTIMATE),
        ..Usage::default()
    };
    pool.targets()
        .filter_map(|t| t.model.prices.map(|p| p.cost_pico_usd(&usage)))
        .max()
        .unwrap_or(0)
}

/// The real cost to settle a budget reservation with once an answer's usage is known: `None`
/// keeps the estimate (nothing reported, or a stream cut short that may have cost more than it
/// reported so far).
fn budget_actual(
    prices: Option<Prices>,
    usage: Option<&Usage>,
    completed: bool,
    reservation: &BudgetReservation,
) -> Option<u128> {
    let usage = usage?;
    let cost = prices.map_or(0, |p| p.cost_pico_usd(usage));
    if completed || crate::budget::nano_usd_ceil(cost) >= reservation.reserved_nano() {
        Some(cost)
    } else {
        None
    }
}

fn attach_headers(response: &mut Response, headers: Vec<(HeaderName, HeaderValue)>) {
    for (name, value) in headers {
        response.headers_mut().insert(name, value);
    }
}

/// When a stream ends: settles its TPM reservation, counts its tokens, closes its span.
struct SettleOnEnd {
    limiter: Arc<AnyLimiter>,
    reservation: Option<Reservation>,
    estimate: u64,
    metrics: Arc<Metrics>,
    /// Held until the stream ends, so the exported span covers the whole answer.
    span: tracing::Span,
    started: Instant,
    alias: Option<Arc<str>>,
    provider: &'static str,
    route_metrics: Option<Arc<RouteMetrics>>,
    prices: Option<Prices>,
    usage_target: Option<UsageTarget>,
    aggregator: Arc<UsageAggregator>,
    budget: Option<BudgetReservation>,
    budgets: Arc<Budgets>,
}

impl StreamEnd for SettleOnEnd {
    fn first_bytes(&mut self) {
        if let Some(alias) = &self.alias {
            self.metrics
                .time_to_first_token(alias, self.provider, self.started.elapsed());
        }
    }

    fn finished(self: Box<Self>, usage: Option<Usage>, completed: bool) {
        let SettleOnEnd {
            limiter,
            reservation,
            estimate,
            metrics,
            span,
            alias,
            provider,
            route_metrics,
            prices,
            usage_target,
            aggregator,
            budget,
            budgets,
            ..
        } = *self;
        if let Some(usage) = &usage {
            let cost = prices.map(|p| p.cost_pico_usd(usage));
            let route = RouteOf {
                metrics: route_metrics.as_deref(),
                alias: alias.as_ref(),
                provider,
            };
            record_usage(&span, &metrics, route, cost, usage);
            count_usage(&aggregator, usage_target.as_ref(), cost, usage);
        }
        if let Some(reservation) = budget {
            let actual = budget_actual(prices, usage.as_ref(), completed, &reservation);
            #[allow(
                clippy::disallowed_methods,
                reason = "runs from Drop, which cannot await; the settle is bounded by its Redis time budget"
            )]
            tokio::spawn(async move { budgets.settle(reservation, actual).await });
        }
        if let Some(reservation) = reservation {
            // A stream that did not complete may have generated more than it reported so far
            // (Anthropic reports input tokens first): it keeps at least its estimate.
            let actual = match usage {
                Some(usage) if completed => usage.total(),
                Some(usage) => usage.total().max(estimate),
                None => estimate,
            };
            #[allow(
                clippy::disallowed_methods,
                reason = "runs from Drop, which cannot await; the settle is bounded by the limiter's own timeouts"
            )]
            tokio::spawn(async move { limiter.settle(reservation, actual).await });
        }
    }
}

/// How much of a failed attempt's TPM reservation to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Nothing was generated (refused before sending, connect error, error status): release it.
    Nothing,
    /// The upstream may have generated (and billed) an answer the gateway could not read: keep
    /// the estimate.
    Estimate,
}

/// Why one upstream attempt failed, and everything the one failure path
/// ([`attempt`]) needs to record, settle and answer it.
struct UpstreamFailure {
    error: ApiError,
    /// `llm_proxy_upstream_errors_total{kind}`; `None` when no upstream was called.
    kind: Option<UpstreamErrorKind>,
    settle: Settle,
    /// Whether a pool may try its next target: only when the upstream cannot have started on the
    /// request (connect error) or said it failed (5xx).
    failover: bool,
}

impl UpstreamFailure {
    /// The adapter refused to build the call (bad request for this provider, bad connection
    /// config, no token).
    fn not_sent(error: ApiError) -> Self {
        Self {
            error,
            kind: None,
            settle: Settle::Nothing,
            failover: false,
        }
    }

    fn connect(error: ApiError) -> Self {
        Self {
            error,
            kind: Some(UpstreamErrorKind::Connect),
            settle: Settle::Nothing,
            failover: true,
        }
    }

    fn timeout(error: ApiError) -> Self {
        Self {
            error,
            kind: Some(UpstreamErrorKind::Timeout),
            settle: Settle::Estimate,
            failover: false,
        }
    }

    /// A transport error after sending, an unreadable or untranslatable answer, a stream that
    /// broke before its first event.
    fn invalid_answer(error: ApiError) -> Self {
        Self {
            error,
            kind: Some(UpstreamErrorKind::InvalidResponse),
            settle: Settle::Estimate,
            failover: false,
        }
    }

    /// The upstream answered an error status.
    fn status(status: StatusCode, error: ApiError) -> Self {
        let server = status.is_server_error();
        Self {
            error,
            kind: Some(if server {
                UpstreamErrorKind::Status5xx
            } else {
                UpstreamErrorKind::Status4xx
            }),
            settle: Settle::Nothing,
            failover: server,
        }
    }
}

/// A successful upstream call.
enum Answer {
    /// The whole answer, translated, with the usage it reported.
    Complete {
        response: Response,
        usage: Option<Usage>,
    },
    /// A stream: its reservation went with it and is settled when it ends.
    Streaming(Response),
}

/// The outcome of one attempt on one target.
enum Attempt {
    Answered(Response),
    /// Failed; the client gets this error in its dialect's shape.
    Failed(ApiError),
    /// Failed in a way that lets the pool try its next target.
    Failover(ApiError),
}

/// What a request learned on its way, for its span and metrics.
struct RequestRecord {
    span: tracing::Span,
    started: Instant,
    alias: Option<Arc<str>>,
    provider: &'static str,
    /// The prices of the model routed to, for the cost of its answer.
    prices: Option<Prices>,
    /// What the answer's usage is counted under: the authenticated key, and the assignment
    /// [`Self::routed`] names.
    usage_target: Option<UsageTarget>,
    /// Time the upstream took (to its whole answer, or to a stream's head).
    upstream: Option<Duration>,
    /// The metric series of the route [`Self::routed`] names.
    route_metrics: Option<Arc<RouteMetrics>>,
    /// The key's budget reservation until an answer settles it or a stream takes it.
    budget: Option<BudgetReservation>,
    /// Whether a failed attempt may have been billed (timeout, unreadable answer): a request that
    /// ends without an answer then keeps its budget reservation instead of giving it back.
    maybe_billed: bool,
}

impl RequestRecord {
    fn routed(&mut self, target: &Target<'_>, provider: &'static str) {
        self.provider = provider;
        self.prices = target.model.prices;
        self.route_metrics = target.metrics.cloned();
        if let Some(usage_target) = &mut self.usage_target {
            usage_target.set_target(target);
        }
        self.span.record("provider", provider);
        self.span.record("model", target.model.remote.as_str());
        self.span
            .record("gen_ai.system", gen_ai_system(target.connection));
        self.span
            .record("gen_ai.request.model", target.model.remote.as_str());
    }

    fn usage(&self, state: &AppState, usage: &Usage) {
        let cost = self.prices.map(|p| p.cost_pico_usd(usage));
        record_usage(
            &self.span,
            &state.metrics,
            RouteOf {
                metrics: self.route_metrics.as_deref(),
                alias: self.alias.as_ref(),
                provider: self.provider,
            },
            cost,
            usage,
        );
        count_usage(&state.usage, self.usage_target.as_ref(), cost, usage);
    }
}

/// Adds an upstream's answer to the usage shipped to the control plane (cost 0 without prices).
fn count_usage(
    aggregator: &UsageAggregator,
    target: Option<&UsageTarget>,
    cost: Option<u128>,
    usage: &Usage,
) {
    if let Some(key) = target.and_then(UsageTarget::usage_key) {
        aggregator.add(&key, usage, cost.unwrap_or(0));
    }
}

/// Which series an answer's tokens go to: its route's handles, else a lookup by alias and
/// provider.
#[derive(Clone, Copy)]
struct RouteOf<'a> {
    metrics: Option<&'a RouteMetrics>,
    alias: Option<&'a Arc<str>>,
    provider: &'static str,
}

/// Token counts on the request span (signed: OpenTelemetry exports a u64 as text), in the
/// token metrics and, for a priced model (`cost`, pico-USD), in the cost metric.
fn record_usage(
    span: &tracing::Span,
    metrics: &Metrics,
    route: RouteOf<'_>,
    cost: Option<u128>,
    usage: &Usage,
) {
    let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    span.record("prompt_tokens", signed(usage.prompt_tokens));
    span.record("completion_tokens", signed(usage.completion_tokens));
    span.record("gen_ai.usage.input_tokens", signed(usage.prompt_tokens));
    span.record(
        "gen_ai.usage.output_tokens",
        signed(usage.completion_tokens),
    );
    match route {
        RouteOf {
            metrics: Some(handles),
            ..
        } => metrics.routed_usage(handles, usage, cost),
        RouteOf {
            alias: Some(alias),
            provider,
            ..
        } => {
            metrics.tokens(alias, provider, usage);
            if let Some(cost) = cost {
                metrics.cost(alias, provider, cost);
            }
        }
        RouteOf { .. } => {}
    }
}

/// The OpenTelemetry GenAI `gen_ai.system` of a connection (the semantic conventions' names).
fn gen_ai_system(connection: &ConnectionEntry) -> &'static str {
    match connection.provider {
        Provider::OpenAi => "openai",
        Provider::Azure => "az.ai.openai",
        Provider::Anthropic => "anthropic",
        Provider::Bedrock => "aws.bedrock",
        Provider::Google => {
            use secrecy::ExposeSecret as _;
            // Only to tell Vertex from the Gemini API by the credential's shape.
            match providers::google::api_of(connection, connection.credential.expose_secret()) {
                providers::google::Api::Vertex => "gcp.vertex_ai",
                providers::google::Api::Gemini => "gcp.gemini",
            }
        }
    }
}

/// Longest client `x-request-id` kept; longer or odd ones are replaced by a generated id.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `x-request-id` when it is a sane token, else a new random one.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(value) = headers.get(X_REQUEST_ID)
        && !value.is_empty()
        && value.len() <= MAX_REQUEST_ID_LEN
        && value
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b))
    {
        return value.clone();
    }
    let mut id = [0u8; 32];
    crate::trace::write_hex(&mut id, rand::random::<u128>());
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

// Header names as constants: a lookup by `&str` parses and validates the name every time.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const API_KEY: HeaderName = HeaderName::from_static("api-key");
const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

/// A request's span, trace context and record, as every route starts them.
fn start_request(
    headers: &HeaderMap,
    operation: &'static str,
    gen_ai_operation: Option<&'static str>,
) -> (RequestRecord, TraceContext, HeaderValue) {
    let started = Instant::now();
    let request_id = request_id(headers);
    // Never a secret here: the key's id, not the key; the model names, not the credentials.
    let span = if llm_proxy_telemetry::exporting() {
        exported_request_span(operation, gen_ai_operation, &request_id)
    } else {
        // Without OTLP export the span only gives log lines their request's context, and every
        // field set on it costs the log layer a formatting pass (all of them: ~50,000
        // instructions per request, a third of the request, measured with callgrind): only
        // what a log reader needs. Recording a field a span lacks does nothing.
        tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or_default(),
            vkey_id = Empty,
            alias = Empty,
        )
    };
    let mut trace = TraceContext::of_request(headers);
    if let Some(ids) = llm_proxy_telemetry::link_span(&span, trace.client_parent()) {
        trace = trace.with_span(ids);
    }
    let record = RequestRecord {
        span,
        started,
        alias: None,
        provider: "",
        prices: None,
        usage_target: None,
        upstream: None,
        route_metrics: None,
        budget: None,
        maybe_billed: false,
    };
    (record, trace, request_id)
}

/// The request span exported over OTLP: the gateway's fields and the OpenTelemetry GenAI ones.
fn exported_request_span(
    operation: &'static str,
    gen_ai_operation: Option<&'static str>,
    request_id: &HeaderValue,
) -> tracing::Span {
    tracing::info_span!(
        "request",
        otel.name = operation,
        otel.kind = "server",
        otel.status_code = Empty,
        request_id = request_id.to_str().unwrap_or_default(),
        vkey_id = Empty,
        alias = Empty,
        provider = Empty,
        model = Empty,
        stream = Empty,
        status = Empty,
        prompt_tokens = Empty,
        completion_tokens = Empty,
        upstream_ms = Empty,
        // OpenTelemetry GenAI semantic conventions (DESIGN §18), next to the names above.
        gen_ai.operation.name = gen_ai_operation,
        gen_ai.system = Empty,
        gen_ai.request.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
    )
}

async fn handle(
    state: AppState,
    headers: HeaderMap,
    body: Body,
    inbound: InboundRequest,
) -> Response {
    let (mut record, trace, request_id) = start_request(
        &headers,
        inbound.operation.span_name(),
        inbound.operation.gen_ai_operation(),
    );
    let span = record.span.clone();
    let result = handle_inner(&state, &headers, body, &inbound, trace, &mut record)
        .instrument(span)
        .await;
    // A reservation no answer took: given back, or kept when an upstream may have billed.
    if let Some(reservation) = record.budget.take() {
        let actual = (!record.maybe_billed).then_some(0);
        state.budgets.settle(reservation, actual).await;
    }
    let response = match result {
        Ok(response) => response,
        Err(err) => inbound.dialect.error_response(err),
    };
    finish_request(&state, &record, response, request_id)
}

/// Records a request's outcome (span, metrics) and stamps its answer with the request id.
fn finish_request(
    state: &AppState,
    record: &RequestRecord,
    mut response: Response,
    request_id: HeaderValue,
) -> Response {
    let status = response.status();
    // Signed: OpenTelemetry has no unsigned integers (u64 would be exported as text).
    record.span.record("status", i64::from(status.as_u16()));
    if status.is_server_error() {
        record.span.record("otel.status_code", "error");
    }
    if let Some(upstream) = record.upstream {
        record
            .span
            .record("upstream_ms", upstream.as_secs_f64() * 1000.0);
    }
    match &record.route_metrics {
        Some(route) => state.metrics.routed_request(
            route,
            status.as_u16(),
            record.started.elapsed(),
            record.upstream,
        ),
        None => state.metrics.request(
            record.alias.as_ref().unwrap_or(&state.metrics.no_alias),
            record.provider,
            status.as_u16(),
            record.started.elapsed(),
            record.upstream,
        ),
    }
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    closing_if_draining(state, response)
}

/// While draining, asks the client to close its kept-alive connection after this answer (checked
/// here rather than in a middleware layer, which would cost every request a boxed future).
fn closing_if_draining(state: &AppState, mut response: Response) -> Response {
    if state.draining.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn handle_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    inbound: &InboundRequest,
    trace: TraceContext,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let index = current_config(state)?;
    let key = authenticate(&index, headers, inbound.dialect)?;
    record.span.record("vkey_id", key.id());
    let body = read_body(body, headers, &state.limits, &state.metrics).await?;
    let path_alias = inbound.path_alias.as_deref();
    let request = body::parse(&body, path_alias.is_none(), state.limits.max_top_level_keys)?;
    let alias = path_alias.or(request.model.as_deref()).unwrap_or_default();
    let pool = key
        .pool(alias)
        .ok_or_else(|| ApiError::model_not_found(alias))?;
    record.alias = Some(pool.alias().clone());
    record.usage_target = Some(UsageTarget::for_key(&index, &key));
    record.span.record("alias", &**pool.alias());
    record.span.record("stream", request.stream);

    if inbound.operation == Operation::CountTokens {
        return count_tokens_of(
            state, headers, &body, &request, inbound, pool, trace, record,
        )
        .await;
    }
    if let Some(budget) = key.budget() {
        let estimate = estimate_cost_pico(&pool, body.len(), &request);
        record.budget = state
            .budgets
            .acquire(key.id(), budget, estimate)
            .await
            .map_err(ApiError::budget)?;
    }
    // A Responses request continuing a stored response goes to the connection that stored it
    // (DESIGN §17), and only there.
    let pinned = match inbound.dialect {
        InboundDialect::Responses => providers::openai::responses::pinned_connection(&request)?,
        InboundDialect::OpenAi | InboundDialect::Anthropic => None,
    };
    let estimate = estimate_tokens(body.len(), &request);
    let mut last_denial: Option<Decision> = None;
    let mut last_error: Option<ApiError> = None;
    let mut tried_pinned = false;
    for target in pool.attempt_order(rand::random()) {
        if let Some(pinned) = &pinned {
            if target.connection.id != pinned.connection_id {
                continue;
            }
            tried_pinned = true;
        }
        // Labelled with its provider even when the limit refuses it.
        record.routed(&target, target.connection.provider.as_str());
        let spec = limit_spec(&target);
        let (decision, reservation) = state
            .limiter
            .acquire(target.assignment_id, &spec, estimate)
            .await;
        if decision.is_unavailable() {
            state.metrics.ratelimit_decision(LimitResult::Unavailable);
            return Err(ApiError::limiter_unavailable());
        }
        if !decision.allowed {
            state.metrics.ratelimit_decision(LimitResult::Limited);
            // Tell the caller the soonest time any target of the pool frees up.
            let sooner = last_denial
                .as_ref()
                .is_none_or(|d| decision.retry_after < d.retry_after);
            if sooner {
                last_denial = Some(decision);
            }
            continue;
        }
        let ctx = CallContext {
            dialect: inbound.dialect,
            operation: inbound.operation,
            target: &target,
            request: &request,
            body: &body,
            inbound_headers: headers,
            client_api_version: inbound.client_api_version.as_deref(),
            trace,
        };
        state.metrics.ratelimit_decision(LimitResult::Allowed);
        let limit_headers = decision.headers();
        match attempt(state, &ctx, reservation, estimate, record).await {
            Attempt::Answered(mut response) => {
                attach_headers(&mut response, limit_headers);
                return Ok(response);
            }
            Attempt::Failed(mut err) => {
                err.headers.extend(limit_headers);
                return Err(err);
            }
            Attempt::Failover(err) => {
                tracing::debug!(assignment = %target.assignment_id, status = %err.status, "upstream failed; trying the next target");
                last_error = Some(err);
            }
        }
    }
    if let Some(err) = last_error {
        return Err(err);
    }
    if pinned.is_some() && !tried_pinned {
        return Err(ApiError::invalid_request(format!(
            "previous_response_id names a response stored through a connection that `{alias}` no longer routes to for this key; send the whole conversation in `input` instead"
        ))
        .with_param("previous_response_id")
        .with_code("previous_response_not_found"));
    }
    let Some(decision) = last_denial else {
        return Err(ApiError::model_not_found(alias));
    };
    Err(ApiError::limit_reached(
        alias,
        decision.retry_after.unwrap_or_default(),
        decision.headers(),
    ))
}

/// `count_tokens` (DESIGN §17): forwarded to the pool's first target when it is an `anthropic`
/// connection (Anthropic's API and Foundry have the endpoint), else estimated locally, as also
/// when that upstream fails or lacks the endpoint (404). Never counted against request limits:
/// Claude Code sends dozens at start-up.
#[allow(clippy::too_many_arguments)] // the request's parts, as `handle_inner` holds them
async fn count_tokens_of(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
    request: &ParsedRequest<'_>,
    inbound: &InboundRequest,
    pool: crate::index::Pool<'_>,
    trace: TraceContext,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let Some(target) = pool.attempt_order(rand::random()).next() else {
        return Err(ApiError::model_not_found(pool.alias()));
    };
    record.routed(&target, target.connection.provider.as_str());
    if providers::anthropic::claude_route(&target, inbound.dialect)
        == Some(providers::anthropic::ClaudeRoute::Anthropic)
    {
        let ctx = CallContext {
            dialect: inbound.dialect,
            operation: inbound.operation,
            target: &target,
            request,
            body,
            inbound_headers: headers,
            client_api_version: None,
            trace,
        };
        match attempt(state, &ctx, None, 0, record).await {
            Attempt::Answered(response) => return Ok(response),
            // The upstream is down or has no count_tokens (a Foundry resource without it): the
            // local estimate answers instead.
            Attempt::Failover(err) => {
                tracing::debug!(status = %err.status, "count_tokens upstream failed; estimating locally");
            }
            Attempt::Failed(err) if err.status == StatusCode::NOT_FOUND => {
                tracing::debug!("count_tokens not found upstream; estimating locally");
            }
            Attempt::Failed(err) => return Err(err),
        }
    }
    let tokens = estimate_input_tokens(request);
    Ok(axum::Json(serde_json::json!({ "input_tokens": tokens })).into_response())
}

/// The local `count_tokens` estimate: about 4 bytes of JSON per token over `system`, `messages`
/// and `tools` (what Anthropic counts as input), at least 1.
fn estimate_input_tokens(request: &ParsedRequest<'_>) -> u64 {
    let bytes: usize = ["system", "messages", "tools"]
        .iter()
        .filter_map(|key| request.object.get(key))
        .map(|raw| raw.get().len())
        .sum();
    (bytes as u64).div_ceil(4).max(1)
}

/// A call on a stored response: `GET`/`DELETE /v1/responses/{id}`, `GET …/input_items`.
struct StoredCall {
    method: Method,
    /// The id as the client has it (tagged by the gateway).
    id: String,
    /// `""` or `/input_items`.
    suffix: &'static str,
    query: Option<String>,
}

/// Longest query passed on to a stored-response call.
const MAX_STORED_QUERY_BYTES: usize = 2048;

/// Serves a call on a stored response (DESIGN §17): the id's tag names the connection that
/// stored it; the key must have a target on that connection (the assignment's request limits
/// apply, no tokens are counted). Any other id is answered 404 like OpenAI's unknown ids:
/// translated answers are never stored.
async fn stored_response(state: AppState, headers: HeaderMap, call: StoredCall) -> Response {
    let operation = match (&call.method, call.suffix) {
        (&Method::DELETE, _) => "responses.delete",
        (_, "") => "responses.retrieve",
        _ => "responses.input_items",
    };
    let (mut record, trace, request_id) = start_request(&headers, operation, None);
    let span = record.span.clone();
    let result = stored_response_inner(&state, &headers, &call, trace, &mut record)
        .instrument(span)
        .await;
    let response = result.unwrap_or_else(IntoResponse::into_response);
    finish_request(&state, &record, response, request_id)
}

fn stored_response_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "Response with id '{id}' not found. Only responses stored by OpenAI or Azure models through this gateway, with a key that may call them, can be retrieved; answers of other providers are not stored"
        ),
    )
}

/// The client's query for a stored-response call: passed on, except `api-version` (the
/// connection decides it) and `stream=true` (relaying a stored stream is not supported).
fn stored_query(query: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    if query.len() > MAX_STORED_QUERY_BYTES || !query.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid_request(format!(
            "the query must be at most {MAX_STORED_QUERY_BYTES} printable ASCII characters"
        )));
    }
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        if name == "api-version" {
            continue;
        }
        if name == "stream" && pair != "stream=false" {
            return Err(ApiError::invalid_request(
                "streaming a stored response (`stream=true`) is not supported through the gateway; retrieve it without `stream`",
            )
            .with_param("stream"));
        }
        kept.push(pair);
    }
    Ok((!kept.is_empty()).then(|| kept.join("&")))
}

async fn stored_response_inner(
    state: &AppState,
    headers: &HeaderMap,
    call: &StoredCall,
    trace: TraceContext,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    use providers::openai::responses;
    let index = current_config(state)?;
    let key = authenticate(&index, headers, InboundDialect::Responses)?;
    record.span.record("vkey_id", key.id());
    let tagged =
        responses::untag_id(&call.id).ok_or_else(|| stored_response_not_found(&call.id))?;
    let target = key
        .targets()
        .find(|t| t.connection.id == tagged.connection_id)
        .ok_or_else(|| stored_response_not_found(&call.id))?;
    let provider = target.connection.provider.as_str();
    record.alias = Some(target.alias.clone());
    record.usage_target = Some(UsageTarget::for_key(&index, &key));
    record.span.record("alias", &**target.alias);
    record.routed(&target, provider);
    let query = stored_query(call.query.as_deref())?;
    let endpoint = responses::endpoint(target.connection)?;

    let (decision, reservation) = state
        .limiter
        .acquire(target.assignment_id, &limit_spec(&target), 0)
        .await;
    if let Some(reservation) = reservation {
        state.limiter.settle(reservation, 0).await;
    }
    if decision.is_unavailable() {
        state.metrics.ratelimit_decision(LimitResult::Unavailable);
        return Err(ApiError::limiter_unavailable());
    }
    if !decision.allowed {
        state.metrics.ratelimit_decision(LimitResult::Limited);
        return Err(ApiError::limit_reached(
            target.alias,
            decision.retry_after.unwrap_or_default(),
            decision.headers(),
        ));
    }
    state.metrics.ratelimit_decision(LimitResult::Allowed);

    let uri = providers::parse_uri(&endpoint.url(
        &format!("/{}{}", tagged.upstream_id, call.suffix),
        query.as_deref(),
    ))
    .map_err(|detail| ApiError::upstream_unreachable(provider, detail))?;
    let timeout = target.connection.timeout;
    let mut request = http::Request::new(Bytes::new());
    *request.method_mut() = call.method.clone();
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(
        HeaderName::from_static("traceparent"),
        trace.upstream_header(),
    );
    if let Some((name, value)) = endpoint.auth {
        headers.insert(name, value);
    }
    let sent_at = Instant::now();
    let sent = send(&state.upstreams.http, request, timeout, provider).await;
    record.upstream = Some(sent_at.elapsed());
    let failed = |failure: UpstreamFailure| {
        if let Some(kind) = failure.kind {
            state.metrics.upstream_error(provider, kind);
        }
        failure.error
    };
    let response = sent.map_err(failed)?;
    let status = response.status();
    if !status.is_success() {
        let (headers, body) = error_answer(response, timeout).await;
        let mut err = providers::upstream_error(provider, status, &headers, &body);
        // The upstream names its own id; the client knows the gateway's.
        err.message = err.message.replace(&tagged.upstream_id, &call.id);
        return Err(failed(UpstreamFailure::status(status, err)));
    }
    let ids = request_ids(response.headers());
    let body = tokio::time::timeout_at(
        (sent_at + timeout).into(),
        capped::read_capped(response.into_body(), state.limits.max_upstream_body_bytes),
    )
    .await
    .map_err(|_elapsed| {
        failed(UpstreamFailure::timeout(ApiError::upstream_timeout(
            provider, timeout,
        )))
    })?
    .map_err(|err| {
        failed(UpstreamFailure::invalid_answer(
            ApiError::upstream_bad_answer(provider, err.to_string()),
        ))
    })?;
    record.upstream = Some(sent_at.elapsed());
    let body = if call.suffix.is_empty() {
        // A response object or a delete confirmation: its ids tagged as the client knows them.
        let answer = responses::ResponsesAnswer {
            connection_id: target.connection.id.clone(),
        };
        answer
            .translate(body, provider)
            .map_err(|e| failed(UpstreamFailure::invalid_answer(e)))?
            .0
    } else {
        // A list of input items: item ids are the upstream's own, passed on as they are.
        let is_object = std::str::from_utf8(&body)
            .ok()
            .and_then(body::parse_object)
            .is_some();
        if !is_object {
            return Err(failed(UpstreamFailure::invalid_answer(
                ApiError::upstream_bad_answer(provider, "a 2xx answer that is not a JSON object"),
            )));
        }
        body
    };
    let mut out = Response::new(Body::from(body));
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out.headers_mut().extend(ids);
    Ok(out)
}

/// One attempt on one target, and the one place that settles its reservation and records its
/// outcome: the call itself ([`call_upstream`]) only says what happened.
async fn attempt(
    state: &AppState,
    ctx: &CallContext<'_>,
    reservation: Option<Reservation>,
    estimate: u64,
    record: &mut RequestRecord,
) -> Attempt {
    let provider = ctx.target.connection.provider.as_str();
    let mut reservation = reservation;
    let (outcome, settle_at) =
        match call_upstream(state, ctx, &mut reservation, estimate, record).await {
            Ok(Answer::Complete { response, usage }) => {
                if let Some(usage) = &usage {
                    record.usage(state, usage);
                }
                if let Some(reservation) = record.budget.take() {
                    let actual = budget_actual(record.prices, usage.as_ref(), true, &reservation);
                    state.budgets.settle(reservation, actual).await;
                }
                let actual = usage.map_or(estimate, |u| u.total());
                (Attempt::Answered(response), actual)
            }
            // The stream holds the reservation now (`reservation` is `None`).
            Ok(Answer::Streaming(response)) => (Attempt::Answered(response), 0),
            Err(failure) => {
                if let Some(kind) = failure.kind {
                    state.metrics.upstream_error(provider, kind);
                }
                let settle_at = match failure.settle {
                    Settle::Nothing => 0,
                    Settle::Estimate => {
                        record.maybe_billed = true;
                        estimate
                    }
                };
                let outcome = if failure.failover {
                    Attempt::Failover(failure.error)
                } else {
                    Attempt::Failed(failure.error)
                };
                (outcome, settle_at)
            }
        };
    if let Some(reservation) = reservation {
        state.limiter.settle(reservation, settle_at).await;
    }
    outcome
}

/// Calls the target's upstream and reads or relays its answer. It neither settles nor counts:
/// a failure says what it means ([`UpstreamFailure`]) and [`attempt`] acts on it. A stream takes
/// the reservation out of `reservation`, to settle it when it ends.
async fn call_upstream(
    state: &AppState,
    ctx: &CallContext<'_>,
    reservation: &mut Option<Reservation>,
    estimate: u64,
    record: &mut RequestRecord,
) -> Result<Answer, UpstreamFailure> {
    let connection = &ctx.target.connection;
    let provider = connection.provider.as_str();
    let outbound = providers::build(ctx, &state.upstreams)
        .await
        .map_err(UpstreamFailure::not_sent)?;
    let wire = outbound.wire;
    let (uri, host) = outbound.url.into_uri().map_err(|detail| {
        UpstreamFailure::not_sent(ApiError::upstream_unreachable(provider, detail))
    })?;
    let mut request = http::Request::new(Bytes::from(outbound.body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.reserve(outbound.headers.len() + 3);
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in outbound.headers {
        headers.append(name, value);
    }
    // Set after the adapter's headers: SigV4 does not sign it, and every provider accepts it.
    headers.insert(
        HeaderName::from_static("traceparent"),
        ctx.trace.upstream_header(),
    );
    let timeout = connection.timeout;
    let streaming = ctx.request.stream && ctx.operation.is_chat();
    // The timeout covers the wait for the answer's head, then the whole body of a complete
    // answer; a stream's chunks each get it afresh (idle timeout).
    let sent_at = Instant::now();
    let sent = send(&state.upstreams.http, request, timeout, provider).await;
    record.upstream = Some(sent_at.elapsed());
    let response = sent?;
    let status = response.status();
    if !status.is_success() {
        let (headers, body) = error_answer(response, timeout).await;
        let err = wire.error(provider, status, &headers, &body);
        return Err(UpstreamFailure::status(status, err));
    }
    let request_ids = request_ids(response.headers());
    if streaming {
        let on_end = Box::new(SettleOnEnd {
            limiter: state.limiter.clone(),
            reservation: reservation.take(),
            estimate,
            metrics: state.metrics.clone(),
            span: record.span.clone(),
            started: record.started,
            alias: record.alias.clone(),
            provider,
            route_metrics: record.route_metrics.clone(),
            prices: record.prices,
            usage_target: record.usage_target.clone(),
            aggregator: state.usage.clone(),
            budget: record.budget.take(),
            budgets: state.budgets.clone(),
        });
        // A stream that fails before its first event was settled through `on_end`.
        let body = wire
            .stream(
                &request_ids,
                http_body_util::BodyDataStream::new(response.into_body()),
                ctx.request.include_usage,
                timeout,
                provider,
                on_end,
                &state.limits,
                ctx.dialect,
                &ctx.target.model.remote,
            )
            .await
            .map_err(UpstreamFailure::invalid_answer)?;
        let mut out = Response::new(body);
        let headers = out.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.extend(request_ids);
        return Ok(Answer::Streaming(out));
    }
    // Capped: a declared length over the cap is refused unread, an undeclared one when it
    // passes the cap (DESIGN §19).
    let body = tokio::time::timeout_at(
        (sent_at + timeout).into(),
        capped::read_capped(response.into_body(), state.limits.max_upstream_body_bytes),
    )
    .await;
    record.upstream = Some(sent_at.elapsed());
    let body = match body {
        Err(_elapsed) => Err(UpstreamFailure::timeout(ApiError::upstream_timeout(
            provider, timeout,
        ))),
        Ok(Err(CappedReadError::Broken(detail))) => Err(UpstreamFailure::invalid_answer(
            ApiError::upstream_bad_answer(provider, detail),
        )),
        Ok(Err(too_large)) => Err(UpstreamFailure::invalid_answer(
            ApiError::upstream_bad_answer(
                provider,
                format_args!("{too_large} (--max-upstream-body-bytes)"),
            ),
        )),
        Ok(Ok(body)) => Ok(body),
    }?;
    let (body, usage) = wire
        .translate(&request_ids, body, &state.limits, provider, ctx.dialect)
        .map_err(UpstreamFailure::invalid_answer)?;
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = StatusCode::OK;
    let headers = out.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.extend(request_ids);
    Ok(Answer::Complete {
        response: out,
        usage,
    })
}

/// Sends an upstream request within `timeout` (to its answer's head).
async fn send(
    client: &UpstreamHttp,
    request: http::Request<Bytes>,
    timeout: Duration,
    provider: &'static str,
) -> Result<UpstreamResponse, UpstreamFailure> {
    match tokio::time::timeout(timeout, client.send(request)).await {
        Ok(Ok(response)) => Ok(response),
        // Only a failure to connect is safe to retry on the next target: once the request is
        // sent, the upstream may already be generating (and billing) the answer.
        Ok(Err(err)) if err.connect => Err(UpstreamFailure::connect(
            ApiError::upstream_unreachable(provider, err.detail),
        )),
        Ok(Err(err)) => Err(UpstreamFailure::invalid_answer(
            ApiError::upstream_unreachable(provider, err.detail),
        )),
        Err(_) => Err(UpstreamFailure::timeout(ApiError::upstream_timeout(
            provider, timeout,
        ))),
    }
}

/// The headers and the start of an error answer's body. Bounded like the answer itself: an
/// upstream may send an error head and stall, or an endless body (only its start is read, for
/// the message).
async fn error_answer(response: UpstreamResponse, timeout: Duration) -> (HeaderMap, Bytes) {
    let (head, body) = response.into_parts();
    let body = tokio::time::timeout(
        timeout,
        capped::read_prefix(body, capped::MAX_ERROR_BODY_BYTES),
    )
    .await
    .unwrap_or_default();
    (head.headers, body)
}

/// The upstream's request ids, passed on for support requests. The upstream's `x-request-id`
/// becomes `x-upstream-request-id`: `x-request-id` is the gateway's own.
fn request_ids(from: &HeaderMap) -> HeaderMap {
    const IDS: [(HeaderName, HeaderName); 4] = [
        (
            X_REQUEST_ID,
            HeaderName::from_static("x-upstream-request-id"),
        ),
        // Anthropic's.
        (
            HeaderName::from_static("request-id"),
            HeaderName::from_static("x-upstream-request-id"),
        ),
        (
            HeaderName::from_static("apim-request-id"),
            HeaderName::from_static("apim-request-id"),
        ),
        (
            HeaderName::from_static("x-amzn-requestid"),
            HeaderName::from_static("x-amzn-requestid"),
        ),
    ];
    let mut ids = HeaderMap::new();
    for (name, as_name) in IDS {
        if let Some(value) = from.get(name) {
            ids.insert(as_name, value.clone());
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comes_from_bearer_then_api_key_then_goog() {
        let openai = InboundDialect::OpenAi;
        let mut h = HeaderMap::new();
        h.insert("x-goog-api-key", HeaderValue::from_static("g"));
        assert_eq!(presented_key(&h, openai), Some("g"));
        h.insert("api-key", HeaderValue::from_static("a"));
        assert_eq!(presented_key(&h, openai), Some("a"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(presented_key(&h, openai), Some("b"));
        // `x-api-key` counts on Anthropic routes only, and first there.
        h.insert("x-api-key", HeaderValue::from_static("x"));
        assert_eq!(presented_key(&h, openai), Some("b"));
        assert_eq!(presented_key(&h, InboundDialect::Anthropic), Some("x"));
        h.remove("x-api-key");
        assert_eq!(presented_key(&h, InboundDialect::Anthropic), Some("b"));
    }
}
