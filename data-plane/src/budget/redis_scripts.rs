//! The budget counters in Redis: one integer per key and period (nano-USD charged: the period's
//! spend plus the reservations in flight), changed only by `INCRBY` so that the arithmetic is
//! Redis' exact 64-bit one (Lua numbers are doubles and only compare here).

use crate::ratelimit::redis::RedisLimiter;
use ::redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

/// `KEYS[1]`: the counter. `ARGV[1]`: the budget, `ARGV[2]`: the estimate, `ARGV[3]`: the spend
/// to create a missing counter at (`''`: do not create it), `ARGV[4]`: the TTL of a created
/// counter in seconds. Returns 1 (admitted and charged), 0 (refused: the charged amount has
/// reached the budget; nothing written) or -1 (the counter is missing: restore it).
const ACQUIRE_LUA: &str = r#"
local charged = redis.call('GET', KEYS[1])
if not charged then
  if ARGV[3] == '' then return -1 end
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
  charged = ARGV[3]
end
if tonumber(charged) >= tonumber(ARGV[1]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[2])
return 1
"#;

/// `KEYS[1]`: the counter, `ARGV[1]`: the correction (real cost − estimate, may be negative).
/// A counter that has gone (flushed) is left alone: its restore counts the shipped usage.
const SETTLE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  return 1
end
return 0
"#;

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_LUA));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE_LUA));

/// The answer of the acquire script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acquired {
    Admitted,
    Refused,
    Missing,
}

/// One acquire; `None` when Redis did not answer (or answered something else).
pub(super) async fn acquire(
    redis: &RedisLimiter,
    key: &str,
    limit_nano: i64,
    estimate_nano: i64,
    restore_nano: Option<i64>,
    ttl_s: i64,
    budget: Duration,
) -> Option<Acquired> {
    let mut invocation = ACQUIRE.key(key);
    invocation.arg(limit_nano).arg(estimate_nano);
    match restore_nano {
        Some(spent) => invocation.arg(spent),
        None => invocation.arg(""),
    };
    invocation.arg(ttl_s.max(1));
    match redis.run_script::<i64>(&invocation, budget).await? {
        1 => Some(Acquired::Admitted),
        0 => Some(Acquired::Refused),
        -1 => Some(Acquired::Missing),
        other => {
            tracing::debug!(reply = other, "unexpected budget acquire reply");
            None
        }
    }
}

/// One settle; a failure is counted by the limiter and otherwise lost (the spend is still
/// shipped to the control plane, which a later restore reads).
pub(super) async fn settle(redis: &RedisLimiter, key: &str, delta_nano: i64, budget: Duration) {
    let mut invocation = SETTLE.key(key);
    invocation.arg(delta_nano);
    let _ = redis.run_script::<i64>(&invocation, budget).await;
}
