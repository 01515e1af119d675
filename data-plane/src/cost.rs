//! The cost of one request from its token usage and its model's prices (DESIGN §18), exact in
//! pico-USD: no floats anywhere in money.
//!
//! Prices are integers in micro-USD per million tokens, so one token at price `p` costs
//! `p × 1e-6 USD / 1e6 = p × 1e-12 USD`, i.e. exactly `p` pico-USD: a token count times a price is
//! the cost in pico-USD without any division or rounding. The products are taken in `u128`, where
//! a `u64` count times a `u64` price cannot overflow; only the sum of four such products could,
//! and it saturates.

use crate::usage::Usage;

/// A model's prices in micro-USD per million tokens (the snapshot's `price_*` fields); `None` =
/// no such price. A model without any price has no `Prices` at all (see [`Prices::new`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prices {
    /// Prompt tokens that are neither cache reads nor cache writes.
    pub input: Option<u64>,
    /// Generated tokens, reasoning included.
    pub output: Option<u64>,
    /// Prompt tokens read from the provider's cache; unset = `input`.
    pub cache_read: Option<u64>,
    /// Prompt tokens written to the provider's cache; unset = `input`.
    pub cache_write: Option<u64>,
}

impl Prices {
    /// `None` when no price is set: such a model has no cost (not a cost of 0).
    pub fn new(
        input: Option<u64>,
        output: Option<u64>,
        cache_read: Option<u64>,
        cache_write: Option<u64>,
    ) -> Option<Self> {
        let prices = Self {
            input,
            output,
            cache_read,
            cache_write,
        };
        (prices != Self::default()).then_some(prices)
    }

    /// The cost of `usage` in pico-USD (1e-12 USD):
    /// `(input − cache_read − cache_write) × price_input + cache_read × price_cache_read +
    /// cache_write × price_cache_write + output × price_output`, an unset cache price falling back
    /// to the input price. On a model priced only in part, tokens of a kind without a price cost
    /// nothing (an embedding model has an input price only). Cache reads and writes are part of
    /// the prompt count; an upstream reporting more of them than prompt tokens leaves no
    /// uncached input rather than a negative one.
    pub fn cost_pico_usd(&self, usage: &Usage) -> u128 {
        let term =
            |tokens: u64, price: Option<u64>| u128::from(tokens) * u128::from(price.unwrap_or(0));
        let uncached = usage
            .prompt_tokens
            .saturating_sub(usage.cache_read_tokens)
            .saturating_sub(usage.cache_write_tokens);
        term(uncached, self.input)
            .saturating_add(term(
                usage.cache_read_tokens,
                self.cache_read.or(self.input),
            ))
            .saturating_add(term(
                usage.cache_write_tokens,
                self.cache_write.or(self.input),
            ))
            .saturating_add(term(usage.completion_tokens, self.output))
    }
}

/// The cost of `usage` on a model with `prices`, in pico-USD; `None` for a model without prices.
pub fn cost_pico_usd(prices: Option<&Prices>, usage: &Usage) -> Option<u128> {
    prices.map(|p| p.cost_pico_usd(usage))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// USD per million tokens written as micro-USD, for readable examples.
    const fn usd_per_million(dollars: u64, micros: u64) -> Option<u64> {
        Some(dollars * 1_000_000 + micros)
    }

    fn usage(prompt: u64, completion: u64, cache_read: u64, cache_write: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cache_read_tokens: cache_read,
            cache_write_tokens: cache_write,
            reasoning_tokens: 0,
        }
    }

    /// gpt-4o: $2.50 in, $10 out, $1.25 cached.
    fn gpt_4o() -> Prices {
        Prices::new(
            usd_per_million(2, 500_000),
            usd_per_million(10, 0),
            usd_per_million(1, 250_000),
            None,
        )
        .unwrap()
    }

    #[test]
    fn gpt_4o_with_a_cache_hit() {
        // 1000 prompt tokens of which 200 cached, 500 out:
        // 800 × $2.50/M + 200 × $1.25/M + 500 × $10/M = $0.002 + $0.00025 + $0.005 = $0.00725.
        let cost = gpt_4o().cost_pico_usd(&usage(1_000, 500, 200, 0));
        assert_eq!(cost, 7_250_000_000);
        assert_eq!(
            cost,
            800 * 2_500_000 + 200 * 1_250_000 + 500 * 10_000_000,
            "one token at p micro-USD per million costs p pico-USD"
        );
    }

    #[test]
    fn claude_with_cache_writes_and_reads() {
        // Claude Sonnet: $3 in, $15 out, $0.30 cache read, $3.75 cache write. Anthropic's 100
        // input + 2000 cache write + 5000 cache read = 7100 prompt tokens; 300 out.
        let sonnet = Prices::new(
            usd_per_million(3, 0),
            usd_per_million(15, 0),
            usd_per_million(0, 300_000),
            usd_per_million(3, 750_000),
        )
        .unwrap();
        let cost = sonnet.cost_pico_usd(&usage(7_100, 300, 5_000, 2_000));
        // $0.0003 + $0.0015 + $0.0075 + $0.0045 = $0.0138
        assert_eq!(cost, 13_800_000_000);
    }

    #[test]
    fn unset_cache_prices_fall_back_to_the_input_price() {
        let plain = Prices {
            cache_read: None,
            cache_write: None,
            ..gpt_4o()
        };
        let with_cache = plain.cost_pico_usd(&usage(1_000, 500, 200, 100));
        let without = plain.cost_pico_usd(&usage(1_000, 500, 0, 0));
        assert_eq!(with_cache, without);
        assert_eq!(with_cache, 1_000 * 2_500_000 + 500 * 10_000_000);
    }

    #[test]
    fn a_model_without_prices_has_no_cost() {
        assert_eq!(Prices::new(None, None, None, None), None);
        assert_eq!(cost_pico_usd(None, &usage(1_000, 500, 0, 0)), None);
        assert_eq!(
            cost_pico_usd(Some(&gpt_4o()), &usage(1_000, 500, 200, 0)),
            Some(7_250_000_000)
        );
        // Free is a price: zero cost, not an unknown one.
        let free = Prices::new(Some(0), Some(0), None, None).unwrap();
        assert_eq!(
            cost_pico_usd(Some(&free), &usage(1_000, 500, 0, 0)),
            Some(0)
        );
    }

    #[test]
    fn tokens_without_a_price_cost_nothing_on_a_partly_priced_model() {
        // An embedding model priced for input only ($0.02/M).
        let embedding = Prices::new(usd_per_million(0, 20_000), None, None, None).unwrap();
        assert_eq!(embedding.cost_pico_usd(&usage(1_000, 0, 0, 0)), 20_000_000);
        assert_eq!(embedding.cost_pico_usd(&usage(0, 1_000, 0, 0)), 0);
    }

    #[test]
    fn the_smallest_price_and_count_are_exact() {
        // $0.000001 per million tokens, one token: 1 pico-USD.
        let tiny = Prices::new(Some(1), Some(1), None, None).unwrap();
        assert_eq!(tiny.cost_pico_usd(&usage(1, 0, 0, 0)), 1);
        assert_eq!(tiny.cost_pico_usd(&usage(0, 1, 0, 0)), 1);
        assert_eq!(tiny.cost_pico_usd(&usage(0, 0, 0, 0)), 0);
    }

    #[test]
    fn more_cached_than_prompt_tokens_is_not_negative_input() {
        // Reported by a confused upstream: 100 prompt tokens, 150 of them cache reads.
        let cost = gpt_4o().cost_pico_usd(&usage(100, 0, 150, 0));
        assert_eq!(cost, 150 * 1_250_000);
    }

    #[test]
    fn huge_counts_and_prices_do_not_overflow() {
        // The control plane's bound ($1M per million tokens) at 9 million tokens stays within an
        // i64 of pico-USD...
        let bound = 1_000_000_000_000;
        let dear = Prices::new(Some(bound), Some(bound), None, None).unwrap();
        let cost = dear.cost_pico_usd(&usage(4_500_000, 4_500_000, 0, 0));
        assert_eq!(cost, 9_000_000_000_000_000_000);
        assert!(i64::try_from(cost).is_ok());
        // ...and the extremes of u64 are exact or saturate, never wrap.
        let max = Prices::new(Some(u64::MAX), Some(u64::MAX), None, None).unwrap();
        assert_eq!(
            max.cost_pico_usd(&usage(u64::MAX, 0, 0, 0)),
            u128::from(u64::MAX) * u128::from(u64::MAX)
        );
        assert_eq!(
            max.cost_pico_usd(&usage(u64::MAX, u64::MAX, 0, 0)),
            u128::MAX
        );
    }
}
