//! AWS Bedrock Runtime: Converse and ConverseStream (DESIGN §10, wire formats §5, §6.2, §6.3);
//! Claude models also through InvokeModel or Bedrock's Messages endpoint ([`claude`], DESIGN §17).
//!
//! - URL: `{endpoint}/model/{model id, percent-encoded}/converse` (or `/converse-stream`), so that
//!   ids with `:` and inference-profile ids (`us.…`, `global.…`) and ARNs work.
//! - Auth (DESIGN §16): `--set auth=bearer|sigv4`, else SigV4 when the credential has the form
//!   `ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`, a Bedrock API key as `Authorization:
//!   Bearer` otherwise. SigV4 signs for service `bedrock` in the region of `--set region=`, else the
//!   one in the `bedrock-runtime.{region}.amazonaws.com` host.

pub mod claude;
pub mod converse;
pub mod error;
pub mod frames;
pub mod stream;

use super::{CallContext, Operation, Outbound, WireFormat};
use crate::errors::ApiError;
use crate::index::ConnectionEntry;
use crate::usage::Usage;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use llm_proxy_catalog::{BedrockAuth, Choice as _, ConnectionOption};
use secrecy::{ExposeSecret as _, SecretString};
use std::time::SystemTime;

/// The SigV4 signing name of bedrock-runtime (wire formats §5.1).
const SIGNING_NAME: &str = "bedrock";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Bearer,
    SigV4,
}

/// `ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`, split.
pub struct AccessKeys<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
}

/// Parses the SigV4 credential form; `None` for anything else (a Bedrock API key).
pub fn access_keys(credential: &str) -> Option<AccessKeys<'_>> {
    let mut parts = credential.trim().splitn(3, ':');
    let access_key_id = parts.next()?;
    let secret_access_key = parts.next()?;
    let session_token = parts.next();
    // Real key ids are 16-128 characters (AKIA…, ASIA…), AWS's own examples shorter (AKIDEXAMPLE);
    // Bedrock API keys are base64 and have no `:`, so the form alone tells them apart.
    let id_like = !access_key_id.is_empty()
        && access_key_id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    (id_like && !secret_access_key.is_empty()).then_some(AccessKeys {
        access_key_id,
        secret_access_key,
        session_token: session_token.filter(|t| !t.is_empty()),
    })
}

pub fn auth_of(connection: &ConnectionEntry, credential: &str) -> Auth {
    match connection
        .option(ConnectionOption::Auth)
        .and_then(BedrockAuth::parse)
    {
        Some(BedrockAuth::SigV4) => Auth::SigV4,
        Some(BedrockAuth::Bearer) => Auth::Bearer,
        None if access_keys(credential).is_some() => Auth::SigV4,
        None => Auth::Bearer,
    }
}

/// The region: the `region` option, else the `bedrock-runtime[-fips].{region}.amazonaws.com` host.
pub fn region_of(connection: &ConnectionEntry) -> Option<String> {
    match connection.option(ConnectionOption::Region) {
        Some(region) => Some(region.to_owned()),
        None => llm_proxy_catalog::bedrock_region_of_endpoint(&connection.endpoint),
    }
}

/// Percent-encodes a model id as one path segment (everything but RFC 3986 unreserved bytes),
/// as the AWS SDKs do: `anthropic.claude-3-haiku-20240307-v1:0` → `…-v1%3A0`.
pub fn encode_model_id(model: &str) -> String {
    let mut out = String::with_capacity(model.len() + 8);
    for byte in model.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub fn url(endpoint: &str, model: &str, streaming: bool) -> String {
    let method = if streaming {
        "converse-stream"
    } else {
        "converse"
    };
    format!(
        "{}/model/{}/{method}",
        endpoint.trim_end_matches('/'),
        encode_model_id(model)
    )
}

fn config_error(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message)
        .with_code("upstream_config_invalid")
}

fn sensitive(value: &str) -> Result<HeaderValue, ApiError> {
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        config_error("the bedrock connection's credential is not a valid header value".to_owned())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The SigV4 headers (`authorization`, `x-amz-date`, `x-amz-security-token`) for a POST of `body`
/// with `content-type: application/json` to `url`.
pub fn sigv4_headers(
    url: &str,
    body: &[u8],
    keys: &AccessKeys<'_>,
    region: &str,
    time: SystemTime,
) -> Result<Vec<(HeaderName, HeaderValue)>, ApiError> {
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str().map(|h| match u.port() {
                Some(port) => format!("{h}:{port}"),
                None => h.to_owned(),
            })
        })
        .ok_or_else(|| config_error("the bedrock connection's endpoint has no host".to_owned()))?;
    let identity = Credentials::new(
        keys.access_key_id,
        keys.secret_access_key,
        keys.session_token.map(str::to_owned),
        None,
        "llm-proxy-connection",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SIGNING_NAME)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| config_error(format!("cannot sign the bedrock request: {e}")))?
        .into();
    let headers = [
        ("content-type", "application/json"),
        ("host", host.as_str()),
    ];
    let signable =
        SignableRequest::new("POST", url, headers.into_iter(), SignableBody::Bytes(body))
            .map_err(|e| config_error(format!("cannot sign the bedrock request: {e}")))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| config_error(format!("cannot sign the bedrock request: {e}")))?
        .into_parts();
    instructions
        .headers()
        .map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| config_error(format!("signing produced an invalid header {name}")))?;
            Ok((name, sensitive(value)?))
        })
        .collect()
}

/// What the gateway does with a Bedrock answer.
#[derive(Debug)]
pub struct Answer {
    pub model: String,
}

impl Answer {
    pub fn translate(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
        converse::answer(body, &self.model, request_id(headers))
    }
}

/// `x-amzn-RequestId`, used as the completion id.
pub fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-amzn-requestid")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

pub fn build(ctx: &CallContext<'_>) -> Result<Outbound, ApiError> {
    if ctx.operation == Operation::Embeddings {
        return Err(ApiError::invalid_request(
            "embeddings are not available through bedrock connections (Converse has no embeddings); use an OpenAI, Azure or Google model",
        )
        .with_code("unsupported_operation"));
    }
    let connection = &ctx.target.connection;
    let model = ctx.target.model.remote.as_str();
    let body = converse::request(ctx.request, model)?;
    let streaming = ctx.request.stream;
    let url = url(&connection.endpoint, model, streaming);
    let headers = auth_headers(connection, &url, &body)?;
    Ok(Outbound {
        url: url.into(),
        headers,
        body,
        wire: WireFormat::Bedrock(Answer {
            model: model.to_owned(),
        }),
    })
}

/// The auth headers of a POST of `body` to `url` on `connection`: a Bedrock API key as
/// `Authorization: Bearer`, or the SigV4 headers.
pub fn auth_headers(
    connection: &ConnectionEntry,
    url: &str,
    body: &[u8],
) -> Result<Vec<(HeaderName, HeaderValue)>, ApiError> {
    let credential: &SecretString = &connection.credential;
    let credential = credential.expose_secret();
    let headers = match auth_of(connection, credential) {
        Auth::Bearer => vec![(
            header::AUTHORIZATION,
            sensitive(&format!("Bearer {}", credential.trim()))?,
        )],
        Auth::SigV4 => {
            let keys = access_keys(credential).ok_or_else(|| {
                config_error(
                    "the bedrock connection has auth=sigv4 but its credential is not ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]"
                        .to_owned(),
                )
            })?;
            let region = region_of(connection).ok_or_else(|| {
                config_error(format!(
                    "the bedrock connection {} needs a region to sign requests: set --set region=us-east-1 or use a bedrock-runtime.{{region}}.amazonaws.com endpoint",
                    connection.name
                ))
            })?;
            sigv4_headers(url, body, &keys, &region, SystemTime::now())?
        }
    };
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn connection(endpoint: &str, options: &[(&str, &str)]) -> ConnectionEntry {
        ConnectionEntry {
            id: "c".into(),
            name: "Bedrock".into(),
            provider: crate::index::Provider::Bedrock,
            endpoint: endpoint.into(),
            credential: SecretString::from("unused"),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            timeout: Duration::from_secs(60),
            cache: Default::default(),
        }
    }

    #[test]
    fn model_ids_are_one_encoded_segment() {
        assert_eq!(
            url(
                "https://bedrock-runtime.us-east-1.amazonaws.com/",
                "anthropic.claude-3-haiku-20240307-v1:0",
                false
            ),
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
        );
        assert_eq!(
            url(
                "http://127.0.0.1:9",
                "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
                true
            ),
            "http://127.0.0.1:9/model/global.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream"
        );
        assert_eq!(
            encode_model_id(
                "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.meta.llama3-2-1b-instruct-v1:0"
            ),
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.meta.llama3-2-1b-instruct-v1%3A0"
        );
    }

    #[test]
    fn auth_and_region_detection() {
        let c = connection("https://bedrock-runtime.eu-west-3.amazonaws.com", &[]);
        assert_eq!(
            auth_of(
                &c,
                "AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
            ),
            Auth::SigV4
        );
        assert_eq!(
            auth_of(&c, "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl"),
            Auth::Bearer
        );
        assert_eq!(
            auth_of(
                &c,
                "bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29tLz9BY3Rpb249Q2FsbFdpdGhCZWFyZXJUb2tlbg=="
            ),
            Auth::Bearer
        );
        assert_eq!(region_of(&c).as_deref(), Some("eu-west-3"));
        let keys =
            access_keys("ASIAIOSFODNN7EXAMPLE:secret/key+x:FwoGZXIvYXdzEJr//token==").unwrap();
        assert_eq!(keys.session_token, Some("FwoGZXIvYXdzEJr//token=="));
        let c = connection(
            "http://127.0.0.1:9000",
            &[("region", "us-west-2"), ("auth", "bearer")],
        );
        assert_eq!(region_of(&c).as_deref(), Some("us-west-2"));
        assert_eq!(auth_of(&c, "AKIAIOSFODNN7EXAMPLE:secret"), Auth::Bearer);
        let c = connection("http://127.0.0.1:9000", &[]);
        assert_eq!(region_of(&c), None);
        let c = connection(
            "https://bedrock-runtime-fips.us-gov-west-1.amazonaws.com",
            &[],
        );
        assert_eq!(region_of(&c).as_deref(), Some("us-gov-west-1"));
    }
}
