//! Leases: a busy assignment with a high request limit takes several request tokens per Redis
//! call and answers the next requests from them, so it needs far fewer calls than requests. Also
//! the per-assignment demand that sizes each lease.
//!
//! A lease is *standing*: once half its time to live has passed, the request that uses it asks
//! for a top-up in the background ([`Take::Leased`] with a refill), so a steadily busy
//! assignment never makes a request wait for Redis. A top-up brings the lease back to one
//! window's demand, no more, and renews its time to live: a data plane never holds more unused
//! tokens than one lease (the bound of [`lease_size`]), as without top-ups.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::ratelimit::{Decision, LimitSpec};

/// A lease is at most 1/32 of the request bucket's capacity...
const LEASE_CAPACITY_SHARE: u32 = 32;
/// ... at most 50 ms of its refill (1/20 of `tps`) ...
const LEASE_RATE_SHARE: u32 = 20;
/// ... and at most this many requests.
const LEASE_MAX: u32 = 1000;
const LEASE_SHARDS: usize = 16;
/// Bound on assignments tracked per shard (busy ones; idle entries are evicted first).
const LEASE_SHARD_CAPACITY: usize = 1024;

/// The largest lease one acquire may take from Redis for `spec`: at most 1/32 of the request
/// bucket, 50 ms of its refill and 1000 requests; 1 (one call per request, exact to the
/// request) for small limits and for token-limited (TPM) assignments, whose reservations are
/// per-request estimates. The lease actually taken is also capped by the demand this data plane
/// saw for the assignment in the last lease window (see `Leases::take`), so a quiet data plane
/// never strands more than it was using. The shared bucket is never overdrawn: leased tokens are
/// taken from it up front, and unused ones expire, which can only under-admit.
pub fn lease_size(spec: &LimitSpec) -> u32 {
    match (spec.tpm, spec.tps, spec.request_capacity()) {
        (None, Some(tps), Some(capacity)) => (capacity / LEASE_CAPACITY_SHARE)
            .min(tps / LEASE_RATE_SHARE)
            .clamp(1, LEASE_MAX),
        _ => 1,
    }
}

/// Leased request tokens of one assignment, and its recent demand on this data plane.
struct Lease {
    spec: LimitSpec,
    left: u32,
    until: Instant,
    /// The decision Redis gave when the lease was taken; `remaining_requests` is rebased on use.
    decision: Decision,
    /// Requests Redis reported remaining after the lease was taken.
    base_remaining: u32,
    /// Acquires in the current window (of the lease TTL) and in the one before.
    window_start: Instant,
    window_count: u32,
    previous_count: u32,
    /// A background top-up is under way (at most one per assignment).
    refilling: bool,
}

/// What [`Leases::take`] found.
#[derive(Debug)]
pub(super) enum Take {
    /// A request token from a live lease: the admitting decision, and `Some(n)` when the lease
    /// is past half its time to live and the caller should take `n` more request tokens in the
    /// background (then [`Leases::store`] them, or call [`Leases::refill_failed`]).
    Leased(Decision, Option<u32>),
    /// No usable lease: ask Redis, the request waiting, for this many request tokens (the
    /// demand seen in the last window, between 1 and the bound).
    Ask(u32),
}

type LeaseShard = HashMap<Box<str>, Lease>;

/// Per-assignment leases, sharded like the deny cache.
pub(super) struct Leases {
    ttl: Duration,
    hasher: RandomState,
    shards: Box<[Mutex<LeaseShard>]>,
}

impl Leases {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            hasher: RandomState::new(),
            shards: (0..LEASE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, LeaseShard> {
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        // Plain data, valid after any panic: a poisoned lock is still usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One request token from a live lease taken with this spec, else the lease to ask Redis
    /// for: the demand seen in the last window (this one or the one before, whichever is larger),
    /// between 1 and `bound`. See [`Take`].
    pub(super) fn take(&self, key: &str, spec: &LimitSpec, bound: u32) -> Take {
        if bound <= 1 {
            return Take::Ask(1);
        }
        let now = Instant::now();
        let mut shard = self.shard(key);
        let Some(lease) = shard.get_mut(key) else {
            if shard.len() >= LEASE_SHARD_CAPACITY {
                let ttl = self.ttl;
                shard.retain(|_, l| l.left > 0 || now < l.window_start + ttl);
            }
            if shard.len() < LEASE_SHARD_CAPACITY {
                shard.insert(
                    Box::from(key),
                    Lease {
                        spec: *spec,
                        left: 0,
                        until: now,
                        decision: Decision::UNLIMITED,
                        base_remaining: 0,
                        window_start: now,
                        window_count: 1,
                        previous_count: 0,
                        refilling: false,
                    },
                );
            }
            return Take::Ask(1);
        };
        if now >= lease.window_start + self.ttl {
            let consecutive = now < lease.window_start + 2 * self.ttl;
            lease.previous_count = if consecutive { lease.window_count } else { 0 };
            lease.window_start = now;
            lease.window_count = 0;
        }
        lease.window_count = lease.window_count.saturating_add(1);
        let demand = lease.previous_count.max(lease.window_count).clamp(1, bound);
        if lease.left > 0 && lease.spec == *spec && now < lease.until {
            lease.left -= 1;
            let mut decision = lease.decision.clone();
            decision.remaining_requests = Some(lease.base_remaining.saturating_add(lease.left));
            let half_life_passed = lease.until.saturating_duration_since(now) <= self.ttl / 2;
            let refill = (half_life_passed && !lease.refilling).then(|| {
                lease.refilling = true;
                // Back to one window's demand; at least one token, which renews the lease.
                demand.saturating_sub(lease.left).max(1)
            });
            return Take::Leased(decision, refill);
        }
        Take::Ask(demand)
    }

    /// A background top-up got nothing (Redis failed or the bucket is empty): the next request
    /// past half-life may try again.
    pub(super) fn refill_failed(&self, key: &str) {
        if let Some(lease) = self.shard(key).get_mut(key) {
            lease.refilling = false;
        }
    }

    /// Keeps `spare` tokens of an admitted acquire for the next requests, on top of any still
    /// live from a concurrent acquire; returns the requests remaining to report (Redis' count
    /// plus the lease).
    pub(super) fn store(&self, key: &str, spec: LimitSpec, spare: u32, decision: &Decision) -> u32 {
        let now = Instant::now();
        let base_remaining = decision.remaining_requests.unwrap_or(0);
        let mut shard = self.shard(key);
        let Some(lease) = shard.get_mut(key) else {
            return base_remaining.saturating_add(spare);
        };
        let live = lease.left > 0 && lease.spec == spec && now < lease.until;
        lease.left = if live {
            lease.left.saturating_add(spare)
        } else {
            spare
        };
        lease.spec = spec;
        lease.refilling = false;
        lease.until = now + self.ttl;
        lease.decision = decision.clone();
        lease.base_remaining = base_remaining;
        base_remaining.saturating_add(lease.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rps(tps: u32, burst: Option<u32>) -> LimitSpec {
        LimitSpec {
            tps: Some(tps),
            burst,
            tpm: None,
        }
    }

    #[test]
    fn lease_sizes() {
        // Small, token-limited or unlimited: one token per call, exact to the request.
        assert_eq!(lease_size(&rps(5, None)), 1);
        assert_eq!(lease_size(&rps(50, Some(50))), 1);
        assert_eq!(lease_size(&LimitSpec::UNLIMITED), 1);
        assert_eq!(
            lease_size(&LimitSpec {
                tpm: Some(1_000_000),
                ..rps(100_000, None)
            }),
            1
        );
        // 1/32 of the bucket, 50 ms of the rate, at most 1000.
        assert_eq!(lease_size(&rps(3200, None)), 100);
        assert_eq!(lease_size(&rps(100, Some(100_000))), 5);
        assert_eq!(lease_size(&rps(1_000_000, None)), 1000);
    }
}
