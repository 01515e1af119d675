//! Pools: the targets of one key sharing an alias, and the weighted order in which a request
//! tries them (no allocation, no division on the request path).

use super::*;

/// The targets of one key sharing an alias (declaration order = snapshot order).
#[derive(Debug, Clone, Copy)]
pub struct Pool<'a> {
    pub(super) index: &'a ConfigIndex,
    pub(super) records: &'a [TargetRecord],
}

/// Maps a uniformly random `roll` to `[0, bound)` (Lemire's multiply-shift, no division).
pub(super) fn scale(roll: u64, bound: u64) -> u64 {
    // The product of two u64 fits u128; the high half is < bound.
    ((u128::from(roll) * u128::from(bound)) >> 64) as u64
}

/// SplitMix64 step: derives the next independent-looking roll from the previous one.
pub(super) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<'a> Pool<'a> {
    /// The pool's alias.
    pub fn alias(&self) -> &'a Arc<str> {
        // A pool is never empty: it exists because one assignment has its alias.
        &self.index.route(self.records[0]).alias
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Always false (a pool exists because it has a target); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The `i`-th target in snapshot order.
    pub fn target(&self, i: usize) -> Option<Target<'a>> {
        self.records.get(i).map(|r| self.index.target(*r))
    }

    /// The targets in snapshot order.
    pub fn targets(&self) -> impl ExactSizeIterator<Item = Target<'a>> + 'a {
        let index = self.index;
        self.records.iter().map(move |r| index.target(*r))
    }

    fn weight(&self, i: usize) -> u64 {
        self.records
            .get(i)
            .map_or(0, |r| u64::from(self.index.route(*r).weight))
    }

    /// Sum of the targets' weights.
    pub fn total_weight(&self) -> u64 {
        (0..self.records.len()).map(|i| self.weight(i)).sum()
    }

    /// Order in which to try targets: first a weighted random pick (by `weight`), then the
    /// remaining targets for failover, each again picked by weight among those not yet tried
    /// (weighted sampling without replacement, so failover traffic also follows the weights).
    /// Every target appears exactly once. `roll` is a uniformly random u64 supplied by the caller.
    ///
    /// No heap allocation for pools of up to 64 targets (a bitmask tracks tried targets); larger
    /// pools allocate one small vector when failover starts (the first pick never allocates).
    pub fn attempt_order(&self, roll: u64) -> AttemptOrder<'a> {
        AttemptOrder {
            pool: *self,
            roll,
            step: 0,
            first: 0,
            tried: Tried::Bits(0),
            remaining_weight: self.total_weight(),
        }
    }
}

#[derive(Debug)]
pub(super) enum Tried {
    Bits(u64),
    Many(Vec<bool>),
}

/// Iterator returned by [`Pool::attempt_order`].
#[derive(Debug)]
pub struct AttemptOrder<'a> {
    pub(super) pool: Pool<'a>,
    pub(super) roll: u64,
    pub(super) step: usize,
    /// The weighted pick, marked as tried only when failover starts (keeps step 0 cheap).
    pub(super) first: usize,
    pub(super) tried: Tried,
    pub(super) remaining_weight: u64,
}

impl AttemptOrder<'_> {
    fn is_tried(&self, i: usize) -> bool {
        match &self.tried {
            Tried::Bits(bits) => i < 64 && bits & (1u64 << i) != 0,
            Tried::Many(v) => v.get(i).copied().unwrap_or(false),
        }
    }

    fn mark(&mut self, i: usize) {
        let n = self.pool.len();
        if let Tried::Bits(bits) = &self.tried {
            if n <= 64 {
                self.tried = Tried::Bits(bits | (1u64 << i));
                return;
            }
            let bits = *bits;
            self.tried = Tried::Many((0..n).map(|j| j < 64 && bits & (1u64 << j) != 0).collect());
        }
        if let Tried::Many(v) = &mut self.tried
            && let Some(slot) = v.get_mut(i)
        {
            *slot = true;
        }
    }

    /// The first target (in snapshot order) not yet tried whose cumulative weight among the
    /// untried ones exceeds `point`; the last untried one if rounding leaves none.
    fn pick_untried(&self, point: u64) -> usize {
        let mut acc = 0u64;
        let mut last_untried = 0;
        for i in 0..self.pool.len() {
            if self.is_tried(i) {
                continue;
            }
            last_untried = i;
            acc += self.pool.weight(i);
            if point < acc {
                return i;
            }
        }
        last_untried
    }
}

impl<'a> Iterator for AttemptOrder<'a> {
    type Item = Target<'a>;

    fn next(&mut self) -> Option<Target<'a>> {
        let len = self.pool.len();
        if self.step >= len {
            return None;
        }
        let chosen = if self.step == 0 {
            self.first = self.pick_untried(scale(self.roll, self.remaining_weight));
            self.first
        } else {
            if self.step == 1 {
                self.mark(self.first);
            }
            self.roll = mix(self.roll);
            self.pick_untried(scale(self.roll, self.remaining_weight))
        };
        let target = self.pool.target(chosen)?;
        self.remaining_weight = self
            .remaining_weight
            .saturating_sub(u64::from(target.weight));
        if self.step > 0 && self.step + 1 < len {
            self.mark(chosen);
        }
        self.step += 1;
        Some(target)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.pool.len() - self.step.min(self.pool.len());
        (left, Some(left))
    }
}

impl ExactSizeIterator for AttemptOrder<'_> {}
