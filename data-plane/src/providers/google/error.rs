//! Google error answers (`{"error":{"code","message","status","details"}}`, sometimes wrapped in a
//! one-element list) mapped to OpenAI-shaped errors (wire formats §3.6, §6.4).
//!
//! A refused credential (an invalid or blocked API key, an expired token, a service account
//! without permission) is the gateway's problem, not the caller's: it becomes a 502 that says so,
//! without the provider's message (which may quote the key).

use crate::errors::ApiError;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use serde_json::Value;

const PROVIDER: &str = llm_proxy_catalog::Provider::Google.as_str();

/// Reasons (`ErrorInfo.reason`) that mean the connection's credential was refused.
const CREDENTIAL_REASONS: &[&str] = &[
    "API_KEY_INVALID",
    "API_KEY_SERVICE_BLOCKED",
    "API_KEY_HTTP_REFERRER_BLOCKED",
    "API_KEY_IP_ADDRESS_BLOCKED",
    "ACCESS_TOKEN_EXPIRED",
    "ACCESS_TOKEN_TYPE_UNSUPPORTED",
    "CREDENTIALS_MISSING",
    "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
];

/// The error of a non-2xx answer.
pub fn upstream_error(status: StatusCode, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => google_error(Some(status), &value),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(500).collect();
            google_error(
                Some(status),
                &serde_json::json!({ "error": { "code": status.as_u16(), "message": text } }),
            )
        }
    }
}

/// The error object of an answer or of a stream event; `status` is the HTTP status when there
/// is one (mid-stream errors only have the body's `code`).
pub fn google_error(status: Option<StatusCode>, value: &Value) -> ApiError {
    // genai documents error bodies sent as a one-element list.
    let value = match value {
        Value::Array(items) if items.len() == 1 => &items[0],
        other => other,
    };
    let error = value.get("error").unwrap_or(&Value::Null);
    let code = error
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok());
    let status = status.or(code).unwrap_or(StatusCode::BAD_GATEWAY);
    let rpc_status = error.get("status").and_then(Value::as_str).unwrap_or("");
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map_or_else(
            || format!("upstream {PROVIDER} answered HTTP {}", status.as_u16()),
            str::to_owned,
        );
    let details: &[Value] = error
        .get("details")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let reason = details
        .iter()
        .find_map(|d| d.get("reason").and_then(Value::as_str))
        .unwrap_or("");
    // Other 403s (a model or region the account may not use, an API not enabled) stay 403:
    // the credential itself was accepted (DESIGN §16).
    let credential_refused =
        matches!(status.as_u16(), 401 | 407) || CREDENTIAL_REASONS.contains(&reason);
    if credential_refused {
        let what = [rpc_status, reason]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!(
                "the {PROVIDER} provider refused the gateway connection's credential (HTTP {}{}{}); your API key for this gateway was accepted",
                status.as_u16(),
                if what.is_empty() { "" } else { " " },
                what
            ),
        )
        .with_code("upstream_credential_refused");
    }
    match status.as_u16() {
        429 => {
            let mut err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                .with_code("rate_limit_exceeded");
            if let Some(delay) = details
                .iter()
                .find_map(|d| d.get("retryDelay").and_then(Value::as_str))
                .and_then(parse_duration_ms)
            {
                let seconds = delay.div_ceil(1000).max(1);
                for (name, value) in [("retry-after", seconds), ("retry-after-ms", delay)] {
                    if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
                        err.headers.push((HeaderName::from_static(name), value));
                    }
                }
            }
            err
        }
        404 => ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
            .with_code("model_not_found"),
        400 | 403 | 408 | 409 | 413 | 422 => {
            let kind = if status == StatusCode::FORBIDDEN {
                "permission_error"
            } else {
                "invalid_request_error"
            };
            let mut err = ApiError::new(status, kind, message);
            if !rpc_status.is_empty() {
                err.code = Some(rpc_status.to_ascii_lowercase());
            }
            err
        }
        500 | 502 | 503 | 504 => {
            let mut err = ApiError::new(status, "server_error", message);
            if !rpc_status.is_empty() {
                err.code = Some(rpc_status.to_ascii_lowercase());
            }
            err
        }
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message),
    }
}

/// A protobuf JSON duration (`"41s"`, `"0.5s"`) in milliseconds.
fn parse_duration_ms(text: &str) -> Option<u64> {
    let seconds: f64 = text.strip_suffix('s')?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| {
        // Bounded above by the check and by realistic retry delays; rounding up is the intent.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = (seconds * 1000.0).ceil() as u64;
        ms
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_api_key_is_the_gateways_problem_and_is_not_quoted() {
        let body = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;
        let err = upstream_error(StatusCode::BAD_REQUEST, body);
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        assert_eq!(err.code.as_deref(), Some("upstream_credential_refused"));
        assert!(err.message.contains("API_KEY_INVALID"), "{}", err.message);
        assert!(!err.message.contains("Please pass"), "{}", err.message);
    }

    #[test]
    fn quota_errors_become_429_with_the_retry_delay() {
        let body = br#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"41.2s"}]}}"#;
        let err = upstream_error(StatusCode::TOO_MANY_REQUESTS, body);
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.code.as_deref(), Some("rate_limit_exceeded"));
        let header = |name: &str| {
            err.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(header("retry-after").as_deref(), Some("42"));
        assert_eq!(header("retry-after-ms").as_deref(), Some("41200"));
    }

    #[test]
    fn listed_bodies_unknown_models_and_plain_text() {
        let body = br#"[{"error":{"code":404,"message":"models/gemini-9 is not found for API version v1beta","status":"NOT_FOUND"}}]"#;
        let err = upstream_error(StatusCode::NOT_FOUND, body);
        assert_eq!(err.status, StatusCode::NOT_FOUND);
        assert_eq!(err.code.as_deref(), Some("model_not_found"));
        assert!(err.message.contains("gemini-9"));
        let err = upstream_error(StatusCode::SERVICE_UNAVAILABLE, b"upstream connect error");
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(err.message.contains("upstream connect error"));
        let err = upstream_error(
            StatusCode::FORBIDDEN,
            br#"{"error":{"code":403,"message":"Permission 'aiplatform.endpoints.predict' denied on resource '//aiplatform.googleapis.com/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro'.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"IAM_PERMISSION_DENIED"}]}}"#,
        );
        assert_eq!(err.status, StatusCode::FORBIDDEN, "model access stays 403");
        assert!(err.message.contains("aiplatform.endpoints.predict"));
        let err = upstream_error(
            StatusCode::FORBIDDEN,
            br#"{"error":{"code":403,"message":"Requests to this API are blocked.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_SERVICE_BLOCKED"}]}}"#,
        );
        assert_eq!(
            err.status,
            StatusCode::BAD_GATEWAY,
            "a blocked key is the connection's"
        );
    }

    #[test]
    fn invalid_arguments_stay_400_with_the_message() {
        let body = br#"{"error":{"code":400,"message":"* GenerateContentRequest.contents: contents is not specified\n","status":"INVALID_ARGUMENT"}}"#;
        let err = upstream_error(StatusCode::BAD_REQUEST, body);
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.code.as_deref(), Some("invalid_argument"));
        assert!(err.message.contains("contents is not specified"));
    }
}
