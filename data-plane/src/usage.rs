//! Token usage of one answer, as every translator reports it (a leaf: the stream plumbing, the
//! adapters and the accounting all read it, and it depends on nothing of theirs).

use serde::Deserialize;

/// Token usage as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    /// Prompt tokens read from the upstream's prompt cache (included in `prompt_tokens`).
    #[serde(skip)]
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the upstream's prompt cache (included in `prompt_tokens`).
    #[serde(skip)]
    pub cache_write_tokens: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
