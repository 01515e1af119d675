//! STUB (replaced by the resp-conv branch): the OpenAI Responses dialect.

use super::{EventWriter, Reply, Request, StreamEvent};
use crate::body::ParsedRequest;
use crate::errors::ApiError;
use bytes::BytesMut;

pub fn parse_request(_request: &ParsedRequest<'_>) -> Result<Request, ApiError> {
    Err(ApiError::internal("responses translation pending"))
}

pub fn write_reply(_reply: &Reply, _model: &str) -> Vec<u8> {
    Vec::new()
}

pub struct ResponsesEventWriter;

impl ResponsesEventWriter {
    pub fn new(_model: &str) -> Self {
        Self
    }
}

impl EventWriter for ResponsesEventWriter {
    fn write(&mut self, _event: &StreamEvent, _out: &mut BytesMut) {}
    fn write_error(&mut self, _error: &ApiError, _out: &mut BytesMut) {}
}
