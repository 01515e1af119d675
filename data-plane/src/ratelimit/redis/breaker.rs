//! When the Redis limiter talks to Redis: the circuit breaker (with its wall-clock probe grid),
//! and the rate-limited log of switches between Redis and the fail mode. No Redis I/O here; the
//! limiter feeds the outcomes of its calls in and asks which way the next one goes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::FailMode;

/// Which way a call goes.
pub(super) enum Gate {
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
pub(super) struct Breaker {
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
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Self {
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

    pub(super) fn is_closed(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }

    pub(super) fn gate(&self) -> Gate {
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

    pub(super) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; true when this one opened the breaker.
    pub(super) fn failure(&self) -> bool {
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
    pub(super) fn probe_done(&self, ok: bool) -> bool {
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
pub(super) struct SwitchLog {
    origin: Instant,
    /// Milliseconds since `origin` of the last warning, `u64::MAX` before the first.
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl SwitchLog {
    const EVERY: Duration = Duration::from_secs(10);
    const NEVER: u64 = u64::MAX;

    pub(super) fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(Self::NEVER),
            suppressed: AtomicU64::new(0),
        }
    }

    pub(super) fn switched(&self, to_fallback: bool, fail_mode: FailMode, reason: Option<&str>) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
