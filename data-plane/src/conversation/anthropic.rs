//! The Anthropic Messages dialect (DESIGN §17), converted both ways: requests, whole answers and
//! streamed events.
//!
//! # Reading a Messages request ([`parse_request`])
//!
//! Used when a Messages client (Claude Code, the anthropic SDKs) calls a model that does not speak
//! Messages; a Messages request for a Claude upstream is passed through untouched instead.
//!
//! Dropped, because they are hints or metadata that do not change the answer:
//! - `metadata` (Claude Code's `user_id`), `context_management`, `service_tier`, `inference_geo`
//!   and any other top-level member this module does not know (new beta hints arrive with every
//!   Claude Code release; refusing them would lock the client out);
//! - `thinking.display`;
//! - tool extras: `defer_loading`, `strict`, `input_examples`, `eager_input_streaming`...;
//! - hosted (server) tools, i.e. any tool whose `type` is present and is not `custom`
//!   (`web_search_20250305`, `bash_20250124`, `text_editor_20250728`, `code_execution_...`): they
//!   are removed from the offered list, since the target cannot run them;
//! - `cache_control` on images and tool results, and `citations` on text blocks. `cache_control`
//!   on system blocks, text blocks and tools is kept in the model; writers for targets without
//!   prompt caching drop it.
//!
//! Refused with a 400 naming the field, because dropping them would change the answer:
//! - `container`, `mcp_servers`;
//! - a `tool_choice` that forces a removed hosted tool (by name, or `any` when only hosted tools
//!   were offered);
//! - content blocks that cannot cross: `document`, `search_result`, `container_upload`, and the
//!   blocks of hosted tools in the history (`server_tool_use`, `web_search_tool_result`,
//!   `web_fetch_tool_result`, `code_execution_tool_result`, `mcp_tool_use`...); image sources other
//!   than `base64` and `url` (`file`);
//! - a `thinking.type` other than `enabled`, `disabled` or `adaptive`.
//!
//! Mapped: `max_tokens` (required, as Anthropic requires it); `system` as a string or text blocks;
//! `tool_choice.disable_parallel_tool_use: true` → `parallel_tool_calls: false`;
//! `thinking: enabled` → a reasoning budget, `adaptive` → reasoning without a budget, `disabled` →
//! none; `output_config.effort` → reasoning effort; `output_config.format` (or the older
//! `output_format`) `json_schema` → the model's JSON schema.
//!
//! # Writing a Messages request ([`write_request`])
//!
//! Used when a client of another dialect calls a Claude model. `max_tokens` defaults to
//! [`DEFAULT_MAX_TOKENS`] (Anthropic requires it; OpenAI clients usually omit it). A reasoning
//! effort without a budget becomes a thinking budget ([`effort_budget`]); since Anthropic requires
//! `max_tokens > budget_tokens`, `max_tokens` is raised to budget + [`DEFAULT_MAX_TOKENS`] when the
//! client did not set both. A JSON schema is refused (`response_format`). Consecutive messages of
//! one role are merged (Anthropic requires alternating turns, and tool results must sit in the
//! user turn right after the tool calls), with tool results first in their turn. Reasoning without
//! a signature is dropped (Claude refuses unsigned thinking). Empty text blocks and the messages
//! left empty are dropped (Anthropic refuses them); so is a `tool_choice` when no tool is offered.
//! `model` is written only for targets that name the model in the body ([`AnthropicTarget`]);
//! Bedrock bodies carry no `stream` (InvokeModel refuses it; the URL says whether to stream).
//!
//! # Answers and streams
//!
//! [`parse_reply`] / [`write_reply`] convert whole answers; [`AnthropicEventReader`] reads an
//! upstream's SSE (or, through [`AnthropicEventReader::push_event_json`], the bare event JSON that
//! Bedrock InvokeModel streams carry) and [`AnthropicEventWriter`] writes SSE exactly as Anthropic
//! does. Blocks of types the model does not carry (hosted tool results) are skipped in answers.

use super::{
    BlockKind, EventReader, EventWriter, Image, JsonSchema, Message, Part, Reasoning, Reply,
    Request, Role, StopReason, StreamEvent, TextBlock, TokenUsage, Tool, ToolCall, ToolChoice,
    ToolResult,
};
use crate::body::ParsedRequest;
use crate::errors::ApiError;
use crate::providers::openai_request::{get, parse_as};
use crate::sse::{EventSplitter, data_of, event_too_large, stream_truncated};
use bytes::BytesMut;
use http::StatusCode;
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use std::fmt::Display;

/// `max_tokens` written when the request has none (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn invalid(field: &str, what: impl Display) -> ApiError {
    ApiError::invalid_request(format!("`{field}`: {what}")).with_param(field)
}

fn required(field: &str) -> ApiError {
    ApiError::invalid_request(format!("{field}: field required")).with_param(field)
}

/// A valid Messages field that the target cannot carry.
fn cannot_cross(field: &str, what: impl Display) -> ApiError {
    ApiError::invalid_request(format!(
        "`{field}`: {what}, which the gateway cannot translate for this model (it does not speak Anthropic Messages)"
    ))
    .with_param(field)
    .with_code("unsupported_parameter")
}

fn is_object(raw: &RawValue) -> bool {
    raw.get().trim_start().starts_with('{')
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

// ---------------------------------------------------------------------------------------------
// Wire types, read
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<Box<RawValue>>,
}

/// Any content block, flat: which members matter depends on `type`; others are ignored.
#[derive(Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    cache_control: Option<Box<RawValue>>,
    #[serde(default)]
    source: Option<Box<RawValue>>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Box<RawValue>>,
    #[serde(default)]
    tool_use_id: Option<String>,
    #[serde(default)]
    content: Option<Box<RawValue>>,
    #[serde(default)]
    is_error: Option<bool>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

#[derive(Deserialize)]
struct WireSource {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct WireTool {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Box<RawValue>>,
    #[serde(default)]
    cache_control: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Deserialize)]
struct WireThinking {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    budget_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WireOutputConfig {
    #[serde(default)]
    effort: Option<String>,
    #[serde(default)]
    format: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    schema: Option<Box<RawValue>>,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    fn to_usage(&self) -> TokenUsage {
        TokenUsage {
            input: self.input_tokens.unwrap_or(0),
            output: self.output_tokens.unwrap_or(0),
            cache_read: self.cache_read_input_tokens.unwrap_or(0),
            cache_write: self.cache_creation_input_tokens.unwrap_or(0),
            reasoning: 0,
        }
    }

    /// Stream usage: each count present and non-zero replaces the one seen before (output is
    /// cumulative; `message_delta` may repeat the input counts or send zeros for them).
    fn merge_into(&self, usage: &mut TokenUsage) {
        let pairs = [
            (self.input_tokens, &mut usage.input),
            (self.output_tokens, &mut usage.output),
            (self.cache_read_input_tokens, &mut usage.cache_read),
            (self.cache_creation_input_tokens, &mut usage.cache_write),
        ];
        for (value, slot) in pairs {
            if let Some(n) = value.filter(|n| *n > 0) {
                *slot = n;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// parse_request
// ---------------------------------------------------------------------------------------------

/// Reads a Messages request into the model (the drop and refusal rules are in the module doc).
pub fn parse_request(request: &ParsedRequest<'_>) -> Result<Request, ApiError> {
    let object = &request.object;
    let model = request
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| required("model"))?;
    for (key, what) in [
        ("container", "a code execution container"),
        ("mcp_servers", "remote MCP servers"),
    ] {
        if object.get(key).is_some_and(|raw| !is_null(raw)) {
            return Err(cannot_cross(key, format!("the request uses {what}")));
        }
    }
    let max_tokens: u64 = get(object, "max_tokens")?.ok_or_else(|| required("max_tokens"))?;
    let system = match object.get("system") {
        None => Vec::new(),
        Some(raw) => parse_system(raw)?,
    };
    let raw_messages: Vec<Box<RawValue>> =
        get(object, "messages")?.ok_or_else(|| required("messages"))?;
    let mut messages = Vec::with_capacity(raw_messages.len());
    for (i, raw) in raw_messages.iter().enumerate() {
        messages.push(parse_message(raw, i)?);
    }

    let (tools, hosted) = parse_tools(object)?;
    let (mut tool_choice, parallel_tool_calls) = parse_tool_choice(object, &tools, &hosted)?;
    if tools.is_empty() && matches!(tool_choice, Some(ToolChoice::Auto | ToolChoice::None)) {
        // Nothing left to choose from (only hosted tools were offered): targets refuse a choice
        // without tools.
        tool_choice = None;
    }

    let mut reasoning = match get::<WireThinking>(object, "thinking")? {
        None => None,
        Some(thinking) => match thinking.kind.as_str() {
            "enabled" => {
                let budget = thinking
                    .budget_tokens
                    .ok_or_else(|| required("thinking.budget_tokens"))?;
                Some(Reasoning {
                    budget_tokens: Some(budget),
                    effort: None,
                })
            }
            "adaptive" => Some(Reasoning {
                budget_tokens: None,
                effort: None,
            }),
            "disabled" => None,
            other => {
                return Err(invalid(
                    "thinking.type",
                    format!("must be enabled, disabled or adaptive, got `{other}`"),
                ));
            }
        },
    };
    let mut json_schema = None;
    if let Some(config) = get::<WireOutputConfig>(object, "output_config")? {
        if let Some(effort) = config.effort {
            reasoning
                .get_or_insert(Reasoning {
                    budget_tokens: None,
                    effort: None,
                })
                .effort = Some(effort);
        }
        if let Some(format) = config.format.filter(|f| !is_null(f)) {
            json_schema = parse_format(&format, "output_config.format")?;
        }
    }
    if let Some(format) = object.get("output_format").filter(|f| !is_null(f)) {
        json_schema = parse_format(format, "output_format")?;
    }

    Ok(Request {
        model,
        system,
        messages,
        tools,
        tool_choice,
        parallel_tool_calls,
        max_tokens: Some(max_tokens),
        temperature: get(object, "temperature")?,
        top_p: get(object, "top_p")?,
        top_k: get(object, "top_k")?,
        stop_sequences: get(object, "stop_sequences")?.unwrap_or_default(),
        stream: request.stream,
        reasoning,
        json_schema,
    })
}

fn parse_system(raw: &RawValue) -> Result<Vec<TextBlock>, ApiError> {
    let text = raw.get().trim_start();
    if text.starts_with('"') {
        let text: String = parse_as(raw, "system")?;
        return Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![TextBlock {
                text,
                cache_control: None,
            }]
        });
    }
    if is_null(raw) {
        return Ok(Vec::new());
    }
    let blocks: Vec<Box<RawValue>> = parse_as(raw, "system")?;
    let mut out = Vec::with_capacity(blocks.len());
    for (k, block) in blocks.iter().enumerate() {
        let field = format!("system[{k}]");
        let block: WireBlock = parse_as(block, &field)?;
        if block.kind != "text" {
            return Err(cannot_cross(
                &field,
                format!("the system prompt holds a `{}` block", block.kind),
            ));
        }
        out.push(TextBlock {
            text: block
                .text
                .ok_or_else(|| required(&format!("{field}.text")))?,
            cache_control: block.cache_control,
        });
    }
    Ok(out)
}

fn parse_message(raw: &RawValue, i: usize) -> Result<Message, ApiError> {
    let field = format!("messages[{i}]");
    let message: WireMessage = parse_as(raw, &field)?;
    let role = match message.role.as_str() {
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(invalid(
                &format!("{field}.role"),
                format!("must be user or assistant, got `{other}`"),
            ));
        }
    };
    let content_field = format!("{field}.content");
    let raw = message
        .content
        .filter(|c| !is_null(c))
        .ok_or_else(|| required(&content_field))?;
    let content = if raw.get().trim_start().starts_with('"') {
        let text: String = parse_as(&raw, &content_field)?;
        vec![Part::Text(TextBlock {
            text,
            cache_control: None,
        })]
    } else {
        let blocks: Vec<Box<RawValue>> = parse_as(&raw, &content_field)?;
        let mut parts = Vec::with_capacity(blocks.len());
        for (j, block) in blocks.iter().enumerate() {
            let field = format!("{content_field}[{j}]");
            let block: WireBlock = parse_as(block, &field)?;
            parts.push(parse_block(block, role, &field)?);
        }
        parts
    };
    Ok(Message { role, content })
}

/// One message content block.
fn parse_block(block: WireBlock, role: Role, field: &str) -> Result<Part, ApiError> {
    let part = match block.kind.as_str() {
        "text" => Part::Text(TextBlock {
            text: block
                .text
                .ok_or_else(|| required(&format!("{field}.text")))?,
            cache_control: block.cache_control,
        }),
        "image" => Part::Image(parse_image(block.source.as_deref(), field)?),
        "tool_use" => {
            if role != Role::Assistant {
                return Err(invalid(
                    field,
                    "`tool_use` blocks belong in assistant turns",
                ));
            }
            let id = block.id.ok_or_else(|| required(&format!("{field}.id")))?;
            let name = block
                .name
                .ok_or_else(|| required(&format!("{field}.name")))?;
            let arguments = match block.input.filter(|i| !is_null(i)) {
                None => "{}".to_owned(),
                Some(input) if is_object(&input) => input.get().to_owned(),
                Some(_) => return Err(invalid(&format!("{field}.input"), "must be an object")),
            };
            Part::ToolCall(ToolCall {
                id,
                name,
                arguments,
            })
        }
        "tool_result" => {
            if role != Role::User {
                return Err(invalid(field, "`tool_result` blocks belong in user turns"));
            }
            let call_id = block
                .tool_use_id
                .ok_or_else(|| required(&format!("{field}.tool_use_id")))?;
            let content = match block.content.filter(|c| !is_null(c)) {
                None => Vec::new(),
                Some(raw) => parse_tool_result_content(&raw, &format!("{field}.content"))?,
            };
            Part::ToolResult(ToolResult {
                call_id,
                content,
                is_error: block.is_error.unwrap_or(false),
            })
        }
        "thinking" => Part::Reasoning {
            text: block
                .thinking
                .ok_or_else(|| required(&format!("{field}.thinking")))?,
            // An empty signature is no signature (the gateway writes "" for reasoning that came
            // unsigned from another model).
            signature: block.signature.filter(|s| !s.is_empty()),
        },
        "redacted_thinking" => Part::RedactedReasoning {
            data: block
                .data
                .ok_or_else(|| required(&format!("{field}.data")))?,
        },
        "server_tool_use"
        | "web_search_tool_result"
        | "web_fetch_tool_result"
        | "code_execution_tool_result"
        | "bash_code_execution_tool_result"
        | "text_editor_code_execution_tool_result"
        | "tool_search_tool_result"
        | "mcp_tool_use"
        | "mcp_tool_result" => {
            return Err(cannot_cross(
                field,
                format!(
                    "the history holds a `{}` block of a hosted tool",
                    block.kind
                ),
            ));
        }
        other => {
            return Err(cannot_cross(
                field,
                format!("the message holds a `{other}` block"),
            ));
        }
    };
    Ok(part)
}

fn parse_image(source: Option<&RawValue>, field: &str) -> Result<Image, ApiError> {
    let field = format!("{field}.source");
    let source: WireSource = parse_as(source.ok_or_else(|| required(&field))?, &field)?;
    match source.kind.as_str() {
        "base64" => Ok(Image::Base64 {
            media_type: source
                .media_type
                .ok_or_else(|| required(&format!("{field}.media_type")))?,
            data: source
                .data
                .ok_or_else(|| required(&format!("{field}.data")))?,
        }),
        "url" => Ok(Image::Url(
            source
                .url
                .ok_or_else(|| required(&format!("{field}.url")))?,
        )),
        other => Err(cannot_cross(
            &field,
            format!("the image has a `{other}` source"),
        )),
    }
}

fn parse_tool_result_content(raw: &RawValue, field: &str) -> Result<Vec<Part>, ApiError> {
    if raw.get().trim_start().starts_with('"') {
        let text: String = parse_as(raw, field)?;
        return Ok(vec![Part::Text(TextBlock {
            text,
            cache_control: None,
        })]);
    }
    let blocks: Vec<Box<RawValue>> = parse_as(raw, field)?;
    let mut parts = Vec::with_capacity(blocks.len());
    for (k, block) in blocks.iter().enumerate() {
        let field = format!("{field}[{k}]");
        let block: WireBlock = parse_as(block, &field)?;
        match block.kind.as_str() {
            "text" => parts.push(Part::Text(TextBlock {
                text: block
                    .text
                    .ok_or_else(|| required(&format!("{field}.text")))?,
                cache_control: block.cache_control,
            })),
            "image" => parts.push(Part::Image(parse_image(block.source.as_deref(), &field)?)),
            other => {
                return Err(cannot_cross(
                    &field,
                    format!("the tool result holds a `{other}` block"),
                ));
            }
        }
    }
    Ok(parts)
}

/// The function tools, and the names of the hosted tools removed from the list.
fn parse_tools(object: &crate::body::RawObject<'_>) -> Result<(Vec<Tool>, Vec<String>), ApiError> {
    let raw: Vec<Box<RawValue>> = get(object, "tools")?.unwrap_or_default();
    let mut tools = Vec::with_capacity(raw.len());
    let mut hosted = Vec::new();
    for (i, tool) in raw.iter().enumerate() {
        let field = format!("tools[{i}]");
        let tool: WireTool = parse_as(tool, &field)?;
        if tool.kind.as_deref().is_some_and(|kind| kind != "custom") {
            hosted.extend(tool.name);
            continue;
        }
        let name = tool
            .name
            .ok_or_else(|| required(&format!("{field}.name")))?;
        let parameters = tool
            .input_schema
            .filter(|s| !is_null(s))
            .ok_or_else(|| required(&format!("{field}.input_schema")))?;
        if !is_object(&parameters) {
            return Err(invalid(
                &format!("{field}.input_schema"),
                "must be an object",
            ));
        }
        tools.push(Tool {
            name,
            description: tool.description,
            parameters,
            cache_control: tool.cache_control,
        });
    }
    Ok((tools, hosted))
}

fn parse_tool_choice(
    object: &crate::body::RawObject<'_>,
    tools: &[Tool],
    hosted: &[String],
) -> Result<(Option<ToolChoice>, Option<bool>), ApiError> {
    let Some(choice) = get::<WireToolChoice>(object, "tool_choice")? else {
        return Ok((None, None));
    };
    let parallel = choice
        .disable_parallel_tool_use
        .unwrap_or(false)
        .then_some(false);
    let choice = match choice.kind.as_str() {
        "auto" => ToolChoice::Auto,
        "none" => ToolChoice::None,
        "any" => {
            if tools.is_empty() && !hosted.is_empty() {
                return Err(cannot_cross(
                    "tool_choice",
                    "it forces a tool call but only hosted tools are offered",
                ));
            }
            ToolChoice::Any
        }
        "tool" => {
            let name = choice.name.ok_or_else(|| required("tool_choice.name"))?;
            if hosted.contains(&name) {
                return Err(cannot_cross(
                    "tool_choice",
                    format!("it forces the hosted tool `{name}`"),
                ));
            }
            if !tools.iter().any(|t| t.name == name) {
                return Err(invalid(
                    "tool_choice.name",
                    format!("names no tool in `tools`: `{name}`"),
                ));
            }
            ToolChoice::Tool(name)
        }
        other => {
            return Err(invalid(
                "tool_choice.type",
                format!("must be auto, any, tool or none, got `{other}`"),
            ));
        }
    };
    Ok((Some(choice), parallel))
}

fn parse_format(raw: &RawValue, field: &str) -> Result<Option<JsonSchema>, ApiError> {
    let format: WireFormat = parse_as(raw, field)?;
    if format.kind != "json_schema" {
        return Err(invalid(
            &format!("{field}.type"),
            format!("must be json_schema, got `{}`", format.kind),
        ));
    }
    let schema = format
        .schema
        .ok_or_else(|| required(&format!("{field}.schema")))?;
    Ok(Some(JsonSchema {
        // Anthropic's format has no name; OpenAI requires one.
        name: "response".to_owned(),
        schema,
        strict: Some(true),
    }))
}

// ---------------------------------------------------------------------------------------------
// Wire types, written
// ---------------------------------------------------------------------------------------------

/// `{}`, without going through a fallible `RawValue` constructor.
#[derive(Debug, Clone, Copy)]
struct EmptyObject;

impl Serialize for EmptyObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_map(Some(0))?.end()
    }
}

/// A tool call's `input`: the arguments as they came, or `{}`.
#[derive(Serialize)]
#[serde(untagged)]
enum Input {
    Owned(Box<RawValue>),
    Empty(EmptyObject),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutSource<'a> {
    Base64 { media_type: &'a str, data: &'a str },
    Url { url: &'a str },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutBlock<'a> {
    Text {
        text: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<&'a RawValue>,
    },
    Image {
        source: OutSource<'a>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Input,
    },
    ToolResult {
        tool_use_id: &'a str,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        content: Vec<OutBlock<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
    Thinking {
        thinking: &'a str,
        signature: &'a str,
    },
    RedactedThinking {
        data: &'a str,
    },
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: Vec<OutBlock<'a>>,
}

#[derive(Serialize)]
struct OutSystem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct OutTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct OutToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutThinking {
    Enabled { budget_tokens: u64 },
    Adaptive,
}

#[derive(Serialize)]
struct OutRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    anthropic_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<OutSystem<'a>>,
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<OutToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<OutThinking>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

/// Token counts as Anthropic writes them.
#[derive(Serialize)]
struct OutUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

impl From<&TokenUsage> for OutUsage {
    fn from(usage: &TokenUsage) -> Self {
        Self {
            input_tokens: usage.input,
            cache_creation_input_tokens: usage.cache_write,
            cache_read_input_tokens: usage.cache_read,
            output_tokens: usage.output,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// write_request
// ---------------------------------------------------------------------------------------------

/// Where a written Messages request goes. A body for Bedrock (an `anthropic_version_in_body`
/// starting with `bedrock`) has no `stream` member: InvokeModel refuses it, the URL
/// (`/invoke-with-response-stream`) says whether to stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnthropicTarget<'a> {
    /// The upstream's model id; `None` for Bedrock InvokeModel and Vertex, which name the model
    /// in the URL.
    pub model: Option<&'a str>,
    /// `anthropic_version` in the body (Bedrock `bedrock-2023-05-31`, Vertex
    /// `vertex-2023-10-16`); Anthropic's own API takes it as a header.
    pub anthropic_version_in_body: Option<&'a str>,
}

/// The thinking budget written for an OpenAI-style effort (Anthropic wants a budget, at least
/// 1024); `None` for `none` (no thinking).
pub fn effort_budget(effort: &str) -> Result<Option<u64>, ApiError> {
    match effort {
        "none" => Ok(None),
        "minimal" | "low" => Ok(Some(1024)),
        "medium" => Ok(Some(4096)),
        "high" => Ok(Some(16384)),
        "xhigh" | "max" => Ok(Some(32768)),
        other => Err(invalid(
            "reasoning_effort",
            format!("must be none, minimal, low, medium, high or xhigh, got `{other}`"),
        )),
    }
}

/// Writes the model as a Messages request for a Claude upstream (rules in the module doc).
pub fn write_request(request: &Request, target: &AnthropicTarget<'_>) -> Result<Vec<u8>, ApiError> {
    if request.json_schema.is_some() {
        return Err(cannot_cross(
            "response_format",
            "a json_schema response format is requested",
        ));
    }
    let mut max_tokens = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let thinking = match &request.reasoning {
        None => None,
        Some(Reasoning {
            budget_tokens: Some(budget),
            ..
        }) => {
            if request.max_tokens.is_none() && max_tokens <= *budget {
                max_tokens = budget.saturating_add(DEFAULT_MAX_TOKENS);
            }
            Some(OutThinking::Enabled {
                budget_tokens: *budget,
            })
        }
        Some(Reasoning {
            budget_tokens: None,
            effort: Some(effort),
        }) => match effort_budget(effort)? {
            None => None,
            Some(budget) => {
                if max_tokens <= budget {
                    max_tokens = budget.saturating_add(DEFAULT_MAX_TOKENS);
                }
                Some(OutThinking::Enabled {
                    budget_tokens: budget,
                })
            }
        },
        Some(Reasoning {
            budget_tokens: None,
            effort: None,
        }) => Some(OutThinking::Adaptive),
    };

    let system = request
        .system
        .iter()
        .filter(|b| !b.text.is_empty())
        .map(|b| OutSystem {
            kind: "text",
            text: &b.text,
            cache_control: b.cache_control.as_deref(),
        })
        .collect();

    let mut messages: Vec<OutMessage<'_>> = Vec::with_capacity(request.messages.len());
    for (i, message) in request.messages.iter().enumerate() {
        let mut blocks = Vec::with_capacity(message.content.len());
        for (j, part) in message.content.iter().enumerate() {
            if let Some(block) = write_part(part, &format!("messages[{i}].content[{j}]"))? {
                blocks.push(block);
            }
        }
        if blocks.is_empty() {
            continue;
        }
        let role = match message.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        match messages.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => messages.push(OutMessage {
                role,
                content: blocks,
            }),
        }
    }
    if messages.is_empty() {
        return Err(invalid(
            "messages",
            "at least one message with content is required",
        ));
    }
    for message in messages.iter_mut().filter(|m| m.role == "user") {
        // Anthropic wants a turn's tool results before anything else in it (stable: the order of
        // the results and of the rest is kept).
        message
            .content
            .sort_by_key(|b| !matches!(b, OutBlock::ToolResult { .. }));
    }

    let tools: Vec<OutTool<'_>> = request
        .tools
        .iter()
        .map(|t| OutTool {
            name: &t.name,
            description: t.description.as_deref(),
            input_schema: &t.parameters,
            cache_control: t.cache_control.as_deref(),
        })
        .collect();
    let disable_parallel = (request.parallel_tool_calls == Some(false)).then_some(true);
    let tool_choice = if tools.is_empty() {
        // Anthropic refuses a tool choice without tools.
        None
    } else {
        match (&request.tool_choice, disable_parallel) {
            (None, None) => None,
            (None | Some(ToolChoice::Auto), _) => Some(OutToolChoice {
                kind: "auto",
                name: None,
                disable_parallel_tool_use: disable_parallel,
            }),
            (Some(ToolChoice::None), _) => Some(OutToolChoice {
                kind: "none",
                name: None,
                disable_parallel_tool_use: None,
            }),
            (Some(ToolChoice::Any), _) => Some(OutToolChoice {
                kind: "any",
                name: None,
                disable_parallel_tool_use: disable_parallel,
            }),
            (Some(ToolChoice::Tool(name)), _) => Some(OutToolChoice {
                kind: "tool",
                name: Some(name),
                disable_parallel_tool_use: disable_parallel,
            }),
        }
    };

    let out = OutRequest {
        anthropic_version: target.anthropic_version_in_body,
        model: target.model,
        max_tokens,
        system,
        messages,
        tools,
        tool_choice,
        thinking,
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        stop_sequences: &request.stop_sequences,
        // Bedrock InvokeModel refuses `stream` (the URL says it); Anthropic and Vertex want it.
        stream: request.stream
            && !target
                .anthropic_version_in_body
                .is_some_and(|v| v.starts_with("bedrock")),
    };
    serde_json::to_vec(&out).map_err(|e| invalid("messages", e))
}

/// One part as a Messages block; `None` when the part is dropped.
fn write_part<'a>(part: &'a Part, field: &str) -> Result<Option<OutBlock<'a>>, ApiError> {
    Ok(match part {
        Part::Text(block) if block.text.is_empty() => None,
        Part::Text(block) => Some(OutBlock::Text {
            text: &block.text,
            cache_control: block.cache_control.as_deref(),
        }),
        Part::Image(image) => Some(OutBlock::Image {
            source: image_source(image),
        }),
        Part::ToolCall(call) => Some(OutBlock::ToolUse {
            id: &call.id,
            name: &call.name,
            input: arguments_input(&call.arguments)
                .ok_or_else(|| invalid(field, "the tool call's arguments are not a JSON object"))?,
        }),
        Part::ToolResult(result) => {
            let mut content = Vec::with_capacity(result.content.len());
            for part in &result.content {
                match part {
                    Part::Text(block) if !block.text.is_empty() => content.push(OutBlock::Text {
                        text: &block.text,
                        cache_control: block.cache_control.as_deref(),
                    }),
                    Part::Image(image) => content.push(OutBlock::Image {
                        source: image_source(image),
                    }),
                    // Nothing else can be a tool's output.
                    _ => {}
                }
            }
            Some(OutBlock::ToolResult {
                tool_use_id: &result.call_id,
                content,
                is_error: result.is_error,
            })
        }
        Part::Reasoning {
            text,
            signature: Some(signature),
        } => Some(OutBlock::Thinking {
            thinking: text,
            signature,
        }),
        // Claude refuses thinking it cannot verify.
        Part::Reasoning {
            signature: None, ..
        } => None,
        Part::RedactedReasoning { data } => Some(OutBlock::RedactedThinking { data }),
    })
}

fn image_source(image: &Image) -> OutSource<'_> {
    match image {
        Image::Base64 { media_type, data } => OutSource::Base64 { media_type, data },
        Image::Url(url) => OutSource::Url { url },
    }
}

/// Tool-call arguments (JSON text) as `input`; `None` when they are not a JSON object.
fn arguments_input(arguments: &str) -> Option<Input> {
    if arguments.trim().is_empty() {
        return Some(Input::Empty(EmptyObject));
    }
    let raw: Box<RawValue> = serde_json::from_str(arguments).ok()?;
    is_object(&raw).then_some(Input::Owned(raw))
}

// ---------------------------------------------------------------------------------------------
// Whole answers
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireReply {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(default)]
    model: String,
    content: Vec<WireBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    stop_sequence: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

fn stop_from_wire(reason: Option<&str>, sequence: Option<String>) -> StopReason {
    match reason {
        None | Some("end_turn") => StopReason::EndTurn,
        Some("max_tokens") => StopReason::MaxTokens,
        Some("stop_sequence") => StopReason::StopSequence(sequence),
        Some("tool_use") => StopReason::ToolUse,
        Some("refusal") => StopReason::ContentFilter,
        Some(other) => StopReason::Other(other.to_owned()),
    }
}

/// The stop reason and stop sequence as Anthropic writes them.
fn stop_to_wire(stop: &StopReason) -> (&str, Option<&str>) {
    match stop {
        StopReason::EndTurn => ("end_turn", None),
        StopReason::MaxTokens => ("max_tokens", None),
        StopReason::StopSequence(sequence) => ("stop_sequence", sequence.as_deref()),
        StopReason::ToolUse => ("tool_use", None),
        StopReason::ContentFilter => ("refusal", None),
        StopReason::Other(other) => (other, None),
    }
}

/// A Claude upstream's whole answer, into the model.
pub fn parse_reply(body: &[u8]) -> Result<Reply, ApiError> {
    let reply: WireReply = serde_json::from_slice(body)
        .map_err(|e| ApiError::upstream_bad_answer("anthropic", format!("not a message: {e}")))?;
    if reply.kind != "message" {
        return Err(ApiError::upstream_bad_answer(
            "anthropic",
            format!("expected type `message`, got `{}`", reply.kind),
        ));
    }
    let mut content = Vec::with_capacity(reply.content.len());
    for block in reply.content {
        let bad = |what: &str| {
            ApiError::upstream_bad_answer(
                "anthropic",
                format!("a `{}` block has no `{what}`", block.kind),
            )
        };
        match block.kind.as_str() {
            "text" => content.push(Part::Text(TextBlock {
                text: block.text.clone().ok_or_else(|| bad("text"))?,
                cache_control: None,
            })),
            "thinking" => content.push(Part::Reasoning {
                text: block.thinking.clone().ok_or_else(|| bad("thinking"))?,
                signature: block.signature.clone().filter(|s| !s.is_empty()),
            }),
            "redacted_thinking" => content.push(Part::RedactedReasoning {
                data: block.data.clone().ok_or_else(|| bad("data"))?,
            }),
            "tool_use" => content.push(Part::ToolCall(ToolCall {
                id: block.id.clone().ok_or_else(|| bad("id"))?,
                name: block.name.clone().ok_or_else(|| bad("name"))?,
                arguments: block
                    .input
                    .as_ref()
                    .map_or_else(|| "{}".to_owned(), |i| i.get().to_owned()),
            })),
            // Blocks of hosted tools: never offered through the gateway.
            _ => {}
        }
    }
    Ok(Reply {
        id: reply.id,
        model: reply.model,
        content,
        stop: stop_from_wire(reply.stop_reason.as_deref(), reply.stop_sequence),
        usage: reply.usage.to_usage(),
    })
}

#[derive(Serialize)]
struct OutReply<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<OutBlock<'a>>,
    stop_reason: &'a str,
    stop_sequence: Option<&'a str>,
    usage: OutUsage,
}

fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_owned()
    } else {
        format!("msg_{id}")
    }
}

/// A tool call's `input` in an answer: the arguments, or `{}` when they are not a JSON object
/// (an answer cut by `max_tokens` can end inside them).
fn reply_input(arguments: &str) -> Input {
    arguments_input(arguments).unwrap_or(Input::Empty(EmptyObject))
}

/// The model's answer as a Messages answer.
pub fn write_reply(reply: &Reply) -> Vec<u8> {
    let content = reply
        .content
        .iter()
        .filter_map(|part| match part {
            Part::Text(block) => Some(OutBlock::Text {
                text: &block.text,
                cache_control: None,
            }),
            Part::Reasoning { text, signature } => Some(OutBlock::Thinking {
                thinking: text,
                signature: signature.as_deref().unwrap_or(""),
            }),
            Part::RedactedReasoning { data } => Some(OutBlock::RedactedThinking { data }),
            Part::ToolCall(call) => Some(OutBlock::ToolUse {
                id: &call.id,
                name: &call.name,
                input: reply_input(&call.arguments),
            }),
            // Not something a model answers with.
            Part::Image(_) | Part::ToolResult(_) => None,
        })
        .collect();
    let (stop_reason, stop_sequence) = stop_to_wire(&reply.stop);
    let out = OutReply {
        id: message_id(&reply.id),
        kind: "message",
        role: "assistant",
        model: &reply.model,
        content,
        stop_reason,
        stop_sequence,
        usage: OutUsage::from(&reply.usage),
    };
    // Serialising strings and numbers cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Stream reader
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<WireStartMessage>,
    #[serde(default)]
    content_block: Option<WireBlock>,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireStartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    stop_sequence: Option<String>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Reads a Claude upstream's streamed answer into model events.
#[derive(Debug)]
pub struct AnthropicEventReader {
    provider: &'static str,
    splitter: EventSplitter,
    usage: TokenUsage,
    stop: Option<StopReason>,
    /// The block being read: `Some(true)` one the model carries, `Some(false)` one skipped (a
    /// hosted tool's), `None` between blocks.
    open: Option<bool>,
    done: bool,
}

impl AnthropicEventReader {
    /// A reader for `provider`'s stream (named in errors) refusing events over `max_event_bytes`.
    pub fn new(provider: &'static str, max_event_bytes: usize) -> Self {
        Self {
            provider,
            splitter: EventSplitter::new(max_event_bytes),
            usage: TokenUsage::default(),
            stop: None,
            open: None,
            done: false,
        }
    }

    fn bad(&self, detail: impl Display) -> ApiError {
        ApiError::upstream_bad_answer(self.provider, detail)
    }

    /// Reads one event's JSON (Bedrock InvokeModel streams carry them without SSE framing).
    pub fn push_event_json(
        &mut self,
        json: &[u8],
        events: &mut Vec<StreamEvent>,
    ) -> Result<(), ApiError> {
        if self.done {
            return Ok(());
        }
        if json.len() > self.splitter.max_event_bytes() {
            return Err(event_too_large(
                self.provider,
                self.splitter.max_event_bytes(),
            ));
        }
        if json.trim_ascii().is_empty() {
            return Ok(());
        }
        let event: WireEvent = serde_json::from_slice(json)
            .map_err(|e| self.bad(format!("a stream event is not valid JSON: {e}")))?;
        match event.kind.as_str() {
            "message_start" => {
                let message = event
                    .message
                    .ok_or_else(|| self.bad("message_start has no message"))?;
                message.usage.merge_into(&mut self.usage);
                events.push(StreamEvent::Start {
                    id: message.id,
                    model: message.model,
                    usage: self.usage,
                });
            }
            "content_block_start" => {
                let block = event
                    .content_block
                    .ok_or_else(|| self.bad("content_block_start has no content_block"))?;
                self.close_block(events);
                self.start_block(block, events)?;
            }
            "content_block_delta" => {
                let delta = event
                    .delta
                    .ok_or_else(|| self.bad("content_block_delta has no delta"))?;
                if self.open != Some(false) {
                    push_delta(delta, events);
                }
            }
            "content_block_stop" => self.close_block(events),
            "message_delta" => {
                if let Some(delta) = event.delta
                    && delta.stop_reason.is_some()
                {
                    self.stop = Some(stop_from_wire(
                        delta.stop_reason.as_deref(),
                        delta.stop_sequence,
                    ));
                }
                if let Some(usage) = event.usage {
                    usage.merge_into(&mut self.usage);
                }
            }
            "message_stop" => {
                self.close_block(events);
                events.push(StreamEvent::Finish {
                    stop: self.stop.take().unwrap_or(StopReason::EndTurn),
                    usage: self.usage,
                });
                self.done = true;
            }
            "error" => {
                let error = event.error.unwrap_or(WireError {
                    kind: String::new(),
                    message: String::new(),
                });
                return Err(stream_error(self.provider, &error));
            }
            // `ping`, and event types newer than this reader.
            _ => {}
        }
        Ok(())
    }

    fn close_block(&mut self, events: &mut Vec<StreamEvent>) {
        if self.open.take() == Some(true) {
            events.push(StreamEvent::BlockStop);
        }
    }

    fn start_block(
        &mut self,
        block: WireBlock,
        events: &mut Vec<StreamEvent>,
    ) -> Result<(), ApiError> {
        match block.kind.as_str() {
            "text" => {
                events.push(StreamEvent::BlockStart(BlockKind::Text));
                if let Some(text) = block.text.filter(|t| !t.is_empty()) {
                    events.push(StreamEvent::TextDelta(text));
                }
            }
            "thinking" => {
                events.push(StreamEvent::BlockStart(BlockKind::Reasoning));
                if let Some(text) = block.thinking.filter(|t| !t.is_empty()) {
                    events.push(StreamEvent::ReasoningDelta(text));
                }
                if let Some(signature) = block.signature.filter(|s| !s.is_empty()) {
                    events.push(StreamEvent::SignatureDelta(signature));
                }
            }
            "redacted_thinking" => {
                let data = block
                    .data
                    .ok_or_else(|| self.bad("a redacted_thinking block has no data"))?;
                events.push(StreamEvent::BlockStart(BlockKind::RedactedReasoning {
                    data,
                }));
            }
            "tool_use" => {
                let id = block
                    .id
                    .ok_or_else(|| self.bad("a tool_use block has no id"))?;
                let name = block
                    .name
                    .ok_or_else(|| self.bad("a tool_use block has no name"))?;
                events.push(StreamEvent::BlockStart(BlockKind::ToolCall { id, name }));
                // Anthropic starts with `input: {}` and streams the arguments as deltas; an
                // upstream that sends them whole here must not lose them.
                if let Some(input) = block.input.filter(|i| is_object(i) && !is_empty_object(i)) {
                    events.push(StreamEvent::ArgumentsDelta(input.get().to_owned()));
                }
            }
            _ => {
                self.open = Some(false);
                return Ok(());
            }
        }
        self.open = Some(true);
        Ok(())
    }
}

fn is_empty_object(raw: &RawValue) -> bool {
    let text = raw.get().trim();
    text.strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .is_some_and(|inner| inner.trim().is_empty())
}

fn push_delta(delta: WireDelta, events: &mut Vec<StreamEvent>) {
    let event = match delta.kind.as_deref() {
        Some("text_delta") => delta.text.map(StreamEvent::TextDelta),
        Some("thinking_delta") => delta.thinking.map(StreamEvent::ReasoningDelta),
        Some("signature_delta") => delta.signature.map(StreamEvent::SignatureDelta),
        Some("input_json_delta") => delta.partial_json.map(StreamEvent::ArgumentsDelta),
        // `citations_delta` and newer kinds carry nothing the model holds.
        _ => None,
    };
    // Empty deltas (Anthropic's first `input_json_delta` is often "") carry nothing.
    let empty = |e: &StreamEvent| match e {
        StreamEvent::TextDelta(s)
        | StreamEvent::ReasoningDelta(s)
        | StreamEvent::SignatureDelta(s)
        | StreamEvent::ArgumentsDelta(s) => s.is_empty(),
        _ => false,
    };
    events.extend(event.filter(|e| !empty(e)));
}

/// An upstream's mid-stream `error` event, with a status its type implies.
fn stream_error(provider: &str, error: &WireError) -> ApiError {
    let message = format!(
        "upstream {provider} failed mid-stream: {}",
        if error.message.is_empty() {
            error.kind.as_str()
        } else {
            error.message.as_str()
        }
    );
    match error.kind.as_str() {
        "overloaded_error" => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                .with_code("overloaded")
        }
        "rate_limit_error" => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "requests", message)
            .with_code("rate_limit_exceeded"),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message)
            .with_code("upstream_error"),
    }
}

impl EventReader for AnthropicEventReader {
    fn push(&mut self, chunk: &[u8], events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        if self.done {
            return Ok(());
        }
        self.splitter.push(chunk);
        while let Some(event) = self.splitter.next_event() {
            if let Some(data) = data_of(&event) {
                self.push_event_json(data.as_bytes(), events)?;
            }
            if self.done {
                return Ok(());
            }
        }
        if self.splitter.overflowed() {
            return Err(event_too_large(
                self.provider,
                self.splitter.max_event_bytes(),
            ));
        }
        Ok(())
    }

    fn finish(&mut self, events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        if !self.done
            && let Some(rest) = self.splitter.finish()
            && let Some(data) = data_of(&rest)
        {
            self.push_event_json(data.as_bytes(), events)?;
        }
        if self.done {
            Ok(())
        } else {
            Err(stream_truncated(self.provider, "message_stop"))
        }
    }

    fn complete(&self) -> bool {
        self.done
    }
}

// ---------------------------------------------------------------------------------------------
// Stream writer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Thinking,
    Redacted,
    ToolUse,
}

#[derive(Serialize)]
struct OutStartMessage<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: [(); 0],
    stop_reason: Option<()>,
    stop_sequence: Option<()>,
    usage: OutUsage,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum OutDelta<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "signature_delta")]
    Signature { signature: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

#[derive(Serialize)]
struct OutStopDelta<'a> {
    stop_reason: &'a str,
    stop_sequence: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutEvent<'a> {
    MessageStart {
        message: OutStartMessage<'a>,
    },
    ContentBlockStart {
        index: u64,
        content_block: OutBlock<'a>,
    },
    ContentBlockDelta {
        index: u64,
        delta: OutDelta<'a>,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageDelta {
        delta: OutStopDelta<'a>,
        usage: OutUsage,
    },
    MessageStop,
    Ping,
}

impl OutEvent<'_> {
    fn name(&self) -> &'static str {
        match self {
            OutEvent::MessageStart { .. } => "message_start",
            OutEvent::ContentBlockStart { .. } => "content_block_start",
            OutEvent::ContentBlockDelta { .. } => "content_block_delta",
            OutEvent::ContentBlockStop { .. } => "content_block_stop",
            OutEvent::MessageDelta { .. } => "message_delta",
            OutEvent::MessageStop => "message_stop",
            OutEvent::Ping => "ping",
        }
    }
}

fn write_event(event: &OutEvent<'_>, out: &mut BytesMut) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.name().as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Serialising strings and numbers cannot fail.
    out.extend_from_slice(&serde_json::to_vec(event).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
}

fn generated_id(prefix: &str) -> String {
    use rand::distr::{Alphanumeric, SampleString as _};
    format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    )
}

/// Writes model events as Anthropic streams them (`event: <type>\ndata: <json>\n\n`), naming the
/// model the client asked for. Tolerant of readers that skip `BlockStart` or `BlockStop`.
#[derive(Debug)]
pub struct AnthropicEventWriter {
    model: String,
    started: bool,
    finished: bool,
    open: Option<Open>,
    /// The index of the next block.
    next_index: u64,
}

impl AnthropicEventWriter {
    /// `model`: the model the client named, written instead of the upstream's.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            started: false,
            finished: false,
            open: None,
            next_index: 0,
        }
    }

    fn start(&mut self, id: &str, usage: &TokenUsage, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let id = if id.is_empty() {
            generated_id("msg_")
        } else {
            message_id(id)
        };
        write_event(
            &OutEvent::MessageStart {
                message: OutStartMessage {
                    id,
                    kind: "message",
                    role: "assistant",
                    model: &self.model,
                    content: [],
                    stop_reason: None,
                    stop_sequence: None,
                    usage: OutUsage::from(usage),
                },
            },
            out,
        );
        write_event(&OutEvent::Ping, out);
    }

    fn close(&mut self, out: &mut BytesMut) {
        if self.open.take().is_some() {
            write_event(
                &OutEvent::ContentBlockStop {
                    index: self.next_index,
                },
                out,
            );
            self.next_index = self.next_index.saturating_add(1);
        }
    }

    fn open(&mut self, kind: &BlockKind, out: &mut BytesMut) {
        self.start("", &TokenUsage::default(), out);
        self.close(out);
        let (open, block) = match kind {
            BlockKind::Text => (
                Open::Text,
                OutBlock::Text {
                    text: "",
                    cache_control: None,
                },
            ),
            BlockKind::Reasoning => (
                Open::Thinking,
                OutBlock::Thinking {
                    thinking: "",
                    signature: "",
                },
            ),
            BlockKind::RedactedReasoning { data } => {
                (Open::Redacted, OutBlock::RedactedThinking { data })
            }
            BlockKind::ToolCall { id, name } => (
                Open::ToolUse,
                OutBlock::ToolUse {
                    id,
                    name,
                    input: Input::Empty(EmptyObject),
                },
            ),
        };
        write_event(
            &OutEvent::ContentBlockStart {
                index: self.next_index,
                content_block: block,
            },
            out,
        );
        self.open = Some(open);
    }

    /// Makes sure a block of `kind` is open, opening one when the reader sent no `BlockStart`.
    fn ensure(&mut self, kind: Open, out: &mut BytesMut) {
        if self.open == Some(kind) {
            return;
        }
        let block = match kind {
            Open::Text => BlockKind::Text,
            Open::Thinking | Open::Redacted => BlockKind::Reasoning,
            Open::ToolUse => BlockKind::ToolCall {
                id: generated_id("toolu_"),
                name: String::new(),
            },
        };
        self.open(&block, out);
    }

    fn delta(&mut self, kind: Open, delta: OutDelta<'_>, out: &mut BytesMut) {
        self.ensure(kind, out);
        write_event(
            &OutEvent::ContentBlockDelta {
                index: self.next_index,
                delta,
            },
            out,
        );
    }
}

impl EventWriter for AnthropicEventWriter {
    fn write(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        if self.finished {
            return;
        }
        match event {
            StreamEvent::Start { id, usage, .. } => self.start(id, usage, out),
            StreamEvent::BlockStart(kind) => self.open(kind, out),
            StreamEvent::TextDelta(text) if !text.is_empty() => {
                self.delta(Open::Text, OutDelta::Text { text }, out);
            }
            StreamEvent::ReasoningDelta(thinking) if !thinking.is_empty() => {
                self.delta(Open::Thinking, OutDelta::Thinking { thinking }, out);
            }
            StreamEvent::SignatureDelta(signature) if !signature.is_empty() => {
                self.delta(Open::Thinking, OutDelta::Signature { signature }, out);
            }
            StreamEvent::ArgumentsDelta(partial_json) if !partial_json.is_empty() => {
                self.delta(Open::ToolUse, OutDelta::InputJson { partial_json }, out);
            }
            StreamEvent::TextDelta(_)
            | StreamEvent::ReasoningDelta(_)
            | StreamEvent::SignatureDelta(_)
            | StreamEvent::ArgumentsDelta(_) => {}
            StreamEvent::BlockStop => self.close(out),
            StreamEvent::Finish { stop, usage } => {
                self.start("", usage, out);
                self.close(out);
                let (stop_reason, stop_sequence) = stop_to_wire(stop);
                write_event(
                    &OutEvent::MessageDelta {
                        delta: OutStopDelta {
                            stop_reason,
                            stop_sequence,
                        },
                        usage: OutUsage::from(usage),
                    },
                    out,
                );
                write_event(&OutEvent::MessageStop, out);
                self.finished = true;
            }
        }
    }

    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(error.anthropic_body_json().as_bytes());
        out.extend_from_slice(b"\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use crate::conversation::Translate;
    use crate::sse::StreamTranslator as _;
    use serde_json::{Value, json};

    fn parse(body: &Value) -> Result<Request, ApiError> {
        let bytes = serde_json::to_vec(body).unwrap();
        let parsed = body::parse(
            &bytes,
            true,
            crate::limits::Limits::default().max_top_level_keys,
        )?;
        parse_request(&parsed)
    }

    fn written(request: &Request, target: &AnthropicTarget<'_>) -> Value {
        serde_json::from_slice(&write_request(request, target).unwrap()).unwrap()
    }

    const CLAUDE: AnthropicTarget<'static> = AnthropicTarget {
        model: Some("claude-sonnet-4-5-20250929"),
        anthropic_version_in_body: None,
    };

    /// What Claude Code sends (agent-clients.md), trimmed to one tool of each kind.
    fn claude_code_request() -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                    {"type": "text", "text": "say hi", "cache_control": {"type": "ephemeral"}}
                ]}
            ],
            "system": [
                {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Tools guidance", "cache_control": {"type": "ephemeral"}}
            ],
            "tools": [
                {"name": "Bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
                {"name": "WebFetch", "description": "Fetch", "input_schema": {"type": "object"}, "defer_loading": true},
                {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
            ],
            "metadata": {"user_id": "{\"device_id\":\"d\",\"session_id\":\"s\"}"},
            "max_tokens": 32000,
            "thinking": {"type": "enabled", "budget_tokens": 31999, "display": "omitted"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "stream": true
        })
    }

    #[test]
    fn a_claude_code_request_keeps_what_matters_and_drops_hints() {
        let request = parse(&claude_code_request()).unwrap();
        assert_eq!(request.model, "claude-sonnet-4-5");
        assert!(request.stream);
        assert_eq!(request.max_tokens, Some(32000));
        assert_eq!(
            request.reasoning,
            Some(Reasoning {
                budget_tokens: Some(31999),
                effort: None
            })
        );
        assert_eq!(request.system.len(), 2);
        assert_eq!(
            request.system[0].cache_control.as_ref().unwrap().get(),
            r#"{"type":"ephemeral"}"#
        );
        // The hosted web_search tool is removed; the deferred tool stays, without its extra.
        let names: Vec<&str> = request.tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["Bash", "WebFetch"]);
        assert_eq!(request.messages.len(), 1);
        let Part::Text(last) = &request.messages[0].content[1] else {
            panic!("text part");
        };
        assert_eq!(last.text, "say hi");
        assert!(last.cache_control.is_some());
        assert_eq!(request.tool_choice, None);
        assert_eq!(request.parallel_tool_calls, None);
    }

    #[test]
    fn a_claude_code_request_round_trips_without_its_hints() {
        let request = parse(&claude_code_request()).unwrap();
        let out = written(&request, &CLAUDE);
        let mut expected = claude_code_request();
        let object = expected.as_object_mut().unwrap();
        object.remove("metadata");
        object.remove("context_management");
        object.insert("model".into(), json!("claude-sonnet-4-5-20250929"));
        object.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": 31999}),
        );
        object["tools"].as_array_mut().unwrap().pop();
        object["tools"][1]
            .as_object_mut()
            .unwrap()
            .remove("defer_loading");
        assert_eq!(out, expected);
    }

    #[test]
    fn bedrock_and_vertex_bodies_carry_the_version_and_no_model() {
        let request = parse(&claude_code_request()).unwrap();
        let out = written(
            &request,
            &AnthropicTarget {
                model: None,
                anthropic_version_in_body: Some("bedrock-2023-05-31"),
            },
        );
        assert!(out.get("model").is_none());
        assert!(out.get("stream").is_none());
        assert_eq!(out["anthropic_version"], "bedrock-2023-05-31");
        let out = written(
            &request,
            &AnthropicTarget {
                model: None,
                anthropic_version_in_body: Some("vertex-2023-10-16"),
            },
        );
        assert!(out.get("model").is_none());
        assert_eq!(out["stream"], true);
        assert_eq!(out["anthropic_version"], "vertex-2023-10-16");
    }

    #[test]
    fn history_blocks_become_parts() {
        let request = parse(&json!({
            "model": "m", "max_tokens": 100,
            "system": "be brief",
            "messages": [
                {"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                    {"type": "text", "text": "what is it?"}
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "enc"},
                    {"type": "text", "text": "checking", "citations": null},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a\nb", "cache_control": {"type": "ephemeral"}},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true, "content": [
                        {"type": "text", "text": "failed"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j"}}
                    ]}
                ]}
            ],
            "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 40
        }))
        .unwrap();
        assert_eq!(request.system[0].text, "be brief");
        assert_eq!(request.stop_sequences, ["END"]);
        assert_eq!(
            (request.temperature, request.top_p, request.top_k),
            (Some(0.5), Some(0.9), Some(40))
        );
        let user = &request.messages[0].content;
        assert!(
            matches!(&user[0], Part::Image(Image::Base64 { media_type, data }) if media_type == "image/png" && data == "iVBO")
        );
        assert!(matches!(&user[1], Part::Image(Image::Url(url)) if url == "https://x/y.png"));
        let assistant = &request.messages[1].content;
        assert!(
            matches!(&assistant[0], Part::Reasoning { text, signature: Some(s) } if text == "hmm" && s == "sig")
        );
        assert!(matches!(&assistant[1], Part::RedactedReasoning { data } if data == "enc"));
        assert!(matches!(&assistant[3], Part::ToolCall(call)
            if call.id == "toolu_1" && call.name == "Bash" && call.arguments == r#"{"command":"ls"}"#));
        let results = &request.messages[2].content;
        let Part::ToolResult(first) = &results[0] else {
            panic!("tool result")
        };
        assert_eq!(first.call_id, "toolu_1");
        assert!(!first.is_error);
        assert!(matches!(&first.content[..], [Part::Text(t)] if t.text == "a\nb"));
        let Part::ToolResult(second) = &results[1] else {
            panic!("tool result")
        };
        assert!(second.is_error);
        assert!(matches!(&second.content[1], Part::Image(_)));

        // And back: the same blocks (minus the dropped `citations` and tool-result caching).
        let out = written(&request, &CLAUDE);
        assert_eq!(out["system"], json!([{"type": "text", "text": "be brief"}]));
        assert_eq!(
            out["messages"][2]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a\nb"}]})
        );
        assert_eq!(out["messages"][2]["content"][1]["is_error"], true);
        assert_eq!(
            out["messages"][1]["content"][3],
            json!({"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}})
        );
        assert_eq!(out["temperature"], 0.5);
        assert_eq!(out["top_k"], 40);
        assert_eq!(out["stop_sequences"], json!(["END"]));
    }

    fn refused(body: Value) -> ApiError {
        parse(&body).unwrap_err()
    }

    fn with(mut base: Value, key: &str, value: Value) -> Value {
        base[key] = value;
        base
    }

    fn minimal() -> Value {
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn fields_that_cannot_cross_are_refused_by_name() {
        let user = |content: Value| {
            with(
                minimal(),
                "messages",
                json!([{"role": "user", "content": content}]),
            )
        };
        let cases = [
            (
                with(minimal(), "container", json!("container_1")),
                "container",
                "container",
            ),
            (
                with(
                    minimal(),
                    "mcp_servers",
                    json!([{"type": "url", "url": "https://m", "name": "m"}]),
                ),
                "mcp_servers",
                "MCP",
            ),
            (
                user(
                    json!([{"type": "text", "text": "read"}, {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]),
                ),
                "messages[0].content[1]",
                "`document`",
            ),
            (
                with(
                    minimal(),
                    "messages",
                    json!([
                        {"role": "user", "content": "search"},
                        {"role": "assistant", "content": [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}}]},
                    ]),
                ),
                "messages[1].content[0]",
                "`server_tool_use`",
            ),
            (
                with(
                    minimal(),
                    "messages",
                    json!([
                        {"role": "user", "content": "search"},
                        {"role": "assistant", "content": [{"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}]},
                    ]),
                ),
                "messages[1].content[0]",
                "`web_search_tool_result`",
            ),
            (
                user(json!([{"type": "image", "source": {"type": "file", "file_id": "file_1"}}])),
                "messages[0].content[0].source",
                "`file` source",
            ),
            (
                user(
                    json!([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "search_result", "source": "s", "title": "t", "content": []}]}]),
                ),
                "messages[0].content[0].content[0]",
                "`search_result`",
            ),
            (
                with(
                    with(
                        minimal(),
                        "tools",
                        json!([{"type": "web_search_20250305", "name": "web_search"}, {"name": "f", "input_schema": {"type": "object"}}]),
                    ),
                    "tool_choice",
                    json!({"type": "tool", "name": "web_search"}),
                ),
                "tool_choice",
                "hosted tool `web_search`",
            ),
            (
                with(
                    with(
                        minimal(),
                        "tools",
                        json!([{"type": "bash_20250124", "name": "bash"}]),
                    ),
                    "tool_choice",
                    json!({"type": "any"}),
                ),
                "tool_choice",
                "only hosted tools",
            ),
            (
                with(
                    minimal(),
                    "system",
                    json!([{"type": "image", "source": {}}]),
                ),
                "system[0]",
                "`image`",
            ),
        ];
        for (body, param, needle) in cases {
            let err = refused(body);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{param}");
            assert_eq!(err.param.as_deref(), Some(param), "{}", err.message);
            assert_eq!(
                err.code.as_deref(),
                Some("unsupported_parameter"),
                "{param}"
            );
            assert!(err.message.contains(needle), "{param}: {}", err.message);
        }
    }

    #[test]
    fn invalid_requests_are_refused_by_name() {
        let mut no_max = minimal();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        let err = refused(no_max);
        assert_eq!(err.message, "max_tokens: field required");
        assert_eq!(err.param.as_deref(), Some("max_tokens"));

        for (body, param) in [
            (
                with(minimal(), "thinking", json!({"type": "sometimes"})),
                "thinking.type",
            ),
            (
                with(minimal(), "thinking", json!({"type": "enabled"})),
                "thinking.budget_tokens",
            ),
            (
                with(
                    minimal(),
                    "messages",
                    json!([{"role": "system", "content": "x"}]),
                ),
                "messages[0].role",
            ),
            (
                with(minimal(), "messages", json!([{"role": "user"}])),
                "messages[0].content",
            ),
            (
                with(
                    minimal(),
                    "messages",
                    json!([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
                ),
                "messages[0].content[0]",
            ),
            (
                with(
                    minimal(),
                    "messages",
                    json!([{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]),
                ),
                "messages[0].content[0]",
            ),
            (
                with(
                    minimal(),
                    "messages",
                    json!([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}]),
                ),
                "messages[0].content[0].input",
            ),
            (
                with(minimal(), "tools", json!([{"name": "f"}])),
                "tools[0].input_schema",
            ),
            (
                with(
                    with(
                        minimal(),
                        "tools",
                        json!([{"name": "f", "input_schema": {"type": "object"}}]),
                    ),
                    "tool_choice",
                    json!({"type": "tool", "name": "g"}),
                ),
                "tool_choice.name",
            ),
            (
                with(minimal(), "tool_choice", json!({"type": "sometimes"})),
                "tool_choice.type",
            ),
            (with(minimal(), "max_tokens", json!("many")), "max_tokens"),
            (
                with(
                    minimal(),
                    "messages",
                    json!([{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}]}]),
                ),
                "messages[0].content[0].source.media_type",
            ),
        ] {
            let err = refused(body);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{param}");
            assert_eq!(err.param.as_deref(), Some(param), "{}", err.message);
        }
    }

    #[test]
    fn tool_choice_and_parallel_calls() {
        let tools = json!([
            {"name": "f", "input_schema": {"type": "object"}},
            {"type": "custom", "name": "g", "input_schema": {"type": "object"}, "strict": true}
        ]);
        for (choice, expected, parallel) in [
            (json!({"type": "auto"}), ToolChoice::Auto, None),
            (json!({"type": "none"}), ToolChoice::None, None),
            (
                json!({"type": "any", "disable_parallel_tool_use": true}),
                ToolChoice::Any,
                Some(false),
            ),
            (
                json!({"type": "tool", "name": "g", "disable_parallel_tool_use": false}),
                ToolChoice::Tool("g".into()),
                None,
            ),
        ] {
            let request = parse(&with(
                with(minimal(), "tools", tools.clone()),
                "tool_choice",
                choice.clone(),
            ))
            .unwrap();
            assert_eq!(request.tools.len(), 2);
            assert_eq!(request.tool_choice, Some(expected), "{choice}");
            assert_eq!(request.parallel_tool_calls, parallel, "{choice}");
        }
        // Only hosted tools offered: `auto` has nothing left to choose from.
        let request = parse(&with(
            with(
                minimal(),
                "tools",
                json!([{"type": "web_search_20250305", "name": "web_search"}]),
            ),
            "tool_choice",
            json!({"type": "auto"}),
        ))
        .unwrap();
        assert!(request.tools.is_empty());
        assert_eq!(request.tool_choice, None);
    }

    #[test]
    fn thinking_kinds_and_output_config() {
        let adaptive = parse(&with(minimal(), "thinking", json!({"type": "adaptive"}))).unwrap();
        assert_eq!(
            adaptive.reasoning,
            Some(Reasoning {
                budget_tokens: None,
                effort: None
            })
        );
        let disabled = parse(&with(minimal(), "thinking", json!({"type": "disabled"}))).unwrap();
        assert_eq!(disabled.reasoning, None);
        let effort = parse(&with(
            with(minimal(), "thinking", json!({"type": "adaptive"})),
            "output_config",
            json!({"effort": "high"}),
        ))
        .unwrap();
        assert_eq!(
            effort.reasoning,
            Some(Reasoning {
                budget_tokens: None,
                effort: Some("high".into())
            })
        );
        let schema = parse(&with(
            minimal(),
            "output_config",
            json!({"format": {"type": "json_schema", "schema": {"type": "object"}}}),
        ))
        .unwrap();
        let schema = schema.json_schema.unwrap();
        assert_eq!(schema.schema.get(), r#"{"type":"object"}"#);
        assert_eq!(schema.strict, Some(true));
        // Hints: dropped without a word.
        let hinted = parse(&with(
            with(minimal(), "service_tier", json!("auto")),
            "inference_geo",
            json!("us"),
        ));
        assert!(hinted.is_ok());
    }

    fn text(text: &str) -> Part {
        Part::Text(TextBlock {
            text: text.into(),
            cache_control: None,
        })
    }

    /// What an OpenAI chat client's conversation looks like in the model.
    fn openai_like() -> Request {
        Request {
            model: "claude".into(),
            system: vec![TextBlock {
                text: "be brief".into(),
                cache_control: None,
            }],
            messages: vec![
                Message {
                    role: Role::User,
                    content: vec![
                        text("weather?"),
                        Part::Image(Image::Url("https://x/y.png".into())),
                    ],
                },
                Message {
                    role: Role::Assistant,
                    content: vec![
                        Part::Reasoning {
                            text: "unsigned, from another model".into(),
                            signature: None,
                        },
                        text(""),
                        Part::ToolCall(ToolCall {
                            id: "call_1".into(),
                            name: "get_weather".into(),
                            arguments: r#"{"city":"Paris"}"#.into(),
                        }),
                        Part::ToolCall(ToolCall {
                            id: "call_2".into(),
                            name: "get_time".into(),
                            arguments: String::new(),
                        }),
                    ],
                },
                Message {
                    role: Role::User,
                    content: vec![Part::ToolResult(ToolResult {
                        call_id: "call_1".into(),
                        content: vec![text("21C")],
                        is_error: false,
                    })],
                },
                Message {
                    role: Role::User,
                    content: vec![Part::ToolResult(ToolResult {
                        call_id: "call_2".into(),
                        content: vec![text("")],
                        is_error: false,
                    })],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        text("and tomorrow?"),
                        Part::Image(Image::Base64 {
                            media_type: "image/png".into(),
                            data: "iVBO".into(),
                        }),
                    ],
                },
            ],
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("Weather".into()),
                parameters: RawValue::from_string(r#"{"type":"object"}"#.into()).unwrap(),
                cache_control: None,
            }],
            parallel_tool_calls: Some(false),
            stream: true,
            ..Request::default()
        }
    }

    #[test]
    fn an_openai_conversation_becomes_alternating_turns() {
        let out = written(&openai_like(), &CLAUDE);
        assert_eq!(
            out,
            json!({
                "model": "claude-sonnet-4-5-20250929",
                "max_tokens": 4096,
                "system": [{"type": "text", "text": "be brief"}],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "weather?"},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
                    ]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "21C"}]},
                        {"type": "tool_result", "tool_use_id": "call_2"},
                        {"type": "text", "text": "and tomorrow?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
                    ]}
                ],
                "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
                "stream": true
            })
        );
    }

    #[test]
    fn tool_results_come_first_in_their_turn() {
        let mut request = openai_like();
        // A user text, then a tool result, in one turn.
        request.messages.swap(2, 4);
        request.messages.truncate(3);
        request.messages.push(Message {
            role: Role::User,
            content: vec![Part::ToolResult(ToolResult {
                call_id: "call_1".into(),
                content: vec![text("21C")],
                is_error: true,
            })],
        });
        let out = written(&request, &CLAUDE);
        let kinds: Vec<&str> = out["messages"][2]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["tool_result", "text", "image"]);
        assert_eq!(out["messages"][2]["content"][0]["is_error"], true);
    }

    #[test]
    fn reasoning_effort_becomes_a_budget_below_max_tokens() {
        for (effort, max_tokens, budget, written_max) in [
            ("high", None, Some(16384), 16384 + 4096),
            ("low", Some(2000), Some(1024), 2000),
            ("medium", Some(1000), Some(4096), 4096 + 4096),
            ("minimal", None, Some(1024), 4096),
            ("none", Some(100), None, 100),
        ] {
            let request = Request {
                reasoning: Some(Reasoning {
                    budget_tokens: None,
                    effort: Some(effort.into()),
                }),
                max_tokens,
                ..openai_like()
            };
            let out = written(&request, &CLAUDE);
            assert_eq!(out["max_tokens"], written_max, "{effort}");
            match budget {
                Some(budget) => assert_eq!(
                    out["thinking"],
                    json!({"type": "enabled", "budget_tokens": budget}),
                    "{effort}"
                ),
                None => assert!(out.get("thinking").is_none(), "{effort}"),
            }
        }
        let adaptive = Request {
            reasoning: Some(Reasoning {
                budget_tokens: None,
                effort: None,
            }),
            ..openai_like()
        };
        assert_eq!(
            written(&adaptive, &CLAUDE)["thinking"],
            json!({"type": "adaptive"})
        );
        let unknown = Request {
            reasoning: Some(Reasoning {
                budget_tokens: None,
                effort: Some("extreme".into()),
            }),
            ..openai_like()
        };
        let err = write_request(&unknown, &CLAUDE).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("reasoning_effort"));
    }

    #[test]
    fn a_json_schema_is_refused_and_signed_reasoning_kept() {
        let request = Request {
            json_schema: Some(JsonSchema {
                name: "x".into(),
                schema: RawValue::from_string("{}".into()).unwrap(),
                strict: None,
            }),
            ..openai_like()
        };
        let err = write_request(&request, &CLAUDE).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("response_format"));
        assert_eq!(err.code.as_deref(), Some("unsupported_parameter"));

        let mut request = openai_like();
        request.messages[1].content[0] = Part::Reasoning {
            text: "signed".into(),
            signature: Some("sig".into()),
        };
        request.messages[1]
            .content
            .push(Part::RedactedReasoning { data: "enc".into() });
        let out = written(&request, &CLAUDE);
        assert_eq!(
            out["messages"][1]["content"][0],
            json!({"type": "thinking", "thinking": "signed", "signature": "sig"})
        );
        assert_eq!(
            out["messages"][1]["content"][3],
            json!({"type": "redacted_thinking", "data": "enc"})
        );

        let mut bad = openai_like();
        bad.messages[1].content[2] = Part::ToolCall(ToolCall {
            id: "c".into(),
            name: "f".into(),
            arguments: "[1]".into(),
        });
        assert_eq!(
            write_request(&bad, &CLAUDE).unwrap_err().param.as_deref(),
            Some("messages[1].content[2]")
        );
        let empty = Request {
            messages: vec![Message {
                role: Role::User,
                content: vec![text("")],
            }],
            ..Request::default()
        };
        assert_eq!(
            write_request(&empty, &CLAUDE).unwrap_err().param.as_deref(),
            Some("messages")
        );
    }

    fn claude_reply() -> Value {
        json!({
            "id": "msg_01ABC",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [
                {"type": "thinking", "thinking": "Let me check.", "signature": "EqQB"},
                {"type": "redacted_thinking", "data": "EmwK"},
                {"type": "text", "text": "Checking the weather."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}
            ],
            "stop_reason": "tool_use",
            "stop_sequence": null,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000, "output_tokens": 40}
        })
    }

    #[test]
    fn replies_round_trip() {
        let body = serde_json::to_vec(&claude_reply()).unwrap();
        let reply = parse_reply(&body).unwrap();
        assert_eq!(reply.id, "msg_01ABC");
        assert_eq!(reply.stop, StopReason::ToolUse);
        assert_eq!(
            reply.usage,
            TokenUsage {
                input: 12,
                output: 40,
                cache_read: 2000,
                cache_write: 100,
                reasoning: 0
            }
        );
        assert_eq!(reply.usage.to_usage().prompt_tokens, 2112);
        assert!(
            matches!(&reply.content[3], Part::ToolCall(c) if c.arguments == r#"{"city":"Paris"}"#)
        );
        let back: Value = serde_json::from_slice(&write_reply(&reply)).unwrap();
        assert_eq!(back, claude_reply());
    }

    #[test]
    fn written_replies_name_stop_reasons_and_prefix_ids() {
        for (stop, reason, sequence) in [
            (StopReason::EndTurn, "end_turn", Value::Null),
            (StopReason::MaxTokens, "max_tokens", Value::Null),
            (
                StopReason::StopSequence(Some("END".into())),
                "stop_sequence",
                json!("END"),
            ),
            (StopReason::StopSequence(None), "stop_sequence", Value::Null),
            (StopReason::ToolUse, "tool_use", Value::Null),
            (StopReason::ContentFilter, "refusal", Value::Null),
            (
                StopReason::Other("pause_turn".into()),
                "pause_turn",
                Value::Null,
            ),
        ] {
            let reply = Reply {
                id: "chatcmpl-9".into(),
                model: "alias".into(),
                content: vec![
                    text("hi"),
                    Part::Reasoning {
                        text: "unsigned".into(),
                        signature: None,
                    },
                    Part::ToolCall(ToolCall {
                        id: "call_1".into(),
                        name: "f".into(),
                        arguments: r#"{"a":"#.into(),
                    }),
                ],
                stop: stop.clone(),
                usage: TokenUsage::default(),
            };
            let out: Value = serde_json::from_slice(&write_reply(&reply)).unwrap();
            assert_eq!(out["id"], "msg_chatcmpl-9");
            assert_eq!(out["stop_reason"], reason, "{stop:?}");
            assert_eq!(out["stop_sequence"], sequence, "{stop:?}");
            assert_eq!(out["model"], "alias");
            assert_eq!(
                out["content"][1],
                json!({"type": "thinking", "thinking": "unsigned", "signature": ""})
            );
            // Arguments cut mid-JSON cannot be an object.
            assert_eq!(out["content"][2]["input"], json!({}));
            assert_eq!(
                out["usage"],
                json!({"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0})
            );
            // And the stop reason reads back.
            let again = parse_reply(&write_reply(&reply)).unwrap();
            assert_eq!(again.stop, stop);
        }
    }

    #[test]
    fn answers_that_are_not_messages_are_bad_gateway() {
        for body in [
            &b"not json"[..],
            br#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
            br#"{"id":"m","type":"completion","content":[]}"#,
            br#"{"id":"m","type":"message","content":[{"type":"tool_use","name":"f"}]}"#,
        ] {
            let err = parse_reply(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_GATEWAY);
            assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
        }
        // Hosted tool blocks are skipped, a missing stop reason is the end of the turn.
        let reply = parse_reply(
            br#"{"id":"m","type":"message","content":[{"type":"server_tool_use","id":"s","name":"web_search","input":{}},{"type":"text","text":"ok"}],"stop_reason":null,"usage":{"input_tokens":1,"output_tokens":2,"cache_read_input_tokens":null}}"#,
        )
        .unwrap();
        assert_eq!(reply.content.len(), 1);
        assert_eq!(reply.stop, StopReason::EndTurn);
    }

    /// A stream as Anthropic sends it: thinking with a signature, text, a tool call whose
    /// arguments come in several deltas, cache usage.
    fn claude_stream() -> Vec<(&'static str, Value)> {
        vec![
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_01XYZ", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 4000, "output_tokens": 1}}}),
            ),
            ("ping", json!({"type": "ping"})),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "The user wants "}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "the weather."}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCkYIBRgCKkB"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Let me check "}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "— ünïcode ok."}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"ci"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "ty\": \"Pa"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 2}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"input_tokens": 25, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 4000, "output_tokens": 89}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ]
    }

    fn sse(events: &[(&str, Value)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in events {
            out.extend_from_slice(format!("event: {name}\ndata: {data}\n\n").as_bytes());
        }
        out
    }

    /// The client's SSE bytes as (event name, data).
    fn client_events(bytes: &[u8]) -> Vec<(String, Value)> {
        std::str::from_utf8(bytes)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap();
                let data = data.strip_prefix("data: ").unwrap();
                (name.to_owned(), serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    fn translate() -> Translate<AnthropicEventReader, AnthropicEventWriter> {
        Translate::new(
            AnthropicEventReader::new("anthropic", crate::sse::MAX_EVENT_BYTES),
            AnthropicEventWriter::new("claude-sonnet-4-5"),
        )
    }

    #[test]
    fn a_stream_fed_in_odd_pieces_comes_out_equivalent() {
        let input = sse(&claude_stream());
        let expected: Vec<(String, Value)> = claude_stream()
            .into_iter()
            .map(|(n, d)| (n.to_owned(), d))
            .collect();
        for piece in [1, 3, 7, input.len()] {
            let mut translator = translate();
            let mut out = BytesMut::new();
            for chunk in input.chunks(piece) {
                translator.push(chunk, &mut out).unwrap();
            }
            assert!(translator.complete(), "{piece}");
            translator.finish(&mut out).unwrap();
            assert_eq!(client_events(&out), expected, "pieces of {piece}");
            let usage = translator.usage().unwrap();
            assert_eq!(
                (
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.cache_read_tokens,
                    usage.cache_write_tokens
                ),
                (4325, 89, 4000, 300)
            );
        }
    }

    #[test]
    fn the_reader_yields_model_events() {
        let mut reader = AnthropicEventReader::new("anthropic", crate::sse::MAX_EVENT_BYTES);
        let mut events = Vec::new();
        reader.push(&sse(&claude_stream()), &mut events).unwrap();
        reader.finish(&mut events).unwrap();
        let usage = TokenUsage {
            input: 25,
            output: 89,
            cache_read: 4000,
            cache_write: 300,
            reasoning: 0,
        };
        assert_eq!(
            events,
            [
                StreamEvent::Start {
                    id: "msg_01XYZ".into(),
                    model: "claude-sonnet-4-5".into(),
                    usage: TokenUsage { output: 1, ..usage }
                },
                StreamEvent::BlockStart(BlockKind::Reasoning),
                StreamEvent::ReasoningDelta("The user wants ".into()),
                StreamEvent::ReasoningDelta("the weather.".into()),
                StreamEvent::SignatureDelta("EqQBCkYIBRgCKkB".into()),
                StreamEvent::BlockStop,
                StreamEvent::BlockStart(BlockKind::Text),
                StreamEvent::TextDelta("Let me check ".into()),
                StreamEvent::TextDelta("— ünïcode ok.".into()),
                StreamEvent::BlockStop,
                StreamEvent::BlockStart(BlockKind::ToolCall {
                    id: "toolu_01A".into(),
                    name: "get_weather".into()
                }),
                StreamEvent::ArgumentsDelta("{\"ci".into()),
                StreamEvent::ArgumentsDelta("ty\": \"Pa".into()),
                StreamEvent::ArgumentsDelta("ris\"}".into()),
                StreamEvent::BlockStop,
                StreamEvent::Finish {
                    stop: StopReason::ToolUse,
                    usage
                },
            ]
        );
    }

    #[test]
    fn bedrock_event_json_and_odd_blocks() {
        let mut reader = AnthropicEventReader::new("bedrock", 1 << 20);
        let mut events = Vec::new();
        for json in [
            json!({"type": "message_start", "message": {"id": "msg_b", "model": "m", "usage": {"input_tokens": 7, "output_tokens": 0}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "Hi"}}),
            // No content_block_stop: the next start closes it.
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"q\":1}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            json!({"type": "content_block_stop", "index": 2}),
            json!({"type": "content_block_start", "index": 3, "content_block": {"type": "redacted_thinking", "data": "enc"}}),
            json!({"type": "content_block_stop", "index": 3}),
            json!({"type": "some_future_event", "x": 1}),
            // Zero input counts do not clobber the ones from message_start.
            json!({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"}, "usage": {"input_tokens": 0, "output_tokens": 5}}),
            json!({"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 7}}),
        ] {
            reader
                .push_event_json(&serde_json::to_vec(&json).unwrap(), &mut events)
                .unwrap();
        }
        assert!(reader.complete());
        reader.finish(&mut events).unwrap();
        assert_eq!(
            events[1..],
            [
                StreamEvent::BlockStart(BlockKind::Text),
                StreamEvent::TextDelta("Hi".into()),
                StreamEvent::BlockStop,
                StreamEvent::BlockStart(BlockKind::ToolCall {
                    id: "t".into(),
                    name: "f".into()
                }),
                StreamEvent::ArgumentsDelta(r#"{"a":1}"#.into()),
                StreamEvent::BlockStop,
                StreamEvent::BlockStart(BlockKind::RedactedReasoning { data: "enc".into() }),
                StreamEvent::BlockStop,
                StreamEvent::Finish {
                    stop: StopReason::StopSequence(Some("END".into())),
                    usage: TokenUsage {
                        input: 7,
                        output: 5,
                        ..TokenUsage::default()
                    }
                },
            ]
        );
    }

    #[test]
    fn an_error_event_mid_stream_ends_it_with_the_clients_error_event() {
        let mut input = sse(&claude_stream()[..9]);
        input.extend_from_slice(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        );
        let mut translator = translate();
        let mut out = BytesMut::new();
        let err = translator.push(&input, &mut out).unwrap_err();
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(err.message.contains("Overloaded"), "{}", err.message);
        assert!(!translator.complete());
        translator.write_error(&err, &mut out);
        let events = client_events(&out);
        assert_eq!(events[events.len() - 2].1["delta"]["text"], "Let me check ");
        assert_eq!(
            events.last().unwrap(),
            &(
                "error".to_owned(),
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "upstream anthropic failed mid-stream: Overloaded"}})
            )
        );
        for (kind, status) in [
            ("rate_limit_error", StatusCode::TOO_MANY_REQUESTS),
            ("api_error", StatusCode::BAD_GATEWAY),
        ] {
            let mut reader = AnthropicEventReader::new("anthropic", 1024);
            let json = format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"m"}}}}"#);
            let err = reader
                .push_event_json(json.as_bytes(), &mut Vec::new())
                .unwrap_err();
            assert_eq!(err.status, status, "{kind}");
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error_naming_message_stop() {
        let input = sse(&claude_stream()[..16]);
        let mut translator = translate();
        let mut out = BytesMut::new();
        translator.push(&input, &mut out).unwrap();
        let err = translator.finish(&mut out).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        assert!(err.message.contains("message_stop"), "{}", err.message);
        assert!(!translator.complete());
        // An unterminated last event still counts.
        let mut input = sse(&claude_stream());
        input.truncate(input.len() - 2);
        let mut reader = AnthropicEventReader::new("anthropic", crate::sse::MAX_EVENT_BYTES);
        let mut events = Vec::new();
        reader.push(&input, &mut events).unwrap();
        assert!(!reader.complete());
        reader.finish(&mut events).unwrap();
        assert!(matches!(events.last(), Some(StreamEvent::Finish { .. })));
    }

    #[test]
    fn oversized_and_malformed_events_are_refused() {
        let mut reader = AnthropicEventReader::new("anthropic", 64);
        let err = reader.push(&[b'x'; 100], &mut Vec::new()).unwrap_err();
        assert!(
            err.message.contains("--max-stream-event-bytes"),
            "{}",
            err.message
        );
        let mut reader = AnthropicEventReader::new("anthropic", 64);
        let err = reader
            .push_event_json(&[b' '; 65], &mut Vec::new())
            .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        let mut reader = AnthropicEventReader::new("anthropic", 64);
        let err = reader
            .push(b"event: x\ndata: {nope\n\n", &mut Vec::new())
            .unwrap_err();
        assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
        // Comments and pings carry nothing.
        let mut reader = AnthropicEventReader::new("anthropic", 64);
        let mut events = Vec::new();
        reader
            .push(
                b": keep-alive\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\n",
                &mut events,
            )
            .unwrap();
        assert!(events.is_empty());
    }

    fn written_events(events: &[StreamEvent]) -> Vec<(String, Value)> {
        let mut writer = AnthropicEventWriter::new("alias");
        let mut out = BytesMut::new();
        for event in events {
            writer.write(event, &mut out);
        }
        client_events(&out)
    }

    #[test]
    fn the_writer_repairs_sloppy_sequences() {
        let events = written_events(&[
            StreamEvent::TextDelta("a".into()),
            StreamEvent::BlockStart(BlockKind::ToolCall {
                id: "call_1".into(),
                name: "f".into(),
            }),
            StreamEvent::ArgumentsDelta("{}".into()),
            StreamEvent::BlockStart(BlockKind::ToolCall {
                id: "call_2".into(),
                name: "g".into(),
            }),
            StreamEvent::SignatureDelta("sig".into()),
            StreamEvent::TextDelta(String::new()),
            StreamEvent::BlockStop,
            StreamEvent::BlockStop,
            StreamEvent::Finish {
                stop: StopReason::MaxTokens,
                usage: TokenUsage {
                    input: 3,
                    output: 4,
                    ..TokenUsage::default()
                },
            },
            StreamEvent::TextDelta("after the end".into()),
        ]);
        let summary: Vec<String> = events
            .iter()
            .map(|(name, data)| match name.as_str() {
                "content_block_start" => {
                    format!("start {} {}", data["index"], data["content_block"]["type"])
                }
                "content_block_delta" => {
                    format!("delta {} {}", data["index"], data["delta"]["type"])
                }
                "content_block_stop" => format!("stop {}", data["index"]),
                other => other.to_owned(),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "message_start",
                "ping",
                "start 0 \"text\"",
                "delta 0 \"text_delta\"",
                "stop 0",
                "start 1 \"tool_use\"",
                "delta 1 \"input_json_delta\"",
                "stop 1",
                "start 2 \"tool_use\"",
                "stop 2",
                "start 3 \"thinking\"",
                "delta 3 \"signature_delta\"",
                "stop 3",
                "message_delta",
                "message_stop",
            ]
        );
        assert!(
            events[0].1["message"]["id"]
                .as_str()
                .unwrap()
                .starts_with("msg_")
        );
        assert_eq!(events[0].1["message"]["model"], "alias");
        assert_eq!(
            events[13].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": null}, "usage": {"input_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 4}})
        );
    }

    #[test]
    fn the_writer_opens_blocks_as_anthropic_does() {
        let events = written_events(&[
            StreamEvent::Start {
                id: "chatcmpl-1".into(),
                model: "gpt-x".into(),
                usage: TokenUsage {
                    input: 9,
                    ..TokenUsage::default()
                },
            },
            StreamEvent::Start {
                id: "again".into(),
                model: "gpt-x".into(),
                usage: TokenUsage::default(),
            },
            StreamEvent::BlockStart(BlockKind::Reasoning),
            StreamEvent::BlockStart(BlockKind::RedactedReasoning { data: "enc".into() }),
            StreamEvent::BlockStart(BlockKind::ToolCall {
                id: "call_1".into(),
                name: "f".into(),
            }),
            StreamEvent::Finish {
                stop: StopReason::ToolUse,
                usage: TokenUsage::default(),
            },
        ]);
        assert_eq!(
            events[0].1,
            json!({"type": "message_start", "message": {"id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "alias", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}}})
        );
        assert_eq!(events[1], ("ping".to_owned(), json!({"type": "ping"})));
        assert_eq!(
            events[2].1["content_block"],
            json!({"type": "thinking", "thinking": "", "signature": ""})
        );
        assert_eq!(
            events[4].1["content_block"],
            json!({"type": "redacted_thinking", "data": "enc"})
        );
        assert_eq!(
            events[6].1,
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "call_1", "name": "f", "input": {}}})
        );
        assert_eq!(
            events[7].1,
            json!({"type": "content_block_stop", "index": 2})
        );
        assert_eq!(events.len(), 10);
    }

    #[test]
    fn write_error_is_anthropics_error_event() {
        let mut writer = AnthropicEventWriter::new("alias");
        let mut out = BytesMut::new();
        writer.write_error(
            &ApiError::upstream_timeout("openai", std::time::Duration::from_secs(3)),
            &mut out,
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"timeout_error\",\"message\":\"upstream openai did not answer within 3.0s\"}}\n\n"
        );
    }
}
