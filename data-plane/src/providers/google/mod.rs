//! Google: Gemini API (AI Studio) and Vertex AI, with the native `generateContent`,
//! `streamGenerateContent?alt=sse` and embedding methods (DESIGN §10, wire formats §3, §4);
//! Claude on Vertex through `rawPredict` ([`claude`], DESIGN §17).
//!
//! Flavour and auth come from the connection (DESIGN §16):
//! - `api`: `--set api=gemini|vertex`, else Vertex when the endpoint host contains `aiplatform`,
//!   the key is an `AQ.` express key or the credential a service-account JSON; the Gemini API
//!   otherwise.
//! - `auth`: `--set auth=api_key|bearer|service_account`, else a service account for a JSON
//!   credential, `x-goog-api-key` for `AIza…` and `AQ.…` keys, `Authorization: Bearer` otherwise.
//! - Vertex project mode when a project is known (`--set project=`, else the service account's
//!   `project_id`): `{version}/projects/{project}/locations/{location}/publishers/google/models/…`
//!   with the location from `--set location=`, else the `{location}-aiplatform` host, else
//!   `global`. Without a project, and always for an `AQ.` key: express mode
//!   `{version}/publishers/google/models/…`.
//! - `api_version`: `v1beta` (Gemini) / `v1` (Vertex) unless set; an endpoint whose path already
//!   ends in a version is used as given.

pub mod chat;
pub mod claude;
pub mod embeddings;
pub mod error;
pub mod service_account;

use super::{CallContext, Operation, Outbound, Upstreams, WireFormat};
use crate::errors::ApiError;
use crate::index::ConnectionEntry;
use crate::usage::Usage;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use llm_proxy_catalog::{Choice as _, ConnectionOption, GoogleApi, GoogleAuth};
use secrecy::ExposeSecret as _;

const PROVIDER: &str = llm_proxy_catalog::Provider::Google.as_str();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Gemini,
    Vertex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    ApiKey,
    Bearer,
    ServiceAccount,
}

fn host_of(endpoint: &str) -> String {
    url::Url::parse(endpoint)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .unwrap_or_default()
}

/// The auth mode of a connection (DESIGN §16): the `auth` option, else a service account for a
/// JSON credential, an API key for `AIza…` and `AQ.…` keys, a Bearer token otherwise.
pub fn auth_of(connection: &ConnectionEntry, credential: &str) -> Auth {
    match connection
        .option(ConnectionOption::Auth)
        .and_then(GoogleAuth::parse)
    {
        Some(GoogleAuth::ApiKey) => return Auth::ApiKey,
        Some(GoogleAuth::Bearer) => return Auth::Bearer,
        Some(GoogleAuth::ServiceAccount) => return Auth::ServiceAccount,
        None => {}
    }
    let credential = credential.trim_start();
    if service_account::looks_like_json(credential) {
        Auth::ServiceAccount
    } else if is_api_key(credential) {
        Auth::ApiKey
    } else {
        Auth::Bearer
    }
}

fn is_api_key(credential: &str) -> bool {
    credential.starts_with("AIza") || is_express_key(credential)
}

fn is_express_key(credential: &str) -> bool {
    credential.trim_start().starts_with("AQ.")
}

/// The flavour of a connection (DESIGN §16): the `api` option, else Vertex when the host contains
/// `aiplatform`, the key is an `AQ.` express key or the credential a service account, else the
/// Gemini API.
pub fn api_of(connection: &ConnectionEntry, credential: &str) -> Api {
    match connection
        .option(ConnectionOption::Api)
        .and_then(GoogleApi::parse)
    {
        Some(GoogleApi::Vertex) => return Api::Vertex,
        Some(GoogleApi::Gemini) => return Api::Gemini,
        None => {}
    }
    let vertex = host_of(&connection.endpoint).contains("aiplatform")
        || is_express_key(credential)
        || service_account::looks_like_json(credential);
    if vertex { Api::Vertex } else { Api::Gemini }
}

/// Where one model method lives and how to authenticate there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub api: Api,
    pub auth: Auth,
    /// `{endpoint}/{version}/…/models/{model}` without the `:method`.
    pub model_url: String,
}

/// The location a Vertex host serves: `us-central1-aiplatform…` → `us-central1`,
/// `aiplatform.eu.rep…` → `eu`.
fn location_of_host(host: &str) -> Option<&str> {
    if let Some(location) = host.strip_suffix("-aiplatform.googleapis.com") {
        return Some(location);
    }
    host.strip_prefix("aiplatform.")
        .and_then(|rest| rest.strip_suffix(".rep.googleapis.com"))
}

/// Resolves the route of `model` on `connection`; `service_account_project` is the project of
/// the connection's service account, when it has one.
pub fn route(
    connection: &ConnectionEntry,
    credential: &str,
    model: &str,
    service_account_project: Option<&str>,
) -> Route {
    let auth = auth_of(connection, credential);
    let api = api_of(connection, credential);
    let endpoint = connection.endpoint.trim_end_matches('/');
    let has_version = url::Url::parse(endpoint)
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut segments| segments.next_back().map(|last| last.starts_with("v1")))
        })
        .unwrap_or(false);
    let version = connection
        .option(ConnectionOption::ApiVersion)
        .unwrap_or(match api {
            Api::Gemini => "v1beta",
            Api::Vertex => "v1",
        });
    let base = if has_version {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/{version}")
    };
    let model_url = match api {
        Api::Gemini => {
            let model = model.strip_prefix("models/").unwrap_or(model);
            format!("{base}/models/{model}")
        }
        Api::Vertex => {
            let (publisher, model) = model.split_once('/').unwrap_or(("google", model));
            // An express key is bound to its project: always the express URL.
            let project = if is_express_key(credential) && auth == Auth::ApiKey {
                None
            } else {
                connection
                    .option(ConnectionOption::Project)
                    .or(service_account_project.filter(|_| auth == Auth::ServiceAccount))
            };
            match project {
                Some(project) => {
                    let host = host_of(endpoint);
                    let location = connection
                        .option(ConnectionOption::Location)
                        .or_else(|| location_of_host(&host))
                        .unwrap_or("global");
                    format!(
                        "{base}/projects/{project}/locations/{location}/publishers/{publisher}/models/{model}"
                    )
                }
                None => format!("{base}/publishers/{publisher}/models/{model}"),
            }
        }
    };
    Route {
        api,
        auth,
        model_url,
    }
}

fn sensitive(value: String) -> Result<HeaderValue, ApiError> {
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        ApiError::upstream_bad_answer(
            PROVIDER,
            "the connection's credential is not a valid header value",
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// What the gateway does with a Google answer.
#[derive(Debug)]
pub enum Answer {
    Chat { model: String },
    Embeddings(embeddings::EmbeddingsAnswer),
}

impl Answer {
    /// The remote model, named in answers when Google does not say which version answered.
    pub fn model(&self) -> &str {
        match self {
            Answer::Chat { model } => model,
            Answer::Embeddings(answer) => answer.model(),
        }
    }

    /// A non-streamed answer in OpenAI's format, with its usage; candidate indexes are bounded
    /// by `limits.max_upstream_index`.
    pub fn translate(
        &self,
        body: &[u8],
        limits: &crate::limits::Limits,
    ) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
        match self {
            Answer::Chat { model } => chat::answer(body, model, limits.max_upstream_index),
            Answer::Embeddings(answer) => answer.translate(body),
        }
    }
}

pub fn upstream_error(status: StatusCode, body: &[u8]) -> ApiError {
    error::upstream_error(status, body)
}

/// The route of `remote` on the call's connection and the service account it authenticates with,
/// if any. Auth is decided first: the service account can name the project, which shapes the URL.
fn route_and_account(
    ctx: &CallContext<'_>,
    upstreams: &Upstreams,
    remote: &str,
) -> Result<
    (
        Route,
        Option<std::sync::Arc<service_account::AccountTokens>>,
    ),
    ApiError,
> {
    let connection = &ctx.target.connection;
    let credential = connection.credential.expose_secret();
    let auth = auth_of(connection, credential);
    let account = match auth {
        Auth::ServiceAccount => Some(upstreams.google_tokens.account(credential)?),
        _ => None,
    };
    let route = route(
        connection,
        credential,
        remote,
        account
            .as_ref()
            .and_then(|a| a.account.project_id.as_deref()),
    );
    Ok((route, account))
}

/// The auth header of a call on `route` (a token exchange for a service account).
async fn authorization(
    ctx: &CallContext<'_>,
    upstreams: &Upstreams,
    route: &Route,
    account: Option<std::sync::Arc<service_account::AccountTokens>>,
) -> Result<(HeaderName, HeaderValue), ApiError> {
    let credential = ctx.target.connection.credential.expose_secret();
    Ok(match (route.auth, account) {
        (Auth::ServiceAccount, Some(account)) => (
            header::AUTHORIZATION,
            upstreams
                .google_tokens
                .authorization(&upstreams.client, &account)
                .await?,
        ),
        (Auth::Bearer, _) | (Auth::ServiceAccount, None) => (
            header::AUTHORIZATION,
            sensitive(format!("Bearer {}", credential.trim()))?,
        ),
        (Auth::ApiKey, _) => (
            HeaderName::from_static("x-goog-api-key"),
            sensitive(credential.trim().to_owned())?,
        ),
    })
}

pub async fn build(ctx: &CallContext<'_>, upstreams: &Upstreams) -> Result<Outbound, ApiError> {
    let remote = ctx.target.model.remote.as_str();
    let (route, account) = route_and_account(ctx, upstreams, remote)?;
    let streaming = ctx.request.stream && ctx.operation.is_chat();
    let (url, body, answer) = match ctx.operation {
        Operation::ChatCompletions
        | Operation::Messages
        | Operation::CountTokens
        | Operation::Responses => {
            let body = chat::request(ctx.request, remote)?;
            let url = if streaming {
                format!("{}:streamGenerateContent?alt=sse", route.model_url)
            } else {
                format!("{}:generateContent", route.model_url)
            };
            let answer = Answer::Chat {
                model: remote.to_owned(),
            };
            (url, body, answer)
        }
        Operation::Embeddings => {
            let (method, body, answer) = embeddings::request(ctx.request, route.api, remote)?;
            (
                format!("{}:{method}", route.model_url),
                body,
                Answer::Embeddings(answer),
            )
        }
    };
    // Authorization comes last so that a request refused above costs no token exchange.
    let auth_header = authorization(ctx, upstreams, &route, account).await?;
    Ok(Outbound {
        url: url.into(),
        headers: vec![auth_header],
        body,
        wire: WireFormat::Google(answer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn connection(endpoint: &str, options: &[(&str, &str)]) -> ConnectionEntry {
        ConnectionEntry {
            id: "c".into(),
            name: "c".into(),
            provider: crate::index::Provider::Google,
            endpoint: endpoint.into(),
            credential: SecretString::from("unused"),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            timeout: Duration::from_secs(60),
            cache: Default::default(),
        }
    }

    #[test]
    fn ai_studio_keys_and_urls() {
        let c = connection("https://generativelanguage.googleapis.com", &[]);
        let r = route(&c, "AIzaSyA-example", "gemini-2.5-flash", None);
        assert_eq!((r.api, r.auth), (Api::Gemini, Auth::ApiKey));
        assert_eq!(
            r.model_url,
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
        );
        let r = route(&c, "AIzaSyA-example", "models/gemini-2.0-flash", None);
        assert!(r.model_url.ends_with("/v1beta/models/gemini-2.0-flash"));
        let c = connection("https://generativelanguage.googleapis.com/v1", &[]);
        let r = route(&c, "AIza", "gemini-2.5-pro", None);
        assert_eq!(
            r.model_url,
            "https://generativelanguage.googleapis.com/v1/models/gemini-2.5-pro"
        );
    }

    #[test]
    fn vertex_express_project_and_global() {
        let c = connection("https://aiplatform.googleapis.com", &[]);
        let r = route(&c, "AQ.Ab8RN6example", "gemini-2.5-flash", None);
        assert_eq!((r.api, r.auth), (Api::Vertex, Auth::ApiKey));
        assert_eq!(
            r.model_url,
            "https://aiplatform.googleapis.com/v1/publishers/google/models/gemini-2.5-flash"
        );
        let c = connection(
            "https://us-central1-aiplatform.googleapis.com",
            &[("project", "my-proj")],
        );
        let r = route(&c, "ya29.a0token", "gemini-2.5-pro", None);
        assert_eq!((r.api, r.auth), (Api::Vertex, Auth::Bearer));
        assert_eq!(
            r.model_url,
            "https://us-central1-aiplatform.googleapis.com/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-pro"
        );
        let c = connection("https://aiplatform.googleapis.com", &[]);
        let r = route(
            &c,
            "{\"type\":\"service_account\"}",
            "gemini-2.5-pro",
            Some("sa-proj"),
        );
        assert_eq!(r.auth, Auth::ServiceAccount);
        assert_eq!(
            r.model_url,
            "https://aiplatform.googleapis.com/v1/projects/sa-proj/locations/global/publishers/google/models/gemini-2.5-pro"
        );
        let c = connection(
            "https://aiplatform.eu.rep.googleapis.com",
            &[("project", "p")],
        );
        let r = route(&c, "ya29.x", "gemini-2.5-pro", None);
        assert!(r.model_url.contains("/locations/eu/"), "{}", r.model_url);
    }

    #[test]
    fn options_force_flavour_auth_and_location_on_local_endpoints() {
        let c = connection(
            "http://127.0.0.1:9000",
            &[
                ("api", "vertex"),
                ("auth", "bearer"),
                ("project", "p"),
                ("location", "europe-west4"),
                ("api_version", "v1beta1"),
            ],
        );
        let r = route(&c, "opaque-token", "gemini-2.5-flash", None);
        assert_eq!((r.api, r.auth), (Api::Vertex, Auth::Bearer));
        assert_eq!(
            r.model_url,
            "http://127.0.0.1:9000/v1beta1/projects/p/locations/europe-west4/publishers/google/models/gemini-2.5-flash"
        );
        let c = connection("http://127.0.0.1:9000", &[]);
        let r = route(&c, "some-token", "gemini-2.5-flash", None);
        assert_eq!((r.api, r.auth), (Api::Gemini, Auth::Bearer));
        let r = route(&c, "AIzaSyB", "gemini-2.5-flash", None);
        assert_eq!((r.api, r.auth), (Api::Gemini, Auth::ApiKey));
        let r = route(&c, "AQ.express", "gemini-2.5-flash", None);
        assert_eq!((r.api, r.auth), (Api::Vertex, Auth::ApiKey));
        // An express key is bound to its project: the express URL even with a project option.
        let c = connection("https://aiplatform.googleapis.com", &[("project", "p")]);
        let r = route(&c, "AQ.express", "gemini-2.5-flash", None);
        assert_eq!(
            r.model_url,
            "https://aiplatform.googleapis.com/v1/publishers/google/models/gemini-2.5-flash"
        );
        let c = connection("http://127.0.0.1:9000", &[("project", "p")]);
        let r = route(&c, "{}", "gemini-2.5-flash", Some("other"));
        assert!(
            r.model_url.contains("/projects/p/locations/global/"),
            "{}",
            r.model_url
        );
        let c = connection(
            "https://us-east5-aiplatform.googleapis.com",
            &[("project", "p")],
        );
        let r = route(&c, "ya29.x", "anthropic/claude-sonnet-4", None);
        assert!(
            r.model_url
                .ends_with("/publishers/anthropic/models/claude-sonnet-4")
        );
    }
}
