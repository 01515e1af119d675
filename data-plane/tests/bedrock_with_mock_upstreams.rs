//! The data plane end to end against a mock AWS Bedrock Runtime that records exactly what it
//! receives (method, raw percent-encoded path, query, headers, body) and answers like Bedrock
//! (wire formats §5): Converse JSON with `x-amzn-RequestId`, ConverseStream as real binary
//! `application/vnd.amazon.eventstream` frames (both CRC32s, `:event-type` / `:content-type` /
//! `:message-type` headers, the random `"p"` padding field) sent in odd-sized pieces, exception
//! frames, and errors with `x-amzn-ErrorType`. The mock authenticates every call: Bedrock API keys
//! as `Authorization: Bearer`, and AWS Signature V4 which it verifies by recomputing the signature
//! here, independently of the `aws-sigv4` crate the gateway signs with (§5.6). Config comes from a
//! real control plane (SQLite) through the real config stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use common::{Recorded, options, sse_data};
use hmac::{Hmac, Mac};
use llm_proxy_control_plane::server::RunningControlPlane;
use llm_proxy_data_plane::gateway::RunningGateway;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const CLIENT_KEY: &str = "vk-bedrock-front-9012";
/// The access key pair of AWS's own Signature V4 test suite.
const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// The example IAM user key pair of the AWS documentation (a 20-character key id).
const IAM_ACCESS_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
const IAM_SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
/// Session tokens are base64 and contain `/`, `+` and `=`.
const SESSION_TOKEN: &str =
    "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJGMEQCIHNlc3Npb24rdG9rZW4vZXhhbXBsZQ==";
/// Long-term Bedrock API keys start with `ABSK`.
const API_KEY: &str =
    "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxlLWF0LTEyMzQ1Njc4OTAxMjpabTl2WW1GeVltRjZjWFY0";
const REVOKED_API_KEY: &str =
    "ABSKQmVkcm9ja0FQSUtleS1yZXZva2VkLWF0LTEyMzQ1Njc4OTAxMjpjbVYyYjJ0bFpHdGxlUT09";
const REGION: &str = "us-east-1";
/// An inference-profile id: geo prefix and a `:`.
const SONNET: &str = "us.anthropic.claude-3-5-sonnet-20241022-v2:0";
const SONNET_CONVERSE_PATH: &str = "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse";
const SONNET_STREAM_PATH: &str =
    "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse-stream";
/// A model the API key has no access to.
const OPUS: &str = "anthropic.claude-opus-4-20250514-v1:0";
const TOOL_USE_ID: &str = "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q";
const TOOL_USE_ID_2: &str = "tooluse_Xq3vN0pLSa2iB7dWm9eK1g";
const THROTTLED: &str = "Too many requests, please wait before trying again.";
const SIGNATURE_MISMATCH: &str = "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";
const NO_ACCESS: &str = "You don't have access to the model with the specified model ID.";
const START_WITH_USER: &str = "A conversation must start with a user message. Try again with a conversation that starts with a user message.";

// ---------------------------------------------------------------------------------------------
// Signature V4, recomputed here (wire formats §5.6)

type HmacSha256 = Hmac<Sha256>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        write!(out, "{b:02x}").unwrap();
        out
    })
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// botocore's `quote(path, safe='/~')`: the path as received (already percent-encoded) is
/// encoded again, so `%3A` becomes `%253A`.
fn canonical_uri(path: &str) -> String {
    let mut out = String::with_capacity(path.len() * 2);
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            write!(out, "%{b:02X}").unwrap();
        }
    }
    out
}

/// The canonical request for a call without a query string: `signed` are the lowercase header
/// names in the order the Authorization header lists them.
fn canonical_request(
    method: &str,
    path: &str,
    headers: &HeaderMap,
    signed: &[&str],
    body: &[u8],
) -> Result<String, String> {
    let mut canonical_headers = String::new();
    for name in signed {
        let values: Vec<String> = headers
            .get_all(*name)
            .iter()
            .map(|v| {
                let v = v
                    .to_str()
                    .map_err(|_| format!("header {name} is not text"))?;
                Ok(v.split_whitespace().collect::<Vec<_>>().join(" "))
            })
            .collect::<Result<_, String>>()?;
        if values.is_empty() {
            return Err(format!("the signed header {name} is not in the request"));
        }
        writeln!(canonical_headers, "{name}:{}", values.join(",")).unwrap();
    }
    Ok(format!(
        "{method}\n{}\n\n{canonical_headers}\n{}\n{}",
        canonical_uri(path),
        signed.join(";"),
        sha256_hex(body)
    ))
}

/// The hex signature of `canonical_request` (string to sign, then the derived signing key).
fn signature(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical_request: &str,
) -> String {
    let date = &amz_date[..8];
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/{service}/aws4_request\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let k_date = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()))
}

/// Why the mock refused a call: the exception name for `x-amzn-ErrorType` and its message.
#[derive(Debug)]
struct AuthFailure {
    kind: &'static str,
    message: String,
}

fn refused(kind: &'static str, message: impl Into<String>) -> AuthFailure {
    AuthFailure {
        kind,
        message: message.into(),
    }
}

/// A verified SigV4 Authorization header, taken apart.
#[derive(Debug)]
struct SigV4 {
    /// `AKID/date/region/service/aws4_request`.
    credential: String,
    signed_headers: Vec<String>,
    canonical_request: String,
}

fn is_amz_date(value: &str) -> bool {
    value.len() == 16
        && value.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
}

/// Verifies a SigV4-signed call the way AWS does, for the key pairs the mock knows (the session
/// token belongs to [`ACCESS_KEY_ID`]).
fn verify_sigv4(recorded: &Recorded) -> Result<SigV4, AuthFailure> {
    let incomplete = |what: &str| {
        refused(
            "IncompleteSignatureException",
            format!("Authorization header requires '{what}' parameter."),
        )
    };
    let authorization = recorded.header("authorization").unwrap_or_default();
    let rest = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| incomplete("Algorithm"))?;
    let mut parts = BTreeMap::new();
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=').ok_or_else(|| {
            refused(
                "IncompleteSignatureException",
                format!("Authorization header has a malformed part {part:?}"),
            )
        })?;
        parts.insert(name, value);
    }
    let credential = *parts
        .get("Credential")
        .ok_or_else(|| incomplete("Credential"))?;
    let signed = *parts
        .get("SignedHeaders")
        .ok_or_else(|| incomplete("SignedHeaders"))?;
    let given = *parts
        .get("Signature")
        .ok_or_else(|| incomplete("Signature"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = scope[..] else {
        return Err(incomplete("Credential"));
    };
    let secret = match access_key_id {
        ACCESS_KEY_ID => SECRET_ACCESS_KEY,
        IAM_ACCESS_KEY_ID => IAM_SECRET_ACCESS_KEY,
        _ => {
            return Err(refused(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ));
        }
    };
    if service != "bedrock" || terminator != "aws4_request" {
        return Err(refused(
            "InvalidSignatureException",
            "Credential should be scoped to correct service: 'bedrock'.",
        ));
    }
    if region != REGION {
        return Err(refused(
            "InvalidSignatureException",
            format!("Credential should be scoped to a valid region, not '{region}'."),
        ));
    }
    let amz_date = recorded
        .header("x-amz-date")
        .filter(|d| is_amz_date(d))
        .ok_or_else(|| incomplete("X-Amz-Date"))?;
    if amz_date[..8] != *date {
        return Err(refused(
            "InvalidSignatureException",
            format!(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{date}' != '{}'",
                &amz_date[..8]
            ),
        ));
    }
    let signed: Vec<&str> = signed.split(';').collect();
    if !signed.contains(&"host") || !signed.contains(&"x-amz-date") {
        return Err(refused(
            "InvalidSignatureException",
            "'Host' and 'X-Amz-Date' must be signed headers.",
        ));
    }
    if let Some(token) = recorded.header("x-amz-security-token")
        && (token != SESSION_TOKEN || access_key_id != ACCESS_KEY_ID)
    {
        return Err(refused(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ));
    }
    let canonical = canonical_request(
        recorded.method.as_str(),
        &recorded.path,
        &recorded.headers,
        &signed,
        &recorded.body,
    )
    .map_err(|e| refused("InvalidSignatureException", e))?;
    let expected = signature(secret, amz_date, region, service, &canonical);
    if recorded.query.is_some() || given != expected {
        return Err(refused("InvalidSignatureException", SIGNATURE_MISMATCH));
    }
    Ok(SigV4 {
        credential: credential.to_owned(),
        signed_headers: signed.into_iter().map(str::to_owned).collect(),
        canonical_request: canonical,
    })
}

/// Bedrock's authentication: an API key as a bearer token, or a SigV4 signature.
fn authenticate(recorded: &Recorded) -> Result<(), AuthFailure> {
    let Some(authorization) = recorded.header("authorization") else {
        return Err(refused(
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    if let Some(token) = authorization.strip_prefix("Bearer ") {
        // The real message does not quote the token; this one does, so that a gateway relaying
        // the provider's message would be caught leaking the connection's credential.
        return if token == API_KEY {
            Ok(())
        } else {
            Err(refused(
                "UnrecognizedClientException",
                format!("The security token included in the request is invalid. ({token})"),
            ))
        };
    }
    verify_sigv4(recorded).map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// The mock Bedrock Runtime

/// A call the mock received (its fields are reached through `Deref`), with the
/// `x-amzn-RequestId` the mock answered it with.
#[derive(Debug, Clone)]
struct Call {
    recorded: Recorded,
    request_id: String,
}

impl std::ops::Deref for Call {
    type Target = Recorded;

    fn deref(&self) -> &Recorded {
        &self.recorded
    }
}

#[derive(Clone)]
struct Mock {
    /// `http://127.0.0.1:<port>`.
    base: String,
    seen: Arc<Mutex<Vec<Call>>>,
    next_id: Arc<AtomicU64>,
    /// Bytes of the `HUGEFRAME` body handed to the connection so far.
    produced: Arc<AtomicUsize>,
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    common::json_response(status, "application/json", body)
}

/// A Bedrock error: `x-amzn-ErrorType` names the exception, the body carries the message.
fn aws_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let mut response = json_response(status, &json!({ "message": message }));
    response.headers_mut().insert(
        "x-amzn-errortype",
        format!("{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/")
            .parse()
            .unwrap(),
    );
    response
}

fn validation(message: &str) -> Response {
    aws_error(StatusCode::BAD_REQUEST, "ValidationException", message)
}

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(segment.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn mock_handler(State(mock): State<Mock>, request: Request) -> Response {
    let recorded = Recorded::read(request).await.unwrap();
    let n = mock.next_id.fetch_add(1, Ordering::SeqCst);
    let request_id = format!("6f2d1c1e-3b7a-4c2e-9d41-{n:012x}");
    mock.seen.lock().unwrap().push(Call {
        recorded: recorded.clone(),
        request_id: request_id.clone(),
    });
    let mut response = answer(&recorded, &mock.produced);
    response
        .headers_mut()
        .insert("x-amzn-requestid", request_id.parse().unwrap());
    response
}

fn answer(recorded: &Recorded, produced: &Arc<AtomicUsize>) -> Response {
    // Authentication comes first, as at AWS.
    if let Err(failure) = authenticate(recorded) {
        return aws_error(StatusCode::FORBIDDEN, failure.kind, &failure.message);
    }
    let route = recorded
        .path
        .strip_prefix("/model/")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(_, op)| matches!(*op, "converse" | "converse-stream"));
    let (Some((segment, op)), &Method::POST) = (route, &recorded.method) else {
        return aws_error(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "Unknown operation",
        );
    };
    let Some(model) = percent_decode(segment) else {
        return validation("The provided model identifier is invalid.");
    };
    if recorded.header("content-type") != Some("application/json") {
        return aws_error(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            "Expected application/json",
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(&recorded.body) else {
        return aws_error(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            "Malformed JSON",
        );
    };
    match model.as_str() {
        SONNET => {}
        OPUS => return aws_error(StatusCode::FORBIDDEN, "AccessDeniedException", NO_ACCESS),
        _ => return validation("The provided model identifier is invalid."),
    }
    if let Err(message) = check_converse_request(&request) {
        return validation(&message);
    }
    if request.to_string().contains("RATELIMITME") {
        return aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            THROTTLED,
        );
    }
    if op == "converse" {
        converse(&request)
    } else {
        converse_stream(&request, produced)
    }
}

/// What Converse itself refuses (wire formats §5.2 validation quirks).
fn check_converse_request(request: &Value) -> Result<(), String> {
    const FIELDS: &[&str] = &[
        "messages",
        "system",
        "inferenceConfig",
        "toolConfig",
        "guardrailConfig",
        "additionalModelRequestFields",
        "promptVariables",
        "additionalModelResponseFieldPaths",
        "requestMetadata",
        "performanceConfig",
        "serviceTier",
        "outputConfig",
    ];
    let object = request
        .as_object()
        .ok_or("Malformed input request, please reformat your input and try again.")?;
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "Malformed input request: extraneous key [{unknown}] is not permitted, please reformat your input and try again."
        ));
    }
    let messages = object
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or(START_WITH_USER)?;
    let text = request.to_string();
    if (text.contains("\"toolUse\"") || text.contains("\"toolResult\""))
        && !object.contains_key("toolConfig")
    {
        return Err(
            "The toolConfig field must be defined when using toolUse and toolResult content blocks."
                .to_owned(),
        );
    }
    let mut pending_tool_ids: Vec<String> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str().unwrap_or_default();
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if i == 0 && role != "user" {
            return Err(START_WITH_USER.to_owned());
        }
        if role != expected {
            return Err("A conversation must alternate between user and assistant roles. Make sure the conversation alternates between user and assistant roles and try again.".to_owned());
        }
        let content = message["content"]
            .as_array()
            .filter(|c| !c.is_empty())
            .ok_or(format!(
                "The content field in the Message object at messages.{i} is empty. Add a ContentBlock object to the content field and try again."
            ))?;
        let mut tool_ids = Vec::new();
        let mut result_ids = Vec::new();
        for (j, block) in content.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            let members = block.as_object().map_or(0, Map::len);
            if members != 1 {
                return Err(format!(
                    "The ContentBlock object at {at} must set exactly one member."
                ));
            }
            if let Some(text) = block.get("text") {
                if text.as_str().is_none_or(|t| t.trim().is_empty()) {
                    return Err(format!(
                        "The text field in the ContentBlock object at {at} is blank. Add text to the text field, and try again."
                    ));
                }
            } else if let Some(tool_use) = block.get("toolUse") {
                let id = tool_use["toolUseId"].as_str().unwrap_or_default();
                if role != "assistant"
                    || id.is_empty()
                    || tool_use["name"].as_str().is_none()
                    || !tool_use["input"].is_object()
                {
                    return Err(format!("The toolUse block at {at} is invalid."));
                }
                tool_ids.push(id.to_owned());
            } else if let Some(result) = block.get("toolResult") {
                let id = result["toolUseId"].as_str().unwrap_or_default();
                if role != "user" || !pending_tool_ids.iter().any(|p| p == id) {
                    return Err(format!(
                        "The toolResult block at {at} has a toolUseId that does not match any toolUse in the previous turn."
                    ));
                }
                if !result["content"].is_array()
                    || !matches!(result["status"].as_str(), None | Some("success" | "error"))
                {
                    return Err(format!("The toolResult block at {at} is invalid."));
                }
                result_ids.push(id.to_owned());
            }
        }
        if let Some(missing) = pending_tool_ids.iter().find(|p| !result_ids.contains(p)) {
            return Err(format!(
                "Expected toolResult blocks at messages.{i}.content for the following Ids: {missing}"
            ));
        }
        pending_tool_ids = tool_ids;
    }
    if let Some(max) = request.pointer("/inferenceConfig/maxTokens")
        && max.as_u64().is_none_or(|m| m < 1)
    {
        return Err("The maximum tokens you requested must be at least 1.".to_owned());
    }
    if let Some(config) = object.get("toolConfig") {
        let tools = config["tools"].as_array().filter(|t| !t.is_empty()).ok_or(
            "The toolConfig field must have at least one tool in its tools field.".to_owned(),
        )?;
        for tool in tools {
            let spec = &tool["toolSpec"];
            let name = spec["name"].as_str().unwrap_or_default();
            let name_ok = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
            if !name_ok || !spec["inputSchema"]["json"].is_object() {
                return Err(format!("The toolSpec {name:?} is invalid."));
            }
        }
    }
    Ok(())
}

fn last_message(request: &Value) -> &Value {
    request["messages"].as_array().unwrap().last().unwrap()
}

fn has_block(message: &Value, kind: &str) -> bool {
    message["content"]
        .as_array()
        .is_some_and(|c| c.iter().any(|b| b.get(kind).is_some()))
}

/// Whether the model "decides" to call get_weather: tools offered and the last turn asks about
/// the weather.
fn wants_tool_call(request: &Value) -> bool {
    let last = last_message(request);
    request.get("toolConfig").is_some()
        && !has_block(last, "toolResult")
        && last.to_string().contains("weather")
}

fn converse(request: &Value) -> Response {
    let last = last_message(request);
    let (content, stop_reason) = if has_block(last, "toolResult") {
        (
            json!([{"text": "It is 21°C and sunny in Paris."}]),
            "end_turn",
        )
    } else if wants_tool_call(request) {
        (
            json!([
                {"text": "Let me check."},
                {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "get_weather",
                             "input": {"city": "Paris", "unit": "celsius"}}}
            ]),
            "tool_use",
        )
    } else {
        (
            json!([
                {"reasoningContent": {"reasoningText": {"text": "A classic joke fits.",
                                                        "signature": "EqQBCkgIARABGAIiQL"}}},
                {"text": "Why did the chicken cross the road?"},
                {"text": " To get to the other side."}
            ]),
            "end_turn",
        )
    };
    json_response(
        StatusCode::OK,
        &json!({
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": stop_reason,
            "usage": {"inputTokens": 30, "outputTokens": 20, "totalTokens": 60,
                      "cacheReadInputTokens": 4, "cacheWriteInputTokens": 6},
            "metrics": {"latencyMs": 812}
        }),
    )
}

/// One event-stream message with string headers (wire formats §5.4).
fn frame(headers: &[(&'static str, &'static str)], payload: &[u8]) -> Vec<u8> {
    let mut message = Message::new(payload.to_vec());
    for (name, value) in headers {
        message = message.add_header(Header::new(*name, HeaderValue::String((*value).into())));
    }
    let mut out = Vec::new();
    write_message_to(&message, &mut out).unwrap();
    out
}

/// An event frame; its JSON payload gets Bedrock's random `"p"` padding field.
fn event(event_type: &'static str, mut payload: Value) -> Vec<u8> {
    const LETTERS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    payload["p"] = json!(&LETTERS[..rand::random_range(1..=LETTERS.len())]);
    frame(
        &[
            (":event-type", event_type),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

fn exception(exception_type: &'static str, message: &str) -> Vec<u8> {
    frame(
        &[
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        json!({ "message": message }).to_string().as_bytes(),
    )
}

fn text_delta(index: u32, text: &str) -> Vec<u8> {
    event(
        "contentBlockDelta",
        json!({"contentBlockIndex": index, "delta": {"text": text}}),
    )
}

fn tool_input_delta(index: u32, input: &str) -> Vec<u8> {
    event(
        "contentBlockDelta",
        json!({"contentBlockIndex": index, "delta": {"toolUse": {"input": input}}}),
    )
}

fn tool_start(index: u32, id: &str) -> Vec<u8> {
    event(
        "contentBlockStart",
        json!({"contentBlockIndex": index,
               "start": {"toolUse": {"toolUseId": id, "name": "get_weather"}}}),
    )
}

fn block_stop(index: u32) -> Vec<u8> {
    event("contentBlockStop", json!({"contentBlockIndex": index}))
}

fn message_start() -> Vec<u8> {
    event("messageStart", json!({"role": "assistant"}))
}

fn message_stop(reason: &str) -> Vec<u8> {
    event("messageStop", json!({"stopReason": reason}))
}

fn metadata(input: u64, output: u64, cache_read: u64) -> Vec<u8> {
    event(
        "metadata",
        json!({"usage": {"inputTokens": input, "outputTokens": output,
                         "cacheReadInputTokens": cache_read, "cacheWriteInputTokens": 0,
                         "totalTokens": input + output + cache_read},
               "metrics": {"latencyMs": 1450}}),
    )
}

/// The body in odd-sized pieces, so that frames (and their preludes) straddle chunk boundaries.
fn in_odd_pieces(bytes: &[u8]) -> Body {
    const SIZES: [usize; 7] = [1, 7, 3, 13, 5, 29, 2];
    let mut pieces: Vec<Result<Bytes, std::convert::Infallible>> = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = SIZES[i % SIZES.len()].min(rest.len());
        pieces.push(Ok(Bytes::copy_from_slice(&rest[..n])));
        rest = &rest[n..];
        i += 1;
    }
    Body::from_stream(futures_util::stream::iter(pieces))
}

/// A frame prelude declaring 4 GiB (total and header lengths, prelude CRC), to be followed by
/// 200 MB that the gateway must not buffer.
const HUGE_FRAME_PRELUDE: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0x40, 0, 0, 0, 0];

fn converse_stream(request: &Value, produced: &Arc<AtomicUsize>) -> Response {
    let text = request.to_string();
    if text.contains("HUGEFRAME") {
        return Response::builder()
            .header("content-type", "application/vnd.amazon.eventstream")
            .body(llm_proxy_mock_upstream::lazy_body(
                HUGE_FRAME_PRELUDE,
                0,
                200 * 1024 * 1024,
                produced.clone(),
            ))
            .unwrap();
    }
    let frames: Vec<Vec<u8>> = if text.contains("THROTTLEFIRST") {
        vec![exception(
            "throttlingException",
            "Too many tokens, please wait before trying again.",
        )]
    } else if wants_tool_call(request) {
        vec![
            message_start(),
            text_delta(0, "Checking."),
            block_stop(0),
            tool_start(1, TOOL_USE_ID),
            tool_input_delta(1, "{\"city\":"),
            tool_input_delta(1, " \"Paris\"}"),
            block_stop(1),
            tool_start(2, TOOL_USE_ID_2),
            tool_input_delta(2, "{\"city\": \"London\"}"),
            block_stop(2),
            message_stop("tool_use"),
            metadata(41, 36, 0),
        ]
    } else {
        let mut frames = vec![
            message_start(),
            text_delta(0, "It is"),
            text_delta(0, " 21°C."),
        ];
        let end = [block_stop(0), message_stop("end_turn"), metadata(9, 5, 3)];
        if text.contains("THROTTLEMIDSTREAM") {
            frames.push(exception(
                "throttlingException",
                "Too many tokens, please wait before trying again.",
            ));
        } else if text.contains("NOMETADATA") {
            // The upstream closes after messageStop, before the metadata with the usage.
            frames.extend([block_stop(0), message_stop("end_turn")]);
        } else if text.contains("CORRUPTME") {
            let mut corrupted = text_delta(0, " CORRUPTED");
            *corrupted.last_mut().unwrap() ^= 0x5a;
            frames.push(corrupted);
            // Valid frames follow: the gateway must not resynchronise and finish the answer.
            frames.extend(end);
        } else {
            frames.extend(end);
        }
        frames
    };
    Response::builder()
        .header("content-type", "application/vnd.amazon.eventstream")
        .body(in_odd_pieces(&frames.concat()))
        .unwrap()
}

async fn start_mock() -> Mock {
    common::start_mock(mock_handler, |base| Mock {
        base,
        seen: Arc::default(),
        next_id: Arc::default(),
        produced: Arc::default(),
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Control plane + data plane

struct Fixture {
    mock: Mock,
    cp: RunningControlPlane,
    dp: RunningGateway,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn wait_applied(&self) {
        common::wait_applied(&self.cp, &self.dp).await;
    }

    fn calls(&self) -> Vec<Call> {
        self.mock.seen.lock().unwrap().clone()
    }

    fn last(&self) -> Call {
        self.calls().pop().expect("the mock saw no request")
    }

    async fn post(&self, body: &str) -> reqwest::Response {
        let url = format!("{}/v1/chat/completions", self.base);
        common::post_json(&self.http, url, CLIENT_KEY, body).await
    }

    /// Sends `recorded` to the mock again, with its headers (reqwest sets the same host and
    /// the new body's content-length).
    async fn replay(&self, recorded: &Recorded) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{}", self.mock.base, recorded.path));
        for (name, value) in &recorded.headers {
            if name != "host" && name != "content-length" {
                request = request.header(name, value);
            }
        }
        request.body(recorded.body.clone()).send().await.unwrap()
    }
}

async fn fixture() -> Fixture {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    let store = &cp.store;
    let keys = format!("{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}");
    let session = format!("{keys}:{SESSION_TOKEN}");
    // The endpoint is the mock, so the region must come from the option.
    let connections = [
        ("Bedrock-Keys", keys, options(&[("region", REGION)])),
        ("Bedrock-Session", session, options(&[("region", REGION)])),
        (
            "Bedrock-IAM-User",
            format!("{IAM_ACCESS_KEY_ID}:{IAM_SECRET_ACCESS_KEY}"),
            options(&[("region", REGION)]),
        ),
        (
            "Bedrock-ApiKey",
            API_KEY.to_owned(),
            options(&[("region", REGION)]),
        ),
        (
            "Bedrock-Revoked",
            REVOKED_API_KEY.to_owned(),
            options(&[("region", REGION)]),
        ),
    ];
    common::add_connections(store, "bedrock", &mock.base, connections).await;
    // (connection, model name = alias, remote)
    let models = [
        ("Bedrock-Keys", "sonnet-sigv4", SONNET),
        ("Bedrock-Session", "sonnet-session", SONNET),
        ("Bedrock-IAM-User", "sonnet-iam", SONNET),
        ("Bedrock-ApiKey", "sonnet", SONNET),
        ("Bedrock-ApiKey", "opus", OPUS),
        ("Bedrock-Revoked", "sonnet-revoked", SONNET),
    ];
    common::add_models_for_key(store, "Bedrock-App", CLIENT_KEY, &models).await;
    let dp = common::start_data_plane(&cp, "dp-bedrock-test", None).await;
    let fixture = Fixture {
        mock,
        base: format!("http://{}", dp.addr),
        cp,
        dp,
        http: reqwest::Client::new(),
        _dir: dir,
    };
    fixture.wait_applied().await;
    fixture
}

// ---------------------------------------------------------------------------------------------
// Assertions

fn assert_no_client_key(recorded: &Recorded) {
    common::assert_key_not_forwarded(recorded, CLIENT_KEY);
}

/// Asserts a call signed with `access_key_id` (and the session token if `with_session_token`)
/// that the mock's verifier accepts, and returns its parts.
fn assert_sigv4(recorded: &Recorded, access_key_id: &str, with_session_token: bool) -> SigV4 {
    let authorization = recorded.header("authorization").expect("no authorization");
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential="),
        "not SigV4: {authorization}"
    );
    for (name, value) in &recorded.headers {
        let value = value.to_str().unwrap_or_default();
        assert!(
            !value.contains(SECRET_ACCESS_KEY) && !value.contains(IAM_SECRET_ACCESS_KEY),
            "the secret key itself was sent in {name}"
        );
    }
    let amz_date = recorded.header("x-amz-date").expect("no x-amz-date");
    assert!(is_amz_date(amz_date), "{amz_date}");
    let sig = verify_sigv4(recorded).unwrap_or_else(|f| panic!("signature refused: {f:?}"));
    assert_eq!(
        sig.credential,
        format!(
            "{access_key_id}/{}/us-east-1/bedrock/aws4_request",
            &amz_date[..8]
        )
    );
    for name in ["content-type", "host", "x-amz-date"] {
        assert!(
            sig.signed_headers.iter().any(|h| h == name),
            "{name} is not signed: {:?}",
            sig.signed_headers
        );
    }
    assert_eq!(recorded.header("content-type"), Some("application/json"));
    if with_session_token {
        assert_eq!(recorded.header("x-amz-security-token"), Some(SESSION_TOKEN));
        assert!(
            sig.signed_headers
                .iter()
                .any(|h| h == "x-amz-security-token"),
            "the session token is not signed: {:?}",
            sig.signed_headers
        );
    } else {
        assert_eq!(recorded.header("x-amz-security-token"), None);
    }
    assert_no_client_key(recorded);
    sig
}

fn assert_bearer(recorded: &Recorded, key: &str) {
    assert_eq!(
        recorded.header("authorization"),
        Some(format!("Bearer {key}").as_str())
    );
    assert_eq!(recorded.header("x-amz-date"), None);
    assert_eq!(recorded.header("x-amz-security-token"), None);
    assert_no_client_key(recorded);
}

fn assert_event_stream(response: &reqwest::Response) {
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{:?}",
        response.headers()
    );
}

/// The `error` object of an OpenAI-shaped error body, which has exactly OpenAI's four members.
fn openai_error(body: &Value) -> Map<String, Value> {
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("not an OpenAI error: {body}"))
        .clone();
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    error
}

async fn error_of(response: reqwest::Response) -> Map<String, Value> {
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    openai_error(&response.json().await.unwrap())
}

const WEATHER_TOOL: &str = r#"{"type":"function","function":{"name":"get_weather","description":"Current weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string","enum":["celsius","fahrenheit"]}},"required":["city"]}}}"#;

fn weather_tool_spec() -> Value {
    json!({"toolSpec": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "inputSchema": {"json": {"type": "object",
            "properties": {"city": {"type": "string"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}
    }})
}

fn chat(alias: &str, content: &str) -> String {
    json!({"model": alias, "messages": [{"role": "user", "content": content}]}).to_string()
}

fn stream_chat(alias: &str, content: &str) -> String {
    json!({"model": alias, "stream": true, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

/// The joke answer of the mock's Converse, as the client must see it.
fn assert_joke_answer(answer: &Value, recorded: &Call) {
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["id"], format!("chatcmpl-{}", recorded.request_id));
    assert_eq!(answer["model"], SONNET);
    assert_eq!(answer["choices"].as_array().unwrap().len(), 1);
    let choice = &answer["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        "Why did the chicken cross the road? To get to the other side.",
        "text blocks joined, reasoning dropped"
    );
    assert!(choice["message"].get("tool_calls").is_none());
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &answer["usage"];
    assert_eq!(
        usage["prompt_tokens"],
        30 + 4 + 6,
        "input + cache read + cache write"
    );
    assert_eq!(usage["completion_tokens"], 20);
    assert_eq!(usage["total_tokens"], 60);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 4);
}

// ---------------------------------------------------------------------------------------------
// The verifier itself

#[test]
fn the_sigv4_verifier_reproduces_the_aws_signature_v4_test_suite() {
    // `post-vanilla` of the AWS Signature V4 test suite.
    let mut headers = HeaderMap::new();
    headers.insert("host", "example.amazonaws.com".parse().unwrap());
    headers.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
    let canonical = canonical_request("POST", "/", &headers, &["host", "x-amz-date"], b"").unwrap();
    assert_eq!(
        canonical,
        "POST\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(canonical.as_bytes()),
        "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87"
    );
    assert_eq!(
        signature(
            SECRET_ACCESS_KEY,
            "20150830T123600Z",
            "us-east-1",
            "service",
            &canonical
        ),
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
    );
    // `double-encode-path`: the received path is encoded again.
    assert_eq!(
        canonical_uri("/test/@connections/JBDvjfGEIAMCERw%3D"),
        "/test/%40connections/JBDvjfGEIAMCERw%253D"
    );
    assert_eq!(
        canonical_uri(SONNET_CONVERSE_PATH),
        "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%253A0/converse"
    );
    // Header values are trimmed and inner runs of spaces collapsed.
    let mut headers = HeaderMap::new();
    headers.insert("my-header", "  a   b  c ".parse().unwrap());
    let canonical = canonical_request("GET", "/", &headers, &["my-header"], b"").unwrap();
    assert!(canonical.contains("\nmy-header:a b c\n"), "{canonical}");
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// Asserts that the call carries a SigV4 Authorization header (naming only the scheme used
/// otherwise: the header may hold the secret).
fn assert_signed(recorded: &Recorded) {
    let authorization = recorded.header("authorization").unwrap_or_default();
    let scheme = authorization.split(' ').next().unwrap_or_default();
    assert_eq!(
        scheme, "AWS4-HMAC-SHA256",
        "an ACCESS_KEY_ID:SECRET credential must be signed, not sent as {scheme:?}"
    );
}

/// Asserts a 200 and returns the JSON body (the body is shown when the status differs).
async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigv4_access_keys_sign_for_bedrock_in_the_region_option_and_the_mock_verifies_it() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet-sigv4", "Tell me a joke.")).await;
    let seen = f.last();
    assert_signed(&seen);
    let answer = ok_json(response).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_eq!(seen.query, None);
    let sig = assert_sigv4(&seen, ACCESS_KEY_ID, false);
    assert!(
        sig.canonical_request.starts_with(
            "POST\n/model/us.anthropic.claude-3-5-sonnet-20241022-v2%253A0/converse\n\n"
        ),
        "{}",
        sig.canonical_request
    );
    assert_joke_answer(&answer, &seen);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigv4_with_a_session_token_sends_and_signs_x_amz_security_token() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet-session", "Tell me a joke.")).await;
    let seen = f.last();
    assert_signed(&seen);
    let answer = ok_json(response).await;
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_sigv4(&seen, ACCESS_KEY_ID, true);
    assert_joke_answer(&answer, &seen);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigv4_signs_converse_and_converse_stream_and_the_mock_verifies_both() {
    let f = fixture().await;
    let answer = ok_json(f.post(&chat("sonnet-iam", "Tell me a joke.")).await).await;
    let seen = f.last();
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_sigv4(&seen, IAM_ACCESS_KEY_ID, false);
    assert_joke_answer(&answer, &seen);

    let response = f
        .post(&stream_chat("sonnet-iam", "What's it like in Paris?"))
        .await;
    assert_eq!(response.status(), 200, "the mock refused the call");
    assert_event_stream(&response);
    let text = response.text().await.unwrap();
    assert_eq!(sse_data(&text).last().unwrap(), "[DONE]", "{text}");
    let seen = f.last();
    assert_eq!(seen.path, SONNET_STREAM_PATH);
    let sig = assert_sigv4(&seen, IAM_ACCESS_KEY_ID, false);
    assert!(
        sig.canonical_request.starts_with(
            "POST\n/model/us.anthropic.claude-3-5-sonnet-20241022-v2%253A0/converse-stream\n\n"
        ),
        "{}",
        sig.canonical_request
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mock_refuses_a_signed_request_whose_body_or_signed_headers_were_altered() {
    let f = fixture().await;
    ok_json(f.post(&chat("sonnet-iam", "Tell me a joke.")).await).await;
    let original = f.last();
    assert_sigv4(&original, IAM_ACCESS_KEY_ID, false);

    // The very same request again is accepted: what follows fails because of the alteration.
    let replayed = f.replay(&original).await;
    assert_eq!(replayed.status(), 200);

    let mut body = original.body.to_vec();
    let at = body.windows(4).position(|w| w == b"joke").unwrap();
    body[at] = b'p';
    let tampered_body = Recorded {
        body: Bytes::from(body),
        ..original.recorded.clone()
    };
    let failure = verify_sigv4(&tampered_body).unwrap_err();
    assert_eq!(failure.kind, "InvalidSignatureException");
    assert_eq!(failure.message, SIGNATURE_MISMATCH);

    let mut tampered_date = original.recorded.clone();
    let date = original.header("x-amz-date").unwrap();
    let other_second = if date.ends_with("0Z") { "1Z" } else { "0Z" };
    tampered_date.headers.insert(
        "x-amz-date",
        format!("{}{other_second}", &date[..14]).parse().unwrap(),
    );
    assert_eq!(
        verify_sigv4(&tampered_date).unwrap_err().kind,
        "InvalidSignatureException"
    );

    for tampered in [&tampered_body, &tampered_date] {
        let response = f.replay(tampered).await;
        assert_eq!(response.status(), 403);
        assert!(
            response.headers()["x-amzn-errortype"]
                .to_str()
                .unwrap()
                .starts_with("InvalidSignatureException"),
            "{:?}",
            response.headers()
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["message"], SIGNATURE_MISMATCH);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bedrock_api_key_is_sent_as_authorization_bearer_without_signing() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet", "Tell me a joke.")).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let seen = f.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_bearer(&seen, API_KEY);
    assert_joke_answer(&answer, &seen);
}

// ---------------------------------------------------------------------------------------------
// Converse

#[tokio::test(flavor = "multi_thread")]
async fn chat_becomes_a_converse_request_and_the_answer_an_openai_chat_completion() {
    let f = fixture().await;
    let body = format!(
        r#"{{"model":"sonnet","messages":[
            {{"role":"system","content":"You are terse."}},
            {{"role":"developer","content":"Answer in English."}},
            {{"role":"user","content":"Hi"}},
            {{"role":"assistant","content":"Hello! How can I help?"}},
            {{"role":"user","content":"Tell me a joke."}},
            {{"role":"user","content":[{{"type":"text","text":"A short one."}}]}}],
            "temperature":0.5,"top_p":0.9,"max_tokens":256,"stop":["END","STOP"],
            "tools":[{WEATHER_TOOL}],"tool_choice":"auto","user":"u-1"}}"#
    );
    let response = f.post(&body).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let answer: Value = response.json().await.unwrap();
    let seen = f.last();
    assert_joke_answer(&answer, &seen);

    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_bearer(&seen, API_KEY);
    assert_eq!(
        seen.json(),
        json!({
            "messages": [
                {"role": "user", "content": [{"text": "Hi"}]},
                {"role": "assistant", "content": [{"text": "Hello! How can I help?"}]},
                {"role": "user", "content": [{"text": "Tell me a joke."}, {"text": "A short one."}]}
            ],
            "system": [{"text": "You are terse."}, {"text": "Answer in English."}],
            "inferenceConfig": {"maxTokens": 256, "temperature": 0.5, "topP": 0.9,
                                "stopSequences": ["END", "STOP"]},
            "toolConfig": {"tools": [weather_tool_spec()], "toolChoice": {"auto": {}}}
        }),
        "consecutive user messages merge into one turn; model, user and stream are not Converse fields"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_round_trip_through_tool_use_and_tool_result_blocks() {
    let f = fixture().await;
    let question = json!({"role": "user", "content": "What's the weather in Paris?"});
    let tool: Value = serde_json::from_str(WEATHER_TOOL).unwrap();
    let first =
        json!({"model": "sonnet", "messages": [question], "tools": [tool], "tool_choice": "auto"});
    let response = f.post(&first.to_string()).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let seen = f.last();
    assert_eq!(
        seen.json()["toolConfig"],
        json!({"tools": [weather_tool_spec()], "toolChoice": {"auto": {}}})
    );
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let message = &choice["message"];
    assert_eq!(message["content"], "Let me check.");
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{answer}");
    assert_eq!(calls[0]["id"], TOOL_USE_ID);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris", "unit": "celsius"}));

    // The client sends the assistant message back as it got it, with the tool's result; once
    // with the tools again, once without (the gateway then declares the tool itself).
    for with_tools in [true, false] {
        let tool_result =
            json!({"role": "tool", "tool_call_id": TOOL_USE_ID, "content": "21°C, sunny"});
        let mut second = json!({"model": "sonnet", "messages": [question, message, tool_result]});
        if with_tools {
            second["tools"] = json!([tool]);
        }
        let response = f.post(&second.to_string()).await;
        assert_eq!(response.status(), 200, "with_tools={with_tools}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            "It is 21°C and sunny in Paris."
        );
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");

        let seen = f.last().json();
        assert_eq!(
            seen["messages"],
            json!([
                {"role": "user", "content": [{"text": "What's the weather in Paris?"}]},
                {"role": "assistant", "content": [
                    {"text": "Let me check."},
                    {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "get_weather",
                                 "input": {"city": "Paris", "unit": "celsius"}}}]},
                {"role": "user", "content": [
                    {"toolResult": {"toolUseId": TOOL_USE_ID, "content": [{"text": "21°C, sunny"}],
                                    "status": "success"}}]}
            ])
        );
        let tools = seen["toolConfig"]["tools"].as_array().unwrap();
        if with_tools {
            assert_eq!(tools, &[weather_tool_spec()]);
        } else {
            assert_eq!(tools.len(), 1, "{seen}");
            assert_eq!(tools[0]["toolSpec"]["name"], "get_weather");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ConverseStream

#[tokio::test(flavor = "multi_thread")]
async fn converse_stream_frames_split_across_chunks_become_openai_chunks_with_usage_only_on_request()
 {
    let f = fixture().await;
    for include_usage in [false, true] {
        let body = json!({"model": "sonnet", "stream": true,
                          "stream_options": {"include_usage": include_usage},
                          "messages": [{"role": "user", "content": "What's it like in Paris?"}]});
        let response = f.post(&body.to_string()).await;
        assert_eq!(response.status(), 200);
        assert_event_stream(&response);
        let text = response.text().await.unwrap();

        let seen = f.last();
        assert_eq!(seen.path, SONNET_STREAM_PATH);
        assert_bearer(&seen, API_KEY);
        assert_eq!(
            seen.json(),
            json!({"messages": [{"role": "user", "content": [{"text": "What's it like in Paris?"}]}]}),
            "stream and stream_options are not Converse fields"
        );

        let events = sse_data(&text);
        assert_eq!(events.last().unwrap(), "[DONE]", "{text}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks.len(), if include_usage { 5 } else { 4 }, "{text}");
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], format!("chatcmpl-{}", seen.request_id));
            assert_eq!(chunk["created"], chunks[0]["created"]);
            assert_eq!(chunk["model"], SONNET);
            if !include_usage {
                assert!(
                    chunk.get("usage").is_none_or(Value::is_null),
                    "no usage without include_usage: {chunk}"
                );
            }
        }
        let delta = |i: usize| chunks[i]["choices"][0]["delta"].clone();
        let finish = |i: usize| chunks[i]["choices"][0]["finish_reason"].clone();
        assert_eq!(delta(0), json!({"role": "assistant", "content": ""}));
        assert_eq!(finish(0), Value::Null);
        assert_eq!(delta(1), json!({"content": "It is"}));
        assert_eq!(delta(2), json!({"content": " 21°C."}));
        assert_eq!(finish(2), Value::Null);
        assert_eq!(delta(3), json!({}));
        assert_eq!(finish(3), "stop");
        if include_usage {
            for chunk in &chunks[..4] {
                assert_eq!(chunk["usage"], Value::Null, "{chunk}");
            }
            assert_eq!(chunks[4]["choices"], json!([]));
            let usage = &chunks[4]["usage"];
            assert_eq!(usage["prompt_tokens"], 9 + 3, "input + cache read");
            assert_eq!(usage["completion_tokens"], 5);
            assert_eq!(usage["total_tokens"], 17);
            assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 3);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_tool_use_becomes_tool_call_deltas_with_id_and_name_first_and_finishes_with_tool_calls()
 {
    let f = fixture().await;
    let body = format!(
        r#"{{"model":"sonnet","stream":true,"tools":[{WEATHER_TOOL}],
            "messages":[{{"role":"user","content":"What's the weather in Paris and London?"}}]}}"#
    );
    let response = f.post(&body).await;
    assert_eq!(response.status(), 200);
    assert_event_stream(&response);
    let text = response.text().await.unwrap();
    let seen = f.last();
    assert_eq!(seen.path, SONNET_STREAM_PATH);
    assert_eq!(
        seen.json()["toolConfig"]["tools"],
        json!([weather_tool_spec()])
    );

    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]", "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let deltas: Vec<Value> = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"].clone())
        .collect();
    assert_eq!(
        deltas,
        [
            json!({"role": "assistant", "content": ""}),
            json!({"content": "Checking."}),
            json!({"tool_calls": [{"index": 0, "id": TOOL_USE_ID, "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": " \"Paris\"}"}}]}),
            json!({"tool_calls": [{"index": 1, "id": TOOL_USE_ID_2, "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]}),
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"city\": \"London\"}"}}]}),
            json!({}),
        ],
        "{text}"
    );
    let finishes: Vec<Value> = chunks
        .iter()
        .map(|c| c["choices"][0]["finish_reason"].clone())
        .collect();
    assert!(finishes[..finishes.len() - 1].iter().all(Value::is_null));
    assert_eq!(finishes.last().unwrap(), "tool_calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exception_frame_after_text_ends_the_client_stream_with_an_error_event_and_no_done() {
    let f = fixture().await;
    let response = f.post(&stream_chat("sonnet", "THROTTLEMIDSTREAM")).await;
    assert_eq!(response.status(), 200, "the stream had started");
    assert_event_stream(&response);
    let text = response.text().await.unwrap();
    assert_eq!(f.last().path, SONNET_STREAM_PATH);
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(
        events
            .iter()
            .any(|e| e.contains(r#""delta":{"content":"It is"}"#)),
        "content before the error is delivered: {text}"
    );
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = openai_error(&last);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Too many tokens"),
        "{last}"
    );
    assert_eq!(error["type"], "rate_limit_error");
    assert!(last.get("choices").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exception_frame_before_any_output_becomes_an_http_429_with_an_openai_error() {
    let f = fixture().await;
    let response = f.post(&stream_chat("sonnet", "THROTTLEFIRST")).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let error = error_of(response).await;
    assert_eq!(error["type"], "rate_limit_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Too many tokens"),
        "{error:?}"
    );
    assert_eq!(f.last().path, SONNET_STREAM_PATH);
    assert_eq!(f.calls().len(), 1, "a 429 is not retried by the gateway");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_with_a_corrupted_crc_ends_the_client_stream_with_an_error_event_and_no_done() {
    let f = fixture().await;
    let response = f.post(&stream_chat("sonnet", "CORRUPTME")).await;
    assert_eq!(response.status(), 200, "the stream had started");
    let text = response.text().await.unwrap();
    assert_eq!(f.last().path, SONNET_STREAM_PATH);
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    assert!(
        events
            .iter()
            .any(|e| e.contains(r#""delta":{"content":" 21°C."}"#)),
        "content before the bad frame is delivered: {text}"
    );
    assert!(!text.contains("CORRUPTED"), "{text}");
    assert!(
        !text.contains(r#""finish_reason":"stop""#),
        "nothing after the bad frame: {text}"
    );
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = openai_error(&last);
    assert_eq!(error["type"], "server_error", "{last}");
    assert_eq!(error["code"], "upstream_invalid_response", "{last}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("checksum"),
        "the bad CRC is what failed: {last}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test(flavor = "multi_thread")]
async fn throttling_becomes_429_with_retry_after_and_an_openai_error() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet", "RATELIMITME")).await;
    assert_eq!(response.status(), 429);
    let retry_after = response.headers()["retry-after"].to_str().unwrap();
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
        "{retry_after}"
    );
    let error = error_of(response).await;
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["message"], THROTTLED);
    assert_eq!(f.calls().len(), 1, "a 429 is not retried by the gateway");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_validation_exception_becomes_400_with_the_bedrock_message() {
    let f = fixture().await;
    let body = r#"{"model":"sonnet","messages":[
        {"role":"assistant","content":"Hello!"},{"role":"user","content":"Hi"}]}"#;
    let response = f.post(body).await;
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["message"], START_WITH_USER);
    let seen = f.last();
    assert_eq!(seen.path, SONNET_CONVERSE_PATH);
    assert_eq!(seen.json()["messages"][0]["role"], "assistant");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unrecognized_client_becomes_502_without_quoting_the_credential() {
    let f = fixture().await;
    let response = f.post(&chat("sonnet-revoked", "Tell me a joke.")).await;
    assert_eq!(response.status(), 502);
    let text = response.text().await.unwrap();
    assert!(!text.contains(REVOKED_API_KEY), "credential leaked: {text}");
    let error = openai_error(&serde_json::from_str(&text).unwrap());
    assert_eq!(error["code"], "upstream_credential_refused");
    assert_eq!(error["type"], "server_error");
    assert_bearer(&f.last(), REVOKED_API_KEY);
    assert_eq!(f.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn access_denied_stays_403_and_says_the_connections_credential_was_refused() {
    let f = fixture().await;
    let response = f.post(&chat("opus", "Tell me a joke.")).await;
    assert_eq!(response.status(), 403);
    let error = error_of(response).await;
    assert_eq!(error["type"], "permission_error");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("connection's credential"), "{message}");
    assert!(message.contains(NO_ACCESS), "{message}");
    assert!(!message.contains(API_KEY));
    let seen = f.last();
    assert_eq!(
        seen.path,
        "/model/anthropic.claude-opus-4-20250514-v1%3A0/converse"
    );
    assert_bearer(&seen, API_KEY);
}

// ---------------------------------------------------------------------------------------------
// Upstream garbage (DESIGN §19)

/// Bound on each garbage answer: they take milliseconds; seconds would mean a stall.
const WITHIN_SECONDS: std::time::Duration = std::time::Duration::from_secs(10);

impl Fixture {
    async fn answer_within_seconds(&self, body: &str) -> (StatusCode, String) {
        tokio::time::timeout(WITHIN_SECONDS, async {
            let response = self.post(body).await;
            let status = response.status();
            (status, response.text().await.unwrap())
        })
        .await
        .expect("no whole answer within seconds")
    }

    async fn assert_next_stream_served(&self) {
        let (status, text) = self
            .answer_within_seconds(&stream_chat("sonnet", "hi"))
            .await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(sse_data(&text).last().unwrap(), "[DONE]", "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_declaring_4_gib_is_refused_from_its_prelude() {
    let f = fixture().await;
    let (status, body) = f
        .answer_within_seconds(&stream_chat("sonnet", "HUGEFRAME"))
        .await;
    // The first frame fails before the stream's head: a 502.
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "upstream_invalid_response", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&format!(
            "frame of 4294967295 bytes exceeds the limit of {} bytes (--max-stream-event-bytes)",
            common::TEST_MAX_STREAM_EVENT_BYTES
        )),
        "{body}"
    );
    let produced = f.mock.produced.load(Ordering::Relaxed);
    assert!(
        produced < 32 * 1024 * 1024,
        "the mock sent {produced} of its 200 MB"
    );
    f.assert_next_stream_served().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_without_its_metadata_gets_a_final_error_event() {
    let f = fixture().await;
    let (status, text) = f
        .answer_within_seconds(&stream_chat("sonnet", "NOMETADATA"))
        .await;
    assert_eq!(status, 200, "the stream had started");
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = openai_error(&last);
    assert_eq!(error["code"], "upstream_invalid_response", "{last}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("terminal event (messageStop and metadata)"),
        "{last}"
    );
    f.assert_next_stream_served().await;
}
