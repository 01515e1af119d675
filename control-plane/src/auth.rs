//! Bearer-token checks for the two gRPC services (DESIGN §19): the configured token and the
//! presented one are trimmed the same way ([`normalize`]), kept and compared as SHA-256 digests in
//! constant time.

use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq as _;
use tonic::{Request, Status};

/// The one trimming rule for tokens, on both sides: surrounding whitespace (e.g. the trailing
/// newline of a file-backed Kubernetes Secret) is not part of a token.
pub fn normalize(token: &str) -> &str {
    token.trim()
}

/// A configured token, as its digest. Never empty: [`ExpectedToken::new`] refuses a token that
/// is blank after [`normalize`] (it would let in anyone sending an empty bearer token).
#[derive(Clone)]
pub struct ExpectedToken(Arc<[u8; 32]>);

impl ExpectedToken {
    /// `None` when the token is empty after trimming.
    pub fn new(token: &SecretString) -> Option<Self> {
        let token = normalize(token.expose_secret());
        if token.is_empty() {
            return None;
        }
        Some(Self(Arc::new(Sha256::digest(token.as_bytes()).into())))
    }

    fn matches(&self, presented: &str) -> bool {
        // Comparing digests keeps the comparison constant-time whatever the presented length.
        let digest: [u8; 32] = Sha256::digest(normalize(presented).as_bytes()).into();
        bool::from(digest.ct_eq(self.0.as_ref()))
    }
}

/// Checks `authorization: Bearer <token>`; with no token configured every call passes (only
/// allowed while the server listens on loopback, see [`crate::server`]).
#[derive(Clone, Default)]
pub struct TokenCheck {
    expected: Option<ExpectedToken>,
    service: &'static str,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("service", &self.service)
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

impl TokenCheck {
    pub fn new(service: &'static str, expected: Option<ExpectedToken>) -> Self {
        Self { expected, service }
    }

    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "{} requires an `authorization: Bearer <token>` header",
                    self.service
                ))
            })?;
        if expected.matches(presented) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(format!(
                "invalid token for {}",
                self.service
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(value) = auth {
            req.metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        req
    }

    fn check_for(token: &str) -> TokenCheck {
        TokenCheck::new(
            "AdminService",
            ExpectedToken::new(&SecretString::from(token.to_owned())),
        )
    }

    #[test]
    fn checks_bearer_token() {
        let check = check_for("s3cret-token");
        assert!(check.check(request(Some("Bearer s3cret-token"))).is_ok());
        let missing = check.check(request(None)).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let wrong = check.check(request(Some("Bearer nope"))).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(!wrong.message().contains("s3cret"));
        assert!(check.check(request(Some("Basic s3cret-token"))).is_err());
        assert!(check.check(request(Some("Bearer "))).is_err());
        assert!(check.check(request(Some("Bearer s3cret-token-2"))).is_err());
    }

    #[test]
    fn configured_and_presented_tokens_are_trimmed_alike() {
        // A token read from a Secret file often ends with a newline.
        let check = check_for("s3cret-token\n");
        assert!(check.check(request(Some("Bearer s3cret-token"))).is_ok());
        assert!(check.check(request(Some("Bearer  s3cret-token\t"))).is_ok());
        let check = check_for("  s3cret-token");
        assert!(check.check(request(Some("Bearer s3cret-token "))).is_ok());
    }

    #[test]
    fn a_blank_configured_token_is_refused() {
        for blank in ["", " ", "\n", " \t\r\n"] {
            assert!(
                ExpectedToken::new(&SecretString::from(blank.to_owned())).is_none(),
                "{blank:?}"
            );
        }
        assert!(ExpectedToken::new(&SecretString::from(" x ".to_owned())).is_some());
    }

    #[test]
    fn no_token_configured_lets_calls_through() {
        assert!(TokenCheck::new("x", None).check(request(None)).is_ok());
    }
}
