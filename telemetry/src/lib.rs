//! Telemetry shared by the llm-proxy binaries (DESIGN §3, §13): logs on stderr filtered by
//! `RUST_LOG`, human-readable or JSON (`LLM_PROXY_LOG_FORMAT=json`), and OpenTelemetry trace export
//! over OTLP/gRPC when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set.
//!
//! The two outputs are filtered separately: `RUST_LOG=warn` quiets the logs without turning off
//! the request spans sent to the collector.

mod health;

pub use health::{HealthSource, METRICS_CONTENT_TYPE, health_router};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Set once trace export is installed; the data plane then takes span ids from OpenTelemetry.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported over OTLP in this process.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(String),
    #[error(
        "OTEL_EXPORTER_OTLP_PROTOCOL={0} is not supported: this build exports OTLP over gRPC only (set it to grpc, or unset it)"
    )]
    Protocol(String),
    #[error("cannot start the OTLP export runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot set up OTLP trace export: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Where spans go over OTLP/gRPC.
#[derive(Debug, Clone, Default)]
pub struct OtlpSettings {
    /// `http://host:4317`; `None` lets the exporter read `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`.
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// `service.name` of exported spans unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: &'static str,
    /// Log filter (`RUST_LOG` syntax).
    pub log_filter: String,
    pub log_format: LogFormat,
    pub otlp: Option<OtlpSettings>,
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

impl TelemetrySettings {
    /// From the environment: `RUST_LOG` (else `default_filter`), `LLM_PROXY_LOG_FORMAT`, and the
    /// OpenTelemetry variables (`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn export
    /// off; only the `grpc` protocol is built in).
    pub fn from_env(
        service_name: &'static str,
        default_filter: &str,
    ) -> Result<Self, TelemetryError> {
        let log_filter = std::env::var("RUST_LOG")
            .ok()
            .filter(|f| !f.trim().is_empty())
            .unwrap_or_else(|| default_filter.to_owned());
        let log_format = match std::env::var("LLM_PROXY_LOG_FORMAT") {
            Ok(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Human,
        };
        let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true")
            || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
        let wanted =
            env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let otlp = if wanted && !disabled {
            for var in [
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ] {
                if let Ok(protocol) = std::env::var(var)
                    && protocol.trim() != "grpc"
                    && !protocol.trim().is_empty()
                {
                    return Err(TelemetryError::Protocol(protocol));
                }
            }
            Some(OtlpSettings::default())
        } else {
            None
        };
        Ok(Self {
            service_name,
            log_filter,
            log_format,
            otlp,
        })
    }
}

/// Keeps trace export alive; [`Telemetry::shutdown`] flushes the spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    export_runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Sends the spans still buffered (waits up to the exporter's timeout).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(err) = provider.force_flush()
        {
            tracing::warn!(error = %err, "cannot flush spans to the OTLP collector");
        }
    }

    /// Flushes and stops trace export.
    pub fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "cannot flush spans to the OTLP collector");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(runtime) = self.export_runtime.take() {
            // Dropping a runtime blocks, which is refused inside another runtime (tests).
            runtime.shutdown_background();
        }
    }
}

/// [`TelemetrySettings::from_env`], then [`init`]: what each binary does at start.
pub fn init_from_env(
    service_name: &'static str,
    default_filter: &str,
) -> Result<Telemetry, TelemetryError> {
    init(&TelemetrySettings::from_env(service_name, default_filter)?)
}

/// Installs the global subscriber writing logs to stderr.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    init_with_writer(settings, std::io::stderr)
}

/// Installs the global subscriber writing logs to `writer` (tests capture them).
pub fn init_with_writer<W>(
    settings: &TelemetrySettings,
    writer: W,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log_filter)
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let logs = match settings.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        // One object per line; the request span's fields (request id, key id, alias) ride along.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    let mut telemetry = Telemetry {
        provider: None,
        export_runtime: None,
    };
    let spans = match &settings.otlp {
        None => None,
        Some(otlp) => {
            let (provider, runtime) = tracer_provider(settings.service_name, otlp)?;
            let tracer = provider.tracer("llm-proxy");
            telemetry.provider = Some(provider);
            telemetry.export_runtime = Some(runtime);
            // The gateway's own spans and their events, whatever RUST_LOG says.
            let targets = Targets::new()
                .with_target("llm_proxy_data_plane", LevelFilter::INFO)
                .with_target("llm_proxy_control_plane", LevelFilter::INFO)
                .with_target("llmctl", LevelFilter::INFO);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(targets),
            )
        }
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if telemetry.provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(telemetry)
}

fn tracer_provider(
    service_name: &'static str,
    otlp: &OtlpSettings,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    // The SDK's batch processor exports from its own thread, but the tonic exporter needs a Tokio
    // reactor; a small runtime of our own runs the exports, away from the request workers.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(TelemetryError::Runtime)?;
    let exporter = {
        let _entered = runtime.enter();
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(Duration::from_secs(5));
        if let Some(endpoint) = &otlp.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        builder
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?
    };
    let exporter = OnRuntime {
        inner: Arc::new(exporter),
        runtime: runtime.handle().clone(),
    };
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service_name);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok((provider, runtime))
}

/// Runs each export on the export runtime (see [`tracer_provider`]).
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once while the provider is built, before any export holds a clone.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// A trace the client sent in its `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

/// The OpenTelemetry identity of a span: what goes into an upstream `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

/// While exporting: makes `span` a child of the client's trace (when it sent one) and returns the
/// ids of the exported span, so the upstream call joins the same trace under it. `None` when
/// export is off (the caller then makes its own ids).
pub fn link_span(span: &tracing::Span, client: Option<RemoteParent>) -> Option<SpanIds> {
    if !exporting() {
        return None;
    }
    if let Some(parent) = client {
        let context = SpanContext::new(
            TraceId::from_bytes(parent.trace_id.to_be_bytes()),
            SpanId::from_bytes(parent.span_id.to_be_bytes()),
            TraceFlags::new(parent.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(context));
    }
    let context = span.context();
    let span_ref = context.span();
    let ids = span_ref.span_context();
    ids.is_valid().then(|| SpanIds {
        trace_id: u128::from_be_bytes(ids.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(ids.span_id().to_bytes()),
        flags: ids.trace_flags().to_u8(),
    })
}
