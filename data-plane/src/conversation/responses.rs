//! The OpenAI Responses dialect (`POST /v1/responses`, what the Codex CLI speaks; DESIGN §17),
//! for upstreams that do not speak it: requests are read into the conversation model, answers and
//! streamed events are written back as Responses objects and events. A Responses request for an
//! OpenAI or Azure upstream is passed through instead.
//!
//! # Reading a request ([`parse_request`])
//!
//! Mapped: `model`; `instructions` → the first system block; `input` as a string (one user
//! message) or a list of items:
//! - messages (`type: "message"` or no `type`) of role `user`, `assistant`, `system` or
//!   `developer`, their content a string or parts: `input_text`, `output_text` and `refusal` as
//!   text; `input_image` as an inline image (a base64 data URL) or a linked one (any other URL);
//! - `system`/`developer` messages before the first turn (Codex sends two) join the system prompt
//!   after `instructions`; later ones stay in place as system turns;
//! - `function_call` → a tool call of the assistant, `function_call_output` (a string, or
//!   `input_text`/`input_image` parts) → a tool result of the user; consecutive calls share one
//!   assistant turn, consecutive outputs one user turn, and an assistant turn's reasoning, text
//!   and calls stay together;
//! - `reasoning` → reasoning with `encrypted_content` as its signature: its `content`
//!   (`reasoning_text`) when present, else its summary texts joined by a blank line; an item with
//!   neither and only `encrypted_content` → redacted reasoning (the answers this module writes
//!   give Claude's `thinking` one summary part, even when empty, and `redacted_thinking` none, so
//!   both come back as they went out). Reasoning without `encrypted_content` comes back unsigned,
//!   which writers for targets that verify signatures drop (Claude refuses unsigned thinking);
//!   an `encrypted_content` written by OpenAI cannot be told from a Claude signature, and is
//!   passed on as one.
//!
//! `tools`: `function` tools (their `strict` dropped: no target but OpenAI enforces it);
//! `tool_choice` `auto`, `none`, `required`, `{"type":"function","name"}`, and `allowed_tools`
//! (the offered list is narrowed to the allowed functions, which means the same to the model);
//! `parallel_tool_calls`; `max_output_tokens`; `temperature`; `top_p`; `stream`;
//! `reasoning.effort` (`none` → no reasoning; without an effort the target's default applies);
//! `text.format` `json_schema` → the model's JSON schema (`text` is the default).
//!
//! Refused with a 400 naming the field, because dropping it would change the answer:
//! - state the upstream does not keep: `previous_response_id`, `conversation`, `item_reference`
//!   items (code `unsupported_parameter`: send the whole conversation in `input`), `prompt`
//!   (stored prompts), `background: true`;
//! - `input_file` parts, `input_image` by `file_id`, `text.format: json_object` (no target without
//!   the Responses API enforces bare JSON mode; use `json_schema`);
//! - items of hosted or custom tools in the history (`web_search_call`, `custom_tool_call`,
//!   `local_shell_call`, `compaction`...) and unknown item types;
//! - a `tool_choice` that forces a hosted tool (`{"type":"web_search"}`...), forces a call when
//!   only hosted tools are offered, or allows tools that are not offered functions.
//!
//! Dropped, as hints and metadata that do not change the answer: `store` (answers say `false`),
//! `include`, `metadata`, `client_metadata`, `prompt_cache_key`, `safety_identifier`, `user`,
//! `service_tier`, `truncation`, `stream_options`, `top_logprobs`, `max_tool_calls`,
//! `reasoning.summary`, `text.verbosity`, an image's `detail`, message and item `id`s and
//! `status`es, and any other top-level member this module does not know (new options appear with
//! every Codex release, which sends them on every request). Hosted and custom tools (`web_search`,
//! `file_search`, `code_interpreter`, `computer_use_preview`, `image_generation`, `mcp`,
//! `local_shell`, `custom`, and `namespace` entries holding nested tools, as Codex sends them) are
//! removed from the offered list: the target cannot run them.
//!
//! # Writing answers ([`write_reply`], [`ResponsesEventWriter`])
//!
//! A `response` object with `"store": false`: reasoning as a `reasoning` item (its text as one
//! summary part, its signature, or a redacted block's data, as `encrypted_content`), text as a
//! `message` item with one `output_text` part, tool calls as `function_call` items (`call_id`: the
//! model's call id). `status` is `completed`, or `incomplete` with `incomplete_details.reason`
//! `max_output_tokens` / `content_filter`. `usage` is always complete, `output_tokens_details`
//! included (DESIGN §17; peers report clients that refuse a `response.completed` without it).
//! Request settings the answer cannot know are written as the API's defaults (`tool_choice: "auto"`, `tools: []`). Item ids derive
//! from the response id (`msg_…`, `rs_…`, `fc_…`), and the response id from the upstream's
//! ([`response_id`]).

use super::{
    BlockKind, EventWriter, Image, JsonSchema, Message, Part, Reasoning, Reply, Request, Role,
    StopReason, StreamEvent, TextBlock, TokenUsage, Tool, ToolCall, ToolChoice, ToolResult,
};
use crate::body::{ParsedRequest, RawObject};
use crate::errors::ApiError;
use crate::providers::openai_request::{get, parse_as, split_data_url};
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::fmt::Display;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn invalid(field: &str, what: impl Display) -> ApiError {
    ApiError::invalid_request(format!("`{field}`: {what}")).with_param(field)
}

fn required(field: &str) -> ApiError {
    invalid(field, "is required")
}

/// A valid Responses field that a translated upstream cannot carry.
fn cannot_cross(field: &str, what: impl Display) -> ApiError {
    ApiError::invalid_request(format!(
        "`{field}`: {what}, which the gateway cannot translate for this model (its upstream does not speak the Responses API)"
    ))
    .with_param(field)
    .with_code("unsupported_parameter")
}

/// A field that needs state stored by the upstream, which a translated upstream does not keep.
fn stateless(field: &str) -> ApiError {
    ApiError::invalid_request(format!(
        "`{field}` is not supported for this model: its upstream keeps no conversation state; send the whole conversation in `input` (with `store: false`)"
    ))
    .with_param(field)
    .with_code("unsupported_parameter")
}

fn is_null(raw: &RawValue) -> bool {
    raw.get().trim() == "null"
}

// ---------------------------------------------------------------------------------------------
// Wire types, read
// ---------------------------------------------------------------------------------------------

/// Any input item, flat: which members matter depends on `type`; others are ignored.
#[derive(Deserialize)]
struct WireItem {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<Box<RawValue>>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default)]
    output: Option<Box<RawValue>>,
    #[serde(default)]
    summary: Option<Vec<WireText>>,
    #[serde(default)]
    encrypted_content: Option<String>,
}

/// A content part, flat.
#[derive(Deserialize)]
struct WirePart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    image_url: Option<String>,
    #[serde(default)]
    file_id: Option<String>,
}

/// A summary or reasoning content part (`summary_text`, `reasoning_text`).
#[derive(Deserialize)]
struct WireText {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct WireTool {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    tools: Option<Vec<WireTool>>,
}

#[derive(Deserialize)]
struct WireReasoning {
    #[serde(default)]
    effort: Option<String>,
}

#[derive(Deserialize)]
struct WireTextConfig {
    #[serde(default)]
    format: Option<WireFormat>,
}

#[derive(Deserialize)]
struct WireFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    schema: Option<Box<RawValue>>,
    #[serde(default)]
    strict: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// parse_request
// ---------------------------------------------------------------------------------------------

/// A Responses request read into the model, for a translated (stateless) upstream. The fields
/// mapped, refused and dropped are listed in the module doc.
pub fn parse_request(request: &ParsedRequest<'_>) -> Result<Request, ApiError> {
    let object = &request.object;
    refuse_state(object)?;
    let model = request
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| required("model"))?;

    let mut system = Vec::new();
    if let Some(instructions) = get::<String>(object, "instructions")?
        && !instructions.is_empty()
    {
        system.push(text_block(instructions));
    }
    let raw_input = object
        .get("input")
        .filter(|raw| !is_null(raw))
        .ok_or_else(|| required("input"))?;
    let messages = if raw_input.get().trim_start().starts_with('"') {
        let text: String = parse_as(raw_input, "input")?;
        vec![Message {
            role: Role::User,
            content: vec![Part::Text(text_block(text))],
        }]
    } else {
        let items: Vec<Box<RawValue>> = parse_as(raw_input, "input")?;
        conversation(&items, &mut system)?
    };
    if messages.is_empty() {
        return Err(invalid(
            "input",
            "must contain at least one user or assistant item",
        ));
    }

    let (mut tools, hosted) = parse_tools(object)?;
    let tool_choice = parse_tool_choice(object, &mut tools, &hosted)?;

    let reasoning = match get::<WireReasoning>(object, "reasoning")? {
        Some(WireReasoning {
            effort: Some(effort),
        }) if effort != "none" => Some(Reasoning {
            budget_tokens: None,
            effort: Some(effort),
        }),
        _ => None,
    };

    Ok(Request {
        model,
        system,
        messages,
        tools,
        tool_choice,
        parallel_tool_calls: get(object, "parallel_tool_calls")?,
        max_tokens: get(object, "max_output_tokens")?,
        temperature: get(object, "temperature")?,
        top_p: get(object, "top_p")?,
        top_k: None,
        stop_sequences: Vec::new(),
        stream: request.stream,
        reasoning,
        json_schema: parse_text_format(object)?,
    })
}

fn text_block(text: String) -> TextBlock {
    TextBlock {
        text,
        cache_control: None,
    }
}

/// Refuses what needs stored state or features a translated upstream lacks (module doc).
fn refuse_state(object: &RawObject<'_>) -> Result<(), ApiError> {
    for field in ["previous_response_id", "conversation"] {
        if object.get(field).is_some_and(|raw| !is_null(raw)) {
            return Err(stateless(field));
        }
    }
    if get::<bool>(object, "background")?.unwrap_or(false) {
        return Err(cannot_cross(
            "background",
            "background responses are stored and polled",
        ));
    }
    if object.get("prompt").is_some_and(|raw| !is_null(raw)) {
        return Err(cannot_cross(
            "prompt",
            "a stored prompt template is referenced; send its text in `instructions` and `input`",
        ));
    }
    Ok(())
}

/// Appends `part` to the open assistant turn, or opens one.
fn push_assistant(messages: &mut Vec<Message>, part: Part) {
    match messages.last_mut() {
        Some(last) if last.role == Role::Assistant => last.content.push(part),
        _ => messages.push(Message {
            role: Role::Assistant,
            content: vec![part],
        }),
    }
}

/// The model's messages from `input` items; leading system/developer messages join `system`.
fn conversation(
    items: &[Box<RawValue>],
    system: &mut Vec<TextBlock>,
) -> Result<Vec<Message>, ApiError> {
    let mut messages: Vec<Message> = Vec::with_capacity(items.len());
    // True while the last message holds only tool results, so that the next output joins it.
    let mut in_tool_results = false;
    for (i, raw) in items.iter().enumerate() {
        let field = format!("input[{i}]");
        let item: WireItem = parse_as(raw, &field)?;
        let mut tool_result = false;
        match item.kind.as_deref().unwrap_or("message") {
            "message" => {
                let role = item
                    .role
                    .as_deref()
                    .ok_or_else(|| required(&format!("{field}.role")))?;
                let content_field = format!("{field}.content");
                match role {
                    "system" | "developer" => {
                        let blocks = system_text(item.content.as_deref(), &content_field, role)?;
                        if messages.is_empty() {
                            system.extend(blocks);
                        } else if !blocks.is_empty() {
                            messages.push(Message {
                                role: Role::System,
                                content: blocks.into_iter().map(Part::Text).collect(),
                            });
                        }
                    }
                    "user" => {
                        let content =
                            message_parts(item.content.as_deref(), &content_field, Role::User)?;
                        if !content.is_empty() {
                            messages.push(Message {
                                role: Role::User,
                                content,
                            });
                        }
                    }
                    "assistant" => {
                        for part in
                            message_parts(item.content.as_deref(), &content_field, Role::Assistant)?
                        {
                            push_assistant(&mut messages, part);
                        }
                    }
                    other => {
                        return Err(invalid(
                            &format!("{field}.role"),
                            format!("must be user, assistant, system or developer, got `{other}`"),
                        ));
                    }
                }
            }
            "function_call" => {
                let call_id = item
                    .call_id
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| required(&format!("{field}.call_id")))?;
                let name = item
                    .name
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| required(&format!("{field}.name")))?;
                let arguments = match item.arguments {
                    Some(a) if !a.trim().is_empty() => a,
                    _ => "{}".to_owned(),
                };
                // Targets such as Anthropic take the arguments as an object.
                if !serde_json::from_str::<Value>(&arguments).is_ok_and(|v| v.is_object()) {
                    return Err(invalid(
                        &format!("{field}.arguments"),
                        "must be a JSON object encoded as a string",
                    ));
                }
                push_assistant(
                    &mut messages,
                    Part::ToolCall(ToolCall {
                        id: call_id,
                        name,
                        arguments,
                    }),
                );
            }
            "function_call_output" => {
                let call_id = item
                    .call_id
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| required(&format!("{field}.call_id")))?;
                let output_field = format!("{field}.output");
                let output = item
                    .output
                    .as_deref()
                    .filter(|raw| !is_null(raw))
                    .ok_or_else(|| required(&output_field))?;
                let part = Part::ToolResult(ToolResult {
                    call_id,
                    content: message_parts(Some(output), &output_field, Role::User)?,
                    is_error: false,
                });
                match messages.last_mut() {
                    Some(last) if in_tool_results => last.content.push(part),
                    _ => messages.push(Message {
                        role: Role::User,
                        content: vec![part],
                    }),
                }
                tool_result = true;
            }
            "reasoning" => {
                if let Some(part) = reasoning_part(item, &field)? {
                    push_assistant(&mut messages, part);
                }
            }
            "item_reference" => return Err(stateless(&field)),
            other @ ("web_search_call"
            | "file_search_call"
            | "computer_call"
            | "computer_call_output"
            | "code_interpreter_call"
            | "image_generation_call"
            | "local_shell_call"
            | "local_shell_call_output"
            | "shell_call"
            | "shell_call_output"
            | "apply_patch_call"
            | "apply_patch_call_output"
            | "mcp_call"
            | "mcp_list_tools"
            | "mcp_approval_request"
            | "mcp_approval_response"
            | "custom_tool_call"
            | "custom_tool_call_output"
            | "compaction") => {
                return Err(cannot_cross(
                    &format!("{field}.type"),
                    format!(
                        "the conversation holds a `{other}` item (a hosted or custom tool's, or compacted history)"
                    ),
                ));
            }
            other => {
                return Err(invalid(
                    &format!("{field}.type"),
                    format!("unknown input item type `{other}`"),
                ));
            }
        }
        in_tool_results = tool_result;
    }
    Ok(messages)
}

/// A reasoning item as a model part; `None` when it carries nothing.
fn reasoning_part(item: WireItem, field: &str) -> Result<Option<Part>, ApiError> {
    let content: Vec<WireText> = match item.content.as_deref().filter(|raw| !is_null(raw)) {
        Some(raw) => parse_as(raw, &format!("{field}.content"))?,
        None => Vec::new(),
    };
    let summary = item.summary.unwrap_or_default();
    let signature = item.encrypted_content.filter(|s| !s.is_empty());
    let texts: Vec<&str> = if content.is_empty() {
        summary.iter().map(|s| s.text.as_str()).collect()
    } else {
        content
            .iter()
            .filter(|c| matches!(c.kind.as_deref(), None | Some("reasoning_text" | "text")))
            .map(|c| c.text.as_str())
            .collect()
    };
    Ok(match (texts.is_empty() && content.is_empty(), signature) {
        (true, Some(data)) => Some(Part::RedactedReasoning { data }),
        (true, None) => None,
        (false, signature) => Some(Part::Reasoning {
            text: texts.join("\n\n"),
            signature,
        }),
    })
}

/// A message's (or tool output's) content: a string, or parts. `role` decides which parts may
/// stand there: images in user turns and tool outputs only.
fn message_parts(raw: Option<&RawValue>, field: &str, role: Role) -> Result<Vec<Part>, ApiError> {
    let Some(raw) = raw.filter(|raw| !is_null(raw)) else {
        return Ok(Vec::new());
    };
    if raw.get().trim_start().starts_with('"') {
        let text: String = parse_as(raw, field)?;
        return Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![Part::Text(text_block(text))]
        });
    }
    let parts: Vec<WirePart> = parse_as(raw, field)?;
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.into_iter().enumerate() {
        let part_field = format!("{field}[{j}]");
        match part.kind.as_str() {
            "input_text" | "output_text" | "text" => {
                let text = part
                    .text
                    .ok_or_else(|| required(&format!("{part_field}.text")))?;
                if !text.is_empty() {
                    out.push(Part::Text(text_block(text)));
                }
            }
            "refusal" => {
                let text = part
                    .refusal
                    .ok_or_else(|| required(&format!("{part_field}.refusal")))?;
                if !text.is_empty() {
                    out.push(Part::Text(text_block(text)));
                }
            }
            "input_image" if role == Role::User => {
                out.push(Part::Image(image(part, &part_field)?));
            }
            "input_image" => {
                return Err(invalid(
                    &part_field,
                    "images belong to user messages and tool outputs",
                ));
            }
            "input_file" => {
                return Err(cannot_cross(
                    &part_field,
                    "file inputs are sent; send text or images",
                ));
            }
            other => {
                return Err(invalid(
                    &format!("{part_field}.type"),
                    format!("unknown content part type `{other}`"),
                ));
            }
        }
    }
    Ok(out)
}

fn image(part: WirePart, field: &str) -> Result<Image, ApiError> {
    let url_field = format!("{field}.image_url");
    let Some(url) = part.image_url.filter(|u| !u.is_empty()) else {
        if part.file_id.is_some() {
            return Err(cannot_cross(
                &format!("{field}.file_id"),
                "an uploaded file is referenced; send the image as a data URL or an https URL",
            ));
        }
        return Err(required(&url_field));
    };
    if url.starts_with("data:") {
        let (media_type, data) = split_data_url(&url).ok_or_else(|| {
            invalid(
                &url_field,
                "a data URL must be base64 (data:image/png;base64,...)",
            )
        })?;
        return Ok(Image::Base64 {
            media_type: media_type.to_owned(),
            data: data.to_owned(),
        });
    }
    Ok(Image::Url(url))
}

/// A system or developer message's text blocks (text parts only).
fn system_text(
    raw: Option<&RawValue>,
    field: &str,
    role: &str,
) -> Result<Vec<TextBlock>, ApiError> {
    message_parts(raw, field, Role::System)?
        .into_iter()
        .map(|part| match part {
            Part::Text(block) => Ok(block),
            _ => Err(invalid(
                field,
                format!("only text parts are allowed in a {role} message"),
            )),
        })
        .collect()
}

/// The function tools offered, and the names (or types) of the hosted tools removed.
fn parse_tools(object: &RawObject<'_>) -> Result<(Vec<Tool>, Vec<String>), ApiError> {
    let raw: Vec<Box<RawValue>> = get(object, "tools")?.unwrap_or_default();
    let mut tools = Vec::with_capacity(raw.len());
    let mut hosted = Vec::new();
    for (i, raw) in raw.iter().enumerate() {
        let field = format!("tools[{i}]");
        let tool: WireTool = parse_as(raw, &field)?;
        if tool.kind != "function" {
            hosted.push(tool.name.unwrap_or(tool.kind));
            continue;
        }
        let name = tool
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| required(&format!("{field}.name")))?;
        tools.push(Tool {
            name,
            description: tool.description,
            parameters: tool
                .parameters
                .filter(|p| !is_null(p))
                .unwrap_or_else(empty_object_schema),
            cache_control: None,
        });
    }
    Ok((tools, hosted))
}

/// The empty object schema, for tools that declare no parameters.
fn empty_object_schema() -> Box<RawValue> {
    RawValue::from_string(r#"{"type":"object","properties":{}}"#.to_owned())
        .unwrap_or_else(|_| Box::<RawValue>::default())
}

/// `tool_choice`; narrows `tools` for `allowed_tools`.
fn parse_tool_choice(
    object: &RawObject<'_>,
    tools: &mut Vec<Tool>,
    hosted: &[String],
) -> Result<Option<ToolChoice>, ApiError> {
    let Some(raw) = object.get("tool_choice").filter(|raw| !is_null(raw)) else {
        return Ok(None);
    };
    let forced_without_functions = |tools: &[Tool]| {
        if tools.is_empty() && !hosted.is_empty() {
            Err(cannot_cross(
                "tool_choice",
                "it forces a tool call but only hosted tools are offered",
            ))
        } else {
            Ok(())
        }
    };
    let choice = if raw.get().trim_start().starts_with('"') {
        match parse_as::<String>(raw, "tool_choice")?.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => {
                forced_without_functions(tools)?;
                ToolChoice::Any
            }
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!("must be auto, none, required or an object, got `{other}`"),
                ));
            }
        }
    } else {
        let choice: WireToolChoice = parse_as(raw, "tool_choice")?;
        match choice.kind.as_str() {
            "function" => {
                let name = choice
                    .name
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| required("tool_choice.name"))?;
                if !tools.iter().any(|t| t.name == name) {
                    return Err(if hosted.contains(&name) {
                        cannot_cross("tool_choice", format!("it forces the hosted tool `{name}`"))
                    } else {
                        invalid(
                            "tool_choice.name",
                            format!("names no function in `tools`: `{name}`"),
                        )
                    });
                }
                ToolChoice::Tool(name)
            }
            "allowed_tools" => {
                let allowed = choice.tools.unwrap_or_default();
                let mut names = Vec::with_capacity(allowed.len());
                for tool in allowed {
                    let name = tool.name.unwrap_or_default();
                    if tool.kind != "function" || !tools.iter().any(|t| t.name == name) {
                        let what = if tool.kind == "function" {
                            format!("`{name}`")
                        } else {
                            format!("the hosted tool `{}`", tool.kind)
                        };
                        return Err(cannot_cross(
                            "tool_choice",
                            format!("it allows {what}, which is not an offered function"),
                        ));
                    }
                    names.push(name);
                }
                // Only the allowed functions are offered: the same choice for the model.
                tools.retain(|t| names.contains(&t.name));
                match choice.mode.as_deref().unwrap_or("auto") {
                    "auto" => ToolChoice::Auto,
                    "required" => {
                        if tools.is_empty() {
                            return Err(invalid(
                                "tool_choice.tools",
                                "must list at least one tool when `mode` is required",
                            ));
                        }
                        ToolChoice::Any
                    }
                    other => {
                        return Err(invalid(
                            "tool_choice.mode",
                            format!("must be auto or required, got `{other}`"),
                        ));
                    }
                }
            }
            other => {
                return Err(cannot_cross(
                    "tool_choice",
                    format!("it forces the hosted tool `{other}`"),
                ));
            }
        }
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Auto | ToolChoice::None) {
        // Nothing left to choose from (only hosted tools were offered): targets refuse a choice
        // without tools.
        return Ok(None);
    }
    Ok(Some(choice))
}

fn parse_text_format(object: &RawObject<'_>) -> Result<Option<JsonSchema>, ApiError> {
    let Some(format) = get::<WireTextConfig>(object, "text")?.and_then(|t| t.format) else {
        return Ok(None);
    };
    match format.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Err(cannot_cross(
            "text.format",
            "JSON mode without a schema is requested; use `json_schema` with a schema",
        )),
        "json_schema" => Ok(Some(JsonSchema {
            name: format
                .name
                .filter(|n| !n.is_empty())
                .ok_or_else(|| required("text.format.name"))?,
            schema: format
                .schema
                .filter(|s| !is_null(s))
                .ok_or_else(|| required("text.format.schema"))?,
            strict: format.strict,
        })),
        other => Err(invalid(
            "text.format.type",
            format!("must be text, json_schema or json_object, got `{other}`"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------------

fn random_suffix() -> String {
    use rand::distr::{Alphanumeric, SampleString as _};
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

/// The id a translated answer gets from the upstream's id: kept when it is a response id,
/// prefixed with `resp_` otherwise (so that it can be traced back to the upstream's), generated
/// when the upstream gave none.
pub fn response_id(upstream_id: &str) -> String {
    if upstream_id.starts_with("resp_") {
        upstream_id.to_owned()
    } else if upstream_id.is_empty() {
        format!("resp_{}", random_suffix())
    } else {
        format!("resp_{upstream_id}")
    }
}

/// The id of output item `index` of response `response_id` (`msg_…`, `rs_…`, `fc_…`): unique
/// per answer, and the same in the stream's events and its final response.
fn item_id(prefix: &str, response_id: &str, index: usize) -> String {
    let base = response_id.strip_prefix("resp_").unwrap_or(response_id);
    format!("{prefix}_{base}_{index}")
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage_json(usage: &TokenUsage) -> Value {
    let input = usage.prompt_total();
    json!({
        "input_tokens": input,
        "input_tokens_details": { "cached_tokens": usage.cache_read },
        "output_tokens": usage.output,
        "output_tokens_details": { "reasoning_tokens": usage.reasoning },
        "total_tokens": input.saturating_add(usage.output),
    })
}

/// An output item as the stream and the final response carry it.
#[derive(Debug)]
enum Item {
    Message {
        text: String,
    },
    Reasoning {
        text: String,
        signature: String,
    },
    Redacted {
        data: String,
    },
    Call {
        call_id: String,
        name: String,
        arguments: String,
    },
}

impl Item {
    fn prefix(&self) -> &'static str {
        match self {
            Item::Message { .. } => "msg",
            Item::Reasoning { .. } | Item::Redacted { .. } => "rs",
            Item::Call { .. } => "fc",
        }
    }

    /// The item as JSON; `done`: finished (`completed`), else as it opens (`in_progress`, empty).
    fn json(&self, id: &str, done: bool) -> Value {
        let status = if done { "completed" } else { "in_progress" };
        match self {
            Item::Message { text } => {
                let content = if done {
                    json!([output_text(text)])
                } else {
                    json!([])
                };
                json!({
                    "id": id,
                    "type": "message",
                    "status": status,
                    "role": "assistant",
                    "content": content,
                })
            }
            Item::Reasoning { text, signature } => {
                let summary = if done {
                    json!([{ "type": "summary_text", "text": text }])
                } else {
                    json!([])
                };
                let mut item = json!({ "id": id, "type": "reasoning", "summary": summary });
                if done && !signature.is_empty() {
                    item["encrypted_content"] = json!(signature);
                }
                item
            }
            Item::Redacted { data } => json!({
                "id": id,
                "type": "reasoning",
                "summary": [],
                "encrypted_content": data,
            }),
            Item::Call {
                call_id,
                name,
                arguments,
            } => json!({
                "id": id,
                "type": "function_call",
                "status": status,
                "call_id": call_id,
                "name": name,
                "arguments": if done { arguments.as_str() } else { "" },
            }),
        }
    }
}

fn output_text(text: &str) -> Value {
    json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] })
}

/// How a response ended: `status`, `incomplete_details`, `error`.
struct Outcome {
    status: &'static str,
    incomplete_details: Value,
    error: Value,
}

impl Outcome {
    fn in_progress() -> Outcome {
        Outcome {
            status: "in_progress",
            incomplete_details: Value::Null,
            error: Value::Null,
        }
    }

    /// `completed`, or `incomplete` with the reason, for a stop reason.
    fn of(stop: &StopReason) -> Outcome {
        let (status, incomplete_details) = match stop {
            StopReason::MaxTokens => ("incomplete", json!({ "reason": "max_output_tokens" })),
            StopReason::ContentFilter => ("incomplete", json!({ "reason": "content_filter" })),
            _ => ("completed", Value::Null),
        };
        Outcome {
            status,
            incomplete_details,
            error: Value::Null,
        }
    }
}

/// The `response` object with its (finished) output items and usage. Request settings the
/// answer cannot know are the API's defaults.
fn response_json(
    id: &str,
    created_at: u64,
    model: &str,
    outcome: Outcome,
    output: Vec<Value>,
    usage: &TokenUsage,
) -> Value {
    json!({
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": outcome.status,
        "background": false,
        "error": outcome.error,
        "incomplete_details": outcome.incomplete_details,
        "instructions": null,
        "max_output_tokens": null,
        "max_tool_calls": null,
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": { "effort": null, "summary": null },
        "service_tier": "default",
        "store": false,
        "temperature": null,
        "text": { "format": { "type": "text" } },
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": null,
        "truncation": "disabled",
        "usage": usage_json(usage),
        "user": null,
    })
}

/// A whole answer as a Responses API `response` object (`"store": false`). `model`: the name to
/// report (the upstream's remote model name, as the other writers do).
pub fn write_reply(reply: &Reply, model: &str) -> Vec<u8> {
    let id = response_id(&reply.id);
    let mut output = Vec::with_capacity(reply.content.len());
    // Text parts of one turn (split around tool calls or citations) are one stream of text.
    let mut text: Option<String> = None;
    let flush = |text: &mut Option<String>, output: &mut Vec<Value>| {
        if let Some(text) = text.take() {
            let index = output.len();
            let item = Item::Message { text };
            output.push(item.json(&item_id(item.prefix(), &id, index), true));
        }
    };
    for part in &reply.content {
        let item = match part {
            Part::Text(block) => {
                text.get_or_insert_with(String::new).push_str(&block.text);
                continue;
            }
            Part::Reasoning { text, signature } => Item::Reasoning {
                text: text.clone(),
                signature: signature.clone().unwrap_or_default(),
            },
            Part::RedactedReasoning { data } => Item::Redacted { data: data.clone() },
            Part::ToolCall(call) => Item::Call {
                call_id: call.id.clone(),
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            },
            // Not something a model answers with.
            Part::Image(_) | Part::ToolResult(_) => continue,
        };
        flush(&mut text, &mut output);
        let index = output.len();
        output.push(item.json(&item_id(item.prefix(), &id, index), true));
    }
    flush(&mut text, &mut output);
    let out = response_json(
        &id,
        now_unix(),
        model,
        Outcome::of(&reply.stop),
        output,
        &reply.usage,
    );
    // Serialising a Value into a Vec cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Stream writer
// ---------------------------------------------------------------------------------------------

/// Writes model events as a Responses API stream (`event: <type>\ndata: <json>\n\n`, each event
/// with a `sequence_number` counting from 0), naming `model`. The items are kept until the end,
/// since `response.completed` carries them all: memory is bounded by what the stream carried.
/// Tolerant of readers that skip `BlockStart` or `BlockStop`.
#[derive(Debug)]
pub struct ResponsesEventWriter {
    model: String,
    id: String,
    created_at: u64,
    sequence: u64,
    started: bool,
    finished: bool,
    /// Items written so far, finished ones and the open one (the last, when `open`).
    items: Vec<(String, Item)>,
    open: bool,
    usage: TokenUsage,
}

impl ResponsesEventWriter {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            id: String::new(),
            created_at: now_unix(),
            sequence: 0,
            started: false,
            finished: false,
            items: Vec::new(),
            open: false,
            usage: TokenUsage::default(),
        }
    }

    fn emit(&mut self, kind: &str, mut event: Map<String, Value>, out: &mut BytesMut) {
        event.insert("type".into(), json!(kind));
        event.insert("sequence_number".into(), json!(self.sequence));
        self.sequence = self.sequence.saturating_add(1);
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Serialising a Value into a Vec cannot fail.
        out.extend_from_slice(&serde_json::to_vec(&Value::Object(event)).unwrap_or_default());
        out.extend_from_slice(b"\n\n");
    }

    /// The response as the stream's envelope events carry it.
    fn response(&self, outcome: Outcome) -> Value {
        let output = self
            .items
            .iter()
            .enumerate()
            .map(|(i, (id, item))| item.json(id, !(self.open && i + 1 == self.items.len())))
            .collect();
        response_json(
            &self.id,
            self.created_at,
            &self.model,
            outcome,
            output,
            &self.usage,
        )
    }

    fn start(&mut self, id: &str, usage: &TokenUsage, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = response_id(id);
        self.usage = *usage;
        for kind in ["response.created", "response.in_progress"] {
            let response = self.response(Outcome::in_progress());
            self.emit(kind, object([("response", response)]), out);
        }
    }

    fn open_item(&mut self, item: Item, out: &mut BytesMut) {
        self.start("", &TokenUsage::default(), out);
        self.close(out);
        let index = self.items.len();
        let id = item_id(item.prefix(), &self.id, index);
        let added = item.json(&id, false);
        let kind = match &item {
            Item::Message { .. } => Some("message"),
            Item::Reasoning { .. } => Some("reasoning"),
            _ => None,
        };
        self.items.push((id.clone(), item));
        self.open = true;
        self.emit(
            "response.output_item.added",
            object([("output_index", json!(index)), ("item", added)]),
            out,
        );
        match kind {
            Some("message") => self.emit(
                "response.content_part.added",
                object([
                    ("item_id", json!(id)),
                    ("output_index", json!(index)),
                    ("content_index", json!(0)),
                    ("part", output_text("")),
                ]),
                out,
            ),
            Some(_) => self.emit(
                "response.reasoning_summary_part.added",
                object([
                    ("item_id", json!(id)),
                    ("output_index", json!(index)),
                    ("summary_index", json!(0)),
                    ("part", json!({ "type": "summary_text", "text": "" })),
                ]),
                out,
            ),
            None => {}
        }
    }

    /// Closes the open item: its `.done` events carry the whole text or arguments.
    fn close(&mut self, out: &mut BytesMut) {
        if !self.open {
            return;
        }
        self.open = false;
        let index = self.items.len().saturating_sub(1);
        let Some((id, item)) = self.items.last() else {
            return;
        };
        let id = id.clone();
        let done = item.json(&id, true);
        let mut events: Vec<(&str, Map<String, Value>)> = Vec::with_capacity(3);
        match item {
            Item::Message { text } => {
                events.push((
                    "response.output_text.done",
                    object([
                        ("item_id", json!(id)),
                        ("output_index", json!(index)),
                        ("content_index", json!(0)),
                        ("text", json!(text)),
                        ("logprobs", json!([])),
                    ]),
                ));
                events.push((
                    "response.content_part.done",
                    object([
                        ("item_id", json!(id)),
                        ("output_index", json!(index)),
                        ("content_index", json!(0)),
                        ("part", output_text(text)),
                    ]),
                ));
            }
            Item::Reasoning { text, .. } => {
                events.push((
                    "response.reasoning_summary_text.done",
                    object([
                        ("item_id", json!(id)),
                        ("output_index", json!(index)),
                        ("summary_index", json!(0)),
                        ("text", json!(text)),
                    ]),
                ));
                events.push((
                    "response.reasoning_summary_part.done",
                    object([
                        ("item_id", json!(id)),
                        ("output_index", json!(index)),
                        ("summary_index", json!(0)),
                        ("part", json!({ "type": "summary_text", "text": text })),
                    ]),
                ));
            }
            Item::Redacted { .. } => {}
            Item::Call {
                name, arguments, ..
            } => events.push((
                "response.function_call_arguments.done",
                object([
                    ("item_id", json!(id)),
                    ("output_index", json!(index)),
                    ("name", json!(name)),
                    ("arguments", json!(arguments)),
                ]),
            )),
        }
        events.push((
            "response.output_item.done",
            object([("output_index", json!(index)), ("item", done)]),
        ));
        for (kind, event) in events {
            self.emit(kind, event, out);
        }
    }

    /// The open item when it is of the kind a delta needs; opens one when the reader sent no
    /// `BlockStart`.
    fn ensure(&mut self, want: fn(&Item) -> bool, make: fn() -> Item, out: &mut BytesMut) {
        let fits = self.open && self.items.last().is_some_and(|(_, item)| want(item));
        if !fits {
            self.open_item(make(), out);
        }
    }

    fn delta(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        match event {
            StreamEvent::TextDelta(_) => self.ensure(
                |i| matches!(i, Item::Message { .. }),
                || Item::Message {
                    text: String::new(),
                },
                out,
            ),
            StreamEvent::ReasoningDelta(_) | StreamEvent::SignatureDelta(_) => self.ensure(
                |i| matches!(i, Item::Reasoning { .. }),
                || Item::Reasoning {
                    text: String::new(),
                    signature: String::new(),
                },
                out,
            ),
            StreamEvent::ArgumentsDelta(_) => self.ensure(
                |i| matches!(i, Item::Call { .. }),
                || Item::Call {
                    call_id: format!("call_{}", random_suffix()),
                    name: String::new(),
                    arguments: String::new(),
                },
                out,
            ),
            _ => return,
        }
        let index = self.items.len().saturating_sub(1);
        let Some((id, item)) = self.items.last_mut() else {
            return;
        };
        let id = id.clone();
        let (kind, event) = match (event, item) {
            (StreamEvent::TextDelta(delta), Item::Message { text }) => {
                text.push_str(delta);
                (
                    "response.output_text.delta",
                    object([
                        ("item_id", json!(id)),
                        ("output_index", json!(index)),
                        ("content_index", json!(0)),
                        ("delta", json!(delta)),
                        ("logprobs", json!([])),
                    ]),
                )
            }
            (StreamEvent::ReasoningDelta(delta), Item::Reasoning { text, .. }) => {
                text.push_str(delta);
                (
                    "response.reasoning_summary_text.delta",
                    object([
                        ("item_id", json!(id)),
                        ("output_index", json!(index)),
                        ("summary_index", json!(0)),
                        ("delta", json!(delta)),
                    ]),
                )
            }
            (StreamEvent::SignatureDelta(delta), Item::Reasoning { signature, .. }) => {
                // No event of its own: the signature goes out in `output_item.done`.
                signature.push_str(delta);
                return;
            }
            (StreamEvent::ArgumentsDelta(delta), Item::Call { arguments, .. }) => {
                arguments.push_str(delta);
                (
                    "response.function_call_arguments.delta",
                    object([
                        ("item_id", json!(id)),
                        ("output_index", json!(index)),
                        ("delta", json!(delta)),
                    ]),
                )
            }
            // `ensure` opened the item the delta needs.
            _ => return,
        };
        self.emit(kind, event, out);
    }
}

fn object<const N: usize>(members: [(&str, Value); N]) -> Map<String, Value> {
    members
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

impl EventWriter for ResponsesEventWriter {
    fn write(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        if self.finished {
            return;
        }
        match event {
            StreamEvent::Start { id, usage, .. } => self.start(id, usage, out),
            StreamEvent::BlockStart(kind) => {
                let item = match kind {
                    BlockKind::Text => Item::Message {
                        text: String::new(),
                    },
                    BlockKind::Reasoning => Item::Reasoning {
                        text: String::new(),
                        signature: String::new(),
                    },
                    BlockKind::RedactedReasoning { data } => Item::Redacted { data: data.clone() },
                    BlockKind::ToolCall { id, name } => Item::Call {
                        call_id: id.clone(),
                        name: name.clone(),
                        arguments: String::new(),
                    },
                };
                self.open_item(item, out);
            }
            StreamEvent::TextDelta(delta)
            | StreamEvent::ReasoningDelta(delta)
            | StreamEvent::SignatureDelta(delta)
            | StreamEvent::ArgumentsDelta(delta) => {
                if !delta.is_empty() {
                    self.delta(event, out);
                }
            }
            StreamEvent::BlockStop => self.close(out),
            StreamEvent::Finish { stop, usage } => {
                self.start("", usage, out);
                self.close(out);
                if usage.reported() {
                    self.usage = *usage;
                }
                let outcome = Outcome::of(stop);
                let kind = if outcome.status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                let response = self.response(outcome);
                self.emit(kind, object([("response", response)]), out);
                self.finished = true;
            }
        }
    }

    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        if self.finished {
            return;
        }
        self.finished = true;
        let code = error.code.clone().unwrap_or_else(|| error.kind.to_owned());
        if !self.started {
            self.emit(
                "error",
                object([
                    ("code", json!(code)),
                    ("message", json!(error.message)),
                    ("param", json!(error.param)),
                ]),
                out,
            );
            return;
        }
        let response = self.response(Outcome {
            status: "failed",
            incomplete_details: Value::Null,
            error: json!({ "code": code, "message": error.message }),
        });
        self.emit("response.failed", object([("response", response)]), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use serde_json::json;

    fn parse(body: &Value) -> Result<Request, ApiError> {
        let bytes = serde_json::to_vec(body).unwrap();
        let parsed = body::parse(
            &bytes,
            true,
            crate::limits::Limits::default().max_top_level_keys,
        )?;
        parse_request(&parsed)
    }

    fn text(part: &Part) -> &str {
        match part {
            Part::Text(block) => &block.text,
            other => panic!("not text: {other:?}"),
        }
    }

    fn refused(body: &Value) -> ApiError {
        parse(body).expect_err("refused")
    }

    fn function(name: &str) -> Value {
        json!({
            "type": "function",
            "name": name,
            "description": format!("{name} tool"),
            "strict": false,
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
        })
    }

    /// What Codex sends (agent-clients.md): two developer messages, then user messages, nine
    /// tools among which a namespace entry and `web_search`, and its hints.
    fn codex_request() -> Value {
        json!({
            "model": "gpt-5-codex",
            "instructions": "You are Codex.",
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions>"}]},
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<collaboration>"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context>"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "say hi"}]},
            ],
            "tools": [
                function("exec_command"),
                function("write_stdin"),
                function("update_plan"),
                function("request_user_input"),
                function("apply_patch"),
                function("view_image"),
                function("list_mcp_resources"),
                {"type": "namespace", "name": "mcp__docs", "description": "docs server", "tools": [function("search")]},
                {"type": "web_search", "external_web_access": false},
            ],
            "tool_choice": "auto",
            "parallel_tool_calls": true,
            "reasoning": {"summary": "auto"},
            "store": false,
            "stream": true,
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "0199-abc",
            "client_metadata": {"session": "s1"},
            "text": {"verbosity": "low"},
        })
    }

    #[test]
    fn codex_request_reads_into_function_tools_system_blocks_and_user_turns() {
        let request = parse(&codex_request()).unwrap();
        assert_eq!(request.model, "gpt-5-codex");
        let system: Vec<&str> = request.system.iter().map(|b| b.text.as_str()).collect();
        assert_eq!(
            system,
            ["You are Codex.", "<permissions>", "<collaboration>"]
        );
        assert_eq!(request.messages.len(), 2, "{:?}", request.messages);
        assert!(request.messages.iter().all(|m| m.role == Role::User));
        assert_eq!(text(&request.messages[1].content[0]), "say hi");
        let names: Vec<&str> = request.tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "exec_command",
                "write_stdin",
                "update_plan",
                "request_user_input",
                "apply_patch",
                "view_image",
                "list_mcp_resources"
            ]
        );
        assert_eq!(
            request.tools[0].parameters.get(),
            // Kept byte for byte (the fixture's `json!` sorted the keys).
            r#"{"properties":{"cmd":{"type":"string"}},"required":["cmd"],"type":"object"}"#
        );
        assert_eq!(request.tool_choice, Some(ToolChoice::Auto));
        assert_eq!(request.parallel_tool_calls, Some(true));
        assert!(request.stream);
        assert_eq!(
            request.reasoning, None,
            "a summary alone asks for no effort"
        );
        assert!(request.json_schema.is_none());
    }

    #[test]
    fn a_string_input_is_one_user_message() {
        let request = parse(&json!({"model": "m", "input": "hello"})).unwrap();
        assert_eq!(request.messages.len(), 1);
        assert_eq!(request.messages[0].role, Role::User);
        assert_eq!(text(&request.messages[0].content[0]), "hello");
        assert!(request.system.is_empty());
    }

    #[test]
    fn later_system_messages_keep_their_place() {
        let request = parse(&json!({"model": "m", "input": [
            {"role": "system", "content": "first"},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": [{"type": "input_text", "text": "late"}]},
            {"role": "user", "content": "go"},
        ]}))
        .unwrap();
        assert_eq!(request.system.len(), 1);
        let roles: Vec<Role> = request.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::User, Role::System, Role::User]);
        assert_eq!(text(&request.messages[1].content[0]), "late");
    }

    #[test]
    fn tool_history_joins_calls_and_outputs_into_turns() {
        let request = parse(&json!({"model": "m", "input": [
            {"role": "user", "content": "list and read"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "need tools"}], "encrypted_content": "sig"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Running."}]},
            {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{\"p\":\".\"}"},
            {"type": "function_call", "call_id": "c2", "name": "cat", "arguments": ""},
            {"type": "function_call_output", "call_id": "c1", "output": "a b"},
            {"type": "function_call_output", "call_id": "c2", "output": [
                {"type": "input_text", "text": "contents"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
            ]},
            {"role": "user", "content": "thanks"},
        ]}))
        .unwrap();
        let roles: Vec<Role> = request.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::User, Role::Assistant, Role::User, Role::User]);
        let assistant = &request.messages[1].content;
        assert!(
            matches!(&assistant[0], Part::Reasoning { text, signature: Some(s) } if text == "need tools" && s == "sig")
        );
        assert_eq!(text(&assistant[1]), "Running.");
        assert!(
            matches!(&assistant[2], Part::ToolCall(c) if c.id == "c1" && c.arguments == "{\"p\":\".\"}")
        );
        assert!(matches!(&assistant[3], Part::ToolCall(c) if c.id == "c2" && c.arguments == "{}"));
        let results = &request.messages[2].content;
        assert_eq!(results.len(), 2);
        let Part::ToolResult(second) = &results[1] else {
            panic!("not a tool result: {:?}", results[1]);
        };
        assert_eq!(second.call_id, "c2");
        assert_eq!(text(&second.content[0]), "contents");
        assert_eq!(
            second.content[1].clone().image(),
            Some(Image::Base64 {
                media_type: "image/png".into(),
                data: "AAAA".into()
            })
        );
    }

    impl Part {
        fn image(self) -> Option<Image> {
            match self {
                Part::Image(image) => Some(image),
                _ => None,
            }
        }
    }

    #[test]
    fn reasoning_items_come_back_as_they_went_out() {
        let request = parse(&json!({"model": "m", "input": [
            {"role": "user", "content": "q"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": ""}], "encrypted_content": "sig"},
            {"type": "reasoning", "summary": [], "encrypted_content": "opaque"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "a"}], "content": [{"type": "reasoning_text", "text": "full"}]},
            {"type": "reasoning", "summary": []},
            {"role": "assistant", "content": "answer"},
        ]}))
        .unwrap();
        let parts = &request.messages[1].content;
        assert!(
            matches!(&parts[0], Part::Reasoning { text, signature: Some(s) } if text.is_empty() && s == "sig")
        );
        assert!(matches!(&parts[1], Part::RedactedReasoning { data } if data == "opaque"));
        assert!(matches!(&parts[2], Part::Reasoning { text, signature: None } if text == "full"));
        assert_eq!(text(&parts[3]), "answer");
        assert_eq!(parts.len(), 4, "an empty reasoning item is dropped");
    }

    #[test]
    fn images_by_url_and_data_url() {
        let request = parse(
            &json!({"model": "m", "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "high"},
                {"type": "input_image", "image_url": "data:image/jpeg;base64,/9j/"},
            ]}]}),
        )
        .unwrap();
        let content = &request.messages[0].content;
        assert_eq!(
            content[0].clone().image(),
            Some(Image::Url("https://example.com/a.png".into()))
        );
        assert_eq!(
            content[1].clone().image(),
            Some(Image::Base64 {
                media_type: "image/jpeg".into(),
                data: "/9j/".into()
            })
        );
    }

    #[test]
    fn settings_map_to_the_model() {
        let request = parse(&json!({
            "model": "m", "input": "x",
            "max_output_tokens": 300, "temperature": 0.5, "top_p": 0.9,
            "parallel_tool_calls": false,
            "reasoning": {"effort": "high", "summary": "detailed"},
            "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": true}, "verbosity": "high"},
        }))
        .unwrap();
        assert_eq!(request.max_tokens, Some(300));
        assert_eq!(request.temperature, Some(0.5));
        assert_eq!(request.top_p, Some(0.9));
        assert_eq!(request.parallel_tool_calls, Some(false));
        assert_eq!(
            request.reasoning,
            Some(Reasoning {
                budget_tokens: None,
                effort: Some("high".into())
            })
        );
        let schema = request.json_schema.unwrap();
        assert_eq!(
            (schema.name.as_str(), schema.schema.get(), schema.strict),
            ("out", r#"{"type":"object"}"#, Some(true))
        );
        let none = parse(&json!({"model": "m", "input": "x", "reasoning": {"effort": "none"}, "text": {"format": {"type": "text"}}})).unwrap();
        assert_eq!(none.reasoning, None);
        assert!(none.json_schema.is_none());
    }

    #[test]
    fn hints_are_dropped() {
        let request = parse(&json!({
            "model": "m", "input": "x",
            "store": true, "include": ["reasoning.encrypted_content"], "metadata": {"a": "b"},
            "client_metadata": {"c": "d"}, "prompt_cache_key": "k", "safety_identifier": "s",
            "user": "u", "service_tier": "flex", "truncation": "auto",
            "stream_options": {"include_obfuscation": false}, "top_logprobs": 3,
            "max_tool_calls": 4, "some_new_option": {"x": 1},
            "previous_response_id": null, "conversation": null, "background": false,
        }))
        .unwrap();
        assert_eq!(request.messages.len(), 1);
    }

    #[test]
    fn state_is_refused_with_unsupported_parameter() {
        for (field, value) in [
            ("previous_response_id", json!("resp_1")),
            ("conversation", json!("conv_1")),
        ] {
            let mut body = json!({"model": "m", "input": "x"});
            body[field] = value;
            let err = refused(&body);
            assert_eq!(err.status, 400);
            assert_eq!(err.kind, "invalid_request_error");
            assert_eq!(err.code.as_deref(), Some("unsupported_parameter"));
            assert_eq!(err.param.as_deref(), Some(field));
            assert!(
                err.message.contains("keeps no conversation state")
                    && err.message.contains("whole conversation in `input`")
                    && err.message.contains("store: false"),
                "{}",
                err.message
            );
        }
        let err =
            refused(&json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}));
        assert_eq!(err.param.as_deref(), Some("input[0]"));
        assert_eq!(err.code.as_deref(), Some("unsupported_parameter"));
    }

    #[test]
    fn what_cannot_cross_is_refused_naming_the_field() {
        let cases = [
            (
                json!({"model": "m", "input": "x", "background": true}),
                "background",
            ),
            (
                json!({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}),
                "prompt",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}),
                "text.format",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
                "input[0].content[0]",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}),
                "input[0].content[0].file_id",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": "x"}, {"type": "web_search_call", "id": "ws", "status": "completed", "action": {}}]}),
                "input[1].type",
            ),
            (
                json!({"model": "m", "input": [{"type": "strange_item"}]}),
                "input[0].type",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [function("f"), {"type": "web_search"}], "tool_choice": {"type": "web_search"}}),
                "tool_choice",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}], "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [function("f")], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]}}),
                "tool_choice",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [function("f")], "tool_choice": {"type": "function", "name": "g"}}),
                "tool_choice.name",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}),
                "input[0].arguments",
            ),
            (json!({"model": "m"}), "input"),
            (json!({"model": "m", "input": []}), "input"),
        ];
        for (body, param) in cases {
            let err = refused(&body);
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
        }
        let err = refused(
            &json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}}),
        );
        assert!(err.message.contains("web_search"), "{}", err.message);
    }

    #[test]
    fn allowed_tools_narrow_the_offered_list() {
        let request = parse(&json!({
            "model": "m", "input": "x",
            "tools": [function("a"), function("b"), {"type": "web_search"}],
            "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "b"}]},
        }))
        .unwrap();
        let names: Vec<&str> = request.tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(request.tool_choice, Some(ToolChoice::Any));
        let named = parse(&json!({"model": "m", "input": "x", "tools": [function("a")], "tool_choice": {"type": "function", "name": "a"}})).unwrap();
        assert_eq!(named.tool_choice, Some(ToolChoice::Tool("a".into())));
        let hosted_only =
            parse(&json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}], "tool_choice": "auto"}))
                .unwrap();
        assert!(hosted_only.tools.is_empty() && hosted_only.tool_choice.is_none());
    }

    // -- answers -------------------------------------------------------------------------------

    fn reply(content: Vec<Part>, stop: StopReason) -> Reply {
        Reply {
            id: "msg_01".into(),
            model: "claude".into(),
            content,
            stop,
            usage: TokenUsage {
                input: 10,
                output: 20,
                cache_read: 5,
                cache_write: 1,
                reasoning: 0,
            },
        }
    }

    #[test]
    fn a_reply_is_a_response_object_with_complete_usage() {
        let written: Value = serde_json::from_slice(&write_reply(
            &reply(
                vec![
                    Part::Reasoning {
                        text: "think".into(),
                        signature: Some("sig".into()),
                    },
                    Part::Text(text_block("Hel".into())),
                    Part::Text(text_block("lo".into())),
                    Part::ToolCall(ToolCall {
                        id: "toolu_1".into(),
                        name: "ls".into(),
                        arguments: "{}".into(),
                    }),
                ],
                StopReason::ToolUse,
            ),
            "claude-sonnet",
        ))
        .unwrap();
        assert_eq!(written["id"], "resp_msg_01");
        assert_eq!(written["object"], "response");
        assert_eq!(written["status"], "completed");
        assert_eq!(written["store"], false);
        assert_eq!(written["model"], "claude-sonnet");
        let output = written["output"].as_array().unwrap();
        assert_eq!(output.len(), 3);
        assert_eq!(output[0]["type"], "reasoning");
        assert_eq!(output[0]["id"], "rs_msg_01_0");
        assert_eq!(output[0]["encrypted_content"], "sig");
        assert_eq!(output[0]["summary"][0]["text"], "think");
        assert_eq!(output[1]["content"][0]["text"], "Hello");
        assert_eq!(output[2]["call_id"], "toolu_1");
        assert_eq!(output[2]["id"], "fc_msg_01_2");
        assert_eq!(
            written["usage"],
            json!({
                "input_tokens": 16,
                "input_tokens_details": {"cached_tokens": 5},
                "output_tokens": 20,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 36,
            })
        );
    }

    #[test]
    fn a_cut_reply_is_incomplete_with_its_reason() {
        for (stop, reason) in [
            (StopReason::MaxTokens, "max_output_tokens"),
            (StopReason::ContentFilter, "content_filter"),
        ] {
            let written: Value =
                serde_json::from_slice(&write_reply(&reply(Vec::new(), stop), "m")).unwrap();
            assert_eq!(written["status"], "incomplete");
            assert_eq!(written["incomplete_details"]["reason"], reason);
        }
    }

    #[test]
    fn response_ids_are_derived_from_the_upstreams() {
        assert_eq!(response_id("msg_1"), "resp_msg_1");
        assert_eq!(response_id("resp_abc"), "resp_abc");
        assert_eq!(response_id("msg_1"), response_id("msg_1"));
        let generated = response_id("");
        assert!(generated.starts_with("resp_") && generated.len() == 29);
    }

    // -- streams -------------------------------------------------------------------------------

    fn events_of(bytes: &[u8]) -> Vec<(String, Value)> {
        std::str::from_utf8(bytes)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_owned();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    #[test]
    fn an_error_before_anything_is_an_error_event() {
        let mut writer = ResponsesEventWriter::new("m");
        let mut out = BytesMut::new();
        writer.write_error(&ApiError::invalid_request("bad").with_code("x"), &mut out);
        let events = events_of(&out);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, "error");
        assert_eq!(events[0].1["code"], "x");
        assert_eq!(events[0].1["sequence_number"], 0);
    }

    #[test]
    fn deltas_without_block_events_still_make_whole_items() {
        let mut writer = ResponsesEventWriter::new("m");
        let mut out = BytesMut::new();
        for event in [
            StreamEvent::TextDelta("a".into()),
            StreamEvent::ArgumentsDelta("{}".into()),
            StreamEvent::Finish {
                stop: StopReason::ToolUse,
                usage: TokenUsage::default(),
            },
        ] {
            writer.write(&event, &mut out);
        }
        let events = events_of(&out);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"response.created"));
        assert_eq!(names.last(), Some(&"response.completed"));
        let completed = &events.last().unwrap().1["response"];
        assert_eq!(completed["output"][0]["content"][0]["text"], "a");
        assert_eq!(completed["output"][1]["arguments"], "{}");
        assert_eq!(
            completed["usage"]["output_tokens_details"]["reasoning_tokens"],
            0
        );
        for (i, (_, data)) in events.iter().enumerate() {
            assert_eq!(data["sequence_number"], i);
        }
    }

    #[test]
    fn a_failure_after_the_start_is_response_failed() {
        let mut writer = ResponsesEventWriter::new("m");
        let mut out = BytesMut::new();
        writer.write(
            &StreamEvent::Start {
                id: "msg_1".into(),
                model: "claude".into(),
                usage: TokenUsage::default(),
            },
            &mut out,
        );
        writer.write(&StreamEvent::BlockStart(BlockKind::Text), &mut out);
        writer.write(&StreamEvent::TextDelta("par".into()), &mut out);
        writer.write_error(&ApiError::upstream_bad_answer("anthropic", "cut"), &mut out);
        let events = events_of(&out);
        let (name, failed) = events.last().unwrap();
        assert_eq!(name, "response.failed");
        assert_eq!(failed["response"]["status"], "failed");
        assert_eq!(
            failed["response"]["error"]["code"],
            "upstream_invalid_response"
        );
        assert_eq!(failed["response"]["output"][0]["status"], "in_progress");
        // Nothing after the end.
        let before = out.len();
        writer.write(&StreamEvent::BlockStop, &mut out);
        assert_eq!(out.len(), before);
    }
}
