//! One span and two metrics per gRPC call (`llm_proxy_cp_rpc_total{method,code}`,
//! `llm_proxy_cp_rpc_duration_seconds{method}`), as a tower layer around every service.
//!
//! The status is read from the response head: tonic sends errors as trailers-only responses, so
//! a unary call's code is exact. A server stream (`Subscribe`) is counted when it starts, with
//! the time to its head. Methods no service implements are labelled `unknown`, so a client cannot
//! grow the label set.

use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::Instrument as _;
use tracing::field::Empty;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

type DurationFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn rpc_buckets() -> Histogram {
    Histogram::new([
        0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

/// RPC counters and latencies; clones share the series.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    calls: Family<RpcLabels, Counter>,
    durations: DurationFamily,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            durations: Family::new_with_constructor(rpc_buckets),
        }
    }
}

impl RpcMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "llm_proxy_cp_rpc",
            "gRPC calls by method and status code (streams counted when they start)",
            self.calls.clone(),
        );
        registry.register(
            "llm_proxy_cp_rpc_duration_seconds",
            "gRPC call latency by method (streams: time to the response head)",
            self.durations.clone(),
        );
    }

    fn observe(&self, method: String, code: tonic::Code, started: Instant) {
        self.durations
            .get_or_create(&MethodLabels {
                method: method.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        self.calls
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `/llmproxy.v1.AdminService/CreateVirtualKey` → (`llmproxy.v1.AdminService`, `CreateVirtualKey`).
fn split_path(path: &str) -> (&str, &str) {
    let path = path.strip_prefix('/').unwrap_or(path);
    path.split_once('/').unwrap_or(("", path))
}

/// The tower layer for `tonic::transport::Server::layer`.
#[derive(Debug, Clone)]
pub struct RpcObserverLayer {
    pub metrics: RpcMetrics,
}

impl<S> tower::Layer<S> for RpcObserverLayer {
    type Service = RpcObserver<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcObserver {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcObserver<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for RpcObserver<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let (service, method) = split_path(&path);
        let span = tracing::info_span!(
            "rpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
        );
        let metrics = self.metrics.clone();
        let future = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from),
                Err(_) => tonic::Code::Internal,
            };
            span.record("rpc.grpc.status_code", code as i32);
            if !matches!(code, tonic::Code::Ok) {
                span.record("otel.status_code", "error");
            }
            let (_, method) = split_path(&path);
            let method = if code == tonic::Code::Unimplemented {
                "unknown".to_owned()
            } else {
                method.to_owned()
            };
            metrics.observe(method, code, started);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_grpc_paths() {
        assert_eq!(
            split_path("/llmproxy.v1.AdminService/ListConnections"),
            ("llmproxy.v1.AdminService", "ListConnections")
        );
        assert_eq!(split_path("/odd"), ("", "odd"));
    }
}
