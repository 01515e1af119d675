//! Provider adapters: each builds the upstream request for its provider and says how its answers
//! map back to the client's dialect. One provider per file.
//!
//! [`build`] first asks whether the target speaks Anthropic Messages (the `anthropic` provider,
//! Claude on Bedrock and on Vertex, [`anthropic::claude_route`]): those get the Messages wire
//! (passthrough for Messages clients, translated for OpenAI chat clients). Every other target
//! speaks OpenAI chat to the gateway's adapters; a Messages client's request for one is converted
//! through the conversation model first ([`crate::conversation`]), and its answer back. OpenAI
//! Responses clients are passed through to OpenAI and Azure ([`openai::responses`]) and converted
//! the same way for every other target.

pub mod anthropic;
pub mod azure;
pub mod bedrock;
pub mod capped;
pub mod google;
pub mod openai;
pub mod openai_request;

use crate::body::ParsedRequest;
use crate::conversation::{self, Translate};
use crate::errors::ApiError;
use crate::inbound::InboundDialect;
pub use crate::inbound::Operation;
use crate::index::{Provider, Target};
use crate::limits::Limits;
use crate::sse::{self, StreamEnd};
use crate::usage::{OpenAiUsage, Usage};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;

/// Everything an adapter needs to build one upstream call. `Debug` leaves out the client's
/// headers and body: they hold the gateway key and the prompt.
pub struct CallContext<'a> {
    /// How the client speaks; the answer is written in it.
    pub dialect: InboundDialect,
    pub operation: Operation,
    pub target: &'a Target<'a>,
    pub request: &'a ParsedRequest<'a>,
    /// The client's body as it arrived (passthrough splices into it).
    pub body: &'a [u8],
    /// The client's request headers (`anthropic-version`, `anthropic-beta` are passed on).
    pub inbound_headers: &'a HeaderMap,
    /// `api-version` the client sent on an Azure-style inbound route.
    pub client_api_version: Option<&'a str>,
    /// The request's trace (W3C), continued upstream.
    pub trace: crate::trace::TraceContext,
}

impl std::fmt::Debug for CallContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("dialect", &self.dialect)
            .field("operation", &self.operation)
            .field("target", &self.target)
            .field("client_api_version", &self.client_api_version)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Outbound {
    pub url: UpstreamUrl,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
    pub wire: WireFormat,
}

/// Where an upstream call goes: parsed once per connection where the path allows it
/// ([`crate::index::ConnectionCache`]), else text parsed per call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamUrl {
    /// A parsed URL and, for plain HTTP, its `Host` header value ([`host_header`]).
    Parsed(http::Uri, Option<HeaderValue>),
    Text(String),
}

impl UpstreamUrl {
    /// The URL as text (for tests and messages).
    pub fn to_text(&self) -> String {
        match self {
            Self::Parsed(uri, _) => uri.to_string(),
            Self::Text(text) => text.clone(),
        }
    }

    /// The URL to send to with its `Host` header value when it was made beforehand (else the
    /// HTTP client writes it), or why it is not one (without the URL: some providers take keys
    /// in the query).
    pub fn into_uri(self) -> Result<(http::Uri, Option<HeaderValue>), String> {
        match self {
            Self::Parsed(uri, host) => Ok((uri, host)),
            Self::Text(text) => parse_uri(&text).map(|uri| (uri, None)),
        }
    }

    /// `operation`'s URL on `connection`, from its cache (`make` builds the text once).
    pub fn cached(
        connection: &crate::index::ConnectionEntry,
        operation: Operation,
        make: impl Fn() -> String,
    ) -> Self {
        match connection.cache.url(operation, &make) {
            Some((url, host)) => Self::Parsed(url, host),
            None => Self::Text(make()),
        }
    }
}

/// An upstream URL for hyper. The WHATWG parser goes first, as in reqwest: it normalises and
/// percent-encodes what `http::Uri` alone would refuse; only `http` and `https` are sent to.
pub fn parse_uri(text: &str) -> Result<http::Uri, String> {
    let url = url::Url::parse(text).map_err(|err| format!("invalid upstream url: {err}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "invalid upstream url: scheme {:?} is not http or https",
            url.scheme()
        ));
    }
    http::Uri::try_from(url.as_str()).map_err(|err| format!("invalid upstream url: {err}"))
}

/// For a plain `http://` URL, the `Host` header hyper's client would write on every request
/// (the host, and the port unless it is 80), made once per cached URL instead. `None` over TLS:
/// there ALPN picks the protocol per connection, and HTTP/2 carries `:authority` instead (a
/// `Host` would be sent beside it).
pub fn host_header(uri: &http::Uri) -> Option<HeaderValue> {
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return None;
    }
    crate::upstream_pool::host_value(uri)
}

impl From<String> for UpstreamUrl {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

/// The upstream's wire format: how the provider is called and answers, and so what the gateway
/// does with the answer. Separate from the inbound dialect ([`crate::inbound::InboundDialect`]),
/// which says how the client's request and answer look.
#[derive(Debug)]
pub enum WireFormat {
    /// OpenAI's format (OpenAI, Azure): relayed as it is.
    OpenAi,
    Google(google::Answer),
    Bedrock(bedrock::Answer),
    /// Anthropic Messages (the `anthropic` provider, Claude on Bedrock and Vertex).
    Messages(anthropic::wire::MessagesAnswer),
    /// OpenAI's Responses API (OpenAI, Azure), passed through with tagged response ids.
    Responses(openai::responses::ResponsesAnswer),
}

/// What adapters share across calls: the upstream HTTP clients and cached access tokens.
#[derive(Debug)]
pub struct Upstreams {
    /// The client of calls relayed to providers (the hot path).
    pub http: crate::upstream_http::UpstreamHttp,
    /// reqwest, for the rest (token exchanges).
    pub client: reqwest::Client,
    /// The caps on what upstreams may send (DESIGN §19).
    pub limits: crate::limits::Limits,
    pub google_tokens: google::service_account::TokenCache,
}

impl Upstreams {
    pub fn new(
        http: crate::upstream_http::UpstreamHttp,
        client: reqwest::Client,
        limits: crate::limits::Limits,
    ) -> Self {
        Self {
            http,
            client,
            limits,
            google_tokens: google::service_account::TokenCache::default(),
        }
    }
}

impl WireFormat {
    /// A non-streamed answer in OpenAI's format, and its token usage. `ids` are the upstream's
    /// request-id headers. An answer that is not JSON is refused, also when relayed as it is: the
    /// gateway never passes on an answer it could not account for (DESIGN §19).
    pub fn translate(
        &self,
        ids: &HeaderMap,
        body: Bytes,
        limits: &Limits,
        provider: &'static str,
        client: InboundDialect,
    ) -> Result<(Bytes, Option<Usage>), ApiError> {
        match self {
            WireFormat::Messages(answer) => return answer.translate(body, client, provider),
            WireFormat::Responses(answer) => return answer.translate(body, provider),
            _ => {}
        }
        let (body, usage) = self.translate_to_openai(ids, body, limits, provider)?;
        match client {
            InboundDialect::OpenAi => Ok((body, usage)),
            InboundDialect::Anthropic => {
                let reply = conversation::openai_chat::parse_reply(&body, provider)?;
                let usage = reply.usage.reported_usage();
                Ok((
                    Bytes::from(conversation::anthropic::write_reply(&reply)),
                    usage,
                ))
            }
            InboundDialect::Responses => {
                let reply = conversation::openai_chat::parse_reply(&body, provider)?;
                let usage = reply.usage.reported_usage();
                Ok((
                    Bytes::from(conversation::responses::write_reply(&reply, &reply.model)),
                    usage,
                ))
            }
        }
    }

    /// The answer of an OpenAI-chat-speaking wire format, in OpenAI's format.
    fn translate_to_openai(
        &self,
        ids: &HeaderMap,
        body: Bytes,
        limits: &Limits,
        provider: &str,
    ) -> Result<(Bytes, Option<Usage>), ApiError> {
        match self {
            WireFormat::OpenAi => {
                let usage = openai_usage(&body, provider)?;
                Ok((body, usage))
            }
            WireFormat::Google(answer) => answer
                .translate(&body, limits)
                .map(|(body, usage)| (Bytes::from(body), usage)),
            WireFormat::Bedrock(answer) => answer
                .translate(ids, &body)
                .map(|(body, usage)| (Bytes::from(body), usage)),
            WireFormat::Messages(_) | WireFormat::Responses(_) => Err(ApiError::internal(
                "a messages or responses answer reached the openai chat translation",
            )),
        }
    }

    /// The OpenAI-shaped error for a non-2xx answer.
    pub fn error(
        &self,
        provider: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> ApiError {
        match self {
            WireFormat::OpenAi | WireFormat::Responses(_) => {
                upstream_error(provider, status, headers, body)
            }
            WireFormat::Google(_) => google::upstream_error(status, body),
            WireFormat::Bedrock(_) => bedrock::error::upstream_error(status, headers, body),
            WireFormat::Messages(answer) => answer.error(provider, status, headers, body),
        }
    }

    /// The client's SSE body for a streamed answer, in the client's dialect. Translated streams
    /// are primed first (see [`sse::prime`]): a failure before the first chunk is returned as an
    /// error response, after `on_end` has been told. `limits` bound event sizes and upstream
    /// indexes.
    #[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the list
    pub async fn stream<S, E>(
        &self,
        ids: &HeaderMap,
        upstream: S,
        client_wants_usage: bool,
        idle_timeout: Duration,
        provider: &'static str,
        on_end: Box<dyn StreamEnd>,
        limits: &Limits,
        client: InboundDialect,
        remote_model: &str,
    ) -> Result<axum::body::Body, ApiError>
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let max_event = limits.max_stream_event_bytes;
        match self {
            WireFormat::Messages(answer) => {
                answer
                    .stream(
                        upstream,
                        client,
                        client_wants_usage,
                        idle_timeout,
                        provider,
                        on_end,
                        limits,
                    )
                    .await
            }
            // Relayed as it comes: nothing to decide before the first byte.
            WireFormat::Responses(answer) => Ok(axum::body::Body::from_stream(sse::relay(
                upstream,
                answer.relay(provider, max_event),
                idle_timeout,
                provider,
                on_end,
            ))),
            WireFormat::OpenAi if client == InboundDialect::OpenAi => {
                Ok(axum::body::Body::from_stream(sse::relay(
                    upstream,
                    openai::stream::OpenAiPassthrough::new(provider, client_wants_usage)
                        .with_max_event_bytes(max_event),
                    idle_timeout,
                    provider,
                    on_end,
                )))
            }
            WireFormat::OpenAi if client == InboundDialect::Anthropic => {
                let to_anthropic = Translate::new(
                    conversation::openai_chat::OpenAiChunkReader::new(provider, max_event),
                    conversation::anthropic::AnthropicEventWriter::new(remote_model),
                );
                primed_body(upstream, to_anthropic, idle_timeout, provider, on_end).await
            }
            WireFormat::OpenAi => {
                let to_responses = Translate::new(
                    conversation::openai_chat::OpenAiChunkReader::new(provider, max_event),
                    conversation::responses::ResponsesEventWriter::new(remote_model),
                );
                primed_body(upstream, to_responses, idle_timeout, provider, on_end).await
            }
            WireFormat::Google(answer) => {
                let wants_usage = client_wants_usage || client != InboundDialect::OpenAi;
                let translator = google::chat::GeminiStream::new(answer.model(), wants_usage)
                    .with_limits(limits);
                let stream = TranslatedStream {
                    upstream,
                    idle_timeout,
                    provider,
                    on_end,
                };
                stream.to(client, translator, remote_model, max_event).await
            }
            WireFormat::Bedrock(answer) => {
                let wants_usage = client_wants_usage || client != InboundDialect::OpenAi;
                let translator = bedrock::stream::ConverseStream::new(
                    &answer.model,
                    bedrock::request_id(ids),
                    wants_usage,
                )
                .with_limits(limits);
                let stream = TranslatedStream {
                    upstream,
                    idle_timeout,
                    provider,
                    on_end,
                };
                stream.to(client, translator, remote_model, max_event).await
            }
        }
    }
}

/// An upstream stream that a translator turns into OpenAI chunks (Gemini, Converse).
struct TranslatedStream<S> {
    upstream: S,
    idle_timeout: Duration,
    provider: &'static str,
    on_end: Box<dyn StreamEnd>,
}

impl<S, E> TranslatedStream<S>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display + Send + 'static,
{
    /// The client's body: the OpenAI chunks as they are for OpenAI clients; for Messages and
    /// Responses clients read back into the conversation model and written in their dialect.
    async fn to<T: sse::StreamTranslator>(
        self,
        client: InboundDialect,
        translator: T,
        remote_model: &str,
        max_event: usize,
    ) -> Result<axum::body::Body, ApiError> {
        let TranslatedStream {
            upstream,
            idle_timeout,
            provider,
            on_end,
        } = self;
        match client {
            InboundDialect::OpenAi => {
                primed_body(upstream, translator, idle_timeout, provider, on_end).await
            }
            InboundDialect::Anthropic => {
                let to_anthropic = Translate::new(
                    conversation::openai_chat::OpenAiChunkReader::new(provider, max_event),
                    conversation::anthropic::AnthropicEventWriter::new(remote_model),
                );
                let chain = sse::Chain::new(translator, to_anthropic);
                primed_body(upstream, chain, idle_timeout, provider, on_end).await
            }
            InboundDialect::Responses => {
                let to_responses = Translate::new(
                    conversation::openai_chat::OpenAiChunkReader::new(provider, max_event),
                    conversation::responses::ResponsesEventWriter::new(remote_model),
                );
                let chain = sse::Chain::new(translator, to_responses);
                primed_body(upstream, chain, idle_timeout, provider, on_end).await
            }
        }
    }
}

pub(crate) async fn primed_body<S, E, T>(
    mut upstream: S,
    mut translator: T,
    idle_timeout: Duration,
    provider: &'static str,
    on_end: Box<dyn StreamEnd>,
) -> Result<axum::body::Body, ApiError>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display + Send + 'static,
    T: sse::StreamTranslator,
{
    match sse::prime(&mut upstream, &mut translator, idle_timeout, provider).await {
        Ok(primed) => Ok(axum::body::Body::from_stream(sse::relay_primed(
            upstream,
            translator,
            primed,
            idle_timeout,
            provider,
            on_end,
        ))),
        Err(err) => {
            on_end.finished(translator.usage(), false);
            Err(err)
        }
    }
}

/// Builds the upstream request for the target (see the module doc).
pub async fn build(ctx: &CallContext<'_>, upstreams: &Upstreams) -> Result<Outbound, ApiError> {
    if ctx.operation != Operation::Embeddings
        && let Some(route) = anthropic::claude_route(ctx.target, ctx.dialect)
    {
        return anthropic::build(ctx, route, upstreams).await;
    }
    match ctx.dialect {
        InboundDialect::OpenAi => build_openai_chat(ctx, upstreams).await,
        InboundDialect::Anthropic => {
            if ctx.operation == Operation::CountTokens {
                return Err(ApiError::internal(
                    "count_tokens reached a target that does not speak messages",
                ));
            }
            let request = conversation::anthropic::parse_request(ctx.request)?;
            build_translated_chat(ctx, &request, upstreams).await
        }
        InboundDialect::Responses => match ctx.target.connection.provider {
            Provider::OpenAi | Provider::Azure => openai::responses::build(ctx),
            _ => {
                let request = conversation::responses::parse_request(ctx.request)?;
                build_translated_chat(ctx, &request, upstreams).await
            }
        },
    }
}

/// The call of an OpenAI-chat target (Gemini, Converse through their converters) for a request
/// of another dialect, already read into the conversation model.
async fn build_translated_chat(
    ctx: &CallContext<'_>,
    request: &conversation::Request,
    upstreams: &Upstreams,
) -> Result<Outbound, ApiError> {
    let remote = ctx.target.model.remote.as_str();
    let body = conversation::openai_chat::write_request(
        request,
        remote,
        accepts_reasoning_effort(ctx.target.connection.provider, remote),
    );
    let translated = crate::body::parse(&body, false, usize::MAX)?;
    let inner = CallContext {
        dialect: InboundDialect::OpenAi,
        operation: Operation::ChatCompletions,
        target: ctx.target,
        request: &translated,
        body: &body,
        inbound_headers: ctx.inbound_headers,
        client_api_version: None,
        trace: ctx.trace,
    };
    build_openai_chat(&inner, upstreams).await
}

/// Whether an OpenAI-chat target takes `reasoning_effort` for `model`: OpenAI's reasoning models
/// (o-series, gpt-5) and Gemini 2.5 and later (through the Gemini converter); other models refuse
/// the field, so a Messages client's `thinking` is dropped for them (DESIGN §17).
fn accepts_reasoning_effort(provider: Provider, model: &str) -> bool {
    let model = model.rsplit('/').next().unwrap_or(model);
    match provider {
        Provider::OpenAi | Provider::Azure => {
            model.starts_with('o') && model[1..].starts_with(|c: char| c.is_ascii_digit())
                || model.starts_with("gpt-5")
        }
        Provider::Google => model.starts_with("gemini-2.5") || model.starts_with("gemini-3"),
        Provider::Bedrock | Provider::Anthropic => false,
    }
}

/// The adapters of upstreams that take OpenAI chat (or translate from it themselves).
async fn build_openai_chat(
    ctx: &CallContext<'_>,
    upstreams: &Upstreams,
) -> Result<Outbound, ApiError> {
    match ctx.target.connection.provider {
        Provider::OpenAi => openai::build(ctx),
        Provider::Azure => azure::build(ctx),
        Provider::Google => google::build(ctx, upstreams).await,
        Provider::Bedrock => bedrock::build(ctx),
        // Every `anthropic` target speaks messages (`claude_route`); embeddings have no route.
        Provider::Anthropic => Err(ApiError::invalid_request(
            "embeddings are not available through anthropic connections; use an OpenAI, Azure or Google model",
        )
        .with_code("unsupported_operation")),
    }
}

/// The body an OpenAI-format upstream gets: the client's, with `model` = the remote name and,
/// for streams when the upstream accepts `stream_options`, usage requested so that tokens can be
/// counted.
pub fn openai_format_body(
    ctx: &CallContext<'_>,
    model_in_body: &str,
    ask_stream_usage: bool,
) -> Vec<u8> {
    let model = crate::body::json_string(model_in_body);
    let mut overrides: Vec<(&str, &str)> = vec![("model", &model)];
    let stream_options;
    if ask_stream_usage && ctx.request.stream && ctx.operation.is_chat() {
        stream_options = stream_options_with_usage(ctx.request);
        overrides.push(("stream_options", &stream_options));
    }
    ctx.request.object.write(&overrides, &[])
}

/// The client's `stream_options` with `include_usage: true` (other members kept).
fn stream_options_with_usage(request: &ParsedRequest<'_>) -> String {
    let existing = request
        .object
        .get("stream_options")
        .and_then(|raw| crate::body::parse_object(raw.get()));
    match existing {
        Some(object) => String::from_utf8(object.write(&[("include_usage", "true")], &[]))
            .unwrap_or_else(|_| r#"{"include_usage":true}"#.to_owned()),
        None => r#"{"include_usage":true}"#.to_owned(),
    }
}

#[derive(Deserialize)]
struct UsageOnly {
    usage: Option<OpenAiUsage>,
}

/// Usage of a non-streamed OpenAI-format answer, if it reports one; an error when the answer is
/// not a JSON object. One parse on the common path; a second only to tell an unreadable `usage`
/// (kept as unknown, the reservation's estimate stands) from an answer that is not JSON.
pub fn openai_usage(body: &[u8], provider: &str) -> Result<Option<Usage>, ApiError> {
    let is_object = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if is_object {
        match serde_json::from_slice::<UsageOnly>(body) {
            Ok(only) => return Ok(only.usage.map(Usage::from)),
            Err(_) if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() => {
                return Ok(None);
            }
            Err(_) => {}
        }
    }
    Err(ApiError::upstream_bad_answer(
        provider,
        "a 2xx answer that is not a JSON object",
    ))
}

#[derive(Deserialize)]
struct UpstreamErrorBody {
    error: Option<UpstreamError>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct UpstreamError {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    param: Option<serde_json::Value>,
    code: Option<serde_json::Value>,
}

fn as_text(value: Option<serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Maps an upstream error answer to the OpenAI-shaped error the client gets (DESIGN §16).
pub fn upstream_error(
    provider: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiError {
    if matches!(status.as_u16(), 401 | 407) {
        // The provider's message may quote part of our credential: never pass it on.
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!(
                "the {provider} provider refused the gateway connection's credential (HTTP {}); your API key for this gateway was accepted",
                status.as_u16()
            ),
        )
        .with_code("upstream_credential_refused");
    }
    let parsed: Option<UpstreamErrorBody> = serde_json::from_slice(body).ok();
    let (message, kind, param, code) = match parsed {
        Some(UpstreamErrorBody { error: Some(e), .. }) => (
            e.message,
            as_text(e.kind),
            as_text(e.param),
            as_text(e.code),
        ),
        Some(UpstreamErrorBody {
            message: Some(m), ..
        }) => (Some(m), None, None, None),
        _ => (None, None, None, None),
    };
    let message = message.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            format!("upstream {provider} answered HTTP {}", status.as_u16())
        } else {
            format!(
                "upstream {provider} answered HTTP {}: {}",
                status.as_u16(),
                text.chars().take(500).collect::<String>()
            )
        }
    });
    let kept = matches!(
        status.as_u16(),
        400 | 403 | 404 | 408 | 409 | 413 | 422 | 429 | 500 | 502 | 503 | 504
    );
    let out_status = if kept {
        status
    } else {
        StatusCode::BAD_GATEWAY
    };
    let default_kind = match out_status.as_u16() {
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        403 => "permission_error",
        _ => "invalid_request_error",
    };
    let mut err = ApiError::new(out_status, default_kind, message);
    err.kind = match kind.as_deref() {
        Some("invalid_request_error") => "invalid_request_error",
        Some("server_error") => "server_error",
        Some("rate_limit_error") | Some("requests") | Some("tokens") => "rate_limit_error",
        Some("insufficient_quota") => "insufficient_quota",
        _ => default_kind,
    };
    err.param = param;
    err.code = code;
    if out_status == StatusCode::TOO_MANY_REQUESTS || out_status == StatusCode::SERVICE_UNAVAILABLE
    {
        for name in ["retry-after", "retry-after-ms"] {
            if let Some(value) = headers.get(name) {
                err.headers
                    .push((HeaderName::from_static(name), value.clone()));
            }
        }
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_is_made_as_hypers_client_writes_it_for_plain_http_only() {
        let host = |url: &str| {
            host_header(&parse_uri(url).unwrap()).map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            host("http://mock:8080/v1/chat/completions").as_deref(),
            Some("mock:8080")
        );
        assert_eq!(host("http://mock:80/v1").as_deref(), Some("mock"));
        assert_eq!(host("http://mock/v1").as_deref(), Some("mock"));
        assert_eq!(host("http://[::1]:9000/").as_deref(), Some("[::1]:9000"));
        assert_eq!(host("http://user:pw@mock:81/").as_deref(), Some("mock:81"));
        assert_eq!(host("https://api.openai.com/v1"), None);
        assert_eq!(host("https://api.openai.com:8443/v1"), None);
    }

    #[test]
    fn azure_content_filter_stays_a_400_with_its_code() {
        let body = br#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400}}"#;
        let err = upstream_error("azure", StatusCode::BAD_REQUEST, &HeaderMap::new(), body);
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.code.as_deref(), Some("content_filter"));
        assert_eq!(err.param.as_deref(), Some("prompt"));
        assert_eq!(err.kind, "invalid_request_error");
    }

    #[test]
    fn azure_429_keeps_retry_headers_and_numeric_code() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        headers.insert("retry-after-ms", HeaderValue::from_static("6500"));
        let body = br#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded the rate limit. Please retry after 7 seconds."}}"#;
        let err = upstream_error("azure", StatusCode::TOO_MANY_REQUESTS, &headers, body);
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.code.as_deref(), Some("429"));
        assert!(
            err.headers
                .iter()
                .any(|(n, v)| n == "retry-after" && v == "7")
        );
        assert!(
            err.headers
                .iter()
                .any(|(n, v)| n == "retry-after-ms" && v == "6500")
        );
    }

    #[test]
    fn credential_refusal_becomes_502_without_the_provider_message() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-abc***xyz.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let err = upstream_error("openai", StatusCode::UNAUTHORIZED, &HeaderMap::new(), body);
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        assert!(!err.message.contains("sk-abc"));
        assert!(err.message.contains("credential"));
    }

    #[test]
    fn other_statuses_become_502_and_non_json_bodies_are_quoted() {
        let err = upstream_error(
            "openai",
            StatusCode::IM_A_TEAPOT,
            &HeaderMap::new(),
            b"short and stout",
        );
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        assert!(err.message.contains("short and stout"));
        let err = upstream_error("azure", StatusCode::NOT_FOUND, &HeaderMap::new(), br#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#);
        assert_eq!(err.status, StatusCode::NOT_FOUND);
        assert_eq!(err.code.as_deref(), Some("DeploymentNotFound"));
    }

    #[test]
    fn usage_is_read_from_answers() {
        let usage = openai_usage(
            br#"{"id":"x","usage":{"prompt_tokens":8,"completion_tokens":9,"total_tokens":17}}"#,
            "openai",
        )
        .unwrap()
        .unwrap();
        assert_eq!(usage.total(), 17);
        assert_eq!(openai_usage(br#"{"id":"x"}"#, "openai").unwrap(), None);
        // Every kind a chat completion reports (wire formats §1.7: a reasoning model, a cache hit).
        let usage = openai_usage(
            br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1036,"completion_tokens":377,"total_tokens":1413,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":320,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
            "azure",
        )
        .unwrap();
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 1036,
                completion_tokens: 377,
                total_tokens: 1413,
                cache_read_tokens: 1024,
                cache_write_tokens: 0,
                reasoning_tokens: 320,
            })
        );
        // Embeddings: prompt tokens only.
        let usage = openai_usage(
            br#"{"object":"list","data":[],"model":"text-embedding-3-small","usage":{"prompt_tokens":7,"total_tokens":7}}"#,
            "openai",
        )
        .unwrap();
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 7,
                total_tokens: 7,
                ..Usage::default()
            })
        );
        // Valid JSON with a usage the gateway cannot read: relayed, the estimate stands.
        assert_eq!(
            openai_usage(br#" {"usage":{"prompt_tokens":-1}}"#, "openai").unwrap(),
            None
        );
    }

    #[test]
    fn a_2xx_answer_that_is_not_a_json_object_is_refused() {
        for body in [
            &b""[..],
            b"<html>502 Bad Gateway</html>",
            b"{\"id\":\"x\"",
            b"{\"id\":\"x\"} trailing",
            b"[1,2]",
            b"null",
        ] {
            let err = openai_usage(body, "azure").unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_GATEWAY, "{body:?}");
            assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
            assert!(err.message.contains("azure"), "{}", err.message);
        }
    }
}
