//! Postgres connections with libpq's TLS parameters (DESIGN §19 "TLS everywhere it is offered"):
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` from the URL's query, TLS by rustls on the
//! aws-lc-rs provider, for every session the control plane opens (pool, migrations, LISTEN).
//!
//! tokio-postgres knows only `sslmode=disable|prefer|require` and refuses unknown parameters, so
//! these four are taken out of the URL before it parses the rest; `verify-ca` and `verify-full`
//! become its `require` plus a certificate verifier. What is checked follows libpq:
//!
//! | sslmode | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `prefer` (default) | if the server offers it, else plain | only with `sslrootcert` | no |
//! | `require` | always | only with `sslrootcert` | no |
//! | `verify-ca` | always | `sslrootcert`, else the system roots | no |
//! | `verify-full` | always | `sslrootcert`, else the system roots | yes |
//!
//! Differences from libpq: without `sslrootcert`, `verify-ca`/`verify-full` use the system roots
//! (libpq wants `~/.postgresql/root.crt`); no default files are read from `~/.postgresql`; `prefer`
//! falls back to plain text only when the server declines TLS, not after a failed handshake.
//! `sslrootcert=system` (libpq 16) means the system roots and, as in libpq, implies
//! `verify-full` and refuses a weaker `sslmode`.

use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::Arc;

use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use secrecy::{ExposeSecret as _, SecretString};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The query parameters this module takes out of the URL.
const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error(
        "invalid database-url: sslmode={0} is not one of disable, prefer, require, verify-ca, verify-full"
    )]
    SslMode(String),
    #[error(
        "invalid database-url: sslmode={0} may not be used with sslrootcert=system (use verify-full)"
    )]
    WeakSystemRoots(&'static str),
    #[error("invalid database-url: sslcert and sslkey must be given together")]
    ClientCertPair,
    #[error("invalid database-url: {param}={path}: {reason}")]
    File {
        param: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("invalid database-url: {0}")]
    Parse(String),
    #[error(
        "sslmode={0}: no system root certificates found (set sslrootcert=/path/to/ca.pem, or SSL_CERT_FILE)"
    )]
    NoSystemRoots(&'static str),
    #[error("tls setup: {0}")]
    Tls(String),
}

/// libpq's `sslmode` values that tokio-postgres can honour (`allow` is not one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<Self, PgTlsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(PgTlsError::SslMode(other.to_owned())),
        })
    }
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// The operating system's store, as rustls-native-certs finds it (on Linux the OpenSSL
    /// locations, e.g. `/etc/ssl/certs/ca-certificates.crt`; `SSL_CERT_FILE`/`SSL_CERT_DIR`
    /// override them).
    System,
    /// A PEM file (`sslrootcert=PATH`).
    File(PathBuf),
}

/// The TLS parameters of a Postgres URL, read without any I/O.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgTlsParams {
    pub mode: SslMode,
    /// `None`: the certificate is not verified (`prefer`, `require` without `sslrootcert`).
    pub roots: Option<RootCerts>,
    /// `sslcert` and `sslkey`: a client certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl PgTlsParams {
    /// A short description for `check-config` (no secrets): `verify-full/sslrootcert=PATH`,
    /// `require/unverified`, `verify-ca/system-roots+client-cert`, `disable`.
    pub fn describe(&self) -> String {
        if self.mode == SslMode::Disable {
            return "disable".to_owned();
        }
        let roots = match &self.roots {
            None => "unverified".to_owned(),
            Some(RootCerts::System) => "system-roots".to_owned(),
            Some(RootCerts::File(path)) => format!("sslrootcert={}", path.display()),
        };
        let client = if self.client_cert.is_some() {
            "+client-cert"
        } else {
            ""
        };
        format!("{}/{roots}{client}", self.mode.as_str())
    }
}

/// Splits `postgres://...?...` into the URL without the TLS parameters and those parameters.
///
/// The query starts at the first `?` after the user info (as tokio-postgres reads it); the other
/// parameters keep their order and encoding.
pub fn split_url(url: &str) -> Result<(String, PgTlsParams), PgTlsError> {
    let after_userinfo = url.find('@').map_or(0, |at| at + 1);
    let Some(query_start) = url[after_userinfo..].find('?').map(|q| q + after_userinfo) else {
        return Ok((url.to_owned(), PgTlsParams::default()));
    };
    let (base, query) = (&url[..query_start], &url[query_start + 1..]);
    let mut kept = Vec::new();
    let (mut mode, mut root, mut cert, mut key) = (None, None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(raw_key);
        if !TLS_PARAMS.contains(&name.as_str()) {
            kept.push(pair);
            continue;
        }
        let value = decode(raw_value);
        // As in libpq and tokio-postgres, the last occurrence wins.
        match name.as_str() {
            "sslmode" => mode = Some(SslMode::parse(&value)?),
            "sslrootcert" => root = Some(value),
            "sslcert" => cert = Some(value),
            _ => key = Some(value),
        }
    }
    let system = root.as_deref() == Some("system");
    let mode = match mode {
        Some(mode) if system && mode != SslMode::VerifyFull => {
            return Err(PgTlsError::WeakSystemRoots(mode.as_str()));
        }
        Some(mode) => mode,
        None if system => SslMode::VerifyFull,
        None => SslMode::Prefer,
    };
    let roots = match (mode, root) {
        (SslMode::Disable, _) => None,
        (_, Some(root)) if root == "system" => Some(RootCerts::System),
        (_, Some(root)) => Some(RootCerts::File(PathBuf::from(root))),
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => Some(RootCerts::System),
        (SslMode::Prefer | SslMode::Require, None) => None,
    };
    let client_cert = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        _ => return Err(PgTlsError::ClientCertPair),
    };
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((
        rest,
        PgTlsParams {
            mode,
            roots,
            client_cert: client_cert.filter(|_| mode != SslMode::Disable),
        },
    ))
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// Everything needed to open a session: the driver's settings and the TLS connector, built once
/// (files read, roots loaded) and shared by every connection.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    params: PgTlsParams,
    /// `None` with `sslmode=disable`.
    tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for PgTarget {
    // The driver config holds the password: only the TLS side is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("tls", &self.params)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Parses the URL and prepares TLS: reads `sslrootcert`/`sslcert`/`sslkey` or loads the system
    /// roots. Does not connect.
    pub async fn new(url: &SecretString) -> Result<Self, PgTlsError> {
        let (rest, params) = split_url(url.expose_secret())?;
        let rest = SecretString::from(rest);
        let mut config = tokio_postgres::Config::from_str(rest.expose_secret())
            .map_err(|e| PgTlsError::Parse(error_chain(&e)))?;
        config.ssl_mode(match params.mode {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
        });
        let tls = match params.mode {
            SslMode::Disable => None,
            _ => Some(MakeRustlsConnect::new(client_config(&params).await?)),
        };
        Ok(Self {
            config,
            params,
            tls,
        })
    }

    pub fn tls_params(&self) -> &PgTlsParams {
        &self.params
    }

    /// Opens one session.
    pub async fn connect(&self) -> diesel::ConnectionResult<AsyncPgConnection> {
        let failed = |e: tokio_postgres::Error| {
            // The mode and the roots in use: what an operator needs to read a certificate error.
            ConnectionError::BadConnection(match self.params.mode {
                SslMode::Disable => error_chain(&e),
                _ => format!("{} (sslmode={})", error_chain(&e), self.params.describe()),
            })
        };
        match &self.tls {
            None => {
                let (client, connection) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(failed)?;
                AsyncPgConnection::try_from_client_and_connection(client, connection).await
            }
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.map_err(failed)?;
                AsyncPgConnection::try_from_client_and_connection(client, connection).await
            }
        }
    }
}

/// "error performing TLS handshake: invalid peer certificate: UnknownIssuer": the driver's own
/// message names only the step, its causes say what went wrong.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

async fn read(param: &'static str, path: &Path) -> Result<Vec<u8>, PgTlsError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| PgTlsError::File {
            param,
            path: path.to_owned(),
            reason: source.to_string(),
        })
}

fn bad_file(param: &'static str, path: &Path, reason: impl ToString) -> PgTlsError {
    PgTlsError::File {
        param,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

async fn root_store(roots: &RootCerts, mode: SslMode) -> Result<RootCertStore, PgTlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::File(path) => {
            let pem = read("sslrootcert", path).await?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad_file("sslrootcert", path, e))?;
                store
                    .add(cert)
                    .map_err(|e| bad_file("sslrootcert", path, e))?;
            }
            if store.is_empty() {
                return Err(bad_file(
                    "sslrootcert",
                    path,
                    "no PEM certificate in the file",
                ));
            }
        }
        RootCerts::System => {
            // Reads the trust store from disk: off the runtime's threads.
            let loaded = tokio::task::spawn_blocking(rustls_native_certs::load_native_certs)
                .await
                .map_err(|e| PgTlsError::Tls(e.to_string()))?;
            // Unreadable or malformed entries are skipped, as OpenSSL does.
            store.add_parsable_certificates(loaded.certs);
            if store.is_empty() {
                return Err(PgTlsError::NoSystemRoots(mode.as_str()));
            }
        }
    }
    Ok(store)
}

async fn client_config(params: &PgTlsParams) -> Result<ClientConfig, PgTlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match &params.roots {
        None => Arc::new(WithoutHostName {
            roots: None,
            algorithms,
        }),
        Some(roots) => {
            let store = Arc::new(root_store(roots, params.mode).await?);
            if params.mode == SslMode::VerifyFull {
                WebPkiServerVerifier::builder_with_provider(store, provider.clone())
                    .build()
                    .map_err(|e| PgTlsError::Tls(e.to_string()))?
            } else {
                Arc::new(WithoutHostName {
                    roots: Some(store),
                    algorithms,
                })
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgTlsError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &params.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let cert_pem = read("sslcert", cert_path).await?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad_file("sslcert", cert_path, e))?;
            if chain.is_empty() {
                return Err(bad_file(
                    "sslcert",
                    cert_path,
                    "no PEM certificate in the file",
                ));
            }
            let key_pem = read("sslkey", key_path).await?;
            // The key's own parse error could quote key material: only its kind is reported.
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|_| bad_file("sslkey", key_path, "no PEM private key in the file"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad_file("sslkey", key_path, e))?
        }
    };
    // What libpq 17 sends: required by servers for `sslnegotiation=direct`, ignored otherwise.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// The modes short of `verify-full`: the host name is never compared (libpq's behaviour). With
/// `roots` (`verify-ca`, or `prefer`/`require` with `sslrootcert`) the chain must lead to a trusted
/// root; without (`prefer`/`require` alone) the certificate is taken as it comes. Either way the
/// handshake signatures are checked, so the server must hold its certificate's key.
#[derive(Debug)]
struct WithoutHostName {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for WithoutHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, PgTlsParams) {
        split_url(url).unwrap()
    }

    #[test]
    fn tls_parameters_leave_the_url_and_the_others_stay_in_order() {
        let (rest, params) = split(
            "postgres://u:p%3Fw@db:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20file.pem&connect_timeout=5",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db:5432/app?application_name=x&connect_timeout=5"
        );
        assert_eq!(params.mode, SslMode::VerifyFull);
        assert_eq!(
            params.roots,
            Some(RootCerts::File(PathBuf::from("/etc/ca file.pem")))
        );
        assert_eq!(params.client_cert, None);
    }

    #[test]
    fn a_question_mark_in_the_password_does_not_start_the_query() {
        let (rest, params) = split("postgres://u:pa?ss@db/app?sslmode=require");
        assert_eq!(rest, "postgres://u:pa?ss@db/app");
        assert_eq!(params.mode, SslMode::Require);
    }

    #[test]
    fn defaults_follow_libpq() {
        let (rest, params) = split("postgresql://db/app");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(params.mode, SslMode::Prefer);
        assert_eq!(params.roots, None);
        // verify-* without sslrootcert: system roots (libpq would want ~/.postgresql/root.crt).
        let (_, params) = split("postgres://db/app?sslmode=verify-ca");
        assert_eq!(params.roots, Some(RootCerts::System));
        // require with a root file checks the chain, as libpq does.
        let (_, params) = split("postgres://db/app?sslmode=require&sslrootcert=/ca.pem");
        assert_eq!(
            params.roots,
            Some(RootCerts::File(PathBuf::from("/ca.pem")))
        );
        // sslrootcert=system implies verify-full and refuses a weaker mode.
        let (_, params) = split("postgres://db/app?sslrootcert=system");
        assert_eq!(params.mode, SslMode::VerifyFull);
        assert_eq!(params.roots, Some(RootCerts::System));
        assert!(matches!(
            split_url("postgres://db/app?sslrootcert=system&sslmode=require"),
            Err(PgTlsError::WeakSystemRoots("require"))
        ));
        // The last occurrence wins.
        let (_, params) = split("postgres://db/app?sslmode=disable&sslmode=require");
        assert_eq!(params.mode, SslMode::Require);
    }

    #[test]
    fn bad_values_name_the_parameter_and_never_the_password() {
        let err = split_url("postgres://u:hunter2@db/app?sslmode=bogus")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid database-url: sslmode=bogus is not one of disable, prefer, require, verify-ca, verify-full"
        );
        let err = split_url("postgres://u:hunter2@db/app?sslcert=/c.pem")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslcert and sslkey"), "{err}");
        assert!(!err.contains("hunter2"));
    }

    #[tokio::test]
    async fn unreadable_root_file_is_reported_with_its_parameter() {
        let url = SecretString::from(
            "postgres://u:hunter2@db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        );
        let err = PgTarget::new(&url).await.unwrap_err().to_string();
        assert!(
            err.starts_with("invalid database-url: sslrootcert=/nonexistent/ca.pem: "),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn a_root_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let url = SecretString::from(format!(
            "postgres://db/app?sslmode=verify-ca&sslrootcert={}",
            path.display()
        ));
        let err = PgTarget::new(&url).await.unwrap_err().to_string();
        assert!(err.ends_with("no PEM certificate in the file"), "{err}");
    }

    #[tokio::test]
    async fn driver_parse_errors_do_not_echo_the_url() {
        let url = SecretString::from("postgres://u:hunter2@db/app?sslmode=require&bogus_opt=1");
        let err = PgTarget::new(&url).await.unwrap_err().to_string();
        assert!(err.starts_with("invalid database-url: "), "{err}");
        assert!(err.contains("bogus_opt"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
