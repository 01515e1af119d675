//! Bearer-token checks for the two gRPC services, compared in constant time.

use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq as _;
use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>`; with no token configured every call passes (only
/// allowed while the server listens on loopback, see [`crate::server`]).
#[derive(Clone, Default)]
pub struct TokenCheck {
    /// SHA-256 of the expected token: comparing digests keeps the comparison constant-time
    /// regardless of the presented token's length.
    expected: Option<Arc<[u8; 32]>>,
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
    pub fn new(service: &'static str, token: Option<&SecretString>) -> Self {
        Self {
            expected: token.map(|t| Arc::new(Sha256::digest(t.expose_secret().as_bytes()).into())),
            service,
        }
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
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        if bool::from(digest.ct_eq(expected.as_ref())) {
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

    #[test]
    fn checks_bearer_token() {
        let token = SecretString::from("s3cret-token");
        let check = TokenCheck::new("AdminService", Some(&token));
        assert!(check.check(request(Some("Bearer s3cret-token"))).is_ok());
        let missing = check.check(request(None)).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let wrong = check.check(request(Some("Bearer nope"))).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(!wrong.message().contains("s3cret"));
        assert!(check.check(request(Some("Basic s3cret-token"))).is_err());
    }

    #[test]
    fn no_token_configured_lets_calls_through() {
        assert!(TokenCheck::new("x", None).check(request(None)).is_ok());
    }
}
