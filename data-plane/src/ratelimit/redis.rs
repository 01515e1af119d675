//! Redis-backed rate limiter (DESIGN §8 "Rate limiting"): the buckets of an assignment live in
//! Redis so that every data plane enforces one shared limit.
//!
//! Each [`RateLimiter::acquire`] is one `EVALSHA` of [`ACQUIRE_LUA`], which reads Redis `TIME`
//! (never the pod's clock), refills and charges the request bucket (`llmproxy:{asg-…}:rps`) and the
//! token bucket (`llmproxy:{asg-…}:tpm`) atomically, writes nothing on a denial, and sets TTLs so
//! idle keys go away. [`RateLimiter::settle`] is one `EVALSHA` of [`SETTLE_LUA`] that adds back
//! `reserved − actual` tokens (skipped when they are equal). The arithmetic is that of
//! [`LocalLimiter`] — continuous buckets starting full, over-capacity estimates admitted only by a
//! full bucket, denials take nothing — at Redis' microsecond resolution.
//!
//! Redis is kept off the critical path when it misbehaves:
//! - every call has a time budget (default 5 ms); a late or failed call is answered by the fail
//!   mode ([`FailMode`]): an in-process [`LocalLimiter`] with the limits divided by the number of
//!   live data planes, "allow", or "deny as unavailable" ([`Decision::UNAVAILABLE`], a 503);
//! - a circuit breaker opens after a run of consecutive failures; while open, no request waits for
//!   Redis. After a cooldown a background probe (not a client request) checks Redis and closes it;
//! - a denial is remembered per assignment until its retry time, so a client hammering a limited
//!   assignment costs no Redis round trip (only for the same spec and a token estimate at least as
//!   large as the one denied).
//!
//! A busy assignment with a high request limit and no token limit takes a *lease* of several
//! request tokens per call ([`lease_size`]: at most 1/32 of the bucket, 50 ms of its rate, 1000
//! requests, and this data plane's demand for it in the last 100 ms) and answers the next
//! requests from it without Redis, for up to 100 ms; small, quiet or token-limited assignments
//! keep one call per request.
//!
//! Reservations record which backend issued them ([`TAG_REDIS`] / [`TAG_LOCAL`]), so a settle goes
//! where the tokens were taken even if the mode switched in between.
//!
//! A flapping Redis hands out no fresh burst per switch:
//! - every Redis reply (its reset times give the shared levels exactly) sets this data plane's
//!   fallback buckets to its share of the shared ones (level / live data planes), so the `local`
//!   fail mode continues from there instead of starting full;
//! - every acquire tells Redis how far from full this data plane believes the buckets are (its
//!   fallback level × live data planes, as µs of refill), and the script creates a *missing*
//!   bucket at that level instead of full. A Redis restarted without persistence (or failed over
//!   to a replica that missed writes) thus resumes near the level the data planes knew. An
//!   existing bucket ignores the hint, and a data plane that knows nothing of an assignment (new,
//!   or idle until its buckets were full and evicted) still creates it full;
//! - breaker probes are due on a wall-clock grid (`Breaker`), so the data planes go back to
//!   Redis together: one still on its local share while the others are back would admit that
//!   share on top of the shared rate, for up to a cooldown if the clocks disagree.
//!
//! The levels cost two lookups in the fallback's sharded map per Redis call (no allocation once an
//! assignment has an entry) and two small script arguments.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{
    Client, ErrorKind, FromRedisValue, RedisError, RedisWrite, Script, ScriptInvocation,
    ToRedisArgs,
};
use arc_swap::ArcSwap;

use super::local::{request_params, token_params};
use super::{BucketLevels, Decision, LimitSpec, LocalLimiter, RateLimiter, Reservation, scaled};

/// [`Reservation::tag`] of tokens reserved in Redis.
pub const TAG_REDIS: u8 = 1;
/// [`Reservation::tag`] of tokens reserved by the in-process fallback (`local` fail mode).
pub const TAG_LOCAL: u8 = 2;

/// Common part of both scripts: Redis time, bucket load/refill/save. A bucket is a hash
/// `{tokens, ts, cap, rate}`: the level (negative while in deficit), the Redis time of the last
/// update in microseconds, and the capacity and rate (per second) it was last charged with, kept
/// so that the refill since then uses the old limits and a changed limit behaves like
/// `LocalLimiter`'s (level kept, clamped to the new capacity — no fresh burst on a raise).
const LUA_PRELUDE: &str = r#"
-- Redis < 5 replicates scripts verbatim and refuses writes after TIME; later versions replicate
-- effects anyway.
if redis.replicate_commands then redis.replicate_commands() end
local MAX_WAIT = 3600000000          -- µs; reported for zero limits and absurd deficits
local MAX_INT = 9007199254740992     -- 2^53: largest integer a Lua number holds exactly
local MAX_TTL = 315360000            -- 10 years
local TTL_MARGIN = 60                -- s beyond the time a bucket needs to be full again
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function us(secs)
  if secs ~= secs or secs <= 0 then return 0 end
  if secs >= 3600 then return MAX_WAIT end
  return math.floor(secs * 1000000 + 0.5)
end

-- keep: use the stored limits (settle), falling back to the given ones if absent.
-- short_us (acquire): a missing bucket is created this many µs of refill short of full, the level
-- the calling data plane knows of (absent or 0: full).
local function load_bucket(key, cap_s, rate_s, keep, short_us)
  local v = redis.call('HMGET', key, 'tokens', 'ts', 'cap', 'rate')
  if keep then
    cap_s = v[3] or cap_s
    rate_s = v[4] or rate_s
  end
  local b = {cap = tonumber(cap_s), rate = tonumber(rate_s), cap_s = cap_s, rate_s = rate_s, ts = now}
  local level = tonumber(v[1])
  if level == nil then
    b.level = b.cap
    local short = tonumber(short_us) or 0
    if short > 0 and b.rate > 0 then
      b.level = b.cap - b.rate * (math.min(short, MAX_WAIT) / 1000000)
    end
    b.fresh = true
    return b
  end
  local ts = tonumber(v[2]) or now
  local old_cap = tonumber(v[3]) or b.cap
  local old_rate = tonumber(v[4]) or b.rate
  if level < old_cap then
    level = math.min(old_cap, level + old_rate * (math.max(0, now - ts) / 1000000))
  end
  b.level = math.min(level, b.cap)
  b.ts = math.max(ts, now)
  return b
end

-- A missing key reads as a full bucket (unless the caller knows its level), so a key may expire
-- once it would be full again: the TTL covers a refill from empty (or from the deficit, if deeper)
-- plus a margin.
local function save(key, b)
  local ttl = TTL_MARGIN
  if b.rate > 0 then
    ttl = ttl + math.min(MAX_TTL, math.ceil(math.max(b.cap, b.cap - b.level) / b.rate))
  end
  redis.call('HSET', key, 'tokens', string.format('%.17g', b.level),
    'ts', string.format('%.17g', b.ts), 'cap', b.cap_s, 'rate', b.rate_s)
  redis.call('EXPIRE', key, ttl)
end
"#;

/// The acquire script (after `LUA_PRELUDE`).
///
/// `KEYS[1]`, `KEYS[2]`: request and token bucket. `ARGV[1]`, `ARGV[2]`: request capacity and rate
/// per second (`''` = requests not limited); `ARGV[3]`, `ARGV[4]`: token capacity and rate per
/// second (`''` = tokens not limited); `ARGV[5]`: estimated tokens; `ARGV[6]`: lease, the most
/// request tokens to take when admitted (absent = 1; see [`lease_size`]); `ARGV[7]`, `ARGV[8]`:
/// how many µs of refill the calling data plane believes the request and token buckets are short
/// of full (absent or 0 = full), used only to create a missing bucket at that level.
///
/// Returns 9 integers: `{allowed (1|0), remaining requests, reset requests µs, remaining tokens,
/// reset tokens µs, retry-after µs, request-bucket wait µs, token-bucket wait µs, request tokens
/// taken}` (0 for a bucket that is not limited; waits and retry-after 0 when allowed; retry-after =
/// max of the waits; tokens taken: between 1 and the lease when admitted, as many as the bucket
/// holds whole, else 0).
pub const ACQUIRE_LUA: &str = r#"
local SLACK = 1e-6   -- admission tolerates 1 µs of refill (the clock's resolution)
local function blocked(b) return not (b.cap > 0 and b.rate > 0) end
local function need(b, cost) return math.min(cost, b.cap) end
local function admits(b, cost)
  return (not blocked(b)) and b.level + b.rate * SLACK + 1e-9 >= need(b, cost)
end
local function wait(b, cost)
  if blocked(b) then return MAX_WAIT end
  return us((need(b, cost) - b.level) / b.rate)
end
local function until_full(b)
  if b.level >= b.cap then return 0 end
  if blocked(b) then return MAX_WAIT end
  return us((b.cap - b.level) / b.rate)
end
local function remaining(b)
  return math.min(MAX_INT, math.max(0, math.floor(b.level + 1e-6)))
end

local cost = tonumber(ARGV[5]) or 0
local req, tok
if ARGV[1] ~= '' then req = load_bucket(KEYS[1], ARGV[1], ARGV[2], false, ARGV[7]) end
if ARGV[3] ~= '' then tok = load_bucket(KEYS[2], ARGV[3], ARGV[4], false, ARGV[8]) end
local allowed = (req == nil or admits(req, 1)) and (tok == nil or admits(tok, cost))
local wait_req, wait_tok = 0, 0
local taken = 0
if allowed then
  if req then
    taken = 1
    local lease = tonumber(ARGV[6]) or 1
    if lease > 1 then taken = math.max(1, math.min(lease, math.floor(req.level + 1e-9))) end
    req.level = req.level - taken
    save(KEYS[1], req)
  end
  if tok then tok.level = tok.level - cost; save(KEYS[2], tok) end
else
  -- Nothing is written: a denial takes nothing and leaves TTLs alone.
  if req then wait_req = wait(req, 1) end
  if tok then wait_tok = wait(tok, cost) end
end
local out = {allowed and 1 or 0, 0, 0, 0, 0, math.max(wait_req, wait_tok), wait_req, wait_tok, taken}
if req then out[2] = remaining(req); out[3] = until_full(req) end
if tok then out[4] = remaining(tok); out[5] = until_full(tok) end
return out
"#;

/// The settle script (after `LUA_PRELUDE`).
///
/// `KEYS[1]`: token bucket. `ARGV[1]`: tokens to add back (`reserved − actual`, negative when the
/// call used more); `ARGV[2]`, `ARGV[3]`: capacity and rate at reservation time (used only if the
/// stored ones are missing). The balance may go negative; it is clamped to the capacity. A bucket
/// that has expired meanwhile is full and is left alone. Returns 1 if the bucket was updated.
pub const SETTLE_LUA: &str = r#"
local b = load_bucket(KEYS[1], ARGV[2], ARGV[3], true)
if b.fresh then return 0 end
b.level = math.min(b.level + tonumber(ARGV[1]), b.cap)
save(KEYS[1], b)
return 1
"#;

/// Redis keys of an assignment's request and token buckets. The assignment id is the hash tag
/// (`{…}`), so both keys of one script call live in the same Redis Cluster slot.
pub fn bucket_keys(assignment: &str) -> (String, String) {
    (
        format!("llmproxy:{{{assignment}}}:rps"),
        format!("llmproxy:{{{assignment}}}:tpm"),
    )
}

/// One key of [`bucket_keys`], written straight into a script call: one allocation (the
/// argument's own) instead of a formatted `String` that is then copied.
struct BucketKey<'a> {
    assignment: &'a str,
    /// `rps` or `tpm`.
    bucket: &'static str,
}

impl ToRedisArgs for BucketKey<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let parts = [
            b"llmproxy:{".as_slice(),
            self.assignment.as_bytes(),
            b"}:",
            self.bucket.as_bytes(),
        ];
        let mut buf = [0u8; 128];
        let mut len = 0;
        for part in parts {
            let Some(slot) = buf.get_mut(len..len + part.len()) else {
                // An id longer than any the control plane makes: format it.
                out.write_arg_fmt(format_args!(
                    "llmproxy:{{{}}}:{}",
                    self.assignment, self.bucket
                ));
                return;
            };
            slot.copy_from_slice(part);
            len += part.len();
        }
        out.write_arg(&buf[..len]);
    }
}

impl Decision {
    /// The limiter could not decide (Redis unavailable in the `closed` fail mode): the request is
    /// refused and the server answers 503, without rate-limit headers. Recognised by
    /// [`Decision::is_unavailable`]: a denial without `retry_after`, which a real limit never
    /// produces.
    pub const UNAVAILABLE: Self = Self {
        allowed: false,
        retry_after: None,
        ..Self::UNLIMITED
    };

    /// True for [`Decision::UNAVAILABLE`] (answer 503), false for an allowed request or a real
    /// rate-limit denial (429).
    pub fn is_unavailable(&self) -> bool {
        !self.allowed && self.retry_after.is_none()
    }
}

/// What to answer when Redis is slow, down, or the circuit breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// In-process buckets with every limit divided by the number of live data planes.
    #[default]
    Local,
    /// Allow everything.
    Open,
    /// Deny everything with [`Decision::UNAVAILABLE`] (503).
    Closed,
}

impl FromStr for FailMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "local" => Ok(Self::Local),
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            other => Err(format!(
                "unknown rate-limit fail mode `{other}` (expected local, open or closed)"
            )),
        }
    }
}

impl fmt::Display for FailMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Open => "open",
            Self::Closed => "closed",
        })
    }
}

/// Default time budget of one acquire, in milliseconds (`--ratelimit-redis-budget-ms`).
pub const DEFAULT_BUDGET_MS: u64 = 5;

/// Settings of a [`RedisLimiter`]. `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct RedisLimiterConfig {
    /// Answer used when Redis cannot (default `local`).
    pub fail_mode: FailMode,
    /// Time budget of one acquire round trip, reconnect retry included (default 5 ms).
    pub budget: Duration,
    /// Time budget of one settle (default 50 ms): it runs after the answer was sent, so it may wait
    /// longer, and a lost settle skews the bucket.
    pub settle_budget: Duration,
    /// Consecutive failures that open the circuit breaker (default 5; 0 counts as 1).
    pub breaker_threshold: u32,
    /// Time the breaker stays open before a background probe (default 1 s).
    pub breaker_cooldown: Duration,
    /// Time budget of a probe, and of the warm-up at construction (default 1 s).
    pub probe_timeout: Duration,
    /// TCP connect timeout of the Redis connection (default 1 s).
    pub connect_timeout: Duration,
    /// Assignments whose last denial is remembered (default 4096; 0 disables the cache).
    pub deny_cache_capacity: usize,
    /// How long leased request tokens stay usable, and the window in which an assignment's
    /// demand on this data plane is counted to size its next lease (default 100 ms; see
    /// [`lease_size`]).
    pub lease_ttl: Duration,
}

impl Default for RedisLimiterConfig {
    fn default() -> Self {
        Self {
            fail_mode: FailMode::Local,
            budget: Duration::from_millis(DEFAULT_BUDGET_MS),
            settle_budget: Duration::from_millis(50),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            deny_cache_capacity: 4096,
            lease_ttl: Duration::from_millis(100),
        }
    }
}

/// Counters since construction (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisLimiterStats {
    /// Script calls sent to Redis by `acquire` and `settle` (probes and warm-up excluded).
    pub redis_calls: u64,
    /// Calls that failed or ran over their budget (`llm_proxy_redis_errors_total`).
    pub redis_errors: u64,
    /// Denials answered from the local deny cache, without Redis.
    pub deny_cache_hits: u64,
    /// Acquires answered by the fail mode (Redis failed, or the breaker was open).
    pub fallback_decisions: u64,
    /// Acquires answered from a lease of request tokens taken earlier, without Redis.
    pub lease_hits: u64,
    /// Switches between Redis and the fail mode, either way.
    pub mode_switches: u64,
}

#[derive(Default)]
struct Counters {
    redis_calls: AtomicU64,
    redis_errors: AtomicU64,
    deny_cache_hits: AtomicU64,
    fallback_decisions: AtomicU64,
    lease_hits: AtomicU64,
    mode_switches: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Rate limiter with shared buckets in Redis. See the module docs. Cloning shares the state.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    manager_config: ConnectionManagerConfig,
    /// Replaced by a fresh manager when the breaker opens: a connection stuck on a silent peer
    /// would otherwise keep timing out, since only dropped connections are re-established.
    conn: ArcSwap<ConnectionManager>,
    acquire_script: Script,
    settle_script: Script,
    config: RedisLimiterConfig,
    breaker: Breaker,
    switch_log: SwitchLog,
    deny_cache: DenyCache,
    leases: Leases,
    fallback: LocalLimiter,
    live_data_planes: Box<dyn Fn() -> i64 + Send + Sync>,
    counters: Counters,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the client: its connection info may hold the Redis password.
        f.debug_struct("RedisLimiter")
            .field("config", &self.inner.config)
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// A limiter on the Redis at `url` (`redis://[:password@]host[:port][/db]`, `rediss://` is not
    /// built in). `live_data_planes` returns the number of live data planes (e.g.
    /// `move || handle.live_data_planes()`; 0 or less counts as 1); the `local` fail mode divides
    /// every limit by it.
    ///
    /// Does not wait for Redis: the connection is made in the background (and the scripts loaded),
    /// so a Redis that is down at start only means the fail mode answers until it is up. Must be
    /// called within a Tokio runtime. Fails on an invalid URL or outside a runtime.
    pub fn new(
        url: &str,
        config: RedisLimiterConfig,
        live_data_planes: impl Fn() -> i64 + Send + Sync + 'static,
    ) -> Result<Self, RedisError> {
        Self::with_client(Client::open(url)?, config, live_data_planes)
    }

    /// As [`Self::new`], with a client built by the caller (e.g. `rediss://` with a private CA:
    /// [`super::redis_client::client`]).
    pub fn with_client(
        client: Client,
        config: RedisLimiterConfig,
        live_data_planes: impl Fn() -> i64 + Send + Sync + 'static,
    ) -> Result<Self, RedisError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(RedisError::from((
                ErrorKind::Client,
                "the Redis rate limiter must be created within a Tokio runtime",
            )));
        }
        // The manager retries a failed reconnect once; longer outages are the breaker's business.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        let inner = Arc::new(Inner {
            client,
            manager_config,
            conn: ArcSwap::from_pointee(conn),
            acquire_script: Script::new(&format!("{LUA_PRELUDE}{ACQUIRE_LUA}")),
            settle_script: Script::new(&format!("{LUA_PRELUDE}{SETTLE_LUA}")),
            breaker: Breaker::new(config.breaker_threshold, config.breaker_cooldown),
            switch_log: SwitchLog::new(),
            deny_cache: DenyCache::new(config.deny_cache_capacity),
            leases: Leases::new(config.lease_ttl),
            fallback: LocalLimiter::new(),
            live_data_planes: Box::new(live_data_planes),
            counters: Counters::default(),
            config,
        });
        // Connect and load the scripts now, so the first requests find both ready.
        let warm = Arc::clone(&inner);
        #[allow(
            clippy::disallowed_methods,
            reason = "a one-shot warm-up bounded by the probe timeout; nothing waits for it, a failure only means the first request loads the scripts"
        )]
        tokio::spawn(async move {
            if let Err(reason) = warm.load_scripts().await {
                tracing::debug!(%reason, "Redis rate limiter warm-up failed; will retry on use");
            }
        });
        Ok(Self { inner })
    }

    /// The settings in force.
    pub fn config(&self) -> &RedisLimiterConfig {
        &self.inner.config
    }

    /// True while the circuit breaker is open (requests are answered by the fail mode).
    pub fn is_degraded(&self) -> bool {
        !self.inner.breaker.is_closed()
    }

    /// Counters since construction.
    pub fn stats(&self) -> RedisLimiterStats {
        let c = &self.inner.counters;
        RedisLimiterStats {
            redis_calls: c.redis_calls.load(Ordering::Relaxed),
            redis_errors: c.redis_errors.load(Ordering::Relaxed),
            deny_cache_hits: c.deny_cache_hits.load(Ordering::Relaxed),
            fallback_decisions: c.fallback_decisions.load(Ordering::Relaxed),
            lease_hits: c.lease_hits.load(Ordering::Relaxed),
            mode_switches: c.mode_switches.load(Ordering::Relaxed),
        }
    }

    async fn acquire_inner(
        &self,
        key: &str,
        spec: LimitSpec,
        estimated_tokens: u64,
    ) -> (Decision, Option<Reservation>) {
        // Same shortcut as LocalLimiter: nothing to count, no headers.
        if spec.is_unlimited() {
            return (Decision::UNLIMITED, None);
        }
        let inner = &*self.inner;
        if let Some(decision) = inner.deny_cache.lookup(key, &spec, estimated_tokens) {
            bump(&inner.counters.deny_cache_hits);
            return (decision, None);
        }
        match inner.breaker.gate() {
            Gate::Redis => {}
            Gate::Fallback => return inner.fallback(key, &spec, estimated_tokens),
            Gate::FallbackAndProbe => {
                spawn_probe(Arc::clone(&self.inner));
                return inner.fallback(key, &spec, estimated_tokens);
            }
        }
        let lease = match inner.leases.take(key, &spec, lease_size(&spec)) {
            Ok(decision) => {
                bump(&inner.counters.lease_hits);
                return (decision, None);
            }
            Err(lease) => lease,
        };

        let (share, live) = inner.share(&spec);
        let requests = request_params(&spec);
        let tokens = token_params(&spec);
        // What this data plane knows of the shared levels (its share, scaled up), for Redis to
        // create a missing bucket at instead of full.
        let known = inner.fallback.levels(key).unwrap_or_default();
        let short_of_full = |share_level: Option<f64>, params: Option<(f64, f64)>| {
            share_level
                .zip(params)
                .map_or(0, |(level, (capacity, rate))| {
                    micros_short_of_full(level * f64::from(live), capacity, rate)
                })
        };
        let mut invocation = inner.acquire_script.key(BucketKey {
            assignment: key,
            bucket: "rps",
        });
        invocation.key(BucketKey {
            assignment: key,
            bucket: "tpm",
        });
        match (spec.request_capacity(), spec.tps) {
            (Some(capacity), Some(tps)) => invocation.arg(capacity).arg(tps),
            _ => invocation.arg("").arg(""),
        };
        match spec.tpm {
            // The same f64 rate as LocalLimiter; Display round-trips exactly through Lua's tonumber.
            Some(tpm) => invocation.arg(tpm).arg((tpm as f64 / 60.0).to_string()),
            None => invocation.arg("").arg(""),
        };
        invocation
            .arg(estimated_tokens)
            .arg(lease)
            .arg(short_of_full(known.requests, requests))
            .arg(short_of_full(known.tokens, tokens));

        // Taken before sending: the script ran later, so "sent + wait" never outlasts the real
        // retry time, and the deny cache never refuses what Redis would admit.
        let sent_at = Instant::now();
        let reply = match inner
            .call::<Vec<i64>>(&invocation, inner.config.budget)
            .await
        {
            Ok(values) => match AcquireReply::parse(&values) {
                Some(reply) => reply,
                None => {
                    inner.failed(&format!("unexpected acquire reply {values:?}"));
                    return inner.fallback(key, &spec, estimated_tokens);
                }
            },
            Err(_) => return inner.fallback(key, &spec, estimated_tokens),
        };
        // The fallback buckets follow the shared ones (this data plane's share of their levels),
        // so a switch to the `local` fail mode continues from there instead of starting full.
        let shared_level = |params: Option<(f64, f64)>, reset_us: u64| {
            params.map(|(capacity, rate)| {
                (capacity - rate * Duration::from_micros(reset_us).as_secs_f64()) / f64::from(live)
            })
        };
        inner.fallback.set_levels(
            key,
            &share,
            BucketLevels {
                requests: shared_level(requests, reply.reset_requests_us),
                tokens: shared_level(tokens, reply.reset_tokens_us),
            },
        );
        let mut decision = reply.decision(&spec);
        if reply.allowed && reply.taken > 1 {
            let spare = u32::try_from(reply.taken - 1).unwrap_or(u32::MAX);
            let remaining = inner.leases.store(key, spec, spare, &decision);
            decision.remaining_requests = Some(remaining);
        }
        if !reply.allowed {
            inner
                .deny_cache
                .insert(key, &spec, estimated_tokens, sent_at, &reply, &decision);
        }
        let reservation = match (reply.allowed, spec.tpm) {
            (true, Some(tpm)) => {
                Some(Reservation::new(Arc::from(key), tpm, estimated_tokens).with_tag(TAG_REDIS))
            }
            _ => None,
        };
        (decision, reservation)
    }

    async fn settle_inner(&self, reservation: Reservation, actual_tokens: u64) {
        let inner = &*self.inner;
        if reservation.tag() == TAG_LOCAL {
            inner.fallback.settle_sync(reservation, actual_tokens);
            return;
        }
        let reserved = reservation.reserved_tokens();
        if actual_tokens < reserved {
            // Tokens come back: a remembered denial may no longer hold.
            inner.deny_cache.remove(reservation.key());
        }
        if actual_tokens == reserved {
            return;
        }
        if !inner.breaker.is_closed() {
            // Redis is considered down; the correction is lost (the bucket refills anyway).
            tracing::debug!(
                assignment = reservation.key(),
                "Redis unavailable; token settle dropped"
            );
            return;
        }
        let tpm = reservation.tpm();
        // Computed in f64 exactly like LocalLimiter::settle_sync.
        let refund = reserved as f64 - actual_tokens as f64;
        let mut invocation = inner.settle_script.key(BucketKey {
            assignment: reservation.key(),
            bucket: "tpm",
        });
        invocation
            .arg(refund.to_string())
            .arg(tpm)
            .arg((tpm as f64 / 60.0).to_string());
        // Failures are counted and logged by `call`; nothing else to do here.
        let _ = inner
            .call::<i64>(&invocation, inner.config.settle_budget)
            .await;
    }
}

impl RateLimiter for RedisLimiter {
    fn acquire(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
    ) -> impl Future<Output = (Decision, Option<Reservation>)> + Send {
        self.acquire_inner(key, *spec, estimated_tokens)
    }

    fn settle(
        &self,
        reservation: Reservation,
        actual_tokens: u64,
    ) -> impl Future<Output = ()> + Send {
        self.settle_inner(reservation, actual_tokens)
    }
}

impl Inner {
    /// One script call within `budget`, with one retry after a dropped connection (the
    /// `ConnectionManager` reconnects in the background but fails the first command after a drop).
    /// Records the outcome in the breaker.
    async fn call<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        budget: Duration,
    ) -> Result<T, ()> {
        bump(&self.counters.redis_calls);
        let attempt = async {
            let mut conn = ConnectionManager::clone(&self.conn.load());
            match invocation.invoke_async::<T>(&mut conn).await {
                Err(err) if err.is_connection_dropped() || err.is_unrecoverable_error() => {
                    let mut conn = ConnectionManager::clone(&self.conn.load());
                    invocation.invoke_async::<T>(&mut conn).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(budget, attempt).await {
            Ok(Ok(value)) => {
                self.breaker.success();
                Ok(value)
            }
            Ok(Err(err)) => {
                self.failed(&err.to_string());
                Err(())
            }
            Err(_) => {
                self.failed(&format!("no answer within {budget:?}"));
                Err(())
            }
        }
    }

    fn failed(&self, reason: &str) {
        bump(&self.counters.redis_errors);
        tracing::debug!(%reason, "Redis rate-limit call failed");
        if self.breaker.failure() {
            bump(&self.counters.mode_switches);
            self.switch_log
                .switched(true, self.config.fail_mode, Some(reason));
            match ConnectionManager::new_lazy_with_config(
                self.client.clone(),
                self.manager_config.clone(),
            ) {
                Ok(fresh) => self.conn.store(Arc::new(fresh)),
                Err(err) => tracing::debug!(%err, "cannot replace the Redis connection"),
            }
        }
    }

    /// This data plane's share of `spec` (each limit divided by the live data planes, see
    /// [`scaled`]), and that divisor (at least 1).
    fn share(&self, spec: &LimitSpec) -> (LimitSpec, u32) {
        let live = u32::try_from((self.live_data_planes)().max(1)).unwrap_or(u32::MAX);
        (scaled(spec, live), live)
    }

    /// The fail mode's answer.
    fn fallback(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
    ) -> (Decision, Option<Reservation>) {
        bump(&self.counters.fallback_decisions);
        match self.config.fail_mode {
            FailMode::Open => (Decision::UNLIMITED, None),
            FailMode::Closed => (Decision::UNAVAILABLE, None),
            FailMode::Local => {
                let (share, _) = self.share(spec);
                let (decision, reservation) =
                    self.fallback.acquire_sync(key, &share, estimated_tokens);
                (decision, reservation.map(|r| r.with_tag(TAG_LOCAL)))
            }
        }
    }

    /// Loads both scripts (which also establishes the connection) within the probe timeout.
    async fn load_scripts(&self) -> Result<(), String> {
        let load = async {
            let mut conn = ConnectionManager::clone(&self.conn.load());
            self.acquire_script
                .prepare_invoke()
                .load_async(&mut conn)
                .await?;
            self.settle_script
                .prepare_invoke()
                .load_async(&mut conn)
                .await?;
            Ok::<(), RedisError>(())
        };
        match tokio::time::timeout(self.config.probe_timeout, load).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.config.probe_timeout)),
        }
    }
}

/// Checks Redis in the background while the breaker is open; closes it on success. A panic in
/// the probe counts as a failed probe: the breaker must hear back, or no probe would run again.
fn spawn_probe(inner: Arc<Inner>) {
    #[allow(
        clippy::disallowed_methods,
        reason = "a one-shot probe bounded by the probe timeout; it reports through the breaker, panics included"
    )]
    tokio::spawn(async move {
        let probe = std::panic::AssertUnwindSafe(inner.load_scripts());
        let result = futures_util::FutureExt::catch_unwind(probe)
            .await
            .unwrap_or_else(|_| Err("the probe panicked".to_owned()));
        if inner.breaker.probe_done(result.is_ok()) {
            bump(&inner.counters.mode_switches);
            inner
                .switch_log
                .switched(false, inner.config.fail_mode, None);
        } else if let Err(reason) = result {
            tracing::debug!(%reason, "Redis rate-limit probe failed; breaker stays open");
        }
    });
}

/// The acquire script's reply (see [`ACQUIRE_LUA`]).
#[derive(Debug, Clone, Copy)]
struct AcquireReply {
    allowed: bool,
    remaining_requests: u64,
    reset_requests_us: u64,
    remaining_tokens: u64,
    reset_tokens_us: u64,
    retry_after_us: u64,
    wait_requests_us: u64,
    wait_tokens_us: u64,
    /// Request tokens taken (more than 1: a lease).
    taken: u64,
}

impl AcquireReply {
    fn parse(values: &[i64]) -> Option<Self> {
        let n = |i: usize| values.get(i).map(|&v| u64::try_from(v).unwrap_or(0));
        if values.len() != 9 {
            return None;
        }
        Some(Self {
            allowed: n(0)? == 1,
            remaining_requests: n(1)?,
            reset_requests_us: n(2)?,
            remaining_tokens: n(3)?,
            reset_tokens_us: n(4)?,
            retry_after_us: n(5)?,
            wait_requests_us: n(6)?,
            wait_tokens_us: n(7)?,
            taken: n(8)?,
        })
    }

    /// The decision, with `Some` fields exactly for the configured limits (as `LocalLimiter`).
    fn decision(&self, spec: &LimitSpec) -> Decision {
        let requests = spec.request_capacity();
        Decision {
            allowed: self.allowed,
            limit_requests: requests,
            remaining_requests: requests
                .map(|_| u32::try_from(self.remaining_requests).unwrap_or(u32::MAX)),
            reset_requests: requests.map(|_| Duration::from_micros(self.reset_requests_us)),
            limit_tokens: spec.tpm,
            remaining_tokens: spec.tpm.map(|_| self.remaining_tokens),
            reset_tokens: spec
                .tpm
                .map(|_| Duration::from_micros(self.reset_tokens_us)),
            retry_after: (!self.allowed).then(|| Duration::from_micros(self.retry_after_us)),
        }
    }
}

/// µs of refill (at `rate` per second) a bucket of `capacity` holding `level` is short of full,
/// for [`ACQUIRE_LUA`]'s `ARGV[7]`/`ARGV[8]`; 0 when full or when it never refills.
fn micros_short_of_full(level: f64, capacity: f64, rate: f64) -> u64 {
    if level.is_nan() || level >= capacity || rate <= 0.0 {
        return 0;
    }
    // Saturating cast; the script caps it at an hour anyway.
    ((capacity - level) / rate * 1e6).round() as u64
}

/// Which way a call goes.
enum Gate {
    Redis,
    Fallback,
    /// Fallback, and this caller starts the half-open probe.
    FallbackAndProbe,
}

/// Circuit breaker: opens after `threshold` consecutive failures; after about `cooldown` one
/// background probe may run (half-open); its success closes the breaker, its failure restarts the
/// cooldown. Lock-free: the request path reads one atomic while closed.
///
/// Probes are due on a grid of the wall clock (multiples of the cooldown since the Unix epoch), so
/// data planes whose clocks agree (NTP) probe at the same instants and go back to Redis together:
/// one still on its local share while the others use the shared bucket again would admit that
/// share on top of the shared rate.
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    origin: Instant,
    /// Wall-clock µs since the Unix epoch at `origin` (0 if the clock is before it).
    origin_wall_us: u64,
    failures: AtomicU32,
    open: AtomicBool,
    /// Microseconds since `origin` from which a probe may start.
    probe_at: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            origin: Instant::now(),
            origin_wall_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            probe_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// When the next probe is due (µs since `origin`): the first multiple of the cooldown on the
    /// wall clock more than half a cooldown from now, so probes come one cooldown apart on average.
    fn next_probe(&self) -> u64 {
        let now = self.now_us();
        let cooldown = u64::try_from(self.cooldown.as_micros()).unwrap_or(u64::MAX);
        if cooldown == 0 {
            return now;
        }
        let wall = self.origin_wall_us.saturating_add(now);
        now.saturating_add(probe_grid_point(wall, cooldown).saturating_sub(wall))
    }

    fn is_closed(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }

    fn gate(&self) -> Gate {
        if self.is_closed() {
            return Gate::Redis;
        }
        let due = self.now_us() >= self.probe_at.load(Ordering::Acquire);
        if due
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            Gate::FallbackAndProbe
        } else {
            Gate::Fallback
        }
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; true when this one opened the breaker.
    fn failure(&self) -> bool {
        let before = self
            .failures
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u32::MAX);
        if before.saturating_add(1) < self.threshold || !self.is_closed() {
            return false;
        }
        // probe_at first, so that no caller sees the breaker open with a stale probe time.
        self.probe_at.store(self.next_probe(), Ordering::Release);
        self.open
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Ends a probe; true when it closed the breaker.
    fn probe_done(&self, ok: bool) -> bool {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            self.open.store(false, Ordering::Release);
        } else {
            self.probe_at.store(self.next_probe(), Ordering::Release);
        }
        self.probing.store(false, Ordering::Release);
        ok
    }
}

/// The first multiple of `cooldown_us` (> 0) more than half a cooldown after `wall_us`.
fn probe_grid_point(wall_us: u64, cooldown_us: u64) -> u64 {
    (wall_us.saturating_add(cooldown_us / 2) / cooldown_us)
        .saturating_add(1)
        .saturating_mul(cooldown_us)
}

/// Logs mode switches at most once per [`SwitchLog::EVERY`], counting the ones left out, so a
/// flapping Redis cannot flood the log.
struct SwitchLog {
    origin: Instant,
    /// Milliseconds since `origin` of the last warning, `u64::MAX` before the first.
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl SwitchLog {
    const EVERY: Duration = Duration::from_secs(10);
    const NEVER: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(Self::NEVER),
            suppressed: AtomicU64::new(0),
        }
    }

    fn switched(&self, to_fallback: bool, fail_mode: FailMode, reason: Option<&str>) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let last = self.last_ms.load(Ordering::Acquire);
        let every = u64::try_from(Self::EVERY.as_millis()).unwrap_or(u64::MAX);
        let due = last == Self::NEVER || now.saturating_sub(last) >= every;
        if !due
            || self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(to_fallback, "rate-limit mode switch (warning suppressed)");
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        if to_fallback {
            tracing::warn!(
                %fail_mode,
                reason = reason.unwrap_or_default(),
                suppressed_switches = suppressed,
                "rate limiting: Redis unavailable, answering with the `{fail_mode}` fail mode"
            );
        } else {
            tracing::warn!(
                %fail_mode,
                suppressed_switches = suppressed,
                "rate limiting: Redis reachable again, shared buckets back in use"
            );
        }
    }
}

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
}

type LeaseShard = HashMap<Box<str>, Lease>;

/// Per-assignment leases, sharded like the deny cache.
struct Leases {
    ttl: Duration,
    hasher: RandomState,
    shards: Box<[Mutex<LeaseShard>]>,
}

impl Leases {
    fn new(ttl: Duration) -> Self {
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

    /// One request token from a live lease taken with this spec (`Ok`, an admitting decision),
    /// else the lease to ask Redis for (`Err`): the demand seen in the last window (this one or
    /// the one before, whichever is larger), between 1 and `bound`.
    fn take(&self, key: &str, spec: &LimitSpec, bound: u32) -> Result<Decision, u32> {
        if bound <= 1 {
            return Err(1);
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
                    },
                );
            }
            return Err(1);
        };
        if now >= lease.window_start + self.ttl {
            let consecutive = now < lease.window_start + 2 * self.ttl;
            lease.previous_count = if consecutive { lease.window_count } else { 0 };
            lease.window_start = now;
            lease.window_count = 0;
        }
        lease.window_count = lease.window_count.saturating_add(1);
        if lease.left > 0 && lease.spec == *spec && now < lease.until {
            lease.left -= 1;
            let mut decision = lease.decision.clone();
            decision.remaining_requests = Some(lease.base_remaining.saturating_add(lease.left));
            return Ok(decision);
        }
        Err(lease.previous_count.max(lease.window_count).clamp(1, bound))
    }

    /// Keeps `spare` tokens of an admitted acquire for the next requests, on top of any still
    /// live from a concurrent acquire; returns the requests remaining to report (Redis' count
    /// plus the lease).
    fn store(&self, key: &str, spec: LimitSpec, spare: u32, decision: &Decision) -> u32 {
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
        lease.until = now + self.ttl;
        lease.decision = decision.clone();
        lease.base_remaining = base_remaining;
        base_remaining.saturating_add(lease.left)
    }
}

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
struct DenyCache {
    hasher: RandomState,
    shards: Box<[Mutex<DenyShard>]>,
    per_shard: usize,
}

impl DenyCache {
    fn new(capacity: usize) -> Self {
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
    fn lookup(&self, key: &str, spec: &LimitSpec, estimated_tokens: u64) -> Option<Decision> {
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

    fn insert(
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

    fn remove(&self, key: &str) {
        if let Some(mut shard) = self.shard(key) {
            shard.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against the real Redis at `TEST_REDIS_URL` (scripts/test.sh starts one if needed). Every
    //! test uses fresh random assignment ids, so tests run in parallel without sharing keys.
    #![allow(
        clippy::disallowed_methods,
        reason = "test tasks end with the test's runtime"
    )]

    use std::collections::HashMap;
    use std::net::SocketAddr;

    use ::redis::AsyncCommands as _;
    use ::redis::aio::MultiplexedConnection;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use super::*;

    /// Generous: these tests check what Redis computes, not how fast (the machine may be busy).
    const TEST_BUDGET: Duration = Duration::from_secs(2);
    /// A call must come back within this even when Redis is unreachable.
    const CALL_DEADLINE: Duration = Duration::from_secs(5);

    fn redis_url() -> String {
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    fn assignment() -> String {
        format!("asg-test-{:016x}", rand::random::<u64>())
    }

    /// Talks to Redis only: `closed` makes any fallback visible as "unavailable".
    fn config() -> RedisLimiterConfig {
        RedisLimiterConfig {
            fail_mode: FailMode::Closed,
            budget: TEST_BUDGET,
            settle_budget: TEST_BUDGET,
            breaker_threshold: 1000,
            deny_cache_capacity: 0,
            ..RedisLimiterConfig::default()
        }
    }

    fn limiter(config: RedisLimiterConfig) -> RedisLimiter {
        RedisLimiter::new(&redis_url(), config, || 1).unwrap()
    }

    async fn raw() -> MultiplexedConnection {
        let url = redis_url();
        ::redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test Redis at {url}: {e}"))
    }

    async fn hgetall(conn: &mut MultiplexedConnection, key: &str) -> HashMap<String, String> {
        conn.hgetall(key).await.unwrap()
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

    async fn acquire(
        l: &RedisLimiter,
        key: &str,
        spec: &LimitSpec,
        estimate: u64,
    ) -> (Decision, Option<Reservation>) {
        let answer = tokio::time::timeout(CALL_DEADLINE, l.acquire(key, spec, estimate))
            .await
            .expect("acquire must return within its budget");
        assert!(!answer.0.is_unavailable(), "Redis call failed: {answer:?}");
        answer
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

    /// Leases that do not expire while a test runs, so what a test sees does not depend on speed.
    fn lasting_leases() -> RedisLimiterConfig {
        RedisLimiterConfig {
            lease_ttl: Duration::from_secs(600),
            ..config()
        }
    }

    #[tokio::test]
    async fn leases_grow_with_demand_and_answer_without_redis() {
        let l = limiter(lasting_leases());
        let key = assignment();
        let spec = rps(3200, None);
        let mut last_remaining = u32::MAX;
        for n in 0..400u32 {
            let (d, reservation) = acquire(&l, &key, &spec, 0).await;
            assert!(d.allowed && reservation.is_none());
            assert_eq!(d.limit_requests, Some(3200));
            let remaining = d.remaining_requests.unwrap();
            if n > 0 {
                // Leased tokens count as remaining: the count only goes down (one per request,
                // plus what refilled in Redis when a call is made).
                assert!(
                    remaining < last_remaining + 3200 / 10,
                    "{remaining} after {last_remaining}"
                );
            }
            last_remaining = remaining;
        }
        let stats = l.stats();
        assert_eq!(stats.redis_calls + stats.lease_hits, 400);
        // Demand-sized: 1, 2, 4, ... then leases of 100 (the bound for this spec).
        assert!(stats.redis_calls <= 12, "{stats:?}");
        // A changed limit never uses a lease taken under the old one.
        let calls = stats.redis_calls;
        acquire(&l, &key, &rps(6400, None), 0).await;
        assert_eq!(l.stats().redis_calls, calls + 1);
    }

    #[tokio::test]
    async fn a_quiet_assignment_takes_no_lease() {
        // Short windows: each acquire comes in a window of its own, so demand stays 1.
        let l = limiter(RedisLimiterConfig {
            lease_ttl: Duration::ZERO,
            ..config()
        });
        let key = assignment();
        let (rps_key, _) = bucket_keys(&key);
        let mut conn = raw().await;
        for _ in 0..20 {
            acquire(&l, &key, &rps(3200, Some(3200)), 0).await;
        }
        assert_eq!(l.stats().redis_calls, 20);
        assert_eq!(l.stats().lease_hits, 0);
        // Nothing stranded: exactly one token per request left the bucket (plus refill).
        let level: f64 = hgetall(&mut conn, &rps_key).await["tokens"]
            .parse()
            .unwrap();
        assert!(level >= 3200.0 - 20.0, "{level}");
    }

    #[tokio::test]
    async fn leases_never_admit_more_than_the_shared_bucket_holds() {
        // Two data planes on one bucket of 640 (refilling 640/s), leases of up to 20.
        let planes = [limiter(lasting_leases()), limiter(lasting_leases())];
        let key = assignment();
        let spec = rps(640, Some(640));
        assert_eq!(lease_size(&spec), 20);
        let started = Instant::now();
        let mut admitted = 0u64;
        for i in 0..1500 {
            let (d, _) = acquire(&planes[i % 2], &key, &spec, 0).await;
            admitted += u64::from(d.allowed);
        }
        let elapsed = started.elapsed().as_secs_f64();
        // The full bucket plus what refilled meanwhile, nothing more.
        let ceiling = 640.0 + 640.0 * elapsed + 1.0;
        assert!(
            (admitted as f64) <= ceiling,
            "{admitted} admitted in {elapsed:.3} s"
        );
        // At most one lease per plane is left unused.
        assert!(admitted >= 640 - 2 * 20, "{admitted} admitted");
        let hits: u64 = planes.iter().map(|l| l.stats().lease_hits).sum();
        assert!(hits > 0);
    }

    #[tokio::test]
    async fn burst_is_admitted_then_denied_without_writing() {
        let l = limiter(config());
        let mut conn = raw().await;
        let key = assignment();
        let (rps_key, _) = bucket_keys(&key);
        let spec = rps(1, Some(3));
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let (d, r) = acquire(&l, &key, &spec, 0).await;
            assert!(d.allowed && r.is_none(), "{d:?}");
            assert_eq!(d.limit_requests, Some(3));
            remaining.push(d.remaining_requests.unwrap());
        }
        assert_eq!(remaining, [2, 1, 0]);

        let before = hgetall(&mut conn, &rps_key).await;
        assert!(!before.is_empty());
        for _ in 0..3 {
            let (d, r) = acquire(&l, &key, &spec, 0).await;
            assert!(!d.allowed && r.is_none(), "{d:?}");
            let retry = d.retry_after.unwrap();
            assert!(
                retry > Duration::ZERO && retry <= Duration::from_secs(1),
                "{retry:?}"
            );
            assert_eq!(d.remaining_requests, Some(0));
            // ~3 s to refill 3 requests at 1/s.
            let reset = d.reset_requests.unwrap();
            assert!(reset > Duration::from_secs(2) && reset <= Duration::from_secs(3));
            assert_eq!(
                hgetall(&mut conn, &rps_key).await,
                before,
                "a denial must not write"
            );
        }
        assert_eq!(l.stats().redis_calls, 6);
        assert_eq!(l.stats().redis_errors, 0);
    }

    #[tokio::test]
    async fn first_decision_matches_the_local_limiter() {
        // Within one script call no time passes, so the numbers are exact.
        let l = limiter(config());
        let local = LocalLimiter::new();
        let spec = LimitSpec {
            tps: Some(10),
            burst: None,
            tpm: Some(6000),
        };
        let key = assignment();
        let (d, r) = acquire(&l, &key, &spec, 1000).await;
        let (expected, local_r) = local.acquire_sync(&key, &spec, 1000);
        assert_eq!(d, expected);
        assert_eq!(
            d.reset_requests,
            Some(Duration::from_millis(100)),
            "exact, no float residue"
        );
        let r = r.unwrap();
        assert_eq!(
            (r.key(), r.tpm(), r.reserved_tokens(), r.tag()),
            (key.as_str(), 6000, 1000, TAG_REDIS)
        );
        local.settle_sync(local_r.unwrap(), 1000);

        // An estimate above the capacity passes on a full bucket only, and leaves a deficit.
        let key = assignment();
        let spec = tpm(60);
        let (d, _) = acquire(&l, &key, &spec, 500).await;
        assert!(d.allowed);
        assert_eq!(d.remaining_tokens, Some(0));
        assert_eq!(d.reset_tokens, Some(Duration::from_secs(500)));
        let (d, _) = acquire(&l, &key, &spec, 0).await;
        assert!(!d.allowed);
        let retry = d.retry_after.unwrap();
        assert!(retry > Duration::from_secs(435) && retry <= Duration::from_secs(440));

        // Zero limits deny (never refill) without dividing by zero.
        let (d, _) = acquire(&l, &assignment(), &rps(0, None), 0).await;
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_secs(3600)));

        // Unlimited never reaches Redis.
        let calls = l.stats().redis_calls;
        let (d, r) = acquire(&l, &key, &LimitSpec::UNLIMITED, 1_000_000).await;
        assert_eq!(d, Decision::UNLIMITED);
        assert!(r.is_none());
        assert_eq!(l.stats().redis_calls, calls);
    }

    #[tokio::test]
    async fn token_denial_takes_no_request() {
        let l = limiter(config());
        let key = assignment();
        let spec = LimitSpec {
            tps: Some(1),
            burst: Some(2),
            tpm: Some(100),
        };
        let (d, r) = acquire(&l, &key, &spec, 80).await;
        assert!(d.allowed && r.is_some());
        let (d, r) = acquire(&l, &key, &spec, 80).await;
        assert!(!d.allowed && r.is_none());
        assert_eq!(d.remaining_requests, Some(1));
        assert!((20..=21).contains(&d.remaining_tokens.unwrap()), "{d:?}");
        let (d, r) = acquire(&l, &key, &spec, 10).await;
        assert!(
            d.allowed && r.is_some(),
            "the request was not taken by the denial"
        );
        assert_eq!(d.remaining_requests, Some(0));
    }

    #[tokio::test]
    async fn settle_returns_or_takes_tokens() {
        let l = limiter(config());
        let mut conn = raw().await;
        // tpm 1000 refills ~16.7 tokens/s: the ranges below allow for about a second of refill.
        let spec = tpm(1000);

        // Used less than reserved: the difference comes back.
        let key = assignment();
        let (d, r) = acquire(&l, &key, &spec, 500).await;
        assert_eq!(d.remaining_tokens, Some(500));
        l.settle(r.unwrap(), 100).await;
        let (d, r) = acquire(&l, &key, &spec, 0).await;
        assert!((900..=917).contains(&d.remaining_tokens.unwrap()), "{d:?}");
        // Never above the capacity.
        l.settle(
            Reservation::new(Arc::from(key.as_str()), 1000, 5000).with_tag(TAG_REDIS),
            0,
        )
        .await;
        l.settle(r.unwrap(), 0).await;
        let (d, _) = acquire(&l, &key, &spec, 0).await;
        assert_eq!(d.remaining_tokens, Some(1000));

        // Used more: the balance goes negative and the next request waits for the deficit.
        let key = assignment();
        let (_, tokens_key) = bucket_keys(&key);
        let (_, r) = acquire(&l, &key, &spec, 500).await;
        l.settle(r.unwrap(), 1500).await; // 1000 - 1500 = -500
        let level: f64 = hgetall(&mut conn, &tokens_key).await["tokens"]
            .parse()
            .unwrap();
        assert!((-500.0..-480.0).contains(&level), "{level}");
        let (d, r) = acquire(&l, &key, &spec, 0).await;
        assert!(!d.allowed && r.is_none());
        assert_eq!(d.remaining_tokens, Some(0));
        // 500 tokens of deficit at 1000/60 per second: 30 s.
        let retry = d.retry_after.unwrap();
        assert!(retry > Duration::from_secs(28) && retry <= Duration::from_secs(30));

        // Settling exactly the reservation costs no round trip.
        let key = assignment();
        let (_, r) = acquire(&l, &key, &spec, 10).await;
        let calls = l.stats().redis_calls;
        l.settle(r.unwrap(), 10).await;
        assert_eq!(l.stats().redis_calls, calls);

        // A bucket that expired meanwhile is full: the settle leaves it alone.
        let key = assignment();
        let (_, tokens_key) = bucket_keys(&key);
        let (_, r) = acquire(&l, &key, &spec, 10).await;
        let _: () = conn.del(&tokens_key).await.unwrap();
        l.settle(r.unwrap(), 10_000).await;
        let exists: bool = conn.exists(&tokens_key).await.unwrap();
        assert!(!exists);
        assert_eq!(l.stats().redis_errors, 0);
    }

    #[tokio::test]
    async fn keys_carry_the_hash_tag_and_ttls() {
        let l = limiter(config());
        let mut conn = raw().await;
        let key = assignment();
        let (rps_key, tpm_key) = bucket_keys(&key);
        assert_eq!(rps_key, format!("llmproxy:{{{key}}}:rps"));
        assert_eq!(tpm_key, format!("llmproxy:{{{key}}}:tpm"));
        assert!(rps_key.starts_with("llmproxy:{asg-") && tpm_key.ends_with("}:tpm"));

        let spec = LimitSpec {
            tps: Some(10),
            burst: Some(20),
            tpm: Some(6000),
        };
        let (_, r) = acquire(&l, &key, &spec, 100).await;
        // Refill from empty + 60 s: 20 / 10 = 2 s and 6000 / 100 = 60 s.
        let ttl_rps: i64 = conn.ttl(&rps_key).await.unwrap();
        let ttl_tpm: i64 = conn.ttl(&tpm_key).await.unwrap();
        assert!((59..=62).contains(&ttl_rps), "{ttl_rps}");
        assert!((118..=120).contains(&ttl_tpm), "{ttl_tpm}");
        let fields = hgetall(&mut conn, &tpm_key).await;
        assert_eq!(fields["cap"], "6000");
        assert_eq!(fields["rate"], "100");
        assert!(fields["ts"].parse::<u64>().unwrap() > 1_600_000_000_000_000);

        // A deficit deeper than the capacity keeps the key until it is paid back.
        l.settle(r.unwrap(), 60_100).await; // level 5900 - 60_000 = -54_100: 601 s to full
        let ttl_tpm: i64 = conn.ttl(&tpm_key).await.unwrap();
        assert!((659..=661).contains(&ttl_tpm), "{ttl_tpm}");
    }

    #[tokio::test]
    async fn scripts_are_reloaded_after_script_flush() {
        let l = limiter(config());
        let mut conn = raw().await;
        let key = assignment();
        let spec = LimitSpec {
            tps: Some(100),
            burst: None,
            tpm: Some(1000),
        };
        let (d, r) = acquire(&l, &key, &spec, 100).await;
        assert!(d.allowed);
        let _: () = ::redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        // EVALSHA answers NOSCRIPT; redis::Script loads the script and runs it again.
        let (d, _) = acquire(&l, &key, &spec, 100).await;
        assert!(d.allowed);
        assert_eq!(d.remaining_requests, Some(98));
        let _: () = ::redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        l.settle(r.unwrap(), 0).await;
        let (d, _) = acquire(&l, &key, &spec, 0).await;
        assert!((900..=917).contains(&d.remaining_tokens.unwrap()), "{d:?}");
        assert_eq!(l.stats().redis_errors, 0);
    }

    #[tokio::test]
    async fn repeat_denials_are_answered_from_the_deny_cache() {
        let l = limiter(RedisLimiterConfig {
            deny_cache_capacity: 64,
            ..config()
        });
        let key = assignment();
        let spec = rps(1, Some(1));
        assert!(acquire(&l, &key, &spec, 0).await.0.allowed);
        let (first, _) = acquire(&l, &key, &spec, 0).await;
        assert!(!first.allowed);
        assert_eq!(l.stats().redis_calls, 2);

        for _ in 0..10 {
            let (d, r) = acquire(&l, &key, &spec, 0).await;
            assert!(!d.allowed && r.is_none() && !d.is_unavailable());
            assert!(d.retry_after.unwrap() <= first.retry_after.unwrap());
            assert_eq!(d.limit_requests, Some(1));
            assert!(!d.headers().is_empty());
        }
        let stats = l.stats();
        assert_eq!((stats.redis_calls, stats.deny_cache_hits), (2, 10));

        // Only for the same spec: a changed one asks Redis (which keeps the level: still empty).
        let (d, _) = acquire(&l, &key, &rps(1, Some(2)), 0).await;
        assert_eq!(l.stats().redis_calls, 3);
        assert!(!d.allowed);
        assert_eq!(d.limit_requests, Some(2));

        // Tokens: a larger estimate is refused locally, a smaller one asks Redis.
        let key = assignment();
        let spec = tpm(600); // 10 tokens/s
        let (d, r) = acquire(&l, &key, &spec, 600).await;
        assert!(d.allowed);
        let (d, _) = acquire(&l, &key, &spec, 100).await;
        assert!(!d.allowed);
        let calls = l.stats().redis_calls;
        assert!(!acquire(&l, &key, &spec, 200).await.0.allowed);
        assert_eq!(l.stats().redis_calls, calls, "answered locally");
        assert!(!acquire(&l, &key, &spec, 50).await.0.allowed);
        assert_eq!(
            l.stats().redis_calls,
            calls + 1,
            "smaller estimate asks Redis"
        );

        // Tokens given back forget the denial.
        l.settle(r.unwrap(), 0).await;
        let (d, _) = acquire(&l, &key, &spec, 100).await;
        assert!(d.allowed, "{d:?}");
        assert_eq!(l.stats().redis_calls, calls + 3);
    }

    #[tokio::test]
    async fn unreachable_redis_uses_the_fail_mode_within_the_budget() {
        let unreachable = "redis://127.0.0.1:1";
        let spec = LimitSpec {
            tps: Some(2),
            burst: Some(10),
            tpm: Some(600),
        };
        for mode in [FailMode::Open, FailMode::Closed, FailMode::Local] {
            let config = RedisLimiterConfig {
                fail_mode: mode,
                ..RedisLimiterConfig::default()
            };
            let threshold = u64::from(config.breaker_threshold);
            let l = RedisLimiter::new(unreachable, config, || 2).unwrap();
            let key = assignment();
            let mut answers = Vec::new();
            for _ in 0..12 {
                let answer = tokio::time::timeout(CALL_DEADLINE, l.acquire(&key, &spec, 10))
                    .await
                    .expect("each call returns within the budget");
                answers.push(answer);
            }
            match mode {
                FailMode::Open => {
                    assert!(
                        answers
                            .iter()
                            .all(|(d, r)| *d == Decision::UNLIMITED && r.is_none())
                    );
                }
                FailMode::Closed => {
                    assert!(answers.iter().all(|(d, r)| d.is_unavailable()
                        && !d.allowed
                        && r.is_none()
                        && d.headers().is_empty()));
                }
                FailMode::Local => {
                    // Scaled for 2 data planes: burst 5 (refill 1/s), 300 tokens per minute.
                    let allowed = answers.iter().filter(|(d, _)| d.allowed).count();
                    assert_eq!(allowed, 5, "{answers:?}");
                    assert!(answers[..5].iter().all(|(d, _)| d.allowed));
                    assert_eq!(answers[0].0.limit_requests, Some(5));
                    assert_eq!(answers[0].0.limit_tokens, Some(300));
                    assert!(answers[5].0.retry_after.is_some());
                    let mut reservations: Vec<_> =
                        answers.into_iter().filter_map(|(_, r)| r).collect();
                    assert!(reservations.iter().all(|r| r.tag() == TAG_LOCAL));
                    // Settles go to the in-process buckets: 5 × 10 reserved, 300 - 50 = 250 left;
                    // one call that used 260 more leaves nothing for an estimate of 1.
                    let last = reservations.pop().unwrap();
                    l.settle(last, 270).await;
                    let (d, _) = l.inner.fallback.acquire_sync(&key, &scaled(&spec, 2), 0);
                    assert_eq!(d.remaining_tokens, Some(0));
                }
            }
            assert!(l.is_degraded(), "the breaker opened");
            let stats = l.stats();
            assert_eq!(stats.redis_calls, threshold, "no Redis call once open");
            assert_eq!(stats.redis_errors, threshold);
            assert_eq!(stats.fallback_decisions, 12);
        }
    }

    /// A TCP proxy to the test Redis that can be cut (open connections dropped, new ones
    /// refused) and restored, to take Redis "down" without touching the shared server.
    struct Proxy {
        url: String,
        up: watch::Sender<bool>,
    }

    impl Proxy {
        async fn start() -> Self {
            let mut url = url::Url::parse(&redis_url()).unwrap();
            let host = url.host_str().unwrap().to_owned();
            let port = url.port().unwrap_or(6379);
            let target = tokio::net::lookup_host((host.as_str(), port))
                .await
                .unwrap()
                .next()
                .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let local: SocketAddr = listener.local_addr().unwrap();
            url.set_host(Some("127.0.0.1")).unwrap();
            url.set_port(Some(local.port())).unwrap();
            let (up, _) = watch::channel(true);
            let up_rx = up.subscribe();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let mut down = up_rx.clone();
                    if !*down.borrow_and_update() {
                        continue; // dropped: the client sees the connection closed
                    }
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = down.wait_for(|up| !*up) => {}
                        }
                    });
                }
            });
            Self {
                url: url.to_string(),
                up,
            }
        }

        fn set_up(&self, up: bool) {
            self.up.send_replace(up);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn breaker_opens_on_failures_and_a_probe_closes_it() {
        let proxy = Proxy::start().await;
        let config = RedisLimiterConfig {
            fail_mode: FailMode::Open,
            budget: TEST_BUDGET,
            breaker_threshold: 2,
            breaker_cooldown: Duration::from_millis(100),
            ..RedisLimiterConfig::default()
        };
        let l = RedisLimiter::new(&proxy.url, config, || 1).unwrap();
        let key = assignment();
        let spec = rps(1000, None);
        let from_redis = |d: &Decision| d.limit_requests == Some(1000);

        let (d, _) = tokio::time::timeout(CALL_DEADLINE, l.acquire(&key, &spec, 0))
            .await
            .unwrap();
        assert!(from_redis(&d), "{d:?}");
        assert!(!l.is_degraded());

        // Cut: the proxy drops connections asynchronously, so poll until the breaker opens.
        proxy.set_up(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !l.is_degraded() {
            assert!(Instant::now() < deadline, "breaker never opened");
            let (d, _) = tokio::time::timeout(CALL_DEADLINE, l.acquire(&key, &spec, 0))
                .await
                .unwrap();
            assert!(d.allowed, "open fail mode allows");
        }
        // Open: answered without Redis (probes are not counted and fail while cut).
        let calls = l.stats().redis_calls;
        for _ in 0..20 {
            let (d, _) = l.acquire(&key, &spec, 0).await;
            assert_eq!(d, Decision::UNLIMITED);
        }
        assert_eq!(l.stats().redis_calls, calls);

        // Restored: a probe after the cooldown closes the breaker.
        proxy.set_up(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while l.is_degraded() {
            assert!(Instant::now() < deadline, "breaker never closed");
            let _ = l.acquire(&key, &spec, 0).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (d, _) = tokio::time::timeout(CALL_DEADLINE, l.acquire(&key, &spec, 0))
            .await
            .unwrap();
        assert!(from_redis(&d), "{d:?}");
        assert_eq!(l.stats().redis_calls, calls + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_local_fallback_continues_from_the_shared_level() {
        let proxy = Proxy::start().await;
        let config = RedisLimiterConfig {
            fail_mode: FailMode::Local,
            budget: TEST_BUDGET,
            breaker_threshold: 1,
            // No probe while the test runs: the proxy stays cut anyway.
            breaker_cooldown: Duration::from_secs(600),
            ..RedisLimiterConfig::default()
        };
        // Two data planes: the share is burst 20, 1 request/s.
        let l = RedisLimiter::new(&proxy.url, config, || 2).unwrap();
        let key = assignment();
        let spec = rps(1, Some(40));
        let started = Instant::now();
        for _ in 0..20 {
            let (d, _) = tokio::time::timeout(CALL_DEADLINE, l.acquire(&key, &spec, 0))
                .await
                .unwrap();
            assert!(
                d.allowed && d.limit_requests == Some(40),
                "from Redis: {d:?}"
            );
        }
        // Redis holds 20 of 40 (plus what refilled): this data plane's share is half of it.
        let share = l.inner.fallback.levels(&key).unwrap().requests.unwrap();
        let refill = started.elapsed().as_secs_f64();
        assert!((10.0..=10.0 + refill).contains(&share), "{share}");

        // Redis goes away (polled on another assignment, so this one's bucket is left alone).
        proxy.set_up(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !l.is_degraded() {
            assert!(Instant::now() < deadline, "breaker never opened");
            let _ = tokio::time::timeout(CALL_DEADLINE, l.acquire(&assignment(), &spec, 0)).await;
        }
        // The local share starts at the shared level, not full: 10 requests, not 20 — plus the
        // refill meanwhile (1/s shared, 1/s locally).
        let mut admitted = 0;
        loop {
            let (d, _) = l.acquire(&key, &spec, 0).await;
            assert_eq!(d.limit_requests, Some(20), "from the local share: {d:?}");
            if !d.allowed {
                break;
            }
            admitted += 1;
        }
        let refill = (started.elapsed().as_secs_f64() * 1.5).floor() as usize;
        assert!((10..=10 + refill).contains(&admitted), "{admitted}");
    }

    #[tokio::test]
    async fn a_lost_bucket_comes_back_at_the_level_the_data_plane_knew() {
        // Redis restarted without persistence: both keys are gone. Two data planes, this one
        // knows the request bucket at 10 of 40 (its share: 5 of 20) and the token bucket at 100.
        let l = RedisLimiter::new(&redis_url(), config(), || 2).unwrap();
        let mut conn = raw().await;
        let key = assignment();
        let (rps_key, tpm_key) = bucket_keys(&key);
        let spec = LimitSpec {
            tps: Some(1),
            burst: Some(40),
            tpm: Some(600), // 10 tokens/s
        };
        let started = Instant::now();
        let (d, _) = acquire(&l, &key, &spec, 500).await;
        assert!(d.allowed);
        for _ in 0..29 {
            assert!(acquire(&l, &key, &spec, 0).await.0.allowed);
        }
        // Another data plane that never saw this assignment creates it full, as before.
        let key_other = assignment();
        let other = RedisLimiter::new(&redis_url(), config(), || 2).unwrap();
        let (d, _) = acquire(&other, &key_other, &spec, 0).await;
        assert_eq!(d.remaining_requests, Some(39));
        assert_eq!(d.remaining_tokens, Some(600));

        let _: () = conn.del(&[&rps_key, &tpm_key]).await.unwrap();
        let (d, _) = acquire(&l, &key, &spec, 200).await;
        assert!(
            !d.allowed,
            "100 tokens and some refill, not a full bucket: {d:?}"
        );
        let refill = started.elapsed().as_secs_f64();
        let retry = d.retry_after.unwrap().as_secs_f64();
        assert!(
            (10.0 - refill..=10.0).contains(&retry),
            "{retry} s for 100 tokens at 10/s"
        );
        // A denial writes nothing; the next admitted call stores the buckets it created.
        let exists: bool = conn.exists(&rps_key).await.unwrap();
        assert!(!exists);
        let (d, _) = acquire(&l, &key, &spec, 50).await;
        assert!(d.allowed);
        let refill = started.elapsed().as_secs_f64();
        let stored = |fields: HashMap<String, String>| fields["tokens"].parse::<f64>().unwrap();
        // The local share refills at 1/s, the shared bucket at 1/s: the level it reports (×2)
        // may run up to 2/s ahead.
        let requests = stored(hgetall(&mut conn, &rps_key).await);
        assert!((9.0..=9.0 + 2.0 * refill).contains(&requests), "{requests}");
        let tokens = stored(hgetall(&mut conn, &tpm_key).await);
        assert!((50.0..=50.0 + 10.0 * refill).contains(&tokens), "{tokens}");
        assert_eq!(l.stats().redis_errors, 0);
    }

    #[test]
    fn fail_mode_parses() {
        assert_eq!("local".parse::<FailMode>(), Ok(FailMode::Local));
        assert_eq!(" Open ".parse::<FailMode>(), Ok(FailMode::Open));
        assert_eq!("closed".parse::<FailMode>(), Ok(FailMode::Closed));
        assert!("shut".parse::<FailMode>().is_err());
        assert_eq!(FailMode::default().to_string(), "local");
    }

    #[test]
    fn unavailable_is_distinct_from_a_rate_limit() {
        assert!(Decision::UNAVAILABLE.is_unavailable());
        assert!(Decision::UNAVAILABLE.headers().is_empty());
        assert!(!Decision::UNLIMITED.is_unavailable());
        let limited = Decision {
            allowed: false,
            retry_after: Some(Duration::from_millis(1)),
            ..Decision::UNLIMITED
        };
        assert!(!limited.is_unavailable());
    }

    #[test]
    fn construction_needs_a_runtime_and_a_valid_url() {
        assert!(
            RedisLimiter::new(
                "redis://127.0.0.1:6379",
                RedisLimiterConfig::default(),
                || 1
            )
            .is_err()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(RedisLimiter::new("not a url", RedisLimiterConfig::default(), || 1).is_err());
            let l = RedisLimiter::new(
                "redis://:secret@127.0.0.1:1",
                RedisLimiterConfig::default(),
                || 1,
            )
            .unwrap();
            assert!(!format!("{l:?}").contains("secret"));
        });
    }

    #[test]
    fn probes_are_due_on_a_wall_clock_grid() {
        const S: u64 = 1_000_000; // a cooldown of 1 s, in µs
        // Breakers that opened 200 ms apart (two data planes seeing Redis go) probe together...
        assert_eq!(probe_grid_point(10 * S + 200_000, S), 11 * S);
        assert_eq!(probe_grid_point(10 * S + 400_000, S), 11 * S);
        // ...and a failed probe at 11 s schedules the next one a cooldown later, on the grid.
        assert_eq!(probe_grid_point(11 * S + 3_000, S), 12 * S);
        // Always more than half a cooldown ahead, at most one and a half.
        assert_eq!(probe_grid_point(10 * S + 500_000, S), 12 * S);
        assert_eq!(probe_grid_point(10 * S + 499_999, S), 11 * S);
        assert_eq!(probe_grid_point(u64::MAX - 1, S), u64::MAX, "saturates");

        // The breaker maps the grid to its monotonic clock.
        let b = Breaker::new(1, Duration::from_secs(1));
        let now = b.now_us();
        let due = b.next_probe();
        assert_eq!((b.origin_wall_us + due) % S, 0, "on a whole second");
        assert!(
            (S / 2..=3 * S / 2 + 1_000).contains(&(due - now)),
            "{}",
            due - now
        );
        // No cooldown: due at once.
        let b = Breaker::new(1, Duration::ZERO);
        assert!(b.next_probe() <= b.now_us());
    }

    #[test]
    fn breaker_opens_after_the_threshold_and_probes_once() {
        let b = Breaker::new(3, Duration::ZERO);
        assert!(!b.failure() && !b.failure());
        b.success();
        assert!(!b.failure() && !b.failure());
        assert!(matches!(b.gate(), Gate::Redis));
        assert!(b.failure(), "third consecutive failure opens");
        assert!(!b.failure(), "already open");
        assert!(matches!(b.gate(), Gate::FallbackAndProbe));
        assert!(matches!(b.gate(), Gate::Fallback), "one probe at a time");
        assert!(!b.probe_done(false));
        assert!(matches!(b.gate(), Gate::FallbackAndProbe));
        assert!(b.probe_done(true));
        assert!(b.is_closed());
        assert!(matches!(b.gate(), Gate::Redis));
    }
}
