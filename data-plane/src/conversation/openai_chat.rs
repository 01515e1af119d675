//! OpenAI Chat Completions ↔ the conversation model (DESIGN §17; wire formats §1.6–§1.8).
//!
//! Requests ([`parse_request`], for a target that does not speak OpenAI chat):
//! - `system` and `developer` messages become system blocks, in order, wherever they stand: a
//!   system message in the middle of the conversation also joins the system prompt (targets such
//!   as Anthropic have no system turn);
//! - user messages keep their text and image parts (a data URL becomes an inline image, any other
//!   URL a linked one); text parts keep a `cache_control` the client set on them (the LiteLLM
//!   convention for prompt caching through OpenAI clients), as do function tools;
//! - `tool` messages become tool results in a user turn; consecutive tool messages share one turn,
//!   other same-role turns stay apart (the target's writer merges them);
//! - assistant text (and refusal parts) become one text part, `tool_calls` tool calls.
//!
//! Mapped: `model`, `messages`, `stream`, `stream_options` (the caller reads `include_usage` from
//! the parsed request), `temperature`, `top_p`, `max_completion_tokens` (else `max_tokens`),
//! `stop`, `tools`, `tool_choice`, `parallel_tool_calls`, `reasoning_effort`, `response_format`
//! (`json_schema`; `text` is the default and ignored), `n` (1 only), `logprobs` (false only).
//!
//! Refused with a 400 naming the field, because dropping it would change the answer asked for:
//! `n` > 1, `logprobs: true`, `top_logprobs`, a non-empty `logit_bias`, `audio`, `modalities` other
//! than text, `functions`/`function_call`, `prediction`, `web_search_options`,
//! `response_format: json_object` (no target without OpenAI chat enforces bare JSON mode), and
//! audio and file content parts.
//!
//! Dropped: hints and metadata (`user`, `metadata`, `store`, `service_tier`, `prompt_cache_key`,
//! `safety_identifier`, message `name`s, a tool's `strict`, an image's `detail`); sampling knobs
//! with no equivalent that change how tokens are drawn, not what the answer means (`seed`,
//! `presence_penalty`, `frequency_penalty`, as LiteLLM's `drop_params` does); and any other
//! top-level field the gateway does not know (new OpenAI options appear often, and coding agents
//! send them on every request).
//!
//! Requests ([`write_request`], to an OpenAI-format upstream, and as the bridge to the Gemini and
//! Converse converters): system blocks join into one leading system message (`cache_control`
//! dropped); tool results become `tool` messages placed before the rest of their user turn (OpenAI
//! wants them right after the assistant's `tool_calls`), their text blocks joined; the images of a
//! tool result go in a user message after the tool messages (a tool message carries text only);
//! `is_error` is dropped (OpenAI has no such flag; the text says what failed); reasoning parts are
//! dropped (OpenAI chat cannot carry them back and cannot verify their signatures); `top_k` is
//! dropped.
//!
//! Text joins: blocks the client wrote as separate documents (system blocks, a tool result's text
//! blocks) join with a blank line; blocks of one model turn (assistant text split around tool
//! calls or citations) join with nothing, as they were one stream of text.
//!
//! Answers ([`parse_reply`], [`write_reply`]) and streams ([`OpenAiChunkReader`],
//! [`OpenAiChunkWriter`]): reasoning an OpenAI-compatible upstream returns as `reasoning_content`
//! is read into the model; answers written for OpenAI clients leave reasoning out (the chat format
//! has no field for it). A `refusal` is read as text.

use super::{
    BlockKind, EventReader, EventWriter, Image, JsonSchema, Message, Part, Reasoning, Reply,
    Request, Role, StopReason, StreamEvent, TextBlock, TokenUsage, Tool, ToolCall, ToolChoice,
    ToolResult,
};
use crate::body::ParsedRequest;
use crate::errors::ApiError;
use crate::providers::openai_request::{
    self as openai, ContentPart, get, parse_as, split_data_url, unsupported,
};
use crate::sse::{self, ChunkWriter, EventSplitter};
use crate::usage::OpenAiUsage;
use axum::http::StatusCode;
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// Requests: OpenAI chat → model

fn invalid(field: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_request(format!("`{field}`: {what}")).with_param(field)
}

fn unsupported_hint(field: &str) -> &'static str {
    match field {
        "functions" | "function_call" => "use `tools` and `tool_choice`",
        "n" => "ask for one choice and send the request again for more",
        "logprobs" | "top_logprobs" => "token log probabilities are not available for this model",
        "modalities" | "audio" => "only text answers are available through this gateway",
        "response_format" => "use `json_schema` with a schema",
        _ => "",
    }
}

/// True when a raw top-level value carries something (not absent, `null`, `false`, `0`, `{}` or
/// `[]`): the refused fields are harmless when sent empty, as some clients do.
fn is_set(raw: Option<&RawValue>) -> bool {
    raw.is_some_and(|raw| {
        !matches!(
            raw.get().trim(),
            "null" | "false" | "0" | "{}" | "[]" | "\"\""
        )
    })
}

/// Refuses the fields whose loss would change the answer (module doc).
fn refuse_unsupported(request: &ParsedRequest<'_>, provider: &str) -> Result<(), ApiError> {
    let object = &request.object;
    for field in [
        "top_logprobs",
        "logit_bias",
        "audio",
        "functions",
        "function_call",
        "prediction",
        "web_search_options",
    ] {
        if is_set(object.get(field)) {
            return Err(unsupported(field, provider, unsupported_hint(field)));
        }
    }
    if get::<bool>(object, "logprobs")?.unwrap_or(false) {
        return Err(unsupported(
            "logprobs",
            provider,
            unsupported_hint("logprobs"),
        ));
    }
    match get::<u64>(object, "n")? {
        Some(0) => return Err(invalid("n", "must be at least 1")),
        Some(n) if n > 1 => return Err(unsupported("n", provider, unsupported_hint("n"))),
        _ => {}
    }
    if let Some(modalities) = get::<Vec<String>>(object, "modalities")?
        && modalities.iter().any(|m| m != "text")
    {
        return Err(unsupported(
            "modalities",
            provider,
            unsupported_hint("modalities"),
        ));
    }
    Ok(())
}

/// What a content part or tool may carry besides its OpenAI fields.
#[derive(Deserialize)]
struct Extras {
    #[serde(default)]
    cache_control: Option<Box<RawValue>>,
}

/// A function tool, its schema kept raw (byte for byte).
#[derive(Deserialize)]
struct ToolDefinition {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    function: Option<FunctionDefinition>,
    #[serde(default)]
    cache_control: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct FunctionDefinition {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Box<RawValue>>,
}

/// `response_format`, read as a plain struct: raw values do not survive serde's tagged enums.
#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<ResponseSchema>,
}

#[derive(Deserialize)]
struct ResponseSchema {
    name: String,
    #[serde(default)]
    schema: Option<Box<RawValue>>,
    #[serde(default)]
    strict: Option<bool>,
}

/// The empty object schema, for tools that declare no parameters.
fn empty_object_schema() -> Box<RawValue> {
    RawValue::from_string(r#"{"type":"object","properties":{}}"#.to_owned())
        .unwrap_or_else(|_| empty_json())
}

fn empty_json() -> Box<RawValue> {
    // `{}` is valid JSON; the fallback only satisfies the type.
    RawValue::from_string("{}".to_owned()).unwrap_or_else(|_| Box::<RawValue>::default())
}

fn tools(request: &ParsedRequest<'_>) -> Result<Vec<Tool>, ApiError> {
    let raw: Vec<Box<RawValue>> = get(&request.object, "tools")?.unwrap_or_default();
    raw.iter()
        .enumerate()
        .map(|(i, raw)| {
            let field = format!("tools[{i}]");
            let tool: ToolDefinition = parse_as(raw, &field)?;
            if tool.kind != "function" {
                return Err(invalid(
                    &format!("{field}.type"),
                    format!("only `function` tools are supported, got `{}`", tool.kind),
                ));
            }
            let function = tool
                .function
                .ok_or_else(|| invalid(&format!("{field}.function"), "is required"))?;
            Ok(Tool {
                name: function.name,
                description: function.description,
                parameters: function
                    .parameters
                    .filter(|p| p.get() != "null")
                    .unwrap_or_else(empty_object_schema),
                cache_control: tool.cache_control,
            })
        })
        .collect()
}

fn json_schema(
    request: &ParsedRequest<'_>,
    provider: &str,
) -> Result<Option<JsonSchema>, ApiError> {
    let Some(format) = get::<ResponseFormat>(&request.object, "response_format")? else {
        return Ok(None);
    };
    match format.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Err(unsupported(
            "response_format",
            provider,
            unsupported_hint("response_format"),
        )),
        "json_schema" => {
            let schema = format
                .json_schema
                .ok_or_else(|| invalid("response_format.json_schema", "is required"))?;
            Ok(Some(JsonSchema {
                name: schema.name,
                schema: schema
                    .schema
                    .filter(|s| s.get() != "null")
                    .unwrap_or_else(empty_json),
                strict: schema.strict,
            }))
        }
        other => Err(invalid(
            "response_format.type",
            format!("must be text, json_object or json_schema, got `{other}`"),
        )),
    }
}

/// The parts of a user message's `content`, with the `cache_control` of text parts.
fn user_parts(
    message: &openai::Message,
    field: &str,
    provider: &str,
) -> Result<Vec<Part>, ApiError> {
    let Some(raw) = &message.content else {
        return Ok(Vec::new());
    };
    let content_field = format!("{field}.content");
    match raw.get().trim_start().as_bytes().first() {
        Some(b'"') => {
            let text: String = parse_as(raw, &content_field)?;
            Ok(vec![Part::Text(TextBlock {
                text,
                cache_control: None,
            })])
        }
        Some(b'[') => {
            let parts: Vec<Box<RawValue>> = parse_as(raw, &content_field)?;
            let mut out = Vec::with_capacity(parts.len());
            for (j, raw_part) in parts.iter().enumerate() {
                let part_field = format!("{content_field}[{j}]");
                match parse_as::<ContentPart>(raw_part, &part_field)? {
                    ContentPart::Text { text } => {
                        let extras: Extras = parse_as(raw_part, &part_field)?;
                        out.push(Part::Text(TextBlock {
                            text,
                            cache_control: extras.cache_control,
                        }));
                    }
                    ContentPart::ImageUrl { image_url } => {
                        out.push(Part::Image(image(image_url.url, &part_field)?));
                    }
                    ContentPart::InputAudio { .. } => {
                        return Err(unsupported(
                            &part_field,
                            provider,
                            "audio input is not available for this model",
                        ));
                    }
                    ContentPart::File { .. } => {
                        return Err(unsupported(
                            &part_field,
                            provider,
                            "file parts are not available for this model; send text or images",
                        ));
                    }
                    ContentPart::Refusal { .. } => {
                        return Err(invalid(
                            &part_field,
                            "refusal parts belong to assistant messages",
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(b'n') => Ok(Vec::new()),
        _ => Err(invalid(
            &content_field,
            "must be a string or an array of content parts",
        )),
    }
}

fn image(url: String, field: &str) -> Result<Image, ApiError> {
    if url.starts_with("data:") {
        let (media_type, data) = split_data_url(&url).ok_or_else(|| {
            invalid(
                &format!("{field}.image_url.url"),
                "a data URL must be base64 (data:image/png;base64,...)",
            )
        })?;
        return Ok(Image::Base64 {
            media_type: media_type.to_owned(),
            data: data.to_owned(),
        });
    }
    if url.is_empty() {
        return Err(invalid(
            &format!("{field}.image_url.url"),
            "must not be empty",
        ));
    }
    Ok(Image::Url(url))
}

/// `system`/`developer` text blocks, keeping the `cache_control` of text parts.
fn system_blocks(message: &openai::Message, field: &str) -> Result<Vec<TextBlock>, ApiError> {
    let Some(raw) = &message.content else {
        return Ok(Vec::new());
    };
    if !raw.get().trim_start().starts_with('[') {
        let text = message.text(field)?;
        return Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![TextBlock {
                text,
                cache_control: None,
            }]
        });
    }
    let content_field = format!("{field}.content");
    let parts: Vec<Box<RawValue>> = parse_as(raw, &content_field)?;
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, raw_part) in parts.iter().enumerate() {
        let part_field = format!("{content_field}[{j}]");
        match parse_as::<ContentPart>(raw_part, &part_field)? {
            ContentPart::Text { text } => {
                let extras: Extras = parse_as(raw_part, &part_field)?;
                blocks.push(TextBlock {
                    text,
                    cache_control: extras.cache_control,
                });
            }
            _ => {
                return Err(invalid(
                    &part_field,
                    format!("only text parts are allowed in a {} message", message.role),
                ));
            }
        }
    }
    Ok(blocks)
}

/// The model's messages and system blocks from `messages`.
fn conversation(
    messages: &[openai::Message],
    provider: &str,
) -> Result<(Vec<TextBlock>, Vec<Message>), ApiError> {
    let mut system = Vec::new();
    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    // True while the last message holds only tool results, so that the next one joins it.
    let mut in_tool_results = false;
    for (i, message) in messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let mut tool_result = false;
        match message.role.as_str() {
            "system" | "developer" => {
                system.extend(system_blocks(message, &field)?);
                // A system message does not end a run of tool results: it joins the system prompt.
                continue;
            }
            "user" => {
                let content = user_parts(message, &field, provider)?;
                if !content.is_empty() {
                    out.push(Message {
                        role: Role::User,
                        content,
                    });
                }
            }
            "assistant" => {
                let mut content = Vec::new();
                let text = message.assistant_text(&field)?;
                if !text.is_empty() {
                    content.push(Part::Text(TextBlock {
                        text,
                        cache_control: None,
                    }));
                }
                for (j, call) in message.tool_calls.iter().flatten().enumerate() {
                    let call_field = format!("{field}.tool_calls[{j}]");
                    // Validates: targets such as Anthropic need an object.
                    call.arguments_object(&call_field)?;
                    let arguments = if call.function.arguments.trim().is_empty() {
                        "{}".to_owned()
                    } else {
                        call.function.arguments.clone()
                    };
                    content.push(Part::ToolCall(ToolCall {
                        id: call.id.clone(),
                        name: call.function.name.clone(),
                        arguments,
                    }));
                }
                if !content.is_empty() {
                    out.push(Message {
                        role: Role::Assistant,
                        content,
                    });
                }
            }
            "tool" => {
                let call_id = message
                    .tool_call_id
                    .clone()
                    .ok_or_else(|| invalid(&format!("{field}.tool_call_id"), "is required"))?;
                let text = message.text(&field)?;
                let content = if text.is_empty() {
                    Vec::new()
                } else {
                    vec![Part::Text(TextBlock {
                        text,
                        cache_control: None,
                    })]
                };
                let part = Part::ToolResult(ToolResult {
                    call_id,
                    content,
                    is_error: false,
                });
                match out.last_mut() {
                    Some(last) if in_tool_results => last.content.push(part),
                    _ => out.push(Message {
                        role: Role::User,
                        content: vec![part],
                    }),
                }
                tool_result = true;
            }
            other => {
                return Err(invalid(
                    &format!("{field}.role"),
                    format!("must be system, developer, user, assistant or tool, got `{other}`"),
                ));
            }
        }
        in_tool_results = tool_result;
    }
    if out.is_empty() {
        return Err(invalid(
            "messages",
            "must contain at least one user or assistant message",
        ));
    }
    Ok((system, out))
}

/// An OpenAI chat request in the model, for `provider` (named in errors), a target that does not
/// speak OpenAI chat. The fields mapped, refused and dropped are listed in the module doc.
pub fn parse_request(request: &ParsedRequest<'_>, provider: &str) -> Result<Request, ApiError> {
    refuse_unsupported(request, provider)?;
    let object = &request.object;
    let (system, messages) = conversation(&openai::messages(request)?, provider)?;
    let tool_choice = openai::tool_choice(request)?.map(|choice| match choice {
        openai::ToolChoice::Auto => ToolChoice::Auto,
        openai::ToolChoice::None => ToolChoice::None,
        openai::ToolChoice::Required => ToolChoice::Any,
        openai::ToolChoice::Function(name) => ToolChoice::Tool(name),
    });
    let reasoning = openai::reasoning_effort(request)?.map(|effort| Reasoning {
        budget_tokens: None,
        effort: Some(effort),
    });
    Ok(Request {
        model: request.model.clone().unwrap_or_default(),
        system,
        messages,
        tools: tools(request)?,
        tool_choice,
        parallel_tool_calls: get(object, "parallel_tool_calls")?,
        max_tokens: request.max_output_tokens,
        temperature: get(object, "temperature")?,
        top_p: get(object, "top_p")?,
        top_k: None,
        stop_sequences: openai::stop(request)?,
        stream: request.stream,
        reasoning,
        json_schema: json_schema(request, provider)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Requests: model → OpenAI chat

/// Joins text blocks the client wrote as separate documents.
const DOCUMENT_SEPARATOR: &str = "\n\n";

fn image_url(image: &Image) -> Value {
    let url = match image {
        Image::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        Image::Url(url) => url.clone(),
    };
    json!({ "type": "image_url", "image_url": { "url": url } })
}

/// A message's `content`: a plain string for a single text part, else the parts.
fn content_value(parts: Vec<Value>) -> Value {
    if let [part] = parts.as_slice()
        && part["type"] == "text"
        && let Some(text) = part["text"].as_str()
    {
        return Value::String(text.to_owned());
    }
    Value::Array(parts)
}

/// `reasoning_effort` for a reasoning request: the effort asked for, else one derived from the
/// thinking budget (Anthropic clients send budgets).
fn effort_of(reasoning: &Reasoning) -> Option<String> {
    if let Some(effort) = &reasoning.effort {
        return Some(effort.clone());
    }
    let budget = reasoning.budget_tokens?;
    Some(
        match budget {
            0..4096 => "low",
            4096..16384 => "medium",
            _ => "high",
        }
        .to_owned(),
    )
}

fn write_user_turn(content: &[Part], messages: &mut Vec<Value>) {
    let mut parts = Vec::new();
    // Tool messages first: OpenAI wants them right after the assistant's `tool_calls`.
    for part in content {
        if let Part::ToolResult(result) = part {
            let mut texts = Vec::new();
            for inner in &result.content {
                match inner {
                    Part::Text(block) => texts.push(block.text.as_str()),
                    // A tool message carries text only: its images follow in a user message.
                    Part::Image(image) => parts.push(image_url(image)),
                    _ => {}
                }
            }
            messages.push(json!({
                "role": "tool",
                "tool_call_id": result.call_id,
                "content": texts.join(DOCUMENT_SEPARATOR),
            }));
        }
    }
    for part in content {
        match part {
            Part::Text(block) => parts.push(json!({ "type": "text", "text": block.text })),
            Part::Image(image) => parts.push(image_url(image)),
            // Tool results are written above; the rest cannot stand in a user turn.
            _ => {}
        }
    }
    if !parts.is_empty() {
        messages.push(json!({ "role": "user", "content": content_value(parts) }));
    }
}

fn write_assistant_turn(content: &[Part], messages: &mut Vec<Value>) {
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for part in content {
        match part {
            Part::Text(block) => text.get_or_insert_with(String::new).push_str(&block.text),
            Part::ToolCall(call) => calls.push(json!({
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": if call.arguments.trim().is_empty() { "{}" } else { &call.arguments },
                },
            })),
            // Reasoning cannot go back through OpenAI chat, nor its signature be verified there.
            _ => {}
        }
    }
    if text.is_none() && calls.is_empty() {
        // Nothing OpenAI can carry (reasoning only): an empty assistant turn would be refused.
        return;
    }
    let mut message = json!({ "role": "assistant", "content": text });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    messages.push(message);
}

/// The model as an OpenAI chat request body for `remote_model`. `reasoning_effort_accepted`:
/// whether the target is a reasoning model, which takes `reasoning_effort` and
/// `max_completion_tokens` (others refuse the first and may refuse the second).
pub fn write_request(
    request: &Request,
    remote_model: &str,
    reasoning_effort_accepted: bool,
) -> Vec<u8> {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    let system: Vec<&str> = request
        .system
        .iter()
        .map(|b| b.text.as_str())
        .filter(|t| !t.is_empty())
        .collect();
    if !system.is_empty() {
        messages.push(json!({ "role": "system", "content": system.join(DOCUMENT_SEPARATOR) }));
    }
    for message in &request.messages {
        match message.role {
            Role::User => write_user_turn(&message.content, &mut messages),
            Role::Assistant => write_assistant_turn(&message.content, &mut messages),
            Role::System => {
                let text: Vec<&str> = message
                    .content
                    .iter()
                    .filter_map(|part| match part {
                        Part::Text(block) if !block.text.is_empty() => Some(block.text.as_str()),
                        _ => None,
                    })
                    .collect();
                if !text.is_empty() {
                    messages.push(
                        json!({ "role": "system", "content": text.join(DOCUMENT_SEPARATOR) }),
                    );
                }
            }
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(remote_model));
    body.insert("messages".into(), Value::Array(messages));
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|tool| {
                let mut function = Map::new();
                function.insert("name".into(), json!(tool.name));
                if let Some(description) = &tool.description {
                    function.insert("description".into(), json!(description));
                }
                function.insert(
                    "parameters".into(),
                    serde_json::from_str(tool.parameters.get()).unwrap_or(Value::Null),
                );
                json!({ "type": "function", "function": function })
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = &request.tool_choice {
        let choice = match choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Any => json!("required"),
            ToolChoice::Tool(name) => json!({ "type": "function", "function": { "name": name } }),
        };
        body.insert("tool_choice".into(), choice);
    }
    if let Some(parallel) = request.parallel_tool_calls {
        body.insert("parallel_tool_calls".into(), json!(parallel));
    }
    if let Some(max) = request.max_tokens {
        // Reasoning models take only `max_completion_tokens`; older deployments (Azure API
        // versions before 2024-09-01) only `max_tokens`, which other chat models still accept.
        let field = if reasoning_effort_accepted {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        body.insert(field.into(), json!(max));
    }
    if let Some(temperature) = request.temperature {
        body.insert("temperature".into(), json!(temperature));
    }
    if let Some(top_p) = request.top_p {
        body.insert("top_p".into(), json!(top_p));
    }
    if !request.stop_sequences.is_empty() {
        body.insert("stop".into(), json!(request.stop_sequences));
    }
    if request.stream {
        // `stream_options` is the adapter's to add: it knows whether the target accepts it.
        body.insert("stream".into(), json!(true));
    }
    if reasoning_effort_accepted
        && let Some(effort) = request.reasoning.as_ref().and_then(effort_of)
    {
        body.insert("reasoning_effort".into(), json!(effort));
    }
    if let Some(schema) = &request.json_schema {
        let mut json_schema = Map::new();
        json_schema.insert("name".into(), json!(schema.name));
        json_schema.insert(
            "schema".into(),
            serde_json::from_str(schema.schema.get()).unwrap_or(Value::Null),
        );
        if let Some(strict) = schema.strict {
            json_schema.insert("strict".into(), json!(strict));
        }
        body.insert(
            "response_format".into(),
            json!({ "type": "json_schema", "json_schema": json_schema }),
        );
    }
    // Serialising a Value into a Vec cannot fail.
    serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Answers

#[derive(Debug, Deserialize)]
struct Completion {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<AnswerMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AnswerMessage {
    /// A string; some OpenAI-compatible upstreams send a list of text parts.
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<AnswerToolCall>>,
}

#[derive(Debug, Deserialize)]
struct AnswerToolCall {
    #[serde(default)]
    id: Option<String>,
    function: AnswerFunction,
}

#[derive(Debug, Deserialize)]
struct AnswerFunction {
    name: String,
    #[serde(default)]
    arguments: Option<String>,
}

/// The model's counts of an OpenAI usage object (read as the passthrough reads it).
fn tokens(usage: OpenAiUsage) -> TokenUsage {
    TokenUsage::from_usage(usage.into())
}

fn usage_json(usage: &TokenUsage) -> Value {
    let prompt = usage.prompt_total();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": usage.output,
        "total_tokens": prompt.saturating_add(usage.output),
        "prompt_tokens_details": { "cached_tokens": usage.cache_read },
        "completion_tokens_details": { "reasoning_tokens": usage.reasoning },
    })
}

/// The model's stop reason for an OpenAI `finish_reason`. Some OpenAI-compatible upstreams say
/// `stop` after tool calls; Anthropic clients only run tools on `tool_use`, so calls win.
fn stop_reason(finish_reason: Option<&str>, called_tools: bool) -> StopReason {
    match finish_reason {
        Some("length") => StopReason::MaxTokens,
        Some("tool_calls" | "function_call") => StopReason::ToolUse,
        Some("content_filter") => StopReason::ContentFilter,
        _ if called_tools => StopReason::ToolUse,
        None | Some("stop") => StopReason::EndTurn,
        Some(other) => StopReason::Other(other.to_owned()),
    }
}

fn finish_reason(stop: &StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens => "length",
        StopReason::ToolUse => "tool_calls",
        StopReason::ContentFilter => "content_filter",
        // Strict OpenAI clients refuse values outside their enum.
        StopReason::EndTurn | StopReason::StopSequence(_) | StopReason::Other(_) => "stop",
    }
}

fn random_suffix() -> String {
    use rand::distr::{Alphanumeric, SampleString as _};
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

fn new_call_id() -> String {
    format!("call_{}", random_suffix())
}

/// An OpenAI completion id for `id`: kept when it is one, prefixed otherwise (so that it can be
/// traced back to the upstream's), generated when empty.
fn completion_id(id: &str) -> String {
    if id.starts_with("chatcmpl-") {
        id.to_owned()
    } else if id.is_empty() {
        format!("chatcmpl-{}", random_suffix())
    } else {
        format!("chatcmpl-{id}")
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The text of an answer's `content`: a string, or the text of its parts.
fn answer_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// An OpenAI-format chat answer (from OpenAI, Azure, or the Gemini and Converse converters) in the
/// model; `provider` is named in errors. Only the first choice is read (`n` > 1 is refused).
pub fn parse_reply(body: &[u8], provider: &str) -> Result<Reply, ApiError> {
    let completion: Completion = serde_json::from_slice(body).map_err(|e| {
        ApiError::upstream_bad_answer(provider, format!("not a chat completion: {e}"))
    })?;
    let choice = completion.choices.into_iter().next().ok_or_else(|| {
        ApiError::upstream_bad_answer(provider, "a chat completion without choices")
    })?;
    let mut content = Vec::new();
    let mut called_tools = false;
    if let Some(message) = choice.message {
        if let Some(reasoning) = message.reasoning_content.filter(|r| !r.is_empty()) {
            content.push(Part::Reasoning {
                text: reasoning,
                signature: None,
            });
        }
        if let Some(text) = message
            .content
            .map(|content| answer_text(&content))
            .filter(|t| !t.is_empty())
            .or(message.refusal.filter(|r| !r.is_empty()))
        {
            content.push(Part::Text(TextBlock {
                text,
                cache_control: None,
            }));
        }
        for call in message.tool_calls.unwrap_or_default() {
            called_tools = true;
            let arguments = call
                .function
                .arguments
                .filter(|a| !a.trim().is_empty())
                .unwrap_or_else(|| "{}".to_owned());
            content.push(Part::ToolCall(ToolCall {
                id: call
                    .id
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(new_call_id),
                name: call.function.name,
                arguments,
            }));
        }
    }
    Ok(Reply {
        id: completion.id.unwrap_or_default(),
        model: completion.model.unwrap_or_default(),
        content,
        stop: stop_reason(choice.finish_reason.as_deref(), called_tools),
        usage: tokens(completion.usage.unwrap_or_default()),
    })
}

/// The model's answer as an OpenAI `chat.completion` naming `model`. Reasoning parts are left out
/// (OpenAI chat has no field for them).
pub fn write_reply(reply: &Reply, model: &str) -> Vec<u8> {
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for part in &reply.content {
        match part {
            Part::Text(block) => text.get_or_insert_with(String::new).push_str(&block.text),
            Part::ToolCall(call) => calls.push(json!({
                "id": call.id,
                "type": "function",
                "function": { "name": call.name, "arguments": call.arguments },
            })),
            _ => {}
        }
    }
    let mut message = json!({ "role": "assistant", "content": text, "refusal": null });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let out = json!({
        "id": completion_id(&reply.id),
        "object": "chat.completion",
        "created": now_unix(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(&reply.stop),
        }],
        "usage": usage_json(&reply.usage),
        "system_fingerprint": null,
    });
    // Serialising a Value into a Vec cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Streams: OpenAI chunks → model events

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u64,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Reasoning,
    /// The tool call of this OpenAI index.
    Tool(u64),
}

/// The error an OpenAI-format upstream sent as a stream event (`{"error":{...}}`): 429 when it
/// says rate limit or quota, 503 when overloaded, else 502.
fn stream_error(provider: &str, error: &Value) -> ApiError {
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .filter(|m| !m.is_empty())
        .unwrap_or("no message");
    let words = [error.get("type"), error.get("code")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    let message = format!("upstream {provider} failed during the stream: {message}");
    if words.contains("rate_limit") || words.contains("quota") {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "requests", message)
            .with_code("rate_limit_exceeded")
    } else if words.contains("overloaded") || words.contains("unavailable") {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .with_code("overloaded")
    } else {
        ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message).with_code("upstream_error")
    }
}

/// Reads an OpenAI chat stream (`data: {chunk}` … `data: [DONE]`) into model events.
///
/// Tool calls: the model streams one block at a time, so a tool call's arguments must arrive
/// while it is the open block. OpenAI and the gateway's converters stream calls one after the
/// other; arguments for a call that was already closed (an interleaving upstream) are refused as
/// a bad answer rather than buffered, which keeps memory bounded by one event.
///
/// The end: `Finish` comes at `[DONE]` (after the usage chunk, which follows the finish reason),
/// or when the upstream closes after a finish reason without `[DONE]`; `[DONE]` without a finish
/// reason reads as the end of the turn.
#[derive(Debug)]
pub struct OpenAiChunkReader {
    provider: &'static str,
    splitter: EventSplitter,
    started: bool,
    open: Option<Open>,
    /// The highest tool index opened so far: a lower one later is an interleaving upstream.
    last_tool: Option<u64>,
    finish_reason: Option<String>,
    called_tools: bool,
    usage: TokenUsage,
    complete: bool,
}

impl OpenAiChunkReader {
    /// A reader of `provider`'s stream refusing events larger than `max_event_bytes`
    /// (`--max-stream-event-bytes`).
    pub fn new(provider: &'static str, max_event_bytes: usize) -> Self {
        Self {
            provider,
            splitter: EventSplitter::new(max_event_bytes),
            started: false,
            open: None,
            last_tool: None,
            finish_reason: None,
            called_tools: false,
            usage: TokenUsage::default(),
            complete: false,
        }
    }

    fn bad(&self, detail: impl std::fmt::Display) -> ApiError {
        ApiError::upstream_bad_answer(self.provider, detail)
    }

    fn close(&mut self, events: &mut Vec<StreamEvent>) {
        if self.open.take().is_some() {
            events.push(StreamEvent::BlockStop);
        }
    }

    /// Opens a text or reasoning block unless it is the open one.
    fn ensure(&mut self, kind: Open, events: &mut Vec<StreamEvent>) {
        if self.open != Some(kind) {
            self.close(events);
            events.push(StreamEvent::BlockStart(match kind {
                Open::Reasoning => BlockKind::Reasoning,
                _ => BlockKind::Text,
            }));
            self.open = Some(kind);
        }
    }

    fn tool_delta(
        &mut self,
        delta: ToolCallDelta,
        events: &mut Vec<StreamEvent>,
    ) -> Result<(), ApiError> {
        let (name, arguments) = match delta.function {
            Some(f) => (f.name, f.arguments),
            None => (None, None),
        };
        // Some upstreams leave `index` out: a fragment with a name starts the next call, one
        // without continues the open call.
        let index = match (delta.index, self.open) {
            (Some(index), _) => index,
            (None, Some(Open::Tool(open))) if name.is_none() => open,
            (None, _) => self.last_tool.map_or(0, |last| last.saturating_add(1)),
        };
        if self.open != Some(Open::Tool(index)) {
            if self.last_tool.is_some_and(|last| index <= last) {
                return Err(self.bad(format!(
                    "arguments for tool call {index} arrived after a later block started"
                )));
            }
            let name = name.filter(|n| !n.is_empty()).ok_or_else(|| {
                self.bad(format!("tool call {index} starts without a function name"))
            })?;
            self.close(events);
            let id = delta
                .id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(new_call_id);
            events.push(StreamEvent::BlockStart(BlockKind::ToolCall { id, name }));
            self.open = Some(Open::Tool(index));
            self.last_tool = Some(index);
            self.called_tools = true;
        }
        if let Some(arguments) = arguments.filter(|a| !a.is_empty()) {
            events.push(StreamEvent::ArgumentsDelta(arguments));
        }
        Ok(())
    }

    fn done(&mut self, events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        if !self.started {
            return Err(self.bad("the stream ended before its first chunk"));
        }
        self.close(events);
        events.push(StreamEvent::Finish {
            stop: stop_reason(self.finish_reason.as_deref(), self.called_tools),
            usage: self.usage,
        });
        self.complete = true;
        Ok(())
    }

    fn event(&mut self, data: &str, events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        let data = data.trim();
        if data == "[DONE]" {
            return self.done(events);
        }
        if data.is_empty() {
            return Ok(());
        }
        let value: Value = serde_json::from_str(data)
            .map_err(|e| self.bad(format!("a stream event is not JSON: {e}")))?;
        if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
            return Err(stream_error(self.provider, error));
        }
        let chunk: Chunk = serde_json::from_value(value).map_err(|e| {
            self.bad(format!(
                "a stream event is not a chat completion chunk: {e}"
            ))
        })?;
        if !self.started {
            self.started = true;
            events.push(StreamEvent::Start {
                id: chunk.id.unwrap_or_default(),
                model: chunk.model.unwrap_or_default(),
                usage: TokenUsage::default(),
            });
        }
        if let Some(usage) = chunk.usage {
            self.usage = tokens(usage);
        }
        // `n` > 1 is refused, so only choice 0 is the answer.
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(delta) = choice.delta {
                if let Some(reasoning) = delta.reasoning_content.filter(|r| !r.is_empty()) {
                    self.ensure(Open::Reasoning, events);
                    events.push(StreamEvent::ReasoningDelta(reasoning));
                }
                for text in [delta.content, delta.refusal].into_iter().flatten() {
                    if !text.is_empty() {
                        self.ensure(Open::Text, events);
                        events.push(StreamEvent::TextDelta(text));
                    }
                }
                for call in delta.tool_calls.into_iter().flatten() {
                    self.tool_delta(call, events)?;
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
        }
        Ok(())
    }
}

impl EventReader for OpenAiChunkReader {
    fn push(&mut self, chunk: &[u8], events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        if self.complete {
            return Ok(());
        }
        self.splitter.push(chunk);
        while let Some(event) = self.splitter.next_event() {
            if let Some(data) = sse::data_of(&event) {
                self.event(&data, events)?;
                if self.complete {
                    return Ok(());
                }
            }
        }
        if self.splitter.overflowed() {
            return Err(sse::event_too_large(
                self.provider,
                self.splitter.max_event_bytes(),
            ));
        }
        Ok(())
    }

    fn finish(&mut self, events: &mut Vec<StreamEvent>) -> Result<(), ApiError> {
        if self.complete {
            return Ok(());
        }
        if let Some(rest) = self.splitter.finish()
            && let Some(data) = sse::data_of(&rest)
        {
            self.event(&data, events)?;
            if self.complete {
                return Ok(());
            }
        }
        // Some OpenAI-compatible upstreams close after the finish reason without `[DONE]`.
        if self.finish_reason.is_some() {
            return self.done(events);
        }
        Err(sse::stream_truncated(self.provider, "[DONE]"))
    }

    fn complete(&self) -> bool {
        self.complete
    }
}

// ---------------------------------------------------------------------------------------------
// Streams: model events → OpenAI chunks

/// Writes model events as OpenAI streams chat completion chunks. Reasoning deltas are left out
/// (OpenAI chat has no field for them).
#[derive(Debug)]
pub struct OpenAiChunkWriter {
    writer: ChunkWriter,
    started: bool,
    /// Tool calls opened so far: the next one's `index`.
    tool_calls: u64,
    /// The `index` of the open tool call block.
    open_tool: Option<u64>,
}

impl OpenAiChunkWriter {
    /// A writer naming `model` on every chunk; `client_wants_usage`: the client sent
    /// `stream_options.include_usage`.
    pub fn new(model: &str, client_wants_usage: bool) -> Self {
        Self {
            writer: ChunkWriter {
                id: String::new(),
                created: now_unix(),
                model: model.to_owned(),
                client_wants_usage,
            },
            started: false,
            tool_calls: 0,
            open_tool: None,
        }
    }

    fn delta(&self, delta: Value, out: &mut BytesMut) {
        self.writer.choices(
            json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": null }]),
            out,
        );
    }

    /// The role chunk OpenAI opens every stream with (once, even when `Start` never came).
    fn start(&mut self, id: &str, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            self.writer.id = completion_id(id);
            self.delta(json!({ "role": "assistant", "content": "" }), out);
        }
    }
}

impl EventWriter for OpenAiChunkWriter {
    fn write(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        if let StreamEvent::Start { id, .. } = event {
            self.start(id, out);
            return;
        }
        self.start("", out);
        match event {
            StreamEvent::BlockStart(BlockKind::ToolCall { id, name }) => {
                let index = self.tool_calls;
                self.tool_calls += 1;
                self.open_tool = Some(index);
                self.delta(
                    json!({ "tool_calls": [{
                        "index": index,
                        "id": id,
                        "type": "function",
                        "function": { "name": name, "arguments": "" },
                    }] }),
                    out,
                );
            }
            StreamEvent::TextDelta(text) if !text.is_empty() => {
                self.delta(json!({ "content": text }), out);
            }
            StreamEvent::ArgumentsDelta(arguments) if !arguments.is_empty() => {
                if let Some(index) = self.open_tool {
                    self.delta(
                        json!({ "tool_calls": [{ "index": index, "function": { "arguments": arguments } }] }),
                        out,
                    );
                }
            }
            StreamEvent::BlockStop => self.open_tool = None,
            StreamEvent::Finish { stop, usage } => {
                self.writer.choices(
                    json!([{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(stop) }]),
                    out,
                );
                self.writer.end(usage_json(usage), out);
            }
            // Text and reasoning blocks need no chunk of their own; reasoning has no field.
            _ => {}
        }
    }

    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        sse::write_data(out, error.body_json().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use crate::conversation::Translate;
    use crate::sse::StreamTranslator as _;

    const PROVIDER: &str = "anthropic";

    fn parse(body: &str) -> Result<Request, ApiError> {
        let parsed = body::parse(body.as_bytes(), true, 1000).unwrap();
        parse_request(&parsed, PROVIDER)
    }

    fn json_of(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn text(part: &Part) -> &str {
        match part {
            Part::Text(block) => &block.text,
            other => panic!("not text: {other:?}"),
        }
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    fn block(text: &str) -> TextBlock {
        TextBlock {
            text: text.to_owned(),
            cache_control: None,
        }
    }

    // -- parse_request -------------------------------------------------------------------------

    #[test]
    fn system_and_developer_messages_become_system_blocks_in_order() {
        let request = parse(
            r#"{"model":"claude","messages":[
                {"role":"system","content":"be brief"},
                {"role":"developer","content":[{"type":"text","text":"cite","cache_control":{"type":"ephemeral"}},{"type":"text","text":"twice"}]},
                {"role":"user","content":"hi"},
                {"role":"system","content":"late rule"},
                {"role":"assistant","content":"hello"}]}"#,
        )
        .unwrap();
        let system: Vec<&str> = request.system.iter().map(|b| b.text.as_str()).collect();
        assert_eq!(system, ["be brief", "cite", "twice", "late rule"]);
        assert_eq!(
            request.system[1].cache_control.as_ref().unwrap().get(),
            r#"{"type":"ephemeral"}"#
        );
        assert!(request.system[0].cache_control.is_none());
        assert_eq!(request.messages.len(), 2);
        assert_eq!(request.messages[0].role, Role::User);
        assert_eq!(text(&request.messages[0].content[0]), "hi");
        assert_eq!(request.messages[1].role, Role::Assistant);
        assert_eq!(request.model, "claude");
    }

    #[test]
    fn system_turns_between_messages_keep_their_place() {
        let request = Request {
            messages: vec![
                Message {
                    role: Role::User,
                    content: vec![Part::Text(block("hi"))],
                },
                Message {
                    role: Role::System,
                    content: vec![Part::Text(block("agents: a, b"))],
                },
                Message {
                    role: Role::User,
                    content: vec![Part::Text(block("go"))],
                },
            ],
            ..Request::default()
        };
        let written = json_of(&write_request(&request, "gpt-4o", false));
        let roles: Vec<&str> = written["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "system", "user"]);
        assert_eq!(written["messages"][1]["content"], "agents: a, b");
    }

    #[test]
    fn system_messages_take_text_parts_only() {
        let err = parse(
            r#"{"model":"m","messages":[{"role":"system","content":[{"type":"image_url","image_url":{"url":"https://x/a.png"}}]},{"role":"user","content":"hi"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].content[0]"));
    }

    #[test]
    fn user_parts_keep_text_and_images() {
        let request = parse(
            r#"{"model":"m","messages":[{"role":"user","content":[
                {"type":"text","text":"what is this?","cache_control":{"type":"ephemeral"}},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBOR","detail":"high"}},
                {"type":"image_url","image_url":{"url":"https://example.com/cat.jpg"}}]}]}"#,
        )
        .unwrap();
        let content = &request.messages[0].content;
        assert_eq!(text(&content[0]), "what is this?");
        let Part::Text(first) = &content[0] else {
            unreachable!()
        };
        assert!(first.cache_control.is_some());
        assert!(matches!(
            &content[1],
            Part::Image(Image::Base64 { media_type, data }) if media_type == "image/png" && data == "iVBOR"
        ));
        assert!(
            matches!(&content[2], Part::Image(Image::Url(u)) if u == "https://example.com/cat.jpg")
        );
    }

    #[test]
    fn a_data_url_must_be_base64() {
        let err = parse(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png,abc"}}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            err.param.as_deref(),
            Some("messages[0].content[0].image_url.url")
        );
    }

    #[test]
    fn audio_and_file_parts_are_refused_naming_the_part() {
        for part in [
            r#"{"type":"input_audio","input_audio":{"data":"AAA","format":"wav"}}"#,
            r#"{"type":"file","file":{"file_data":"data:application/pdf;base64,AAA"}}"#,
        ] {
            let err = parse(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"x"}},{part}]}}]}}"#
            ))
            .unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.param.as_deref(), Some("messages[0].content[1]"));
            assert_eq!(err.code.as_deref(), Some("unsupported_parameter"));
            assert!(err.message.contains("anthropic"), "{}", err.message);
        }
    }

    #[test]
    fn assistant_tool_calls_and_tool_results_round_into_parts() {
        let request = parse(
            r#"{"model":"m","messages":[
                {"role":"user","content":"weather in Paris and Rome?"},
                {"role":"assistant","content":null,"tool_calls":[
                    {"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},
                    {"id":"call_2","type":"function","function":{"name":"get_weather","arguments":""}}]},
                {"role":"tool","tool_call_id":"call_1","content":"21C"},
                {"role":"tool","tool_call_id":"call_2","content":[{"type":"text","text":"18C"}]},
                {"role":"user","content":"thanks"}]}"#,
        )
        .unwrap();
        assert_eq!(request.messages.len(), 4);
        let assistant = &request.messages[1];
        assert_eq!(assistant.role, Role::Assistant);
        assert_eq!(assistant.content.len(), 2, "no empty text part");
        assert!(matches!(
            &assistant.content[0],
            Part::ToolCall(ToolCall { id, name, arguments }) if id == "call_1" && name == "get_weather" && arguments == r#"{"city":"Paris"}"#
        ));
        assert!(
            matches!(&assistant.content[1], Part::ToolCall(ToolCall { arguments, .. }) if arguments == "{}")
        );
        let results = &request.messages[2];
        assert_eq!(results.role, Role::User);
        assert_eq!(
            results.content.len(),
            2,
            "consecutive tool messages share a turn"
        );
        for (part, (id, output)) in results
            .content
            .iter()
            .zip([("call_1", "21C"), ("call_2", "18C")])
        {
            let Part::ToolResult(result) = part else {
                panic!("{part:?}")
            };
            assert_eq!(result.call_id, id);
            assert!(!result.is_error);
            assert_eq!(text(&result.content[0]), output);
        }
        assert_eq!(request.messages[3].role, Role::User);
        assert_eq!(text(&request.messages[3].content[0]), "thanks");
    }

    #[test]
    fn bad_tool_history_is_refused_naming_the_field() {
        let err = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"[1]"}}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.param.as_deref(),
            Some("messages[1].tool_calls[0].function.arguments")
        );
        let err = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"tool","content":"r"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[1].tool_call_id"));
        let err =
            parse(r#"{"model":"m","messages":[{"role":"function","content":"x"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let err =
            parse(r#"{"model":"m","messages":[{"role":"system","content":"x"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages"));
        let err = parse(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].content"));
    }

    #[test]
    fn tools_and_every_tool_choice() {
        let tools = r#""tools":[
            {"type":"function","function":{"name":"get_weather","description":"Weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}},"strict":true}},
            {"type":"function","function":{"name":"now"},"cache_control":{"type":"ephemeral"}}]"#;
        for (choice, expected) in [
            (r#""auto""#, ToolChoice::Auto),
            (r#""none""#, ToolChoice::None),
            (r#""required""#, ToolChoice::Any),
            (
                r#"{"type":"function","function":{"name":"now"}}"#,
                ToolChoice::Tool("now".into()),
            ),
        ] {
            let request = parse(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{tools},"tool_choice":{choice},"parallel_tool_calls":false}}"#
            ))
            .unwrap();
            assert_eq!(request.tool_choice, Some(expected));
            assert_eq!(request.parallel_tool_calls, Some(false));
            assert_eq!(request.tools.len(), 2);
            assert_eq!(request.tools[0].name, "get_weather");
            assert_eq!(request.tools[0].description.as_deref(), Some("Weather"));
            assert_eq!(
                request.tools[0].parameters.get(),
                r#"{"type":"object","properties":{"city":{"type":"string"}}}"#,
                "kept byte for byte"
            );
            assert_eq!(
                request.tools[1].parameters.get(),
                r#"{"type":"object","properties":{}}"#
            );
            assert!(request.tools[1].cache_control.is_some());
        }
        let err = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"web_search"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tools[0].type"));
        let err = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":"sometimes"}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn sampling_limits_stop_stream_and_reasoning() {
        let request = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":10,"max_completion_tokens":20,
                "temperature":0.5,"top_p":0.9,"stop":"END","stream":true,"stream_options":{"include_usage":true},
                "reasoning_effort":"high"}"#,
        )
        .unwrap();
        assert_eq!(request.max_tokens, Some(20));
        assert_eq!(request.temperature, Some(0.5));
        assert_eq!(request.top_p, Some(0.9));
        assert_eq!(request.top_k, None);
        assert_eq!(request.stop_sequences, ["END"]);
        assert!(request.stream);
        assert_eq!(
            request.reasoning,
            Some(Reasoning {
                budget_tokens: None,
                effort: Some("high".into())
            })
        );
        let request = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":10,"stop":["a","b"]}"#,
        )
        .unwrap();
        assert_eq!(request.max_tokens, Some(10));
        assert_eq!(request.stop_sequences, ["a", "b"]);
        assert!(!request.stream);
        assert!(request.reasoning.is_none());
        let err = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"reasoning_effort":"max"}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("reasoning_effort"));
    }

    #[test]
    fn response_formats() {
        let request = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"answer","schema":{"type":"object","required":["a"]},"strict":true}}}"#,
        )
        .unwrap();
        let schema = request.json_schema.unwrap();
        assert_eq!(schema.name, "answer");
        assert_eq!(schema.schema.get(), r#"{"type":"object","required":["a"]}"#);
        assert_eq!(schema.strict, Some(true));
        let request = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"text"}}"#,
        )
        .unwrap();
        assert!(request.json_schema.is_none());
        let err = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("response_format"));
        assert_eq!(err.code.as_deref(), Some("unsupported_parameter"));
    }

    #[test]
    fn fields_that_change_the_answer_are_refused_naming_them() {
        for (field, value) in [
            ("n", "2"),
            ("logprobs", "true"),
            ("top_logprobs", "3"),
            ("logit_bias", r#"{"50256":-100}"#),
            ("audio", r#"{"voice":"alloy","format":"wav"}"#),
            ("modalities", r#"["text","audio"]"#),
            ("functions", r#"[{"name":"f"}]"#),
            ("function_call", r#""auto""#),
            ("prediction", r#"{"type":"content","content":"x"}"#),
            ("web_search_options", "{\"search_context_size\":\"low\"}"),
        ] {
            let err = parse(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"{field}":{value}}}"#
            ))
            .unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{field}");
            assert_eq!(err.param.as_deref(), Some(field));
            assert_eq!(
                err.code.as_deref(),
                Some("unsupported_parameter"),
                "{field}"
            );
            assert!(
                err.message
                    .starts_with(&format!("`{field}` is not supported for anthropic models")),
                "{}",
                err.message
            );
        }
        let err =
            parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":0}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("n"));
    }

    #[test]
    fn harmless_values_hints_and_unknown_fields_pass() {
        let request = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x","name":"ann"}],"n":1,"logprobs":false,
                "logit_bias":{},"modalities":["text"],"top_logprobs":null,"functions":[],
                "seed":7,"presence_penalty":0.5,"frequency_penalty":0.5,"user":"u","metadata":{"a":"b"},
                "store":false,"service_tier":"auto","prompt_cache_key":"k","safety_identifier":"s",
                "verbosity":"low","some_future_field":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(request.messages.len(), 1);
    }

    // -- write_request -------------------------------------------------------------------------

    fn model_request() -> Request {
        Request {
            model: "alias".into(),
            system: vec![
                TextBlock {
                    text: "be brief".into(),
                    cache_control: Some(raw(r#"{"type":"ephemeral"}"#)),
                },
                block("cite"),
            ],
            messages: vec![
                Message {
                    role: Role::User,
                    content: vec![
                        Part::Text(block("look")),
                        Part::Image(Image::Base64 {
                            media_type: "image/png".into(),
                            data: "iVBOR".into(),
                        }),
                    ],
                },
                Message {
                    role: Role::Assistant,
                    content: vec![
                        Part::Reasoning {
                            text: "hmm".into(),
                            signature: Some("sig".into()),
                        },
                        Part::RedactedReasoning { data: "xx".into() },
                        Part::Text(block("checking ")),
                        Part::Text(block("now")),
                        Part::ToolCall(ToolCall {
                            id: "toolu_1".into(),
                            name: "screenshot".into(),
                            arguments: r#"{"x":1}"#.into(),
                        }),
                        Part::ToolCall(ToolCall {
                            id: "toolu_2".into(),
                            name: "now".into(),
                            arguments: String::new(),
                        }),
                    ],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        Part::Text(block("here:")),
                        Part::ToolResult(ToolResult {
                            call_id: "toolu_1".into(),
                            content: vec![
                                Part::Text(block("captured")),
                                Part::Image(Image::Url("https://x/s.png".into())),
                                Part::Text(block("1 image")),
                            ],
                            is_error: false,
                        }),
                        Part::ToolResult(ToolResult {
                            call_id: "toolu_2".into(),
                            content: vec![Part::Text(block("clock broken"))],
                            is_error: true,
                        }),
                    ],
                },
            ],
            tools: vec![
                Tool {
                    name: "screenshot".into(),
                    description: Some("Takes one".into()),
                    parameters: raw(r#"{"type":"object","properties":{"x":{"type":"integer"}}}"#),
                    cache_control: Some(raw(r#"{"type":"ephemeral"}"#)),
                },
                Tool {
                    name: "now".into(),
                    description: None,
                    parameters: raw(r#"{"type":"object"}"#),
                    cache_control: None,
                },
            ],
            tool_choice: Some(ToolChoice::Tool("now".into())),
            parallel_tool_calls: Some(true),
            max_tokens: Some(1024),
            temperature: Some(0.2),
            top_p: Some(0.8),
            top_k: Some(40),
            stop_sequences: vec!["END".into()],
            stream: true,
            reasoning: Some(Reasoning {
                budget_tokens: Some(8000),
                effort: None,
            }),
            json_schema: Some(JsonSchema {
                name: "out".into(),
                schema: raw(r#"{"type":"object"}"#),
                strict: Some(true),
            }),
        }
    }

    #[test]
    fn write_request_lays_out_an_openai_chat_request() {
        let body = json_of(&write_request(&model_request(), "gpt-5", true));
        assert_eq!(
            body,
            json!({
                "model": "gpt-5",
                "messages": [
                    {"role": "system", "content": "be brief\n\ncite"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}
                    ]},
                    {"role": "assistant", "content": "checking now", "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "screenshot", "arguments": "{\"x\":1}"}},
                        {"id": "toolu_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}
                    ]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "captured\n\n1 image"},
                    {"role": "tool", "tool_call_id": "toolu_2", "content": "clock broken"},
                    {"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "https://x/s.png"}},
                        {"type": "text", "text": "here:"}
                    ]}
                ],
                "tools": [
                    {"type": "function", "function": {"name": "screenshot", "description": "Takes one", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
                    {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
                ],
                "tool_choice": {"type": "function", "function": {"name": "now"}},
                "parallel_tool_calls": true,
                "max_completion_tokens": 1024,
                "temperature": 0.2,
                "top_p": 0.8,
                "stop": ["END"],
                "stream": true,
                "reasoning_effort": "medium",
                "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": true}}
            })
        );
    }

    #[test]
    fn write_request_choices_efforts_and_plain_strings() {
        let mut request = model_request();
        let body = json_of(&write_request(&request, "gpt-4o", false));
        assert!(body.get("reasoning_effort").is_none());
        for (budget, effort) in [
            (1024, "low"),
            (4095, "low"),
            (4096, "medium"),
            (16384, "high"),
        ] {
            request.reasoning = Some(Reasoning {
                budget_tokens: Some(budget),
                effort: None,
            });
            let body = json_of(&write_request(&request, "o3", true));
            assert_eq!(body["reasoning_effort"], effort, "{budget}");
        }
        request.reasoning = Some(Reasoning {
            budget_tokens: Some(100),
            effort: Some("xhigh".into()),
        });
        assert_eq!(
            json_of(&write_request(&request, "o3", true))["reasoning_effort"],
            "xhigh"
        );
        for (choice, expected) in [
            (ToolChoice::Auto, json!("auto")),
            (ToolChoice::None, json!("none")),
            (ToolChoice::Any, json!("required")),
        ] {
            request.tool_choice = Some(choice);
            assert_eq!(
                json_of(&write_request(&request, "m", true))["tool_choice"],
                expected
            );
        }
        let plain = Request {
            messages: vec![
                Message {
                    role: Role::User,
                    content: vec![Part::Text(block("hi"))],
                },
                Message {
                    role: Role::Assistant,
                    content: vec![Part::Reasoning {
                        text: "only thoughts".into(),
                        signature: None,
                    }],
                },
            ],
            ..Request::default()
        };
        assert_eq!(
            json_of(&write_request(&plain, "m", true)),
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        );
    }

    #[test]
    fn an_openai_request_round_trips_through_the_model() {
        let original = json!({
            "model": "gpt-5",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": "use tools"},
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this and the weather there?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/paris.png"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"CET\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_a", "content": "21C"},
                {"role": "tool", "tool_call_id": "call_b", "content": "14:00"},
                {"role": "assistant", "content": "Paris, 21C at 14:00."},
                {"role": "user", "content": "thanks"}
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
                {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false,
            "max_completion_tokens": 500,
            "temperature": 0.3,
            "top_p": 1.0,
            "stop": ["DONE"],
            "stream": true,
            "reasoning_effort": "low",
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": true}}
        });
        let request = parse(&original.to_string()).unwrap();
        let written = json_of(&write_request(&request, "gpt-5", true));
        let mut expected = original;
        // The only difference: system and developer messages join into one system message.
        let messages = expected["messages"].as_array_mut().unwrap();
        messages.remove(1);
        messages[0]["content"] = json!("be brief\n\nuse tools");
        assert_eq!(written, expected);
    }

    // -- parse_reply / write_reply ------------------------------------------------------------

    #[test]
    fn parse_reply_reads_text_calls_reasoning_and_usage() {
        let reply = parse_reply(
            br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-5","choices":[{"index":0,"message":{"role":"assistant","content":"Let me check.","reasoning_content":"thinking","tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},{"id":"","type":"function","function":{"name":"now","arguments":""}}]},"finish_reason":"tool_calls"}],
                "usage":{"prompt_tokens":100,"completion_tokens":30,"total_tokens":130,"prompt_tokens_details":{"cached_tokens":60},"completion_tokens_details":{"reasoning_tokens":12}}}"#,
            "openai",
        )
        .unwrap();
        assert_eq!(reply.id, "chatcmpl-1");
        assert_eq!(reply.model, "gpt-5");
        assert_eq!(reply.stop, StopReason::ToolUse);
        assert_eq!(
            reply.usage,
            TokenUsage {
                input: 40,
                output: 30,
                cache_read: 60,
                cache_write: 0,
                reasoning: 12
            }
        );
        assert!(
            matches!(&reply.content[0], Part::Reasoning { text, signature: None } if text == "thinking")
        );
        assert_eq!(text(&reply.content[1]), "Let me check.");
        assert!(
            matches!(&reply.content[2], Part::ToolCall(c) if c.id == "call_1" && c.arguments == r#"{"city":"Paris"}"#)
        );
        assert!(
            matches!(&reply.content[3], Part::ToolCall(c) if c.id.starts_with("call_") && c.id.len() == 29 && c.arguments == "{}")
        );
    }

    #[test]
    fn finish_reasons_map_to_stop_reasons() {
        for (reason, calls, expected) in [
            ("\"stop\"", "", StopReason::EndTurn),
            ("null", "", StopReason::EndTurn),
            ("\"length\"", "", StopReason::MaxTokens),
            ("\"tool_calls\"", "", StopReason::ToolUse),
            ("\"function_call\"", "", StopReason::ToolUse),
            ("\"content_filter\"", "", StopReason::ContentFilter),
            ("\"eos\"", "", StopReason::Other("eos".into())),
            (
                "\"stop\"",
                r#","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]"#,
                StopReason::ToolUse,
            ),
        ] {
            let body = format!(
                r#"{{"choices":[{{"message":{{"role":"assistant","content":"x"{calls}}},"finish_reason":{reason}}}]}}"#
            );
            assert_eq!(
                parse_reply(body.as_bytes(), "openai").unwrap().stop,
                expected,
                "{reason}"
            );
        }
    }

    #[test]
    fn a_refusal_is_read_as_text_and_non_answers_are_bad_answers() {
        let reply = parse_reply(
            br#"{"choices":[{"message":{"role":"assistant","content":null,"refusal":"I can't."},"finish_reason":"stop"}]}"#,
            "azure",
        )
        .unwrap();
        assert_eq!(text(&reply.content[0]), "I can't.");
        for body in [
            &b"not json"[..],
            br#"{"choices":[]}"#,
            br#"{"choices":[{"message":{"tool_calls":[{"function":{}}]}}]}"#,
        ] {
            let err = parse_reply(body, "azure").unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_GATEWAY);
            assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
            assert!(err.message.contains("upstream azure"), "{}", err.message);
        }
    }

    #[test]
    fn answer_content_may_be_a_list_of_text_parts() {
        let reply = parse_reply(
            br#"{"choices":[{"message":{"role":"assistant","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},"finish_reason":"stop"}]}"#,
            "openai",
        )
        .unwrap();
        assert_eq!(text(&reply.content[0]), "ab");
    }

    #[test]
    fn write_reply_is_a_chat_completion() {
        let reply = Reply {
            id: "msg_01".into(),
            model: "claude-x".into(),
            content: vec![
                Part::Reasoning {
                    text: "hmm".into(),
                    signature: Some("s".into()),
                },
                Part::Text(block("Checking")),
                Part::Text(block(" now.")),
                Part::ToolCall(ToolCall {
                    id: "toolu_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }),
            ],
            stop: StopReason::ToolUse,
            usage: TokenUsage {
                input: 10,
                output: 20,
                cache_read: 5,
                cache_write: 3,
                reasoning: 7,
            },
        };
        let mut answer = json_of(&write_reply(&reply, "my-alias"));
        assert!(answer["created"].as_u64().unwrap() > 1_700_000_000);
        answer["created"] = json!(0);
        assert_eq!(
            answer,
            json!({
                "id": "chatcmpl-msg_01",
                "object": "chat.completion",
                "created": 0,
                "model": "my-alias",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Checking now.", "refusal": null, "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                    ]},
                    "logprobs": null,
                    "finish_reason": "tool_calls"
                }],
                "usage": {
                    "prompt_tokens": 18, "completion_tokens": 20, "total_tokens": 38,
                    "prompt_tokens_details": {"cached_tokens": 5},
                    "completion_tokens_details": {"reasoning_tokens": 7}
                },
                "system_fingerprint": null
            })
        );
    }

    #[test]
    fn write_reply_ids_contents_and_finish_reasons() {
        let mut reply = Reply {
            id: "chatcmpl-keep".into(),
            model: String::new(),
            content: vec![Part::ToolCall(ToolCall {
                id: "c".into(),
                name: "f".into(),
                arguments: "{}".into(),
            })],
            stop: StopReason::ToolUse,
            usage: TokenUsage::default(),
        };
        let answer = json_of(&write_reply(&reply, "m"));
        assert_eq!(answer["id"], "chatcmpl-keep");
        assert_eq!(answer["choices"][0]["message"]["content"], Value::Null);
        reply.id = String::new();
        let id = json_of(&write_reply(&reply, "m"))["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(id.starts_with("chatcmpl-") && id.len() == 33, "{id}");
        for (stop, reason) in [
            (StopReason::EndTurn, "stop"),
            (StopReason::StopSequence(Some("END".into())), "stop"),
            (StopReason::MaxTokens, "length"),
            (StopReason::ToolUse, "tool_calls"),
            (StopReason::ContentFilter, "content_filter"),
            (StopReason::Other("pause_turn".into()), "stop"),
        ] {
            reply.stop = stop;
            assert_eq!(
                json_of(&write_reply(&reply, "m"))["choices"][0]["finish_reason"],
                reason
            );
        }
    }

    #[test]
    fn a_reply_round_trips() {
        let body = br#"{"id":"chatcmpl-9","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hi","refusal":null},"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":null}"#;
        let mut written = json_of(&write_reply(
            &parse_reply(body, "openai").unwrap(),
            "gpt-4o",
        ));
        written["created"] = json!(1);
        assert_eq!(written, json_of(body));
    }

    // -- streams -------------------------------------------------------------------------------

    const MAX: usize = 1 << 20;

    /// A chunk as OpenAI streams it to a client that asked for usage.
    fn chunk(delta: Value, finish: Option<&str>) -> String {
        let chunk = json!({
            "id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            "usage": null,
        });
        format!("data: {chunk}\n\n")
    }

    fn usage_chunk() -> String {
        let chunk = json!({
            "id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o",
            "choices": [],
            "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30,
                      "prompt_tokens_details": {"cached_tokens": 5},
                      "completion_tokens_details": {"reasoning_tokens": 0}},
        });
        format!("data: {chunk}\n\n")
    }

    fn args(index: u64, arguments: &str) -> Value {
        json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
    }

    fn call(index: u64, id: &str, name: &str) -> Value {
        json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]})
    }

    /// Text, then two tool calls with arguments in pieces, the usage chunk and `[DONE]`.
    fn tool_stream() -> String {
        [
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"content": "Let me "}), None),
            chunk(json!({"content": "check."}), None),
            chunk(call(0, "call_1", "get_weather"), None),
            chunk(args(0, "{\"ci"), None),
            chunk(args(0, "ty\":\"Par"), None),
            chunk(args(0, "is\"}"), None),
            chunk(call(1, "call_2", "get_time"), None),
            chunk(args(1, "{\"tz\":"), None),
            chunk(args(1, "\"CET\"}"), None),
            chunk(json!({}), Some("tool_calls")),
            usage_chunk(),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat()
    }

    fn read_all(stream: &str, piece: usize) -> (Vec<StreamEvent>, Result<(), ApiError>) {
        let mut reader = OpenAiChunkReader::new("openai", MAX);
        let mut events = Vec::new();
        for bytes in stream.as_bytes().chunks(piece) {
            if let Err(err) = reader.push(bytes, &mut events) {
                return (events, Err(err));
            }
        }
        let result = reader.finish(&mut events);
        (events, result)
    }

    #[test]
    fn the_reader_turns_chunks_into_blocks() {
        let (events, result) = read_all(&tool_stream(), 1 << 16);
        result.unwrap();
        let tool = |id: &str, name: &str| {
            StreamEvent::BlockStart(BlockKind::ToolCall {
                id: id.into(),
                name: name.into(),
            })
        };
        assert_eq!(
            events,
            [
                StreamEvent::Start {
                    id: "chatcmpl-abc".into(),
                    model: "gpt-4o".into(),
                    usage: TokenUsage::default()
                },
                StreamEvent::BlockStart(BlockKind::Text),
                StreamEvent::TextDelta("Let me ".into()),
                StreamEvent::TextDelta("check.".into()),
                StreamEvent::BlockStop,
                tool("call_1", "get_weather"),
                StreamEvent::ArgumentsDelta("{\"ci".into()),
                StreamEvent::ArgumentsDelta("ty\":\"Par".into()),
                StreamEvent::ArgumentsDelta("is\"}".into()),
                StreamEvent::BlockStop,
                tool("call_2", "get_time"),
                StreamEvent::ArgumentsDelta("{\"tz\":".into()),
                StreamEvent::ArgumentsDelta("\"CET\"}".into()),
                StreamEvent::BlockStop,
                StreamEvent::Finish {
                    stop: StopReason::ToolUse,
                    usage: TokenUsage {
                        input: 15,
                        output: 10,
                        cache_read: 5,
                        cache_write: 0,
                        reasoning: 0
                    }
                },
            ]
        );
    }

    fn normalised_events(bytes: &[u8]) -> Vec<Value> {
        std::str::from_utf8(bytes)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let data = e.strip_prefix("data: ").unwrap();
                let mut value = serde_json::from_str(data).unwrap_or_else(|_| json!(data));
                if value.get("created").is_some() {
                    value["created"] = json!(0);
                }
                value
            })
            .collect()
    }

    #[test]
    fn a_stream_through_reader_and_writer_comes_out_as_it_went_in_whatever_the_piece_size() {
        let upstream = tool_stream();
        for piece in [1, 3, 7, upstream.len()] {
            let mut translate = Translate::new(
                OpenAiChunkReader::new("openai", MAX),
                OpenAiChunkWriter::new("gpt-4o", true),
            );
            let mut out = BytesMut::new();
            for bytes in upstream.as_bytes().chunks(piece) {
                translate.push(bytes, &mut out).unwrap();
            }
            assert!(translate.complete(), "complete at [DONE] ({piece})");
            translate.finish(&mut out).unwrap();
            assert_eq!(
                normalised_events(&out),
                normalised_events(upstream.as_bytes()),
                "piece size {piece}"
            );
            let usage = translate.usage().unwrap();
            assert_eq!(
                (
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.total_tokens,
                    usage.cache_read_tokens
                ),
                (20, 10, 30, 5)
            );
        }
    }

    #[test]
    fn without_include_usage_the_writer_sends_no_usage() {
        let mut translate = Translate::new(
            OpenAiChunkReader::new("openai", MAX),
            OpenAiChunkWriter::new("gpt-4o", false),
        );
        let mut out = BytesMut::new();
        translate.push(tool_stream().as_bytes(), &mut out).unwrap();
        let events = normalised_events(&out);
        assert_eq!(events.last().unwrap(), &json!("[DONE]"));
        let finish = &events[events.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        assert!(events.iter().all(|e| e.get("usage").is_none()));
    }

    #[test]
    fn reasoning_content_is_read_and_left_out_of_openai_chunks() {
        let upstream = [
            chunk(
                json!({"role": "assistant", "content": null, "reasoning_content": "think"}),
                None,
            ),
            chunk(json!({"reasoning_content": "ing"}), None),
            chunk(json!({"content": "Hi"}), None),
            chunk(json!({}), Some("stop")),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat();
        let (events, result) = read_all(&upstream, 5);
        result.unwrap();
        assert_eq!(
            events[1..6],
            [
                StreamEvent::BlockStart(BlockKind::Reasoning),
                StreamEvent::ReasoningDelta("think".into()),
                StreamEvent::ReasoningDelta("ing".into()),
                StreamEvent::BlockStop,
                StreamEvent::BlockStart(BlockKind::Text),
            ]
        );
        let mut writer = OpenAiChunkWriter::new("m", false);
        let mut out = BytesMut::new();
        for event in &events {
            writer.write(event, &mut out);
        }
        let chunks = normalised_events(&out);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c.get("choices"))
            .map(|c| &c[0]["delta"])
            .collect();
        assert_eq!(
            deltas,
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Hi"}),
                &json!({})
            ]
        );
    }

    #[test]
    fn a_stream_without_done_ends_well_after_a_finish_reason_only() {
        let upstream = [
            chunk(json!({"content": "Hi"}), None),
            chunk(json!({}), Some("length")),
        ]
        .concat();
        let (events, result) = read_all(&upstream, 4);
        result.unwrap();
        assert_eq!(
            events.last().unwrap(),
            &StreamEvent::Finish {
                stop: StopReason::MaxTokens,
                usage: TokenUsage::default()
            }
        );
        assert_eq!(events[events.len() - 2], StreamEvent::BlockStop);
        // Without the final blank line too.
        let upstream = upstream.trim_end();
        let (_, result) = read_all(upstream, 4);
        result.unwrap();
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let upstream = [
            chunk(json!({"role":"assistant","content":""}), None),
            chunk(json!({"content": "Once"}), None),
        ]
        .concat();
        let mut translate = Translate::new(
            OpenAiChunkReader::new("openai", MAX),
            OpenAiChunkWriter::new("gpt-4o", true),
        );
        let mut out = BytesMut::new();
        translate.push(upstream.as_bytes(), &mut out).unwrap();
        let err = translate.finish(&mut out).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_GATEWAY);
        assert!(err.message.contains("[DONE]"), "{}", err.message);
        assert!(!translate.complete());
        let mut tail = BytesMut::new();
        translate.write_error(&err, &mut tail);
        assert_eq!(tail, format!("data: {}\n\n", err.body_json()).as_bytes());
        let (_, result) = read_all("", 1);
        assert!(result.is_err());
        let (_, result) = read_all("data: [DONE]\n\n", 1);
        assert!(result.unwrap_err().message.contains("first chunk"));
    }

    #[test]
    fn error_events_become_errors_with_their_message() {
        for (error, status) in [
            (
                r#"{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}"#,
                429,
            ),
            (
                r#"{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}"#,
                429,
            ),
            (
                r#"{"message":"The server is overloaded","type":"server_error","code":"overloaded"}"#,
                503,
            ),
            (
                r#"{"message":"boom","type":"server_error","code":null}"#,
                502,
            ),
            (r#""plain text""#, 502),
        ] {
            let upstream = format!(
                "{}data: {{\"error\":{error}}}\n\n",
                chunk(json!({"content": "a"}), None)
            );
            let (events, result) = read_all(&upstream, 3);
            let err = result.unwrap_err();
            assert_eq!(err.status.as_u16(), status, "{error}");
            assert!(
                err.message
                    .starts_with("upstream openai failed during the stream: "),
                "{}",
                err.message
            );
            let expected = serde_json::from_str::<Value>(error).unwrap();
            let message = expected
                .get("message")
                .and_then(Value::as_str)
                .or(expected.as_str())
                .unwrap();
            assert!(err.message.ends_with(message), "{}", err.message);
            assert_eq!(events.len(), 3, "what came before the error stays");
        }
    }

    #[test]
    fn interleaved_or_nameless_tool_calls_are_bad_answers() {
        let upstream = [
            chunk(call(0, "a", "f"), None),
            chunk(call(1, "b", "g"), None),
            chunk(args(0, "{}"), None),
        ]
        .concat();
        let err = read_all(&upstream, 100).1.unwrap_err();
        assert!(err.message.contains("tool call 0"), "{}", err.message);
        let err = read_all(&chunk(args(0, "{}"), None), 100).1.unwrap_err();
        assert!(
            err.message.contains("without a function name"),
            "{}",
            err.message
        );
    }

    #[test]
    fn tool_fragments_without_index_or_id_are_accepted() {
        let upstream = [
            chunk(json!({"tool_calls": [{"function": {"name": "f", "arguments": "{\"a\":"}}]}), None),
            chunk(json!({"tool_calls": [{"function": {"arguments": "1}"}}]}), None),
            chunk(json!({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "{}"}}]}), None),
            // An upstream repeating the id and name on every fragment.
            chunk(json!({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]}), None),
            chunk(json!({}), Some("stop")),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat();
        let (events, result) = read_all(&upstream, 2);
        result.unwrap();
        let starts: Vec<&StreamEvent> = events
            .iter()
            .filter(|e| matches!(e, StreamEvent::BlockStart(_)))
            .collect();
        assert_eq!(starts.len(), 2);
        assert!(
            matches!(starts[0], StreamEvent::BlockStart(BlockKind::ToolCall { id, name }) if id.starts_with("call_") && name == "f")
        );
        assert!(events.contains(&StreamEvent::ArgumentsDelta("1}".into())));
        assert!(matches!(
            events.last(),
            Some(StreamEvent::Finish {
                stop: StopReason::ToolUse,
                ..
            })
        ));
    }

    #[test]
    fn oversized_events_and_garbage_are_refused() {
        let mut reader = OpenAiChunkReader::new("openai", 100);
        let err = reader.push(&[b'a'; 101], &mut Vec::new()).unwrap_err();
        assert!(
            err.message.contains("100 bytes (--max-stream-event-bytes)"),
            "{}",
            err.message
        );
        let err = read_all("data: {not json\n\n", 100).1.unwrap_err();
        assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
        let err = read_all("data: {\"choices\":3}\n\n", 100).1.unwrap_err();
        assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
        // Comments and events after [DONE] are ignored.
        let (events, result) = read_all(
            &format!(
                ": keep-alive\n\n{}data: [DONE]\n\ndata: junk\n\n",
                chunk(json!({"content":"x"}), Some("stop"))
            ),
            9,
        );
        result.unwrap();
        assert!(matches!(
            events.last(),
            Some(StreamEvent::Finish {
                stop: StopReason::EndTurn,
                ..
            })
        ));
    }

    #[test]
    fn the_writer_numbers_tool_calls_and_opens_even_without_start() {
        let mut writer = OpenAiChunkWriter::new("alias", false);
        let mut out = BytesMut::new();
        for event in [
            StreamEvent::BlockStart(BlockKind::ToolCall {
                id: "t1".into(),
                name: "f".into(),
            }),
            StreamEvent::ArgumentsDelta("{}".into()),
            StreamEvent::BlockStop,
            StreamEvent::BlockStart(BlockKind::RedactedReasoning { data: "x".into() }),
            StreamEvent::BlockStop,
            StreamEvent::BlockStart(BlockKind::ToolCall {
                id: "t2".into(),
                name: "g".into(),
            }),
            StreamEvent::SignatureDelta("sig".into()),
            StreamEvent::BlockStop,
            StreamEvent::ArgumentsDelta("stray".into()),
            StreamEvent::Finish {
                stop: StopReason::ToolUse,
                usage: TokenUsage::default(),
            },
        ] {
            writer.write(&event, &mut out);
        }
        let chunks = normalised_events(&out);
        assert!(chunks[0]["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(chunks[0]["model"], "alias");
        let deltas: Vec<Value> = chunks[..chunks.len() - 1]
            .iter()
            .map(|c| c["choices"][0]["delta"].clone())
            .collect();
        assert_eq!(
            deltas,
            [
                json!({"role": "assistant", "content": ""}),
                call(0, "t1", "f"),
                args(0, "{}"),
                call(1, "t2", "g"),
                json!({}),
            ]
        );
        assert_eq!(chunks.last().unwrap(), &json!("[DONE]"));
    }
}
