//! llm-proxy data plane: serves OpenAI-compatible traffic from an in-memory config snapshot.
//!
//! Not built yet: this crate is a placeholder for the data-plane issue.
