//! Token usage of one answer, as every translator reports it (a leaf: the stream plumbing, the
//! adapters and the accounting all read it, and it depends on nothing of theirs).

use serde::Deserialize;

/// Token usage of one answer in OpenAI's split (DESIGN §18): `prompt_tokens` counts every prompt
/// token, cached or not, and `completion_tokens` every generated one, reasoning included; the
/// cache and reasoning counts are subsets of them. Each upstream's reader fills the kinds it
/// reports; a kind it does not report stays 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens read from the upstream's prompt cache (included in `prompt_tokens`).
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the upstream's prompt cache (included in `prompt_tokens`).
    pub cache_write_tokens: u64,
    /// Reasoning (thinking) tokens the upstream reports apart (included in `completion_tokens`).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// The total the upstream reported, else prompt + completion (saturating: the counts come
    /// from the upstream).
    pub fn total(&self) -> u64 {
        if self.total_tokens > 0 {
            self.total_tokens
        } else {
            self.prompt_tokens.saturating_add(self.completion_tokens)
        }
    }
}

/// OpenAI's usage object (chat completions, their stream's usage chunk, embeddings; Azure's is
/// the same): read with the answer's other probed members, nothing allocated. Missing or `null`
/// members count as 0 (OpenAI-compatible upstreams send `null` for what they do not count).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct OpenAiUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(default)]
struct PromptDetails {
    cached_tokens: Option<u64>,
    /// Only in the newer API types (OpenAI SDK 2.54+); the gateway's own Bedrock translation
    /// writes it too.
    cache_write_tokens: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(default)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl From<OpenAiUsage> for Usage {
    fn from(wire: OpenAiUsage) -> Self {
        let prompt = wire.prompt_tokens_details.unwrap_or_default();
        let completion = wire.completion_tokens_details.unwrap_or_default();
        Usage {
            prompt_tokens: wire.prompt_tokens.unwrap_or(0),
            completion_tokens: wire.completion_tokens.unwrap_or(0),
            total_tokens: wire.total_tokens.unwrap_or(0),
            cache_read_tokens: prompt.cached_tokens.unwrap_or(0),
            cache_write_tokens: prompt.cache_write_tokens.unwrap_or(0),
            reasoning_tokens: completion.reasoning_tokens.unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Usage {
        serde_json::from_str::<OpenAiUsage>(json).unwrap().into()
    }

    #[test]
    fn usage_totals_saturate() {
        let usage = Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: 5,
            total_tokens: 0,
            ..Usage::default()
        };
        assert_eq!(usage.total(), u64::MAX);
    }

    #[test]
    fn openai_usage_reads_every_kind() {
        // A gpt-5 stream's usage chunk (wire formats §1.8), with a cache hit.
        let usage = read(
            r#"{"prompt_tokens":1036,"completion_tokens":100,"total_tokens":1136,
                "prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},
                "completion_tokens_details":{"reasoning_tokens":64,"audio_tokens":0,
                    "accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
        );
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 1036,
                completion_tokens: 100,
                total_tokens: 1136,
                cache_read_tokens: 1024,
                cache_write_tokens: 0,
                reasoning_tokens: 64,
            }
        );
        // The newer types' cache writes.
        let usage = read(
            r#"{"prompt_tokens":300,"completion_tokens":5,"total_tokens":305,
                "prompt_tokens_details":{"cached_tokens":100,"cache_write_tokens":200}}"#,
        );
        assert_eq!(
            (usage.cache_read_tokens, usage.cache_write_tokens),
            (100, 200)
        );
    }

    #[test]
    fn openai_usage_without_details_has_only_prompt_and_completion() {
        // Embeddings report prompt tokens only; some compatible upstreams send null details.
        assert_eq!(
            read(r#"{"prompt_tokens":7,"total_tokens":7}"#),
            Usage {
                prompt_tokens: 7,
                total_tokens: 7,
                ..Usage::default()
            }
        );
        assert_eq!(
            read(
                r#"{"prompt_tokens":8,"completion_tokens":9,"total_tokens":null,
                    "prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":null}}"#
            ),
            Usage {
                prompt_tokens: 8,
                completion_tokens: 9,
                total_tokens: 0,
                ..Usage::default()
            }
        );
    }
}
