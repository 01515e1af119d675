//! The hot path's upstream client (hyper over rustls, `upstream_http`) against HTTPS upstreams,
//! through a real data plane process whose trust store comes from its environment
//! (`SSL_CERT_FILE`, honoured by the platform verifier as on any Linux host): a certificate that
//! chains to a trusted CA is answered, over HTTP/2 when the upstream offers it by ALPN and over
//! HTTP/1.1 when it does not; a certificate from another CA is refused with a 502 before anything
//! is sent. Certificates are made per test with rcgen.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

mod common;

use common::DataPlaneProcess;
use http::Version;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llm_proxy_mock_upstream::MockState;
use llm_proxy_mock_upstream::openai::OPENAI_KEY;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

const KEY: &str = "vk-upstream-tls-1234";

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// An HTTPS mock upstream for `localhost` with a certificate issued by `issuer`, offering
/// `alpn`; it records the HTTP version of every request it serves.
struct HttpsMock {
    addr: SocketAddr,
    state: Arc<MockState>,
    versions: Arc<Mutex<Vec<Version>>>,
}

async fn https_mock(issuer: &CertifiedIssuer<'static, KeyPair>, alpn: &[&[u8]]) -> HttpsMock {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "mock");
    let cert = params.signed_by(&key, issuer).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let state = Arc::new(MockState::default());
    let versions = Arc::new(Mutex::new(Vec::new()));
    let seen = versions.clone();
    let app = llm_proxy_mock_upstream::router(state.clone()).layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            seen.lock().unwrap().push(request.version());
            next.run(request)
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                // A refused handshake (the client distrusts the certificate) ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    HttpsMock {
        addr,
        state,
        versions,
    }
}

/// A control plane whose one connection points at `https://localhost:<port>`, and a data plane
/// process that trusts `trusted` only.
async fn gateway(
    upstream: SocketAddr,
    trusted: &CertifiedIssuer<'static, KeyPair>,
) -> (
    llm_proxy_control_plane::server::RunningControlPlane,
    DataPlaneProcess,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, trusted.pem()).unwrap();
    let (cp, _master) = common::start_control_plane(dir.path()).await;
    common::add_connections(
        &cp.store,
        "openai",
        &format!("https://localhost:{}", upstream.port()),
        [("Mock", OPENAI_KEY.to_owned(), Default::default())],
    )
    .await;
    common::add_models_for_key(&cp.store, "Tls", KEY, &[("Mock", "gpt", "gpt-4o")]).await;
    let dp = DataPlaneProcess::start_with_env(
        cp.grpc_addr,
        "dp-tls",
        &[],
        &[
            ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
            (
                "SSL_CERT_DIR",
                dir.path().join("no-such-dir").to_str().unwrap(),
            ),
        ],
    )
    .await;
    (cp, dp, dir)
}

async fn chat(http: &reqwest::Client, dp: &DataPlaneProcess, stream: bool) -> reqwest::Response {
    let body = serde_json::json!({
        "model": "gpt",
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    });
    common::post_json(
        http,
        format!("http://{}/v1/chat/completions", dp.addr),
        KEY,
        &body.to_string(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_upstream_is_called_over_http2_when_it_offers_it() {
    let ca = certificate_authority("upstream test CA");
    let mock = https_mock(&ca, &[b"h2", b"http/1.1"]).await;
    let (_cp, dp, _dir) = gateway(mock.addr, &ca).await;
    let http = reqwest::Client::new();
    dp.wait_serving(&http, KEY, "gpt").await;

    let answer = chat(&http, &dp, false).await;
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion", "{body}");
    let streamed = chat(&http, &dp, true).await;
    assert_eq!(streamed.status(), 200);
    assert!(streamed.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    assert_eq!(*mock.versions.lock().unwrap(), [Version::HTTP_2; 2]);
    let sent = mock.state.requests();
    assert_eq!(sent.len(), 2);
    common::assert_key_not_forwarded(&sent[0], KEY);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_upstream_without_http2_is_called_over_http1() {
    let ca = certificate_authority("upstream test CA");
    let mock = https_mock(&ca, &[b"http/1.1"]).await;
    let (_cp, dp, _dir) = gateway(mock.addr, &ca).await;
    let http = reqwest::Client::new();
    dp.wait_serving(&http, KEY, "gpt").await;

    for _ in 0..2 {
        let answer = chat(&http, &dp, false).await;
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(*mock.versions.lock().unwrap(), [Version::HTTP_11; 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_certificate_from_another_ca_is_refused_before_anything_is_sent() {
    let trusted = certificate_authority("upstream test CA");
    let rogue = certificate_authority("someone else's CA");
    let mock = https_mock(&rogue, &[b"h2", b"http/1.1"]).await;
    let (_cp, dp, _dir) = gateway(mock.addr, &trusted).await;
    let http = reqwest::Client::new();
    dp.wait_serving(&http, KEY, "gpt").await;

    let answer = chat(&http, &dp, false).await;
    assert_eq!(answer.status(), 502);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    assert!(mock.state.requests().is_empty());
    assert!(mock.versions.lock().unwrap().is_empty());
}
