//! AWS Signature V4 verification (wire formats §5.6), for the mock Bedrock Runtime.
//!
//! Written from the specification, independently of the `aws-sigv4` crate the gateway signs
//! with: a verifier built on the signer's crate would share its bugs and accept what AWS
//! refuses. The unit tests reproduce AWS's own Signature V4 test-suite vectors.
//!
//! It knows the key pairs below; a call signed with any other is refused as AWS refuses it.

use crate::Recorded;
use axum::http::HeaderMap;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

/// The access key pair of AWS's own Signature V4 test suite.
pub const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
pub const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// The example IAM user key pair of the AWS documentation (a 20-character key id).
pub const IAM_ACCESS_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
pub const IAM_SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
/// The session token accepted with [`ACCESS_KEY_ID`]. Session tokens are base64 and contain
/// `/`, `+` and `=`.
pub const SESSION_TOKEN: &str =
    "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJGMEQCIHNlc3Npb24rdG9rZW4vZXhhbXBsZQ==";
/// The only region the credential scope may name.
pub const REGION: &str = "us-east-1";
/// AWS's message when the recomputed signature differs.
pub const SIGNATURE_MISMATCH: &str = "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";

/// Why a call was refused: the exception name for `x-amzn-ErrorType` and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub kind: &'static str,
    pub message: String,
}

pub(crate) fn refused(kind: &'static str, message: impl Into<String>) -> AuthFailure {
    AuthFailure {
        kind,
        message: message.into(),
    }
}

/// A verified SigV4 Authorization header, taken apart.
#[derive(Debug, Clone)]
pub struct SigV4 {
    /// `AKID/date/region/service/aws4_request`.
    pub credential: String,
    /// Lowercase, in the order the Authorization header lists them.
    pub signed_headers: Vec<String>,
    /// The canonical request the signature was recomputed over.
    pub canonical_request: String,
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    #[allow(
        clippy::expect_used,
        reason = "HMAC takes keys of any length (longer ones are hashed): this cannot fail"
    )]
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
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
            out.push('%');
            out.push_str(&hex(&[b]).to_uppercase());
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
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    Ok(format!(
        "{method}\n{}\n\n{canonical_headers}\n{}\n{}",
        canonical_uri(path),
        signed.join(";"),
        sha256_hex(body)
    ))
}

/// The hex signature of `canonical_request` (string to sign, then the derived signing key);
/// `amz_date` is an [`is_amz_date`] timestamp.
fn signature(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical_request: &str,
) -> String {
    let date = amz_date.get(..8).unwrap_or(amz_date);
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

/// The `Authorization` value signing a POST of `body` to `path` with `headers` (all signed; they
/// must hold `host` and `x-amz-date`) by [`ACCESS_KEY_ID`] in [`REGION`]: for the other
/// modules' tests.
#[cfg(test)]
pub(crate) fn test_authorization(path: &str, headers: &HeaderMap, body: &[u8]) -> String {
    let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    let canonical = canonical_request("POST", path, headers, &names, body).unwrap_or_default();
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|d| d.to_str().ok())
        .unwrap_or_default();
    let date = amz_date.get(..8).unwrap_or_default();
    let sig = signature(SECRET_ACCESS_KEY, amz_date, REGION, "bedrock", &canonical);
    format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/{date}/{REGION}/bedrock/aws4_request, SignedHeaders={}, Signature={sig}",
        names.join(";")
    )
}

/// Whether `value` is an `X-Amz-Date` timestamp: `YYYYMMDD'T'HHMMSS'Z'`.
pub fn is_amz_date(value: &str) -> bool {
    value.len() == 16
        && value.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
}

/// Verifies a SigV4-signed Bedrock call the way AWS does, for the key pairs this module knows
/// (the session token belongs to [`ACCESS_KEY_ID`]).
pub fn verify(recorded: &Recorded) -> Result<SigV4, AuthFailure> {
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
    // An `is_amz_date` value is 16 ASCII bytes.
    let amz_day = amz_date.get(..8).unwrap_or_default();
    if amz_day != date {
        return Err(refused(
            "InvalidSignatureException",
            format!(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{date}' != '{amz_day}'"
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
    // Bedrock calls carry no query string, so the canonical request above has none.
    if recorded.query.is_some() || given != expected {
        return Err(refused("InvalidSignatureException", SIGNATURE_MISMATCH));
    }
    Ok(SigV4 {
        credential: credential.to_owned(),
        signed_headers: signed.into_iter().map(str::to_owned).collect(),
        canonical_request: canonical,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bedrock::SONNET_CONVERSE_PATH;
    use axum::body::Bytes;
    use axum::http::Method;

    #[test]
    fn the_sigv4_verifier_reproduces_the_aws_signature_v4_test_suite() {
        // `post-vanilla` of the AWS Signature V4 test suite.
        let mut headers = HeaderMap::new();
        headers.insert("host", "example.amazonaws.com".parse().unwrap());
        headers.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
        let canonical =
            canonical_request("POST", "/", &headers, &["host", "x-amz-date"], b"").unwrap();
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

    /// A Converse call signed here with `access_key_id`/`secret`, scoped to `region`.
    fn signed_call(access_key_id: &str, secret: &str, region: &str) -> Recorded {
        let amz_date = "20250101T120000Z";
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert(
            "host",
            "bedrock-runtime.us-east-1.amazonaws.com".parse().unwrap(),
        );
        headers.insert("x-amz-date", amz_date.parse().unwrap());
        let signed = ["content-type", "host", "x-amz-date"];
        let body = br#"{"messages":[{"role":"user","content":[{"text":"Hi"}]}]}"#;
        let canonical =
            canonical_request("POST", SONNET_CONVERSE_PATH, &headers, &signed, body).unwrap();
        let sig = signature(secret, amz_date, region, "bedrock", &canonical);
        headers.insert(
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={access_key_id}/20250101/{region}/bedrock/aws4_request, SignedHeaders={}, Signature={sig}",
                signed.join(";")
            )
            .parse()
            .unwrap(),
        );
        Recorded {
            method: Method::POST,
            path: SONNET_CONVERSE_PATH.to_owned(),
            query: None,
            headers,
            body: Bytes::from_static(body),
            request_id: None,
        }
    }

    #[test]
    fn a_correctly_signed_call_is_accepted_and_any_alteration_refused() {
        let call = signed_call(IAM_ACCESS_KEY_ID, IAM_SECRET_ACCESS_KEY, REGION);
        let sig = verify(&call).unwrap();
        assert_eq!(
            sig.credential,
            "AKIAIOSFODNN7EXAMPLE/20250101/us-east-1/bedrock/aws4_request"
        );
        assert_eq!(sig.signed_headers, ["content-type", "host", "x-amz-date"]);

        let mut body = call.clone();
        body.body = Bytes::from_static(br#"{"messages":[]}"#);
        assert_eq!(verify(&body).unwrap_err().message, SIGNATURE_MISMATCH);

        let mut date = call.clone();
        date.headers
            .insert("x-amz-date", "20250101T120001Z".parse().unwrap());
        assert_eq!(verify(&date).unwrap_err().kind, "InvalidSignatureException");

        let mut query = call.clone();
        query.query = Some("a=b".to_owned());
        assert_eq!(verify(&query).unwrap_err().message, SIGNATURE_MISMATCH);

        let mut token = call;
        token
            .headers
            .insert("x-amz-security-token", SESSION_TOKEN.parse().unwrap());
        assert_eq!(
            verify(&token).unwrap_err().kind,
            "UnrecognizedClientException",
            "the session token belongs to the other key pair"
        );
    }

    #[test]
    fn unknown_keys_other_regions_and_wrong_secrets_are_refused() {
        let unknown = signed_call("AKIAUNKNOWNEXAMPLE00", SECRET_ACCESS_KEY, REGION);
        assert_eq!(
            verify(&unknown).unwrap_err().kind,
            "UnrecognizedClientException"
        );
        let region = signed_call(ACCESS_KEY_ID, SECRET_ACCESS_KEY, "eu-west-1");
        assert_eq!(
            verify(&region).unwrap_err().message,
            "Credential should be scoped to a valid region, not 'eu-west-1'."
        );
        let secret = signed_call(ACCESS_KEY_ID, IAM_SECRET_ACCESS_KEY, REGION);
        assert_eq!(verify(&secret).unwrap_err().message, SIGNATURE_MISMATCH);
        let mut unsigned = signed_call(ACCESS_KEY_ID, SECRET_ACCESS_KEY, REGION);
        unsigned.headers.remove("authorization");
        assert_eq!(
            verify(&unsigned).unwrap_err().kind,
            "IncompleteSignatureException"
        );
    }

    #[test]
    fn amz_dates_are_basic_iso_8601_in_utc() {
        assert!(is_amz_date("20150830T123600Z"));
        assert!(!is_amz_date("2015-08-30T12:36:00Z"));
        assert!(!is_amz_date("20150830T123600"));
    }
}
