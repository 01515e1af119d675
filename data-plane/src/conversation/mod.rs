//! The internal conversation model (DESIGN §17): one typed form of a chat request, its answer and
//! its streamed events, so that N inbound dialects and M upstream wire formats need N + M
//! converters, not N × M.
//!
//! Each dialect has one module that converts both ways:
//! - [`anthropic`]: Anthropic Messages requests, answers and SSE events;
//! - [`openai_chat`]: OpenAI Chat Completions requests, answers and SSE chunks;
//! - [`responses`]: OpenAI Responses requests (read), answers and SSE events (written), for
//!   upstreams that do not speak the Responses API (stateless: `store: false`).
//!
//! Gemini and Bedrock Converse reach the model through their existing OpenAI-chat converters
//! (`providers::google::chat`, `providers::bedrock::converse`): a Messages request for them is
//! converted to the model, written as an OpenAI chat request, and their OpenAI-format answer is
//! read back into the model.
//!
//! A field that cannot cross is refused with a 400 naming it when dropping it would change the
//! answer the client asked for; hints and metadata are dropped (listed in each converter).

pub mod anthropic;
pub mod openai_chat;
pub mod responses;

use crate::errors::ApiError;
use crate::sse::StreamTranslator;
use crate::usage::Usage;
use bytes::BytesMut;
use serde_json::value::RawValue;

/// A chat request in the model: what every converter reads from its dialect and writes to its
/// wire format.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The model the client named (an alias); converters to an upstream replace it.
    pub model: String,
    /// System prompt blocks, in order.
    pub system: Vec<TextBlock>,
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    /// Whether the model may call several tools in one turn (`None`: the upstream's default).
    pub parallel_tool_calls: Option<bool>,
    /// Cap on generated tokens (Anthropic `max_tokens`, OpenAI `max_completion_tokens`).
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub stop_sequences: Vec<String>,
    pub stream: bool,
    pub reasoning: Option<Reasoning>,
    /// A JSON schema the answer must follow (OpenAI `response_format: json_schema`).
    pub json_schema: Option<JsonSchema>,
}

/// A text block with the prompt-cache breakpoint Anthropic clients set on it.
#[derive(Debug, Clone)]
pub struct TextBlock {
    pub text: String,
    /// The block's `cache_control` as the client sent it (raw JSON), for targets with prompt
    /// caching; dropped elsewhere.
    pub cache_control: Option<Box<RawValue>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    /// A system instruction between turns (Anthropic's mid-conversation system messages, which
    /// Claude Code sends; OpenAI system messages keep their place too). Text parts only.
    System,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Part>,
}

/// One piece of a message's content.
#[derive(Debug, Clone)]
pub enum Part {
    Text(TextBlock),
    Image(Image),
    /// The assistant asked for a tool call.
    ToolCall(ToolCall),
    /// The result of a tool call, sent back by the client (a user turn).
    ToolResult(ToolResult),
    /// The model's visible reasoning, with the signature that lets the model that wrote it verify
    /// it when it comes back (Anthropic `thinking`, Gemini thought signatures).
    Reasoning {
        text: String,
        signature: Option<String>,
    },
    /// Reasoning the upstream returned encrypted (Anthropic `redacted_thinking`).
    RedactedReasoning {
        data: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Image {
    /// Inline bytes, base64.
    Base64 {
        media_type: String,
        data: String,
    },
    Url(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (an object).
    pub arguments: String,
}

#[derive(Debug, Clone)]
pub struct ToolResult {
    pub call_id: String,
    /// Text and images.
    pub content: Vec<Part>,
    pub is_error: bool,
}

/// A tool the client offers (function tools only; hosted tools are dropped or refused by the
/// converter that meets them).
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of the arguments, raw.
    pub parameters: Box<RawValue>,
    pub cache_control: Option<Box<RawValue>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    /// Some tool must be called.
    Any,
    /// This tool must be called.
    Tool(String),
}

/// What the client asked of the model's reasoning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reasoning {
    /// Anthropic `thinking.budget_tokens`.
    pub budget_tokens: Option<u64>,
    /// OpenAI `reasoning_effort` (`low`, `medium`, `high`...).
    pub effort: Option<String>,
}

#[derive(Debug, Clone)]
pub struct JsonSchema {
    pub name: String,
    pub schema: Box<RawValue>,
    pub strict: Option<bool>,
}

/// A whole (non-streamed) answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The upstream's id for the answer.
    pub id: String,
    /// The model the answer names (the alias the client asked for, set by the gateway).
    pub model: String,
    pub content: Vec<Part>,
    pub stop: StopReason,
    pub usage: TokenUsage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The model finished its turn (OpenAI `stop`, Anthropic `end_turn`).
    EndTurn,
    /// The token cap was reached (`length` / `max_tokens`).
    MaxTokens,
    /// A stop sequence matched (OpenAI reports `stop`).
    StopSequence(Option<String>),
    /// The model called tools (`tool_calls` / `tool_use`).
    ToolUse,
    /// A content filter cut the answer (`content_filter` / `refusal`).
    ContentFilter,
    /// Anything else the upstream said, kept as its text.
    Other(String),
}

/// Token counts of one answer, in Anthropic's split: `input` excludes the cached tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    /// Reasoning tokens, included in `output` (OpenAI `completion_tokens_details`).
    pub reasoning: u64,
}

impl TokenUsage {
    /// All prompt tokens, cached or not (OpenAI's `prompt_tokens`).
    pub fn prompt_total(&self) -> u64 {
        self.input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_write)
    }

    /// Whether the upstream reported any count (an answer always has input tokens).
    pub fn reported(&self) -> bool {
        *self != TokenUsage::default()
    }

    /// The usage the limiter and metrics count, `None` when nothing was reported.
    pub fn reported_usage(self) -> Option<Usage> {
        self.reported().then(|| self.to_usage())
    }

    /// The usage the limiter and metrics count.
    pub fn to_usage(self) -> Usage {
        let prompt = self.prompt_total();
        Usage {
            prompt_tokens: prompt,
            completion_tokens: self.output,
            total_tokens: prompt.saturating_add(self.output),
            cache_read_tokens: self.cache_read,
            cache_write_tokens: self.cache_write,
            reasoning_tokens: self.reasoning,
        }
    }

    /// The model's split of OpenAI-split counts: `input` without the cached tokens OpenAI counts
    /// in `prompt_tokens` (saturating: the counts come from the upstream).
    pub fn from_usage(usage: Usage) -> Self {
        TokenUsage {
            input: usage
                .prompt_tokens
                .saturating_sub(usage.cache_read_tokens)
                .saturating_sub(usage.cache_write_tokens),
            output: usage.completion_tokens,
            cache_read: usage.cache_read_tokens,
            cache_write: usage.cache_write_tokens,
            reasoning: usage.reasoning_tokens,
        }
    }
}

/// One streamed event in the model. Content comes as a sequence of blocks, each opened, filled
/// by deltas of its kind and closed, one block at a time (as Anthropic streams them); writers for
/// dialects that interleave (OpenAI tool-call indexes) number the blocks themselves.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The answer starts; `usage` holds the input counts when the upstream gives them this early.
    Start {
        id: String,
        model: String,
        usage: TokenUsage,
    },
    /// A block opens.
    BlockStart(BlockKind),
    TextDelta(String),
    ReasoningDelta(String),
    SignatureDelta(String),
    /// Part of a tool call's arguments (JSON text).
    ArgumentsDelta(String),
    /// The open block closes.
    BlockStop,
    /// The answer ends; `usage` is complete (input and output).
    Finish {
        stop: StopReason,
        usage: TokenUsage,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockKind {
    Text,
    Reasoning,
    RedactedReasoning { data: String },
    ToolCall { id: String, name: String },
}

/// Reads an upstream's streamed answer (bytes of its wire format) into model events.
pub trait EventReader: Send + 'static {
    /// Consumes bytes from the upstream, appending the events they complete.
    fn push(&mut self, chunk: &[u8], events: &mut Vec<StreamEvent>) -> Result<(), ApiError>;
    /// The upstream closed its body: an error when the answer was not whole.
    fn finish(&mut self, events: &mut Vec<StreamEvent>) -> Result<(), ApiError>;
    /// True once the terminal event was read.
    fn complete(&self) -> bool;
}

/// Writes model events as the client's dialect streams them.
pub trait EventWriter: Send + 'static {
    fn write(&mut self, event: &StreamEvent, out: &mut BytesMut);
    /// A failure after the stream started, as the dialect's mid-stream error event.
    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut);
}

/// A [`StreamTranslator`] from any reader to any writer, keeping the usage seen on the way.
pub struct Translate<R, W> {
    reader: R,
    writer: W,
    events: Vec<StreamEvent>,
    usage: Option<TokenUsage>,
}

impl<R: EventReader, W: EventWriter> Translate<R, W> {
    pub fn new(reader: R, writer: W) -> Self {
        Self {
            reader,
            writer,
            events: Vec::new(),
            usage: None,
        }
    }

    fn drain(&mut self, out: &mut BytesMut) {
        for event in self.events.drain(..) {
            match &event {
                // All zeros mean "not reported" (every real answer has input tokens): the
                // reservation's estimate then stands.
                StreamEvent::Start { usage, .. } | StreamEvent::Finish { usage, .. }
                    if usage.reported() =>
                {
                    self.usage = Some(*usage);
                }
                _ => {}
            }
            self.writer.write(&event, out);
        }
    }
}

impl<R: EventReader, W: EventWriter> StreamTranslator for Translate<R, W> {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        let read = self.reader.push(chunk, &mut self.events);
        self.drain(out);
        read
    }

    fn finish(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        let read = self.reader.finish(&mut self.events);
        self.drain(out);
        read
    }

    fn complete(&self) -> bool {
        self.reader.complete()
    }

    fn usage(&self) -> Option<Usage> {
        self.usage.map(TokenUsage::to_usage)
    }

    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        self.writer.write_error(error, out);
    }
}
