//! `/healthz`, `/readyz` and `/metrics` (DESIGN §3, §13), served the same way by the control
//! plane, the data plane and `llmctl serve`: each says what "ready" means and what its metrics
//! are, the router is shared.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;

/// The content type of the metrics exposition (OpenMetrics text).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a process reports on its health endpoints.
pub trait HealthSource: Send + Sync + 'static {
    /// `Ok(text)` when the process can serve; `Err(reason)` (answered 503) when it cannot.
    fn readiness(&self) -> impl Future<Output = Result<String, String>> + Send;
    /// The metrics exposition, ending with `# EOF`.
    fn metrics(&self) -> String;
}

/// `/healthz` (the process runs), `/readyz` and `/metrics` over `source`.
pub fn health_router<H: HealthSource>(source: Arc<H>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(source): State<Arc<H>>| async move {
                match source.readiness().await {
                    Ok(text) => (StatusCode::OK, text),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(source): State<Arc<H>>| async move {
                (
                    [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                    source.metrics(),
                )
            }),
        )
        .with_state(source)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt as _;

    struct Fake(AtomicBool);

    impl HealthSource for Fake {
        async fn readiness(&self) -> Result<String, String> {
            if self.0.load(Ordering::Relaxed) {
                Ok("ready".to_owned())
            } else {
                Err("no config snapshot applied yet".to_owned())
            }
        }

        fn metrics(&self) -> String {
            "# EOF\n".to_owned()
        }
    }

    async fn get(router: &Router, path: &str) -> (StatusCode, Option<String>, String) {
        let response = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn readiness_and_metrics_come_from_the_source() {
        let source = Arc::new(Fake(AtomicBool::new(false)));
        let router = health_router(source.clone());
        assert_eq!(get(&router, "/healthz").await.2, "ok");
        let (status, _, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "no config snapshot applied yet");
        source.0.store(true, Ordering::Relaxed);
        assert_eq!(
            get(&router, "/readyz").await,
            (
                StatusCode::OK,
                Some("text/plain; charset=utf-8".to_owned()),
                "ready".to_owned()
            )
        );
        let (status, content_type, body) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(METRICS_CONTENT_TYPE));
        assert_eq!(body, "# EOF\n");
    }
}
