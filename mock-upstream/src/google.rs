//! Google AI Studio (Gemini API) and Vertex AI (wire formats §3, §4). Not yet moved here: the
//! Google mock still lives in `data-plane/tests/google_with_mock_upstreams.rs`.

use crate::{MockState, Recorded};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use std::sync::Arc;

/// Whether `path` is a Google API path: a model method (`…/models/{model}:{method}`) or the
/// OAuth token endpoint.
pub fn is_google_path(path: &str) -> bool {
    path == "/token"
        || path
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'))
}

/// The answer of Google to `recorded`.
pub async fn answer(_mock: &Arc<MockState>, _recorded: Recorded) -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "mock: google is not served yet",
    )
        .into_response()
}
