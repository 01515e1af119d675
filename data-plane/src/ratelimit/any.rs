//! The limiter a data plane runs: in-process buckets, or Redis shared by every data plane.

use super::local::LocalLimiter;
use super::redis::RedisLimiter;
use super::{Decision, LimitSpec, RateLimiter, Reservation};

/// One of the two implementations, chosen at start (`--redis-url`).
#[derive(Debug)]
pub enum AnyLimiter {
    Local(LocalLimiter),
    Redis(RedisLimiter),
}

impl RateLimiter for AnyLimiter {
    async fn acquire(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
    ) -> (Decision, Option<Reservation>) {
        match self {
            AnyLimiter::Local(limiter) => limiter.acquire(key, spec, estimated_tokens).await,
            AnyLimiter::Redis(limiter) => limiter.acquire(key, spec, estimated_tokens).await,
        }
    }

    async fn settle(&self, reservation: Reservation, actual_tokens: u64) {
        match self {
            AnyLimiter::Local(limiter) => limiter.settle(reservation, actual_tokens).await,
            AnyLimiter::Redis(limiter) => limiter.settle(reservation, actual_tokens).await,
        }
    }
}
