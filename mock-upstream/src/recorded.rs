//! A request exactly as the mock received it.

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{HeaderMap, Method};
use base64::Engine as _;
use serde_json::{Value, json};

/// Largest request body the mock reads (the gateway's own cap is far below).
const MAX_REQUEST_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Raw, still percent-encoded.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request id the mock answers with, when the provider's module assigns one before
    /// answering (Bedrock's `x-amzn-RequestId`): what tests compare the gateway's ids with.
    pub request_id: Option<String>,
}

impl Recorded {
    /// Takes `request` apart, reading its whole body.
    pub async fn read(request: Request) -> Result<Self, String> {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, MAX_REQUEST_BYTES)
            .await
            .map_err(|e| format!("mock: cannot read the request body: {e}"))?;
        Ok(Self {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers,
            body,
            request_id: None,
        })
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// A header as text (`None` when absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The request as the control endpoint reports it: headers as a name → value object (the
    /// last value of a repeated header), the body as text (`body`, lossy when not UTF-8) and as
    /// base64 of the exact bytes (`body_base64`).
    pub fn to_json(&self) -> Value {
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    json!(String::from_utf8_lossy(value.as_bytes())),
                )
            })
            .collect();
        json!({
            "method": self.method.as_str(),
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body": String::from_utf8_lossy(&self.body),
            // The exact bytes, for bodies that are not UTF-8 and byte-for-byte comparisons.
            "body_base64": base64::engine::general_purpose::STANDARD.encode(&self.body),
            "request_id": self.request_id,
        })
    }
}
