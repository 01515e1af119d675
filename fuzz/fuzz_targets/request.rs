//! Fuzz target: a client's request body: body parser and request translators.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_proxy_fuzz::request(data));
