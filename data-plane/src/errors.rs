//! OpenAI-shaped errors (`{"error":{"message","type","param","code"}}`), the only error bodies the
//! data plane sends (DESIGN §8).

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            headers: Vec::new(),
        }
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_headers(mut self, headers: Vec<(HeaderName, HeaderValue)>) -> Self {
        self.headers.extend(headers);
        self
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn missing_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing API key: send it as `Authorization: Bearer <key>`, `api-key` or `x-goog-api-key`",
        )
        .with_code("invalid_api_key")
    }

    pub fn invalid_key(reason: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            format!("incorrect API key provided: {reason}"),
        )
        .with_code("invalid_api_key")
    }

    pub fn model_not_found(alias: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{alias}` does not exist or you do not have access to it"),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    pub fn rate_limited(message: String, headers: Vec<(HeaderName, HeaderValue)>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "requests", message)
            .with_code("rate_limit_exceeded")
            .with_headers(headers)
    }

    /// A limit of `alias` reached: retry after `wait` (the soonest any target frees up).
    pub fn limit_reached(
        alias: &str,
        wait: std::time::Duration,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Self {
        Self::rate_limited(
            format!(
                "rate limit reached for `{alias}`; retry in {:.3}s",
                wait.as_secs_f64()
            ),
            headers,
        )
    }

    /// A budget refusal (DESIGN §18): 429 `insufficient_quota` / `budget_exceeded` (Anthropic
    /// clients see `rate_limit_error` from the status), with `x-should-retry: false` so that the
    /// OpenAI and Anthropic SDKs do not retry what only a new period or a raise can change; or 503
    /// when the budget cannot be checked.
    pub fn budget(refusal: crate::budget::BudgetRefusal) -> Self {
        match refusal {
            crate::budget::BudgetRefusal::Exceeded {
                limit_usd, period, ..
            } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                format!(
                    "budget exceeded: this key's budget of {limit_usd} USD per {period} is spent; it resets at the start of the next {period} (UTC) or when the budget is raised"
                ),
            )
            .with_code("budget_exceeded")
            .with_headers(vec![(
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            )]),
            crate::budget::BudgetRefusal::Unavailable(message) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .with_code("budget_unavailable")
            }
        }
    }

    /// The shared limiter is down and the fail mode is closed.
    pub fn limiter_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "rate limiting is unavailable (shared limiter down, fail mode closed); retry shortly",
        )
        .with_code("ratelimiter_unavailable")
    }

    pub fn no_config() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the gateway has not received its configuration from the control plane yet",
        )
        .with_code("no_config")
    }

    pub fn upstream_unreachable(provider: &str, detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("upstream {provider} unreachable: {detail}"),
        )
        .with_code("upstream_unreachable")
    }

    /// A prompt the provider's safety filter refused before generating anything (DESIGN §16).
    pub fn prompt_blocked(provider: &str, reason: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "the prompt was blocked by the {provider} provider's safety filter before generation (reason: {reason})"
            ),
        )
        .with_param("prompt")
        .with_code("content_filter")
    }

    /// An upstream answer the gateway cannot use or account for: not the provider's format, not
    /// JSON, larger than a limit, an index past `--max-upstream-index` (DESIGN §19).
    pub fn upstream_bad_answer(provider: &str, detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("upstream {provider} sent an invalid answer: {detail}"),
        )
        .with_code("upstream_invalid_response")
    }

    pub fn upstream_timeout(provider: &str, after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!(
                "upstream {provider} did not answer within {:.1}s",
                after.as_secs_f64()
            ),
        )
        .with_code("upstream_timeout")
    }

    /// Load shedding (DESIGN §19): past `--max-connections` or `--max-in-flight`.
    pub fn overloaded(what: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("the gateway is overloaded ({what}); retry shortly"),
        )
        .with_code("overloaded")
        .with_headers(vec![(
            http::header::RETRY_AFTER,
            HeaderValue::from_static("1"),
        )])
    }

    /// The client did not send its whole body within `--body-read-timeout-s`.
    pub fn body_timeout(after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {}s",
                after.as_secs()
            ),
        )
        .with_code("request_timeout")
    }

    /// A bug (a panic) while serving the request; the process serves on.
    pub fn internal(message: &str) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .with_code("internal_error")
    }

    /// The JSON body, also used as the final `data:` event of a failed stream.
    pub fn body_json(&self) -> String {
        let body = Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        };
        // Serialising plain strings cannot fail.
        serde_json::to_string(&body).unwrap_or_default()
    }
}

/// Anthropic's error body (`{"type":"error","error":{"type","message"}}`).
#[derive(Serialize)]
struct AnthropicBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicInner<'a>,
}

#[derive(Serialize)]
struct AnthropicInner<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

/// Anthropic's status for overload (its clients retry it).
pub const OVERLOADED: u16 = 529;

impl ApiError {
    /// The status on the Anthropic Messages route (DESIGN §17): the gateway's own load shedding
    /// and an upstream's overload (503) answer 529 there, which Anthropic clients retry.
    pub fn anthropic_status(&self) -> StatusCode {
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            StatusCode::from_u16(OVERLOADED).unwrap_or(self.status)
        } else {
            self.status
        }
    }

    /// Anthropic's error `type` for this error's status (DESIGN §17), so that the Anthropic SDKs
    /// raise the matching exception class.
    pub fn anthropic_type(&self) -> &'static str {
        match self.anthropic_status().as_u16() {
            400 | 405 | 408 | 411 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            504 => "timeout_error",
            OVERLOADED => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The error as Anthropic's JSON body, also the data of a failed stream's `event: error`.
    pub fn anthropic_body_json(&self) -> String {
        let body = AnthropicBody {
            kind: "error",
            error: AnthropicInner {
                kind: self.anthropic_type(),
                message: &self.message,
            },
        };
        // Serialising plain strings cannot fail.
        serde_json::to_string(&body).unwrap_or_default()
    }

    /// The error as an Anthropic Messages client expects it.
    pub fn into_anthropic_response(self) -> Response {
        let status = self.anthropic_status();
        let body = self.anthropic_body_json();
        (status, self.headers_map(), body).into_response()
    }

    fn headers_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        headers
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, self.headers_map(), self.body_json()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_four_openai_fields() {
        let err = ApiError::model_not_found("gpt-5");
        let value: serde_json::Value = serde_json::from_str(&err.body_json()).unwrap();
        assert_eq!(value["error"]["type"], "invalid_request_error");
        assert_eq!(value["error"]["param"], "model");
        assert_eq!(value["error"]["code"], "model_not_found");
        assert!(
            value["error"]["message"]
                .as_str()
                .unwrap()
                .contains("gpt-5")
        );
        let err = ApiError::invalid_request("bad");
        let value: serde_json::Value = serde_json::from_str(&err.body_json()).unwrap();
        assert!(value["error"]["param"].is_null() && value["error"]["code"].is_null());
    }
}
