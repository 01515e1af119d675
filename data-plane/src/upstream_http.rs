//! The hot path's upstream HTTP client (DESIGN §15): hyper's client connections, pooled per host
//! by [`crate::upstream_pool`], over rustls set up as reqwest sets up its own — aws-lc-rs, the
//! platform's certificate verifier, ALPN `h2` then `http/1.1`, the same pool and connect
//! settings. reqwest stays the client of every other upstream call (token exchanges, telemetry).
//!
//! Why not reqwest here too: measured with callgrind, its layers cost about a tenth of a whole
//! request's instructions on top of hyper — it parses every URL twice more (its redirect layer
//! and its pending request), and copies the request's headers for layers the gateway turns off.
//!
//! When the environment names an HTTP proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, upper or
//! lower case), reqwest, which honours those (with `NO_PROXY`), serves the hot path as well, so
//! a deployment behind an egress proxy keeps working as before.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::upstream_pool::UpstreamPool;

/// How long a TCP connect (plus DNS) to an upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle pooled connections kept per upstream host.
pub const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// An upstream answer's body, from whichever client sent the call.
pub type UpstreamBody = Either<Incoming, reqwest::Body>;
pub type UpstreamResponse = http::Response<UpstreamBody>;

/// The environment variables through which reqwest picks an HTTP proxy.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Sends the hot path's upstream calls.
#[derive(Debug)]
pub struct UpstreamHttp {
    sender: Sender,
}

// One per process, used on every call: an indirection would cost more than the bytes.
#[allow(clippy::large_enum_variant)]
enum Sender {
    Hyper(UpstreamPool),
    /// Behind an HTTP proxy.
    Reqwest(reqwest::Client),
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sender::Hyper(_) => "Hyper",
            Sender::Reqwest(_) => "Reqwest",
        })
    }
}

/// A call that got no answer.
#[derive(Debug)]
pub struct SendError {
    /// The connection could not be made (nothing was sent: safe to try elsewhere).
    pub connect: bool,
    /// The error and its causes on one line, without the URL (some providers take keys in the
    /// query).
    pub detail: String,
}

impl UpstreamHttp {
    /// hyper's client, or `proxied` when the environment names an HTTP proxy.
    pub fn from_env(proxied: reqwest::Client) -> Result<Self, rustls::Error> {
        Self::from_lookup(proxied, |name| std::env::var_os(name))
    }

    /// As [`Self::from_env`], with the variables read through `lookup` (a map in tests: the
    /// environment is shared by every thread).
    pub fn from_lookup(
        proxied: reqwest::Client,
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, rustls::Error> {
        let proxy_set = PROXY_VARIABLES
            .iter()
            .any(|name| lookup(name).is_some_and(|value| !value.is_empty()));
        if proxy_set {
            tracing::info!("an HTTP proxy is set in the environment: upstream calls go through it");
            Ok(Self::reqwest(proxied))
        } else {
            Self::hyper()
        }
    }

    /// Whether calls go through reqwest (an HTTP proxy is set).
    pub fn is_reqwest(&self) -> bool {
        matches!(self.sender, Sender::Reqwest(_))
    }

    /// hyper's client connections with rustls (the platform's roots) and HTTP/2 where offered,
    /// pooled per host.
    pub fn hyper() -> Result<Self, rustls::Error> {
        Ok(Self {
            sender: Sender::Hyper(UpstreamPool::new(connector()?)),
        })
    }

    pub fn reqwest(client: reqwest::Client) -> Self {
        Self {
            sender: Sender::Reqwest(client),
        }
    }

    /// Sends `request` and waits for the answer's head. No timeout here: the caller bounds the
    /// whole call.
    pub async fn send(&self, request: http::Request<Bytes>) -> Result<UpstreamResponse, SendError> {
        match &self.sender {
            Sender::Hyper(pool) => pool
                .send(request.map(Full::new))
                .await
                .map(|response| response.map(Either::Left)),
            Sender::Reqwest(client) => {
                let request = reqwest::Request::try_from(request.map(reqwest::Body::from))
                    .map_err(|err| SendError {
                        connect: false,
                        detail: error_chain(&err.without_url()),
                    })?;
                match client.execute(request).await {
                    Ok(response) => Ok(http::Response::from(response).map(Either::Right)),
                    Err(err) => Err(SendError {
                        connect: err.is_connect(),
                        detail: error_chain(&err.without_url()),
                    }),
                }
            }
        }
    }
}

/// TCP (no delay, connect timeout) then, for `https`, TLS with the platform's roots and ALPN
/// `h2` then `http/1.1`.
pub fn connector() -> Result<HttpsConnector<HttpConnector>, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    // The TLS layer above takes `https` URLs.
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(tcp))
}

/// `err` and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn client_with(vars: &[(&str, &str)]) -> UpstreamHttp {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        UpstreamHttp::from_lookup(reqwest::Client::new(), move |name| {
            vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.into())
        })
        .unwrap()
    }

    #[tokio::test]
    async fn reqwest_serves_the_hot_path_only_behind_an_http_proxy() {
        assert!(!client_with(&[]).is_reqwest());
        assert!(!client_with(&[("HTTPS_PROXY", ""), ("NO_PROXY", "*")]).is_reqwest());
        for name in PROXY_VARIABLES {
            assert!(
                client_with(&[(name, "http://proxy.internal:3128")]).is_reqwest(),
                "{name}"
            );
        }
    }

    #[test]
    fn an_error_reads_with_its_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Connect(#[source] std::io::Error);
        let err = Connect(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(error_chain(&err), "tcp connect error: connection refused");
    }
}
