//! Service-account JSON → OAuth access tokens for Vertex AI (wire formats §4.2).
//!
//! An RS256 JWT (`iss` = the account's email, `scope` = cloud-platform, `aud` = its `token_uri`,
//! one hour) is exchanged at `token_uri` for an access token. Tokens are cached per credential and
//! refreshed shortly before they expire; one refresh runs at a time per account, the other
//! requests wait for its result instead of each exchanging their own JWT.

use crate::clock::{Clock, MonotonicClock};
use crate::errors::ApiError;
use axum::http::{HeaderValue, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Refresh this long before expiry (google-auth uses 3 min 45 s), or at half-life for short tokens.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const ASSERTION_LIFETIME_S: u64 = 3600;
/// Longest token lifetime believed: Google's are one hour; a token endpoint answering a larger
/// `expires_in` (up to `u64::MAX` seconds) gets its token refreshed after a day anyway.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Most bytes of a token endpoint answer read (a real one is about 1 KiB).
const MAX_TOKEN_ANSWER_BYTES: usize = 64 * 1024;

/// Why a service-account JSON cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum ServiceAccountError {
    #[error("the connection's credential is not a service-account JSON: {0}")]
    NotJson(String),
    #[error("the connection's service-account JSON has type {0:?}, expected \"service_account\"")]
    WrongType(String),
    #[error("the connection's service-account JSON has no `{0}`")]
    Missing(&'static str),
    #[error("the connection's service-account `private_key` is not an RSA PEM key ({0})")]
    BadKey(String),
}

impl From<ServiceAccountError> for ApiError {
    fn from(err: ServiceAccountError) -> Self {
        ApiError::new(StatusCode::BAD_GATEWAY, "server_error", err.to_string())
            .with_code("upstream_credential_invalid")
    }
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
    client_email: Option<String>,
    token_uri: Option<String>,
}

/// A parsed service account: who it is and the key that signs its assertions.
pub struct ServiceAccount {
    pub client_email: String,
    pub project_id: Option<String>,
    pub token_uri: String,
    key_id: Option<String>,
    key: EncodingKey,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("project_id", &self.project_id)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// True when a credential looks like a JSON key file rather than a key or token.
pub fn looks_like_json(credential: &str) -> bool {
    credential.trim_start().starts_with('{')
}

impl ServiceAccount {
    pub fn parse(json: &str) -> Result<Self, ServiceAccountError> {
        let file: KeyFile = serde_json::from_str(json).map_err(|e| {
            // serde's message quotes no input for syntax errors, but for type errors it can
            // quote a value: keep only the position.
            ServiceAccountError::NotJson(format!(
                "invalid JSON at line {} column {}",
                e.line(),
                e.column()
            ))
        })?;
        if let Some(kind) = file.kind.as_deref()
            && kind != "service_account"
        {
            return Err(ServiceAccountError::WrongType(kind.to_owned()));
        }
        let client_email = file
            .client_email
            .filter(|e| !e.is_empty())
            .ok_or(ServiceAccountError::Missing("client_email"))?;
        let private_key = SecretString::from(
            file.private_key
                .filter(|k| !k.is_empty())
                .ok_or(ServiceAccountError::Missing("private_key"))?,
        );
        let key = EncodingKey::from_rsa_pem(private_key.expose_secret().as_bytes())
            .map_err(|e| ServiceAccountError::BadKey(format!("{:?}", e.kind())))?;
        Ok(Self {
            client_email,
            project_id: file.project_id.filter(|p| !p.is_empty()),
            token_uri: file
                .token_uri
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned()),
            key_id: file.private_key_id.filter(|k| !k.is_empty()),
            key,
        })
    }

    /// The signed JWT assertion, issued at `now_unix`.
    pub fn assertion(&self, now_unix: u64) -> Result<SecretString, ApiError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid.clone_from(&self.key_id);
        let claims = Claims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat: now_unix,
            exp: now_unix.saturating_add(ASSERTION_LIFETIME_S),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(SecretString::from)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    format!("cannot sign the service-account assertion: {:?}", e.kind()),
                )
                .with_code("upstream_credential_invalid")
            })
    }
}

#[derive(Clone)]
struct AccessToken {
    /// `Bearer <token>`, marked sensitive.
    header: HeaderValue,
    refresh_at: Duration,
    expires_at: Duration,
}

/// A fresh access token and its lifetime, as the token endpoint answered.
pub struct Exchanged {
    pub token: SecretString,
    pub expires_in: Duration,
}

/// The cached token of one service account.
pub struct AccountTokens {
    pub account: ServiceAccount,
    current: RwLock<Option<AccessToken>>,
    refresh: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
    exchanges: AtomicU64,
}

impl AccountTokens {
    fn new(account: ServiceAccount) -> Self {
        Self {
            account,
            current: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            exchanges: AtomicU64::new(0),
        }
    }

    /// Requests waiting for a refresh in progress.
    pub fn refresh_waiters(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Token exchanges started so far.
    pub fn exchanges(&self) -> u64 {
        self.exchanges.load(Ordering::Acquire)
    }

    fn current(&self) -> Option<AccessToken> {
        self.current.read().ok().and_then(|t| t.clone())
    }

    fn usable(&self, now: Duration) -> Option<HeaderValue> {
        self.current()
            .filter(|t| now < t.refresh_at)
            .map(|t| t.header)
    }

    /// The `Authorization` value, from the cache or from `fetch` (one caller at a time).
    pub async fn authorization_with<F, Fut>(
        &self,
        clock: &dyn Clock,
        fetch: F,
    ) -> Result<HeaderValue, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Exchanged, ApiError>>,
    {
        if let Some(header) = self.usable(clock.now()) {
            return Ok(header);
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _guard = self.refresh.lock().await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        // Whoever held the lock before us may have refreshed already.
        if let Some(header) = self.usable(clock.now()) {
            return Ok(header);
        }
        let started = clock.now();
        self.exchanges.fetch_add(1, Ordering::AcqRel);
        match fetch().await {
            Ok(exchanged) => {
                let mut header = HeaderValue::from_str(&format!(
                    "Bearer {}",
                    exchanged.token.expose_secret()
                ))
                .map_err(|_| {
                    ApiError::upstream_bad_answer(
                        super::PROVIDER,
                        "the token endpoint returned an access token that is not a valid header value",
                    )
                })?;
                header.set_sensitive(true);
                // The lifetime comes from the token endpoint: bounded, and added saturating.
                let lifetime = exchanged.expires_in.min(MAX_TOKEN_LIFETIME);
                let margin = REFRESH_MARGIN.min(lifetime / 2);
                let token = AccessToken {
                    header: header.clone(),
                    refresh_at: started.saturating_add(lifetime - margin),
                    expires_at: started.saturating_add(lifetime),
                };
                if let Ok(mut current) = self.current.write() {
                    *current = Some(token);
                }
                Ok(header)
            }
            // A token that has not expired yet beats an error.
            Err(err) => match self.current() {
                Some(token) if clock.now() < token.expires_at => Ok(token.header),
                _ => Err(err),
            },
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<u64>,
    error: Option<String>,
    error_description: Option<String>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Exchanges a fresh assertion for an access token at the account's `token_uri`.
pub async fn exchange(
    client: &reqwest::Client,
    account: &ServiceAccount,
) -> Result<Exchanged, ApiError> {
    let assertion = account.assertion(now_unix())?;
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", GRANT_TYPE)
        .append_pair("assertion", assertion.expose_secret())
        .finish();
    let response = client
        .post(&account.token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .timeout(EXCHANGE_TIMEOUT)
        .body(form)
        .send()
        .await
        .map_err(|e| {
            ApiError::upstream_unreachable(
                super::PROVIDER,
                format!("token endpoint {}: {}", account.token_uri, e.without_url()),
            )
        })?;
    let status = response.status();
    let body = http::Response::from(response).into_body();
    let body = crate::providers::capped::read_capped(body, MAX_TOKEN_ANSWER_BYTES)
        .await
        .map_err(|e| match e {
            crate::providers::capped::CappedReadError::Broken(e) => ApiError::upstream_unreachable(
                super::PROVIDER,
                format!("token endpoint {}: {e}", account.token_uri),
            ),
            too_large => ApiError::upstream_bad_answer(
                super::PROVIDER,
                format!("token endpoint {}: {too_large}", account.token_uri),
            ),
        })?;
    let answer: Option<TokenAnswer> = serde_json::from_slice(&body).ok();
    match answer {
        Some(TokenAnswer {
            access_token: Some(token),
            expires_in,
            ..
        }) if status.is_success() && !token.is_empty() => Ok(Exchanged {
            token: SecretString::from(token),
            expires_in: Duration::from_secs(expires_in.unwrap_or(3600)),
        }),
        answer => {
            let (error, description) = answer
                .map(|a| (a.error, a.error_description))
                .unwrap_or_default();
            let detail: String = [error, description]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ")
                .chars()
                .take(300)
                .collect();
            // The account and Google's explanation go to the operator's log, not to callers.
            tracing::warn!(
                account = %account.client_email,
                status = status.as_u16(),
                detail = %detail,
                "google token exchange refused"
            );
            let code = detail
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                format!(
                    "the google token endpoint refused the gateway connection's service account (HTTP {}{}{}); see the gateway log",
                    status.as_u16(),
                    if code.is_empty() { "" } else { " " },
                    code
                ),
            )
            .with_code("upstream_credential_refused"))
        }
    }
}

/// Service accounts by credential (SHA-256 of the JSON), parsed once, with their tokens.
pub struct TokenCache {
    accounts: Mutex<HashMap<[u8; 32], Arc<AccountTokens>>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").finish_non_exhaustive()
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::with_clock(Arc::new(MonotonicClock::new()))
    }
}

impl TokenCache {
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            accounts: Mutex::new(HashMap::new()),
            clock,
        }
    }

    /// The account of a service-account credential, parsed on first use.
    pub fn account(&self, credential: &str) -> Result<Arc<AccountTokens>, ApiError> {
        let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        let mut accounts = self
            .accounts
            .lock()
            .map_err(|_| ApiError::upstream_bad_answer(super::PROVIDER, "token cache poisoned"))?;
        if let Some(tokens) = accounts.get(&digest) {
            return Ok(tokens.clone());
        }
        let tokens = Arc::new(AccountTokens::new(ServiceAccount::parse(credential)?));
        accounts.insert(digest, tokens.clone());
        Ok(tokens)
    }

    /// `Authorization: Bearer <access token>` for the account.
    pub async fn authorization(
        &self,
        client: &reqwest::Client,
        tokens: &AccountTokens,
    ) -> Result<HeaderValue, ApiError> {
        tokens
            .authorization_with(self.clock.as_ref(), || exchange(client, &tokens.account))
            .await
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn exchanged(token: &str, seconds: u64) -> Result<Exchanged, ApiError> {
        Ok(Exchanged {
            token: SecretString::from(token.to_owned()),
            expires_in: Duration::from_secs(seconds),
        })
    }

    fn tokens() -> AccountTokens {
        AccountTokens::new(ServiceAccount {
            client_email: "sa@p.iam.gserviceaccount.com".into(),
            project_id: None,
            token_uri: DEFAULT_TOKEN_URI.into(),
            key_id: None,
            key: EncodingKey::from_secret(b"unused"),
        })
    }

    #[tokio::test]
    async fn a_token_is_reused_until_shortly_before_it_expires() {
        let clock = ManualClock::new();
        let tokens = tokens();
        let first = tokens
            .authorization_with(&clock, || async { exchanged("ya29.one", 3600) })
            .await
            .unwrap();
        assert_eq!(first.to_str().unwrap(), "Bearer ya29.one");
        assert!(first.is_sensitive());
        clock.advance(Duration::from_secs(3600 - 301));
        let again = tokens
            .authorization_with(&clock, || async { exchanged("ya29.two", 3600) })
            .await
            .unwrap();
        assert_eq!(again.to_str().unwrap(), "Bearer ya29.one");
        clock.advance(Duration::from_secs(2));
        let refreshed = tokens
            .authorization_with(&clock, || async { exchanged("ya29.two", 3600) })
            .await
            .unwrap();
        assert_eq!(refreshed.to_str().unwrap(), "Bearer ya29.two");
        assert_eq!(tokens.exchanges(), 2);
    }

    #[tokio::test]
    async fn a_huge_expires_in_neither_overflows_nor_outlives_a_day() {
        let clock = ManualClock::new();
        // Past zero: `now + u64::MAX seconds` overflows a Duration (it panicked before).
        clock.advance(Duration::from_secs(1));
        let tokens = tokens();
        let first = tokens
            .authorization_with(&clock, || async { exchanged("ya29.forever", u64::MAX) })
            .await
            .unwrap();
        assert_eq!(first.to_str().unwrap(), "Bearer ya29.forever");
        clock.advance(MAX_TOKEN_LIFETIME - REFRESH_MARGIN - Duration::from_secs(1));
        let again = tokens
            .authorization_with(&clock, || async { exchanged("ya29.next", 3600) })
            .await
            .unwrap();
        assert_eq!(again.to_str().unwrap(), "Bearer ya29.forever");
        clock.advance(Duration::from_secs(2));
        let refreshed = tokens
            .authorization_with(&clock, || async { exchanged("ya29.next", 3600) })
            .await
            .unwrap();
        assert_eq!(refreshed.to_str().unwrap(), "Bearer ya29.next");
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_using_an_unexpired_token() {
        let clock = ManualClock::new();
        let tokens = tokens();
        tokens
            .authorization_with(&clock, || async { exchanged("ya29.one", 600) })
            .await
            .unwrap();
        clock.advance(Duration::from_secs(500));
        let failing = || async { Err(ApiError::upstream_unreachable("google", "down")) };
        let kept = tokens.authorization_with(&clock, failing).await.unwrap();
        assert_eq!(kept.to_str().unwrap(), "Bearer ya29.one");
        clock.advance(Duration::from_secs(100));
        let err = tokens
            .authorization_with(&clock, failing)
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_refresh() {
        let clock = Arc::new(ManualClock::new());
        let tokens = Arc::new(tokens());
        let release = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (tokens, clock, release) = (tokens.clone(), clock.clone(), release.clone());
            tasks.push(tokio::spawn(async move {
                tokens
                    .authorization_with(clock.as_ref(), || async move {
                        release.notified().await;
                        exchanged("ya29.shared", 3600)
                    })
                    .await
            }));
        }
        // Hold the first exchange until the 19 others queue behind it.
        while !(tokens.exchanges() == 1 && tokens.refresh_waiters() == 19) {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        for task in tasks {
            let header = task.await.unwrap().unwrap();
            assert_eq!(header.to_str().unwrap(), "Bearer ya29.shared");
        }
        assert_eq!(tokens.exchanges(), 1);
    }

    #[test]
    fn parse_errors_name_the_field_and_never_the_key() {
        let err = ServiceAccount::parse(r#"{"type":"service_account","private_key":"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n"}"#).unwrap_err();
        assert!(err.to_string().contains("client_email"), "{err}");
        let err = ServiceAccount::parse(r#"{"type":"service_account","client_email":"a@b","private_key":"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n"}"#).unwrap_err();
        assert!(matches!(err, ServiceAccountError::BadKey(_)), "{err}");
        assert!(!err.to_string().contains("c2VjcmV0"));
        let err = ServiceAccount::parse(r#"{"type":"authorized_user"}"#).unwrap_err();
        assert!(err.to_string().contains("authorized_user"));
        let err = ServiceAccount::parse(r#"{"private_key": 5 "#).unwrap_err();
        assert!(matches!(err, ServiceAccountError::NotJson(_)));
    }
}
