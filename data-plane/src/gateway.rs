//! Starting a data plane: config sync, the API listener, the metrics/health listener, and a
//! graceful shutdown that lets in-flight requests and streams finish within a grace period.

use crate::budget::Budgets;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::ratelimit::redis::{FailMode, RedisLimiter, RedisLimiterConfig};
use crate::ratelimit::redis_client::{self, RedisClientError};
use crate::ratelimit::{AnyLimiter, LocalLimiter};
use crate::server::{self, AppState};
use crate::sync::{self, ConfigHandle, SyncSettings};
use crate::usage_report::{UsageSettings, UsageShipper};

use secrecy::SecretString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(String),
    #[error("invalid --redis-url: {0}")]
    Redis(String),
    #[error(transparent)]
    RedisClient(#[from] RedisClientError),
    #[error("--redis-ca-file (LLM_PROXY_REDIS_CA_FILE) is set without --redis-url")]
    RedisCaWithoutUrl,
}

/// Default address of the OpenAI-compatible API (DESIGN §3).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8132";
/// Default address of `/metrics`, `/healthz`, `/readyz` (DESIGN §3).
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9132";
/// Default control-plane URL (DESIGN §3).
pub const DEFAULT_CONTROL_PLANE: &str = "http://127.0.0.1:8131";

#[derive(Debug)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub sync: SyncSettings,
    /// The caps of DESIGN §19 (body size, timeouts, concurrency, upstream answers).
    pub limits: Limits,
    /// Shared buckets in Redis; `None` = in-process buckets (one data plane only).
    pub redis_url: Option<SecretString>,
    /// PEM CA bundle that a `rediss://` server's certificate must chain to (instead of the
    /// compiled-in Mozilla roots).
    pub redis_ca_file: Option<PathBuf>,
    pub ratelimit_fail_mode: FailMode,
    /// Time budget of one Redis limiter call before the fail mode answers.
    pub ratelimit_redis_budget: Duration,
    /// Usage shipping to the control plane (`--usage-report-interval-s`, `--usage-queue-max-batches`).
    pub usage: UsageSettings,
}

impl GatewaySettings {
    /// A data plane on `listen` with the DESIGN defaults: no metrics listener, in-process
    /// buckets, the default limits and fail mode, syncing through `sync` (callers set the
    /// fields their flags change).
    pub fn new(listen: SocketAddr, sync: SyncSettings) -> Self {
        Self {
            listen,
            metrics_listen: None,
            sync,
            limits: Limits::default(),
            redis_url: None,
            redis_ca_file: None,
            ratelimit_fail_mode: FailMode::default(),
            ratelimit_redis_budget: Duration::from_millis(
                crate::ratelimit::redis::DEFAULT_BUDGET_MS,
            ),
            usage: UsageSettings::default(),
        }
    }

    /// A data plane on a free loopback port (tests and embedded use).
    pub fn on_loopback(sync: SyncSettings) -> Self {
        Self::new(SocketAddr::from(([127, 0, 0, 1], 0)), sync)
    }
}

#[derive(Debug)]
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub config: Arc<ConfigHandle>,
    pub limiter: Arc<AnyLimiter>,
    pub metrics: Arc<Metrics>,
    /// Ships usage to the control plane; [`UsageShipper::flush`] sends what is pending now.
    pub usage: Arc<UsageShipper>,
    /// Set when shutdown starts: `/readyz` answers 503 and responses carry `Connection: close`.
    draining: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    others: Vec<JoinHandle<()>>,
}

impl RunningGateway {
    /// Ready once a snapshot has been applied.
    pub fn ready(&self) -> bool {
        self.config.current().is_some()
    }

    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.config, &self.limiter)
    }

    /// Stops accepting new connections; in-flight requests go on (see [`Self::shutdown`]).
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// SIGTERM handling: first `delay` of draining while still serving (`/readyz` says 503 so
    /// that load balancers stop sending, every response carries `Connection: close` so that kept-
    /// alive client connections end cleanly instead of being cut under a request), then
    /// [`Self::shutdown`].
    pub async fn drain_then_shutdown(self, delay: Duration, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        if !delay.is_zero() {
            tracing::info!(
                delay_s = delay.as_secs_f64(),
                "draining: not ready, closing kept-alive connections"
            );
            // A deliberate pause: load balancers need this long to notice /readyz.
            tokio::time::sleep(delay).await;
        }
        self.shutdown(grace).await;
    }

    /// Stops accepting, lets in-flight requests and streams finish for up to `grace`, then
    /// ships the usage still pending (within what is left of `grace`, at least a second) and stops.
    pub async fn shutdown(self, grace: Duration) {
        let started = Instant::now();
        self.draining.store(true, Ordering::Release);
        self.begin_shutdown();
        let mut server = self.server;
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            tracing::warn!(
                grace_s = grace.as_secs_f64(),
                "grace period over; closing remaining connections"
            );
            server.abort();
        }
        let left = grace
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        match tokio::time::timeout(left, self.usage.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "usage not shipped at shutdown"),
            Err(_) => tracing::warn!("usage not shipped at shutdown: out of time"),
        }
        for task in self.others {
            task.abort();
        }
    }
}

/// The Redis client of `--redis-url` (with `--redis-ca-file`); `None` without `--redis-url`.
async fn redis_client(settings: &GatewaySettings) -> Result<Option<::redis::Client>, GatewayError> {
    match (&settings.redis_url, &settings.redis_ca_file) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(GatewayError::RedisCaWithoutUrl),
        (Some(url), ca_file) => Ok(Some(redis_client::client(url, ca_file.as_deref()).await?)),
    }
}

async fn limiter(
    settings: &GatewaySettings,
    config: &Arc<ConfigHandle>,
) -> Result<AnyLimiter, GatewayError> {
    let Some(client) = redis_client(settings).await? else {
        return Ok(AnyLimiter::Local(LocalLimiter::new()));
    };
    let limiter_config = RedisLimiterConfig {
        fail_mode: settings.ratelimit_fail_mode,
        budget: settings.ratelimit_redis_budget,
        ..RedisLimiterConfig::default()
    };
    let handle = config.clone();
    let redis =
        RedisLimiter::with_client(client, limiter_config, move || handle.live_data_planes())
            // The error text does not repeat the URL (it may hold a password).
            .map_err(|e| GatewayError::Redis(format!("{:?}", e.kind())))?;
    Ok(AnyLimiter::Redis(redis))
}

/// Checks the settings without binding or connecting (`--check-config`): the Redis URL's form and
/// its CA file (the control plane URL and TLS files are checked by [`SyncSettings::endpoint`]).
/// Returns a one-line summary without secrets.
pub async fn check(settings: &GatewaySettings) -> Result<String, GatewayError> {
    let redis = redis_client(settings).await?;
    Ok(format!(
        "listen={} metrics_listen={} control_plane={} dataplane_token={} tls={} ratelimit={} fail_mode={:?} max_body_bytes={}",
        settings.listen,
        settings
            .metrics_listen
            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        settings.sync.control_plane,
        if settings.sync.token.is_some() {
            "set"
        } else {
            "unset"
        },
        if settings.sync.tls.is_some() {
            "on"
        } else {
            "off"
        },
        match &redis {
            None => "in-process".to_owned(),
            Some(client) => format!(
                "{}{}",
                redis_client::describe(client),
                if settings.redis_ca_file.is_some() {
                    "+ca-file"
                } else {
                    ""
                }
            ),
        },
        settings.ratelimit_fail_mode,
        settings.limits.max_body_bytes,
    ))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { addr, source })
}

pub async fn start(settings: GatewaySettings) -> Result<RunningGateway, GatewayError> {
    let listener = bind(settings.listen).await?;
    let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: settings.listen,
        source,
    })?;
    let config = ConfigHandle::new();
    let client = server::upstream_client().map_err(|e| GatewayError::Client(e.to_string()))?;
    let http = crate::upstream_http::UpstreamHttp::from_env(client.clone())
        .map_err(|e| GatewayError::Client(e.to_string()))?;
    let limiter = Arc::new(limiter(&settings, &config).await?);
    let draining = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::new());
    let usage = Arc::new(UsageShipper::new(
        &settings.sync,
        settings.usage,
        metrics.clone(),
    ));
    let budgets = Arc::new(Budgets::new(
        match &*limiter {
            AnyLimiter::Redis(redis) => Some(redis.clone()),
            AnyLimiter::Local(_) => None,
        },
        settings.ratelimit_fail_mode,
        settings.ratelimit_redis_budget,
        usage.clone(),
    ));
    let state = AppState {
        budgets,
        usage: usage.aggregator.clone(),
        metrics: metrics.clone(),
        draining: draining.clone(),
        config: config.clone(),
        limiter: limiter.clone(),
        upstreams: Arc::new(crate::providers::Upstreams::new(
            http,
            client,
            settings.limits,
        )),
        limits: settings.limits,
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let sync_settings = settings.sync;
    let sync_config = config.clone();
    let shipper = usage.clone();
    let interval = settings.usage.interval;
    let mut others = vec![
        crate::process::supervise("config_sync", metrics.front_door.clone(), move || {
            sync::run(sync_settings.clone(), sync_config.clone())
        }),
        crate::process::supervise("usage_report", metrics.front_door.clone(), move || {
            shipper.clone().run(interval)
        }),
    ];

    let routes = crate::front_door::Routes {
        hot: Some(Arc::new(server::HotRoutes(state.clone()))),
        router: server::router(state),
    };
    let stop = shutdown_rx.clone();
    #[allow(
        clippy::disallowed_methods,
        reason = "the handle is kept in RunningGateway and joined at shutdown"
    )]
    let server = tokio::spawn(crate::front_door::serve(
        listener,
        routes,
        settings.limits,
        metrics.front_door.clone(),
        stop,
    ));

    let mut metrics_addr = None;
    if let Some(metrics_listen) = settings.metrics_listen {
        let listener = bind(metrics_listen).await?;
        metrics_addr = listener.local_addr().ok();
        let app = llm_proxy_telemetry::health_router(Arc::new(DpHealth {
            config: config.clone(),
            limiter: limiter.clone(),
            draining: draining.clone(),
            metrics: metrics.clone(),
        }));
        #[allow(
            clippy::disallowed_methods,
            reason = "the handle is kept in RunningGateway and aborted at shutdown"
        )]
        others.push(tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "data plane metrics server failed");
            }
        }));
    }
    tracing::info!(%addr, metrics = ?metrics_addr, "data plane listening");
    Ok(RunningGateway {
        addr,
        metrics_addr,
        config,
        limiter,
        metrics,
        usage,
        draining,
        shutdown: shutdown_tx,
        server,
        others,
    })
}

/// What a data plane's `/readyz` and `/metrics` report.
struct DpHealth {
    config: Arc<ConfigHandle>,
    limiter: Arc<AnyLimiter>,
    draining: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl llm_proxy_telemetry::HealthSource for DpHealth {
    async fn readiness(&self) -> Result<String, String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".to_owned());
        }
        match self.config.current() {
            Some(c) => Ok(format!("ready (config version {})", c.version)),
            None => Err("no config snapshot applied yet".to_owned()),
        }
    }

    fn metrics(&self) -> String {
        self.metrics.render(&self.config, &self.limiter)
    }
}
