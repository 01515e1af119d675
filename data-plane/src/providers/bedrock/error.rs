//! Bedrock errors → OpenAI-shaped errors (wire formats §5.5, §6.4; DESIGN §16).
//!
//! The exception name comes from `x-amzn-ErrorType` (text before `:`), else the body's
//! `__type`/`code`/`Code` (text after `#`); the message from `message`/`Message`. Signature and
//! token errors mean the connection's own credential was refused: 502. `AccessDeniedException`
//! (no access to the model, or a key without Bedrock permissions) stays 403 with a message saying
//! that the connection's credential was refused for the call.

use crate::errors::ApiError;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::Value;

const PROVIDER: &str = llm_proxy_catalog::Provider::Bedrock.as_str();

/// Exceptions that mean the signature or token itself was refused.
const CREDENTIAL_EXCEPTIONS: &[&str] = &[
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignatureException",
    "SignatureDoesNotMatch",
    "ExpiredTokenException",
    "MissingAuthenticationTokenException",
    "InvalidClientTokenId",
];

/// Strips botocore-style decorations: `ThrottlingException:http://internal…`, `aws#Throttling`.
fn exception_name(raw: &str) -> &str {
    let raw = raw.split(':').next().unwrap_or(raw);
    raw.rsplit('#').next().unwrap_or(raw).trim()
}

fn field<'a>(body: &'a Value, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| body.get(*n).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
}

/// The error for a non-2xx Converse answer.
pub fn upstream_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ApiError {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let kind = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .or_else(|| field(&json, &["__type", "code", "Code"]))
        .map(exception_name)
        .unwrap_or_default()
        .to_owned();
    let message = field(&json, &["message", "Message"]).map_or_else(
        || {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(500).collect();
            if text.is_empty() {
                format!("upstream {PROVIDER} answered HTTP {}", status.as_u16())
            } else {
                text
            }
        },
        str::to_owned,
    );
    let mut err = mapped(status, &kind, message);
    if err.status == StatusCode::TOO_MANY_REQUESTS {
        retry_hints(&mut err, headers);
    }
    err
}

/// The error of an exception frame in a ConverseStream (`:exception-type` + `{"message"}`).
pub fn exception_error(exception_type: &str, payload: &[u8]) -> ApiError {
    let json: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let message = field(&json, &["message", "Message"])
        .unwrap_or("the model stream failed")
        .to_owned();
    // Stream exceptions are lowerCamelCase member names: `throttlingException`.
    let mut name = exception_type.to_owned();
    if let Some(first) = name.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    let status = match name.as_str() {
        "ThrottlingException" => StatusCode::TOO_MANY_REQUESTS,
        "ValidationException" => StatusCode::BAD_REQUEST,
        "ServiceUnavailableException" => StatusCode::SERVICE_UNAVAILABLE,
        "ModelStreamErrorException" => StatusCode::FAILED_DEPENDENCY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut err = mapped(status, &name, message);
    if err.status == StatusCode::TOO_MANY_REQUESTS {
        retry_hints(&mut err, &HeaderMap::new());
    }
    err
}

/// Bedrock sends no retry delay with throttling: pass one if present, else suggest a second so
/// that clients back off instead of retrying at once.
fn retry_hints(err: &mut ApiError, headers: &HeaderMap) {
    let seconds = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    // Saturating: the header is the upstream's number.
    let millis = seconds.saturating_mul(1000);
    for (name, value) in [("retry-after", seconds), ("retry-after-ms", millis)] {
        if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
            err.headers.push((HeaderName::from_static(name), value));
        }
    }
}

fn mapped(status: StatusCode, kind: &str, message: String) -> ApiError {
    let code = (!kind.is_empty()).then(|| kind.to_owned());
    let with_code = |err: ApiError| match &code {
        Some(code) => err.with_code(code.clone()),
        None => err,
    };
    if CREDENTIAL_EXCEPTIONS.contains(&kind) || matches!(status.as_u16(), 401 | 407) {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!(
                "the {PROVIDER} provider refused the gateway connection's credential ({}); your API key for this gateway was accepted",
                if kind.is_empty() { "HTTP 401" } else { kind }
            ),
        )
        .with_code("upstream_credential_refused");
    }
    match kind {
        // OpenAI's code, as for every provider's 429: clients match on it.
        "ThrottlingException" | "ModelNotReadyException" => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            message,
        )
        .with_code("rate_limit_exceeded"),
        "ServiceQuotaExceededException" => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            message,
        )
        .with_code("insufficient_quota"),
        "ValidationException" => with_code(ApiError::invalid_request(message)),
        "AccessDeniedException" => ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!(
                "the {PROVIDER} provider refused this call with the gateway connection's credential: {message}"
            ),
        )
        .with_code("AccessDeniedException"),
        "ResourceNotFoundException" => {
            ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                .with_code("model_not_found")
        }
        _ => {
            let kept = matches!(
                status.as_u16(),
                400 | 403 | 404 | 408 | 409 | 413 | 422 | 429 | 500 | 502 | 503 | 504
            );
            let status = if kept { status } else { StatusCode::BAD_GATEWAY };
            let kind_name = match status.as_u16() {
                429 => "rate_limit_error",
                403 => "permission_error",
                s if s >= 500 => "server_error",
                _ => "invalid_request_error",
            };
            with_code(ApiError::new(status, kind_name, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(error_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "x-amzn-errortype",
            HeaderValue::from_str(error_type).unwrap(),
        );
        h
    }

    #[test]
    fn a_huge_retry_after_saturates() {
        let mut h = headers("ThrottlingException");
        h.insert(
            "retry-after",
            HeaderValue::from_static("18446744073709551615"),
        );
        let err = upstream_error(StatusCode::TOO_MANY_REQUESTS, &h, b"{}");
        let header = |name: &str| {
            err.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            header("retry-after").as_deref(),
            Some("18446744073709551615")
        );
        assert_eq!(
            header("retry-after-ms").as_deref(),
            Some("18446744073709551615")
        );
    }

    #[test]
    fn throttling_is_429_with_retry_hints() {
        let err = upstream_error(
            StatusCode::TOO_MANY_REQUESTS,
            &headers("ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"),
            br#"{"message":"Too many requests, please wait before trying again."}"#,
        );
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.kind, "rate_limit_error");
        assert!(
            err.headers
                .iter()
                .any(|(n, v)| n == "retry-after" && v == "1")
        );
        assert!(err.message.contains("Too many requests"));
    }

    #[test]
    fn signature_errors_are_the_connections_and_model_access_stays_403() {
        let err = upstream_error(
            StatusCode::FORBIDDEN,
            &headers("InvalidSignatureException"),
            br#"{"message":"The request signature we calculated does not match the signature you provided."}"#,
        );
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        assert_eq!(err.code.as_deref(), Some("upstream_credential_refused"));
        let err = upstream_error(
            StatusCode::FORBIDDEN,
            &headers("AccessDeniedException"),
            br#"{"message":"You don't have access to the model with the specified model ID."}"#,
        );
        assert_eq!(err.status, StatusCode::FORBIDDEN);
        assert!(
            err.message.contains("connection's credential"),
            "{}",
            err.message
        );
        assert!(err.message.contains("don't have access"), "{}", err.message);
    }

    #[test]
    fn body_type_validation_not_found_and_424() {
        let err = upstream_error(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"__type":"com.amazon.bedrock#ValidationException","message":"A conversation must alternate between user and assistant roles."}"#,
        );
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.code.as_deref(), Some("ValidationException"));
        let err = upstream_error(
            StatusCode::NOT_FOUND,
            &headers("ResourceNotFoundException"),
            br#"{"message":"Model not found."}"#,
        );
        assert_eq!(err.code.as_deref(), Some("model_not_found"));
        let err = upstream_error(
            StatusCode::FAILED_DEPENDENCY,
            &headers("ModelErrorException"),
            br#"{"message":"The model returned an error."}"#,
        );
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn stream_exceptions() {
        let err = exception_error("throttlingException", br#"{"message":"slow down"}"#);
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        let err = exception_error(
            "modelStreamErrorException",
            br#"{"message":"boom","originalStatusCode":500}"#,
        );
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        assert_eq!(err.message, "boom");
    }
}
