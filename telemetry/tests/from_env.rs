//! What `init_from_env` does with a real environment, as the binaries call it: OTLP over
//! `http/protobuf` to an in-test collector (endpoint rules included), and JSON on every stderr
//! line under `LLM_PROXY_LOG_FORMAT=json`.
//!
//! Each case runs in a child process: this test binary again, on the same test, with
//! `LLM_PROXY_TELEMETRY_TEST_CHILD` set. The environment is shared by every thread of a process
//! (and setting it is refused here), and the global subscriber can be installed once per process.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri, header};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CHILD_VAR: &str = "LLM_PROXY_TELEMETRY_TEST_CHILD";
const SERVICE: &str = "llm-proxy-telemetry-test";
const SPAN_NAME: &str = "telemetry.http_export_check";
const TARGET: &str = "llm_proxy_data_plane";

// ---------------------------------------------------------------------------------------------
// The child side

/// Runs the child's part when this process is a child; `false` in the test runner itself.
fn ran_as_child() -> bool {
    let Ok(role) = std::env::var(CHILD_VAR) else {
        return false;
    };
    match role.as_str() {
        "export" => export_one_span(),
        "lines" => write_every_kind_of_line(),
        other => panic!("unknown child role {other}"),
    }
    true
}

/// Telemetry as a binary installs it, one span in a target that is exported, then shutdown
/// (which sends what is buffered and waits for the collector's answer).
fn export_one_span() {
    let telemetry = llm_proxy_telemetry::init_from_env(SERVICE, "warn").unwrap();
    assert!(llm_proxy_telemetry::exporting());
    {
        let span = tracing::info_span!(target: TARGET, SPAN_NAME, check = "http/protobuf");
        let _entered = span.enter();
        tracing::info!(target: TARGET, "inside the span");
    }
    telemetry.shutdown();
}

/// A log line, a notice, a panic on another thread and the final error.
fn write_every_kind_of_line() {
    let _telemetry = llm_proxy_telemetry::init_from_env(SERVICE, "info").unwrap();
    tracing::warn!(target: TARGET, answer = 42, "a log line");
    // Level INFO, under RUST_LOG=warn: notices are not filtered.
    llm_proxy_telemetry::notice(
        TARGET,
        "llm-proxy data plane listening on 127.0.0.1:1 (metrics on 127.0.0.1:2)",
        &[("addr", "127.0.0.1:1"), ("metrics_addr", "127.0.0.1:2")],
    );
    let panicked = std::thread::Builder::new()
        .name("doomed".into())
        .spawn(|| panic!("on purpose"))
        .unwrap()
        .join();
    assert!(panicked.is_err());
    llm_proxy_telemetry::fatal(TARGET, "cannot go on: \"quoted\" text");
}

// ---------------------------------------------------------------------------------------------
// The test side

/// Reruns this binary on `test` as a child in role `role`, with none of the caller's OTLP or log
/// variables and `env` instead.
async fn run_child(test: &str, role: &str, env: &[(&str, String)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command.args([test, "--exact", "--nocapture", "--test-threads=1"]);
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("OTEL_")
            || text == "RUST_LOG"
            || text == "RUST_BACKTRACE"
            || text == "LLM_PROXY_LOG_FORMAT"
        {
            command.env_remove(&name);
        }
    }
    command
        .env(CHILD_VAR, role)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the child did not end")
        .unwrap();
    assert!(
        output.status.success(),
        "child {role} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// One POST as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    method: Method,
    path: String,
    content_type: String,
    body: Bytes,
}

/// An OTLP/HTTP collector on a local port that records every request and answers 200.
async fn start_collector() -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(Received {
                    method,
                    path: uri.path().to_owned(),
                    content_type: headers
                        .get(header::CONTENT_TYPE)
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default(),
                    body,
                });
                // An empty ExportTraceServiceResponse: full success.
                (
                    [(header::CONTENT_TYPE, "application/x-protobuf")],
                    Bytes::new(),
                )
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, received)
}

/// Asserts the one request a child's export made: a protobuf POST to `path` carrying the span.
fn assert_exported(received: &[Received], path: &str) {
    assert_eq!(received.len(), 1, "one export request: {received:?}");
    let request = &received[0];
    assert_eq!(request.method, Method::POST);
    assert_eq!(request.path, path);
    assert_eq!(request.content_type, "application/x-protobuf");
    let export = ExportTraceServiceRequest::decode(request.body.clone()).unwrap();
    let resource = &export.resource_spans[0];
    let service = resource
        .resource
        .as_ref()
        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.clone());
    assert_eq!(service, Some(AnyValue::StringValue(SERVICE.to_owned())));
    let names: Vec<&str> = export
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, [SPAN_NAME]);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn http_protobuf_posts_to_the_general_endpoint_plus_v1_traces() {
    if ran_as_child() {
        return;
    }
    runtime().block_on(async {
        // With and without a trailing slash: one `/` either way.
        for base in ["", "/"] {
            let (addr, received) = start_collector().await;
            run_child(
                "http_protobuf_posts_to_the_general_endpoint_plus_v1_traces",
                "export",
                &[
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
                    (
                        "OTEL_EXPORTER_OTLP_ENDPOINT",
                        format!("http://{addr}{base}"),
                    ),
                ],
            )
            .await;
            // The child waited for the answer before it ended.
            assert_exported(&received.lock().unwrap(), "/v1/traces");
        }
    });
}

#[test]
fn http_protobuf_takes_the_traces_endpoint_as_is() {
    if ran_as_child() {
        return;
    }
    runtime().block_on(async {
        let (addr, received) = start_collector().await;
        run_child(
            "http_protobuf_takes_the_traces_endpoint_as_is",
            "export",
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf".into()),
                // The general variables lose to the signal's own.
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}/base")),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    format!("http://{addr}/custom/traces"),
                ),
            ],
        )
        .await;
        assert_exported(&received.lock().unwrap(), "/custom/traces");
    });
}

#[test]
fn under_json_logs_every_stderr_line_is_json() {
    if ran_as_child() {
        return;
    }
    let output = runtime().block_on(run_child(
        "under_json_logs_every_stderr_line_is_json",
        "lines",
        &[
            ("LLM_PROXY_LOG_FORMAT", "json".into()),
            ("RUST_LOG", "warn".into()),
        ],
    ));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let [log, notice, panic, fatal] = lines.as_slice() else {
        panic!("four lines expected:\n{stderr}");
    };
    assert_eq!(log["level"], "WARN");
    assert_eq!(log["fields"]["message"], "a log line");
    assert_eq!(log["fields"]["answer"], 42);
    assert_eq!(log["target"], TARGET);

    assert_eq!(notice["level"], "INFO");
    assert_eq!(
        notice["fields"]["message"],
        "llm-proxy data plane listening on 127.0.0.1:1 (metrics on 127.0.0.1:2)"
    );
    assert_eq!(notice["fields"]["addr"], "127.0.0.1:1");
    assert_eq!(notice["fields"]["metrics_addr"], "127.0.0.1:2");
    assert_eq!(notice["target"], TARGET);

    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["fields"]["message"], "panicked: on purpose");
    assert_eq!(panic["fields"]["thread"], "doomed");
    assert!(
        panic["fields"]["location"]
            .as_str()
            .unwrap()
            .contains("from_env.rs:"),
        "{panic}"
    );

    assert_eq!(fatal["level"], "ERROR");
    assert_eq!(fatal["fields"]["message"], "cannot go on: \"quoted\" text");
    // Every line has the same keys as the log lines.
    for line in &lines {
        for key in ["timestamp", "level", "fields", "target"] {
            assert!(line.get(key).is_some(), "{key} missing: {line}");
        }
    }
}
