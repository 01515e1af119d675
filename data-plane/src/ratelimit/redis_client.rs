//! The Redis client of the shared limiter (DESIGN §19 "TLS everywhere it is offered"):
//! `redis://` in plain text, `rediss://` over TLS (rustls on the aws-lc-rs provider). A `rediss://`
//! server is verified against Mozilla's roots compiled into the binary (webpki-roots: nothing is
//! read from disk at each reconnect), or, with `--redis-ca-file`, against that CA bundle only.

use std::path::{Path, PathBuf};

use redis::{Client, ConnectionAddr, IntoConnectionInfo as _, TlsCertificates};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use secrecy::{ExposeSecret as _, SecretString};

#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    /// Only the error kind: the parser's text may repeat the URL and its password.
    #[error("invalid --redis-url: {0}")]
    Url(String),
    #[error(
        "invalid --redis-url: the #insecure fragment (no certificate check) is not supported; give the server's CA with --redis-ca-file"
    )]
    Insecure,
    #[error("--redis-ca-file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error(
        "--redis-ca-file (LLM_PROXY_REDIS_CA_FILE) is set but --redis-url is {0}: it needs a rediss:// URL"
    )]
    CaWithoutTls(&'static str),
}

/// Whether the URL asks for TLS (for summaries; the URL itself is never shown).
pub fn describe(client: &Client) -> &'static str {
    match client.get_connection_info().addr() {
        ConnectionAddr::TcpTls { .. } => "rediss",
        ConnectionAddr::Tcp(..) => "redis",
        _ => "redis+unix",
    }
}

/// Builds the client for `url`, with the private CA of `ca_file` for `rediss://`. Reads the CA
/// file (once, here); does not connect.
pub async fn client(
    url: &SecretString,
    ca_file: Option<&Path>,
) -> Result<Client, RedisClientError> {
    let bad_url = |e: redis::RedisError| RedisClientError::Url(format!("{:?}", e.kind()));
    let info = url
        .expose_secret()
        .into_connection_info()
        .map_err(bad_url)?;
    match (info.addr(), ca_file) {
        (ConnectionAddr::TcpTls { insecure: true, .. }, _) => Err(RedisClientError::Insecure),
        (ConnectionAddr::TcpTls { .. }, Some(path)) => {
            let pem = read_ca(path).await?;
            Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(|e| RedisClientError::CaFile {
                path: path.to_owned(),
                reason: format!("{:?}", e.kind()),
            })
        }
        (ConnectionAddr::Tcp(..), Some(_)) => Err(RedisClientError::CaWithoutTls("redis://")),
        (_, Some(_)) => Err(RedisClientError::CaWithoutTls("a unix socket")),
        (_, None) => Client::open(info).map_err(bad_url),
    }
}

/// Reads a PEM CA bundle and checks that it holds at least one usable certificate.
async fn read_ca(path: &Path) -> Result<Vec<u8>, RedisClientError> {
    let bad = |reason: String| RedisClientError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = tokio::fs::read(path)
        .await
        .map_err(|e| bad(e.to_string()))?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        store.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(bad("no PEM certificate in the file".to_owned()));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> SecretString {
        SecretString::from(text.to_owned())
    }

    #[tokio::test]
    async fn a_ca_file_needs_a_rediss_url() {
        let dir = tempfile::tempdir().unwrap();
        let err = client(
            &url("redis://:hunter2@127.0.0.1:6379"),
            Some(&dir.path().join("ca.pem")),
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "--redis-ca-file (LLM_PROXY_REDIS_CA_FILE) is set but --redis-url is redis://: it needs a rediss:// URL"
        );
    }

    #[tokio::test]
    async fn an_unreadable_or_empty_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = client(&url("rediss://:hunter2@127.0.0.1:6380"), Some(&missing))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("--redis-ca-file {}: ", missing.display())),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let err = client(&url("rediss://127.0.0.1:6380"), Some(&empty))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("no PEM certificate in the file"), "{err}");
    }

    #[tokio::test]
    async fn insecure_fragment_is_refused_and_plain_urls_still_work() {
        let err = client(&url("rediss://127.0.0.1:6380/#insecure"), None)
            .await
            .unwrap_err();
        assert!(matches!(err, RedisClientError::Insecure), "{err}");
        let plain = client(&url("redis://127.0.0.1:6379/2"), None)
            .await
            .unwrap();
        assert_eq!(describe(&plain), "redis");
        let tls = client(&url("rediss://127.0.0.1:6380"), None).await.unwrap();
        assert_eq!(describe(&tls), "rediss");
        let err = client(&url("not a url :hunter2"), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid --redis-url: "), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
