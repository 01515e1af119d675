//! Money as users type and read it: model prices in USD per million tokens (`2.50`) and
//! virtual-key budgets in USD (`100`), converted exactly to and from the integer micro-USD that
//! the API stores (DESIGN §18). The decimal text is read digit by digit: money never passes
//! through a float.

/// Micro-USD in one USD.
const MICROS_PER_USD: i64 = 1_000_000;

/// Decimal places an amount may have: micro-USD is the unit.
const MAX_DECIMALS: usize = 6;

/// A `--price-*` or `--budget-usd` flag's value: an amount, or `none` (no amount: on `update` it
/// removes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsdArg {
    /// Micro-USD (per million tokens for a price).
    MicroUsd(i64),
    None,
}

impl UsdArg {
    /// The amount, or `None` for `none`.
    pub fn micro_usd(self) -> Option<i64> {
        match self {
            UsdArg::MicroUsd(v) => Some(v),
            UsdArg::None => None,
        }
    }
}

/// What an amount is, for the messages of [`parse_usd`].
struct Amount {
    /// `price`, `budget`.
    noun: &'static str,
    /// What the user types, e.g. `USD per million tokens`.
    unit: &'static str,
    /// An example: `2.50`.
    example: &'static str,
    /// Examples of plain decimals: `2.50 or 10`.
    examples: &'static str,
    /// What it is kept in, e.g. `micro-USD per million tokens`.
    kept_in: &'static str,
}

const PRICE: Amount = Amount {
    noun: "price",
    unit: "USD per million tokens",
    example: "2.50",
    examples: "2.50 or 10",
    kept_in: "micro-USD per million tokens",
};

const BUDGET: Amount = Amount {
    noun: "budget",
    unit: "USD",
    example: "100",
    examples: "100 or 25.50",
    kept_in: "micro-USD",
};

/// Parses a `--price-*` value: USD per million tokens as a plain decimal (`10`, `2.50`, `0.000001`,
/// at most 6 decimal places), or `none`. clap puts the flag and the value before the message.
pub fn parse_price(text: &str) -> Result<UsdArg, String> {
    parse_usd(text, &PRICE)
}

/// Parses a `--budget-usd` value: USD per budget period as a plain decimal (`100`, `25.50`, at
/// most 6 decimal places), or `none`.
pub fn parse_budget(text: &str) -> Result<UsdArg, String> {
    parse_usd(text, &BUDGET)
}

/// A plain non-negative decimal in USD (at most 6 decimal places) as exact micro-USD, or `none`.
fn parse_usd(text: &str, what: &Amount) -> Result<UsdArg, String> {
    let Amount {
        noun,
        unit,
        example,
        examples,
        kept_in,
    } = what;
    let s = text.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(UsdArg::None);
    }
    if s.is_empty() {
        return Err(format!(
            "expected a {noun} in {unit} such as {example}, or none"
        ));
    }
    if s.starts_with('-') {
        return Err(format!("a {noun} must not be negative"));
    }
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(format!(
            "expected a {noun} in {unit} as a plain decimal such as {examples}, or none"
        ));
    }
    if fraction.len() > MAX_DECIMALS {
        return Err(format!(
            "a {noun} has at most {MAX_DECIMALS} decimal places (it is kept in {kept_in})"
        ));
    }
    let too_large = || format!("the {noun} is too large");
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        // Only digits here, so the one failure left is a value past i64.
        whole.parse().map_err(|_| too_large())?
    };
    // `fraction` is at most 6 digits: padded to 6, it is the micro-USD part.
    let fraction: i64 = format!("{fraction:0<MAX_DECIMALS$}")
        .parse()
        .map_err(|_| too_large())?;
    whole
        .checked_mul(MICROS_PER_USD)
        .and_then(|micros| micros.checked_add(fraction))
        .map(UsdArg::MicroUsd)
        .ok_or_else(too_large)
}

/// The sign, whole USD and the 6-digit micro-USD part of an amount.
fn usd_parts(micro_usd: i64) -> (&'static str, u64, String) {
    let sign = if micro_usd < 0 { "-" } else { "" };
    let abs = micro_usd.unsigned_abs();
    let micros_per_usd = MICROS_PER_USD.unsigned_abs();
    (
        sign,
        abs / micros_per_usd,
        format!("{:06}", abs % micros_per_usd),
    )
}

/// Micro-USD as USD for tables: at least 2 decimal places, more only as far as needed to be exact
/// (`2.50`, `10.00`, `3.125`, `0.000001`).
pub fn format_usd(micro_usd: i64) -> String {
    let (sign, whole, fraction) = usd_parts(micro_usd);
    let fraction = fraction.trim_end_matches('0');
    format!("{sign}{whole}.{fraction:0<2}")
}

/// Micro-USD as USD with exactly 6 decimal places, for `-o json` (`100.000000`): a decimal string
/// that any consumer reads exactly.
pub fn format_usd_6(micro_usd: i64) -> String {
    let (sign, whole, fraction) = usd_parts(micro_usd);
    format!("{sign}{whole}.{fraction}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn micro(text: &str) -> i64 {
        match parse_price(text).unwrap() {
            UsdArg::MicroUsd(v) => v,
            UsdArg::None => panic!("{text}: none"),
        }
    }

    #[test]
    fn decimals_become_exact_micro_usd() {
        assert_eq!(micro("2.50"), 2_500_000);
        assert_eq!(micro("2.5"), 2_500_000);
        assert_eq!(micro("10"), 10_000_000);
        assert_eq!(micro("0.000001"), 1);
        assert_eq!(micro("3.125"), 3_125_000);
        assert_eq!(micro("0"), 0);
        assert_eq!(micro("0.0"), 0);
        assert_eq!(micro("1.25"), 1_250_000);
        assert_eq!(micro(".5"), 500_000);
        assert_eq!(micro("5."), 5_000_000);
        assert_eq!(micro(" 0.15 "), 150_000);
        assert_eq!(micro("007.000100"), 7_000_100);
        // Past any float's exact range, still exact.
        assert_eq!(micro("9223372036854.775807"), i64::MAX);
    }

    #[test]
    fn none_means_no_price() {
        assert_eq!(parse_price("none"), Ok(UsdArg::None));
        assert_eq!(parse_price("NONE"), Ok(UsdArg::None));
        assert_eq!(UsdArg::None.micro_usd(), None);
        assert_eq!(UsdArg::MicroUsd(7).micro_usd(), Some(7));
    }

    #[test]
    fn bad_prices_say_why() {
        let err = |text: &str| parse_price(text).unwrap_err();
        assert_eq!(
            err("1.0000001"),
            "a price has at most 6 decimal places (it is kept in micro-USD per million tokens)"
        );
        assert_eq!(err("-1"), "a price must not be negative");
        assert_eq!(err("-0.5"), "a price must not be negative");
        for bad in [
            "abc", "1.2.3", "1,50", "$2.50", "1e3", "+1", ".", "2.5x", "NaN", "inf",
        ] {
            assert!(
                err(bad).starts_with("expected a price"),
                "{bad}: {}",
                err(bad)
            );
        }
        assert!(err("").starts_with("expected a price"));
        assert!(err("  ").starts_with("expected a price"));
        assert_eq!(err("9223372036854.775808"), "the price is too large");
        assert_eq!(err("99999999999999999999"), "the price is too large");
    }

    #[test]
    fn micro_usd_show_as_usd() {
        assert_eq!(format_usd(2_500_000), "2.50");
        assert_eq!(format_usd(10_000_000), "10.00");
        assert_eq!(format_usd(3_125_000), "3.125");
        assert_eq!(format_usd(1), "0.000001");
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_usd(1_250_000), "1.25");
        assert_eq!(format_usd(150_000), "0.15");
        assert_eq!(format_usd(1_000_000_000_000), "1000000.00");
        assert_eq!(format_usd(i64::MAX), "9223372036854.775807");
        // Never stored (the control plane refuses them), but shown faithfully.
        assert_eq!(format_usd(-2_500_000), "-2.50");
        assert_eq!(format_usd(i64::MIN), "-9223372036854.775808");
    }

    #[test]
    fn budgets_parse_exactly() {
        let budget = |text: &str| parse_budget(text).unwrap();
        assert_eq!(budget("100"), UsdArg::MicroUsd(100_000_000));
        assert_eq!(budget("25.50"), UsdArg::MicroUsd(25_500_000));
        assert_eq!(budget("0"), UsdArg::MicroUsd(0));
        assert_eq!(budget("0.000001"), UsdArg::MicroUsd(1));
        assert_eq!(
            budget("1000000000"),
            UsdArg::MicroUsd(1_000_000_000_000_000)
        );
        assert_eq!(budget("none"), UsdArg::None);
        assert_eq!(budget(" None "), UsdArg::None);
    }

    #[test]
    fn bad_budgets_say_why_in_budget_words() {
        let err = |text: &str| parse_budget(text).unwrap_err();
        assert_eq!(
            err("1.0000001"),
            "a budget has at most 6 decimal places (it is kept in micro-USD)"
        );
        assert_eq!(err("-100"), "a budget must not be negative");
        assert_eq!(err(""), "expected a budget in USD such as 100, or none");
        assert_eq!(
            err("$100"),
            "expected a budget in USD as a plain decimal such as 100 or 25.50, or none"
        );
        assert_eq!(err("99999999999999999999"), "the budget is too large");
    }

    #[test]
    fn json_amounts_have_six_places() {
        assert_eq!(format_usd_6(100_000_000), "100.000000");
        assert_eq!(format_usd_6(25_500_000), "25.500000");
        assert_eq!(format_usd_6(1), "0.000001");
        assert_eq!(format_usd_6(0), "0.000000");
        assert_eq!(format_usd_6(1_000_000_000_000_000), "1000000000.000000");
        assert_eq!(format_usd_6(-1_500_000), "-1.500000");
        assert_eq!(format_usd_6(i64::MIN), "-9223372036854.775808");
        for micros in [0, 1, 25_500_000, 1_000_000_000_000_000, i64::MAX] {
            assert_eq!(
                parse_budget(&format_usd_6(micros)),
                Ok(UsdArg::MicroUsd(micros))
            );
        }
    }

    #[test]
    fn shown_prices_parse_back_to_themselves() {
        for micros in [
            0,
            1,
            10,
            125_000,
            2_500_000,
            3_125_000,
            999_999_999,
            i64::MAX,
        ] {
            assert_eq!(micro(&format_usd(micros)), micros, "{micros}");
        }
    }
}
