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
//! requests from it without Redis, for up to 100 ms. Past half that time, the request that uses
//! the lease starts a top-up in the background (back to one window's demand, the time to live
//! renewed), so a steadily busy assignment never waits for Redis; small, quiet or token-limited
//! assignments keep one call per request.
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
//!
//! This file holds the limiter and its settings; each mechanism has its own submodule: `script`
//! (the Lua and the bucket keys), `breaker` (circuit breaker and switch log), `leases`,
//! `deny_cache`. The tests against a real Redis are in `tests/redis_limiter.rs`.

mod breaker;
mod deny_cache;
mod leases;
mod script;

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, ErrorKind, FromRedisValue, RedisError, Script, ScriptInvocation};
use arc_swap::ArcSwap;

use self::breaker::{Breaker, Gate, SwitchLog};
use self::deny_cache::DenyCache;
pub use self::leases::lease_size;
use self::leases::{Leases, Take};
pub use self::script::{ACQUIRE_LUA, SETTLE_LUA, bucket_keys};
use self::script::{BucketKey, LUA_PRELUDE, micros_short_of_full};
use super::local::{request_params, token_params};
use super::{BucketLevels, Decision, LimitSpec, LocalLimiter, RateLimiter, Reservation, scaled};

/// [`Reservation::tag`] of tokens reserved in Redis.
pub const TAG_REDIS: u8 = 1;
/// [`Reservation::tag`] of tokens reserved by the in-process fallback (`local` fail mode).
pub const TAG_LOCAL: u8 = 2;

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
    /// Leases topped up in the background before they expired (each one script call, counted in
    /// `redis_calls` too).
    pub lease_refills: u64,
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
    lease_refills: AtomicU64,
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

    /// The in-process buckets the `local` fail mode answers from: this data plane's share of each
    /// limit, kept at its share of the shared levels by every Redis reply.
    pub fn fallback(&self) -> &LocalLimiter {
        &self.inner.fallback
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
            lease_refills: c.lease_refills.load(Ordering::Relaxed),
            mode_switches: c.mode_switches.load(Ordering::Relaxed),
        }
    }

    /// Runs a script of another shared mechanism (the budgets, `crate::budget`) over this
    /// limiter's connection, within `budget`, under its circuit breaker: `None` when the breaker is
    /// open (a probe is started when due) or the call fails or runs late, which the breaker
    /// counts like a failed rate-limit call. The script must be idempotent to retry: it is resent
    /// once after a dropped connection.
    pub(crate) async fn run_script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        budget: Duration,
    ) -> Option<T> {
        let inner = &*self.inner;
        match inner.breaker.gate() {
            Gate::Redis => inner.call::<T>(invocation, budget).await.ok(),
            Gate::Fallback => None,
            Gate::FallbackAndProbe => {
                spawn_probe(Arc::clone(&self.inner));
                None
            }
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
            Take::Leased(decision, refill) => {
                bump(&inner.counters.lease_hits);
                if let Some(tokens) = refill {
                    spawn_refill(Arc::clone(&self.inner), key, spec, tokens);
                }
                return (decision, None);
            }
            Take::Ask(lease) => lease,
        };
        // Taken before sending: the script ran later, so "sent + wait" never outlasts the real
        // retry time, and the deny cache never refuses what Redis would admit.
        let sent_at = Instant::now();
        let Some(reply) = inner
            .acquire_in_redis(key, &spec, estimated_tokens, lease)
            .await
        else {
            return inner.fallback(key, &spec, estimated_tokens);
        };
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

    /// One acquire script call for `lease` request tokens (and `estimated_tokens`), within the
    /// budget; `None` when Redis failed or answered nonsense (counted by the breaker). Every reply
    /// also sets the fallback buckets to this data plane's share of the shared levels, so a switch
    /// to the `local` fail mode continues from there instead of starting full.
    async fn acquire_in_redis(
        &self,
        key: &str,
        spec: &LimitSpec,
        estimated_tokens: u64,
        lease: u32,
    ) -> Option<AcquireReply> {
        let (share, live) = self.share(spec);
        let requests = request_params(spec);
        let tokens = token_params(spec);
        // What this data plane knows of the shared levels (its share, scaled up), for Redis to
        // create a missing bucket at instead of full.
        let known = self.fallback.levels(key).unwrap_or_default();
        let short_of_full = |share_level: Option<f64>, params: Option<(f64, f64)>| {
            share_level
                .zip(params)
                .map_or(0, |(level, (capacity, rate))| {
                    micros_short_of_full(level * f64::from(live), capacity, rate)
                })
        };
        let mut invocation = self.acquire_script.key(BucketKey {
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

        let values = self
            .call::<Vec<i64>>(&invocation, self.config.budget)
            .await
            .ok()?;
        let Some(reply) = AcquireReply::parse(&values) else {
            self.failed(&format!("unexpected acquire reply {values:?}"));
            return None;
        };
        let shared_level = |params: Option<(f64, f64)>, reset_us: u64| {
            params.map(|(capacity, rate)| {
                (capacity - rate * Duration::from_micros(reset_us).as_secs_f64()) / f64::from(live)
            })
        };
        self.fallback.set_levels(
            key,
            &share,
            BucketLevels {
                requests: shared_level(requests, reply.reset_requests_us),
                tokens: shared_level(tokens, reply.reset_tokens_us),
            },
        );
        Some(reply)
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

/// Tops up a standing lease in the background (see `leases`): no request waits for this call. A
/// failure (already counted by the breaker) leaves the lease to run out or expire, after which a
/// request asks Redis itself as usual.
fn spawn_refill(inner: Arc<Inner>, key: &str, spec: LimitSpec, tokens: u32) {
    let key = key.to_owned();
    #[allow(
        clippy::disallowed_methods,
        reason = "one script call bounded by the acquire budget; its outcome goes to the lease, a panic leaves the flag set and the lease runs out as without top-ups"
    )]
    tokio::spawn(async move {
        match inner.acquire_in_redis(&key, &spec, 0, tokens).await {
            Some(reply) if reply.allowed => {
                bump(&inner.counters.lease_refills);
                let taken = u32::try_from(reply.taken).unwrap_or(u32::MAX);
                inner
                    .leases
                    .store(&key, spec, taken, &reply.decision(&spec));
            }
            _ => inner.leases.refill_failed(&key),
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

#[cfg(test)]
mod tests {
    //! Tests that need no Redis server (an unreachable one at most). Those against the real Redis
    //! are in `tests/redis_limiter.rs`.

    use super::*;

    /// A call must come back within this even when Redis is unreachable.
    const CALL_DEADLINE: Duration = Duration::from_secs(5);

    fn assignment() -> String {
        format!("asg-test-{:016x}", rand::random::<u64>())
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
}
