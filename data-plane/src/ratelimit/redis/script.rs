//! The Lua side of the Redis limiter: the two scripts (on one shared prelude), the bucket keys
//! they work on, and the conversion of this data plane's levels into the scripts' arguments.
//! Kept apart because the arithmetic here must stay that of `LocalLimiter`, and is read as such.

use ::redis::{RedisWrite, ToRedisArgs};

/// Common part of both scripts: Redis time, bucket load/refill/save. A bucket is a hash
/// `{tokens, ts, cap, rate}`: the level (negative while in deficit), the Redis time of the last
/// update in microseconds, and the capacity and rate (per second) it was last charged with, kept
/// so that the refill since then uses the old limits and a changed limit behaves like
/// `LocalLimiter`'s (level kept, clamped to the new capacity — no fresh burst on a raise).
pub(super) const LUA_PRELUDE: &str = r#"
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
/// request tokens to take when admitted (absent = 1; see [`lease_size`](super::lease_size));
/// `ARGV[7]`, `ARGV[8]`: how many µs of refill the calling data plane believes the request and
/// token buckets are short of full (absent or 0 = full), used only to create a missing bucket at
/// that level.
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
pub(super) struct BucketKey<'a> {
    pub(super) assignment: &'a str,
    /// `rps` or `tpm`.
    pub(super) bucket: &'static str,
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

/// µs of refill (at `rate` per second) a bucket of `capacity` holding `level` is short of full,
/// for [`ACQUIRE_LUA`]'s `ARGV[7]`/`ARGV[8]`; 0 when full or when it never refills.
pub(super) fn micros_short_of_full(level: f64, capacity: f64, rate: f64) -> u64 {
    if level.is_nan() || level >= capacity || rate <= 0.0 {
        return 0;
    }
    // Saturating cast; the script caps it at an hour anyway.
    ((capacity - level) / rate * 1e6).round() as u64
}
