//! Shared machinery of the golden (snapshot) tests: a fixture is a JSON object whose input
//! members produce the other members; a test fails when what is produced differs from them.
//! `UPDATE_GOLDEN=1` rewrites the snapshots instead (review the diff like code).

#![allow(
    dead_code,
    reason = "shared by the translation golden tests and the through-the-gateway test, which use different parts"
)]

use llm_proxy_data_plane::errors::ApiError;
use serde_json::{Map, Value, json};
use std::path::PathBuf;

pub fn fixture_dir(provider: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mock-upstream/fixtures/golden")
        .join(provider)
}

/// Replaces what is random or time-dependent: `created`, generated call and completion ids.
pub fn normalise(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "created" && v.is_number() {
                    *v = json!(0);
                } else {
                    normalise(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalise),
        Value::String(s) => {
            for prefix in ["call_", "chatcmpl-"] {
                if let Some(rest) = s.strip_prefix(prefix) {
                    let random: String = rest.chars().take(24).collect();
                    let after = &rest[random.len()..];
                    let generated = random.len() == 24
                        && random.chars().all(|c| c.is_ascii_alphanumeric())
                        && (after.is_empty() || after.starts_with("__thought__"));
                    if generated {
                        *s = format!("{prefix}<generated>{after}");
                    }
                }
            }
        }
        _ => {}
    }
}

/// An error as the client gets it: status, body and headers.
#[allow(
    dead_code,
    reason = "used by the translation golden tests, not by every test that shares this module"
)]
pub fn error_json(err: &ApiError) -> Value {
    let headers: Map<String, Value> = err
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), json!(v.to_str().unwrap_or("<binary>"))))
        .collect();
    json!({
        "status": err.status.as_u16(),
        "body": serde_json::from_str::<Value>(&err.body_json()).unwrap_or(Value::Null),
        "headers": headers,
    })
}

/// Splits the client's SSE bytes into events: JSON objects, or the `[DONE]` string.
pub fn sse_events(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .expect("SSE is UTF-8")
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e.strip_prefix("data: ").expect("data event");
            serde_json::from_str(data).unwrap_or_else(|_| json!(data))
        })
        .collect()
}

/// Checks (or with `UPDATE_GOLDEN`, rewrites) the snapshots of fixture `name` of `provider`.
/// `inputs` are the members that are not snapshots.
pub fn check(
    provider: &str,
    name: &str,
    inputs: &[&str],
    produce: fn(&Value) -> Map<String, Value>,
) {
    let path = fixture_dir(provider).join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut case: Value = serde_json::from_str(&text).expect("fixture is JSON");
    let mut produced = produce(&case);
    for value in produced.values_mut() {
        normalise(value);
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let object = case.as_object_mut().expect("fixture is an object");
        object.retain(|key, _| inputs.contains(&key.as_str()));
        for (key, value) in produced {
            object.insert(key, value);
        }
        let mut pretty = serde_json::to_string_pretty(&case).expect("serialises");
        pretty.push('\n');
        std::fs::write(&path, pretty).expect("fixture written");
        return;
    }
    for (key, value) in &produced {
        let expected = case.get(key).unwrap_or(&Value::Null);
        assert_eq!(
            value,
            expected,
            "{provider}/{name}: `{key}` differs from the snapshot\nproduced:\n{}\nsnapshot:\n{}",
            serde_json::to_string_pretty(value).unwrap_or_default(),
            serde_json::to_string_pretty(expected).unwrap_or_default()
        );
    }
    for key in case.as_object().expect("fixture is an object").keys() {
        assert!(
            inputs.contains(&key.as_str()) || produced.contains_key(key),
            "{provider}/{name}: snapshot `{key}` is no longer produced"
        );
    }
}

/// Asserts that every fixture file of `provider` has a test in `names`.
pub fn every_fixture_has_a_test(provider: &str, names: &[&str]) {
    for entry in std::fs::read_dir(fixture_dir(provider)).expect("fixture dir") {
        let path = entry.expect("dir entry").path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        assert!(
            names.contains(&stem.as_str()),
            "fixture {provider}/{stem} has no test"
        );
    }
}

/// One test per fixture, plus a test that no fixture lacks one.
#[macro_export]
macro_rules! golden_tests {
    ($provider:literal, $inputs:expr, $produce:path; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                golden_support::check($provider, stringify!($name), $inputs, $produce);
            }
        )*

        #[test]
        fn every_fixture_has_a_test() {
            golden_support::every_fixture_has_a_test($provider, &[$(stringify!($name)),*]);
        }
    };
}
