//! Keeps the data plane's [`ConfigIndex`] current from the control plane's config stream
//! (DESIGN §7).
//!
//! [`spawn`] runs one task that subscribes to `ConfigService.Subscribe`, builds an index from
//! every snapshot part by part as the parts arrive (on a blocking thread when a part is large),
//! swaps it into the shared
//! [`ConfigHandle`] atomically and reports the applied version with `ReportStatus`. When the
//! stream ends or fails, the task reconnects with jittered exponential backoff while requests keep
//! being served from the last index.

use crate::index::{ConfigIndex, IndexBuilder};
use arc_swap::ArcSwapOption;
use llm_proxy_proto::v1::config_service_client::ConfigServiceClient;
use llm_proxy_proto::v1::{ReportStatusRequest, Snapshot, SubscribeRequest, config_event};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use prost::Message as _;
use secrecy::{ExposeSecret as _, SecretString};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Snapshot parts with more entries than this are indexed on a blocking thread.
const INLINE_BUILD_MAX_ENTRIES: usize = 2_000;

/// Snapshots larger than this (encoded) are finished, and their predecessor freed, on a blocking
/// thread.
const INLINE_FINISH_MAX_BYTES: usize = 1 << 20;

/// Reconnect backoff: full jitter over an exponentially growing window.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Bound on a single `ReportStatus` call (it is retried on the next event when it fails).
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// When and how the current index was applied.
#[derive(Debug, Clone, Copy)]
pub struct AppliedInfo {
    pub version: i64,
    pub at: Instant,
    /// Time to build the index from the snapshot (`llm_proxy_snapshot_apply_seconds`).
    pub build_time: Duration,
}

/// The data plane's current config, shared by the sync task and the request path.
#[derive(Debug)]
pub struct ConfigHandle {
    current: ArcSwapOption<ConfigIndex>,
    /// Version of the index currently held (`None` before the first one).
    version: watch::Sender<Option<i64>>,
    connected: watch::Sender<bool>,
    live_data_planes: AtomicI64,
    applied: Mutex<Option<AppliedInfo>>,
    /// Last time the control plane confirmed the config (a snapshot or a heartbeat).
    confirmed: Mutex<Option<Instant>>,
    /// Time to build and swap in each snapshot (`llm_proxy_snapshot_apply_seconds`).
    apply_seconds: Histogram,
    /// Encoded size of the latest snapshot received (`llm_proxy_snapshot_bytes`).
    snapshot_bytes: Gauge,
}

impl ConfigHandle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::const_empty(),
            version: watch::Sender::new(None),
            connected: watch::Sender::new(false),
            live_data_planes: AtomicI64::new(0),
            applied: Mutex::new(None),
            confirmed: Mutex::new(None),
            apply_seconds: Histogram::new([
                0.000_1, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            snapshot_bytes: Gauge::default(),
        })
    }

    /// The current index, `None` until the first snapshot is applied (`/readyz` fails, requests
    /// get 503). An owned `Arc` (one atomic increment): handlers keep it across the upstream call,
    /// and a later swap never changes the config a request started with.
    pub fn current(&self) -> Option<Arc<ConfigIndex>> {
        self.current.load_full()
    }

    /// Swaps in a new index atomically; in-flight requests keep the one they loaded.
    pub fn apply(&self, index: ConfigIndex) {
        self.apply_timed(index, Duration::ZERO);
    }

    fn apply_timed(&self, index: ConfigIndex, build_time: Duration) -> Option<Arc<ConfigIndex>> {
        let version = index.version;
        self.live_data_planes
            .store(index.live_data_planes, Ordering::Relaxed);
        let old = self.current.swap(Some(Arc::new(index)));
        if let Ok(mut applied) = self.applied.lock() {
            *applied = Some(AppliedInfo {
                version,
                at: Instant::now(),
                build_time,
            });
        }
        self.version.send_replace(Some(version));
        old
    }

    /// Resolves once the index held has `version >= min_version` (immediately if it already
    /// has). Versions come from the control plane and only grow within one cluster epoch.
    pub async fn wait_for_version(&self, min_version: i64) {
        let mut rx = self.version.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|v| v.is_some_and(|v| v >= min_version)).await;
    }

    /// Version of the index held, if any.
    pub fn version(&self) -> Option<i64> {
        *self.version.borrow()
    }

    /// True while a config stream to the control plane is open.
    pub fn connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Resolves once [`Self::connected`] equals `connected`.
    pub async fn wait_connected(&self, connected: bool) {
        let mut rx = self.connected.subscribe();
        let _ = rx.wait_for(|c| *c == connected).await;
    }

    fn set_connected(&self, connected: bool) {
        self.connected.send_if_modified(|c| {
            let changed = *c != connected;
            *c = connected;
            changed
        });
    }

    /// Data planes live cluster-wide, from the latest snapshot or heartbeat (0 = unknown).
    pub fn live_data_planes(&self) -> i64 {
        self.live_data_planes.load(Ordering::Relaxed)
    }

    /// When the current index was applied, and how long it took to build.
    pub fn last_applied(&self) -> Option<AppliedInfo> {
        self.applied.lock().ok().and_then(|a| *a)
    }

    fn confirm(&self) {
        if let Ok(mut confirmed) = self.confirmed.lock() {
            *confirmed = Some(Instant::now());
        }
    }

    /// Seconds since the control plane last confirmed the config (snapshot or heartbeat); grows
    /// while the config stream is down. `None` before the first snapshot.
    pub fn config_age(&self) -> Option<Duration> {
        self.confirmed
            .lock()
            .ok()
            .and_then(|c| *c)
            .map(|at| at.elapsed())
    }

    /// Adds the config gauges (`llm_proxy_config_*`, `llm_proxy_control_plane_connected`,
    /// `llm_proxy_snapshot_*`) to a scrape.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let gauge = |value: i64| {
            let g: Gauge = Gauge::default();
            g.set(value);
            g
        };
        registry.register(
            "llm_proxy_config_version",
            "Config version applied by this data plane (0 before the first snapshot)",
            gauge(self.version().unwrap_or(0)),
        );
        let age: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        age.set(self.config_age().map_or(0.0, |a| a.as_secs_f64()));
        registry.register(
            "llm_proxy_config_age_seconds",
            "Seconds since the control plane last confirmed the config (snapshot or heartbeat)",
            age,
        );
        registry.register(
            "llm_proxy_control_plane_connected",
            "1 while the config stream to the control plane is open",
            gauge(i64::from(self.connected())),
        );
        registry.register(
            "llm_proxy_snapshot_apply_seconds",
            "Time to index and swap in a config snapshot",
            self.apply_seconds.clone(),
        );
        registry.register(
            "llm_proxy_snapshot_bytes",
            "Encoded size of the latest config snapshot received",
            self.snapshot_bytes.clone(),
        );
    }
}

/// Where and how to reach the control plane. `Debug` shows neither the token nor the TLS
/// material (tonic's `ClientTlsConfig` debug-prints a client identity's private key).
#[derive(Clone)]
pub struct SyncSettings {
    /// gRPC URL of the control plane, e.g. `http://127.0.0.1:8131`.
    pub control_plane: String,
    /// Data-plane token, sent as `authorization: Bearer <token>`.
    pub token: Option<SecretString>,
    pub node_id: String,
    pub build: String,
    /// Required for `https://` URLs (CA, optional client identity for mTLS).
    pub tls: Option<ClientTlsConfig>,
}

impl std::fmt::Debug for SyncSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSettings")
            .field("control_plane", &self.control_plane)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .field("node_id", &self.node_id)
            .field("build", &self.build)
            .field("tls", &self.tls.as_ref().map(|_| "[configured]"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("invalid control plane URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid data-plane token: it must be printable ASCII")]
    InvalidToken,
    #[error(
        "--dataplane-token (LLM_PROXY_DATAPLANE_TOKEN) is empty (or only whitespace): give a non-empty token"
    )]
    EmptyToken,
    #[error(
        "refusing plaintext http:// to the control plane at {host} (not loopback): use an https:// --control-plane URL with --tls-ca (LLM_PROXY_DP_TLS_CA), or pass --allow-plaintext (LLM_PROXY_ALLOW_PLAINTEXT) if this network is private"
    )]
    PlaintextRefused { host: String },
    #[error("cannot connect to the control plane: {0}")]
    Connect(String),
    #[error("control plane refused the config stream: {code:?}: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("cannot read {flag} {path}: {source}")]
    TlsFile {
        flag: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--tls-cert and --tls-key must be given together")]
    TlsIdentity,
}

/// The PEM files of `--tls-ca`, `--tls-cert` and `--tls-key` (TLS to the control plane).
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// CA bundle that signed the control plane's certificate.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate and key, for a control plane that requires mTLS.
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl ClientTlsFiles {
    /// The client TLS config, or `None` when no file is given (plain or system-root TLS).
    pub async fn load(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, SyncError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        async fn read(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, SyncError> {
            tokio::fs::read(path)
                .await
                .map_err(|source| SyncError::TlsFile {
                    flag,
                    path: path.to_owned(),
                    source,
                })
        }
        if self.ca.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(None);
        }
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(read("--tls-ca", ca).await?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("--tls-cert", cert).await?,
                    read("--tls-key", key).await?,
                ));
            }
            (None, None) => {}
            _ => return Err(SyncError::TlsIdentity),
        }
        Ok(Some(config))
    }
}

impl From<tonic::Status> for SyncError {
    fn from(status: tonic::Status) -> Self {
        Self::Rpc {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// An error and its sources on one line (transport errors hide the cause in `source()`).
fn chain(err: &dyn std::error::Error) -> String {
    crate::upstream_http::error_chain(err)
}

impl SyncSettings {
    /// A plaintext connection without a token to `control_plane` (a control plane on this
    /// machine: `llmctl serve`, tests).
    pub fn plaintext(control_plane: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            control_plane: control_plane.into(),
            token: None,
            node_id: node_id.into(),
            build: env!("CARGO_PKG_VERSION").to_owned(),
            tls: None,
        }
    }

    /// The tonic endpoint for [`Self::control_plane`]; lets a binary fail fast on a bad URL or
    /// TLS setting before spawning the sync task.
    pub fn endpoint(&self) -> Result<Endpoint, SyncError> {
        let invalid = |reason: String| SyncError::InvalidUrl {
            url: self.control_plane.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(self.control_plane.clone())
            .map_err(|e| invalid(chain(&e)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| invalid(chain(&e)))?;
        }
        Ok(endpoint)
    }

    /// Checks the URL, the TLS setting and the token without connecting (a binary calls it to
    /// fail fast, before the sync task starts).
    pub fn check(&self) -> Result<(), SyncError> {
        self.endpoint()?;
        self.authorization()?;
        Ok(())
    }

    pub(crate) fn authorization(&self) -> Result<Option<MetadataValue<Ascii>>, SyncError> {
        let Some(token) = &self.token else {
            return Ok(None);
        };
        // Trimmed as the control plane trims the token it is configured with.
        let token = token.expose_secret().trim();
        if token.is_empty() {
            return Err(SyncError::EmptyToken);
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| SyncError::InvalidToken)?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

/// True for `localhost` and loopback addresses (127.0.0.0/8, ::1, and ::ffff:127.x.y.z); any
/// other name may resolve anywhere.
fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The host of a control-plane URL that would be reached without TLS on a non-loopback address,
/// `None` for `https://` or a loopback host (or a URL that does not parse, reported elsewhere).
/// Shared with `llmctl`, which applies the same rule to `--server`.
pub fn plaintext_remote_host(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    if parsed.scheme().eq_ignore_ascii_case("https") {
        return None;
    }
    let host = parsed.host()?;
    (!is_loopback_host(&host)).then(|| host.to_string())
}

/// Plaintext gRPC to the control plane carries the decrypted provider credentials and the token:
/// refused off loopback unless `allow_plaintext` says the network is private (DESIGN §19).
pub fn check_plaintext(control_plane: &str, allow_plaintext: bool) -> Result<(), SyncError> {
    match plaintext_remote_host(control_plane) {
        Some(host) if !allow_plaintext => Err(SyncError::PlaintextRefused { host }),
        _ => Ok(()),
    }
}

/// Full-jitter exponential backoff.
#[derive(Debug)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let window = BACKOFF_START
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_CAP);
        self.attempt = self.attempt.saturating_add(1);
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::random_range(0..=window_ms))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Starts the sync task. It runs until the returned handle is aborted (or the settings are
/// invalid: that is logged at error and the task ends; check [`SyncSettings::endpoint`] first).
#[allow(
    clippy::disallowed_methods,
    reason = "the handle goes to the caller, who aborts it to stop the task"
)]
pub fn spawn(settings: SyncSettings, handle: Arc<ConfigHandle>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(settings, handle))
}

/// The sync loop: subscribe, apply, reconnect with backoff; returns only when the settings are
/// invalid.
pub async fn run(settings: SyncSettings, handle: Arc<ConfigHandle>) {
    let (endpoint, auth) = match settings
        .endpoint()
        .and_then(|e| Ok((e, settings.authorization()?)))
    {
        Ok(v) => v,
        Err(err) => {
            tracing::error!(error = %err, "config sync cannot start");
            return;
        }
    };
    let mut backoff = Backoff { attempt: 0 };
    loop {
        let mut received = false;
        let result = session(&settings, &endpoint, auth.as_ref(), &handle, &mut received).await;
        handle.set_connected(false);
        if received {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match result {
            Ok(()) => tracing::warn!(
                control_plane = %settings.control_plane,
                retry_in_ms = delay.as_millis() as u64,
                "config stream ended; serving the last config until reconnected"
            ),
            Err(err) => tracing::warn!(
                control_plane = %settings.control_plane,
                error = %err,
                retry_in_ms = delay.as_millis() as u64,
                "config stream failed; serving the last config until reconnected"
            ),
        }
        tokio::time::sleep(delay).await;
    }
}

/// A `ReportStatus` still to send (retried on the next event if it fails).
struct Report {
    version: i64,
    error: String,
}

/// One connection: subscribe, apply snapshots until the stream ends. `received` is set once an
/// event arrived (the backoff restarts from the beginning after a working session).
async fn session(
    settings: &SyncSettings,
    endpoint: &Endpoint,
    auth: Option<&MetadataValue<Ascii>>,
    handle: &ConfigHandle,
    received: &mut bool,
) -> Result<(), SyncError> {
    let channel: Channel = endpoint
        .connect()
        .await
        .map_err(|e| SyncError::Connect(chain(&e)))?;
    let auth = auth.cloned();
    let mut client =
        ConfigServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            if let Some(value) = &auth {
                req.metadata_mut().insert("authorization", value.clone());
            }
            Ok(req)
        })
        .max_decoding_message_size(llm_proxy_catalog::MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(llm_proxy_catalog::MAX_GRPC_MESSAGE_BYTES);

    let held = handle.current();
    let (cluster_epoch, have_version) = held
        .as_ref()
        .map(|i| (i.cluster_epoch.clone(), i.version))
        .unwrap_or_default();
    drop(held);
    let mut stream = client
        .subscribe(SubscribeRequest {
            node_id: settings.node_id.clone(),
            build: settings.build.clone(),
            cluster_epoch,
            have_version,
            accepts_parts: true,
        })
        .await?
        .into_inner();
    handle.set_connected(true);
    tracing::info!(control_plane = %settings.control_plane, have_version, "config stream connected");

    // After a reconnect the control plane may not resend an unchanged snapshot: report what we
    // hold so its data-plane list is right either way.
    let mut pending = handle.version().map(|version| Report {
        version,
        error: String::new(),
    });
    // Dropped with the session: a stream that breaks mid-snapshot leaves the held config alone.
    let mut assembly: Option<Assembly> = None;
    while let Some(event) = stream.message().await? {
        *received = true;
        match event.event {
            Some(config_event::Event::Snapshot(part)) => {
                if let Some(report) = receive_part(handle, &mut assembly, part).await {
                    pending = Some(report);
                }
            }
            Some(config_event::Event::Heartbeat(hb)) => {
                handle.confirm();
                handle
                    .live_data_planes
                    .store(hb.live_data_planes, Ordering::Relaxed);
                tracing::debug!(
                    version = hb.version,
                    live_data_planes = hb.live_data_planes,
                    "config heartbeat"
                );
            }
            None => tracing::debug!("config event without payload ignored"),
        }
        if let Some(report) = pending.take() {
            let request = ReportStatusRequest {
                node_id: settings.node_id.clone(),
                applied_version: report.version,
                error: report.error.clone(),
            };
            match tokio::time::timeout(REPORT_TIMEOUT, client.report_status(request)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    tracing::warn!(code = ?status.code(), message = %status.message(), "ReportStatus failed; retrying on the next event");
                    pending = Some(report);
                }
                Err(_) => {
                    tracing::warn!("ReportStatus timed out; retrying on the next event");
                    pending = Some(report);
                }
            }
        }
    }
    Ok(())
}

/// A snapshot being received in parts (see `Snapshot.more` in `config.proto`).
enum Assembly {
    Building(Box<Building>),
    /// A snapshot refused before its last part: the rest of its parts are dropped.
    Refused {
        epoch: String,
        version: i64,
    },
}

struct Building {
    builder: IndexBuilder,
    /// The `part` expected next.
    next_part: u32,
    /// Encoded size of the parts so far.
    bytes: usize,
    /// Time spent indexing the parts so far (not waiting for them).
    build_time: Duration,
}

/// The status to report when a snapshot cannot be applied: the version still held.
fn refused(handle: &ConfigHandle, version: i64, error: &str) -> Report {
    let held_version = handle.version().unwrap_or(0);
    tracing::warn!(version, %error, held_version, "cannot apply config snapshot; keeping the previous config");
    Report {
        version: held_version,
        error: format!("cannot apply snapshot version {version}: {error}"),
    }
}

/// Which snapshot a part belongs to, and whether more parts follow.
struct PartOf {
    epoch: String,
    version: i64,
    more: bool,
}

impl PartOf {
    fn is(&self, (epoch, version): (&str, i64)) -> bool {
        self.epoch == epoch && self.version == version
    }
}

/// Refuses the snapshot `part` belongs to; its later parts, if any, will be dropped.
fn refuse_rest(
    handle: &ConfigHandle,
    assembly: &mut Option<Assembly>,
    part: PartOf,
    error: &str,
) -> Option<Report> {
    let report = refused(handle, part.version, error);
    if part.more {
        *assembly = Some(Assembly::Refused {
            epoch: part.epoch,
            version: part.version,
        });
    }
    Some(report)
}

/// Adds one part to the snapshot being assembled and applies the snapshot when it was the last.
/// Returns the status to report once the snapshot is complete (applied or refused).
async fn receive_part(
    handle: &ConfigHandle,
    assembly: &mut Option<Assembly>,
    part: Snapshot,
) -> Option<Report> {
    handle.confirm();
    let version = part.version;
    let more = part.more;
    let of = PartOf {
        epoch: part.cluster_epoch.clone(),
        version,
        more,
    };
    let mut current = match assembly.take() {
        Some(Assembly::Building(held)) if of.is(held.builder.identity()) => {
            if part.part != held.next_part {
                let error = format!(
                    "snapshot part {} arrived where part {} was expected",
                    part.part, held.next_part
                );
                return refuse_rest(handle, assembly, of, &error);
            }
            held
        }
        Some(Assembly::Refused { epoch, version: v }) if of.is((&epoch, v)) => {
            if more {
                *assembly = Some(Assembly::Refused { epoch, version: v });
            }
            return None;
        }
        abandoned => {
            if let Some(Assembly::Building(abandoned)) = abandoned {
                let (epoch, old) = abandoned.builder.identity();
                tracing::warn!(cluster_epoch = %epoch, version = old, "abandoning an incomplete snapshot: a part of another one arrived");
            }
            if part.part != 0 {
                let error = format!("snapshot part {} arrived without part 0", part.part);
                return refuse_rest(handle, assembly, of, &error);
            }
            match IndexBuilder::new(&part) {
                Ok(mut builder) => {
                    if let Some(held) = handle.current() {
                        builder.reserve_like(&held);
                    }
                    Box::new(Building {
                        builder,
                        next_part: 0,
                        bytes: 0,
                        build_time: Duration::ZERO,
                    })
                }
                Err(err) => return refuse_rest(handle, assembly, of, &err.to_string()),
            }
        }
    };
    current.next_part = current.next_part.saturating_add(1);
    current.bytes += part.encoded_len();
    let entries = part.connections.len()
        + part.models.len()
        + part.virtual_keys.len()
        + part.assignments.len();
    let started = Instant::now();
    let added = if entries > INLINE_BUILD_MAX_ENTRIES {
        let task = tokio::task::spawn_blocking(move || {
            let added = current.builder.add_part(part);
            (current, added)
        });
        match task.await {
            Ok((back, added)) => {
                current = back;
                added
            }
            Err(join) => {
                let error = format!("index build task failed: {join}");
                return refuse_rest(handle, assembly, of, &error);
            }
        }
    } else {
        current.builder.add_part(part)
    };
    current.build_time += started.elapsed();
    if let Err(err) = added {
        return refuse_rest(handle, assembly, of, &err.to_string());
    }
    if more {
        *assembly = Some(Assembly::Building(current));
        return None;
    }
    let Building {
        builder,
        next_part: _,
        bytes,
        mut build_time,
    } = *current;
    let started = Instant::now();
    let large = bytes > INLINE_FINISH_MAX_BYTES;
    let index = if large {
        match tokio::task::spawn_blocking(move || builder.finish()).await {
            Ok(index) => index,
            Err(join) => {
                let error = format!("index build task failed: {join}");
                return Some(refused(handle, version, &error));
            }
        }
    } else {
        builder.finish()
    };
    build_time += started.elapsed();
    Some(apply_index(handle, index, bytes, build_time, large))
}

/// Swaps a finished index in; returns the status to report.
fn apply_index(
    handle: &ConfigHandle,
    index: ConfigIndex,
    bytes: usize,
    build_time: Duration,
    large: bool,
) -> Report {
    let version = index.version;
    handle
        .snapshot_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    if let Some(held) = handle.current()
        && held.cluster_epoch == index.cluster_epoch
        && held.version > index.version
    {
        tracing::warn!(
            held = held.version,
            received = index.version,
            "control plane sent an older config version; applying it anyway"
        );
    }
    let counts = index.counts;
    let epoch = index.cluster_epoch.clone();
    let swap_started = Instant::now();
    let old = handle.apply_timed(index, build_time);
    let swap_time = swap_started.elapsed();
    handle
        .apply_seconds
        .observe((build_time + swap_time).as_secs_f64());
    // The previous index of a large config takes a while to free; do that off the async workers
    // (it may also be freed later by a request still holding it).
    if large {
        tokio::task::spawn_blocking(move || drop(old));
    } else {
        drop(old);
    }
    tracing::info!(
        version,
        cluster_epoch = %epoch,
        connections = counts.connections,
        models = counts.models,
        virtual_keys = counts.keys,
        assignments = counts.assignments,
        skipped = counts.skipped,
        bytes,
        build_ms = build_time.as_secs_f64() * 1000.0,
        swap_us = swap_time.as_micros() as u64,
        "config snapshot applied"
    );
    Report {
        version,
        error: String::new(),
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]
mod tests {
    use super::*;

    fn index(version: i64) -> ConfigIndex {
        ConfigIndex::build(Snapshot {
            cluster_epoch: "e".into(),
            version,
            live_data_planes: 4,
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn apply_and_wait_for_version() {
        let handle = ConfigHandle::new();
        assert!(handle.current().is_none());
        assert_eq!(handle.version(), None);
        let waiter = {
            let handle = handle.clone();
            tokio::spawn(async move { handle.wait_for_version(3).await })
        };
        handle.apply(index(2));
        assert_eq!(handle.current().unwrap().version, 2);
        handle.apply(index(3));
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(handle.live_data_planes(), 4);
        assert_eq!(handle.last_applied().unwrap().version, 3);
        // Already satisfied: resolves immediately.
        handle.wait_for_version(1).await;
    }

    /// Part `n` of snapshot `version`: one key `vk-{version}-{n}` with one assignment; the first
    /// part also carries the connection and the model.
    fn part(version: i64, n: usize, more: bool) -> Snapshot {
        use llm_proxy_proto::v1::{
            SnapshotAssignment, SnapshotConnection, SnapshotModel, SnapshotVirtualKey,
        };
        use sha2::Digest as _;
        let first = n == 0;
        Snapshot {
            cluster_epoch: "e".into(),
            version,
            connections: first
                .then(|| SnapshotConnection {
                    id: "conn".into(),
                    provider: "openai".into(),
                    endpoint: "https://api.openai.com".into(),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            models: first
                .then(|| SnapshotModel {
                    id: "model".into(),
                    connection_id: "conn".into(),
                    name: "gpt-4o".into(),
                    remote: "gpt-4o".into(),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            virtual_keys: vec![SnapshotVirtualKey {
                id: format!("vkey-{n}"),
                key_sha256: sha2::Sha256::digest(format!("vk-{version}-{n}")).to_vec(),
                enabled: true,
                ..Default::default()
            }],
            assignments: vec![SnapshotAssignment {
                id: format!("asg-{n}"),
                vkey_id: format!("vkey-{n}"),
                model_id: "model".into(),
                weight: 1,
                ..Default::default()
            }],
            live_data_planes: 1,
            more,
            part: u32::try_from(n).unwrap(),
        }
    }

    #[tokio::test]
    async fn a_snapshot_in_parts_applies_once_whole() {
        let handle = ConfigHandle::new();
        let mut assembly = None;
        assert!(
            receive_part(&handle, &mut assembly, part(1, 0, true))
                .await
                .is_none()
        );
        assert!(
            receive_part(&handle, &mut assembly, part(1, 1, true))
                .await
                .is_none()
        );
        assert!(handle.current().is_none(), "applied before the last part");
        let report = receive_part(&handle, &mut assembly, part(1, 2, false))
            .await
            .unwrap();
        assert_eq!((report.version, report.error.as_str()), (1, ""));
        let index = handle.current().unwrap();
        assert_eq!((index.version, index.key_count()), (1, 3));
        let key = index.authenticate("vk-1-2", 0).unwrap();
        assert!(
            key.pool("gpt-4o").is_some(),
            "the model of part 0 routes part 2's key"
        );

        // A newer snapshot replaces one still being assembled.
        assert!(
            receive_part(&handle, &mut assembly, part(2, 0, true))
                .await
                .is_none()
        );
        let report = receive_part(&handle, &mut assembly, part(3, 0, false))
            .await
            .unwrap();
        assert_eq!(report.version, 3);
        assert_eq!(handle.current().unwrap().key_count(), 1);

        // A snapshot whose parts stop coming (the stream broke) never replaces the held one.
        assert!(
            receive_part(&handle, &mut assembly, part(4, 0, true))
                .await
                .is_none()
        );
        drop(assembly);
        assert_eq!(handle.current().unwrap().version, 3);
    }

    #[tokio::test]
    async fn parts_out_of_order_refuse_their_snapshot() {
        let handle = ConfigHandle::new();
        handle.apply(index(5));
        let mut assembly = None;
        // A middle part without part 0: refused, and the rest of that snapshot is dropped.
        let report = receive_part(&handle, &mut assembly, part(6, 1, true))
            .await
            .unwrap();
        assert_eq!(report.version, 5);
        assert!(report.error.contains("without part 0"), "{}", report.error);
        assert!(
            receive_part(&handle, &mut assembly, part(6, 2, false))
                .await
                .is_none()
        );
        assert_eq!(handle.current().unwrap().version, 5);

        // A skipped part: refused, never applied with a hole.
        assert!(
            receive_part(&handle, &mut assembly, part(7, 0, true))
                .await
                .is_none()
        );
        let report = receive_part(&handle, &mut assembly, part(7, 2, true))
            .await
            .unwrap();
        assert!(
            report.error.contains("part 1 was expected"),
            "{}",
            report.error
        );
        assert!(
            receive_part(&handle, &mut assembly, part(7, 3, false))
                .await
                .is_none()
        );
        assert_eq!(handle.current().unwrap().version, 5);

        // The next snapshot is assembled normally.
        assert!(
            receive_part(&handle, &mut assembly, part(8, 0, true))
                .await
                .is_none()
        );
        let report = receive_part(&handle, &mut assembly, part(8, 1, false))
            .await
            .unwrap();
        assert_eq!((report.version, report.error.as_str()), (8, ""));
        assert_eq!(handle.current().unwrap().key_count(), 2);
    }

    #[tokio::test]
    async fn a_broken_first_part_is_reported_and_the_config_kept() {
        let handle = ConfigHandle::new();
        handle.apply(index(5));
        let mut assembly = None;
        let mut bad = part(6, 0, true);
        bad.cluster_epoch.clear();
        let report = receive_part(&handle, &mut assembly, bad).await.unwrap();
        assert_eq!(report.version, 5);
        assert!(
            report.error.contains("no cluster_epoch"),
            "{}",
            report.error
        );
        // Its later parts will be dropped, not taken for a new snapshot.
        assert!(matches!(assembly, Some(Assembly::Refused { .. })));
        assert_eq!(handle.current().unwrap().version, 5);
    }

    #[test]
    fn backoff_grows_with_full_jitter_and_caps() {
        let mut b = Backoff { attempt: 0 };
        for attempt in 0..40u32 {
            let window = BACKOFF_START
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_CAP);
            assert!(b.next_delay() <= window);
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_START);
    }

    #[test]
    fn settings_validate_url_and_token() {
        let mut s = SyncSettings {
            control_plane: "http://127.0.0.1:8131".into(),
            token: Some(SecretString::from("tok-123")),
            node_id: "dp".into(),
            build: "test".into(),
            tls: None,
        };
        assert!(s.endpoint().is_ok());
        let auth = s.authorization().unwrap().unwrap();
        assert!(auth.is_sensitive());
        assert_eq!(auth.to_str().unwrap(), "Bearer tok-123");
        s.token = Some(SecretString::from("bad\ntoken-secret"));
        let err = s.authorization().unwrap_err().to_string();
        assert!(!err.contains("token-secret"), "{err}");
        // Surrounding whitespace (a Secret file's newline) is trimmed, as the control plane does.
        s.token = Some(SecretString::from(" tok-123\n"));
        let auth = s.authorization().unwrap().unwrap();
        assert_eq!(auth.to_str().unwrap(), "Bearer tok-123");
        for blank in ["", " ", "\n", "\t \r\n"] {
            s.token = Some(SecretString::from(blank));
            assert!(matches!(s.check(), Err(SyncError::EmptyToken)), "{blank:?}");
        }
        let message = SyncError::EmptyToken.to_string();
        assert!(message.contains("--dataplane-token (LLM_PROXY_DATAPLANE_TOKEN)"));
        s.token = None;
        assert!(s.check().is_ok());
        s.control_plane = "not a url".into();
        assert!(matches!(s.endpoint(), Err(SyncError::InvalidUrl { .. })));
    }

    #[test]
    fn plaintext_is_refused_off_loopback_unless_allowed() {
        for loopback in [
            "http://127.0.0.1:8131",
            "http://127.8.9.10:8131",
            "http://localhost:8131",
            "http://LOCALHOST",
            "http://[::1]:8131",
            "http://[::ffff:127.0.0.1]:8131",
        ] {
            assert_eq!(plaintext_remote_host(loopback), None, "{loopback}");
            assert!(check_plaintext(loopback, false).is_ok());
        }
        for remote in [
            ("http://10.0.0.5:8131", "10.0.0.5"),
            ("http://control-plane:8131", "control-plane"),
            ("http://localhost.example.com:8131", "localhost.example.com"),
            ("http://0.0.0.0:8131", "0.0.0.0"),
            ("http://[2001:db8::1]:8131", "[2001:db8::1]"),
        ] {
            assert_eq!(
                plaintext_remote_host(remote.0).as_deref(),
                Some(remote.1),
                "{}",
                remote.0
            );
            let err = check_plaintext(remote.0, false).unwrap_err().to_string();
            assert!(
                err.contains(remote.1)
                    && err.contains("--allow-plaintext")
                    && err.contains("https://"),
                "{err}"
            );
            assert!(check_plaintext(remote.0, true).is_ok());
        }
        assert!(check_plaintext("https://control-plane:8131", false).is_ok());
        assert!(check_plaintext("HTTPS://10.0.0.5:8131", false).is_ok());
    }
}
