//! Claude on Vertex AI (DESIGN §17): a remote name starting with `claude` (optionally
//! `anthropic/claude…`) on a Vertex connection is an Anthropic model, called at
//! `…/publishers/anthropic/models/{model}:rawPredict` (`:streamRawPredict` for streams) with an
//! Anthropic body (`anthropic_version: "vertex-2023-10-16"`, no `model`). The URL and auth are the
//! connection's, as for Gemini; bodies and answers are `providers::anthropic`'s.

use super::{Api, api_of, authorization, route_and_account};
use crate::errors::ApiError;
use crate::index::ConnectionEntry;
use crate::providers::{CallContext, Upstreams};
use axum::http::{HeaderName, HeaderValue};
use secrecy::ExposeSecret as _;

/// The model name without an `anthropic/` publisher prefix.
fn claude_name(remote: &str) -> &str {
    remote.strip_prefix("anthropic/").unwrap_or(remote)
}

/// Whether `remote` on `connection` is Claude on Vertex.
pub fn is_claude(connection: &ConnectionEntry, remote: &str) -> bool {
    claude_name(remote).starts_with("claude")
        && api_of(connection, connection.credential.expose_secret()) == Api::Vertex
}

/// The `rawPredict` (or `streamRawPredict`) URL of the call's model, and its auth header.
pub async fn url_and_auth(
    ctx: &CallContext<'_>,
    upstreams: &Upstreams,
    streaming: bool,
) -> Result<(String, (HeaderName, HeaderValue)), ApiError> {
    let model = format!("anthropic/{}", claude_name(&ctx.target.model.remote));
    let (route, account) = route_and_account(ctx, upstreams, &model)?;
    let method = if streaming {
        "streamRawPredict"
    } else {
        "rawPredict"
    };
    let url = format!("{}:{method}", route.model_url);
    let auth = authorization(ctx, upstreams, &route, account).await?;
    Ok((url, auth))
}
