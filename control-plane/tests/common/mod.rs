//! Shared helpers for the control plane's integration tests: a fresh database per test (a new
//! schema in the machine's Postgres, or a SQLite file), a started control plane and clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use llm_proxy_control_plane::crypto::MasterKeys;
use llm_proxy_control_plane::hub::HubTimings;
use llm_proxy_control_plane::server::{self, RunningControlPlane, ServerSettings};
use llm_proxy_proto::v1::admin_service_client::AdminServiceClient;
use llm_proxy_proto::v1::config_service_client::ConfigServiceClient;
use secrecy::{ExposeSecret as _, SecretString};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Base URL of the test Postgres (scripts/test.sh exports it; the machine's default otherwise).
pub fn postgres_base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database for one test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub fn secret_url(&self) -> SecretString {
        SecretString::from(self.url.clone())
    }
}

/// A new, empty schema in the test Postgres database; the URL selects it via `search_path`.
pub async fn fresh_postgres() -> TestDb {
    let base = postgres_base_url();
    let mut conn = AsyncPgConnection::establish(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to test Postgres at {base}: {e}"));
    let schema = format!(
        "t_{}",
        llm_proxy_control_plane::ids::new_id("x").trim_start_matches("x-")
    );
    diesel::sql_query(format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    TestDb {
        url: format!("{base}{sep}options=-c%20search_path%3D{schema}"),
        _dir: None,
    }
}

pub fn fresh_sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    TestDb {
        url,
        _dir: Some(dir),
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Postgres,
    Sqlite,
}

pub async fn fresh_db(backend: Backend) -> TestDb {
    match backend {
        Backend::Postgres => fresh_postgres().await,
        Backend::Sqlite => fresh_sqlite(),
    }
}

pub fn new_master_key() -> SecretString {
    MasterKeys::generate_encoded()
}

/// Logs of the code under test, shown for failing tests (`RUST_LOG` to choose levels).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn settings(db: &TestDb, master_key: &SecretString) -> ServerSettings {
    init_logs();
    let mut settings = ServerSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        db.secret_url(),
        SecretString::from(master_key.expose_secret().to_owned()),
    );
    settings.hub = HubTimings {
        coalesce: Duration::from_millis(20),
        poll: Duration::from_millis(500),
    };
    settings
}

pub async fn start(db: &TestDb) -> RunningControlPlane {
    server::start(settings(db, &new_master_key()))
        .await
        .unwrap()
}

pub type Interceptor =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, Interceptor>>;
pub type Config = ConfigServiceClient<InterceptedService<Channel, Interceptor>>;

fn bearer(token: Option<String>) -> Interceptor {
    Box::new(move |mut req: tonic::Request<()>| {
        if let Some(token) = &token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        Ok(req)
    })
}

pub async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn admin(cp: &RunningControlPlane, token: Option<&str>) -> Admin {
    AdminServiceClient::with_interceptor(channel(cp.grpc_addr).await, bearer(token.map(Into::into)))
}

pub async fn config_client(addr: std::net::SocketAddr, token: Option<&str>) -> Config {
    ConfigServiceClient::with_interceptor(channel(addr).await, bearer(token.map(Into::into)))
        .max_decoding_message_size(llm_proxy_catalog::MAX_GRPC_MESSAGE_BYTES)
}

/// `GET path` over HTTP/1.0 (the connection closes after the answer): status and body. Enough
/// for `/readyz` and `/metrics`; `None` when nothing answers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.ok()?;
    let status = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Some((status, body))
}

/// Polls `/readyz` on `metrics_addr` until it answers 200; panics after `patience`.
pub async fn wait_ready(metrics_addr: std::net::SocketAddr, patience: Duration) {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let answer = http_get(metrics_addr, "/readyz").await;
        if matches!(answer, Some((200, _))) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz did not turn 200 within {patience:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running `llm-proxy-control-plane serve` process and everything it wrote to stderr.
pub struct CpProcess {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl CpProcess {
    /// Kills the process and returns its log.
    pub async fn stop(mut self) -> String {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.log.lock().unwrap().clone()
    }
}

/// The addresses in the control plane's listening line: `llm-proxy control plane listening on
/// ADDR (gRPC), metrics on ADDR`, or under `LLM_PROXY_LOG_FORMAT=json` a JSON line with that
/// message and the `addr` and `metrics_addr` fields. `None` for any other line.
pub fn cp_listening_line(line: &str) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
    const PREFIX: &str = "llm-proxy control plane listening on ";
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        let fields = &json["fields"];
        if !fields["message"].as_str()?.starts_with(PREFIX) {
            return None;
        }
        let addr = |name: &str| fields[name].as_str().and_then(|a| a.parse().ok());
        return Some((addr("addr")?, addr("metrics_addr")?));
    }
    let rest = line.strip_prefix(PREFIX)?;
    Some((
        rest.split_whitespace().next()?.parse().ok()?,
        rest.rsplit(' ').next()?.parse().ok()?,
    ))
}

/// Starts the real binary on loopback ports with `DATABASE_URL=url` (and `env`); returns once it
/// printed its addresses (it listens before its database is ready).
pub async fn spawn_cp_binary(url: &str, master_key: &str, env: &[(&str, &str)]) -> CpProcess {
    use tokio::io::{AsyncBufReadExt as _, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-proxy-control-plane"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("DATABASE_URL", url)
        .env("LLM_PROXY_MASTER_KEY", master_key)
        .env("RUST_LOG", "info,llm_proxy_control_plane=debug")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (addr, metrics_addr) = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.lock().unwrap().push_str(&line);
            log.lock().unwrap().push('\n');
            if let Some(addrs) = cp_listening_line(&line) {
                return addrs;
            }
        }
        panic!("control plane exited: {}", log.lock().unwrap());
    })
    .await
    .expect("control plane did not print its addresses");
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push_str(&line);
            sink.lock().unwrap().push('\n');
        }
    });
    CpProcess {
        child,
        addr,
        metrics_addr,
        log,
    }
}

/// A TCP forwarder to `target` on a port of its own that can be shut (new connections refused,
/// open ones cut) and opened again: a database server that goes down and comes back, as the
/// control plane sees it.
pub struct TcpGate {
    pub addr: std::net::SocketAddr,
    target: std::net::SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TcpGate {
    /// A shut gate on a port that was free a moment ago (nothing listens there yet).
    pub fn shut(target: std::net::SocketAddr) -> Self {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        Self {
            addr,
            target,
            task: None,
        }
    }

    /// Starts accepting and forwarding.
    pub async fn open(&mut self) {
        assert!(self.task.is_none(), "gate already open");
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            // Owned by this task: aborting it drops the set, which aborts every forwarding.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        }));
    }

    /// Stops listening and cuts every forwarded connection.
    pub async fn shut_down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// `url` (a `postgres://` URL of the test server) with its host and port replaced by the gate's.
    pub fn url_for(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).unwrap();
        parsed.set_host(Some(&self.addr.ip().to_string())).unwrap();
        parsed.set_port(Some(self.addr.port())).unwrap();
        parsed.to_string()
    }
}

/// The socket address of the test Postgres server.
pub async fn postgres_addr() -> std::net::SocketAddr {
    let base = url::Url::parse(&postgres_base_url()).unwrap();
    let host = base.host_str().unwrap().to_owned();
    let port = base.port().unwrap_or(5432);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap()
}
