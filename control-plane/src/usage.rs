//! Usage accounting (DESIGN §18): the checks on a data plane's `ReportUsage` batch, the filters
//! and groups of `QueryUsage`, and the exact money arithmetic between them.
//!
//! Money is integer pico-USD (1e-12 USD) throughout. One stored row (one key, assignment and hour)
//! holds at most `i64::MAX` pico-USD, about 9.2 million USD; sums over rows are taken in SQL in
//! two parts that cannot overflow (whole micro-USD and the pico-USD remainder) and joined here in
//! `u128`, so totals stay exact however many rows they cover.

use crate::error::StoreError;
use crate::rows::UsageRow;
use std::collections::BTreeMap;

/// The most rows one batch may carry: bounds the work and the transaction of one call. A data
/// plane aggregating per (key, assignment, hour) every 10 s stays far below it; a larger batch is
/// refused and must be split.
pub const MAX_BATCH_ROWS: usize = 10_000;

/// The longest node id or boot id accepted.
pub const MAX_ID_LEN: usize = 200;

const HOUR_SECS: i64 = 3600;
pub const DAY_SECS: i64 = 86_400;
/// Pico-USD in one micro-USD: where the stored cost is split for summing.
pub const PICO_PER_MICRO: i64 = 1_000_000;

/// One batch as the store writes it: validated, rows merged per (key, assignment, hour).
#[derive(Debug, Clone)]
pub struct UsageBatch {
    pub node_id: String,
    pub boot_id: String,
    pub sequence: i64,
    pub rows: Vec<UsageRow>,
}

/// What `QueryUsage` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Vkey,
    Model,
    Alias,
    Day,
    Hour,
}

/// `QueryUsage` filters. `since`/`until` are unix seconds already turned into bucket bounds:
/// an hour bucket is included when `since <= hour < until`.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub vkey: Option<String>,
    pub model: Option<String>,
    pub alias: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub group_by: Vec<Group>,
}

/// One group's sums; the group columns not asked for are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSum {
    pub vkey_id: Option<String>,
    pub vkey_name: Option<String>,
    pub model_id: Option<String>,
    pub model_name: Option<String>,
    pub alias: Option<String>,
    /// Unix seconds of the UTC day's start.
    pub day: Option<i64>,
    /// Unix seconds of the hour's start.
    pub hour: Option<i64>,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_pico_usd: u128,
}

/// A node id or boot id: 1 to [`MAX_ID_LEN`] characters, trimmed.
pub fn batch_id(field: &'static str, value: &str) -> Result<String, StoreError> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > MAX_ID_LEN {
        return Err(StoreError::invalid(
            field,
            format!("must be 1 to {MAX_ID_LEN} characters"),
        ));
    }
    Ok(value.to_owned())
}

/// The batch's sequence number, stored in a signed 64-bit column.
pub fn sequence(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::invalid("sequence", format!("must be at most {}", i64::MAX)))
}

/// A cost in pico-USD given as a decimal string of digits; at most `i64::MAX` (one row's bound).
pub fn parse_cost(field: &'static str, value: &str) -> Result<i64, StoreError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StoreError::invalid(
            field,
            format!("must be a non-negative integer of pico-USD written in digits, got {value:?}"),
        ));
    }
    // Digits only, so the one parse failure left is a value too large for 64 bits.
    value.parse::<i64>().map_err(|_| {
        StoreError::invalid(
            field,
            format!(
                "must be at most {} pico-USD (about 9.2 million USD for one key, assignment and hour), got {value}",
                i64::MAX
            ),
        )
    })
}

/// The start of an hour bucket: a non-negative multiple of 3600 seconds.
pub fn hour(field: &'static str, value: i64) -> Result<i64, StoreError> {
    if value < 0 || value % HOUR_SECS != 0 {
        return Err(StoreError::invalid(
            field,
            format!(
                "must be the unix seconds of an hour's start (a non-negative multiple of 3600), got {value}"
            ),
        ));
    }
    Ok(value)
}

pub fn count(field: &'static str, value: i64) -> Result<i64, StoreError> {
    if value < 0 {
        return Err(StoreError::invalid(
            field,
            format!("must not be negative, got {value}"),
        ));
    }
    Ok(value)
}

/// `since` as a bucket bound: rounded down to its hour.
pub fn since_bound(unix_secs: i64) -> i64 {
    unix_secs.div_euclid(HOUR_SECS) * HOUR_SECS
}

/// `until` as a bucket bound: a bucket starting at whole second `s` is before `until` (given as
/// seconds and nanos) when `s < seconds`, or `s <= seconds` once there is a fraction.
pub fn until_bound(seconds: i64, nanos: i32) -> i64 {
    if nanos > 0 {
        seconds.saturating_add(1)
    } else {
        seconds
    }
}

/// Adds `more` to `into` field by field; an overflow names the field.
fn add_into(into: &mut UsageRow, more: &UsageRow) -> Result<(), StoreError> {
    let pairs: [(&'static str, &mut i64, i64); 7] = [
        ("requests", &mut into.requests, more.requests),
        ("input_tokens", &mut into.input_tokens, more.input_tokens),
        ("output_tokens", &mut into.output_tokens, more.output_tokens),
        (
            "cache_read_tokens",
            &mut into.cache_read_tokens,
            more.cache_read_tokens,
        ),
        (
            "cache_write_tokens",
            &mut into.cache_write_tokens,
            more.cache_write_tokens,
        ),
        (
            "reasoning_tokens",
            &mut into.reasoning_tokens,
            more.reasoning_tokens,
        ),
        ("cost_pico_usd", &mut into.cost_pico_usd, more.cost_pico_usd),
    ];
    for (field, total, add) in pairs {
        *total = total.checked_add(add).ok_or_else(|| {
            StoreError::invalid(field, "overflows 64 bits when the batch's rows for one key, assignment and hour are added")
        })?;
    }
    Ok(())
}

/// Rows of one batch merged per (key, assignment, hour), sorted by that key: every writer then
/// locks stored rows in the same order (no deadlock between concurrent batches), and a row is
/// written once per batch. The last row's names, model and alias win.
pub fn merge(rows: Vec<UsageRow>) -> Result<Vec<UsageRow>, StoreError> {
    let mut merged: BTreeMap<(String, String, i64), UsageRow> = BTreeMap::new();
    for row in rows {
        let key = (row.vkey_id.clone(), row.assignment_id.clone(), row.hour);
        match merged.get_mut(&key) {
            Some(existing) => {
                add_into(existing, &row)?;
                existing.vkey_name = row.vkey_name;
                existing.model_id = row.model_id;
                existing.model_name = row.model_name;
                existing.alias = row.alias;
            }
            None => {
                merged.insert(key, row);
            }
        }
    }
    Ok(merged.into_values().collect())
}

/// Joins the two SQL partial sums into pico-USD: `micro` whole micro-USD plus `pico` pico-USD.
pub fn join_cost(micro: i64, pico: i64) -> Result<u128, StoreError> {
    let micro = u128::try_from(micro)
        .map_err(|_| StoreError::Database(format!("negative cost sum {micro} in usage_hourly")))?;
    let pico = u128::try_from(pico)
        .map_err(|_| StoreError::Database(format!("negative cost sum {pico} in usage_hourly")))?;
    // Cannot overflow: both parts come from i64 sums, far below u128's range after scaling.
    Ok(micro * 1_000_000 + pico)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn row(vkey: &str, hour: i64, requests: i64, cost: i64) -> UsageRow {
        UsageRow {
            vkey_id: vkey.into(),
            assignment_id: "asg-1".into(),
            hour,
            vkey_name: String::new(),
            model_id: "model-1".into(),
            model_name: String::new(),
            alias: "a".into(),
            requests,
            input_tokens: 1,
            output_tokens: 2,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            cost_pico_usd: cost,
        }
    }

    #[test]
    fn costs_are_digits_within_64_bits() {
        assert_eq!(parse_cost("cost_pico_usd", "0").unwrap(), 0);
        assert_eq!(
            parse_cost("cost_pico_usd", "9223372036854775807").unwrap(),
            i64::MAX
        );
        for bad in ["", "-1", "1.5", "1e6", " 1", "abc", "9223372036854775808"] {
            let err = parse_cost("cost_pico_usd", bad).unwrap_err().to_string();
            assert!(err.starts_with("cost_pico_usd "), "{bad:?}: {err}");
        }
    }

    #[test]
    fn hours_are_on_the_hour() {
        assert_eq!(hour("hour_unix", 7200).unwrap(), 7200);
        assert!(hour("hour_unix", 7201).is_err());
        assert!(hour("hour_unix", -3600).is_err());
    }

    #[test]
    fn bounds_round_as_documented() {
        assert_eq!(since_bound(7199), 3600);
        assert_eq!(since_bound(7200), 7200);
        assert_eq!(until_bound(7200, 0), 7200);
        assert_eq!(until_bound(7200, 1), 7201);
    }

    #[test]
    fn merge_adds_rows_of_one_bucket_and_sorts() {
        let merged = merge(vec![
            row("vkey-b", 3600, 1, 5),
            row("vkey-a", 3600, 2, 7),
            row("vkey-b", 3600, 3, 11),
        ])
        .unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].vkey_id, "vkey-a");
        assert_eq!(
            (
                merged[1].requests,
                merged[1].cost_pico_usd,
                merged[1].input_tokens
            ),
            (4, 16, 2)
        );
        let err = merge(vec![row("k", 0, 1, i64::MAX), row("k", 0, 1, 1)]).unwrap_err();
        assert!(err.to_string().starts_with("cost_pico_usd "), "{err}");
    }

    #[test]
    fn cost_parts_join_exactly() {
        assert_eq!(join_cost(0, 0).unwrap(), 0);
        assert_eq!(
            join_cost(i64::MAX, 999_999).unwrap(),
            u128::from(i64::MAX.unsigned_abs()) * 1_000_000 + 999_999
        );
    }
}
