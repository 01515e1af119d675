//! Rate limiting of assignments (DESIGN §8 step 4, §16 "Assignments").
//!
//! Each assignment has up to two token buckets: requests (capacity `burst`, default `tps`, refilled
//! at `tps` per second) and tokens (capacity `tpm`, refilled at `tpm / 60` per second). The request
//! path makes exactly one [`RateLimiter::acquire`] per request before the upstream call: it takes
//! one request and reserves an estimate of the tokens. When that returns a [`Reservation`], the
//! caller makes exactly one [`RateLimiter::settle`] once the real usage is known (answer read,
//! stream ended or aborted), which replaces the estimate by the real count.
//!
//! The trait returns `impl Future + Send` (return-position impl trait) instead of boxed futures:
//! the in-process [`LocalLimiter`] answers with a `std::future::Ready`, so its hot path neither
//! allocates nor yields. The price is that the trait is not `dyn`-compatible: the server is generic
//! over `L: RateLimiter` (an `Arc<L>` also implements it), or holds an enum of the implementations
//! that implements the trait by matching — still without allocating. The same shape fits the Redis
//! limiter (one `EVALSHA` in `acquire`, one in `settle`).

pub mod any;
pub mod local;
pub mod redis;
pub mod redis_client;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

pub use any::AnyLimiter;
pub use local::{BucketLevels, LocalLimiter};

/// The limits of one assignment. `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LimitSpec {
    /// Requests per second (refill rate of the request bucket); `None` = no request limit.
    pub tps: Option<u32>,
    /// Capacity of the request bucket; `None` = `tps`. Ignored when `tps` is `None`.
    pub burst: Option<u32>,
    /// Tokens per minute: capacity of the token bucket, refilled at `tpm / 60` per second.
    pub tpm: Option<u64>,
}

impl LimitSpec {
    /// No limit at all.
    pub const UNLIMITED: Self = Self {
        tps: None,
        burst: None,
        tpm: None,
    };

    /// True when neither requests nor tokens are limited.
    pub fn is_unlimited(&self) -> bool {
        self.tps.is_none() && self.tpm.is_none()
    }

    /// Capacity of the request bucket (`burst`, default `tps`), if requests are limited.
    pub fn request_capacity(&self) -> Option<u32> {
        self.tps.map(|tps| self.burst.unwrap_or(tps))
    }
}

/// Divides a spec between `divisor` live data planes (each enforces its share locally, e.g. in the
/// Redis limiter's `local` fail mode): every configured value is divided, rounded up and kept at
/// least 1 so that a share never turns into "deny everything". A divisor of 0 counts as 1.
pub fn scaled(spec: &LimitSpec, divisor: u32) -> LimitSpec {
    let divisor = divisor.max(1);
    let share32 = |v: u32| v.div_ceil(divisor).max(1);
    let share64 = |v: u64| v.div_ceil(u64::from(divisor)).max(1);
    LimitSpec {
        tps: spec.tps.map(share32),
        burst: spec.burst.map(share32),
        tpm: spec.tpm.map(share64),
    }
}

/// The answer to [`RateLimiter::acquire`], with the values for the response headers. A `limit_*`
/// field is `Some` exactly when that limit is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go upstream.
    pub allowed: bool,
    /// Capacity of the request bucket (`burst`, default `tps`): what a full bucket admits at once.
    pub limit_requests: Option<u32>,
    /// Whole requests left in the bucket after this one.
    pub remaining_requests: Option<u32>,
    /// Time until the request bucket is full again.
    pub reset_requests: Option<Duration>,
    /// Capacity of the token bucket (`tpm`).
    pub limit_tokens: Option<u64>,
    /// Whole tokens left after this request's reservation (0 while in deficit).
    pub remaining_tokens: Option<u64>,
    /// Time until the token bucket is full again.
    pub reset_tokens: Option<Duration>,
    /// When denied: how long until the request could pass.
    pub retry_after: Option<Duration>,
}

/// `x-ratelimit-limit-requests`
pub const X_RATELIMIT_LIMIT_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-requests");
/// `x-ratelimit-remaining-requests`
pub const X_RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
/// `x-ratelimit-reset-requests`
pub const X_RATELIMIT_RESET_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-requests");
/// `x-ratelimit-limit-tokens`
pub const X_RATELIMIT_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-tokens");
/// `x-ratelimit-remaining-tokens`
pub const X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
/// `x-ratelimit-reset-tokens`
pub const X_RATELIMIT_RESET_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-tokens");
/// `retry-after-ms` (OpenAI's SDKs prefer it over `retry-after`).
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

impl Decision {
    /// An allowed request with no limit configured (no headers).
    pub const UNLIMITED: Self = Self {
        allowed: true,
        limit_requests: None,
        remaining_requests: None,
        reset_requests: None,
        limit_tokens: None,
        remaining_tokens: None,
        reset_tokens: None,
        retry_after: None,
    };

    /// The response headers for this decision, OpenAI style: the three `x-ratelimit-*-requests`
    /// headers when requests are limited, the three `-tokens` ones when tokens are, and when denied
    /// `retry-after` (whole seconds, rounded up, at least 1) and `retry-after-ms` (rounded up, at
    /// least 1). Resets are formatted like OpenAI's (`20ms`, `1s`, `1.5s`, `6m0s`).
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::with_capacity(8);
        if let Some(limit) = self.limit_requests {
            out.push((X_RATELIMIT_LIMIT_REQUESTS, HeaderValue::from(limit)));
            let remaining = self.remaining_requests.unwrap_or(0);
            out.push((X_RATELIMIT_REMAINING_REQUESTS, HeaderValue::from(remaining)));
            let reset = self.reset_requests.unwrap_or_default();
            out.push((X_RATELIMIT_RESET_REQUESTS, duration_header(reset)));
        }
        if let Some(limit) = self.limit_tokens {
            out.push((X_RATELIMIT_LIMIT_TOKENS, HeaderValue::from(limit)));
            let remaining = self.remaining_tokens.unwrap_or(0);
            out.push((X_RATELIMIT_REMAINING_TOKENS, HeaderValue::from(remaining)));
            let reset = self.reset_tokens.unwrap_or_default();
            out.push((X_RATELIMIT_RESET_TOKENS, duration_header(reset)));
        }
        if !self.allowed
            && let Some(retry) = self.retry_after
        {
            let ms = ceil_millis(retry).max(1);
            out.push((
                http::header::RETRY_AFTER,
                HeaderValue::from(ms.div_ceil(1000)),
            ));
            out.push((RETRY_AFTER_MS, HeaderValue::from(ms)));
        }
        out
    }
}

/// Milliseconds in `d`, rounded up (a client must not retry too early).
fn ceil_millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

fn duration_header(d: Duration) -> HeaderValue {
    // The formatted text is plain ASCII, so this never fails; "0s" is only a formal fallback.
    HeaderValue::from_str(&format_reset(d)).unwrap_or(HeaderValue::from_static("0s"))
}

/// Formats a duration the way OpenAI's reset headers do (Go's `time.Duration` style), at
/// millisecond precision rounded up: `0s`, `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3.25s`.
pub fn format_reset(d: Duration) -> String {
    let ms = ceil_millis(d);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = ms / 60_000 % 60;
    let sec_ms = ms % 60_000;
    let (whole, frac) = (sec_ms / 1000, sec_ms % 1000);
    let seconds = if frac == 0 {
        whole.to_string()
    } else {
        let s = format!("{whole}.{frac:03}");
        s.trim_end_matches('0').to_owned()
    };
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// Tokens reserved by an allowed [`RateLimiter::acquire`] (only when a TPM limit is set), to be
/// handed back to [`RateLimiter::settle`] exactly once with the real usage. Not `Clone` on purpose:
/// settling twice would count the difference twice.
#[derive(Debug)]
#[must_use = "settle the reservation with the real token usage"]
pub struct Reservation {
    key: Arc<str>,
    tpm: u64,
    reserved_tokens: u64,
    tag: u8,
}

impl Reservation {
    /// A reservation of `reserved_tokens` on assignment `key`, whose TPM limit was `tpm`.
    pub fn new(key: Arc<str>, tpm: u64, reserved_tokens: u64) -> Self {
        Self {
            key,
            tpm,
            reserved_tokens,
            tag: 0,
        }
    }

    /// Marks which backend issued the reservation, for limiters that combine several (e.g. Redis
    /// with an in-process fail-over) and must settle with the one that reserved.
    pub fn with_tag(mut self, tag: u8) -> Self {
        self.tag = tag;
        self
    }

    /// The assignment id.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The assignment id, shared (cloning it does not allocate).
    pub fn key_arc(&self) -> &Arc<str> {
        &self.key
    }

    /// The TPM limit in force when the tokens were reserved (a settle clamps to the bucket's
    /// capacity, and the Redis script needs it for the key's TTL).
    pub fn tpm(&self) -> u64 {
        self.tpm
    }

    /// Tokens taken from the bucket by `acquire`.
    pub fn reserved_tokens(&self) -> u64 {
        self.reserved_tokens
    }

    /// The backend tag set by [`Reservation::with_tag`] (0 by default).
    pub fn tag(&self) -> u8 {
        self.tag
    }
}

/// A rate limiter for assignments. See the module docs for the call protocol.
pub trait RateLimiter: Send + Sync + 'static {
    /// One call per request, before the upstream call: takes one request from the request bucket
    /// and reserves `estimated_tokens` from the token bucket (if `tpm` is set). On denial nothing is
    /// taken from either bucket and `retry_after` is set. The reservation is `Some` only when the
    /// request is allowed and a TPM limit is configured; otherwise there is nothing to settle.
    fn acquire(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
    ) -> impl Future<Output = (Decision, Option<Reservation>)> + Send;

    /// After the answer (or when a stream ends or is aborted): replaces the reservation by the real
    /// usage. The token balance may go negative — a call that used more than estimated delays the
    /// following ones.
    fn settle(
        &self,
        reservation: Reservation,
        actual_tokens: u64,
    ) -> impl Future<Output = ()> + Send;
}

impl<L: RateLimiter> RateLimiter for Arc<L> {
    fn acquire(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
    ) -> impl Future<Output = (Decision, Option<Reservation>)> + Send {
        (**self).acquire(key, spec, estimated_tokens)
    }

    fn settle(
        &self,
        reservation: Reservation,
        actual_tokens: u64,
    ) -> impl Future<Output = ()> + Send {
        (**self).settle(reservation, actual_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_map(d: &Decision) -> Vec<(String, String)> {
        d.headers()
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    fn get(h: &[(String, String)], name: &str) -> Option<String> {
        h.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn reset_formats_like_openai() {
        let ms = Duration::from_millis;
        assert_eq!(format_reset(Duration::ZERO), "0s");
        assert_eq!(format_reset(Duration::from_nanos(1)), "1ms");
        assert_eq!(format_reset(ms(20)), "20ms");
        assert_eq!(format_reset(ms(120)), "120ms");
        assert_eq!(format_reset(Duration::from_micros(19_001)), "20ms");
        assert_eq!(format_reset(ms(999)), "999ms");
        assert_eq!(format_reset(ms(1000)), "1s");
        assert_eq!(format_reset(ms(1500)), "1.5s");
        assert_eq!(format_reset(ms(8640)), "8.64s");
        assert_eq!(format_reset(ms(1001)), "1.001s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(ms(90_250)), "1m30.25s");
        assert_eq!(format_reset(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_reset(ms(3_723_500)), "1h2m3.5s");
    }

    #[test]
    fn retry_headers_round_up() {
        let denied = |retry: Duration| Decision {
            allowed: false,
            retry_after: Some(retry),
            ..Decision::UNLIMITED
        };
        let h = header_map(&denied(Duration::from_millis(1200)));
        assert_eq!(get(&h, "retry-after").as_deref(), Some("2"));
        assert_eq!(get(&h, "retry-after-ms").as_deref(), Some("1200"));

        let h = header_map(&denied(Duration::from_nanos(1_000_001)));
        assert_eq!(get(&h, "retry-after").as_deref(), Some("1"));
        assert_eq!(get(&h, "retry-after-ms").as_deref(), Some("2"));

        let h = header_map(&denied(Duration::from_secs(3)));
        assert_eq!(get(&h, "retry-after").as_deref(), Some("3"));
        assert_eq!(get(&h, "retry-after-ms").as_deref(), Some("3000"));

        // Never tell a client to retry "now".
        let h = header_map(&denied(Duration::ZERO));
        assert_eq!(get(&h, "retry-after").as_deref(), Some("1"));
        assert_eq!(get(&h, "retry-after-ms").as_deref(), Some("1"));

        // Only limits that are configured produce headers.
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn headers_only_for_configured_limits() {
        assert!(Decision::UNLIMITED.headers().is_empty());

        let requests_only = Decision {
            limit_requests: Some(10),
            remaining_requests: Some(9),
            reset_requests: Some(Duration::from_millis(100)),
            ..Decision::UNLIMITED
        };
        assert_eq!(
            header_map(&requests_only),
            vec![
                ("x-ratelimit-limit-requests".into(), "10".into()),
                ("x-ratelimit-remaining-requests".into(), "9".into()),
                ("x-ratelimit-reset-requests".into(), "100ms".into()),
            ]
        );

        let both_denied = Decision {
            allowed: false,
            limit_requests: Some(5),
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_secs(5)),
            limit_tokens: Some(60_000),
            remaining_tokens: Some(12),
            reset_tokens: Some(Duration::from_secs(360)),
            retry_after: Some(Duration::from_millis(1500)),
        };
        assert_eq!(
            header_map(&both_denied),
            vec![
                ("x-ratelimit-limit-requests".into(), "5".into()),
                ("x-ratelimit-remaining-requests".into(), "0".into()),
                ("x-ratelimit-reset-requests".into(), "5s".into()),
                ("x-ratelimit-limit-tokens".into(), "60000".into()),
                ("x-ratelimit-remaining-tokens".into(), "12".into()),
                ("x-ratelimit-reset-tokens".into(), "6m0s".into()),
                ("retry-after".into(), "2".into()),
                ("retry-after-ms".into(), "1500".into()),
            ]
        );

        // An allowed decision never carries retry headers, even with a stale retry_after.
        let allowed = Decision {
            retry_after: Some(Duration::from_secs(1)),
            ..Decision::UNLIMITED
        };
        assert!(allowed.headers().is_empty());
    }

    #[test]
    fn scaled_divides_rounding_up_at_least_one() {
        let spec = LimitSpec {
            tps: Some(10),
            burst: Some(25),
            tpm: Some(1000),
        };
        assert_eq!(
            scaled(&spec, 3),
            LimitSpec {
                tps: Some(4),
                burst: Some(9),
                tpm: Some(334),
            }
        );
        assert_eq!(scaled(&spec, 1), spec);
        assert_eq!(scaled(&spec, 0), spec);
        let tiny = LimitSpec {
            tps: Some(1),
            burst: None,
            tpm: Some(2),
        };
        assert_eq!(
            scaled(&tiny, 5),
            LimitSpec {
                tps: Some(1),
                burst: None,
                tpm: Some(1),
            }
        );
        assert_eq!(scaled(&LimitSpec::UNLIMITED, 4), LimitSpec::UNLIMITED);
        assert_eq!(
            scaled(
                &LimitSpec {
                    tps: Some(u32::MAX),
                    burst: None,
                    tpm: Some(u64::MAX)
                },
                2
            ),
            LimitSpec {
                tps: Some(u32::MAX / 2 + 1),
                burst: None,
                tpm: Some(u64::MAX / 2 + 1),
            }
        );
    }

    #[test]
    fn spec_helpers() {
        assert!(LimitSpec::UNLIMITED.is_unlimited());
        // burst without tps limits nothing.
        let burst_only = LimitSpec {
            burst: Some(3),
            ..LimitSpec::UNLIMITED
        };
        assert!(burst_only.is_unlimited());
        assert_eq!(burst_only.request_capacity(), None);
        let tps = LimitSpec {
            tps: Some(7),
            ..LimitSpec::UNLIMITED
        };
        assert_eq!(tps.request_capacity(), Some(7));
        let burst = LimitSpec {
            burst: Some(20),
            ..tps
        };
        assert_eq!(burst.request_capacity(), Some(20));
    }
}
