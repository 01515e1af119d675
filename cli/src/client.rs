//! gRPC connection to the control plane's `AdminService`: the bearer-token interceptor, and the
//! translation of transport failures and gRPC statuses into one readable error line.

use std::error::Error as StdError;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use llm_proxy_proto::v1::admin_service_client::AdminServiceClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    header: Option<AsciiMetadataValue>,
}

impl BearerAuth {
    /// `None` or a blank token sends no `authorization` metadata.
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let header = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(token) => {
                let mut value: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                        anyhow!("the admin token (--token / LLMCTL_TOKEN) contains characters not allowed in a header")
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Self { header })
    }

    fn has_token(&self) -> bool {
        self.header.is_some()
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// The admin client with its interceptor.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;

/// A connected admin client, and what is needed to explain its failures.
pub struct Admin {
    pub client: AdminClient,
    endpoint: String,
    has_token: bool,
}

/// PEM material for TLS to the control plane (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Debug, Default)]
pub struct ClientTls {
    pub ca: Option<Vec<u8>>,
    /// Certificate and key, for mTLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// Reads the files given on the command line.
    pub async fn read(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        async fn read(flag: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
            tokio::fs::read(path)
                .await
                .with_context(|| format!("cannot read {flag} {}", path.display()))
        }
        let ca = match ca {
            Some(path) => Some(read("--tls-ca", path).await?),
            None => None,
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((
                read("--tls-cert", cert).await?,
                read("--tls-key", key).await?,
            )),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key must be given together"),
        };
        Ok(Self { ca, identity })
    }

    fn is_set(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }
}

impl Admin {
    /// A client of the control plane at `endpoint` (`http://host:port`; a bare `host:port` means
    /// plain `http`). The connection is made by the first call. Plain `http` to a host that is
    /// not loopback needs `allow_plaintext` (DESIGN §19).
    pub fn new(
        endpoint: &str,
        token: Option<&str>,
        tls: ClientTls,
        allow_plaintext: bool,
    ) -> anyhow::Result<Self> {
        let auth = BearerAuth::new(token)?;
        let endpoint = normalize_endpoint(endpoint);
        if !allow_plaintext
            && let Some(host) = llm_proxy_data_plane::sync::plaintext_remote_host(&endpoint)
        {
            anyhow::bail!(
                "refusing plaintext http:// to the control plane at {host} (not loopback): use an https:// --server (with --tls-ca for a private CA), or pass --allow-plaintext (LLM_PROXY_ALLOW_PLAINTEXT) if this network is private"
            );
        }
        let mut builder = Endpoint::from_shared(endpoint.clone())
            .with_context(|| format!("invalid control-plane address (--server) `{endpoint}`"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if tls.is_set() && !endpoint.starts_with("https://") {
            anyhow::bail!(
                "--tls-ca/--tls-cert need an https:// control-plane address (--server), got `{endpoint}`"
            );
        }
        if endpoint.starts_with("https://") {
            let mut config = match tls.ca {
                Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
                None => ClientTlsConfig::new().with_enabled_roots(),
            };
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            builder = builder
                .tls_config(config)
                .with_context(|| format!("cannot set up TLS for `{endpoint}`"))?;
        }
        // Connect on the first call, so that local mistakes (a missing --api-key-file...) are
        // reported before network ones.
        let channel = builder.connect_lazy();
        Ok(Self {
            has_token: auth.has_token(),
            client: AdminServiceClient::with_interceptor(channel, auth),
            endpoint,
        })
    }

    /// Turns a failed call into the error printed to the user.
    pub fn error(&self, status: Status) -> anyhow::Error {
        // A status carrying a source was produced on this side (connection refused or lost,
        // HTTP/2 failure, timeout); a status sent by the server carries none.
        if let Some(source) = status.source() {
            if status.code() == Code::Unavailable {
                return unreachable_error(&self.endpoint, source);
            }
            return anyhow!(
                "no gRPC answer from the control plane at {}: {}",
                self.endpoint,
                error_chain(source)
            );
        }
        // An HTTP answer that is not gRPC (e.g. the data plane's port, or a proxy).
        if status.message().starts_with("grpc-status header missing") {
            return anyhow!(
                "no gRPC answer from the control plane at {}: {} (is this the control plane's gRPC address?)",
                self.endpoint,
                status.message()
            );
        }
        anyhow!(status_line(&status, self.has_token))
    }
}

/// Adds `http://` when the endpoint has no scheme.
pub fn normalize_endpoint(endpoint: &str) -> String {
    let endpoint = endpoint.trim();
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

fn unreachable_error(endpoint: &str, err: &(dyn StdError + 'static)) -> anyhow::Error {
    anyhow!(
        "cannot reach the control plane at {endpoint}: {}",
        error_chain(err)
    )
}

/// Joins an error and its sources with `: `, skipping the generic wrappers ("transport error")
/// and messages repeated by their source.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        let text = err.to_string();
        let generic = text == "transport error" || text.is_empty();
        let repeated = parts.last().is_some_and(|last| last.contains(&text));
        if !generic && !repeated {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}

/// The server's message as it stands (`tps must be a positive integer, got 0`,
/// `connection "nope" not found`): the control plane writes each as a sentence naming the field or
/// the resource, so the code's words in front would only repeat it. An empty message falls back
/// to the code's words.
pub fn status_line(status: &Status, has_token: bool) -> String {
    let message = status.message().trim();
    let mut line = if message.is_empty() {
        code_words(status.code()).to_owned()
    } else {
        message.to_owned()
    };
    if status.code() == Code::Unauthenticated && !has_token {
        line.push_str(" (no admin token given: use --token or LLMCTL_TOKEN)");
    }
    line
}

/// The gRPC status code in lowercase words.
pub fn code_words(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_the_message_or_else_the_code_words() {
        let status = Status::invalid_argument("tps must be a positive integer, got 0");
        assert_eq!(
            status_line(&status, true),
            "tps must be a positive integer, got 0"
        );
        assert_eq!(
            status_line(&Status::not_found(" connection \"x\" not found\n"), true),
            "connection \"x\" not found"
        );
        assert_eq!(
            status_line(&Status::failed_precondition(""), true),
            "failed precondition"
        );
        assert_eq!(
            status_line(
                &Status::unauthenticated("invalid token for AdminService"),
                false
            ),
            "invalid token for AdminService (no admin token given: use --token or LLMCTL_TOKEN)"
        );
        assert_eq!(
            status_line(
                &Status::unauthenticated("invalid token for AdminService"),
                true
            ),
            "invalid token for AdminService"
        );
    }

    #[test]
    fn interceptor_sets_bearer_token() {
        let mut auth = BearerAuth::new(Some(" s3cret\n")).unwrap();
        let req = auth.call(Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );

        let mut none = BearerAuth::new(Some("  ")).unwrap();
        let req = none.call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(BearerAuth::new(Some("bad\u{7f}token")).is_err());
    }

    #[tokio::test]
    async fn plaintext_to_a_remote_control_plane_needs_allow_plaintext() {
        for local in [
            "http://127.0.0.1:8131",
            "localhost:8131",
            "http://[::1]:8131",
        ] {
            assert!(Admin::new(local, None, ClientTls::default(), false).is_ok());
        }
        for remote in ["http://10.1.2.3:8131", "cp.internal:8131"] {
            let err = Admin::new(remote, None, ClientTls::default(), false)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.starts_with("refusing plaintext http://") && err.contains("--allow-plaintext"),
                "{err}"
            );
            assert!(Admin::new(remote, None, ClientTls::default(), true).is_ok());
        }
        assert!(
            Admin::new(
                "https://cp.internal:8131",
                None,
                ClientTls::default(),
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn endpoints_without_scheme_get_http() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:8131"),
            "http://127.0.0.1:8131"
        );
        assert_eq!(normalize_endpoint("https://cp:8131"), "https://cp:8131");
    }
}
