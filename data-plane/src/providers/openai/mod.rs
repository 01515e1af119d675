//! OpenAI and OpenAI-compatible upstreams: the client's body with `model` set to the remote name,
//! `Authorization: Bearer` with the connection's key, path `/v1/...` unless the endpoint has a path.

pub mod responses;
pub mod stream;

use super::{CallContext, Outbound, UpstreamUrl, WireFormat, openai_format_body};
use crate::errors::ApiError;
use axum::http::{HeaderName, HeaderValue, header};
use secrecy::ExposeSecret as _;

/// `https://api.openai.com` → `https://api.openai.com/v1/chat/completions`;
/// `http://local:8000/v1` → `http://local:8000/v1/chat/completions`.
pub fn url(endpoint: &str, path: &str) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    let after_scheme = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    if after_scheme.contains('/') {
        format!("{endpoint}/{path}")
    } else {
        format!("{endpoint}/v1/{path}")
    }
}

pub fn bearer(credential: &str) -> Result<Option<(HeaderName, HeaderValue)>, ApiError> {
    if credential.is_empty() {
        return Ok(None);
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {credential}")).map_err(|_| {
        ApiError::upstream_bad_answer(
            "openai",
            "the connection's credential is not a valid header value",
        )
    })?;
    value.set_sensitive(true);
    Ok(Some((header::AUTHORIZATION, value)))
}

/// `Authorization: Bearer …` for `connection`, made once per connection.
pub(crate) fn credential_header(
    connection: &crate::index::ConnectionEntry,
) -> Result<Option<(HeaderName, HeaderValue)>, ApiError> {
    let credential = connection.credential.expose_secret();
    let cached = connection
        .cache
        .credential_header(|| bearer(credential).ok().flatten().map(|(_, value)| value));
    match cached {
        Some(value) => Ok(Some((header::AUTHORIZATION, value))),
        // No credential, or one that is not a header value (reported here).
        None => bearer(credential),
    }
}

pub fn build(ctx: &CallContext<'_>) -> Result<Outbound, ApiError> {
    let target = ctx.target;
    Ok(Outbound {
        url: UpstreamUrl::cached(target.connection, ctx.operation, || {
            url(&target.connection.endpoint, ctx.operation.path())
        }),
        headers: credential_header(target.connection)?.into_iter().collect(),
        body: openai_format_body(ctx, &target.model.remote, true),
        wire: WireFormat::OpenAi,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_added_only_when_the_endpoint_has_no_path() {
        assert_eq!(
            url("https://api.openai.com", "chat/completions"),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            url("https://api.openai.com/", "embeddings"),
            "https://api.openai.com/v1/embeddings"
        );
        assert_eq!(
            url("http://127.0.0.1:8000/v1", "embeddings"),
            "http://127.0.0.1:8000/v1/embeddings"
        );
        assert_eq!(
            url("https://host/openai/v1/", "chat/completions"),
            "https://host/openai/v1/chat/completions"
        );
    }
}
