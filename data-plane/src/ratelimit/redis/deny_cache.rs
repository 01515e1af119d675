//! The deny cache: a Redis denial is remembered per assignment until its retry time, so a client
//! hammering a limited assignment costs no Redis round trip.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::AcquireReply;
use crate::ratelimit::{Decision, LimitSpec};

const DENY_SHARDS: usize = 16;

/// A remembered Redis denial of one assignment.
struct DenyEntry {
    spec: LimitSpec,
    /// Until then the request bucket cannot admit any request.
    requests_until: Option<Instant>,
    /// Until then the token bucket cannot admit `tokens_cost` tokens (or more).
    tokens_until: Option<Instant>,
    tokens_cost: u64,
    decision: Decision,
    at: Instant,
}

impl DenyEntry {
    fn expired(&self, now: Instant) -> bool {
        self.requests_until.is_none_or(|t| t <= now) && self.tokens_until.is_none_or(|t| t <= now)
    }
}

type DenyShard = HashMap<Box<str>, DenyEntry>;

/// Per-assignment deny-until cache, sharded like `LocalLimiter` so lookups rarely contend.
pub(super) struct DenyCache {
    hasher: RandomState,
    shards: Box<[Mutex<DenyShard>]>,
    per_shard: usize,
}

impl DenyCache {
    pub(super) fn new(capacity: usize) -> Self {
        let shards = if capacity == 0 { 0 } else { DENY_SHARDS };
        Self {
            hasher: RandomState::new(),
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(DENY_SHARDS),
        }
    }

    fn shard(&self, key: &str) -> Option<MutexGuard<'_, DenyShard>> {
        if self.shards.is_empty() {
            return None;
        }
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        // Plain data, valid after any panic: a poisoned lock is still usable.
        Some(
            self.shards[index]
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// A denial still in force for this spec and estimate: the request bucket is still empty, or
    /// the token bucket cannot yet admit an estimate at least as large as the one denied (a
    /// smaller one might pass, so it goes to Redis).
    pub(super) fn lookup(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
    ) -> Option<Decision> {
        let mut shard = self.shard(key)?;
        let entry = shard.get(key)?;
        if entry.spec != *spec {
            return None;
        }
        let now = Instant::now();
        let left = |until: Option<Instant>| {
            until
                .map(|t| t.saturating_duration_since(now))
                .filter(|d| !d.is_zero())
        };
        let requests = left(entry.requests_until);
        let tokens = left(entry.tokens_until).filter(|_| estimated_tokens >= entry.tokens_cost);
        let Some(wait) = requests.max(tokens) else {
            if entry.expired(now) {
                shard.remove(key);
            }
            return None;
        };
        let elapsed = now.saturating_duration_since(entry.at);
        let d = &entry.decision;
        Some(Decision {
            retry_after: Some(wait),
            reset_requests: d.reset_requests.map(|r| r.saturating_sub(elapsed)),
            reset_tokens: d.reset_tokens.map(|r| r.saturating_sub(elapsed)),
            ..d.clone()
        })
    }

    pub(super) fn insert(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
        sent_at: Instant,
        reply: &AcquireReply,
        decision: &Decision,
    ) {
        let until = |us: u64| (us > 0).then(|| sent_at + Duration::from_micros(us));
        let entry = DenyEntry {
            spec: *spec,
            requests_until: until(reply.wait_requests_us),
            tokens_until: until(reply.wait_tokens_us),
            tokens_cost: estimated_tokens,
            decision: decision.clone(),
            at: sent_at,
        };
        let Some(mut shard) = self.shard(key) else {
            return;
        };
        if let Some(slot) = shard.get_mut(key) {
            *slot = entry;
            return;
        }
        if shard.len() >= self.per_shard {
            let now = Instant::now();
            shard.retain(|_, e| !e.expired(now));
            if shard.len() >= self.per_shard {
                // Full of live denials: skip, the cache is only a shortcut.
                return;
            }
        }
        shard.insert(Box::from(key), entry);
    }

    pub(super) fn remove(&self, key: &str) {
        if let Some(mut shard) = self.shard(key) {
            shard.remove(key);
        }
    }
}
