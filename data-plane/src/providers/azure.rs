//! Azure OpenAI and Azure AI Foundry (DESIGN §10, wire formats §2).
//!
//! Three URL forms, all with the `api-key` header:
//! - classic: `{endpoint}/openai/deployments/{deployment}/{op}?api-version=...` (deployment = the
//!   model's `--deployment`, else its remote name);
//! - `api_version=v1`: `{endpoint}/openai/v1/{op}`, deployment name in the body's `model`;
//! - Foundry models endpoint (`*.services.ai.azure.com` or an endpoint ending in `/models`, model
//!   without deployment): `{endpoint}/models/{op}?api-version=...`, model in the body.
//!
//! The `api-version` is the connection's `api_version` option, else (classic form only) the one the
//! client sent on an Azure-style inbound route, else `2024-05-01-preview`. The connection wins
//! because the admin knows which versions the resource serves.
//!
//! Azure validates bodies against the api-version's schema: `stream_options` (which the gateway
//! adds to count streamed tokens) exists from `2024-09-01-preview` and in `v1`; older versions and
//! the Foundry models endpoint reject it, so it is only added there. Streams without a usage
//! chunk settle their token reservation with the estimate.
//!
//! The Responses API has its own routes ([`responses_endpoint`]).

use super::{CallContext, Outbound, WireFormat, openai_format_body};
use crate::errors::ApiError;
use axum::http::{HeaderName, HeaderValue};
use llm_proxy_catalog::{ConnectionOption, DEFAULT_AZURE_RESPONSES_API_VERSION, Provider};
use secrecy::ExposeSecret as _;

const PROVIDER: &str = Provider::Azure.as_str();

pub const DEFAULT_API_VERSION: &str = "2024-05-01-preview";

/// First dated api-version whose schema has `stream_options`.
const FIRST_VERSION_WITH_STREAM_OPTIONS: &str = "2024-09-01";

fn accepts_stream_options(api_version: &str) -> bool {
    api_version == "v1"
        || api_version
            .get(..10)
            .is_some_and(|date| date >= FIRST_VERSION_WITH_STREAM_OPTIONS)
}

fn is_foundry_models_endpoint(endpoint: &str) -> bool {
    let host = url::Url::parse(endpoint)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    host.ends_with(".services.ai.azure.com") || endpoint.ends_with("/models")
}

fn with_segments(
    base: &str,
    segments: &[&str],
    api_version: Option<&str>,
) -> Result<String, ApiError> {
    let mut url = url::Url::parse(base).map_err(|_| {
        ApiError::upstream_bad_answer(PROVIDER, "the connection's endpoint is not a valid URL")
    })?;
    {
        let mut path = url.path_segments_mut().map_err(|_| {
            ApiError::upstream_bad_answer(PROVIDER, "the connection's endpoint cannot take a path")
        })?;
        path.pop_if_empty();
        for segment in segments {
            for part in segment.split('/') {
                path.push(part);
            }
        }
    }
    if let Some(version) = api_version {
        url.query_pairs_mut().append_pair("api-version", version);
    }
    Ok(url.into())
}

/// The `api-key` header of a connection, if it has a credential.
fn api_key_header(
    connection: &crate::index::ConnectionEntry,
) -> Result<Option<(HeaderName, HeaderValue)>, ApiError> {
    let credential = connection.credential.expose_secret();
    if credential.is_empty() {
        return Ok(None);
    }
    let mut value = HeaderValue::from_str(credential).map_err(|_| {
        ApiError::upstream_bad_answer(
            PROVIDER,
            "the connection's credential is not a valid header value",
        )
    })?;
    value.set_sensitive(true);
    Ok(Some((HeaderName::from_static("api-key"), value)))
}

/// The Responses API of an Azure connection (DESIGN §17): `{base}/openai/v1/responses` with
/// `api_version=v1` (or an endpoint pasted with `/openai/v1`), else the dated route
/// `{base}/openai/responses?api-version=V` with the connection's `responses_api_version`
/// (default [`DEFAULT_AZURE_RESPONSES_API_VERSION`]). The model goes in the body: the deployment
/// name, else the remote name.
pub fn responses_endpoint(
    connection: &crate::index::ConnectionEntry,
) -> Result<super::openai::responses::Endpoint, ApiError> {
    let endpoint = connection.endpoint.trim_end_matches('/');
    let configured = connection.option(ConnectionOption::ApiVersion);
    let v1 = configured == Some("v1") || (configured.is_none() && endpoint.ends_with("/openai/v1"));
    let base = endpoint
        .trim_end_matches("/openai/v1")
        .trim_end_matches("/openai")
        .trim_end_matches("/models");
    let (base, query) = if v1 {
        (
            with_segments(base, &["openai", "v1", "responses"], None)?,
            None,
        )
    } else {
        let version = connection
            .option(ConnectionOption::ResponsesApiVersion)
            .unwrap_or(DEFAULT_AZURE_RESPONSES_API_VERSION);
        if !version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ApiError::upstream_bad_answer(
                PROVIDER,
                "the connection's responses_api_version is not a valid api-version",
            ));
        }
        (
            with_segments(base, &["openai", "responses"], None)?,
            Some(format!("api-version={version}")),
        )
    };
    Ok(super::openai::responses::Endpoint {
        base,
        query,
        auth: api_key_header(connection)?,
    })
}

pub fn build(ctx: &CallContext<'_>) -> Result<Outbound, ApiError> {
    let connection = &ctx.target.connection;
    let model = &ctx.target.model;
    let endpoint = connection.endpoint.trim_end_matches('/');
    let configured = connection.option(ConnectionOption::ApiVersion);
    let op = ctx.operation.path();
    // An endpoint pasted with its `/openai/v1` path means the v1 API.
    let v1 = configured == Some("v1") || (configured.is_none() && endpoint.ends_with("/openai/v1"));
    let (url, model_in_body, stream_usage) = if v1 {
        let base = endpoint
            .trim_end_matches("/openai/v1")
            .trim_end_matches("/openai");
        (
            with_segments(base, &["openai", "v1", op], None)?,
            model.deployment.as_deref().unwrap_or(&model.remote),
            true,
        )
    } else if model.deployment.is_none() && is_foundry_models_endpoint(endpoint) {
        let base = endpoint.trim_end_matches("/models");
        let api_version = configured.unwrap_or(DEFAULT_API_VERSION);
        (
            with_segments(base, &["models", op], Some(api_version))?,
            model.remote.as_str(),
            false,
        )
    } else {
        let base = endpoint.trim_end_matches("/openai");
        let api_version = configured
            .or(ctx.client_api_version)
            .unwrap_or(DEFAULT_API_VERSION);
        let deployment = model.deployment.as_deref().unwrap_or(&model.remote);
        (
            with_segments(
                base,
                &["openai", "deployments", deployment, op],
                Some(api_version),
            )?,
            model.remote.as_str(),
            accepts_stream_options(api_version),
        )
    };
    Ok(Outbound {
        url: url.into(),
        headers: api_key_header(connection)?.into_iter().collect(),
        body: openai_format_body(ctx, model_in_body, stream_usage),
        wire: WireFormat::OpenAi,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use crate::index::{ConnectionEntry, Limits, ModelEntry, Provider, Target};
    use crate::providers::Operation;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    /// What a [`Target`] borrows from the index.
    struct Fixture {
        alias: Arc<str>,
        model: ModelEntry,
        connection: ConnectionEntry,
    }

    impl Fixture {
        fn target(&self) -> Target<'_> {
            Target {
                assignment_id: "asg-1",
                alias: &self.alias,
                weight: 1,
                limits: Limits::default(),
                model: &self.model,
                connection: &self.connection,
                metrics: None,
                position: Default::default(),
            }
        }
    }

    fn target(endpoint: &str, api_version: Option<&str>, deployment: Option<&str>) -> Fixture {
        let mut options = BTreeMap::new();
        if let Some(v) = api_version {
            options.insert("api_version".to_owned(), v.to_owned());
        }
        Fixture {
            alias: "a".into(),
            model: ModelEntry {
                id: "model-1".into(),
                name: "gpt-4o".into(),
                remote: "gpt-4o".into(),
                deployment: deployment.map(Into::into),
                prices: None,
            },
            connection: ConnectionEntry {
                id: "conn-1".into(),
                name: "Azure".into(),
                provider: Provider::Azure,
                endpoint: endpoint.into(),
                credential: "azure-key".to_owned().into(),
                options,
                timeout: Duration::from_secs(5),
                cache: Default::default(),
            },
        }
    }

    fn outbound(t: &Fixture, client_version: Option<&str>, op: Operation) -> (String, String) {
        let request = body::parse(
            br#"{"model":"alias","input":"x"}"#,
            true,
            crate::limits::Limits::default().max_top_level_keys,
        )
        .unwrap();
        let target = t.target();
        let ctx = CallContext {
            dialect: crate::inbound::InboundDialect::OpenAi,
            operation: op,
            target: &target,
            request: &request,
            body: b"",
            inbound_headers: &Default::default(),
            client_api_version: client_version,
            trace: crate::trace::TraceContext::of_request(&Default::default()),
        };
        let out = build(&ctx).unwrap();
        assert!(
            out.headers
                .iter()
                .any(|(n, v)| n == "api-key" && v == "azure-key")
        );
        let sent: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
        (
            out.url.to_text(),
            sent["model"].as_str().unwrap().to_owned(),
        )
    }

    #[test]
    fn classic_deployment_url_with_default_connection_and_client_versions() {
        let t = target("https://res.openai.azure.com", None, Some("prod-4o"));
        let (url, _) = outbound(&t, None, Operation::ChatCompletions);
        assert_eq!(
            url,
            "https://res.openai.azure.com/openai/deployments/prod-4o/chat/completions?api-version=2024-05-01-preview"
        );
        let (url, _) = outbound(&t, Some("2024-10-21"), Operation::Embeddings);
        assert_eq!(
            url,
            "https://res.openai.azure.com/openai/deployments/prod-4o/embeddings?api-version=2024-10-21"
        );
        let pinned = target(
            "https://res.cognitiveservices.azure.com/openai",
            Some("2025-01-01-preview"),
            None,
        );
        let (url, _) = outbound(&pinned, Some("2024-10-21"), Operation::ChatCompletions);
        assert_eq!(
            url,
            "https://res.cognitiveservices.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview"
        );
    }

    #[test]
    fn v1_api_puts_the_deployment_in_the_body() {
        let t = target("https://res.openai.azure.com", Some("v1"), Some("prod-4o"));
        let (url, model) = outbound(&t, None, Operation::ChatCompletions);
        assert_eq!(
            url,
            "https://res.openai.azure.com/openai/v1/chat/completions"
        );
        assert_eq!(model, "prod-4o");
    }

    #[test]
    fn stream_options_only_for_api_versions_that_accept_them() {
        let stream = |t: &Fixture, client: Option<&str>| {
            let request = body::parse(
                br#"{"model":"a","stream":true,"messages":[]}"#,
                true,
                crate::limits::Limits::default().max_top_level_keys,
            )
            .unwrap();
            let target = t.target();
            let ctx = CallContext {
                dialect: crate::inbound::InboundDialect::OpenAi,
                operation: Operation::ChatCompletions,
                target: &target,
                request: &request,
                body: b"",
                inbound_headers: &Default::default(),
                client_api_version: client,
                trace: crate::trace::TraceContext::of_request(&Default::default()),
            };
            let sent: serde_json::Value =
                serde_json::from_slice(&build(&ctx).unwrap().body).unwrap();
            sent.get("stream_options").is_some()
        };
        let classic = target("https://res.openai.azure.com", None, Some("d"));
        assert!(
            !stream(&classic, None),
            "2024-05-01-preview rejects stream_options"
        );
        assert!(stream(&classic, Some("2024-10-21")));
        assert!(stream(
            &target("https://res.openai.azure.com", Some("v1"), Some("d")),
            None
        ));
        assert!(!stream(
            &target("https://res.services.ai.azure.com", None, None),
            None
        ));
        let pasted_v1 = target("https://res.openai.azure.com/openai/v1", None, Some("d"));
        assert!(stream(&pasted_v1, None));
        let (url, _) = outbound(&pasted_v1, None, Operation::ChatCompletions);
        assert_eq!(
            url,
            "https://res.openai.azure.com/openai/v1/chat/completions"
        );
    }

    #[test]
    fn foundry_models_endpoint_without_deployment() {
        let t = target("https://res.services.ai.azure.com", None, None);
        let (url, model) = outbound(&t, None, Operation::ChatCompletions);
        assert_eq!(
            url,
            "https://res.services.ai.azure.com/models/chat/completions?api-version=2024-05-01-preview"
        );
        assert_eq!(model, "gpt-4o");
        let t = target("https://res.services.ai.azure.com/models", None, None);
        let (url, _) = outbound(&t, Some("2024-10-21"), Operation::Embeddings);
        assert_eq!(
            url,
            "https://res.services.ai.azure.com/models/embeddings?api-version=2024-05-01-preview"
        );
    }

    #[test]
    fn responses_take_the_v1_route_or_the_dated_one_with_its_own_version() {
        let url = |t: &Fixture| responses_endpoint(&t.connection).unwrap().url("", None);
        assert_eq!(
            url(&target("https://res.openai.azure.com", None, None)),
            "https://res.openai.azure.com/openai/responses?api-version=2025-04-01-preview"
        );
        // The chat api_version does not apply to the Responses route; its own option does.
        let mut dated = target(
            "https://res.openai.azure.com/openai",
            Some("2024-10-21"),
            None,
        );
        dated
            .connection
            .options
            .insert("responses_api_version".into(), "2025-03-01-preview".into());
        assert_eq!(
            responses_endpoint(&dated.connection)
                .unwrap()
                .url("/resp_1", None),
            "https://res.openai.azure.com/openai/responses/resp_1?api-version=2025-03-01-preview"
        );
        assert_eq!(
            url(&target("https://res.openai.azure.com", Some("v1"), None)),
            "https://res.openai.azure.com/openai/v1/responses"
        );
        assert_eq!(
            url(&target(
                "https://res.openai.azure.com/openai/v1/",
                None,
                None
            )),
            "https://res.openai.azure.com/openai/v1/responses"
        );
        let endpoint =
            responses_endpoint(&target("https://r.openai.azure.com", None, None).connection)
                .unwrap();
        let (name, value) = endpoint.auth.unwrap();
        assert_eq!(name, "api-key");
        assert!(value.is_sensitive());
    }
}
