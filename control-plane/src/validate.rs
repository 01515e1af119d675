//! Input validation with messages that name the field and say what is wrong.

use crate::error::StoreError;
use std::collections::BTreeMap;

pub const PROVIDERS: [&str; 4] = ["openai", "azure", "google", "bedrock"];

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

pub fn provider(value: &str) -> Result<String, StoreError> {
    let value = value.trim();
    if PROVIDERS.contains(&value) {
        Ok(value.to_owned())
    } else {
        Err(StoreError::invalid(
            "provider",
            format!("must be one of openai|azure|google|bedrock, got {value:?}"),
        ))
    }
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

/// Option keys each provider understands (DESIGN §16).
fn known_options(provider: &str) -> &'static [&'static str] {
    match provider {
        "azure" => &["timeout_s", "api_version"],
        "google" => &[
            "timeout_s",
            "api",
            "auth",
            "project",
            "location",
            "api_version",
        ],
        "bedrock" => &["timeout_s", "region", "auth"],
        _ => &["timeout_s"],
    }
}

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<(), StoreError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "option",
            format!("{key} must be one of {}, got {value:?}", allowed.join("|")),
        ))
    }
}

/// The region in a `bedrock-runtime[-fips].{region}.amazonaws.com` endpoint.
fn bedrock_region_of_endpoint(endpoint: &str) -> Option<String> {
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

/// Checks a connection's merged options against its provider and endpoint: on top of
/// [`options`], a Bedrock endpoint that does not name its region needs `region` (DESIGN §16).
pub fn connection_options(
    provider: &str,
    endpoint: &str,
    options: &BTreeMap<String, String>,
) -> Result<(), StoreError> {
    self::options(provider, options)?;
    if provider == "bedrock"
        && !options.contains_key("region")
        && bedrock_region_of_endpoint(endpoint).is_none()
    {
        return Err(StoreError::invalid(
            "option",
            format!(
                "region is required for a bedrock endpoint other than bedrock-runtime.{{region}}.amazonaws.com (got {endpoint:?}); add --set region=us-east-1"
            ),
        ));
    }
    Ok(())
}

/// Checks the merged options of a connection of `provider`. Errors name the field `option`
/// followed by the key ("option timeout_s must be ..."), the way users type them (`--set KEY=`).
pub fn options(provider: &str, options: &BTreeMap<String, String>) -> Result<(), StoreError> {
    let known = known_options(provider);
    for (key, value) in options {
        if !known.contains(&key.as_str()) {
            return Err(StoreError::invalid(
                "option",
                format!(
                    "{key:?} is unknown for provider {provider}; known: {}",
                    known.join(", ")
                ),
            ));
        }
        let value = value.trim();
        if value.is_empty() {
            return Err(StoreError::invalid(
                "option",
                format!("{key} must not be empty"),
            ));
        }
        match key.as_str() {
            "timeout_s" => {
                let ok = value
                    .parse::<f64>()
                    .is_ok_and(|t| t.is_finite() && t > 0.0 && t <= 3600.0);
                if !ok {
                    return Err(StoreError::invalid(
                        "option",
                        format!(
                            "timeout_s must be a number of seconds in (0, 3600], got {value:?}"
                        ),
                    ));
                }
            }
            "api" => one_of(key, value, &["gemini", "vertex"])?,
            "auth" if provider == "google" => {
                one_of(key, value, &["api_key", "bearer", "service_account"])?
            }
            "auth" => one_of(key, value, &["bearer", "sigv4"])?,
            "api_version" if provider == "azure" => {
                let is_date = value.len() >= 10
                    && value.as_bytes()[..10].iter().enumerate().all(|(i, b)| {
                        if i == 4 || i == 7 {
                            *b == b'-'
                        } else {
                            b.is_ascii_digit()
                        }
                    });
                if value != "v1" && !is_date {
                    return Err(StoreError::invalid(
                        "option",
                        format!(
                            "api_version must be v1 or a dated version such as 2024-10-21, got {value:?}"
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
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
        let msg = message(provider("anthropic").unwrap_err());
        assert_eq!(
            msg,
            "provider must be one of openai|azure|google|bedrock, got \"anthropic\""
        );
        assert!(msg.contains("openai|azure|google|bedrock"), "{msg}");
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

    #[test]
    fn options_are_checked_per_provider() {
        let opts = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(options("azure", &opts("api_version", "2024-10-21")).is_ok());
        assert!(options("azure", &opts("api_version", "v1")).is_ok());
        assert!(options("azure", &opts("api_version", "latest")).is_err());
        assert!(options("google", &opts("api", "vertex")).is_ok());
        let msg = message(options("google", &opts("api", "palm")).unwrap_err());
        assert_eq!(msg, "option api must be one of gemini|vertex, got \"palm\"");
        let msg = message(options("openai", &opts("region", "x")).unwrap_err());
        assert_eq!(
            msg,
            "option \"region\" is unknown for provider openai; known: timeout_s"
        );
        assert!(options("bedrock", &opts("timeout_s", "0")).is_err());
        assert!(options("bedrock", &opts("timeout_s", "2.5")).is_ok());
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
    fn user_key_errors_do_not_echo_the_key() {
        let msg = message(user_key("short").unwrap_err());
        assert!(!msg.contains("short"), "{msg}");
        let msg = message(user_key("vk-has zzqq-123").unwrap_err());
        assert!(!msg.contains("zzqq"), "{msg}");
        assert!(user_key("vk-front-1234").is_ok());
    }
}
