//! Fuzz target: an upstream event-stream body: Bedrock ConverseStream decoder and translator.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_proxy_fuzz::event_stream(data));
