//! In-process rate limiter: continuous token buckets per assignment, kept in a sharded map.
//!
//! Used alone by a single data plane (embedded mode, or no Redis configured) and, later, as the
//! Redis limiter's `local` fail-over with [`super::scaled`] specs. Buckets hold `f64` levels refilled
//! by elapsed time (no timers), start full, and may go negative when a call used more tokens than
//! it reserved. Time comes from a [`Clock`] so tests run on a virtual clock.
//!
//! Concurrency: 32 `std::sync::Mutex` shards selected by a hash of the assignment id; a lock is
//! held only for a few arithmetic operations and never across an `.await` (the futures returned are
//! already complete). Idle buckets are dropped by an occasional sweep of the shard being used.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::{Future, ready};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{Decision, LimitSpec, RateLimiter, Reservation};
use crate::clock::{Clock, MonotonicClock};

/// Number of shards (a power of two); enough that two cores rarely meet on one lock.
const SHARDS: usize = 32;
/// Buckets untouched for longer than this (and full again) are dropped.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Longest `retry_after` reported: for zero limits (which never refill) and absurd deficits.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Admission tolerates this many nanoseconds of refill, so that a client that waited exactly the
/// (nanosecond-rounded) `retry_after` is not refused because of float rounding.
const SLACK_SECS: f64 = 1e-9;

/// One continuous token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Current tokens; negative while in deficit.
    level: f64,
    capacity: f64,
    /// Tokens added per second.
    rate: f64,
}

impl Bucket {
    fn full(capacity: f64, rate: f64) -> Self {
        Self {
            level: capacity,
            capacity,
            rate,
        }
    }

    fn refill(&mut self, secs: f64) {
        if self.level < self.capacity {
            self.level = (self.level + self.rate * secs).min(self.capacity);
        }
    }

    /// A zero capacity or rate (refused by the control plane, but possible in a hand-made spec)
    /// admits nothing rather than dividing by zero.
    fn blocked(&self) -> bool {
        !(self.capacity > 0.0 && self.rate > 0.0)
    }

    /// Level needed to admit `cost`. A cost above the capacity only needs a full bucket: otherwise
    /// a request estimated above `tpm` could never pass. It then leaves the bucket in deficit, which
    /// delays the following requests as if the rate had been respected.
    fn need(&self, cost: f64) -> f64 {
        cost.min(self.capacity)
    }

    fn admits(&self, cost: f64) -> bool {
        !self.blocked() && self.level + self.rate * SLACK_SECS + 1e-9 >= self.need(cost)
    }

    /// Time until `cost` would be admitted.
    fn wait(&self, cost: f64) -> Duration {
        if self.blocked() {
            return MAX_WAIT;
        }
        secs_to_duration((self.need(cost) - self.level) / self.rate)
    }

    fn until_full(&self) -> Duration {
        if self.level >= self.capacity {
            Duration::ZERO
        } else if self.blocked() {
            MAX_WAIT
        } else {
            secs_to_duration((self.capacity - self.level) / self.rate)
        }
    }

    /// Whole tokens available (0 in deficit); the small bias absorbs float residue like 0.9999999.
    fn remaining(&self) -> f64 {
        (self.level + 1e-6).floor().max(0.0)
    }

    fn full_after(&self, secs: f64) -> bool {
        self.level + self.rate * secs >= self.capacity
    }

    /// Level after `secs` more seconds of refill, without changing the bucket.
    fn level_after(&self, secs: f64) -> f64 {
        let mut bucket = *self;
        bucket.refill(secs);
        bucket.level
    }

    /// A changed limit keeps the current level (a raised limit does not hand out a fresh burst),
    /// clamped to the new capacity.
    fn reconfigure(&mut self, capacity: f64, rate: f64) {
        self.capacity = capacity;
        self.rate = rate;
        self.level = self.level.min(capacity);
    }
}

fn secs_to_duration(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else if secs >= MAX_WAIT.as_secs_f64() {
        MAX_WAIT
    } else {
        Duration::from_nanos((secs * 1e9).round() as u64)
    }
}

/// (capacity, rate per second) of the request bucket.
pub(super) fn request_params(spec: &LimitSpec) -> Option<(f64, f64)> {
    spec.tps
        .map(|tps| (f64::from(spec.burst.unwrap_or(tps)), f64::from(tps)))
}

/// (capacity, rate per second) of the token bucket.
pub(super) fn token_params(spec: &LimitSpec) -> Option<(f64, f64)> {
    spec.tpm.map(|tpm| (tpm as f64, tpm as f64 / 60.0))
}

fn reconcile(slot: &mut Option<Bucket>, params: Option<(f64, f64)>) {
    *slot = match (slot.take(), params) {
        (Some(mut bucket), Some((capacity, rate))) => {
            bucket.reconfigure(capacity, rate);
            Some(bucket)
        }
        // A limit that was off starts with a full bucket, like a new assignment.
        (None, Some((capacity, rate))) => Some(Bucket::full(capacity, rate)),
        (_, None) => None,
    };
}

/// The levels of an assignment's buckets (tokens; negative while in deficit). `None` for a bucket
/// that is not limited, or (in [`LocalLimiter::set_levels`]) not to be changed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BucketLevels {
    pub requests: Option<f64>,
    pub tokens: Option<f64>,
}

/// The state of one assignment.
struct Entry {
    /// Shared with reservations, so that acquiring never allocates once the entry exists.
    key: Arc<str>,
    /// The spec the buckets were built for; compared on each acquire to pick up admin changes.
    spec: LimitSpec,
    /// Last time the buckets were refilled.
    touched: Duration,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl Entry {
    fn new(key: Arc<str>, spec: &LimitSpec, now: Duration) -> Self {
        let full = |(capacity, rate)| Bucket::full(capacity, rate);
        Self {
            key,
            spec: *spec,
            touched: now,
            requests: request_params(spec).map(full),
            tokens: token_params(spec).map(full),
        }
    }

    fn advance(&mut self, now: Duration) {
        let secs = now.saturating_sub(self.touched).as_secs_f64();
        if let Some(bucket) = &mut self.requests {
            bucket.refill(secs);
        }
        if let Some(bucket) = &mut self.tokens {
            bucket.refill(secs);
        }
        self.touched = self.touched.max(now);
    }

    /// Overwrites the levels given (clamped to the capacity; a deficit is kept).
    fn set_levels(&mut self, levels: BucketLevels) {
        let set = |bucket: &mut Option<Bucket>, level: Option<f64>| {
            if let (Some(bucket), Some(level)) = (bucket, level)
                && !level.is_nan()
            {
                bucket.level = level.min(bucket.capacity);
            }
        };
        set(&mut self.requests, levels.requests);
        set(&mut self.tokens, levels.tokens);
    }

    fn apply_spec(&mut self, spec: &LimitSpec) {
        if self.spec != *spec {
            reconcile(&mut self.requests, request_params(spec));
            reconcile(&mut self.tokens, token_params(spec));
            self.spec = *spec;
        }
    }

    /// Idle long enough, and indistinguishable from a fresh (full) entry, so dropping it changes
    /// nothing — an entry still in deficit is kept until it has paid it back.
    fn evictable(&self, now: Duration, idle_timeout: Duration) -> bool {
        let idle = now.saturating_sub(self.touched);
        let secs = idle.as_secs_f64();
        idle > idle_timeout
            && self.requests.is_none_or(|b| b.full_after(secs))
            && self.tokens.is_none_or(|b| b.full_after(secs))
    }

    /// The core of `acquire`, on an entry already refilled to `now` with the current spec.
    fn decide(&mut self, estimated_tokens: u64) -> (Decision, Option<Reservation>) {
        let cost = estimated_tokens as f64;
        let allowed = self.requests.is_none_or(|b| b.admits(1.0))
            && self.tokens.is_none_or(|b| b.admits(cost));
        let retry_after = if allowed {
            if let Some(bucket) = &mut self.requests {
                bucket.level -= 1.0;
            }
            if let Some(bucket) = &mut self.tokens {
                bucket.level -= cost;
            }
            None
        } else {
            // Nothing is taken; the wait is the slower of the two buckets.
            let requests = self.requests.map(|b| b.wait(1.0)).unwrap_or_default();
            let tokens = self.tokens.map(|b| b.wait(cost)).unwrap_or_default();
            Some(requests.max(tokens))
        };
        let decision = Decision {
            allowed,
            limit_requests: self
                .spec
                .request_capacity()
                .filter(|_| self.requests.is_some()),
            remaining_requests: self.requests.map(|b| b.remaining() as u32),
            reset_requests: self.requests.map(|b| b.until_full()),
            limit_tokens: self.spec.tpm.filter(|_| self.tokens.is_some()),
            remaining_tokens: self.tokens.map(|b| b.remaining() as u64),
            reset_tokens: self.tokens.map(|b| b.until_full()),
            retry_after,
        };
        let reservation = match (allowed, self.spec.tpm) {
            (true, Some(tpm)) => Some(Reservation::new(
                Arc::clone(&self.key),
                tpm,
                estimated_tokens,
            )),
            _ => None,
        };
        (decision, reservation)
    }
}

struct Shard {
    map: HashMap<Arc<str>, Entry>,
    last_sweep: Duration,
}

impl Shard {
    /// Drops idle entries at most once per `every`, so the cost is one pass over this shard per
    /// interval, paid by a request that hits it anyway.
    fn maybe_sweep(&mut self, now: Duration, idle_timeout: Duration, every: Duration) {
        if now.saturating_sub(self.last_sweep) < every {
            return;
        }
        self.last_sweep = now;
        let before = self.map.len();
        self.map.retain(|_, e| !e.evictable(now, idle_timeout));
        // `retain` keeps the allocation; give it back after a spike of keys has gone away.
        if self.map.len() < self.map.capacity() / 4 {
            self.map.shrink_to_fit();
        }
        if self.map.len() < before {
            tracing::debug!(
                evicted = before - self.map.len(),
                left = self.map.len(),
                "idle rate-limit buckets evicted"
            );
        }
    }
}

/// Keeps shards on separate cache lines so that two cores using neighbouring shards do not
/// invalidate each other's lines.
#[repr(align(128))]
struct Padded(Mutex<Shard>);

/// In-process token-bucket limiter keyed by assignment id. See the module docs.
pub struct LocalLimiter<C: Clock = MonotonicClock> {
    clock: C,
    /// Picks the shard; separate from the maps' own hashers so that keys of one shard still spread
    /// over that map's slots.
    shard_hasher: RandomState,
    shards: Box<[Padded]>,
    idle_timeout: Duration,
    sweep_every: Duration,
}

impl LocalLimiter<MonotonicClock> {
    /// A limiter on the real monotonic clock.
    pub fn new() -> Self {
        Self::with_clock(MonotonicClock::new())
    }
}

impl Default for LocalLimiter<MonotonicClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clock> fmt::Debug for LocalLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("shards", &self.shards.len())
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<C: Clock> LocalLimiter<C> {
    /// A limiter reading time from `clock` (a [`crate::clock::ManualClock`] in tests).
    pub fn with_clock(clock: C) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Padded(Mutex::new(Shard {
                    map: HashMap::new(),
                    last_sweep: Duration::ZERO,
                }))
            })
            .collect();
        Self {
            clock,
            shard_hasher: RandomState::new(),
            shards,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            sweep_every: DEFAULT_IDLE_TIMEOUT / 5,
        }
    }

    /// Drops buckets untouched for longer than `idle` (default 5 minutes) once they are full again;
    /// each shard is swept at most every `idle / 5`.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self.sweep_every = idle / 5;
        self
    }

    /// The clock the limiter reads.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Number of assignments with live buckets (for a gauge; locks each shard in turn).
    pub fn bucket_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let index = (self.shard_hasher.hash_one(key) as usize) % self.shards.len();
        // The state is plain numbers, valid after any panic, so a poisoned lock is still usable.
        self.shards[index]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// [`RateLimiter::acquire`], synchronously (the decision never waits for anything).
    pub fn acquire_sync(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
    ) -> (Decision, Option<Reservation>) {
        // Unlimited assignments skip the map entirely. A bucket left from an earlier spec stays
        // until swept, and is reconfigured if a limit comes back before that.
        if spec.is_unlimited() {
            return (Decision::UNLIMITED, None);
        }
        let now = self.clock.now();
        let mut shard = self.shard(key);
        shard.maybe_sweep(now, self.idle_timeout, self.sweep_every);
        if let Some(entry) = shard.map.get_mut(key) {
            entry.advance(now);
            entry.apply_spec(spec);
            entry.decide(estimated_tokens)
        } else {
            // First request of this assignment (or first since eviction): the only allocation.
            let mut entry = Entry::new(Arc::from(key), spec, now);
            let answer = entry.decide(estimated_tokens);
            shard.map.insert(Arc::clone(&entry.key), entry);
            answer
        }
    }

    /// The current levels of `key`'s buckets (refilled to now), or `None` when this limiter holds
    /// no buckets for it (never used, or evicted: full). Takes nothing.
    pub fn levels(&self, key: &str) -> Option<BucketLevels> {
        let now = self.clock.now();
        let shard = self.shard(key);
        let entry = shard.map.get(key)?;
        let secs = now.saturating_sub(entry.touched).as_secs_f64();
        Some(BucketLevels {
            requests: entry.requests.map(|b| b.level_after(secs)),
            tokens: entry.tokens.map(|b| b.level_after(secs)),
        })
    }

    /// Sets the levels of `key`'s buckets for `spec` (created if missing), clamped to their
    /// capacity: the Redis limiter keeps its fallback buckets at this data plane's share of the
    /// shared ones this way, so that a switch to them hands out no fresh burst. Allocates only
    /// the first time a key is seen (or after its eviction), like [`Self::acquire_sync`].
    pub fn set_levels(&self, key: &str, spec: &LimitSpec, levels: BucketLevels) {
        if spec.is_unlimited() {
            return;
        }
        let now = self.clock.now();
        let mut shard = self.shard(key);
        shard.maybe_sweep(now, self.idle_timeout, self.sweep_every);
        if let Some(entry) = shard.map.get_mut(key) {
            entry.advance(now);
            entry.apply_spec(spec);
            entry.set_levels(levels);
        } else {
            let mut entry = Entry::new(Arc::from(key), spec, now);
            entry.set_levels(levels);
            shard.map.insert(Arc::clone(&entry.key), entry);
        }
    }

    /// [`RateLimiter::settle`], synchronously. A reservation whose bucket has meanwhile been
    /// evicted (a stream outliving the idle timeout with no other traffic) or whose TPM limit was
    /// removed is dropped: the fresh bucket is full and there is nothing left to correct.
    pub fn settle_sync(&self, reservation: Reservation, actual_tokens: u64) {
        let now = self.clock.now();
        let mut shard = self.shard(reservation.key());
        if let Some(entry) = shard.map.get_mut(reservation.key()) {
            entry.advance(now);
            if let Some(bucket) = &mut entry.tokens {
                let refund = reservation.reserved_tokens() as f64 - actual_tokens as f64;
                bucket.level = (bucket.level + refund).min(bucket.capacity);
            }
        }
    }
}

impl<C: Clock> RateLimiter for LocalLimiter<C> {
    fn acquire(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
    ) -> impl Future<Output = (Decision, Option<Reservation>)> + Send {
        // Decided right away; `Ready` neither allocates nor holds the shard lock.
        ready(self.acquire_sync(key, spec, estimated_tokens))
    }

    fn settle(
        &self,
        reservation: Reservation,
        actual_tokens: u64,
    ) -> impl Future<Output = ()> + Send {
        self.settle_sync(reservation, actual_tokens);
        ready(())
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

    const MS: Duration = Duration::from_millis(1);

    fn limiter() -> (Arc<ManualClock>, LocalLimiter<Arc<ManualClock>>) {
        let clock = Arc::new(ManualClock::new());
        (Arc::clone(&clock), LocalLimiter::with_clock(clock))
    }

    fn rps(tps: u32, burst: Option<u32>) -> LimitSpec {
        LimitSpec {
            tps: Some(tps),
            burst,
            tpm: None,
        }
    }

    fn tpm(tpm: u64) -> LimitSpec {
        LimitSpec {
            tpm: Some(tpm),
            ..LimitSpec::UNLIMITED
        }
    }

    fn allowed(l: &LocalLimiter<Arc<ManualClock>>, key: &str, spec: &LimitSpec) -> bool {
        l.acquire_sync(key, spec, 0).0.allowed
    }

    /// Admits requests until the first denial; returns how many passed.
    fn drain(l: &LocalLimiter<Arc<ManualClock>>, key: &str, spec: &LimitSpec) -> usize {
        (0..100_000).take_while(|_| allowed(l, key, spec)).count()
    }

    #[test]
    fn rps_refills_with_time() {
        let (clock, l) = limiter();
        let spec = rps(10, None);
        assert_eq!(drain(&l, "a", &spec), 10);
        clock.advance(100 * MS);
        assert_eq!(drain(&l, "a", &spec), 1);
        clock.advance(50 * MS);
        assert!(!allowed(&l, "a", &spec));
        clock.advance(50 * MS);
        assert!(allowed(&l, "a", &spec));
        // A long pause refills only up to the capacity.
        clock.advance(Duration::from_secs(60));
        assert_eq!(drain(&l, "a", &spec), 10);
    }

    #[test]
    fn burst_is_the_capacity() {
        let (clock, l) = limiter();
        let spec = rps(1, Some(5));
        let remaining: Vec<_> = (0..5)
            .map(|_| {
                let (d, r) = l.acquire_sync("k", &spec, 0);
                assert!(d.allowed && r.is_none());
                assert_eq!(d.limit_requests, Some(5));
                d.remaining_requests.unwrap()
            })
            .collect();
        assert_eq!(remaining, [4, 3, 2, 1, 0]);
        let (d, _) = l.acquire_sync("k", &spec, 0);
        assert!(!d.allowed);
        assert_eq!(d.reset_requests, Some(Duration::from_secs(5)));
        // Refill is tps (1/s), not burst.
        clock.advance(Duration::from_secs(2));
        assert_eq!(drain(&l, "k", &spec), 2);
    }

    #[test]
    fn allowed_decision_reports_remaining_and_reset() {
        let (_clock, l) = limiter();
        let spec = LimitSpec {
            tps: Some(10),
            burst: None,
            tpm: Some(6000),
        };
        let (d, r) = l.acquire_sync("k", &spec, 1000);
        assert_eq!(
            d,
            Decision {
                allowed: true,
                limit_requests: Some(10),
                remaining_requests: Some(9),
                reset_requests: Some(100 * MS),
                limit_tokens: Some(6000),
                remaining_tokens: Some(5000),
                reset_tokens: Some(Duration::from_secs(10)),
                retry_after: None,
            }
        );
        let r = r.unwrap();
        assert_eq!((r.key(), r.tpm(), r.reserved_tokens()), ("k", 6000, 1000));
    }

    #[test]
    fn denial_takes_nothing() {
        let (clock, l) = limiter();
        let spec = rps(1, None);
        assert!(allowed(&l, "k", &spec));
        for _ in 0..50 {
            assert!(!allowed(&l, "k", &spec));
        }
        // Had the denials consumed, the bucket would be deep in deficit.
        clock.advance(Duration::from_secs(1));
        assert!(allowed(&l, "k", &spec));

        // A TPM denial does not take the request either.
        let spec = LimitSpec {
            tps: Some(1),
            burst: Some(2),
            tpm: Some(100),
        };
        let (d, r) = l.acquire_sync("t", &spec, 80);
        assert!(d.allowed && r.is_some());
        let (d, r) = l.acquire_sync("t", &spec, 80);
        assert!(!d.allowed && r.is_none());
        assert_eq!(d.remaining_requests, Some(1));
        assert_eq!(d.remaining_tokens, Some(20));
        let (d, _) = l.acquire_sync("t", &spec, 10);
        assert!(d.allowed, "the request slot was not taken by the denial");
        assert_eq!(d.remaining_requests, Some(0));
        assert_eq!(d.remaining_tokens, Some(10));
    }

    #[test]
    fn retry_after_is_the_time_until_the_request_fits() {
        let (clock, l) = limiter();
        let spec = rps(10, Some(1));
        assert!(allowed(&l, "k", &spec));
        let (d, _) = l.acquire_sync("k", &spec, 0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(100 * MS));
        clock.advance(99 * MS);
        let (d, _) = l.acquire_sync("k", &spec, 0);
        assert_eq!(d.retry_after, Some(MS));
        clock.advance(MS);
        assert!(allowed(&l, "k", &spec));

        // Tokens: tpm 600 = 10 tokens/s.
        let spec = tpm(600);
        assert!(l.acquire_sync("t", &spec, 600).0.allowed);
        let (d, r) = l.acquire_sync("t", &spec, 100);
        assert!(!d.allowed && r.is_none());
        assert_eq!(d.retry_after, Some(Duration::from_secs(10)));
        assert_eq!(d.limit_requests, None);
        clock.advance(Duration::from_secs(10) - MS);
        assert!(!l.acquire_sync("t", &spec, 100).0.allowed);
        clock.advance(MS);
        assert!(l.acquire_sync("t", &spec, 100).0.allowed);

        // Both limited: the slower bucket decides.
        let spec = LimitSpec {
            tps: Some(1),
            burst: None,
            tpm: Some(60),
        };
        assert!(l.acquire_sync("b", &spec, 30).0.allowed);
        let (d, _) = l.acquire_sync("b", &spec, 60);
        assert_eq!(d.retry_after, Some(Duration::from_secs(30)));
    }

    #[test]
    fn settle_with_less_returns_tokens() {
        let (_clock, l) = limiter();
        let spec = tpm(1000);
        let (d, r) = l.acquire_sync("k", &spec, 500);
        assert_eq!(d.remaining_tokens, Some(500));
        l.settle_sync(r.unwrap(), 100);
        let (d, r) = l.acquire_sync("k", &spec, 0);
        assert_eq!(d.remaining_tokens, Some(900));
        // Returned tokens never overfill the bucket.
        l.settle_sync(r.unwrap(), 0);
        let (d, r) = l.acquire_sync("k", &spec, 900);
        assert_eq!(d.remaining_tokens, Some(0));
        l.settle_sync(
            Reservation::new(Arc::clone(r.as_ref().unwrap().key_arc()), 1000, 5000),
            0,
        );
        let (d, _) = l.acquire_sync("k", &spec, 0);
        assert_eq!(d.remaining_tokens, Some(1000));
    }

    #[test]
    fn settle_with_more_goes_negative_and_delays_later_calls() {
        let (clock, l) = limiter();
        // 1000 tokens per minute.
        let spec = tpm(1000);
        let (_, r) = l.acquire_sync("k", &spec, 500);
        l.settle_sync(r.unwrap(), 1500); // level 1000 - 1500 = -500
        let (d, r) = l.acquire_sync("k", &spec, 0);
        assert!(!d.allowed && r.is_none());
        assert_eq!(d.remaining_tokens, Some(0));
        // 500 tokens of deficit at 1000/60 per second.
        assert_eq!(d.retry_after, Some(Duration::from_secs(30)));
        let (d, _) = l.acquire_sync("k", &spec, 100);
        assert_eq!(d.retry_after, Some(Duration::from_secs(36)));
        clock.advance(Duration::from_secs(30) - MS);
        assert!(!l.acquire_sync("k", &spec, 0).0.allowed);
        clock.advance(MS);
        assert!(l.acquire_sync("k", &spec, 0).0.allowed);
        assert!(!l.acquire_sync("k", &spec, 100).0.allowed);
        clock.advance(Duration::from_secs(6));
        assert!(l.acquire_sync("k", &spec, 100).0.allowed);
    }

    #[test]
    fn estimate_above_capacity_passes_only_on_a_full_bucket() {
        let (clock, l) = limiter();
        let spec = tpm(60); // 1 token/s
        let (d, r) = l.acquire_sync("k", &spec, 1);
        assert!(d.allowed);
        l.settle_sync(r.unwrap(), 1);
        // 59 of 60: an over-capacity request waits for the bucket to be full...
        let (d, _) = l.acquire_sync("k", &spec, 500);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_secs(1)));
        clock.advance(Duration::from_secs(1));
        // ...then passes, leaving a deficit of 440 tokens that later calls pay for.
        let (d, r) = l.acquire_sync("k", &spec, 500);
        assert!(d.allowed && r.is_some());
        assert_eq!(d.remaining_tokens, Some(0));
        assert_eq!(d.reset_tokens, Some(Duration::from_secs(500)));
        let (d, _) = l.acquire_sync("k", &spec, 0);
        assert_eq!(d.retry_after, Some(Duration::from_secs(440)));
    }

    #[test]
    fn spec_change_applies_on_next_acquire() {
        let (clock, l) = limiter();
        assert_eq!(drain(&l, "k", &rps(10, None)), 10);
        // Raised limit: the level is kept (empty), only the rate and capacity change.
        let faster = rps(100, None);
        let (d, _) = l.acquire_sync("k", &faster, 0);
        assert!(!d.allowed);
        assert_eq!(d.limit_requests, Some(100));
        assert_eq!(d.retry_after, Some(10 * MS));
        clock.advance(Duration::from_secs(1));
        assert_eq!(drain(&l, "k", &faster), 100);

        // Lowered limit: a full bucket is clamped to the new capacity.
        clock.advance(Duration::from_secs(1));
        let slower = rps(5, None);
        assert_eq!(drain(&l, "k", &slower), 5);
        clock.advance(Duration::from_secs(1));
        assert_eq!(drain(&l, "k", &rps(5, Some(2))), 2);

        // A TPM limit added later starts full; removed, it no longer limits.
        let with_tpm = LimitSpec {
            tpm: Some(100),
            ..rps(5, Some(2))
        };
        clock.advance(Duration::from_secs(1));
        let (d, r) = l.acquire_sync("k", &with_tpm, 100);
        assert!(d.allowed && r.is_some());
        assert_eq!(d.limit_tokens, Some(100));
        let (d, r) = l.acquire_sync("k", &rps(5, Some(2)), 1_000_000);
        assert!(d.allowed && r.is_none());
        assert_eq!(d.limit_tokens, None);

        // Unlimited now, limited again later: the old level is reused, refilled by time.
        assert!(l.acquire_sync("k", &LimitSpec::UNLIMITED, 0).0.allowed);
        clock.advance(Duration::from_secs(1));
        assert_eq!(drain(&l, "k", &rps(5, Some(2))), 2);
    }

    #[test]
    fn unlimited_always_allows_without_headers() {
        let (_clock, l) = limiter();
        let burst_only = LimitSpec {
            burst: Some(1),
            ..LimitSpec::UNLIMITED
        };
        for spec in [LimitSpec::UNLIMITED, burst_only] {
            for _ in 0..1000 {
                let (d, r) = l.acquire_sync("k", &spec, u64::MAX);
                assert_eq!(d, Decision::UNLIMITED);
                assert!(r.is_none());
                assert!(d.headers().is_empty());
            }
        }
        assert_eq!(l.bucket_count(), 0, "unlimited keys create no buckets");
    }

    #[test]
    fn denial_headers_from_a_real_decision() {
        let (_clock, l) = limiter();
        let spec = rps(2, Some(1));
        assert!(allowed(&l, "k", &spec));
        let (d, _) = l.acquire_sync("k", &spec, 0);
        let headers: Vec<_> = d
            .headers()
            .into_iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(
            headers,
            [
                "x-ratelimit-limit-requests: 1",
                "x-ratelimit-remaining-requests: 0",
                "x-ratelimit-reset-requests: 500ms",
                "retry-after: 1",
                "retry-after-ms: 500",
            ]
        );
    }

    #[test]
    fn zero_limits_deny_without_panicking() {
        let (clock, l) = limiter();
        for spec in [rps(0, None), rps(5, Some(0)), tpm(0)] {
            let (d, r) = l.acquire_sync("z", &spec, 1);
            assert!(!d.allowed && r.is_none());
            assert_eq!(d.retry_after, Some(MAX_WAIT));
            clock.advance(Duration::from_secs(10_000));
            assert!(!l.acquire_sync("z", &spec, 1).0.allowed);
        }
    }

    #[test]
    fn many_keys_spread_over_shards() {
        let (_clock, l) = limiter();
        let spec = rps(1, None);
        let keys: Vec<String> = (0..2000).map(|i| format!("asg-{i:08x}")).collect();
        for key in &keys {
            assert!(allowed(&l, key, &spec));
        }
        // Each key has its own bucket.
        for key in &keys {
            assert!(!allowed(&l, key, &spec));
        }
        assert_eq!(l.bucket_count(), keys.len());
        let sizes: Vec<usize> = l
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap().map.len())
            .collect();
        let expected = keys.len() / SHARDS;
        assert!(
            sizes.iter().all(|&n| n > expected / 2 && n < expected * 2),
            "uneven shards: {sizes:?}"
        );
    }

    #[test]
    fn concurrent_acquires_admit_exactly_the_capacity() {
        let (_clock, l) = limiter();
        let spec = rps(1, Some(1000));
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..500).filter(|_| allowed(&l, "hot", &spec)).count()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 1000);
    }

    #[test]
    fn idle_buckets_are_evicted_but_not_while_in_deficit() {
        let clock = Arc::new(ManualClock::new());
        let l =
            LocalLimiter::with_clock(Arc::clone(&clock)).with_idle_timeout(Duration::from_secs(60));
        let spec = rps(1, None);
        for i in 0..500 {
            assert!(allowed(&l, &format!("idle-{i}"), &spec));
        }
        // A bucket that used far more tokens than reserved: in deficit for 100 minutes.
        let (_, r) = l.acquire_sync("debtor", &tpm(60), 1);
        l.settle_sync(r.unwrap(), 6000);
        assert_eq!(l.bucket_count(), 501);

        clock.advance(Duration::from_secs(61));
        // Sweeps happen on use: touch every shard with a key of its own.
        let touch: Vec<String> = (0..1000).map(|i| format!("live-{i}")).collect();
        for key in &touch {
            l.acquire_sync(key, &spec, 0);
        }
        let live = touch.len();
        assert_eq!(l.bucket_count(), live + 1, "only the debtor survives");
        let (d, _) = l.acquire_sync("debtor", &tpm(60), 0);
        assert!(!d.allowed);
        assert_eq!(d.remaining_tokens, Some(0));

        // Evicted keys come back fresh (full).
        assert_eq!(drain(&l, "idle-7", &spec), 1);
    }

    #[test]
    fn settle_after_eviction_is_ignored() {
        let clock = Arc::new(ManualClock::new());
        let l =
            LocalLimiter::with_clock(Arc::clone(&clock)).with_idle_timeout(Duration::from_secs(60));
        let (_, r) = l.acquire_sync("k", &tpm(60), 10);
        clock.advance(Duration::from_secs(3600));
        // Sweep every shard.
        for i in 0..1000 {
            l.acquire_sync(&format!("x-{i}"), &rps(1, None), 0);
        }
        l.settle_sync(r.unwrap(), 10_000);
        let (d, _) = l.acquire_sync("k", &tpm(60), 0);
        assert_eq!(d.remaining_tokens, Some(60));
    }

    #[test]
    fn levels_can_be_read_and_set() {
        let (clock, l) = limiter();
        let spec = LimitSpec {
            tps: Some(10),
            burst: Some(20),
            tpm: Some(600), // 10 tokens/s
        };
        assert_eq!(l.levels("k"), None, "unknown key");
        let set = BucketLevels {
            requests: Some(3.0),
            tokens: Some(-50.0),
        };
        l.set_levels("k", &spec, set);
        assert_eq!(l.levels("k"), Some(set));
        // Reading refills by time but takes nothing and changes nothing.
        clock.advance(Duration::from_secs(1));
        let levels = l.levels("k").unwrap();
        assert_eq!(levels.requests, Some(13.0));
        assert!((levels.tokens.unwrap() + 40.0).abs() < 1e-9, "{levels:?}");
        assert_eq!(l.levels("k"), Some(levels));
        // Decisions continue from the levels set: the token deficit holds requests back 4 s...
        let (d, _) = l.acquire_sync("k", &spec, 0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_secs(4)));
        // ...and the request bucket admits 13, not a full burst of 20.
        clock.advance(Duration::from_secs(4));
        l.set_levels(
            "k",
            &spec,
            BucketLevels {
                requests: Some(13.0),
                tokens: None, // left alone
            },
        );
        assert!(l.levels("k").unwrap().tokens.unwrap().abs() < 1e-9);
        assert_eq!((0..100).take_while(|_| allowed(&l, "k", &spec)).count(), 13);

        // Levels are clamped to the capacity; a deficit is kept.
        l.set_levels(
            "k",
            &spec,
            BucketLevels {
                requests: Some(1e9),
                tokens: Some(-1e9),
            },
        );
        assert_eq!(
            l.levels("k"),
            Some(BucketLevels {
                requests: Some(20.0),
                tokens: Some(-1e9)
            })
        );
        // Only the limits of the spec have buckets; an unlimited spec creates nothing.
        l.set_levels("r", &rps(5, None), set);
        assert_eq!(
            l.levels("r"),
            Some(BucketLevels {
                requests: Some(3.0),
                tokens: None
            })
        );
        l.set_levels("u", &LimitSpec::UNLIMITED, set);
        assert_eq!(l.levels("u"), None);
    }

    async fn through_trait<L: RateLimiter>(l: &L, spec: &LimitSpec) -> (bool, bool) {
        let (first, reservation) = l.acquire("k", spec, 10).await;
        if let Some(r) = reservation {
            l.settle(r, 5).await;
        }
        let (second, _) = l.acquire("k", spec, 10).await;
        (first.allowed, second.allowed)
    }

    #[tokio::test]
    async fn works_through_the_async_trait_and_arc() {
        let (_clock, l) = limiter();
        let l = Arc::new(l);
        let spec = LimitSpec {
            tps: Some(1),
            burst: None,
            tpm: Some(1000),
        };
        assert_eq!(through_trait(&l, &spec).await, (true, false));
        let spawned = tokio::spawn({
            let l = Arc::clone(&l);
            async move { l.acquire("other", &spec, 1).await.0.allowed }
        });
        assert!(spawned.await.unwrap());
    }
}
