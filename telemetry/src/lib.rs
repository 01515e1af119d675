//! Telemetry shared by the llm-proxy binaries (DESIGN §3, §13): logs on stderr filtered by
//! `RUST_LOG`, human-readable or JSON (`LLM_PROXY_LOG_FORMAT=json`), and OpenTelemetry trace export
//! over OTLP (`grpc` or `http/protobuf`) when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `..._TRACES_ENDPOINT`) is set.
//!
//! The two outputs are filtered separately: `RUST_LOG=warn` quiets the logs without turning off
//! the request spans sent to the collector.

mod health;
mod lines;

pub use health::{HealthSource, METRICS_CONTENT_TYPE, health_router};
pub use lines::{fatal, notice};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
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
        "unsupported OTLP protocol {value:?} in {var}: use grpc (the default) or http/protobuf"
    )]
    Protocol { var: &'static str, value: String },
    #[error("cannot start the OTLP export runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot set up OTLP trace export: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// The variable choosing the log format.
pub const LOG_FORMAT_VAR: &str = "LLM_PROXY_LOG_FORMAT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

impl LogFormat {
    /// `LLM_PROXY_LOG_FORMAT`: `json` (any case) for one JSON object per line, anything else
    /// human-readable.
    pub fn from_env() -> Self {
        Self::parse(std::env::var(LOG_FORMAT_VAR).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Self {
        match value {
            Some(v) if v.trim().eq_ignore_ascii_case("json") => Self::Json,
            _ => Self::Human,
        }
    }
}

/// The OTLP transport: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `grpc` (collectors listen on 4317). The default when neither variable is set: the
    /// OpenTelemetry spec's default is `http/protobuf`, but this gateway has always exported over
    /// gRPC, and deployments that set only an endpoint (`http://collector:4317`) rely on it.
    #[default]
    Grpc,
    /// `http/protobuf`: protobuf POSTed to `/v1/traces` (collectors listen on 4318).
    HttpProtobuf,
}

const TRACES_PROTOCOL_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const PROTOCOL_VAR: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";

impl OtlpProtocol {
    /// The signal's own variable wins over the general one (as in the OpenTelemetry spec); blank
    /// counts as unset. `http/json` is refused: the JSON encoding is not built in.
    fn from_lookup(lookup: &impl Fn(&str) -> Option<String>) -> Result<Self, TelemetryError> {
        for var in [TRACES_PROTOCOL_VAR, PROTOCOL_VAR] {
            let Some(value) = lookup(var) else { continue };
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            // Matched without case, as the exporter itself does.
            return match value.to_ascii_lowercase().as_str() {
                "grpc" => Ok(Self::Grpc),
                "http/protobuf" => Ok(Self::HttpProtobuf),
                _ => Err(TelemetryError::Protocol {
                    var,
                    value: value.to_owned(),
                }),
            };
        }
        Ok(Self::default())
    }
}

/// Where and how spans go over OTLP.
#[derive(Debug, Clone, Default)]
pub struct OtlpSettings {
    /// The collector's URL, used as is (for `http/protobuf` the whole URL, path included:
    /// `http://host:4318/v1/traces`). `None` lets the exporter read the standard variables:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is, else `OTEL_EXPORTER_OTLP_ENDPOINT`, to which
    /// `http/protobuf` appends `/v1/traces` (the spec's rule; gRPC takes it as is).
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
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
    /// From the environment: see [`TelemetrySettings::from_lookup`].
    pub fn from_env(
        service_name: &'static str,
        default_filter: &str,
    ) -> Result<Self, TelemetryError> {
        Self::from_lookup(service_name, default_filter, |name| {
            std::env::var(name).ok()
        })
    }

    /// From variables read through `lookup` (the environment in the binaries; a map in tests,
    /// since the environment is shared by every thread): `RUST_LOG` (else `default_filter`),
    /// `LLM_PROXY_LOG_FORMAT`, and the OpenTelemetry variables. Export is on when an OTLP endpoint
    /// is set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`; its protocol is
    /// `grpc` or `http/protobuf` (see [`OtlpProtocol`]), anything else is refused.
    pub fn from_lookup(
        service_name: &'static str,
        default_filter: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TelemetryError> {
        let set = |name: &str| lookup(name).is_some_and(|v| !v.trim().is_empty());
        let log_filter = lookup("RUST_LOG")
            .filter(|f| !f.trim().is_empty())
            .unwrap_or_else(|| default_filter.to_owned());
        let log_format = LogFormat::parse(lookup(LOG_FORMAT_VAR).as_deref());
        let disabled = lookup("OTEL_SDK_DISABLED").is_some_and(|v| v.trim() == "true")
            || lookup("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none");
        let wanted =
            set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let otlp = if wanted && !disabled {
            Some(OtlpSettings {
                endpoint: None,
                protocol: OtlpProtocol::from_lookup(&lookup)?,
            })
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

/// Installs the global subscriber writing logs to stderr; under JSON logs, panics are reported
/// as JSON lines too.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    // Colours only for a person at a terminal: escape codes are noise in files and collectors,
    // and cost the request span's fields a second formatting pass (~6,000 instructions per
    // request at the default level, measured with callgrind). NO_COLOR turns them off too.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let telemetry = install(settings, std::io::stderr, ansi)?;
    if settings.log_format == LogFormat::Json {
        lines::install_json_panic_hook();
    }
    Ok(telemetry)
}

/// Installs the global subscriber writing logs to `writer` (tests capture them), without colours.
pub fn init_with_writer<W>(
    settings: &TelemetrySettings,
    writer: W,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    install(settings, writer, false)
}

fn install<W>(
    settings: &TelemetrySettings,
    writer: W,
    ansi: bool,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log_filter)
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let logs = match settings.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
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

/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

fn tracer_provider(
    service_name: &'static str,
    otlp: &OtlpSettings,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    // The SDK's batch processor exports from its own thread, but both exporters (tonic, reqwest)
    // need a Tokio reactor; a small runtime of our own runs the exports, away from the request
    // workers.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(TelemetryError::Runtime)?;
    let exporter = {
        let _entered = runtime.enter();
        let built = match otlp.protocol {
            OtlpProtocol::Grpc => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_timeout(EXPORT_TIMEOUT);
                if let Some(endpoint) = &otlp.endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                builder.build()
            }
            OtlpProtocol::HttpProtobuf => {
                // reqwest's async client, not the blocking one: each export is a task on the
                // runtime above (see `OnRuntime`), and reqwest's blocking client panics when it
                // blocks inside an async runtime (it would also stall that runtime's one worker).
                // Built here, with the workspace's reqwest features: rustls, no native TLS.
                let client = reqwest::Client::builder()
                    .timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
                // The protocol is given, not read again from the environment by the exporter:
                // these settings decided it.
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client)
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_timeout(EXPORT_TIMEOUT);
                if let Some(endpoint) = &otlp.endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                builder.build()
            }
        };
        built.map_err(|e| TelemetryError::Exporter(e.to_string()))?
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

#[cfg(test)]
mod tests {
    use super::{LogFormat, OtlpProtocol, TelemetryError, TelemetrySettings};
    use std::collections::HashMap;

    /// Settings from exactly these variables (never the process's environment).
    fn settings(vars: &[(&str, &str)]) -> Result<TelemetrySettings, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        TelemetrySettings::from_lookup("svc", "info", move |name| vars.get(name).cloned())
    }

    fn protocol(vars: &[(&str, &str)]) -> OtlpProtocol {
        settings(vars)
            .unwrap()
            .otlp
            .expect("export should be on")
            .protocol
    }

    const ENDPOINT: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");

    #[test]
    fn grpc_is_accepted_and_the_default() {
        assert_eq!(protocol(&[ENDPOINT]), OtlpProtocol::Grpc);
        assert_eq!(
            protocol(&[ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", " ")]),
            OtlpProtocol::Grpc
        );
        assert_eq!(
            protocol(&[ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            OtlpProtocol::Grpc
        );
        assert_eq!(
            protocol(&[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://collector:4317"
                ),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "GRPC"),
            ]),
            OtlpProtocol::Grpc
        );
    }

    #[test]
    fn http_protobuf_is_accepted() {
        assert_eq!(
            protocol(&[ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
            OtlpProtocol::HttpProtobuf
        );
        assert_eq!(
            protocol(&[
                ENDPOINT,
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", " http/protobuf\n")
            ]),
            OtlpProtocol::HttpProtobuf
        );
    }

    #[test]
    fn the_traces_variable_wins_over_the_general_one() {
        assert_eq!(
            protocol(&[
                ENDPOINT,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ]),
            OtlpProtocol::HttpProtobuf
        );
        // Even over a value that would be refused on its own.
        assert_eq!(
            protocol(&[
                ENDPOINT,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ]),
            OtlpProtocol::Grpc
        );
    }

    #[test]
    fn http_json_is_refused_naming_the_value_and_the_accepted_ones() {
        for var in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ] {
            let err = settings(&[ENDPOINT, (var, "http/json")]).unwrap_err();
            assert!(
                matches!(&err, TelemetryError::Protocol { value, .. } if value == "http/json"),
                "{err:?}"
            );
            let message = err.to_string();
            assert_eq!(
                message,
                format!(
                    "unsupported OTLP protocol \"http/json\" in {var}: use grpc (the default) or http/protobuf"
                )
            );
        }
        let err = settings(&[ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")]).unwrap_err();
        assert!(err.to_string().contains("\"thrift\""), "{err}");
    }

    #[test]
    fn the_protocol_is_not_checked_while_export_is_off() {
        let refused = ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json");
        assert!(settings(&[refused]).unwrap().otlp.is_none());
        assert!(
            settings(&[ENDPOINT, refused, ("OTEL_SDK_DISABLED", "true")])
                .unwrap()
                .otlp
                .is_none()
        );
        assert!(
            settings(&[ENDPOINT, refused, ("OTEL_TRACES_EXPORTER", "none")])
                .unwrap()
                .otlp
                .is_none()
        );
        assert!(
            settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")])
                .unwrap()
                .otlp
                .is_none()
        );
    }

    #[test]
    fn logs_settings_come_from_the_lookup() {
        let plain = settings(&[]).unwrap();
        assert_eq!(plain.log_format, LogFormat::Human);
        assert_eq!(plain.log_filter, "info");
        let json = settings(&[("LLM_PROXY_LOG_FORMAT", "JSON"), ("RUST_LOG", "warn")]).unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
        assert_eq!(json.log_filter, "warn");
        assert_eq!(
            settings(&[("LLM_PROXY_LOG_FORMAT", "text")])
                .unwrap()
                .log_format,
            LogFormat::Human
        );
    }
}
