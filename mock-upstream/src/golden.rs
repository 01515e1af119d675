//! The golden fixtures (`fixtures/golden/{google,bedrock}/*.json`), served as they are. The same
//! files drive the data plane's golden translation tests: a fixture holds a client request, the
//! upstream request the gateway must make of it (`gemini_request`, `converse_request`), the
//! upstream's answer (`answer`, or `stream` events) and the snapshot of what the gateway must
//! answer the client. When an authenticated Gemini or Converse request equals a fixture's
//! upstream request, for the same model and the same method (streamed or not), the mock answers
//! with that fixture's upstream answer, so that a test through the whole gateway
//! (`data-plane/tests/golden_through_the_gateway.rs`) compares what the client gets with the
//! fixture's snapshot: the translation, the HTTP relay and the streaming together.

use serde_json::Value;
use std::path::PathBuf;
use tokio::sync::OnceCell;

/// One fixture: its file name without `.json`, and its contents.
#[derive(Debug)]
pub struct Golden {
    pub name: String,
    pub case: Value,
}

impl Golden {
    /// The model the fixture's upstream request is for: its `model`, else the provider's default
    /// of the golden tests.
    pub fn model(&self, provider: GoldenProvider) -> &str {
        self.case["model"]
            .as_str()
            .unwrap_or_else(|| provider.default_model())
    }
}

/// The providers with golden fixtures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoldenProvider {
    Google,
    Bedrock,
}

impl GoldenProvider {
    fn dir_name(self) -> &'static str {
        match self {
            GoldenProvider::Google => "google",
            GoldenProvider::Bedrock => "bedrock",
        }
    }

    /// The fixture member holding the upstream request.
    fn request_member(self) -> &'static str {
        match self {
            GoldenProvider::Google => "gemini_request",
            GoldenProvider::Bedrock => "converse_request",
        }
    }

    /// The model of fixtures that name none (the golden tests' default).
    pub fn default_model(self) -> &'static str {
        match self {
            GoldenProvider::Google => "gemini-2.5-flash",
            GoldenProvider::Bedrock => "anthropic.claude-3-5-sonnet-20240620-v1:0",
        }
    }

    fn cell(self) -> &'static OnceCell<Vec<Golden>> {
        static GOOGLE: OnceCell<Vec<Golden>> = OnceCell::const_new();
        static BEDROCK: OnceCell<Vec<Golden>> = OnceCell::const_new();
        match self {
            GoldenProvider::Google => &GOOGLE,
            GoldenProvider::Bedrock => &BEDROCK,
        }
    }
}

/// The directory of a provider's fixtures (in the source tree: the mock is a test tool).
pub fn dir(provider: GoldenProvider) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/golden")
        .join(provider.dir_name())
}

/// Every fixture of `provider`, read once (an unreadable file is left out: the golden tests
/// themselves report it).
pub async fn all(provider: GoldenProvider) -> &'static [Golden] {
    provider
        .cell()
        .get_or_init(|| async move {
            let mut out = Vec::new();
            let Ok(mut entries) = tokio::fs::read_dir(dir(provider)).await else {
                return out;
            };
            while let Ok(Some(entry)) = entries.next_entry().await {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned)
                else {
                    continue;
                };
                if let Ok(text) = tokio::fs::read(&path).await
                    && let Ok(case) = serde_json::from_slice::<Value>(&text)
                {
                    out.push(Golden { name, case });
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            out
        })
        .await
}

/// The fixture whose upstream request is `request`, for `model`, streamed or not.
pub async fn find(
    provider: GoldenProvider,
    model: &str,
    streamed: bool,
    request: &Value,
) -> Option<&'static Golden> {
    let kind = if streamed { "stream" } else { "chat" };
    all(provider).await.iter().find(|golden| {
        golden.case["kind"] == kind
            && golden.model(provider) == model
            && golden.case[provider.request_member()] == *request
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn every_fixture_request_names_one_fixture() {
        for provider in [GoldenProvider::Google, GoldenProvider::Bedrock] {
            let fixtures = all(provider).await;
            assert!(
                fixtures.len() > 20,
                "{provider:?}: {} fixtures",
                fixtures.len()
            );
            for golden in fixtures {
                let streamed = match golden.case["kind"].as_str() {
                    Some("chat") => false,
                    Some("stream") => true,
                    _ => continue,
                };
                let Some(request) = golden.case.get(provider.request_member()) else {
                    continue;
                };
                let found = find(provider, golden.model(provider), streamed, request).await;
                assert_eq!(
                    found.map(|g| g.name.as_str()),
                    Some(golden.name.as_str()),
                    "{provider:?}: two fixtures share an upstream request; the mock could not \
                     tell them apart"
                );
            }
        }
    }
}
