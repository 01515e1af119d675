//! Command-line grammar of `llmctl` (clap derive): global flags, the command tree, and the value
//! parsers for `--set key=value` and RFC 3339 timestamps.
//!
//! The flag names are a contract (DESIGN §3, §4, §16): users, scripts and tests type them.

use std::path::PathBuf;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use llm_proxy_catalog::Provider;
use llm_proxy_proto::Timestamp;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::price::{UsdArg, parse_budget, parse_price};
use crate::serve::ServeArgs;
use crate::usage::{GroupBy, TimeArg, parse_time};

/// Default address of the control plane's gRPC API.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8131";

/// The old name of `LLMCTL_SERVER`, still read when `LLMCTL_SERVER` is unset (DESIGN §3).
pub const LEGACY_SERVER_ENV: &str = "LLMCTL_ENDPOINT";

/// Clap id of the global `--server`. It differs from the id of the provider `--endpoint` of
/// `connection add|update` so that the two never exchange values.
const CP_ENDPOINT_ID: &str = "cp_endpoint";

/// Help section of the flags that work with every command.
const GLOBAL: &str = "Global options";

/// llmctl: admin CLI of llm-proxy, and `llmctl serve`, the all-in-one gateway.
#[derive(Debug, Parser)]
#[command(name = "llmctl", version, about, propagate_version = true)]
pub struct Cli {
    /// Address of the control plane's gRPC API [default: http://127.0.0.1:8131].
    ///
    /// Also accepted: `--endpoint URL` before the subcommand and the env var LLMCTL_ENDPOINT (the
    /// old names). In `connection add|update`, `--endpoint` is the provider's URL.
    #[arg(
        long = "server",
        // The old flag name; `connection add|update` keep `--endpoint` for the provider's URL
        // (see ControlPlaneEndpointSlot).
        alias = "endpoint",
        help_heading = GLOBAL,
        id = CP_ENDPOINT_ID,
        env = "LLMCTL_SERVER",
        value_name = "URL",
        global = true
    )]
    pub server: Option<String>,

    /// Admin token, sent as `authorization: Bearer <token>`.
    #[arg(
        long,
        env = "LLMCTL_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = GLOBAL
    )]
    pub token: Option<String>,

    /// CA bundle (PEM) that signed the control plane's certificate, for an https:// endpoint
    /// whose certificate is not from a public CA.
    #[arg(long, env = "LLMCTL_TLS_CA", global = true, help_heading = GLOBAL, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for a control plane that requires mTLS.
    #[arg(long, env = "LLMCTL_TLS_CERT", global = true, help_heading = GLOBAL, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// Key (PEM) of the client certificate.
    #[arg(long, env = "LLMCTL_TLS_KEY", global = true, help_heading = GLOBAL, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// Allow a plaintext `http://` control-plane address that is not loopback (only on a private
    /// network: the admin token and the calls would cross it in clear).
    #[arg(
        long,
        env = "LLM_PROXY_ALLOW_PLAINTEXT",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new(),
        global = true,
        help_heading = GLOBAL
    )]
    pub allow_plaintext: bool,

    /// Output format.
    #[arg(
        short = 'o',
        long,
        value_enum,
        default_value_t = OutputFormat::Table,
        global = true,
        help_heading = GLOBAL
    )]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The control plane's address: `--server` / `--endpoint` / LLMCTL_SERVER, else
    /// LLMCTL_ENDPOINT, else the default.
    pub fn server(&self) -> String {
        self.server_with(std::env::var(LEGACY_SERVER_ENV).ok())
    }

    fn server_with(&self, legacy_env: Option<String>) -> String {
        self.server
            .clone()
            .or(legacy_env.filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned())
    }
}

/// How results are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned text (lists) or `field: value` lines (single objects).
    Table,
    /// One JSON object (add/get/update/delete) or one JSON array (list).
    Json,
    /// Comma-separated values under a header row (`llmctl usage` only).
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage provider connections (upstream endpoint + credential).
    #[command(subcommand, visible_alias = "conn")]
    Connection(ConnectionCommand),
    /// Manage provider models (a model name on a connection).
    #[command(subcommand)]
    Model(ModelCommand),
    /// Manage virtual keys (the keys clients use).
    #[command(subcommand)]
    Vkey(VkeyCommand),
    /// Let a virtual key call a model (same as `assignment add`).
    Assign(AssignmentAddArgs),
    /// Manage assignments (virtual key -> model, alias and rate limits).
    #[command(subcommand)]
    Assignment(AssignmentCommand),
    /// Delete an assignment (same as `assignment delete`).
    Unassign(IdArg),
    /// List the data planes known to the control plane.
    Dataplanes,
    /// Tokens and cost reported by the data planes, summed per group (DESIGN §18).
    Usage(UsageArgs),
    /// Run the all-in-one gateway: control plane + data plane in one process.
    Serve(ServeArgs),
}

// ---- usage ----

/// `llmctl usage`. T is RFC 3339 (2026-12-01T10:00:00Z), a date (2026-12-01, 00:00 UTC) or a
/// span back from now (24h, 7d).
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this virtual key (ID or name; deleted keys keep their name here).
    #[arg(long, value_name = "K")]
    pub vkey: Option<String>,
    /// Only this provider model (ID or name).
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
    /// Only this alias.
    #[arg(long, value_name = "A")]
    pub alias: Option<String>,
    /// From T (its hour bucket included).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub since: Option<TimeArg>,
    /// Until T (hour buckets starting at or after T excluded).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub until: Option<TimeArg>,
    /// Group by (repeatable, or comma-separated); none gives one row of totals.
    #[arg(long = "group-by", value_enum, value_delimiter = ',', num_args = 1..)]
    pub group_by: Vec<GroupBy>,
}

// ---- connections ----

#[derive(Debug, Subcommand)]
pub enum ConnectionCommand {
    /// Create a connection.
    Add(ConnectionAddArgs),
    /// List connections.
    #[command(visible_alias = "ls")]
    List,
    /// Show one connection.
    Get(IdArg),
    /// Change a connection.
    Update(ConnectionUpdateArgs),
    /// Delete a connection (`--force` also deletes its models and their assignments).
    #[command(visible_alias = "rm")]
    Delete(ForceDeleteArgs),
}

/// `--provider`: one of the catalog's providers (DESIGN §5), offered by name in `--help`.
fn provider_parser() -> impl clap::builder::TypedValueParser<Value = Provider> {
    clap::builder::PossibleValuesParser::new(Provider::NAMES)
        .try_map(|name| name.parse::<Provider>())
}

#[derive(Debug, Args)]
pub struct ConnectionAddArgs {
    /// Unique name of the connection.
    #[arg(long)]
    pub name: String,
    /// Provider protocol.
    #[arg(long, value_parser = provider_parser())]
    pub provider: Provider,
    /// Provider base URL, e.g. https://api.openai.com.
    #[allow(
        rustdoc::bare_urls,
        reason = "this text is the --help line, where <...> would show"
    )]
    #[arg(long, value_name = "URL")]
    pub endpoint: String,
    #[command(flatten)]
    pub credential: CredentialArgs,
    /// Provider option (repeatable), e.g. `--set api_version=2024-10-21`.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    #[command(flatten)]
    pub control_plane: ControlPlaneEndpointSlot,
}

#[derive(Debug, Args)]
pub struct ConnectionUpdateArgs {
    /// Connection ID or name.
    pub id: String,
    /// New name.
    #[arg(long)]
    pub name: Option<String>,
    /// New provider base URL.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    #[command(flatten)]
    pub credential: CredentialArgs,
    /// Add or overwrite a provider option (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    /// Remove a provider option (repeatable).
    #[arg(long = "unset", value_name = "KEY", value_parser = parse_option_key)]
    pub unset: Vec<String>,
    #[command(flatten)]
    pub control_plane: ControlPlaneEndpointSlot,
}

/// The connection's credential: inline or from a file (so that it stays out of shell history).
#[derive(Debug, Args)]
pub struct CredentialArgs {
    /// Credential (API key, `ACCESS_KEY_ID:SECRET[:TOKEN]`, token...). Never printed back.
    #[arg(long, value_name = "KEY", conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the credential from a file (e.g. a service-account JSON); trailing newlines trimmed.
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
}

/// Occupies the global `--server`'s id in `connection add|update`, whose own `--endpoint` is
/// the provider's URL: clap does not propagate a global argument (nor its `--endpoint` alias)
/// into a command that already has an argument with its id, so the two `--endpoint` never
/// collide. `--server` (or the hidden old `--control-plane`) still works there; the value is
/// read from [`Cli::server`].
#[derive(Debug, Args)]
pub struct ControlPlaneEndpointSlot {
    /// Address of the control plane's gRPC API (see the global `--server`).
    #[arg(
        long = "server",
        alias = "control-plane",
        id = CP_ENDPOINT_ID,
        value_name = "URL",
        help_heading = GLOBAL
    )]
    pub value: Option<String>,
}

// ---- provider models ----

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Create a provider model on a connection.
    Add(ModelAddArgs),
    /// List provider models.
    #[command(visible_alias = "ls")]
    List(ModelListArgs),
    /// Show one provider model.
    Get(IdArg),
    /// Change a provider model.
    Update(ModelUpdateArgs),
    /// Delete a provider model (`--force` also deletes its assignments).
    #[command(visible_alias = "rm")]
    Delete(ForceDeleteArgs),
}

#[derive(Debug, Args)]
pub struct ModelAddArgs {
    /// Connection ID or name.
    #[arg(long, value_name = "CONN")]
    pub conn_id: String,
    /// Model name, unique within the connection.
    #[arg(long)]
    pub name: String,
    /// The provider's model name.
    #[arg(long)]
    pub remote: String,
    /// Deployment name (Azure).
    #[arg(long)]
    pub deployment: Option<String>,
    #[command(flatten)]
    pub prices: PriceArgs,
}

/// A model's prices, in USD per million tokens (DESIGN §18), e.g. gpt-4o: `--price-input 2.50
/// --price-output 10 --price-cache-read 1.25`. Kept exactly, in micro-USD: at most 6 decimal
/// places.
#[derive(Debug, Args)]
pub struct PriceArgs {
    /// Price of input tokens (those not read from or written to a prompt cache), USD per million
    /// tokens, e.g. 2.50; `none` = no price.
    #[arg(long, value_name = "USD", value_parser = parse_price, allow_negative_numbers = true)]
    pub price_input: Option<UsdArg>,
    /// Price of output tokens (reasoning included), USD per million tokens; `none` = no price.
    #[arg(long, value_name = "USD", value_parser = parse_price, allow_negative_numbers = true)]
    pub price_output: Option<UsdArg>,
    /// Price of input tokens read from the prompt cache, USD per million tokens (default: the
    /// input price); `none` = no price.
    #[arg(long, value_name = "USD", value_parser = parse_price, allow_negative_numbers = true)]
    pub price_cache_read: Option<UsdArg>,
    /// Price of input tokens written to the prompt cache, USD per million tokens (default: the
    /// input price); `none` = no price.
    #[arg(long, value_name = "USD", value_parser = parse_price, allow_negative_numbers = true)]
    pub price_cache_write: Option<UsdArg>,
}

#[derive(Debug, Args)]
pub struct ModelListArgs {
    /// Only the models of this connection (ID or name).
    #[arg(long, value_name = "CONN")]
    pub conn_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ModelUpdateArgs {
    /// Model ID, `CONNECTION/MODEL`, or a unique model name.
    pub id: String,
    /// New name.
    #[arg(long)]
    pub name: Option<String>,
    /// New provider model name.
    #[arg(long)]
    pub remote: Option<String>,
    /// New deployment name; an empty string clears it.
    #[arg(long)]
    pub deployment: Option<String>,
    /// New prices; `none` removes a price, a price not given stays as it is.
    #[command(flatten)]
    pub prices: PriceArgs,
}

// ---- virtual keys ----

#[derive(Debug, Subcommand)]
pub enum VkeyCommand {
    /// Create a virtual key (without `--key`, a strong key is generated and shown once).
    Add(VkeyAddArgs),
    /// List virtual keys.
    #[command(visible_alias = "ls")]
    List,
    /// Show one virtual key.
    Get(IdArg),
    /// Change a virtual key.
    Update(VkeyUpdateArgs),
    /// Delete a virtual key and its assignments.
    #[command(visible_alias = "rm")]
    Delete(IdArg),
}

#[derive(Debug, Args)]
pub struct VkeyAddArgs {
    /// Unique name of the key.
    #[arg(long)]
    pub name: String,
    /// Use this key instead of a generated one. Never printed back.
    #[arg(long)]
    pub key: Option<String>,
    /// Expiry, RFC 3339 (e.g. 2026-12-31T23:59:59Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339)]
    pub expires_at: Option<Timestamp>,
    #[command(flatten)]
    pub budget: BudgetArgs,
}

/// A virtual key's budget (DESIGN §18): the most it may spend per UTC calendar period, e.g.
/// `--budget-usd 100 --budget-period month`. Data planes refuse its requests once the period's
/// spend reaches it.
#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// Budget in USD per period, e.g. 100 or 25.50 (at most 6 decimal places); `none` = no
    /// budget (on update: removes the budget and its period).
    #[arg(long, value_name = "USD|none", value_parser = parse_budget, allow_negative_numbers = true)]
    pub budget_usd: Option<UsdArg>,
    /// Budget period, UTC: `day`, `week` (starting Monday) or `month` (default for a new budget;
    /// on update a budget keeps its period unless this is given).
    #[arg(long, value_name = "PERIOD")]
    pub budget_period: Option<BudgetPeriod>,
}

/// The period of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BudgetPeriod {
    Day,
    Week,
    Month,
}

impl BudgetPeriod {
    /// The name the API takes.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Week => "week",
            BudgetPeriod::Month => "month",
        }
    }
}

#[derive(Debug, Args)]
pub struct VkeyUpdateArgs {
    /// Virtual key ID or name.
    pub id: String,
    /// New name.
    #[arg(long)]
    pub name: Option<String>,
    /// Disable the key (requests are refused).
    #[arg(long, conflicts_with = "enable")]
    pub disable: bool,
    /// Enable the key.
    #[arg(long)]
    pub enable: bool,
    /// New expiry, RFC 3339.
    #[arg(
        long,
        value_name = "RFC3339",
        value_parser = parse_rfc3339,
        conflicts_with = "no_expiry"
    )]
    pub expires_at: Option<Timestamp>,
    /// Remove the expiry.
    #[arg(long)]
    pub no_expiry: bool,
    /// New budget or period; `--budget-usd none` removes the budget (and its period), a flag not
    /// given leaves it as it is.
    #[command(flatten)]
    pub budget: BudgetArgs,
}

// ---- assignments ----

#[derive(Debug, Subcommand)]
pub enum AssignmentCommand {
    /// Let a virtual key call a model.
    Add(AssignmentAddArgs),
    /// List assignments.
    #[command(visible_alias = "ls")]
    List(AssignmentListArgs),
    /// Show one assignment.
    Get(IdArg),
    /// Change an assignment's alias, limits or weight.
    Update(AssignmentUpdateArgs),
    /// Delete an assignment.
    #[command(visible_alias = "rm")]
    Delete(IdArg),
}

#[derive(Debug, Args)]
pub struct AssignmentAddArgs {
    /// Virtual key ID or name.
    #[arg(long, value_name = "VKEY")]
    pub vkey_id: String,
    /// Model ID, `CONNECTION/MODEL`, or a unique model name.
    #[arg(long, value_name = "MODEL")]
    pub model_id: String,
    /// Name clients use as `model` (default: the model's name).
    #[arg(long)]
    pub alias: Option<String>,
    /// Requests per second (default: unlimited).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub tps: Option<i64>,
    /// Request burst capacity (default: tps).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub burst: Option<i64>,
    /// Tokens per minute (default: unlimited).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub tpm: Option<i64>,
    /// Load-balancing weight within the alias's pool (default: 1).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub weight: Option<i64>,
}

#[derive(Debug, Args)]
pub struct AssignmentListArgs {
    /// Only the assignments of this virtual key (ID or name).
    #[arg(long, value_name = "VKEY")]
    pub vkey_id: Option<String>,
    /// Only the assignments of this model.
    #[arg(long, value_name = "MODEL")]
    pub model_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct AssignmentUpdateArgs {
    /// Assignment ID.
    pub id: String,
    /// New alias.
    #[arg(long)]
    pub alias: Option<String>,
    /// Requests per second.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        conflicts_with = "no_tps"
    )]
    pub tps: Option<i64>,
    /// Request burst capacity.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        conflicts_with = "no_burst"
    )]
    pub burst: Option<i64>,
    /// Tokens per minute.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        conflicts_with = "no_tpm"
    )]
    pub tpm: Option<i64>,
    /// Load-balancing weight.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub weight: Option<i64>,
    /// Remove the requests-per-second limit.
    #[arg(long)]
    pub no_tps: bool,
    /// Reset the burst to the tps.
    #[arg(long)]
    pub no_burst: bool,
    /// Remove the tokens-per-minute limit.
    #[arg(long)]
    pub no_tpm: bool,
}

// ---- shared ----

#[derive(Debug, Args)]
pub struct IdArg {
    /// ID (or unique name).
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ForceDeleteArgs {
    /// ID (or unique name).
    pub id: String,
    /// Also delete what depends on it.
    #[arg(long)]
    pub force: bool,
}

/// Parses `--set key=value`. The value may be empty and may contain `=`; the key may not be empty.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let Some((key, value)) = s.split_once('=') else {
        return Err(format!("expected KEY=VALUE, got `{s}` (no `=`)"));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(format!(
            "expected KEY=VALUE with a non-empty KEY, got `{s}`"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Parses the KEY of `--unset KEY`: non-empty after trimming.
pub fn parse_option_key(s: &str) -> Result<String, String> {
    let key = s.trim();
    if key.is_empty() {
        return Err("expected a non-empty option KEY".to_owned());
    }
    Ok(key.to_owned())
}

/// Parses an RFC 3339 timestamp such as `2026-12-31T23:59:59Z` or `2026-12-31T23:59:59+01:00`.
pub fn parse_rfc3339(s: &str) -> Result<Timestamp, String> {
    let at = OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|err| {
        format!("`{s}` is not an RFC 3339 timestamp such as 2026-12-31T23:59:59Z ({err})")
    })?;
    Ok(Timestamp {
        seconds: at.unix_timestamp(),
        nanos: i32::try_from(at.nanosecond()).unwrap_or(0),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn key_value_accepts_well_formed_pairs() {
        assert_eq!(
            parse_key_value("api_version=2024-10-21").unwrap(),
            ("api_version".to_owned(), "2024-10-21".to_owned())
        );
        // Only the first `=` splits.
        assert_eq!(
            parse_key_value("k=a=b").unwrap(),
            ("k".to_owned(), "a=b".to_owned())
        );
        // An empty value is a value.
        assert_eq!(
            parse_key_value("k=").unwrap(),
            ("k".to_owned(), String::new())
        );
    }

    #[test]
    fn key_value_rejects_missing_equals() {
        let err = parse_key_value("region").unwrap_err();
        assert!(err.contains("KEY=VALUE"), "{err}");
        assert!(err.contains("`region`"), "{err}");
    }

    #[test]
    fn key_value_rejects_empty_key() {
        for bad in ["=us-east-1", " =x", "="] {
            let err = parse_key_value(bad).unwrap_err();
            assert!(err.contains("non-empty KEY"), "{bad}: {err}");
        }
    }

    #[test]
    fn rfc3339_parses_utc_and_offsets() {
        let ts = parse_rfc3339("2026-12-31T23:59:59Z").unwrap();
        assert_eq!((ts.seconds, ts.nanos), (1_798_761_599, 0));
        let ts = parse_rfc3339("2027-01-01T00:59:59.5+01:00").unwrap();
        assert_eq!((ts.seconds, ts.nanos), (1_798_761_599, 500_000_000));
    }

    #[test]
    fn rfc3339_rejects_other_formats() {
        for bad in ["2026-12-31", "tomorrow", "2026-12-31 23:59:59", ""] {
            let err = parse_rfc3339(bad).unwrap_err();
            assert!(err.contains("RFC 3339"), "{bad}: {err}");
        }
    }

    #[test]
    fn global_flags_work_before_and_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "llmctl",
            "vkey",
            "list",
            "-o",
            "json",
            "--server",
            "http://cp:8131",
            "--token",
            "t",
        ])
        .unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.server.as_deref(), Some("http://cp:8131"));
        assert_eq!(cli.token.as_deref(), Some("t"));

        let cli =
            Cli::try_parse_from(["llmctl", "-o", "json", "--token", "t", "dataplanes"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.token.as_deref(), Some("t"));
    }

    #[test]
    fn server_and_its_old_name_endpoint_select_the_control_plane() {
        for flag in ["--server", "--endpoint"] {
            let cli =
                Cli::try_parse_from(["llmctl", flag, "http://cp:8131", "vkey", "list"]).unwrap();
            assert_eq!(cli.server.as_deref(), Some("http://cp:8131"), "{flag}");
        }
        // The flag wins over LLMCTL_ENDPOINT, which wins over the default.
        let flagged =
            Cli::try_parse_from(["llmctl", "--server", "http://a:1", "dataplanes"]).unwrap();
        assert_eq!(flagged.server_with(Some("http://b:2".into())), "http://a:1");
        let bare = Cli::try_parse_from(["llmctl", "dataplanes"]).unwrap();
        assert_eq!(bare.server_with(Some("http://b:2".into())), "http://b:2");
        assert_eq!(bare.server_with(Some(" ".into())), DEFAULT_SERVER);
        assert_eq!(bare.server_with(None), DEFAULT_SERVER);
    }

    #[test]
    fn connection_add_takes_server_beside_the_provider_endpoint() {
        let cli = Cli::try_parse_from([
            "llmctl",
            "connection",
            "add",
            "--server",
            "http://cp:8131",
            "--name",
            "n",
            "--provider",
            "openai",
            "--endpoint",
            "https://api.openai.com",
        ])
        .unwrap();
        assert_eq!(cli.server.as_deref(), Some("http://cp:8131"));
        let Command::Connection(ConnectionCommand::Add(add)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(add.endpoint, "https://api.openai.com");
    }

    #[test]
    fn connection_endpoint_is_the_provider_url() {
        let cli = Cli::try_parse_from([
            "llmctl",
            "--endpoint",
            "http://cp:8131",
            "connection",
            "add",
            "--name",
            "OpenAI-Main",
            "--provider",
            "openai",
            "--endpoint",
            "https://api.openai.com",
            "--set",
            "timeout_s=30",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.server.as_deref(), Some("http://cp:8131"));
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::Connection(ConnectionCommand::Add(add)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(add.endpoint, "https://api.openai.com");
        assert_eq!(add.set, vec![("timeout_s".to_owned(), "30".to_owned())]);

        let cli = Cli::try_parse_from([
            "llmctl",
            "connection",
            "update",
            "c1",
            "--endpoint",
            "https://example.test",
        ])
        .unwrap();
        assert_eq!(cli.server, None);
        let Command::Connection(ConnectionCommand::Update(update)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(update.endpoint.as_deref(), Some("https://example.test"));
    }

    #[test]
    fn api_key_and_api_key_file_conflict() {
        let res = Cli::try_parse_from([
            "llmctl",
            "connection",
            "add",
            "--name",
            "n",
            "--provider",
            "openai",
            "--endpoint",
            "https://api.openai.com",
            "--api-key",
            "k",
            "--api-key-file",
            "f",
        ]);
        assert!(res.is_err());
    }

    #[test]
    fn assign_accepts_negative_numbers_for_the_server_to_judge() {
        let cli = Cli::try_parse_from([
            "llmctl",
            "assign",
            "--vkey-id",
            "v",
            "--model-id",
            "m",
            "--tps",
            "-5",
        ])
        .unwrap();
        let Command::Assign(add) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(add.tps, Some(-5));
    }

    #[test]
    fn model_prices_parse_exactly() {
        let cli = Cli::try_parse_from([
            "llmctl",
            "model",
            "add",
            "--conn-id",
            "OpenAI",
            "--name",
            "gpt-4o",
            "--remote",
            "gpt-4o",
            "--price-input",
            "2.50",
            "--price-output",
            "10",
            "--price-cache-read",
            "1.25",
        ])
        .unwrap();
        let Command::Model(ModelCommand::Add(add)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(add.prices.price_input, Some(UsdArg::MicroUsd(2_500_000)));
        assert_eq!(add.prices.price_output, Some(UsdArg::MicroUsd(10_000_000)));
        assert_eq!(
            add.prices.price_cache_read,
            Some(UsdArg::MicroUsd(1_250_000))
        );
        assert_eq!(add.prices.price_cache_write, None);

        let cli = Cli::try_parse_from([
            "llmctl",
            "model",
            "update",
            "gpt-4o",
            "--price-cache-read",
            "none",
            "--price-cache-write",
            "3.125",
        ])
        .unwrap();
        let Command::Model(ModelCommand::Update(update)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(update.prices.price_input, None);
        assert_eq!(update.prices.price_cache_read, Some(UsdArg::None));
        assert_eq!(
            update.prices.price_cache_write,
            Some(UsdArg::MicroUsd(3_125_000))
        );
    }

    #[test]
    fn vkey_budgets_parse_exactly() {
        let cli = Cli::try_parse_from([
            "llmctl",
            "vkey",
            "add",
            "--name",
            "team-a",
            "--budget-usd",
            "100",
        ])
        .unwrap();
        let Command::Vkey(VkeyCommand::Add(add)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(add.budget.budget_usd, Some(UsdArg::MicroUsd(100_000_000)));
        assert_eq!(add.budget.budget_period, None);

        let cli = Cli::try_parse_from([
            "llmctl",
            "vkey",
            "update",
            "team-a",
            "--budget-usd",
            "25.50",
            "--budget-period",
            "week",
        ])
        .unwrap();
        let Command::Vkey(VkeyCommand::Update(update)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(update.budget.budget_usd, Some(UsdArg::MicroUsd(25_500_000)));
        assert_eq!(update.budget.budget_period, Some(BudgetPeriod::Week));
        assert_eq!(BudgetPeriod::Week.as_str(), "week");

        let cli =
            Cli::try_parse_from(["llmctl", "vkey", "update", "team-a", "--budget-usd", "none"])
                .unwrap();
        let Command::Vkey(VkeyCommand::Update(update)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(update.budget.budget_usd, Some(UsdArg::None));

        let cli = Cli::try_parse_from(["llmctl", "vkey", "update", "team-a", "--enable"]).unwrap();
        let Command::Vkey(VkeyCommand::Update(update)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(update.budget.budget_usd, None);
        assert_eq!(update.budget.budget_period, None);
    }

    #[test]
    fn bad_budgets_are_usage_errors_naming_the_flag() {
        for (value, why) in [
            ("1.0000001", "at most 6 decimal places"),
            ("-5", "must not be negative"),
            ("lots", "expected a budget in USD"),
        ] {
            let err =
                Cli::try_parse_from(["llmctl", "vkey", "update", "team-a", "--budget-usd", value])
                    .unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "invalid value '{value}' for '--budget-usd <USD|none>'"
                )),
                "{text}"
            );
            assert!(text.contains(why), "{value}: {text}");
        }
        let err = Cli::try_parse_from([
            "llmctl",
            "vkey",
            "add",
            "--name",
            "team-a",
            "--budget-usd",
            "10",
            "--budget-period",
            "year",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        let text = err.to_string();
        assert!(text.contains("'--budget-period <PERIOD>'"), "{text}");
        assert!(text.contains("day, week, month"), "{text}");
    }

    #[test]
    fn bad_prices_are_usage_errors_naming_the_flag_and_the_value() {
        for (value, why) in [
            ("1.0000001", "at most 6 decimal places"),
            ("-1", "must not be negative"),
            ("abc", "expected a price"),
            ("", "expected a price"),
            ("99999999999999999999", "too large"),
        ] {
            let err = Cli::try_parse_from([
                "llmctl",
                "model",
                "update",
                "gpt-4o",
                "--price-output",
                value,
            ])
            .unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "invalid value '{value}' for '--price-output <USD>'"
                )),
                "{text}"
            );
            assert!(text.contains(why), "{value}: {text}");
        }
    }

    #[test]
    fn serve_defaults_follow_the_design() {
        let cli = Cli::try_parse_from(["llmctl", "serve"]).unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(serve.data_dir, PathBuf::from("./.llm-proxy"));
    }
}
