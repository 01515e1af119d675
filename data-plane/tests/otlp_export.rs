//! Trace export end to end: a request through the gateway with OTLP export pointed at an in-test
//! collector. The request's span arrives with its attributes, joined to the client's trace, and
//! the upstream saw that span as its parent. No secret appears in the exported spans, the logs
//! (JSON, at debug/trace level) or `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

mod common;

use common::PATIENCE;
use llm_proxy_control_plane::store::{NewAssignment, NewModel, NewVirtualKey};
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_telemetry::{LogFormat, OtlpProtocol, OtlpSettings, TelemetrySettings};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use std::io::Write;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

const CLIENT_KEY: &str = "vk-otlp-client-secret-5f1c9a";
const PROVIDER_KEY: &str = llm_proxy_mock_upstream::openai::OPENAI_KEY;
const CLIENT_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// Every export request the collector received.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    fn spans(&self) -> Vec<(String, Span)> {
        let received = self.received.lock().unwrap();
        let mut spans = Vec::new();
        for request in received.iter() {
            for resource in &request.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .and_then(|a| a.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(AnyValue::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }

    fn debug_text(&self) -> String {
        format!("{:?}", self.received.lock().unwrap())
    }

    /// Waits until a span satisfying `wanted` has arrived.
    async fn wait_for(&self, wanted: impl Fn(&Span) -> bool) -> (String, Span) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let arrived = self.arrived.notified();
            if let Some(found) = self.spans().into_iter().find(|(_, s)| wanted(s)) {
                return found;
            }
            tokio::time::timeout_at(deadline, arrived)
                .await
                .expect("the span never reached the collector");
        }
    }
}

/// Log lines, captured in memory.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.clone())
}

fn string_attribute(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(AnyValue::StringValue(s)) => s,
        other => panic!("attribute {key}: {other:?} in {span:?}"),
    }
}

fn int_attribute(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(AnyValue::IntValue(i)) => i,
        other => panic!("attribute {key}: {other:?} in {span:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn request_span_reaches_the_collector_with_its_attributes_and_no_secret() {
    // The collector.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });

    // Telemetry as the binaries install it, with the most talkative logs.
    let logs = CapturedLogs::default();
    let telemetry = llm_proxy_telemetry::init_with_writer(
        &TelemetrySettings {
            service_name: "llm-proxy-data-plane",
            log_filter: "debug,llm_proxy_data_plane=trace,llm_proxy_control_plane=trace".into(),
            log_format: LogFormat::Json,
            otlp: Some(OtlpSettings {
                endpoint: Some(format!("http://{collector_addr}")),
                protocol: OtlpProtocol::Grpc,
            }),
        },
        logs.clone(),
    )
    .unwrap();
    assert!(llm_proxy_telemetry::exporting());

    // A gateway with one OpenAI connection.
    let dir = tempfile::tempdir().unwrap();
    let (cp, master_key) = common::start_control_plane(dir.path()).await;
    let mock = MockUpstream::start().await.unwrap();
    common::add_connections(
        &cp.store,
        "openai",
        &mock.base,
        [("OpenAI", PROVIDER_KEY.to_owned(), common::options(&[]))],
    )
    .await;
    cp.store
        .create_model(NewModel {
            connection: "OpenAI".into(),
            name: "gpt-4o".into(),
            remote: "gpt-4o-2024-08-06".into(),
            deployment: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let vkey = cp
        .store
        .create_vkey(NewVirtualKey {
            name: "Tracing".into(),
            key: Some(SecretString::from(CLIENT_KEY)),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .value
        .0;
    cp.store
        .create_assignment(NewAssignment {
            vkey: "Tracing".into(),
            model: "gpt-4o".into(),
            alias: Some("gpt-4o".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let dp = common::start_data_plane(&cp, "dp-otlp", None).await;
    common::wait_applied(&cp, &dp).await;

    // A request inside the client's trace.
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", dp.addr))
        .bearer_auth(CLIENT_KEY)
        .header(
            "traceparent",
            format!("00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"),
        )
        .header("x-request-id", "client-req-42")
        // `usage-9-3`: the mock answers with 9 prompt and 3 completion tokens.
        .json(
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi usage-9-3"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "client-req-42");
    let _ = response.bytes().await.unwrap();

    // Flushing blocks until the collector answered.
    let flushed = tokio::task::spawn_blocking(move || {
        telemetry.flush();
        telemetry
    })
    .await
    .unwrap();

    let (service, span) = collector.wait_for(|s| s.name == "chat.completions").await;
    assert_eq!(service, "llm-proxy-data-plane");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(
        hex(&span.trace_id),
        CLIENT_TRACE_ID,
        "joined the client's trace"
    );
    assert_eq!(hex(&span.parent_span_id), CLIENT_SPAN_ID);
    assert_eq!(string_attribute(&span, "request_id"), "client-req-42");
    assert_eq!(string_attribute(&span, "vkey_id"), vkey.id);
    assert_eq!(string_attribute(&span, "alias"), "gpt-4o");
    assert_eq!(string_attribute(&span, "provider"), "openai");
    assert_eq!(string_attribute(&span, "model"), "gpt-4o-2024-08-06");
    assert_eq!(int_attribute(&span, "status"), 200);
    assert_eq!(int_attribute(&span, "prompt_tokens"), 9);
    assert_eq!(int_attribute(&span, "completion_tokens"), 3);
    // OpenTelemetry GenAI semantic conventions (DESIGN §18).
    assert_eq!(string_attribute(&span, "gen_ai.operation.name"), "chat");
    assert_eq!(string_attribute(&span, "gen_ai.system"), "openai");
    assert_eq!(
        string_attribute(&span, "gen_ai.request.model"),
        "gpt-4o-2024-08-06"
    );
    assert_eq!(int_attribute(&span, "gen_ai.usage.input_tokens"), 9);
    assert_eq!(int_attribute(&span, "gen_ai.usage.output_tokens"), 3);
    match attribute(&span, "upstream_ms") {
        Some(AnyValue::DoubleValue(ms)) => assert!(ms > 0.0, "upstream_ms {ms}"),
        other => panic!("upstream_ms: {other:?}"),
    }

    // The upstream's parent is the exported span.
    let sent = mock.last().unwrap();
    assert_eq!(
        sent.header("traceparent").unwrap(),
        format!("00-{CLIENT_TRACE_ID}-{}-01", hex(&span.span_id))
    );

    // The control plane traced the data plane's config subscription too.
    let (_, rpc) = collector
        .wait_for(|s| s.name == "llmproxy.v1.ConfigService/Subscribe")
        .await;
    assert_eq!(string_attribute(&rpc, "rpc.system"), "grpc");
    assert_eq!(string_attribute(&rpc, "rpc.method"), "Subscribe");

    // Logs carry the request id on the request's lines, and they are JSON.
    let log_text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(!log_text.is_empty());
    for line in log_text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(
        log_text
            .lines()
            .any(|l| l.contains("\"request_id\":\"client-req-42\"")),
        "no log line carries the request id"
    );

    // No secret anywhere.
    let metrics = dp.render_metrics() + &cp.render_metrics();
    let exported = collector.debug_text();
    for secret in [CLIENT_KEY, PROVIDER_KEY, master_key.expose_secret()] {
        assert!(!exported.contains(secret), "a secret in the exported spans");
        assert!(!log_text.contains(secret), "a secret in the logs");
        assert!(!metrics.contains(secret), "a secret in /metrics");
    }
    // The request's lines are there (the check above would pass on empty logs otherwise).
    assert!(log_text.contains("config snapshot applied"));
    drop(flushed);
}
