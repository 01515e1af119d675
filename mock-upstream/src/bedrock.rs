//! AWS Bedrock Runtime (wire formats §5). Not yet moved here: the Bedrock mock still lives in
//! `data-plane/tests/bedrock_with_mock_upstreams.rs`.

use crate::{MockState, Recorded};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use std::sync::Arc;

/// The answer of Bedrock to `recorded`.
pub async fn answer(_mock: &Arc<MockState>, _recorded: Recorded) -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "mock: bedrock is not served yet",
    )
        .into_response()
}
