//! The inbound side of a request: which API dialect the client speaks (how its request, errors
//! and answers look) and what it asked for. The upstream side is [`crate::providers::WireFormat`];
//! DESIGN §17 adds dialects on both sides, and any inbound dialect may meet any wire format.

use crate::errors::ApiError;
use axum::response::{IntoResponse as _, Response};

/// What the client asks for; every dialect maps its routes onto these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Embeddings,
    /// Anthropic's `POST /v1/messages`: a chat turn, like [`Operation::ChatCompletions`].
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens`: never counted against request limits.
    CountTokens,
    /// OpenAI's `POST /v1/responses` (the Responses API): a chat turn.
    Responses,
}

impl Operation {
    /// Name of the request span (the OpenAI operation).
    pub fn span_name(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat.completions",
            Operation::Embeddings => "embeddings",
            Operation::Messages => "messages",
            Operation::CountTokens => "messages.count_tokens",
            Operation::Responses => "responses",
        }
    }

    /// `gen_ai.operation.name` (OpenTelemetry GenAI semantic conventions), for inference calls.
    pub fn gen_ai_operation(self) -> Option<&'static str> {
        match self {
            Operation::ChatCompletions | Operation::Messages | Operation::Responses => Some("chat"),
            Operation::Embeddings => Some("embeddings"),
            Operation::CountTokens => None,
        }
    }

    /// The path suffix after `/v1/`: OpenAI's (shared by OpenAI and Azure) or Anthropic's.
    pub fn path(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat/completions",
            Operation::Embeddings => "embeddings",
            Operation::Messages => "messages",
            Operation::CountTokens => "messages/count_tokens",
            Operation::Responses => "responses",
        }
    }

    /// Whether the operation is a chat turn (an answer that may be streamed).
    pub fn is_chat(self) -> bool {
        matches!(
            self,
            Operation::ChatCompletions | Operation::Messages | Operation::Responses
        )
    }
}

/// How the client's request arrived, and so how errors and answers must look to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundDialect {
    /// OpenAI's chat completions and embeddings (also on the Azure-style deployment routes): the
    /// body is OpenAI's, errors are OpenAI's `{"error": {...}}`.
    OpenAi,
    /// Anthropic's Messages API (`/v1/messages`): errors are
    /// `{"type":"error","error":{"type","message"}}` with the statuses of DESIGN §17.
    Anthropic,
    /// OpenAI's Responses API (`/v1/responses`): errors are OpenAI's, mid-stream failures the
    /// Responses API's own `response.failed` / `error` events.
    Responses,
}

impl InboundDialect {
    /// The error as this dialect's clients expect it.
    pub fn error_response(self, error: ApiError) -> Response {
        match self {
            InboundDialect::OpenAi | InboundDialect::Responses => error.into_response(),
            InboundDialect::Anthropic => error.into_anthropic_response(),
        }
    }
}

/// What one request asks for, as its route and path said it (the body is read later, once its
/// key was accepted).
#[derive(Debug)]
pub struct InboundRequest {
    pub dialect: InboundDialect,
    pub operation: Operation,
    /// The alias named in the path (Azure-style `/openai/deployments/{alias}/…`); otherwise the
    /// body's `model` names it.
    pub path_alias: Option<String>,
    /// `api-version` from the query of an Azure-style route.
    pub client_api_version: Option<String>,
}

impl InboundRequest {
    /// An OpenAI-style request that names its model in the body.
    pub fn openai(operation: Operation) -> Self {
        Self {
            dialect: InboundDialect::OpenAi,
            operation,
            path_alias: None,
            client_api_version: None,
        }
    }

    /// An Anthropic Messages request (`/v1/messages`, `/v1/messages/count_tokens`).
    pub fn anthropic(operation: Operation) -> Self {
        Self {
            dialect: InboundDialect::Anthropic,
            operation,
            path_alias: None,
            client_api_version: None,
        }
    }

    /// An OpenAI Responses API request (`/v1/responses`).
    pub fn responses() -> Self {
        Self {
            dialect: InboundDialect::Responses,
            operation: Operation::Responses,
            path_alias: None,
            client_api_version: None,
        }
    }

    /// An Azure-style request: the alias is the path's deployment.
    pub fn azure(operation: Operation, alias: String, api_version: Option<String>) -> Self {
        Self {
            dialect: InboundDialect::OpenAi,
            operation,
            path_alias: Some(alias),
            client_api_version: api_version,
        }
    }
}
