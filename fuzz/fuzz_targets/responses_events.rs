//! Fuzz target: arbitrary conversation-model events through the Responses stream writer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_proxy_fuzz::responses_events(data));
