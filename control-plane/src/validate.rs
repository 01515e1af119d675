//! Input validation with messages that name the field and say what is wrong.

use crate::error::StoreError;
use llm_proxy_catalog::Provider;
use std::collections::BTreeMap;

const MAX_NAME_LEN: usize = 200;

/// A display name: non-empty, printable, at most 200 characters.
pub fn name(field: &'static str, value: &str) -> Result<String, StoreError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(StoreError::invalid(field, "must not be empty"));
    }
    if trimmed.chars().count() > MAX_NAME_LEN {
        return Err(StoreError::invalid(
            field,
            format!("must be at most {MAX_NAME_LEN} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(StoreError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

/// Connection names may not contain `/`: it separates `CONNECTION/MODEL` references.
pub fn connection_name(value: &str) -> Result<String, StoreError> {
    let name = name("name", value)?;
    if name.contains('/') {
        return Err(StoreError::invalid(
            "name",
            format!("must not contain '/' (it separates CONNECTION/MODEL), got {name:?}"),
        ));
    }
    if looks_like_id(&name) {
        return Err(StoreError::invalid(
            "name",
            format!("{name:?} looks like a resource ID; pick another name"),
        ));
    }
    Ok(name)
}

/// Names that look like IDs would make name-or-ID lookups ambiguous.
pub fn looks_like_id(value: &str) -> bool {
    ["conn-", "model-", "vkey-", "asg-"]
        .iter()
        .any(|p| value.starts_with(p) && value.len() == p.len() + 20)
}

/// A provider name (DESIGN §5), as the catalog spells it.
pub fn provider(value: &str) -> Result<String, StoreError> {
    value
        .parse::<Provider>()
        .map(|p| p.as_str().to_owned())
        .map_err(|e| StoreError::invalid("provider", e.to_string()))
}

pub fn endpoint(value: &str) -> Result<String, StoreError> {
    let value = value.trim();
    let bad = || {
        StoreError::invalid(
            "endpoint",
            format!(
                "must be an absolute http(s) URL such as https://api.openai.com, got {value:?}"
            ),
        )
    };
    let parsed = url::Url::parse(value).map_err(|_| bad())?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(StoreError::invalid(
            "endpoint",
            "must not carry credentials; use --api-key",
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(StoreError::invalid(
            "endpoint",
            format!("must not have a query or fragment, got {value:?}; use --set for options"),
        ));
    }
    Ok(value.trim_end_matches('/').to_owned())
}

/// A stored credential is write-only and must not follow its connection to another host
/// (DESIGN §19): changing the endpoint (`new` differs from `stored`, both normalised by
/// [`endpoint`]) needs the credential re-supplied in the same update.
pub fn endpoint_change(stored: &str, new: &str, credential_given: bool) -> Result<(), StoreError> {
    if new != stored && !credential_given {
        return Err(StoreError::invalid(
            "credential",
            format!(
                "must be given again to change the endpoint (to {new:?}), with llmctl's --api-key or --api-key-file, so that the stored one is never sent to another host"
            ),
        ));
    }
    Ok(())
}

/// Checks a connection's merged options against its provider and endpoint (the catalog's
/// validators, DESIGN §16).
pub fn connection_options(
    provider: &str,
    endpoint: &str,
    options: &BTreeMap<String, String>,
) -> Result<(), StoreError> {
    let provider = provider
        .parse::<Provider>()
        .map_err(|e| StoreError::invalid("provider", e.to_string()))?;
    llm_proxy_catalog::validate_connection_options(provider, endpoint, options)
        // Field `option`, then the catalog's sentence that starts with the key: "option timeout_s
        // must be ...", the way users type it (`--set KEY=`).
        .map_err(|e| StoreError::invalid("option", e.to_string()))
}

pub fn remote(value: &str) -> Result<String, StoreError> {
    name("remote", value)
}

pub fn deployment(value: &str) -> Result<String, StoreError> {
    name("deployment", value)
}

pub fn alias(value: &str) -> Result<String, StoreError> {
    let alias = name("alias", value)?;
    if alias.chars().any(char::is_whitespace) {
        return Err(StoreError::invalid(
            "alias",
            format!("must not contain whitespace, got {alias:?}"),
        ));
    }
    Ok(alias)
}

/// A limit or weight: a positive integer.
pub fn positive(field: &'static str, value: i64) -> Result<i64, StoreError> {
    if value > 0 {
        Ok(value)
    } else {
        Err(StoreError::invalid(
            field,
            format!("must be a positive integer, got {value}"),
        ))
    }
}

/// The highest price accepted, in micro-USD per million tokens: $1M per million tokens, i.e. $1
/// per token. Real prices are below $1000 per million tokens, so anything past this is a mistake
/// (typically a unit slip: USD or pico-USD where micro-USD was meant), and the bound keeps the
/// cost of a request of up to 9 million tokens within an `i64` of pico-USD (DESIGN §18).
pub const MAX_PRICE_MICRO_USD_PER_MILLION: i64 = 1_000_000_000_000;

/// A model price in micro-USD per million tokens: 0 (free) up to
/// [`MAX_PRICE_MICRO_USD_PER_MILLION`].
pub fn price(field: &'static str, value: i64) -> Result<i64, StoreError> {
    if value < 0 {
        return Err(StoreError::invalid(
            field,
            format!("must not be negative, got {value} micro-USD per million tokens"),
        ));
    }
    if value > MAX_PRICE_MICRO_USD_PER_MILLION {
        return Err(StoreError::invalid(
            field,
            format!(
                "must be at most {MAX_PRICE_MICRO_USD_PER_MILLION} micro-USD per million tokens ($1000000 per million tokens), got {value}"
            ),
        ));
    }
    Ok(value)
}

/// The highest budget accepted, in micro-USD per period: $1,000,000,000. Anything past it is a
/// mistake (typically a unit slip: pico-USD where micro-USD was meant), and the bound keeps the
/// budget in pico-USD (10^21) within a `u128`/`i128` with a wide margin (DESIGN §18).
pub const MAX_BUDGET_MICRO_USD: i64 = 1_000_000_000_000_000;

/// The budget periods (DESIGN §18): UTC calendar days, weeks starting Monday, months.
pub const BUDGET_PERIODS: [&str; 3] = ["day", "week", "month"];

/// The period of a budget set without one.
pub const DEFAULT_BUDGET_PERIOD: &str = "month";

/// A virtual key's budget in micro-USD per period: 0 (every request refused) up to
/// [`MAX_BUDGET_MICRO_USD`].
pub fn budget(value: i64) -> Result<i64, StoreError> {
    if value < 0 {
        return Err(StoreError::invalid(
            "budget_micro_usd",
            format!("must not be negative, got {value} micro-USD"),
        ));
    }
    if value > MAX_BUDGET_MICRO_USD {
        return Err(StoreError::invalid(
            "budget_micro_usd",
            format!("must be at most {MAX_BUDGET_MICRO_USD} micro-USD ($1000000000), got {value}"),
        ));
    }
    Ok(value)
}

/// A budget period: exactly `day`, `week` or `month`.
pub fn budget_period(value: &str) -> Result<String, StoreError> {
    if BUDGET_PERIODS.contains(&value) {
        Ok(value.to_owned())
    } else {
        Err(StoreError::invalid(
            "budget_period",
            format!("must be day, week or month, got {value:?}"),
        ))
    }
}

/// The message of a period given to a key that has no budget and gets none.
pub fn budget_period_without_budget() -> StoreError {
    StoreError::invalid(
        "budget_period",
        "needs a budget: give budget_micro_usd too (llmctl: --budget-usd)",
    )
}

/// A user-chosen virtual key. The message never echoes the key.
pub fn user_key(value: &str) -> Result<(), StoreError> {
    let len = value.chars().count();
    if !(8..=512).contains(&len) {
        return Err(StoreError::invalid(
            "key",
            format!("must be 8 to 512 characters long, got {len}"),
        ));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(StoreError::invalid(
            "key",
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(err: StoreError) -> String {
        err.to_string()
    }

    #[test]
    fn provider_must_be_known() {
        assert_eq!(provider("azure").unwrap(), "azure");
        assert_eq!(provider("anthropic").unwrap(), "anthropic");
        let msg = message(provider("cohere").unwrap_err());
        assert_eq!(
            msg,
            "provider must be one of openai|azure|google|bedrock|anthropic, got \"cohere\""
        );
    }

    #[test]
    fn endpoint_must_be_absolute_http() {
        assert_eq!(
            endpoint("https://api.openai.com/").unwrap(),
            "https://api.openai.com"
        );
        assert!(endpoint("http://127.0.0.1:9000/v1").is_ok());
        for bad in [
            "api.openai.com",
            "ftp://x.y",
            "https://",
            "/v1",
            "https://u:p@h.com",
        ] {
            let msg = message(endpoint(bad).unwrap_err());
            assert!(msg.starts_with("endpoint must "), "{bad}: {msg}");
        }
    }

    #[test]
    fn a_new_endpoint_needs_the_credential_again() {
        let stored = "https://api.openai.com";
        assert!(endpoint_change(stored, stored, false).is_ok());
        assert!(endpoint_change(stored, "https://evil.example", true).is_ok());
        let msg = message(endpoint_change(stored, "https://evil.example", false).unwrap_err());
        assert_eq!(
            msg,
            "credential must be given again to change the endpoint (to \"https://evil.example\"), with llmctl's --api-key or --api-key-file, so that the stored one is never sent to another host"
        );
    }

    #[test]
    fn bedrock_needs_a_region_unless_the_host_names_it() {
        let none = BTreeMap::new();
        let opts = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(
            connection_options(
                "bedrock",
                "https://bedrock-runtime.us-east-1.amazonaws.com",
                &none
            )
            .is_ok()
        );
        let msg = message(
            connection_options(
                "bedrock",
                "https://vpce-0a1b.bedrock-runtime.vpce.amazonaws.com",
                &none,
            )
            .unwrap_err(),
        );
        assert!(msg.starts_with("option region is required"), "{msg}");
        assert!(
            connection_options(
                "bedrock",
                "http://127.0.0.1:9000",
                &opts("region", "eu-west-1")
            )
            .is_ok()
        );
        assert!(connection_options("openai", "http://127.0.0.1:9000", &none).is_ok());
    }

    const EP: &str = "https://example.com";
    const BEDROCK: &str = "https://bedrock-runtime.us-east-1.amazonaws.com";

    #[test]
    fn options_are_checked_per_provider() {
        let opts = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(connection_options("azure", EP, &opts("api_version", "2024-10-21")).is_ok());
        assert!(connection_options("azure", EP, &opts("api_version", "v1")).is_ok());
        assert!(connection_options("azure", EP, &opts("api_version", "latest")).is_err());
        assert!(connection_options("google", EP, &opts("api", "vertex")).is_ok());
        let msg = message(connection_options("google", EP, &opts("api", "palm")).unwrap_err());
        assert_eq!(msg, "option api must be one of gemini|vertex, got \"palm\"");
        let msg = message(connection_options("openai", EP, &opts("region", "x")).unwrap_err());
        assert_eq!(
            msg,
            "option \"region\" is unknown for provider openai; known: timeout_s"
        );
        assert!(connection_options("bedrock", BEDROCK, &opts("timeout_s", "0")).is_err());
        assert!(connection_options("bedrock", BEDROCK, &opts("timeout_s", "2.5")).is_ok());
    }

    #[test]
    fn names_and_limits() {
        assert!(name("name", "  ").is_err());
        assert_eq!(name("name", " a ").unwrap(), "a");
        assert!(connection_name("a/b").is_err());
        assert!(connection_name("conn-abcdefghijklmnopqrst").is_err());
        assert_eq!(
            positive("tps", 0).unwrap_err().to_string(),
            "tps must be a positive integer, got 0"
        );
        assert!(positive("tpm", -5).is_err());
        assert!(alias("gpt 4").is_err());
    }

    #[test]
    fn prices_are_bounded() {
        assert_eq!(price("price_input", 0).unwrap(), 0);
        assert_eq!(price("price_input", 2_500_000).unwrap(), 2_500_000);
        assert_eq!(
            price("price_output", MAX_PRICE_MICRO_USD_PER_MILLION).unwrap(),
            MAX_PRICE_MICRO_USD_PER_MILLION
        );
        assert_eq!(
            message(price("price_input", -1).unwrap_err()),
            "price_input must not be negative, got -1 micro-USD per million tokens"
        );
        assert_eq!(
            message(price("price_cache_read", MAX_PRICE_MICRO_USD_PER_MILLION + 1).unwrap_err()),
            "price_cache_read must be at most 1000000000000 micro-USD per million tokens ($1000000 per million tokens), got 1000000000001"
        );
        assert!(price("price_cache_write", i64::MIN).is_err());
        assert!(price("price_cache_write", i64::MAX).is_err());
    }

    #[test]
    fn budgets_are_bounded() {
        assert_eq!(budget(0).unwrap(), 0);
        assert_eq!(budget(100_000_000).unwrap(), 100_000_000);
        assert_eq!(budget(MAX_BUDGET_MICRO_USD).unwrap(), MAX_BUDGET_MICRO_USD);
        assert_eq!(
            message(budget(-1).unwrap_err()),
            "budget_micro_usd must not be negative, got -1 micro-USD"
        );
        assert_eq!(
            message(budget(MAX_BUDGET_MICRO_USD + 1).unwrap_err()),
            "budget_micro_usd must be at most 1000000000000000 micro-USD ($1000000000), got 1000000000000001"
        );
        assert!(budget(i64::MIN).is_err());
        assert!(budget(i64::MAX).is_err());
    }

    #[test]
    fn budget_periods_are_day_week_or_month() {
        for period in ["day", "week", "month"] {
            assert_eq!(budget_period(period).unwrap(), period);
        }
        assert_eq!(
            message(budget_period("year").unwrap_err()),
            "budget_period must be day, week or month, got \"year\""
        );
        for bad in ["", "Month", "DAY", " week", "monthly"] {
            assert!(budget_period(bad).is_err(), "{bad:?}");
        }
        assert!(
            message(budget_period_without_budget()).starts_with("budget_period needs a budget")
        );
    }

    #[test]
    fn user_key_errors_do_not_echo_the_key() {
        let msg = message(user_key("short").unwrap_err());
        assert!(!msg.contains("short"), "{msg}");
        let msg = message(user_key("vk-has zzqq-123").unwrap_err());
        assert!(!msg.contains("zzqq"), "{msg}");
        assert!(user_key("vk-front-1234").is_ok());
    }
}
