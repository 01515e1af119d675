//! TLS on the admin API and on the config stream (DESIGN §3, §7): a control plane with a server
//! certificate, with and without client certificates (mTLS); the real `llmctl` binary with
//! `--tls-ca`/`--tls-cert`/`--tls-key`; a data plane that loads its TLS files the way its binary
//! does (`ClientTlsFiles`) and applies the config over the encrypted stream. Certificates are made
//! per test with rcgen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use llm_proxy_control_plane::crypto::MasterKeys;
use llm_proxy_control_plane::server::{self, RunningControlPlane, ServerSettings, TlsFiles};
use llm_proxy_data_plane::gateway::{self, GatewaySettings};
use llm_proxy_data_plane::sync::{ClientTlsFiles, SyncSettings};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use secrecy::SecretString;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(30);

/// PEM files of one test's PKI.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();

        let ca = certificate_authority("llm-proxy test CA");
        write("ca.pem", ca.pem());
        let rogue = certificate_authority("someone else's CA");

        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "control-plane");
        let server_key = KeyPair::generate().unwrap();
        write(
            "server.pem",
            server.signed_by(&server_key, &ca).unwrap().pem(),
        );
        write("server.key", server_key.serialize_pem());

        for (name, issuer) in [("client", &ca), ("rogue", &rogue)] {
            let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
            client
                .distinguished_name
                .push(DnType::CommonName, "data-plane");
            let key = KeyPair::generate().unwrap();
            write(
                &format!("{name}.pem"),
                client.signed_by(&key, issuer).unwrap().pem(),
            );
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Self { dir }
    }
}

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

async fn control_plane(pki: &Pki, mtls: bool) -> RunningControlPlane {
    let mut settings = ServerSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        SecretString::from(format!("sqlite://{}", pki.path("cp.db").display())),
        MasterKeys::generate_encoded(),
    );
    settings.tls = TlsFiles {
        cert: Some(pki.path("server.pem")),
        key: Some(pki.path("server.key")),
        client_ca: mtls.then(|| pki.path("ca.pem")),
    };
    server::start(settings).await.unwrap()
}

/// Runs the real llmctl against `endpoint` with the given TLS files.
async fn llmctl(endpoint: &str, tls: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmctl"));
    cmd.env_remove("LLMCTL_TOKEN")
        .env_remove("LLMCTL_ENDPOINT")
        .env_remove("LLMCTL_TLS_CA")
        .env_remove("LLMCTL_TLS_CERT")
        .env_remove("LLMCTL_TLS_KEY")
        .env("LLMCTL_SERVER", endpoint);
    for (flag, path) in tls {
        cmd.arg(flag).arg(path);
    }
    cmd.args(args).output().await.unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_admits_llmctl_and_a_data_plane_with_client_certificates_and_refuses_others() {
    let pki = Pki::new();
    let cp = control_plane(&pki, true).await;
    let endpoint = format!("https://localhost:{}", cp.grpc_addr.port());
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let client_tls = [
        ("--tls-ca", ca.as_path()),
        ("--tls-cert", cert.as_path()),
        ("--tls-key", key.as_path()),
    ];

    let added = llmctl(
        &endpoint,
        &client_tls,
        &[
            "connection",
            "add",
            "--name",
            "OpenAI-Main",
            "--provider",
            "openai",
            "--endpoint",
            "https://api.openai.com",
            "--api-key",
            "sk-tls-test",
        ],
    )
    .await;
    assert!(added.status.success(), "{}", stderr(&added));

    // A data plane that loads its files like the binary does gets the config over TLS.
    let tls = ClientTlsFiles {
        ca: Some(ca.clone()),
        cert: Some(cert.clone()),
        key: Some(key.clone()),
    }
    .load()
    .await
    .unwrap();
    let dp = gateway::start(GatewaySettings::on_loopback(SyncSettings {
        tls,
        ..SyncSettings::plaintext(endpoint.clone(), "dp-tls")
    }))
    .await
    .unwrap();
    let version = cp.store.current_version().await.unwrap().1;
    tokio::time::timeout(PATIENCE, dp.config.wait_for_version(version))
        .await
        .expect("the data plane did not apply the config over mTLS");
    assert_eq!(dp.config.current().unwrap().counts.connections, 1);

    // Without a client certificate, or with one from another CA, the handshake is refused.
    let no_cert = llmctl(
        &endpoint,
        &[("--tls-ca", ca.as_path())],
        &["connection", "list"],
    )
    .await;
    assert!(!no_cert.status.success());
    // TLS 1.3 clients learn of the refusal either from the alert or from the closed connection.
    assert!(no_cert.stdout.is_empty());
    assert_eq!(stderr(&no_cert).lines().count(), 1, "{}", stderr(&no_cert));
    let (rogue, rogue_key) = (pki.path("rogue.pem"), pki.path("rogue.key"));
    let rogue_out = llmctl(
        &endpoint,
        &[
            ("--tls-ca", ca.as_path()),
            ("--tls-cert", rogue.as_path()),
            ("--tls-key", rogue_key.as_path()),
        ],
        &["connection", "list"],
    )
    .await;
    assert!(rogue_out.stdout.is_empty());
    assert!(
        !rogue_out.status.success(),
        "a certificate from another CA was accepted"
    );

    // The data plane's own certificate works for llmctl too, and lists the connection.
    let listed = llmctl(
        &endpoint,
        &client_tls,
        &["-o", "json", "connection", "list"],
    )
    .await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("OpenAI-Main"));
    dp.shutdown(Duration::from_secs(1)).await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_needs_only_the_ca_and_refuses_plain_or_unverified_clients() {
    let pki = Pki::new();
    let cp = control_plane(&pki, false).await;
    let port = cp.grpc_addr.port();
    let https = format!("https://localhost:{port}");
    let ca = pki.path("ca.pem");

    let ok = llmctl(&https, &[("--tls-ca", ca.as_path())], &["dataplanes"]).await;
    assert!(ok.status.success(), "{}", stderr(&ok));

    // The system roots do not know the test CA.
    let unverified = llmctl(&https, &[], &["dataplanes"]).await;
    assert!(!unverified.status.success());
    let message = stderr(&unverified);
    assert!(message.starts_with("error: "), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");

    // Plain HTTP/2 against the TLS port gets no gRPC answer.
    let plain = llmctl(&format!("http://localhost:{port}"), &[], &["dataplanes"]).await;
    assert!(!plain.status.success());

    // TLS files with a plain endpoint are a mistake worth naming.
    let mixed = llmctl(
        &format!("http://localhost:{port}"),
        &[("--tls-ca", ca.as_path())],
        &["dataplanes"],
    )
    .await;
    assert!(stderr(&mixed).contains("https://"), "{}", stderr(&mixed));
    cp.shutdown().await;
}
