//! Fuzz target: an upstream SSE body: splitter, OpenAI passthrough, Gemini stream translator.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_proxy_fuzz::sse(data));
