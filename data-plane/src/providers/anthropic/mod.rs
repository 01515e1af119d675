//! The `anthropic` provider (Anthropic's API and Azure Foundry's Claude endpoint), and the
//! Messages wire shared by every target that speaks it (DESIGN §17): Claude on Bedrock
//! (`bedrock::claude`) and on Vertex (`google::claude`). Which targets speak it:
//! [`claude_route`].
//!
//! - URL: `{endpoint}/v1/messages` (`…/count_tokens`); an endpoint that already ends in `/v1`
//!   gets `/messages`. Foundry: `https://{resource}.services.ai.azure.com/anthropic`.
//! - Auth: `x-api-key` with the connection's credential.
//! - `anthropic-version`: the client's when it sent one, else the connection's
//!   `anthropic_version` option, else `2023-06-01`; `anthropic-beta` is passed on byte for byte.
//! - A Messages client's body goes upstream byte for byte with only `model` rewritten (Bedrock
//!   InvokeModel and Vertex: `model` replaced by `anthropic_version`, Bedrock's `anthropic-beta`
//!   header values moved into an `anthropic_beta` array, and for InvokeModel `stream` dropped,
//!   since the URL says it). An OpenAI chat client's request is converted through the
//!   conversation model.

pub mod wire;

use super::{CallContext, Outbound, Upstreams, WireFormat, bedrock, google};
use crate::conversation::anthropic::{self as messages, AnthropicTarget};
use crate::errors::ApiError;
use crate::inbound::{InboundDialect, Operation};
use crate::index::{Provider, Target};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use llm_proxy_catalog::{BedrockAnthropicApi, Choice as _, ConnectionOption};
use secrecy::ExposeSecret as _;
use wire::{Framing, MessagesAnswer};

const ANTHROPIC_VERSION: &str = "anthropic-version";
const ANTHROPIC_BETA: &str = "anthropic-beta";

/// The `anthropic_version` Bedrock InvokeModel wants in the body.
pub const BEDROCK_ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";
/// The `anthropic_version` Vertex `rawPredict` wants in the body.
pub const VERTEX_ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// How a target that speaks Anthropic Messages is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaudeRoute {
    /// Anthropic's API or Foundry (`anthropic` provider).
    Anthropic,
    /// Bedrock InvokeModel / InvokeModelWithResponseStream.
    BedrockInvoke,
    /// Bedrock's Messages endpoint `{endpoint}/anthropic/v1/messages`.
    BedrockMessages,
    /// Vertex `publishers/anthropic/models/{model}:rawPredict` / `:streamRawPredict`.
    Vertex,
}

impl ClaudeRoute {
    /// Whether the body names the model (else the URL does, and the body carries
    /// `anthropic_version`).
    fn model_in_body(self) -> bool {
        matches!(self, ClaudeRoute::Anthropic | ClaudeRoute::BedrockMessages)
    }

    fn body_version(self) -> Option<&'static str> {
        match self {
            ClaudeRoute::BedrockInvoke => Some(BEDROCK_ANTHROPIC_VERSION),
            ClaudeRoute::Vertex => Some(VERTEX_ANTHROPIC_VERSION),
            ClaudeRoute::Anthropic | ClaudeRoute::BedrockMessages => None,
        }
    }
}

/// The Claude route of `target` for a `client` of that dialect, if the target is called in
/// Anthropic's Messages format: every `anthropic` connection; on Vertex, models named `claude…`;
/// on Bedrock, model ids containing `anthropic.claude` for Messages and Responses clients (the
/// Messages wire keeps thinking signatures and cache usage for them), and for OpenAI chat clients
/// only when the connection sets `anthropic_api` (else they keep Converse, whose translation
/// covers more of OpenAI's chat request: documents, JSON mode, service tiers).
pub fn claude_route(target: &Target<'_>, client: InboundDialect) -> Option<ClaudeRoute> {
    let connection = target.connection;
    let remote = target.model.remote.as_str();
    match connection.provider {
        Provider::Anthropic => Some(ClaudeRoute::Anthropic),
        Provider::Bedrock if remote.contains("anthropic.claude") => {
            let option = connection
                .option(ConnectionOption::AnthropicApi)
                .and_then(BedrockAnthropicApi::parse);
            let api = match (option, client) {
                (Some(api), _) => api,
                (None, InboundDialect::Anthropic | InboundDialect::Responses) => {
                    bedrock_api_of_model(remote)
                }
                (None, InboundDialect::OpenAi) => return None,
            };
            Some(match api {
                BedrockAnthropicApi::Invoke => ClaudeRoute::BedrockInvoke,
                BedrockAnthropicApi::Messages => ClaudeRoute::BedrockMessages,
            })
        }
        Provider::Google if google::claude::is_claude(connection, remote) => {
            Some(ClaudeRoute::Vertex)
        }
        _ => None,
    }
}

/// Claude 4.6 and earlier are called through InvokeModel; newer Claude models need Bedrock's
/// Messages endpoint (DESIGN §17). The version is read from the id
/// (`anthropic.claude-opus-4-7-v1`, `us.anthropic.claude-3-5-sonnet-20240620-v1:0`).
pub fn bedrock_api_of_model(model: &str) -> BedrockAnthropicApi {
    let Some((_, rest)) = model.split_once("claude-") else {
        return BedrockAnthropicApi::Invoke;
    };
    let mut numbers = rest
        .split(['-', ':', '.'])
        .skip_while(|part| part.parse::<u32>().is_err())
        .map_while(|part| part.parse::<u32>().ok())
        // A date (20250929) or `v1` ends the version.
        .take_while(|n| *n < 100);
    let major = numbers.next().unwrap_or(0);
    let minor = numbers.next().unwrap_or(0);
    if major > 4 || (major == 4 && minor >= 7) {
        BedrockAnthropicApi::Messages
    } else {
        BedrockAnthropicApi::Invoke
    }
}

/// `{endpoint}/v1/{path}`, or `{endpoint}/{path}` when the endpoint ends in `/v1`.
pub fn url(endpoint: &str, operation: Operation) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    let path = operation.path();
    if endpoint.ends_with("/v1") {
        format!("{endpoint}/{path}")
    } else {
        format!("{endpoint}/v1/{path}")
    }
}

fn header_value(value: &str, what: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(value).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("the connection's {what} is not a valid header value"),
        )
        .with_code("upstream_config_invalid")
    })
}

/// The Messages body for `route`: the client's bytes with only `model` rewritten (a Messages
/// client), or the conversion of an OpenAI chat request.
fn body_for(ctx: &CallContext<'_>, route: ClaudeRoute) -> Result<Vec<u8>, ApiError> {
    let remote = ctx.target.model.remote.as_str();
    match ctx.dialect {
        InboundDialect::Anthropic => {
            let object = &ctx.request.object;
            let member = if route.model_in_body() {
                format!("\"model\":{}", crate::body::json_string(remote))
            } else {
                let mut member = format!(
                    "\"anthropic_version\":{}",
                    crate::body::json_string(route.body_version().unwrap_or_default())
                );
                if route == ClaudeRoute::BedrockInvoke
                    && let Some(betas) = beta_array(ctx)
                {
                    member.push_str(",\"anthropic_beta\":");
                    member.push_str(&betas);
                }
                member
            };
            let spliced = crate::body::replace_member(ctx.body, object, "model", &member)
                .ok_or_else(|| {
                    ApiError::invalid_request("you must provide a model parameter")
                        .with_param("model")
                })?;
            if route == ClaudeRoute::BedrockInvoke {
                return Ok(without_stream(spliced));
            }
            Ok(spliced)
        }
        InboundDialect::OpenAi | InboundDialect::Responses => {
            let provider = ctx.target.connection.provider.as_str();
            let mut request = if ctx.dialect == InboundDialect::Responses {
                crate::conversation::responses::parse_request(ctx.request)?
            } else {
                crate::conversation::openai_chat::parse_request(ctx.request, provider)?
            };
            if route.model_in_body() && refuses_sampling(connection_version(ctx)) {
                // DESIGN §17: this version refuses them; they only tune sampling, so they are
                // dropped rather than refused.
                request.temperature = None;
                request.top_p = None;
                request.top_k = None;
            }
            let target = AnthropicTarget {
                model: route.model_in_body().then_some(remote),
                anthropic_version_in_body: route.body_version(),
            };
            let body = messages::write_request(&request, &target).map_err(|err| {
                // The Responses API names the schema `text.format`.
                if ctx.dialect == InboundDialect::Responses
                    && err.param.as_deref() == Some("response_format")
                {
                    ApiError::invalid_request(
                        "`text.format`: Claude models cannot enforce a json_schema format; remove it or describe the format in the instructions",
                    )
                    .with_param("text.format")
                    .with_code("unsupported_parameter")
                } else {
                    err
                }
            })?;
            if route == ClaudeRoute::BedrockInvoke {
                return Ok(without_stream(body));
            }
            Ok(body)
        }
    }
}

/// The `anthropic-version` a translated request is sent with: the connection's option, else the
/// default.
fn connection_version<'a>(ctx: &CallContext<'a>) -> &'a str {
    ctx.target
        .connection
        .option(ConnectionOption::AnthropicVersion)
        .unwrap_or(llm_proxy_catalog::DEFAULT_ANTHROPIC_VERSION)
}

/// Whether `version` (a date) refuses `temperature`, `top_p` and `top_k`: `2026-10-21` and later.
fn refuses_sampling(version: &str) -> bool {
    version >= SAMPLING_FREE_VERSION
}

/// The first `anthropic-version` without sampling parameters.
const SAMPLING_FREE_VERSION: &str = "2026-10-21";

/// InvokeModel takes no `stream` member (the URL says whether to stream).
fn without_stream(body: Vec<u8>) -> Vec<u8> {
    let Ok(parsed) = crate::body::parse(&body, false, usize::MAX) else {
        return body;
    };
    crate::body::remove_member(&body, &parsed.object, "stream").unwrap_or(body)
}

/// The client's `anthropic-beta` header values as a JSON array (Bedrock InvokeModel takes them in
/// the body).
fn beta_array(ctx: &CallContext<'_>) -> Option<String> {
    let betas: Vec<&str> = ctx
        .inbound_headers
        .get_all(ANTHROPIC_BETA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if betas.is_empty() {
        return None;
    }
    serde_json::to_string(&betas).ok()
}

/// `anthropic-version` (the client's, else the option, else the default) and the client's
/// `anthropic-beta` headers, for targets that take them as headers.
fn version_and_beta_headers(
    ctx: &CallContext<'_>,
) -> Result<Vec<(HeaderName, HeaderValue)>, ApiError> {
    let mut headers = Vec::with_capacity(2);
    let client_version = match ctx.dialect {
        InboundDialect::Anthropic => ctx.inbound_headers.get(ANTHROPIC_VERSION).cloned(),
        InboundDialect::OpenAi | InboundDialect::Responses => None,
    };
    let version = match client_version {
        Some(version) => version,
        None => header_value(connection_version(ctx), "anthropic_version")?,
    };
    headers.push((HeaderName::from_static(ANTHROPIC_VERSION), version));
    if ctx.dialect == InboundDialect::Anthropic {
        for beta in ctx.inbound_headers.get_all(ANTHROPIC_BETA) {
            headers.push((HeaderName::from_static(ANTHROPIC_BETA), beta.clone()));
        }
    }
    Ok(headers)
}

/// Builds the call of a target that speaks Anthropic Messages.
pub async fn build(
    ctx: &CallContext<'_>,
    route: ClaudeRoute,
    upstreams: &Upstreams,
) -> Result<Outbound, ApiError> {
    if ctx.operation == Operation::CountTokens && route != ClaudeRoute::Anthropic {
        return Err(ApiError::internal(
            "count_tokens is answered locally for this target",
        ));
    }
    let body = body_for(ctx, route)?;
    let remote = ctx.target.model.remote.as_str();
    let streaming = ctx.request.stream && ctx.operation.is_chat();
    let answer = |framing, bedrock_errors| MessagesAnswer {
        model: remote.to_owned(),
        framing,
        count_tokens: ctx.operation == Operation::CountTokens,
        bedrock_errors,
    };
    match route {
        ClaudeRoute::Anthropic => {
            let connection = ctx.target.connection;
            let make = || {
                let mut key =
                    header_value(connection.credential.expose_secret().trim(), "credential")?;
                key.set_sensitive(true);
                Ok::<_, ApiError>(key)
            };
            let key = match connection.cache.credential_header(|| make().ok()) {
                Some(key) => key,
                None => make()?,
            };
            let mut headers = vec![(HeaderName::from_static("x-api-key"), key)];
            headers.extend(version_and_beta_headers(ctx)?);
            let operation = match ctx.operation {
                Operation::CountTokens => Operation::CountTokens,
                _ => Operation::Messages,
            };
            Ok(Outbound {
                url: super::UpstreamUrl::cached(connection, operation, || {
                    url(&connection.endpoint, operation)
                }),
                headers,
                body,
                wire: WireFormat::Messages(answer(Framing::Sse, false)),
            })
        }
        ClaudeRoute::BedrockInvoke => {
            let url =
                bedrock::claude::invoke_url(&ctx.target.connection.endpoint, remote, streaming);
            let headers = bedrock::auth_headers(ctx.target.connection, &url, &body)?;
            Ok(Outbound {
                url: url.into(),
                headers,
                body,
                wire: WireFormat::Messages(answer(Framing::EventStream, true)),
            })
        }
        ClaudeRoute::BedrockMessages => {
            let url = bedrock::claude::messages_url(&ctx.target.connection.endpoint);
            let mut headers = bedrock::auth_headers(ctx.target.connection, &url, &body)?;
            headers.extend(version_and_beta_headers(ctx)?);
            Ok(Outbound {
                url: url.into(),
                headers,
                body,
                wire: WireFormat::Messages(answer(Framing::Sse, true)),
            })
        }
        ClaudeRoute::Vertex => {
            let (url, auth) = google::claude::url_and_auth(ctx, upstreams, streaming).await?;
            let mut headers = vec![auth];
            if ctx.dialect == InboundDialect::Anthropic {
                for beta in ctx.inbound_headers.get_all(ANTHROPIC_BETA) {
                    headers.push((HeaderName::from_static(ANTHROPIC_BETA), beta.clone()));
                }
            }
            Ok(Outbound {
                url: url.into(),
                headers,
                body,
                wire: WireFormat::Messages(answer(Framing::Sse, false)),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bedrock_api_follows_the_model_version() {
        for (id, api) in [
            (
                "anthropic.claude-3-5-sonnet-20240620-v1:0",
                BedrockAnthropicApi::Invoke,
            ),
            (
                "us.anthropic.claude-3-7-sonnet-20250219-v1:0",
                BedrockAnthropicApi::Invoke,
            ),
            (
                "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
                BedrockAnthropicApi::Invoke,
            ),
            ("anthropic.claude-opus-4-6-v1", BedrockAnthropicApi::Invoke),
            (
                "anthropic.claude-opus-4-7-v1",
                BedrockAnthropicApi::Messages,
            ),
            (
                "anthropic.claude-sonnet-5-v1:0",
                BedrockAnthropicApi::Messages,
            ),
            ("anthropic.claude-v2:1", BedrockAnthropicApi::Invoke),
            ("anthropic.claude-instant-v1", BedrockAnthropicApi::Invoke),
        ] {
            assert_eq!(bedrock_api_of_model(id), api, "{id}");
        }
    }

    #[test]
    fn versions_from_2026_10_21_refuse_sampling() {
        assert!(!refuses_sampling("2023-06-01"));
        assert!(refuses_sampling("2026-10-21"));
        assert!(refuses_sampling("2027-01-01"));
    }

    #[test]
    fn urls_add_v1_unless_the_endpoint_has_it() {
        assert_eq!(
            url("https://api.anthropic.com", Operation::Messages),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            url(
                "https://res.services.ai.azure.com/anthropic/",
                Operation::CountTokens
            ),
            "https://res.services.ai.azure.com/anthropic/v1/messages/count_tokens"
        );
        assert_eq!(
            url("http://127.0.0.1:9/v1", Operation::Messages),
            "http://127.0.0.1:9/v1/messages"
        );
    }
}
