//! Placeholder: filled by the converter work.
#![allow(unused_variables, clippy::missing_errors_doc)]
use super::*;
use crate::body::ParsedRequest;
pub fn parse_request(request: &ParsedRequest<'_>, provider: &str) -> Result<Request, ApiError> { todo!() }
pub fn write_request(request: &Request, remote_model: &str, reasoning_effort_accepted: bool) -> Vec<u8> { todo!() }
pub fn parse_reply(body: &[u8], provider: &str) -> Result<Reply, ApiError> { todo!() }
pub fn write_reply(reply: &Reply, model: &str) -> Vec<u8> { todo!() }
pub struct OpenAiChunkReader;
impl OpenAiChunkReader { pub fn new(provider: &'static str, max: usize) -> Self { todo!() } }
impl EventReader for OpenAiChunkReader {
    fn push(&mut self, chunk: &[u8], events: &mut Vec<StreamEvent>) -> Result<(), ApiError> { todo!() }
    fn finish(&mut self, events: &mut Vec<StreamEvent>) -> Result<(), ApiError> { todo!() }
    fn complete(&self) -> bool { todo!() }
}
pub struct OpenAiChunkWriter;
impl OpenAiChunkWriter { pub fn new(model: &str, wants: bool) -> Self { todo!() } }
impl EventWriter for OpenAiChunkWriter {
    fn write(&mut self, event: &StreamEvent, out: &mut BytesMut) { todo!() }
    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) { todo!() }
}
