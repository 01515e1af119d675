//! The Redis rate limiter against the real Redis at `TEST_REDIS_URL` (scripts/test.sh starts one
//! if needed). Every test uses fresh random assignment ids, so tests run in parallel without
//! sharing keys. Tests that need no Redis server are beside the code, in `src/ratelimit/redis/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_proxy_data_plane::ratelimit::redis::{
    FailMode, RedisLimiter, RedisLimiterConfig, TAG_REDIS, bucket_keys, lease_size,
};
use llm_proxy_data_plane::ratelimit::{
    Decision, LimitSpec, LocalLimiter, RateLimiter as _, Reservation,
};
use redis::AsyncCommands as _;
use redis::aio::MultiplexedConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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
    redis::Client::open(url.as_str())
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
async fn a_busy_lease_is_topped_up_in_the_background_before_it_expires() {
    // Leases live 4 s. The test builds up a lease, lets half its life pass (the sleep is the
    // behaviour under test), and checks that the next request is answered from the lease while
    // a top-up runs in the background, after which the lease serves on without waiting.
    let ttl = Duration::from_secs(4);
    let l = limiter(RedisLimiterConfig {
        lease_ttl: ttl,
        ..config()
    });
    let key = assignment();
    let spec = rps(3200, None);
    for _ in 0..50 {
        assert!(acquire(&l, &key, &spec, 0).await.0.allowed);
    }
    // Demand-sized leases of 1, 2, 4, ... 32: the last, taken by the 32nd request, has 13 left.
    let before = l.stats();
    assert_eq!(before.lease_hits + before.redis_calls, 50, "{before:?}");
    assert_eq!(before.lease_refills, 0);
    tokio::time::sleep(ttl / 2 + Duration::from_millis(100)).await;

    let (d, _) = acquire(&l, &key, &spec, 0).await;
    assert!(d.allowed);
    let stats = l.stats();
    assert_eq!(
        stats.lease_hits,
        before.lease_hits + 1,
        "served by the lease"
    );
    let deadline = Instant::now() + CALL_DEADLINE;
    while l.stats().lease_refills == 0 {
        assert!(Instant::now() < deadline, "no top-up: {:?}", l.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let topped = l.stats();
    assert_eq!(topped.redis_calls, before.redis_calls + 1, "{topped:?}");
    assert_eq!(topped.lease_refills, 1);

    // Back to one window's demand (51 acquires so far): 12 left + 39 taken. The time to live
    // was renewed, so the next 51 requests come from the lease without another call.
    let mut remaining = Vec::new();
    for _ in 0..51 {
        let (d, _) = acquire(&l, &key, &spec, 0).await;
        assert!(d.allowed);
        remaining.push(d.remaining_requests.unwrap());
    }
    let after = l.stats();
    assert_eq!(after.redis_calls, topped.redis_calls, "{after:?}");
    assert_eq!(after.lease_hits, topped.lease_hits + 51);
    // The remaining count still only goes down between Redis calls.
    assert!(remaining.windows(2).all(|w| w[1] < w[0]), "{remaining:?}");
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
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    // EVALSHA answers NOSCRIPT; redis::Script loads the script and runs it again.
    let (d, _) = acquire(&l, &key, &spec, 100).await;
    assert!(d.allowed);
    assert_eq!(d.remaining_requests, Some(98));
    let _: () = redis::cmd("SCRIPT")
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
    let share = l.fallback().levels(&key).unwrap().requests.unwrap();
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
