//! Rendering of API resources for stdout: `-o json` objects with the DESIGN §16 field names
//! (RFC 3339 timestamps, `null` for unset optionals, never a credential) and the table views
//! (`list` rows, `get`/`update` fields, `add` headline).

use std::collections::BTreeMap;

use llm_proxy_proto::Timestamp;
use llm_proxy_proto::v1::{
    Assignment, Connection, CreateVirtualKeyResponse, DataPlane, ProviderModel, VirtualKey,
};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::args::OutputFormat;
use crate::price::{format_usd, format_usd_6};
use crate::table::{format_fields, format_table};

/// Shown in tables for an unset value.
const NONE: &str = "-";

/// An API resource as the CLI shows it.
pub trait Resource {
    /// What `add` says it created, e.g. `connection`.
    const KIND: &'static str;
    /// Column headers of `list`.
    const HEADERS: &'static [&'static str];
    fn id(&self) -> &str;
    /// Shown in parentheses after the ID in `add` output.
    fn label(&self) -> String;
    /// The `-o json` object.
    fn to_json(&self) -> Value;
    /// The `get`/`update` lines.
    fn fields(&self) -> Vec<(&'static str, String)>;
    /// One `list` row, in [`Resource::HEADERS`] order.
    fn row(&self) -> Vec<String>;
}

impl Resource for Connection {
    const KIND: &'static str = "connection";
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "NAME",
        "PROVIDER",
        "ENDPOINT",
        "OPTIONS",
        "CREATED_AT",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn label(&self) -> String {
        self.name.clone()
    }

    fn to_json(&self) -> Value {
        let options: Map<String, Value> = sorted_options(self)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
            .collect();
        json!({
            "id": self.id,
            "name": self.name,
            "provider": self.provider,
            "endpoint": self.endpoint,
            "options": options,
            "created_at": rfc3339(self.created_at.as_ref()),
            "updated_at": rfc3339(self.updated_at.as_ref()),
        })
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("provider", self.provider.clone()),
            ("endpoint", self.endpoint.clone()),
            ("options", options_text(self)),
            ("created_at", full_time(self.created_at.as_ref())),
            ("updated_at", full_time(self.updated_at.as_ref())),
        ]
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.name.clone(),
            self.provider.clone(),
            self.endpoint.clone(),
            options_text(self),
            short_time(self.created_at.as_ref()),
        ]
    }
}

impl Resource for ProviderModel {
    const KIND: &'static str = "model";
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "CONNECTION_ID",
        "NAME",
        "REMOTE",
        "DEPLOYMENT",
        "IN_USD/1M",
        "OUT_USD/1M",
        "CACHE_READ_USD/1M",
        "CACHE_WRITE_USD/1M",
        "CREATED_AT",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn label(&self) -> String {
        self.name.clone()
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "connection_id": self.connection_id,
            "name": self.name,
            "remote": self.remote,
            "deployment": self.deployment,
            // Integers, micro-USD per million tokens (DESIGN §18): exact for any consumer.
            "price_input": self.price_input,
            "price_output": self.price_output,
            "price_cache_read": self.price_cache_read,
            "price_cache_write": self.price_cache_write,
            "created_at": rfc3339(self.created_at.as_ref()),
            "updated_at": rfc3339(self.updated_at.as_ref()),
        })
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        let price = |p: Option<i64>| {
            p.map_or_else(
                || NONE.to_owned(),
                |p| format!("{} USD/1M tokens", format_usd(p)),
            )
        };
        vec![
            ("id", self.id.clone()),
            ("connection_id", self.connection_id.clone()),
            ("name", self.name.clone()),
            ("remote", self.remote.clone()),
            ("deployment", or_none(self.deployment.as_deref())),
            ("price_input", price(self.price_input)),
            ("price_output", price(self.price_output)),
            ("price_cache_read", price(self.price_cache_read)),
            ("price_cache_write", price(self.price_cache_write)),
            ("created_at", full_time(self.created_at.as_ref())),
            ("updated_at", full_time(self.updated_at.as_ref())),
        ]
    }

    fn row(&self) -> Vec<String> {
        let price = |p: Option<i64>| p.map_or_else(|| NONE.to_owned(), format_usd);
        vec![
            self.id.clone(),
            self.connection_id.clone(),
            self.name.clone(),
            self.remote.clone(),
            or_none(self.deployment.as_deref()),
            price(self.price_input),
            price(self.price_output),
            price(self.price_cache_read),
            price(self.price_cache_write),
            short_time(self.created_at.as_ref()),
        ]
    }
}

impl Resource for VirtualKey {
    const KIND: &'static str = "virtual key";
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "NAME",
        "KEY_HINT",
        "ENABLED",
        "EXPIRES_AT",
        "BUDGET_USD",
        "CREATED_AT",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn label(&self) -> String {
        self.name.clone()
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "key_hint": self.key_hint,
            "enabled": self.enabled,
            "expires_at": rfc3339(self.expires_at.as_ref()),
            // A decimal string with 6 places (DESIGN §18): exact for any consumer.
            "budget_usd": self.budget_micro_usd.map(format_usd_6),
            "budget_period": self.budget_micro_usd.and(self.budget_period.as_deref()),
            "created_at": rfc3339(self.created_at.as_ref()),
            "updated_at": rfc3339(self.updated_at.as_ref()),
        })
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("key_hint", self.key_hint.clone()),
            ("enabled", self.enabled.to_string()),
            ("expires_at", expiry(self.expires_at.as_ref(), full_time)),
            ("budget_usd", budget(self)),
            ("created_at", full_time(self.created_at.as_ref())),
            ("updated_at", full_time(self.updated_at.as_ref())),
        ]
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.name.clone(),
            self.key_hint.clone(),
            self.enabled.to_string(),
            expiry(self.expires_at.as_ref(), short_time),
            budget(self),
            short_time(self.created_at.as_ref()),
        ]
    }
}

/// A key's budget for tables: USD per period (`100.00/month`), `-` without a budget.
fn budget(key: &VirtualKey) -> String {
    match (key.budget_micro_usd, key.budget_period.as_deref()) {
        (Some(micro_usd), Some(period)) => format!("{}/{period}", format_usd(micro_usd)),
        (Some(micro_usd), None) => format_usd(micro_usd),
        (None, _) => NONE.to_owned(),
    }
}

impl Resource for Assignment {
    const KIND: &'static str = "assignment";
    const HEADERS: &'static [&'static str] = &[
        "ID", "VKEY_ID", "MODEL_ID", "ALIAS", "TPS", "BURST", "TPM", "WEIGHT",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn label(&self) -> String {
        format!("alias {}", self.alias)
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "vkey_id": self.vkey_id,
            "model_id": self.model_id,
            "alias": self.alias,
            "tps": self.tps,
            "burst": self.burst,
            "tpm": self.tpm,
            "weight": self.weight,
            "created_at": rfc3339(self.created_at.as_ref()),
            "updated_at": rfc3339(self.updated_at.as_ref()),
        })
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("vkey_id", self.vkey_id.clone()),
            ("model_id", self.model_id.clone()),
            ("alias", self.alias.clone()),
            ("tps", limit(self.tps)),
            (
                "burst",
                self.burst
                    .map_or_else(|| NONE.to_owned(), |b| b.to_string()),
            ),
            ("tpm", limit(self.tpm)),
            ("weight", self.weight.to_string()),
            ("created_at", full_time(self.created_at.as_ref())),
            ("updated_at", full_time(self.updated_at.as_ref())),
        ]
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.vkey_id.clone(),
            self.model_id.clone(),
            self.alias.clone(),
            limit(self.tps),
            self.burst
                .map_or_else(|| NONE.to_owned(), |b| b.to_string()),
            limit(self.tpm),
            self.weight.to_string(),
        ]
    }
}

impl Resource for DataPlane {
    const KIND: &'static str = "data plane";
    const HEADERS: &'static [&'static str] = &[
        "NODE_ID",
        "APPLIED_VERSION",
        "LAST_SEEN",
        "CONNECTED",
        "BUILD",
        "ERROR",
    ];

    fn id(&self) -> &str {
        &self.node_id
    }

    fn label(&self) -> String {
        self.build.clone()
    }

    fn to_json(&self) -> Value {
        json!({
            "node_id": self.node_id,
            "applied_version": self.applied_version,
            "last_seen": rfc3339(self.last_seen.as_ref()),
            "connected": self.connected,
            "build": non_empty(&self.build),
            "error": non_empty(&self.error),
        })
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("node_id", self.node_id.clone()),
            ("applied_version", self.applied_version.to_string()),
            ("last_seen", full_time(self.last_seen.as_ref())),
            ("connected", self.connected.to_string()),
            ("build", or_none(non_empty(&self.build))),
            ("error", or_none(non_empty(&self.error))),
        ]
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.node_id.clone(),
            self.applied_version.to_string(),
            short_time(self.last_seen.as_ref()),
            self.connected.to_string(),
            or_none(non_empty(&self.build)),
            or_none(non_empty(&self.error)),
        ]
    }
}

/// A virtual key as `vkey add` prints it: the key itself, plus its plaintext when the control
/// plane generated it (shown this once).
pub fn created_vkey_json(response: &CreateVirtualKeyResponse) -> Value {
    let mut value = response
        .virtual_key
        .as_ref()
        .map_or_else(|| json!({}), Resource::to_json);
    if let (Some(key), Value::Object(object)) = (&response.generated_key, &mut value) {
        object.insert("key".to_owned(), Value::String(key.clone()));
    }
    value
}

/// `get`/`update` output.
pub fn one<R: Resource>(format: OutputFormat, item: &R) -> String {
    match format {
        OutputFormat::Json => json_text(&item.to_json()),
        // -o csv is refused before any command runs (commands::execute), except for usage.
        OutputFormat::Table | OutputFormat::Csv => format_fields(&item.fields()),
    }
}

/// `list` output.
pub fn list<R: Resource>(format: OutputFormat, items: &[R]) -> String {
    match format {
        OutputFormat::Json => json_text(&Value::Array(items.iter().map(R::to_json).collect())),
        OutputFormat::Table | OutputFormat::Csv => {
            let rows: Vec<Vec<String>> = items.iter().map(R::row).collect();
            format_table(R::HEADERS, &rows)
        }
    }
}

/// `add` output: the new ID first.
pub fn created<R: Resource>(format: OutputFormat, item: &R) -> String {
    match format {
        OutputFormat::Json => json_text(&item.to_json()),
        OutputFormat::Table | OutputFormat::Csv => {
            format!("{}{}", headline(item), format_fields(&item.fields()))
        }
    }
}

/// `vkey add` output: the new ID first, then the generated key with its shown-once note.
pub fn created_vkey(format: OutputFormat, response: &CreateVirtualKeyResponse) -> String {
    match format {
        OutputFormat::Json => json_text(&created_vkey_json(response)),
        OutputFormat::Table | OutputFormat::Csv => {
            let Some(vkey) = &response.virtual_key else {
                return "created virtual key\n".to_owned();
            };
            let mut out = headline(vkey);
            if let Some(key) = &response.generated_key {
                out.push_str(&format!("key: {key}\n"));
                out.push_str(
                    "note: the key is shown only this once; store it now, it cannot be retrieved later\n",
                );
            }
            out.push_str(&format_fields(&vkey.fields()));
            out
        }
    }
}

/// `delete` output.
pub fn deleted(format: OutputFormat, id: &str) -> String {
    match format {
        OutputFormat::Json => json_text(&json!({ "id": id, "deleted": true })),
        OutputFormat::Table | OutputFormat::Csv => format!("deleted {id}\n"),
    }
}

fn headline<R: Resource>(item: &R) -> String {
    let label = item.label();
    if label.is_empty() {
        format!("created {} {}\n", R::KIND, item.id())
    } else {
        format!("created {} {} ({label})\n", R::KIND, item.id())
    }
}

fn json_text(value: &Value) -> String {
    // Serializing a `Value` cannot fail; fall back to the compact form all the same.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

/// A protobuf timestamp as RFC 3339 in UTC, e.g. `2026-11-26T10:00:00.123456Z`.
pub fn rfc3339(ts: Option<&Timestamp>) -> Option<String> {
    to_datetime(ts?)?.format(&Rfc3339).ok()
}

fn to_datetime(ts: &Timestamp) -> Option<OffsetDateTime> {
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

fn full_time(ts: Option<&Timestamp>) -> String {
    rfc3339(ts).unwrap_or_else(|| NONE.to_owned())
}

/// RFC 3339 to the second, for table columns.
fn short_time(ts: Option<&Timestamp>) -> String {
    ts.and_then(to_datetime)
        .and_then(|at| at.replace_nanosecond(0).ok())
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_else(|| NONE.to_owned())
}

fn expiry(ts: Option<&Timestamp>, show: fn(Option<&Timestamp>) -> String) -> String {
    match ts {
        None => "never".to_owned(),
        Some(ts) => show(Some(ts)),
    }
}

fn limit(value: Option<i64>) -> String {
    value.map_or_else(|| "unlimited".to_owned(), |v| v.to_string())
}

fn or_none(value: Option<&str>) -> String {
    value.unwrap_or(NONE).to_owned()
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn sorted_options(conn: &Connection) -> BTreeMap<&str, &str> {
    conn.options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

fn options_text(conn: &Connection) -> String {
    let options = sorted_options(conn);
    if options.is_empty() {
        return NONE.to_owned();
    }
    options
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    /// 2026-11-26T10:00:00Z
    const T0: i64 = 1_795_687_200;

    fn keys(value: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys
    }

    fn sorted(mut names: Vec<&'static str>) -> Vec<&'static str> {
        names.sort_unstable();
        names
    }

    fn connection() -> Connection {
        Connection {
            id: "conn-abc".to_owned(),
            name: "OpenAI-Main".to_owned(),
            provider: "openai".to_owned(),
            endpoint: "https://api.openai.com".to_owned(),
            options: [
                ("timeout_s".to_owned(), "30".to_owned()),
                ("api_version".to_owned(), "v1".to_owned()),
            ]
            .into_iter()
            .collect(),
            created_at: ts(T0, 123_456_000),
            updated_at: ts(T0 + 60, 0),
        }
    }

    fn vkey() -> VirtualKey {
        VirtualKey {
            id: "vkey-abc".to_owned(),
            name: "Frontend-App".to_owned(),
            key_hint: "vk-fr…1234".to_owned(),
            enabled: true,
            expires_at: None,
            created_at: ts(T0, 0),
            updated_at: ts(T0, 0),
            budget_micro_usd: None,
            budget_period: None,
        }
    }

    fn assignment() -> Assignment {
        Assignment {
            id: "asg-abc".to_owned(),
            vkey_id: "vkey-abc".to_owned(),
            model_id: "model-abc".to_owned(),
            alias: "gpt-4".to_owned(),
            tps: Some(50),
            burst: None,
            tpm: None,
            weight: 1,
            created_at: ts(T0, 0),
            updated_at: ts(T0, 0),
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            rfc3339(ts(T0, 123_456_000).as_ref()).as_deref(),
            Some("2026-11-26T10:00:00.123456Z")
        );
        assert_eq!(
            rfc3339(ts(T0, 0).as_ref()).as_deref(),
            Some("2026-11-26T10:00:00Z")
        );
        assert_eq!(rfc3339(None), None);
        assert_eq!(
            short_time(ts(T0, 999_999_999).as_ref()),
            "2026-11-26T10:00:00Z"
        );
    }

    #[test]
    fn connection_json() {
        let value = connection().to_json();
        assert_eq!(
            keys(&value),
            sorted(vec![
                "id",
                "name",
                "provider",
                "endpoint",
                "options",
                "created_at",
                "updated_at"
            ])
        );
        assert_eq!(value["id"], "conn-abc");
        assert_eq!(value["provider"], "openai");
        assert_eq!(
            value["options"],
            json!({"api_version": "v1", "timeout_s": "30"})
        );
        assert_eq!(value["created_at"], "2026-11-26T10:00:00.123456Z");
        assert_eq!(value["updated_at"], "2026-11-26T10:01:00Z");

        let empty = Connection {
            options: Default::default(),
            created_at: None,
            ..connection()
        }
        .to_json();
        assert_eq!(empty["options"], json!({}));
        assert!(empty["created_at"].is_null());
    }

    fn model() -> ProviderModel {
        ProviderModel {
            id: "model-abc".to_owned(),
            connection_id: "conn-abc".to_owned(),
            name: "gpt-4-turbo".to_owned(),
            remote: "gpt-4-turbo-preview".to_owned(),
            deployment: None,
            created_at: ts(T0, 0),
            updated_at: ts(T0, 0),
            ..ProviderModel::default()
        }
    }

    /// gpt-4o's prices: $2.50 in, $10 out, $1.25 cached, no cache-write price.
    fn priced_model() -> ProviderModel {
        ProviderModel {
            name: "gpt-4o".to_owned(),
            price_input: Some(2_500_000),
            price_output: Some(10_000_000),
            price_cache_read: Some(1_250_000),
            price_cache_write: None,
            ..model()
        }
    }

    #[test]
    fn model_json() {
        let model = model();
        let value = model.to_json();
        assert_eq!(
            keys(&value),
            sorted(vec![
                "id",
                "connection_id",
                "name",
                "remote",
                "deployment",
                "price_input",
                "price_output",
                "price_cache_read",
                "price_cache_write",
                "created_at",
                "updated_at"
            ])
        );
        assert!(value["deployment"].is_null());
        for price in [
            "price_input",
            "price_output",
            "price_cache_read",
            "price_cache_write",
        ] {
            assert!(value[price].is_null(), "{price}");
        }
        assert_eq!(value["remote"], "gpt-4-turbo-preview");
        let with = ProviderModel {
            deployment: Some("gpt4-prod".to_owned()),
            ..model
        };
        assert_eq!(with.to_json()["deployment"], "gpt4-prod");
    }

    #[test]
    fn model_prices_are_integers_in_json_and_usd_in_tables() {
        let value = priced_model().to_json();
        assert_eq!(value["price_input"], 2_500_000);
        assert_eq!(value["price_output"], 10_000_000);
        assert_eq!(value["price_cache_read"], 1_250_000);
        assert!(value["price_cache_write"].is_null());

        let text = one(OutputFormat::Table, &priced_model());
        assert!(
            text.contains(
                "price_input: 2.50 USD/1M tokens\nprice_output: 10.00 USD/1M tokens\nprice_cache_read: 1.25 USD/1M tokens\nprice_cache_write: -\n"
            ),
            "{text}"
        );
        let tiny = ProviderModel {
            price_input: Some(1),
            price_cache_write: Some(3_125_000),
            ..model()
        };
        let text = list(OutputFormat::Table, &[priced_model(), tiny]);
        let lines: Vec<&str> = text.lines().collect();
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[0]),
            [
                "ID",
                "CONNECTION_ID",
                "NAME",
                "REMOTE",
                "DEPLOYMENT",
                "IN_USD/1M",
                "OUT_USD/1M",
                "CACHE_READ_USD/1M",
                "CACHE_WRITE_USD/1M",
                "CREATED_AT"
            ]
        );
        assert_eq!(cells(lines[1])[5..9], ["2.50", "10.00", "1.25", "-"]);
        assert_eq!(cells(lines[2])[5..9], ["0.000001", "-", "-", "3.125"]);
    }

    #[test]
    fn vkey_json_has_no_key_unless_generated() {
        let value = vkey().to_json();
        let expected = sorted(vec![
            "id",
            "name",
            "key_hint",
            "enabled",
            "expires_at",
            "budget_usd",
            "budget_period",
            "created_at",
            "updated_at",
        ]);
        assert_eq!(keys(&value), expected);
        assert!(value["expires_at"].is_null());
        assert!(value["budget_usd"].is_null());
        assert!(value["budget_period"].is_null());
        assert_eq!(value["enabled"], true);

        let chosen = CreateVirtualKeyResponse {
            virtual_key: Some(vkey()),
            generated_key: None,
        };
        assert_eq!(keys(&created_vkey_json(&chosen)), expected);

        let generated = CreateVirtualKeyResponse {
            virtual_key: Some(VirtualKey {
                expires_at: ts(T0 + 86_400, 0),
                ..vkey()
            }),
            generated_key: Some("vk-generated-secret".to_owned()),
        };
        let value = created_vkey_json(&generated);
        let mut with_key = expected.clone();
        with_key.push("key");
        assert_eq!(keys(&value), sorted(with_key));
        assert_eq!(value["key"], "vk-generated-secret");
        assert_eq!(value["expires_at"], "2026-11-27T10:00:00Z");

        let table = created_vkey(OutputFormat::Table, &generated);
        let mut lines = table.lines();
        assert_eq!(
            lines.next(),
            Some("created virtual key vkey-abc (Frontend-App)")
        );
        assert_eq!(lines.next(), Some("key: vk-generated-secret"));
        assert!(table.contains("shown only"));
        let table = created_vkey(OutputFormat::Table, &chosen);
        assert!(!table.contains("key: ") && !table.contains("shown only"));
    }

    #[test]
    fn vkey_budget_is_a_decimal_string_in_json_and_usd_per_period_in_tables() {
        let budgeted = VirtualKey {
            budget_micro_usd: Some(100_000_000),
            budget_period: Some("month".to_owned()),
            ..vkey()
        };
        let value = budgeted.to_json();
        assert_eq!(value["budget_usd"], "100.000000");
        assert_eq!(value["budget_period"], "month");
        let daily = VirtualKey {
            budget_micro_usd: Some(2_500_001),
            budget_period: Some("day".to_owned()),
            ..vkey()
        };
        assert_eq!(daily.to_json()["budget_usd"], "2.500001");

        let text = one(OutputFormat::Table, &budgeted);
        assert!(
            text.contains(
                "budget_usd: 100.00/month
"
            ),
            "{text}"
        );
        let text = one(OutputFormat::Table, &vkey());
        assert!(
            text.contains(
                "budget_usd: -
"
            ),
            "{text}"
        );

        let text = list(OutputFormat::Table, &[budgeted, daily, vkey()]);
        let lines: Vec<&str> = text.lines().collect();
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[0]),
            [
                "ID",
                "NAME",
                "KEY_HINT",
                "ENABLED",
                "EXPIRES_AT",
                "BUDGET_USD",
                "CREATED_AT"
            ]
        );
        assert_eq!(cells(lines[1])[5], "100.00/month");
        assert_eq!(cells(lines[2])[5], "2.500001/day");
        assert_eq!(cells(lines[3])[5], "-");
    }

    #[test]
    fn assignment_json() {
        let value = assignment().to_json();
        assert_eq!(
            keys(&value),
            sorted(vec![
                "id",
                "vkey_id",
                "model_id",
                "alias",
                "tps",
                "burst",
                "tpm",
                "weight",
                "created_at",
                "updated_at"
            ])
        );
        assert_eq!(value["tps"], 50);
        assert!(value["burst"].is_null());
        assert!(value["tpm"].is_null());
        assert_eq!(value["weight"], 1);
    }

    #[test]
    fn dataplane_json() {
        let dp = DataPlane {
            node_id: "dp-1".to_owned(),
            applied_version: 42,
            last_seen: ts(T0, 0),
            connected: true,
            build: "0.1.0".to_owned(),
            error: String::new(),
        };
        let value = dp.to_json();
        assert_eq!(
            keys(&value),
            sorted(vec![
                "node_id",
                "applied_version",
                "last_seen",
                "connected",
                "build",
                "error"
            ])
        );
        assert_eq!(value["applied_version"], 42);
        assert_eq!(value["last_seen"], "2026-11-26T10:00:00Z");
        assert_eq!(value["connected"], true);
        assert!(value["error"].is_null());
    }

    #[test]
    fn list_json_is_an_array_and_delete_is_an_object() {
        let text = list(OutputFormat::Json, &[assignment(), assignment()]);
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value.as_array().map(Vec::len), Some(2));
        let empty: Value =
            serde_json::from_str(&list::<Assignment>(OutputFormat::Json, &[])).unwrap();
        assert_eq!(empty, json!([]));
        let value: Value = serde_json::from_str(&deleted(OutputFormat::Json, "asg-abc")).unwrap();
        assert_eq!(value, json!({"id": "asg-abc", "deleted": true}));
        assert_eq!(deleted(OutputFormat::Table, "asg-abc"), "deleted asg-abc\n");
    }

    #[test]
    fn table_views() {
        let text = list(OutputFormat::Table, &[connection()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID        NAME         PROVIDER"));
        assert!(lines[1].contains("api_version=v1,timeout_s=30"));
        assert!(lines[1].ends_with("2026-11-26T10:00:00Z"));

        let text = created(OutputFormat::Table, &connection());
        assert!(text.starts_with("created connection conn-abc (OpenAI-Main)\nid: conn-abc\n"));

        let text = one(OutputFormat::Table, &assignment());
        assert!(
            text.contains("tps: 50\nburst: -\ntpm: unlimited\n"),
            "{text}"
        );
        let text = one(OutputFormat::Table, &vkey());
        assert!(text.contains("expires_at: never\n"), "{text}");
    }
}
