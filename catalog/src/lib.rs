//! What every part of llm-proxy must agree on about upstream providers (DESIGN §5, §10, §16):
//! the provider list, each provider's connection options with their validators, and the limits
//! the control plane and data plane share.
//!
//! The control plane validates writes with [`validate_connection_options`], the data plane reads
//! options by [`ConnectionOption`] and parses their values with the same types, and `llmctl`
//! offers [`Provider::NAMES`]: adding a provider or an option is one change here, and the
//! compiler points at every `match` that must learn it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Largest gRPC message either plane accepts or sends. Snapshot parts are ~1 MiB, but one key
/// with very many assignments is never split, and a data plane still accepts a whole snapshot in
/// one message from a control plane that does not split; tonic's 4 MiB default would refuse those.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// Upstream timeout of a connection without a `timeout_s` option.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest `timeout_s` a connection may set, in seconds.
pub const MAX_TIMEOUT_S: f64 = 3600.0;

/// Upstream provider family of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    OpenAi,
    Azure,
    Google,
    Bedrock,
    /// Anthropic's Messages API: Anthropic itself or Azure Foundry's Claude endpoint.
    Anthropic,
}

impl Provider {
    /// Every provider, in the order help texts list them.
    pub const ALL: [Provider; 5] = [
        Provider::OpenAi,
        Provider::Azure,
        Provider::Google,
        Provider::Bedrock,
        Provider::Anthropic,
    ];

    /// The names of [`Provider::ALL`], as the API, the database and `llmctl` spell them.
    pub const NAMES: [&'static str; Provider::ALL.len()] = {
        let mut names = [""; Provider::ALL.len()];
        let mut i = 0;
        while i < names.len() {
            names[i] = Provider::ALL[i].as_str();
            i += 1;
        }
        names
    };

    /// The name used in the API, the database, metrics and messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Azure => "azure",
            Provider::Google => "google",
            Provider::Bedrock => "bedrock",
            Provider::Anthropic => "anthropic",
        }
    }

    /// The options a connection of this provider may set (`--set key=value`).
    pub const fn options(self) -> &'static [ConnectionOption] {
        use ConnectionOption::*;
        match self {
            Provider::OpenAi => &[TimeoutS],
            Provider::Azure => &[TimeoutS, ApiVersion, ResponsesApiVersion],
            Provider::Google => &[TimeoutS, Api, Auth, Project, Location, ApiVersion],
            Provider::Bedrock => &[TimeoutS, Region, Auth, AnthropicApi],
            Provider::Anthropic => &[TimeoutS, AnthropicVersion],
        }
    }

    /// The option of this provider named `name`, if it has one.
    pub fn option(self, name: &str) -> Option<ConnectionOption> {
        self.options().iter().copied().find(|o| o.name() == name)
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider name that is not one of [`Provider::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be one of {names}, got {0:?}", names = Provider::NAMES.join("|"))]
pub struct UnknownProvider(pub String);

impl FromStr for Provider {
    type Err = UnknownProvider;

    /// Exact names, after trimming.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| UnknownProvider(name.to_owned()))
    }
}

/// A connection option (`llmctl connection add --set key=value`, DESIGN §16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionOption {
    /// Seconds (fractional allowed) the upstream may take: the whole answer, or a stream's head
    /// and then each chunk.
    TimeoutS,
    /// Azure: `v1` or a dated version; Google: the URL version segment.
    ApiVersion,
    /// Google: [`GoogleApi`].
    Api,
    /// Google: [`GoogleAuth`]; Bedrock: [`BedrockAuth`].
    Auth,
    /// Google Vertex: the project.
    Project,
    /// Google Vertex: the location (region, `global`, `us`, `eu`).
    Location,
    /// Bedrock: the AWS region SigV4 signs for.
    Region,
    /// Anthropic: the `anthropic-version` header sent when the client sent none (a date).
    AnthropicVersion,
    /// Bedrock: how Claude models are called, [`BedrockAnthropicApi`] (default: by model id).
    AnthropicApi,
    /// Azure: the dated `api-version` of the Responses API route
    /// (`/openai/responses?api-version=V`) when `api_version` is not `v1`; at least
    /// [`FIRST_AZURE_RESPONSES_API_VERSION`].
    ResponsesApiVersion,
}

impl ConnectionOption {
    /// The option's key, as `--set` and the stored options spell it.
    pub const fn name(self) -> &'static str {
        match self {
            ConnectionOption::TimeoutS => "timeout_s",
            ConnectionOption::ApiVersion => "api_version",
            ConnectionOption::Api => "api",
            ConnectionOption::Auth => "auth",
            ConnectionOption::Project => "project",
            ConnectionOption::Location => "location",
            ConnectionOption::Region => "region",
            ConnectionOption::AnthropicVersion => "anthropic_version",
            ConnectionOption::AnthropicApi => "anthropic_api",
            ConnectionOption::ResponsesApiVersion => "responses_api_version",
        }
    }
}

/// A value with a fixed set of spellings.
pub trait Choice: Sized + Copy + 'static {
    /// Every value with its spelling.
    const CHOICES: &'static [(&'static str, Self)];

    /// The value spelled `text`, if any.
    fn parse(text: &str) -> Option<Self> {
        Self::CHOICES
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, value)| *value)
    }

    /// The spellings joined by `|`, for messages.
    fn spellings() -> String {
        let names: Vec<&str> = Self::CHOICES.iter().map(|(name, _)| *name).collect();
        names.join("|")
    }
}

/// Which Google API a `google` connection calls (option `api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoogleApi {
    /// Google AI Studio (`generativelanguage.googleapis.com`).
    Gemini,
    Vertex,
}

impl Choice for GoogleApi {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("gemini", GoogleApi::Gemini), ("vertex", GoogleApi::Vertex)];
}

/// How a `google` connection authenticates (option `auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoogleAuth {
    ApiKey,
    Bearer,
    ServiceAccount,
}

impl Choice for GoogleAuth {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("api_key", GoogleAuth::ApiKey),
        ("bearer", GoogleAuth::Bearer),
        ("service_account", GoogleAuth::ServiceAccount),
    ];
}

/// How a `bedrock` connection authenticates (option `auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BedrockAuth {
    SigV4,
    /// A Bedrock API key.
    Bearer,
}

impl Choice for BedrockAuth {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("bearer", BedrockAuth::Bearer),
        ("sigv4", BedrockAuth::SigV4),
    ];
}

/// How a `bedrock` connection calls Claude models (option `anthropic_api`, DESIGN §17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BedrockAnthropicApi {
    /// InvokeModel / InvokeModelWithResponseStream (Claude 4.6 and earlier).
    Invoke,
    /// Bedrock's Messages endpoint `/anthropic/v1/messages` (newer Claude models).
    Messages,
}

impl Choice for BedrockAnthropicApi {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("invoke", BedrockAnthropicApi::Invoke),
        ("messages", BedrockAnthropicApi::Messages),
    ];
}

/// The `anthropic-version` sent to an `anthropic` connection when neither the client nor the
/// connection's `anthropic_version` option names one.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// The first Azure `api-version` with the Responses API (DESIGN §17).
pub const FIRST_AZURE_RESPONSES_API_VERSION: &str = "2025-03-01-preview";

/// The Azure Responses `api-version` used when the connection sets no `responses_api_version`.
pub const DEFAULT_AZURE_RESPONSES_API_VERSION: &str = "2025-04-01-preview";

/// Whether `value` is a dated Azure api-version (`2025-04-01-preview`, `2025-06-01`) that has the
/// Responses API: its date is 2025-03-01 or later (the previews compare before the release of
/// the same date, which is fine: the first one with Responses is a preview).
pub fn is_azure_responses_api_version(value: &str) -> bool {
    let suffix_ok = matches!(value.get(10..), Some("" | "-preview"));
    starts_with_date(value) && suffix_ok && value[..10] >= FIRST_AZURE_RESPONSES_API_VERSION[..10]
}

/// Why a connection's options were refused. Messages name the option and the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("{key:?} is unknown for provider {provider}; known: {known}")]
    Unknown {
        key: String,
        provider: Provider,
        known: String,
    },
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{key} must be {expected}, got {value:?}")]
    Invalid {
        key: &'static str,
        expected: String,
        value: String,
    },
    #[error(
        "region is required for a bedrock endpoint other than bedrock-runtime.{{region}}.amazonaws.com (got {0:?}); add --set region=us-east-1"
    )]
    BedrockRegionMissing(String),
}

/// `timeout_s` as a duration: a number of seconds in (0, [`MAX_TIMEOUT_S`]].
pub fn timeout_s(value: &str) -> Result<Duration, OptionError> {
    let value = value.trim();
    value
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t > 0.0 && *t <= MAX_TIMEOUT_S)
        .and_then(|t| Duration::try_from_secs_f64(t).ok())
        .map(|t| t.max(Duration::from_millis(1)))
        .ok_or_else(|| OptionError::Invalid {
            key: ConnectionOption::TimeoutS.name(),
            expected: "a number of seconds in (0, 3600]".to_owned(),
            value: value.to_owned(),
        })
}

/// Whether `value` starts with a date such as `2024-10-21`.
fn starts_with_date(value: &str) -> bool {
    value.len() >= 10
        && value.as_bytes()[..10].iter().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                *b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

/// Whether `value` is an Azure `api_version`: `v1` or a dated version such as `2024-10-21`.
fn is_azure_api_version(value: &str) -> bool {
    value == "v1" || starts_with_date(value)
}

fn one_of<C: Choice>(key: ConnectionOption, value: &str) -> Result<(), OptionError> {
    match C::parse(value) {
        Some(_) => Ok(()),
        None => Err(OptionError::Invalid {
            key: key.name(),
            expected: format!("one of {}", C::spellings()),
            value: value.to_owned(),
        }),
    }
}

/// Checks one option of a `provider` connection: known to the provider, not empty, and a valid
/// value.
pub fn validate_option(provider: Provider, key: &str, value: &str) -> Result<(), OptionError> {
    let Some(option) = provider.option(key) else {
        let known: Vec<&str> = provider.options().iter().map(|o| o.name()).collect();
        return Err(OptionError::Unknown {
            key: key.to_owned(),
            provider,
            known: known.join(", "),
        });
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(OptionError::Empty(option.name()));
    }
    match (option, provider) {
        (ConnectionOption::TimeoutS, _) => timeout_s(value).map(drop),
        (ConnectionOption::Api, _) => one_of::<GoogleApi>(option, value),
        (ConnectionOption::Auth, Provider::Google) => one_of::<GoogleAuth>(option, value),
        (ConnectionOption::Auth, _) => one_of::<BedrockAuth>(option, value),
        (ConnectionOption::AnthropicApi, _) => one_of::<BedrockAnthropicApi>(option, value),
        (ConnectionOption::AnthropicVersion, _)
            if !(value.len() == 10 && starts_with_date(value)) =>
        {
            Err(OptionError::Invalid {
                key: option.name(),
                expected: "a date such as 2023-06-01".to_owned(),
                value: value.to_owned(),
            })
        }
        (ConnectionOption::ResponsesApiVersion, _) if !is_azure_responses_api_version(value) => {
            Err(OptionError::Invalid {
                key: option.name(),
                expected: format!(
                    "a dated version from {FIRST_AZURE_RESPONSES_API_VERSION} on, such as {DEFAULT_AZURE_RESPONSES_API_VERSION} (set api_version=v1 for the v1 route)"
                ),
                value: value.to_owned(),
            })
        }
        (ConnectionOption::ApiVersion, Provider::Azure) if !is_azure_api_version(value) => {
            Err(OptionError::Invalid {
                key: option.name(),
                expected: "v1 or a dated version such as 2024-10-21".to_owned(),
                value: value.to_owned(),
            })
        }
        (
            ConnectionOption::ApiVersion
            | ConnectionOption::Project
            | ConnectionOption::Location
            | ConnectionOption::Region
            | ConnectionOption::AnthropicVersion
            | ConnectionOption::ResponsesApiVersion,
            _,
        ) => Ok(()),
    }
}

/// Checks a connection's (merged) options against its provider and endpoint: each option as
/// [`validate_option`], and a Bedrock endpoint that does not name its region needs `region`.
pub fn validate_connection_options(
    provider: Provider,
    endpoint: &str,
    options: &BTreeMap<String, String>,
) -> Result<(), OptionError> {
    for (key, value) in options {
        validate_option(provider, key, value)?;
    }
    if provider == Provider::Bedrock
        && !options.contains_key(ConnectionOption::Region.name())
        && bedrock_region_of_endpoint(endpoint).is_none()
    {
        return Err(OptionError::BedrockRegionMissing(endpoint.to_owned()));
    }
    Ok(())
}

/// The region in a `bedrock-runtime[-fips].{region}.amazonaws.com` endpoint.
pub fn bedrock_region_of_endpoint(endpoint: &str) -> Option<String> {
    let host = url::Url::parse(endpoint)
        .ok()?
        .host_str()?
        .to_ascii_lowercase();
    let rest = host
        .strip_prefix("bedrock-runtime-fips.")
        .or_else(|| host.strip_prefix("bedrock-runtime."))?;
    rest.split('.')
        .next()
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_provider_is_in_all() {
        // The match stops compiling when a provider is added; the assert then makes sure `ALL`
        // (and so `NAMES`, the parser and `llmctl --provider`) lists it.
        for provider in Provider::ALL {
            let position = match provider {
                Provider::OpenAi => 0,
                Provider::Azure => 1,
                Provider::Google => 2,
                Provider::Bedrock => 3,
                Provider::Anthropic => 4,
            };
            assert_eq!(Provider::ALL[position], provider);
        }
        assert_eq!(Provider::ALL.len(), 5);
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for (provider, name) in Provider::ALL.into_iter().zip(Provider::NAMES) {
            assert_eq!(provider.as_str(), name);
            assert_eq!(name.parse::<Provider>(), Ok(provider));
        }
        assert_eq!(" openai ".parse::<Provider>(), Ok(Provider::OpenAi));
        assert!("OpenAI".parse::<Provider>().is_err());
        assert_eq!(
            "cohere".parse::<Provider>().unwrap_err().to_string(),
            r#"must be one of openai|azure|google|bedrock|anthropic, got "cohere""#
        );
    }

    #[test]
    fn options_are_checked_per_provider() {
        let err = validate_option(Provider::OpenAi, "region", "us-east-1").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#""region" is unknown for provider openai; known: timeout_s"#
        );
        assert!(validate_option(Provider::Bedrock, "region", "us-east-1").is_ok());
        assert_eq!(
            validate_option(Provider::Google, "auth", "sigv4")
                .unwrap_err()
                .to_string(),
            r#"auth must be one of api_key|bearer|service_account, got "sigv4""#
        );
        assert!(validate_option(Provider::Bedrock, "auth", "sigv4").is_ok());
        assert_eq!(
            validate_option(Provider::Azure, "api_version", "latest")
                .unwrap_err()
                .to_string(),
            r#"api_version must be v1 or a dated version such as 2024-10-21, got "latest""#
        );
        assert!(validate_option(Provider::Azure, "api_version", "2024-10-21").is_ok());
        assert!(validate_option(Provider::Google, "api_version", "v1beta1").is_ok());
        assert!(validate_option(Provider::Anthropic, "anthropic_version", "2023-06-01").is_ok());
        assert_eq!(
            validate_option(Provider::Anthropic, "anthropic_version", "latest")
                .unwrap_err()
                .to_string(),
            r#"anthropic_version must be a date such as 2023-06-01, got "latest""#
        );
        assert!(validate_option(Provider::Bedrock, "anthropic_api", "messages").is_ok());
        assert_eq!(
            validate_option(Provider::Bedrock, "anthropic_api", "converse")
                .unwrap_err()
                .to_string(),
            r#"anthropic_api must be one of invoke|messages, got "converse""#
        );
        for good in ["2025-03-01-preview", "2025-04-01-preview", "2026-01-01"] {
            assert!(
                validate_option(Provider::Azure, "responses_api_version", good).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "2024-10-21",
            "2025-02-01-preview",
            "v1",
            "2025-04-01-previewx",
        ] {
            assert_eq!(
                validate_option(Provider::Azure, "responses_api_version", bad)
                    .unwrap_err()
                    .to_string(),
                format!(
                    "responses_api_version must be a dated version from 2025-03-01-preview on, such as 2025-04-01-preview (set api_version=v1 for the v1 route), got {bad:?}"
                )
            );
        }
        assert_eq!(
            validate_option(Provider::Azure, "timeout_s", " ").unwrap_err(),
            OptionError::Empty("timeout_s")
        );
    }

    #[test]
    fn timeouts_are_positive_and_bounded() {
        assert_eq!(timeout_s("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(timeout_s("3600"), Ok(Duration::from_secs(3600)));
        for bad in ["0", "-1", "3601", "NaN", "inf", "soon"] {
            assert!(timeout_s(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bedrock_endpoint_must_name_its_region_or_the_option_must() {
        let none = options(&[]);
        assert!(
            validate_connection_options(
                Provider::Bedrock,
                "https://bedrock-runtime.eu-west-1.amazonaws.com",
                &none
            )
            .is_ok()
        );
        assert_eq!(
            bedrock_region_of_endpoint("https://bedrock-runtime-fips.us-east-1.amazonaws.com")
                .as_deref(),
            Some("us-east-1")
        );
        let err = validate_connection_options(Provider::Bedrock, "https://vpce.example.com", &none)
            .unwrap_err();
        assert!(matches!(err, OptionError::BedrockRegionMissing(_)));
        assert!(
            validate_connection_options(
                Provider::Bedrock,
                "https://vpce.example.com",
                &options(&[("region", "us-east-1")])
            )
            .is_ok()
        );
    }
}
