//! Starting a control plane: the gRPC server (admin + config + health) and the metrics/health
//! HTTP server, bound first; then, in the background, the database (connect, migrations,
//! master-key check: see [`crate::readiness`]) and the snapshot hub. Used by the binary, by
//! `llmctl serve` and by tests.

use crate::admin::AdminApi;
use crate::auth::{ExpectedToken, TokenCheck};
use crate::config_service::{ConfigApi, StreamsDone};
use crate::crypto::{CryptoError, MasterKeys};
use crate::db::{Database, DbError};
use crate::error::StoreError;
use crate::hub::{self, HubTimings, SnapshotHub};
use crate::readiness::{self, Readiness};
use crate::rpc_observer::{RpcMetrics, RpcObserverLayer};
use crate::store::Store;
use llm_proxy_proto::v1::admin_service_server::AdminServiceServer;
use llm_proxy_proto::v1::config_service_server::ConfigServiceServer;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use secrecy::SecretString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// The flags (and env vars) of the two tokens, as error messages name them.
pub const ADMIN_TOKEN_FLAG: &str = "--admin-token (LLM_PROXY_ADMIN_TOKEN)";
pub const DATAPLANE_TOKEN_FLAG: &str = "--dataplane-token (LLM_PROXY_DATAPLANE_TOKEN)";

/// How long a shutdown waits for config streams to record their data plane's disconnection.
const STREAMS_DONE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `/readyz` waits for the database before answering 503 (probes time out too).
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{flag} is required when the control plane listens on {listen} (not loopback-only)")]
    TokenRequired {
        flag: &'static str,
        listen: SocketAddr,
    },
    #[error("{flag} is empty (or only whitespace): give a non-empty token")]
    TokenEmpty { flag: &'static str },
    #[error(
        "refusing plaintext gRPC on {listen} (not loopback): give --tls-cert and --tls-key (LLM_PROXY_CP_TLS_CERT, LLM_PROXY_CP_TLS_KEY), or pass --allow-plaintext (LLM_PROXY_ALLOW_PLAINTEXT) if this network is private"
    )]
    PlaintextRefused { listen: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(String),
    #[error("master key: {0}")]
    MasterKey(#[from] CryptoError),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("master key check failed: {0}")]
    CredentialCheck(StoreError),
    /// The database bring-up gave up (e.g. the master key opens no stored credential).
    #[error("{0}")]
    Startup(String),
}

#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// `None`: no metrics/health HTTP server (e.g. when the caller serves its own).
    pub metrics_listen: Option<SocketAddr>,
    pub database_url: SecretString,
    /// Comma-separated base64 keys, first active.
    pub master_keys: SecretString,
    pub admin_token: Option<SecretString>,
    pub dataplane_token: Option<SecretString>,
    pub tls: TlsFiles,
    /// Allow plaintext gRPC on a non-loopback `listen` (a private network; DESIGN §19).
    pub allow_plaintext: bool,
    pub heartbeat_every: Duration,
    pub hub: HubTimings,
    pub max_db_connections: usize,
}

impl ServerSettings {
    pub fn new(listen: SocketAddr, database_url: SecretString, master_keys: SecretString) -> Self {
        Self {
            listen,
            metrics_listen: None,
            database_url,
            master_keys,
            admin_token: None,
            dataplane_token: None,
            tls: TlsFiles::default(),
            allow_plaintext: false,
            heartbeat_every: Duration::from_secs(10),
            hub: HubTimings::default(),
            max_db_connections: 16,
        }
    }
}

/// Metrics of the control plane (more arrive with the observability work).
#[derive(Debug, Clone, Default)]
pub struct CpMetrics {
    pub subscribers: Gauge,
    pub config_version: Gauge,
    pub db_pool_connections: Family<Vec<(&'static str, &'static str)>, Gauge>,
    /// Connections left out of the latest snapshot: their credential does not decrypt here.
    pub undecryptable_credentials: Gauge,
    pub rpc: RpcMetrics,
}

impl CpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "llm_proxy_cp_subscribers",
            "Data planes subscribed to this control plane",
            self.subscribers.clone(),
        );
        registry.register(
            "llm_proxy_cp_config_version",
            "Config version of the latest snapshot",
            self.config_version.clone(),
        );
        registry.register(
            "llm_proxy_cp_db_pool_connections",
            "Database pool connections by state",
            self.db_pool_connections.clone(),
        );
        registry.register(
            "llm_proxy_cp_undecryptable_credentials",
            "Connections left out of the latest snapshot because their credential does not decrypt with this replica's master keys",
            self.undecryptable_credentials.clone(),
        );
        self.rpc.register(registry);
    }
}

/// A running control plane. Dropping it does not stop it; call [`RunningControlPlane::shutdown`].
#[derive(Debug)]
pub struct RunningControlPlane {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub store: Store,
    pub hub: Arc<SnapshotHub>,
    pub metrics: CpMetrics,
    /// Where the database bring-up stands.
    pub readiness: Readiness,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    streams_done: StreamsDone,
}

impl RunningControlPlane {
    /// Stops accepting calls, ends streams and waits for the servers to finish, and (for a
    /// bounded time) for the streams' last status writes.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        if tokio::time::timeout(STREAMS_DONE_TIMEOUT, self.streams_done.wait())
            .await
            .is_err()
        {
            tracing::warn!("config streams still recording their disconnection at shutdown");
        }
    }

    /// Resolves when the control plane's gRPC server has stopped.
    pub async fn wait(mut self) {
        if let Some(grpc) = self.tasks.first_mut() {
            let _ = grpc.await;
        }
    }

    /// Resolves once the database is connected and migrated, or with the reason the bring-up
    /// gave up (the control plane then stops serving by itself).
    pub async fn database_ready(&self) -> Result<(), ServerError> {
        self.readiness.wait().await.map_err(ServerError::Startup)
    }

    /// `/readyz` of the control plane: `Err` with the reason until the database is connected and
    /// migrated, and whenever it does not answer.
    pub async fn readiness_check(&self) -> Result<(), String> {
        readiness_check(&self.readiness, &self.store).await
    }

    /// `/readyz` as a bool (see [`Self::readiness_check`]).
    pub async fn ready(&self) -> bool {
        self.readiness_check().await.is_ok()
    }

    /// Prometheus text of the control plane's metrics.
    pub fn render_metrics(&self) -> String {
        render(&self.metrics, &self.store)
    }
}

fn render(metrics: &CpMetrics, store: &Store) -> String {
    let (busy, idle) = store.database().pool_status();
    metrics
        .db_pool_connections
        .get_or_create(&vec![("state", "in_use")])
        .set(i64::try_from(busy).unwrap_or(i64::MAX));
    metrics
        .db_pool_connections
        .get_or_create(&vec![("state", "idle")])
        .set(i64::try_from(idle).unwrap_or(i64::MAX));
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

async fn readiness_check(readiness: &Readiness, store: &Store) -> Result<(), String> {
    if let Some(reason) = readiness.not_ready_reason() {
        return Err(reason);
    }
    match tokio::time::timeout(READY_CHECK_TIMEOUT, store.current_version()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!(
            "database unavailable: no answer within {} s",
            READY_CHECK_TIMEOUT.as_secs()
        )),
    }
}

async fn read_file(path: &PathBuf) -> Result<Vec<u8>, ServerError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| ServerError::ReadFile {
            path: path.clone(),
            source,
        })
}

async fn tls_config(files: &TlsFiles) -> Result<Option<ServerTlsConfig>, ServerError> {
    match (&files.cert, &files.key) {
        (None, None) => {
            if files.client_ca.is_some() {
                return Err(ServerError::Tls(
                    "--tls-client-ca needs --tls-cert and --tls-key".into(),
                ));
            }
            Ok(None)
        }
        (Some(cert), Some(key)) => {
            let identity = Identity::from_pem(read_file(cert).await?, read_file(key).await?);
            let mut config = ServerTlsConfig::new().identity(identity);
            if let Some(ca) = &files.client_ca {
                config = config.client_ca_root(Certificate::from_pem(read_file(ca).await?));
            }
            Ok(Some(config))
        }
        _ => Err(ServerError::Tls(
            "--tls-cert and --tls-key must be given together".into(),
        )),
    }
}

/// Connects to the database and runs pending migrations.
pub async fn migrate(database_url: &SecretString) -> Result<(Database, usize), ServerError> {
    let db = Database::connect(database_url, 2).await?;
    let applied = db.migrate().await?;
    Ok((db, applied))
}

/// The tokens' digests: `None` for a token not given. Refuses a blank token, and a missing one
/// unless the server listens on loopback only.
fn expected_tokens(
    settings: &ServerSettings,
) -> Result<(Option<ExpectedToken>, Option<ExpectedToken>), ServerError> {
    let expected = |token: Option<&SecretString>, flag: &'static str| {
        token
            .map(|t| ExpectedToken::new(t).ok_or(ServerError::TokenEmpty { flag }))
            .transpose()
    };
    let admin = expected(settings.admin_token.as_ref(), ADMIN_TOKEN_FLAG)?;
    let dataplane = expected(settings.dataplane_token.as_ref(), DATAPLANE_TOKEN_FLAG)?;
    if !settings.listen.ip().is_loopback() {
        if admin.is_none() {
            return Err(ServerError::TokenRequired {
                flag: ADMIN_TOKEN_FLAG,
                listen: settings.listen,
            });
        }
        if dataplane.is_none() {
            return Err(ServerError::TokenRequired {
                flag: DATAPLANE_TOKEN_FLAG,
                listen: settings.listen,
            });
        }
    }
    Ok((admin, dataplane))
}

/// Plaintext gRPC carries the snapshot's decrypted credentials and the tokens: only on loopback,
/// unless the operator says the network is private.
fn check_plaintext(
    settings: &ServerSettings,
    tls: Option<&ServerTlsConfig>,
) -> Result<(), ServerError> {
    if tls.is_none() && !settings.listen.ip().is_loopback() && !settings.allow_plaintext {
        return Err(ServerError::PlaintextRefused {
            listen: settings.listen,
        });
    }
    Ok(())
}

/// Checks the settings without touching the database or binding (`check-config`): tokens,
/// master key, database URL form and its TLS parameters (`sslrootcert` & co. read), TLS files.
/// Returns a one-line summary (no secrets).
pub async fn check(settings: &ServerSettings) -> Result<String, ServerError> {
    expected_tokens(settings)?;
    let keys = MasterKeys::parse(&settings.master_keys)?;
    let database = crate::db::check_url(&settings.database_url).await?;
    let tls = tls_config(&settings.tls).await?;
    check_plaintext(settings, tls.as_ref())?;
    let tls_mode = match &tls {
        None if settings.allow_plaintext && !settings.listen.ip().is_loopback() => {
            "off (--allow-plaintext)"
        }
        None => "off",
        Some(_) if settings.tls.client_ca.is_some() => "mtls",
        Some(_) => "on",
    };
    if let Some(tls) = tls {
        // Loads the certificate and key now rather than at bind time.
        Server::builder()
            .tls_config(tls)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    Ok(format!(
        "listen={} metrics_listen={} database={database} master_keys={} active_key_id={} admin_token={} dataplane_token={} tls={tls_mode}",
        settings.listen,
        settings
            .metrics_listen
            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        keys.key_ids().len(),
        keys.active_key_id(),
        if settings.admin_token.is_some() {
            "set"
        } else {
            "unset"
        },
        if settings.dataplane_token.is_some() {
            "set"
        } else {
            "unset"
        },
    ))
}

/// Binds and starts serving, then waits until the database is connected and migrated (retrying
/// while it is down, see [`crate::readiness`]). Fails when the settings are invalid, a listener
/// cannot be bound, or the bring-up gives up (the control plane is then shut down).
pub async fn start(settings: ServerSettings) -> Result<RunningControlPlane, ServerError> {
    let running = launch(settings).await?;
    if let Err(err) = running.database_ready().await {
        running.shutdown().await;
        return Err(err);
    }
    Ok(running)
}

/// Binds and starts serving at once; the database is brought up in the background. Until it is
/// ready, admin calls and status reports answer `Unavailable`, `/readyz` answers 503, and
/// subscribers wait for the first snapshot. If the bring-up gives up, the servers stop and
/// [`RunningControlPlane::database_ready`] says why.
pub async fn launch(settings: ServerSettings) -> Result<RunningControlPlane, ServerError> {
    let (admin_token, dataplane_token) = expected_tokens(&settings)?;
    let keys = Arc::new(MasterKeys::parse(&settings.master_keys)?);
    let tls = tls_config(&settings.tls).await?;
    check_plaintext(&settings, tls.as_ref())?;
    let db = Database::open(&settings.database_url, settings.max_db_connections).await?;
    let store = Store::new(db, keys);

    let grpc_listener =
        TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: settings.listen,
                source,
            })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: settings.listen,
            source,
        })?;
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let metrics = CpMetrics::default();
    let hub = Arc::new(SnapshotHub::new(metrics.undecryptable_credentials.clone()));
    let (readiness_tx, readiness) = Readiness::channel();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let admin_check = TokenCheck::new("AdminService", admin_token);
    let config_check = TokenCheck::new("ConfigService", dataplane_token);
    let admin_readiness = readiness.clone();
    let admin = AdminServiceServer::with_interceptor(AdminApi::new(store.clone()), move |req| {
        let req = admin_check.check(req)?;
        // Every admin call needs the database: say why it is not there yet.
        admin_readiness.check()?;
        Ok(req)
    });
    let (config_api, streams_done) = ConfigApi::new(
        store.clone(),
        hub.clone(),
        settings.heartbeat_every,
        metrics.subscribers.clone(),
        shutdown_rx.clone(),
        readiness.clone(),
    );
    let config = tonic::service::interceptor::InterceptedService::new(
        ConfigServiceServer::new(config_api)
            .max_decoding_message_size(llm_proxy_catalog::MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(llm_proxy_catalog::MAX_GRPC_MESSAGE_BYTES),
        move |req| config_check.check(req),
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AdminServiceServer<AdminApi>>()
        .await;
    health_reporter
        .set_serving::<ConfigServiceServer<ConfigApi>>()
        .await;

    let mut builder = Server::builder()
        .layer(RpcObserverLayer {
            metrics: metrics.rpc.clone(),
        })
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(admin)
        .add_service(config);
    let mut grpc_shutdown = shutdown_rx.clone();
    #[allow(
        clippy::disallowed_methods,
        reason = "the handle is kept in RunningControlPlane and joined at shutdown"
    )]
    tasks.push(tokio::spawn(async move {
        let stop = async move {
            let _ = grpc_shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(err) = router
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), stop)
            .await
        {
            tracing::error!(error = %err, "gRPC server failed");
        }
    }));

    // The database, then the snapshots: connect and migrate (retrying), then keep the hub at the
    // database's version until shutdown. A bring-up that gives up stops the servers.
    let mut database_shutdown = shutdown_rx.clone();
    let (db_store, db_hub, hub_timings) = (store.clone(), hub.clone(), settings.hub);
    let stop_everything = shutdown_tx.clone();
    let version_gauge = metrics.config_version.clone();
    #[allow(
        clippy::disallowed_methods,
        reason = "the handle is kept in RunningControlPlane and joined at shutdown"
    )]
    tasks.push(tokio::spawn(async move {
        let serve = async {
            if readiness::bring_up(&db_store, &readiness_tx).await.is_err() {
                let _ = stop_everything.send(true);
                return;
            }
            let mut versions = db_hub.subscribe();
            let gauge = async move {
                while versions.changed().await.is_ok() {
                    let version = versions
                        .borrow_and_update()
                        .as_ref()
                        .map_or(0, |s| s.version);
                    version_gauge.set(version);
                }
            };
            tokio::join!(
                hub::run_refresher(db_store.clone(), db_hub, hub_timings),
                gauge
            );
        };
        tokio::select! {
            _ = database_shutdown.wait_for(|stop| *stop) => {}
            () = serve => {}
        }
    }));

    if let Some(listener) = metrics_listener {
        let app = llm_proxy_telemetry::health_router(Arc::new(CpHealth {
            metrics: metrics.clone(),
            store: store.clone(),
            readiness: readiness.clone(),
        }));
        let mut http_shutdown = shutdown_rx.clone();
        #[allow(
            clippy::disallowed_methods,
            reason = "the handle is kept in RunningControlPlane and joined at shutdown"
        )]
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = http_shutdown.wait_for(|stop| *stop).await;
            };
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %err, "metrics server failed");
            }
        }));
    }

    tracing::info!(%grpc_addr, metrics = ?metrics_addr, backend = ?store.database().backend(), "control plane listening");
    Ok(RunningControlPlane {
        grpc_addr,
        metrics_addr,
        store,
        hub,
        metrics,
        readiness,
        shutdown: shutdown_tx,
        tasks,
        streams_done,
    })
}

/// What the control plane's `/readyz` and `/metrics` report.
struct CpHealth {
    metrics: CpMetrics,
    store: Store,
    readiness: Readiness,
}

impl llm_proxy_telemetry::HealthSource for CpHealth {
    async fn readiness(&self) -> Result<String, String> {
        readiness_check(&self.readiness, &self.store)
            .await
            .map(|()| "ready".to_owned())
    }

    fn metrics(&self) -> String {
        render(&self.metrics, &self.store)
    }
}

/// Re-encrypts every stored credential under the first (active) master key.
pub async fn rotate_master_key(
    database_url: &SecretString,
    master_keys: &SecretString,
) -> Result<(usize, String), ServerError> {
    let keys = Arc::new(MasterKeys::parse(master_keys)?);
    let (db, _) = migrate(database_url).await?;
    let store = Store::new(db, keys.clone());
    let count = store
        .rotate_credentials()
        .await
        .map_err(ServerError::CredentialCheck)?;
    Ok((count, keys.active_key_id()))
}
