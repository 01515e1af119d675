//! `llmctl usage` (DESIGN §18): the `--since`/`--until` grammar, and the rendering of
//! `QueryUsage` sums as a table, JSON or CSV. Money stays integer: pico-USD from the API, rounded
//! half up to micro-USD, printed as a 6-place decimal string; never a float.

use clap::ValueEnum;
use llm_proxy_proto::Timestamp;
use llm_proxy_proto::v1::{UsageGroup, UsageTotal};
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime};

use crate::args::OutputFormat;
use crate::table::format_table;

/// A `--since`/`--until` value as typed: a point in time, or a span back from when the command
/// runs (resolved then, so that parsing does not read the clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeArg {
    At(Timestamp),
    /// Seconds before now.
    Ago(i64),
}

impl TimeArg {
    pub fn resolve(self, now_unix: i64) -> Timestamp {
        match self {
            TimeArg::At(ts) => ts,
            TimeArg::Ago(secs) => Timestamp {
                seconds: now_unix.saturating_sub(secs),
                nanos: 0,
            },
        }
    }
}

/// Parses T: RFC 3339 (`2026-12-01T10:00:00Z`), a date (`2026-12-01`, 00:00 UTC), or a span
/// back from now (`24h`, `7d`).
pub fn parse_time(text: &str) -> Result<TimeArg, String> {
    let s = text.trim();
    let hint = "expected RFC 3339 (2026-12-01T10:00:00Z), a date (2026-12-01) or a span back from now (24h, 7d)";
    if let Some((digits, unit)) = s
        .strip_suffix('h')
        .map(|d| (d, 3600))
        .or_else(|| s.strip_suffix('d').map(|d| (d, 86_400)))
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
    {
        let secs = digits
            .parse::<i64>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .ok_or_else(|| format!("`{s}` is too long a span"))?;
        return Ok(TimeArg::Ago(secs));
    }
    if let Some(date) = parse_date(s) {
        let at = date.midnight().assume_utc();
        return Ok(TimeArg::At(Timestamp {
            seconds: at.unix_timestamp(),
            nanos: 0,
        }));
    }
    let at = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| format!("`{s}`: {hint}"))?;
    Ok(TimeArg::At(Timestamp {
        seconds: at.unix_timestamp(),
        // Below 1e9, so it fits.
        nanos: i32::try_from(at.nanosecond()).unwrap_or(0),
    }))
}

/// `YYYY-MM-DD`, a real calendar date.
fn parse_date(s: &str) -> Option<Date> {
    let mut parts = s.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || y.len() != 4
        || m.len() != 2
        || d.len() != 2
        || ![y, m, d]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
    Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()
}

/// `--group-by` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum GroupBy {
    Vkey,
    Model,
    Alias,
    Day,
    Hour,
}

impl GroupBy {
    pub fn proto(self) -> UsageGroup {
        match self {
            GroupBy::Vkey => UsageGroup::Vkey,
            GroupBy::Model => UsageGroup::Model,
            GroupBy::Alias => UsageGroup::Alias,
            GroupBy::Day => UsageGroup::Day,
            GroupBy::Hour => UsageGroup::Hour,
        }
    }
}

const PICO_PER_MICRO: u128 = 1_000_000;

/// Pico-USD rounded half up to micro-USD.
pub fn micro_usd(pico: u128) -> u128 {
    pico.saturating_add(PICO_PER_MICRO / 2) / PICO_PER_MICRO
}

/// Micro-USD as a USD decimal string with 6 places, e.g. `12.345679`.
pub fn usd(micro: u128) -> String {
    format!("{}.{:06}", micro / PICO_PER_MICRO, micro % PICO_PER_MICRO)
}

/// The API's decimal pico-USD string.
fn pico(total: &UsageTotal) -> Result<u128, String> {
    total.cost_pico_usd.parse().map_err(|_| {
        format!(
            "the control plane sent cost_pico_usd {:?}, not an integer",
            total.cost_pico_usd
        )
    })
}

fn seconds(ts: Option<&Timestamp>) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(ts?.seconds).ok()
}

fn day_text(ts: Option<&Timestamp>) -> String {
    seconds(ts).map_or_else(String::new, |t| {
        format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
    })
}

fn hour_text(ts: Option<&Timestamp>) -> String {
    seconds(ts)
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// One output row: named cells in order (group columns, then sums). Integers stay integers in
/// JSON; everything is text in the table and CSV.
fn cells(groups: &[GroupBy], total: &UsageTotal) -> Result<Vec<(&'static str, Value)>, String> {
    let text = |v: &Option<String>| Value::String(v.clone().unwrap_or_default());
    let mut out = Vec::new();
    for group in groups {
        match group {
            GroupBy::Vkey => {
                out.push(("vkey_id", text(&total.vkey_id)));
                out.push(("vkey_name", text(&total.vkey_name)));
            }
            GroupBy::Model => {
                out.push(("model_id", text(&total.model_id)));
                out.push(("model_name", text(&total.model_name)));
            }
            GroupBy::Alias => out.push(("alias", text(&total.alias))),
            GroupBy::Day => out.push(("day", Value::String(day_text(total.day.as_ref())))),
            GroupBy::Hour => out.push(("hour", Value::String(hour_text(total.hour.as_ref())))),
        }
    }
    let micro = micro_usd(pico(total)?);
    let micro_json = u64::try_from(micro)
        .map(Value::from)
        .map_err(|_| format!("cost of {micro} micro-USD is too large to print"))?;
    out.extend([
        ("requests", json!(total.requests)),
        ("input_tokens", json!(total.input_tokens)),
        ("output_tokens", json!(total.output_tokens)),
        ("cache_read_tokens", json!(total.cache_read_tokens)),
        ("cache_write_tokens", json!(total.cache_write_tokens)),
        ("reasoning_tokens", json!(total.reasoning_tokens)),
        ("cost_micro_usd", micro_json),
        ("cost_usd", Value::String(usd(micro))),
    ]);
    Ok(out)
}

/// The rows as a pretty JSON array, keys in column order (serde_json's map would sort them,
/// and the order is part of the contract: group columns first, then the sums).
fn json_array(rows: &[Vec<(&'static str, Value)>]) -> Result<String, String> {
    let encode =
        |v: &Value| serde_json::to_string(v).map_err(|e| format!("cannot print JSON: {e}"));
    if rows.is_empty() {
        return Ok("[]\n".to_owned());
    }
    let mut objects = Vec::with_capacity(rows.len());
    for row in rows {
        let mut fields = Vec::with_capacity(row.len());
        for (key, value) in row {
            fields.push(format!(
                "    {}: {}",
                encode(&Value::String((*key).to_owned()))?,
                encode(value)?
            ));
        }
        objects.push(format!("  {{\n{}\n  }}", fields.join(",\n")));
    }
    Ok(format!("[\n{}\n]\n", objects.join(",\n")))
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A CSV field, quoted when it holds a separator, a quote or a line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Groups in the order the columns appear (and the server sorts): vkey, model, alias, day, hour.
pub fn canonical(groups: &[GroupBy]) -> Vec<GroupBy> {
    let mut groups = groups.to_vec();
    groups.sort_unstable();
    groups.dedup();
    groups
}

pub fn render(
    format: OutputFormat,
    groups: &[GroupBy],
    totals: &[UsageTotal],
) -> Result<String, String> {
    let rows = totals
        .iter()
        .map(|t| cells(groups, t))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match format {
        OutputFormat::Json => json_array(&rows)?,
        OutputFormat::Csv => {
            let header = header(groups, false);
            let mut text = header.join(",");
            text.push('\n');
            for row in rows {
                let line: Vec<String> = row.iter().map(|(_, v)| csv_field(&plain(v))).collect();
                text.push_str(&line.join(","));
                text.push('\n');
            }
            text
        }
        OutputFormat::Table => {
            // Upper-case headers like every other llmctl table.
            let header: Vec<String> = header(groups, true)
                .iter()
                .map(|h| h.to_ascii_uppercase())
                .collect();
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            // The table shows USD only: the micro-USD column is for scripts.
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|row| {
                    row.iter()
                        .filter(|(k, _)| *k != "cost_micro_usd")
                        .map(|(_, v)| plain(v))
                        .collect()
                })
                .collect();
            format_table(&header, &body)
        }
    })
}

fn header(groups: &[GroupBy], table: bool) -> Vec<&'static str> {
    let empty = UsageTotal {
        cost_pico_usd: "0".into(),
        ..Default::default()
    };
    // Same column list as the rows: taken from an empty row, so the two never disagree.
    cells(groups, &empty)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !(table && *k == "cost_micro_usd"))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_three_forms() {
        assert_eq!(parse_time("24h").unwrap(), TimeArg::Ago(86_400));
        assert_eq!(parse_time("7d").unwrap(), TimeArg::Ago(7 * 86_400));
        assert_eq!(
            parse_time("7d").unwrap().resolve(1_000_000),
            Timestamp {
                seconds: 1_000_000 - 604_800,
                nanos: 0
            }
        );
        // 2026-12-01T00:00:00Z
        assert_eq!(
            parse_time("2026-12-01").unwrap(),
            TimeArg::At(Timestamp {
                seconds: 1_796_083_200,
                nanos: 0
            })
        );
        assert_eq!(
            parse_time("2026-12-01T01:30:00+01:00").unwrap(),
            TimeArg::At(Timestamp {
                seconds: 1_796_083_200 + 1800,
                nanos: 0
            })
        );
        assert_eq!(
            parse_time("2026-12-01T00:00:00.5Z").unwrap(),
            TimeArg::At(Timestamp {
                seconds: 1_796_083_200,
                nanos: 500_000_000
            })
        );
    }

    #[test]
    fn bad_times_are_refused() {
        for bad in [
            "",
            "h",
            "24",
            "-24h",
            "1.5d",
            "24m",
            "2026-13-01",
            "2026-02-30",
            "2026-1-1",
            "yesterday",
            "99999999999999999999d",
        ] {
            let err = parse_time(bad).unwrap_err();
            assert!(!err.contains('\n'), "{bad:?}: {err}");
        }
    }

    #[test]
    fn cost_rounds_half_up_to_micro_usd() {
        assert_eq!(micro_usd(0), 0);
        assert_eq!(micro_usd(499_999), 0);
        assert_eq!(micro_usd(500_000), 1);
        assert_eq!(micro_usd(1_499_999), 1);
        assert_eq!(micro_usd(1_500_000), 2);
        assert_eq!(usd(0), "0.000000");
        assert_eq!(usd(12_345_679), "12.345679");
        assert_eq!(usd(1), "0.000001");
    }

    fn total() -> UsageTotal {
        UsageTotal {
            vkey_id: Some("vkey-abc".into()),
            vkey_name: Some("Front, end".into()),
            day: Some(Timestamp {
                seconds: 1_796_083_200,
                nanos: 0,
            }),
            hour: Some(Timestamp {
                seconds: 1_796_086_800,
                nanos: 0,
            }),
            requests: 3,
            input_tokens: 1200,
            output_tokens: 300,
            cache_read_tokens: 100,
            cache_write_tokens: 0,
            reasoning_tokens: 50,
            cost_pico_usd: "12345678500000".into(),
            ..Default::default()
        }
    }

    #[test]
    fn json_has_group_columns_then_sums() {
        let groups = canonical(&[GroupBy::Hour, GroupBy::Vkey, GroupBy::Day]);
        let text = render(OutputFormat::Json, &groups, &[total()]).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        let object = value[0].as_object().unwrap();
        // Key order as printed (the parsed map sorts its keys).
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split('"').next())
            .collect();
        assert_eq!(
            keys,
            [
                "vkey_id",
                "vkey_name",
                "day",
                "hour",
                "requests",
                "input_tokens",
                "output_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
                "cost_micro_usd",
                "cost_usd"
            ]
        );
        assert_eq!(object["day"], "2026-12-01");
        assert_eq!(object["hour"], "2026-12-01T01:00:00Z");
        assert_eq!(object["cost_micro_usd"], 12_345_679);
        assert_eq!(object["cost_usd"], "12.345679");
        assert_eq!(object["requests"], 3);
    }

    #[test]
    fn no_rows_is_an_empty_array() {
        assert_eq!(render(OutputFormat::Json, &[], &[]).unwrap(), "[]\n");
    }

    #[test]
    fn csv_has_a_header_and_quotes_what_needs_it() {
        let text = render(OutputFormat::Csv, &[GroupBy::Vkey], &[total()]).unwrap();
        assert_eq!(
            text,
            "vkey_id,vkey_name,requests,input_tokens,output_tokens,cache_read_tokens,cache_write_tokens,reasoning_tokens,cost_micro_usd,cost_usd\n\
             vkey-abc,\"Front, end\",3,1200,300,100,0,50,12345679,12.345679\n"
        );
    }

    #[test]
    fn table_shows_usd() {
        let text = render(OutputFormat::Table, &[], &[total()]).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("REQUESTS"), "{text}");
        assert!(lines[0].ends_with("COST_USD"), "{text}");
        assert!(!lines[0].contains("MICRO"), "{text}");
        assert!(lines[1].ends_with("12.345679"), "{text}");
    }
}
