//! Placeholder: filled by the converter work.
#![allow(unused_variables, clippy::missing_errors_doc)]
use super::*;
use crate::body::ParsedRequest;
pub fn parse_request(request: &ParsedRequest<'_>) -> Result<Request, ApiError> {
    todo!()
}
pub struct AnthropicTarget<'a> {
    pub model: Option<&'a str>,
    pub anthropic_version_in_body: Option<&'a str>,
}
pub fn write_request(request: &Request, target: &AnthropicTarget<'_>) -> Result<Vec<u8>, ApiError> {
    todo!()
}
pub fn parse_reply(body: &[u8]) -> Result<Reply, ApiError> {
    todo!()
}
pub fn write_reply(reply: &Reply) -> Vec<u8> {
    todo!()
}
pub struct AnthropicEventReader;
impl AnthropicEventReader {
    pub fn new(provider: &'static str, max: usize) -> Self {
        todo!()
    }
    pub fn push_event_json(
        &mut self,
        json: &[u8],
        events: &mut Vec<StreamEvent>,
    ) -> Result<(), ApiError> {
        todo!()
    }
}
impl EventReader for AnthropicEventReader {
    fn push(&mut self, chunk: &[u8], events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        todo!()
    }
    fn finish(&mut self, events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        todo!()
    }
    fn complete(&self) -> bool {
        todo!()
    }
}
pub struct AnthropicEventWriter;
impl AnthropicEventWriter {
    pub fn new(model: &str) -> Self {
        todo!()
    }
}
impl EventWriter for AnthropicEventWriter {
    fn write(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        todo!()
    }
    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        todo!()
    }
}
