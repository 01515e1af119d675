//! Model prices as users type and read them: USD per million tokens, such as `2.50`, converted
//! exactly to and from the integer micro-USD per million tokens that the API stores (DESIGN §18).
//! The decimal text is read digit by digit: a price never passes through a float.

/// Micro-USD in one USD.
const MICROS_PER_USD: i64 = 1_000_000;

/// Decimal places a price may have: micro-USD is the unit.
const MAX_DECIMALS: usize = 6;

/// A `--price-*` flag's value: a price, or `none` (no price: on `update` it removes the price).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceArg {
    /// Micro-USD per million tokens.
    MicroUsd(i64),
    None,
}

impl PriceArg {
    /// The price, or `None` for `none`.
    pub fn micro_usd(self) -> Option<i64> {
        match self {
            PriceArg::MicroUsd(v) => Some(v),
            PriceArg::None => None,
        }
    }
}

/// Parses a `--price-*` value: USD per million tokens as a plain decimal (`10`, `2.50`, `0.000001`,
/// at most 6 decimal places), or `none`. clap puts the flag and the value before the message.
pub fn parse_price(text: &str) -> Result<PriceArg, String> {
    let s = text.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(PriceArg::None);
    }
    if s.is_empty() {
        return Err("expected a price in USD per million tokens such as 2.50, or none".to_owned());
    }
    if s.starts_with('-') {
        return Err("a price must not be negative".to_owned());
    }
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(
            "expected a price in USD per million tokens as a plain decimal such as 2.50 or 10, or none"
                .to_owned(),
        );
    }
    if fraction.len() > MAX_DECIMALS {
        return Err(format!(
            "a price has at most {MAX_DECIMALS} decimal places (it is kept in micro-USD per million tokens)"
        ));
    }
    let too_large = || "the price is too large".to_owned();
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
        .map(PriceArg::MicroUsd)
        .ok_or_else(too_large)
}

/// Micro-USD per million tokens as USD for tables: at least 2 decimal places, more only as far
/// as needed to be exact (`2.50`, `10.00`, `3.125`, `0.000001`).
pub fn format_usd(micro_usd: i64) -> String {
    let sign = if micro_usd < 0 { "-" } else { "" };
    let abs = micro_usd.unsigned_abs();
    let micros_per_usd = MICROS_PER_USD.unsigned_abs();
    let fraction = format!("{:06}", abs % micros_per_usd);
    let fraction = fraction.trim_end_matches('0');
    let whole = abs / micros_per_usd;
    format!("{sign}{whole}.{fraction:0<2}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn micro(text: &str) -> i64 {
        match parse_price(text).unwrap() {
            PriceArg::MicroUsd(v) => v,
            PriceArg::None => panic!("{text}: none"),
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
        assert_eq!(parse_price("none"), Ok(PriceArg::None));
        assert_eq!(parse_price("NONE"), Ok(PriceArg::None));
        assert_eq!(PriceArg::None.micro_usd(), None);
        assert_eq!(PriceArg::MicroUsd(7).micro_usd(), Some(7));
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
