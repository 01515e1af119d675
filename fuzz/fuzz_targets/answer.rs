//! Fuzz target: a non-streamed upstream answer or error: every provider's mapping.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_proxy_fuzz::answer(data));
