//! Budgets of virtual keys (DESIGN §18 "Budgets"): a key with a budget is refused once the spend
//! of its current period (UTC day, week from Monday, or calendar month) plus the reservations in
//! flight has reached the budget.
//!
//! Each admitted request reserves its estimated cost before the upstream call
//! ([`Budgets::acquire`]) and settles it to the real cost once the answer is counted
//! ([`Budgets::settle`]). Amounts are kept in nano-USD (1e-9 USD) in signed 64-bit integers, what
//! Redis' `INCRBY` works in: a budget of up to 1e9 USD fits, and rounding each request's exact
//! pico-USD cost up to a nano-USD overstates the spend by less than a dollar per billion requests.
//!
//! Where the counters live:
//! - with `--redis-url`, one counter per key and period in Redis
//!   (`llmproxy:{vkey-…}:budget:month:2026-12`), shared by every data plane, with a TTL a day past
//!   the period's end: one script call per admitted request, one more to settle when the real cost
//!   differs from the estimate. When Redis fails, the fail mode of the rate limiter applies
//!   (`local`: the in-process counters below, `open`: admit, `closed`: 503);
//! - without Redis, in this process (`LocalCounters`).
//!
//! A counter that does not exist yet (first request of a period, a data plane restart without
//! Redis, a Redis flush) is *restored* before anything is admitted: the control plane's recorded
//! spend for the period (`ConfigService.GetSpend`) plus what this data plane has counted but not
//! shipped yet. What other data planes have not shipped yet (at most one report interval, 10 s by
//! default) is not in the restored figure.

mod period;
mod redis_scripts;

pub use period::{BudgetPeriod, Window};

use crate::ratelimit::redis::{FailMode, RedisLimiter};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Pico-USD in one nano-USD.
const PICO_PER_NANO: u128 = 1000;
/// Longest wait for the control plane's spend when a counter is restored.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time budget of a settle in Redis: it runs after the answer was sent.
const SETTLE_BUDGET: Duration = Duration::from_millis(200);

/// A virtual key's budget, as the snapshot carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit_micro_usd: u64,
    pub period: BudgetPeriod,
}

impl Budget {
    /// The budget in nano-USD (saturating: the control plane bounds it to 1e15 micro-USD).
    fn limit_nano(&self) -> i64 {
        i64::try_from(self.limit_micro_usd.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

/// Pico-USD rounded up to nano-USD, saturating at `i64::MAX`.
pub fn nano_usd_ceil(pico: u128) -> i64 {
    i64::try_from(pico.div_ceil(PICO_PER_NANO)).unwrap_or(i64::MAX)
}

/// Where a key's recorded spend comes from when its counter must be restored (the usage shipper:
/// the control plane's totals plus what is not shipped yet).
pub trait SpendSource: Send + Sync + 'static {
    /// Pico-USD spent by `vkey_id` in the hours starting at or after `since_unix`.
    fn spend_since<'a>(
        &'a self,
        vkey_id: &'a str,
        since_unix: i64,
    ) -> Pin<Box<dyn Future<Output = Result<u128, String>> + Send + 'a>>;
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetRefusal {
    /// The period's spend and reservations have reached the budget.
    #[error("budget of {limit_usd} USD per {period} reached")]
    Exceeded {
        limit_usd: String,
        period: BudgetPeriod,
        /// Unix seconds when the period ends.
        resets_at: i64,
    },
    /// The counter could not be read or restored and the fail mode does not admit.
    #[error("{0}")]
    Unavailable(String),
}

/// Which counter a reservation was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redis,
    Local,
}

/// An admitted request's reservation, settled once with the real cost ([`Budgets::settle`]).
#[derive(Debug)]
#[must_use = "settle the budget reservation with the real cost"]
pub struct BudgetReservation {
    /// The counter's key (the Redis key also names the in-process counter).
    key: String,
    reserved_nano: i64,
    backend: Backend,
}

impl BudgetReservation {
    /// Nano-USD reserved.
    pub fn reserved_nano(&self) -> i64 {
        self.reserved_nano
    }
}

/// The in-process counters: nano-USD charged (spend + reservations) per key and period, with the
/// period's end (unix seconds) for pruning.
#[derive(Debug, Default)]
struct LocalCounters {
    charged: Mutex<HashMap<String, (i64, i64)>>,
}

impl LocalCounters {
    /// `Some(admitted)` when the counter exists (and then charges `estimate` if admitted),
    /// `None` when it must be restored first.
    fn try_acquire(&self, key: &str, limit: i64, estimate: i64) -> Option<bool> {
        let mut map = self.charged.lock().unwrap_or_else(PoisonError::into_inner);
        let (charged, _) = map.get_mut(key)?;
        if *charged >= limit {
            return Some(false);
        }
        *charged = charged.saturating_add(estimate);
        Some(true)
    }

    /// Creates the counter at `spent` unless another request created it meanwhile; drops the
    /// counters of periods that have ended.
    fn restore(&self, key: &str, spent: i64, ends_at: i64, now_unix: i64) {
        let mut map = self.charged.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, (_, end)| *end > now_unix);
        map.entry(key.to_owned()).or_insert((spent, ends_at));
    }

    fn add(&self, key: &str, delta: i64) {
        let mut map = self.charged.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((charged, _)) = map.get_mut(key) {
            *charged = charged.saturating_add(delta);
        }
    }

    fn clear(&self) {
        self.charged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn charged(&self, key: &str) -> Option<i64> {
        let map = self.charged.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key).map(|(charged, _)| *charged)
    }
}

/// The budget counters of a data plane. See the module docs.
pub struct Budgets {
    redis: Option<RedisLimiter>,
    fail_mode: FailMode,
    /// Time budget of one Redis call before the fail mode answers.
    redis_budget: Duration,
    local: LocalCounters,
    /// Set while the local counters stood in for Redis: they are dropped once Redis answers
    /// again, so that a later outage restores them afresh instead of resuming stale figures.
    local_stood_in: AtomicBool,
    spend: Arc<dyn SpendSource>,
    /// One restore at a time: the first request of a period restores, the others find its counter.
    restoring: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets")
            .field("redis", &self.redis.is_some())
            .field("fail_mode", &self.fail_mode)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The key of one key's counter for one period: `llmproxy:{vkey-…}:budget:month:2026-12` (the key
/// id as the Redis Cluster hash tag).
pub fn counter_key(vkey_id: &str, window: &Window) -> String {
    format!("llmproxy:{{{vkey_id}}}:budget:{}", window.label)
}

impl Budgets {
    /// Counters in `redis` when given (sharing the rate limiter's connection and breaker), else
    /// in this process; `spend` restores missing counters.
    pub fn new(
        redis: Option<RedisLimiter>,
        fail_mode: FailMode,
        redis_budget: Duration,
        spend: Arc<dyn SpendSource>,
    ) -> Self {
        Self {
            redis,
            fail_mode,
            redis_budget,
            local: LocalCounters::default(),
            local_stood_in: AtomicBool::new(false),
            spend,
            restoring: tokio::sync::Mutex::new(()),
        }
    }

    /// Admits a request of `vkey_id` under `budget` and reserves `estimate_pico` pico-USD, or
    /// refuses it. `Ok(None)`: admitted without a reservation (fail mode `open`).
    pub async fn acquire(
        &self,
        vkey_id: &str,
        budget: Budget,
        estimate_pico: u128,
    ) -> Result<Option<BudgetReservation>, BudgetRefusal> {
        self.acquire_at(vkey_id, budget, estimate_pico, now_unix())
            .await
    }

    /// [`Self::acquire`] at a given time (tests).
    pub async fn acquire_at(
        &self,
        vkey_id: &str,
        budget: Budget,
        estimate_pico: u128,
        now_unix: i64,
    ) -> Result<Option<BudgetReservation>, BudgetRefusal> {
        let window = budget.period.window(now_unix);
        let key = counter_key(vkey_id, &window);
        let limit = budget.limit_nano();
        let estimate = nano_usd_ceil(estimate_pico);
        let exceeded = || exceeded(&budget, &window);
        let ttl = window.end_unix.saturating_sub(now_unix).max(0) + 86_400;
        if let Some(redis) = &self.redis {
            use redis_scripts::Acquired;
            let mut answer = self
                .redis_acquire(redis, &key, limit, estimate, None, ttl)
                .await;
            if answer == Some(Acquired::Missing) {
                let _one = self.restoring.lock().await;
                // Another request may have restored it while this one waited.
                answer = self
                    .redis_acquire(redis, &key, limit, estimate, None, ttl)
                    .await;
                if answer == Some(Acquired::Missing) {
                    let spent = match self.restored_spend(vkey_id, &window).await {
                        Ok(spent) => spent,
                        Err(reason) => return self.unrestorable(vkey_id, reason),
                    };
                    answer = self
                        .redis_acquire(redis, &key, limit, estimate, Some(spent), ttl)
                        .await;
                }
            }
            match answer {
                Some(Acquired::Admitted) => {
                    return Ok(Some(BudgetReservation {
                        key,
                        reserved_nano: estimate,
                        backend: Backend::Redis,
                    }));
                }
                Some(Acquired::Refused) => return Err(exceeded()),
                // No answer, or flushed again between the calls: the fail mode.
                Some(Acquired::Missing) | None => {}
            }
            match self.fail_mode {
                FailMode::Open => return Ok(None),
                FailMode::Closed => {
                    return Err(BudgetRefusal::Unavailable(
                        "budgets are unavailable (shared counters down, fail mode closed); retry shortly"
                            .to_owned(),
                    ));
                }
                FailMode::Local => self.local_stood_in.store(true, Ordering::Release),
            }
        }
        self.local_acquire(vkey_id, key, &window, budget, estimate, now_unix)
            .await
    }

    /// The in-process counter.
    async fn local_acquire(
        &self,
        vkey_id: &str,
        key: String,
        window: &Window,
        budget: Budget,
        estimate: i64,
        now_unix: i64,
    ) -> Result<Option<BudgetReservation>, BudgetRefusal> {
        let limit = budget.limit_nano();
        let admitted = match self.local.try_acquire(&key, limit, estimate) {
            Some(admitted) => admitted,
            None => {
                let _one = self.restoring.lock().await;
                if self.local.charged(&key).is_none() {
                    match self.restored_spend(vkey_id, window).await {
                        Ok(spent) => self.local.restore(&key, spent, window.end_unix, now_unix),
                        Err(reason) => return self.unrestorable(vkey_id, reason),
                    }
                }
                // The counter exists now (restored here or by another request).
                self.local
                    .try_acquire(&key, limit, estimate)
                    .unwrap_or(false)
            }
        };
        if !admitted {
            return Err(exceeded(&budget, window));
        }
        Ok(Some(BudgetReservation {
            key,
            reserved_nano: estimate,
            backend: Backend::Local,
        }))
    }

    /// The period's spend in nano-USD from the control plane (and this data plane's unshipped
    /// usage), within [`RESTORE_TIMEOUT`].
    async fn restored_spend(&self, vkey_id: &str, window: &Window) -> Result<i64, String> {
        match tokio::time::timeout(
            RESTORE_TIMEOUT,
            self.spend.spend_since(vkey_id, window.start_unix),
        )
        .await
        {
            Ok(Ok(pico)) => Ok(nano_usd_ceil(pico)),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(format!(
                "no answer from the control plane within {RESTORE_TIMEOUT:?}"
            )),
        }
    }

    /// A counter that cannot be restored: admitted without a reservation under fail mode `open`,
    /// else refused as unavailable (the spend is unknown, and a budget must not be bypassed).
    fn unrestorable(
        &self,
        vkey_id: &str,
        reason: String,
    ) -> Result<Option<BudgetReservation>, BudgetRefusal> {
        tracing::warn!(%vkey_id, %reason, "cannot restore a budget's spend");
        match self.fail_mode {
            FailMode::Open => Ok(None),
            FailMode::Local | FailMode::Closed => Err(BudgetRefusal::Unavailable(
                "the key's budget cannot be checked right now (its recorded spend is unavailable); retry shortly"
                    .to_owned(),
            )),
        }
    }

    async fn redis_acquire(
        &self,
        redis: &RedisLimiter,
        key: &str,
        limit: i64,
        estimate: i64,
        restore: Option<i64>,
        ttl: i64,
    ) -> Option<redis_scripts::Acquired> {
        let answer =
            redis_scripts::acquire(redis, key, limit, estimate, restore, ttl, self.redis_budget)
                .await;
        if answer.is_some() && self.local_stood_in.swap(false, Ordering::AcqRel) {
            self.local.clear();
        }
        answer
    }

    /// Replaces the reservation by the real cost (pico-USD, rounded up to nano-USD). A request
    /// that was never answered settles with 0; one that may have been billed without an answer
    /// keeps its estimate (`actual_pico: None`).
    pub async fn settle(&self, reservation: BudgetReservation, actual_pico: Option<u128>) {
        let actual = actual_pico.map_or(reservation.reserved_nano, nano_usd_ceil);
        let delta = actual.saturating_sub(reservation.reserved_nano);
        if delta == 0 {
            return;
        }
        match (reservation.backend, &self.redis) {
            (Backend::Redis, Some(redis)) => {
                redis_scripts::settle(redis, &reservation.key, delta, SETTLE_BUDGET).await;
            }
            _ => self.local.add(&reservation.key, delta),
        }
    }

    /// Nano-USD charged on the in-process counter `key` (tests).
    pub fn local_charged(&self, key: &str) -> Option<i64> {
        self.local.charged(key)
    }
}

fn exceeded(budget: &Budget, window: &Window) -> BudgetRefusal {
    BudgetRefusal::Exceeded {
        limit_usd: usd(budget.limit_micro_usd),
        period: budget.period,
        resets_at: window.end_unix,
    }
}

/// Micro-USD as a decimal USD string without trailing zeros past the cents (`100`, `0.50`,
/// `12.345678`).
pub fn usd(micro: u64) -> String {
    let (whole, frac) = (micro / 1_000_000, micro % 1_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    let trimmed = digits.trim_end_matches('0');
    let shown = if trimmed.len() < 2 {
        &digits[..2]
    } else {
        trimmed
    };
    format!("{whole}.{shown}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    struct FixedSpend {
        pico: u128,
        calls: AtomicU64,
        fail: bool,
    }

    impl SpendSource for FixedSpend {
        fn spend_since<'a>(
            &'a self,
            _vkey_id: &'a str,
            _since_unix: i64,
        ) -> Pin<Box<dyn Future<Output = Result<u128, String>> + Send + 'a>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let answer = if self.fail {
                Err("control plane unreachable".to_owned())
            } else {
                Ok(self.pico)
            };
            Box::pin(std::future::ready(answer))
        }
    }

    fn local(pico: u128, fail: bool, mode: FailMode) -> (Budgets, Arc<FixedSpend>) {
        let spend = Arc::new(FixedSpend {
            pico,
            calls: AtomicU64::new(0),
            fail,
        });
        (
            Budgets::new(None, mode, Duration::from_millis(5), spend.clone()),
            spend,
        )
    }

    const DOLLAR_PICO: u128 = 1_000_000_000_000;
    /// 2026-12-07T12:00:00Z, a Monday.
    const NOW: i64 = 1_796_644_800;

    fn budget(dollars: u64) -> Budget {
        Budget {
            limit_micro_usd: dollars * 1_000_000,
            period: BudgetPeriod::Month,
        }
    }

    #[tokio::test]
    async fn admits_until_spend_and_reservations_reach_the_budget() {
        let (budgets, spend) = local(0, false, FailMode::Local);
        let b = budget(10);
        let r1 = budgets
            .acquire_at("vkey-a", b, 4 * DOLLAR_PICO, NOW)
            .await
            .unwrap()
            .unwrap();
        let r2 = budgets
            .acquire_at("vkey-a", b, 4 * DOLLAR_PICO, NOW)
            .await
            .unwrap()
            .unwrap();
        // 8 of 10 charged: one more is admitted (overshoot bounded by what is in flight).
        let r3 = budgets
            .acquire_at("vkey-a", b, 4 * DOLLAR_PICO, NOW)
            .await
            .unwrap()
            .unwrap();
        let refused = budgets
            .acquire_at("vkey-a", b, DOLLAR_PICO, NOW)
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, BudgetRefusal::Exceeded { limit_usd, period: BudgetPeriod::Month, .. } if limit_usd == "10"),
            "{refused:?}"
        );
        // Real costs far below the estimates free the budget again.
        for r in [r1, r2, r3] {
            budgets.settle(r, Some(DOLLAR_PICO)).await;
        }
        let key = counter_key("vkey-a", &BudgetPeriod::Month.window(NOW));
        assert_eq!(budgets.local_charged(&key), Some(3_000_000_000));
        budgets
            .acquire_at("vkey-a", b, DOLLAR_PICO, NOW)
            .await
            .unwrap()
            .unwrap()
            .reserved_nano();
        // One restore for the period, not one per request.
        assert_eq!(spend.calls.load(Ordering::Relaxed), 1);
        // Another key is unaffected.
        assert!(
            budgets
                .acquire_at("vkey-b", b, DOLLAR_PICO, NOW)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn restores_the_recorded_spend_and_starts_afresh_next_period() {
        let (budgets, _) = local(10 * DOLLAR_PICO, false, FailMode::Local);
        let refused = budgets
            .acquire_at("vkey-a", budget(10), 1, NOW)
            .await
            .unwrap_err();
        assert!(matches!(refused, BudgetRefusal::Exceeded { .. }));
        // A raise re-admits at once.
        assert!(
            budgets
                .acquire_at("vkey-a", budget(11), 1, NOW)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn an_unrestorable_counter_follows_the_fail_mode() {
        let (budgets, _) = local(0, true, FailMode::Local);
        let err = budgets
            .acquire_at("vkey-a", budget(10), 1, NOW)
            .await
            .unwrap_err();
        assert!(matches!(err, BudgetRefusal::Unavailable(_)), "{err:?}");
        let (budgets, _) = local(0, true, FailMode::Open);
        assert!(
            budgets
                .acquire_at("vkey-a", budget(10), 1, NOW)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_request_without_an_answer_gives_its_reservation_back_or_keeps_it() {
        let (budgets, _) = local(0, false, FailMode::Local);
        let key = counter_key("vkey-a", &BudgetPeriod::Month.window(NOW));
        let r = budgets
            .acquire_at("vkey-a", budget(10), 2 * DOLLAR_PICO, NOW)
            .await
            .unwrap()
            .unwrap();
        budgets.settle(r, Some(0)).await;
        assert_eq!(budgets.local_charged(&key), Some(0));
        let r = budgets
            .acquire_at("vkey-a", budget(10), 2 * DOLLAR_PICO, NOW)
            .await
            .unwrap()
            .unwrap();
        budgets.settle(r, None).await;
        assert_eq!(budgets.local_charged(&key), Some(2_000_000_000));
    }

    #[test]
    fn amounts() {
        assert_eq!(nano_usd_ceil(0), 0);
        assert_eq!(nano_usd_ceil(1), 1);
        assert_eq!(nano_usd_ceil(1000), 1);
        assert_eq!(nano_usd_ceil(1001), 2);
        assert_eq!(nano_usd_ceil(u128::MAX), i64::MAX);
        assert_eq!(usd(100_000_000), "100");
        assert_eq!(usd(500_000), "0.50");
        assert_eq!(usd(12_345_678), "12.345678");
        assert_eq!(usd(1_250_000), "1.25");
        assert_eq!(
            Budget {
                limit_micro_usd: u64::MAX,
                period: BudgetPeriod::Day
            }
            .limit_nano(),
            i64::MAX
        );
    }
}
