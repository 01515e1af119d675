//! OpenAI Chat Completions ↔ Bedrock Converse (wire formats §5.2, §5.3, §6.2).
//!
//! Requests: system/developer messages become `system`; user messages and tool results merge into
//! `user` turns and assistant text and tool calls into `assistant` turns (Converse requires
//! alternation); images and PDFs must be base64 data URLs (Converse takes bytes, not links).
//! Converse refuses `toolUse`/`toolResult` blocks without a `toolConfig`, so when the history has
//! tool calls and the request no `tools`, minimal specs are declared for the names used.
//!
//! Answers: text blocks join into `content`, `toolUse` blocks become `tool_calls`, reasoning blocks
//! are dropped, stop reasons map to OpenAI's values, usage counts cache reads and writes as prompt
//! tokens.

use crate::body::ParsedRequest;
use crate::errors::ApiError;
use crate::providers::openai_request::{
    self as openai, Content, ContentPart, ResponseFormat, ToolChoice, get, unsupported,
};
use crate::usage::Usage;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::HashSet;

const PROVIDER: &str = llm_proxy_catalog::Provider::Bedrock.as_str();

const MAPPED: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "reasoning_effort",
    "service_tier",
    "logprobs",
];

/// Accepted and ignored: no Converse equivalent and no effect a client could check.
const DROPPED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
];

/// Appended to the system prompt for `response_format: json_object` (Converse has no JSON mode).
const JSON_OBJECT_INSTRUCTION: &str =
    "Respond with a single valid JSON object and nothing else: no prose, no code fences.";

fn unsupported_hint(field: &str) -> &'static str {
    match field {
        "functions" | "function_call" => "use `tools` and `tool_choice`",
        "logit_bias" => "Converse has no logit bias",
        "modalities" | "audio" => "only text answers are available through this gateway",
        _ => "",
    }
}

fn invalid(field: String, message: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_request(format!("`{field}`: {message}")).with_param(field)
}

/// Converse `messages` with same-role turns merged.
#[derive(Default)]
struct Turns {
    turns: Vec<(&'static str, Vec<Value>)>,
    /// Names of the tools the history called, in first-call order.
    used_tools: Vec<String>,
    /// The same names, to find repeats in constant time (a body can hold thousands of calls).
    used_tool_set: HashSet<String>,
}

impl Turns {
    fn push(&mut self, role: &'static str, blocks: Vec<Value>) {
        if blocks.is_empty() {
            return;
        }
        match self.turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => self.turns.push((role, blocks)),
        }
    }
}

fn image_format(mime: &str) -> Option<&'static str> {
    match mime {
        "image/png" => Some("png"),
        "image/jpeg" | "image/jpg" => Some("jpeg"),
        "image/gif" => Some("gif"),
        "image/webp" => Some("webp"),
        _ => None,
    }
}

fn document_format(mime: &str) -> Option<&'static str> {
    match mime {
        "application/pdf" => Some("pdf"),
        "text/csv" => Some("csv"),
        "application/msword" => Some("doc"),
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => Some("docx"),
        "application/vnd.ms-excel" => Some("xls"),
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" => Some("xlsx"),
        "text/html" => Some("html"),
        "text/plain" => Some("txt"),
        "text/markdown" => Some("md"),
        _ => None,
    }
}

/// A document name Converse accepts: letters, digits, single spaces, `-`, `()`, `[]`.
fn document_name(filename: Option<&str>, index: usize) -> String {
    let stem = filename
        .map(|f| f.rsplit_once('.').map_or(f, |(stem, _)| stem))
        .unwrap_or("");
    let mut name = String::new();
    for c in stem.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '-' | '(' | ')' | '[' | ']') {
            c
        } else {
            ' '
        };
        if !(c == ' ' && name.ends_with(' ')) {
            name.push(c);
        }
    }
    let name = name.trim().to_owned();
    if name.is_empty() {
        format!("document-{}", index + 1)
    } else {
        name
    }
}

fn user_block(part: ContentPart, field: &str, documents: &mut usize) -> Result<Value, ApiError> {
    match part {
        ContentPart::Text { text } => Ok(json!({ "text": text })),
        ContentPart::ImageUrl { image_url } => {
            let url_field = format!("{field}.image_url.url");
            let (mime, data) = openai::split_data_url(&image_url.url).ok_or_else(|| {
                unsupported(
                    &url_field,
                    PROVIDER,
                    "Converse takes images as base64 data URLs (data:image/png;base64,...), not links",
                )
            })?;
            let format = image_format(mime).ok_or_else(|| {
                invalid(
                    url_field.clone(),
                    format!("image type {mime} is not supported; use png, jpeg, gif or webp"),
                )
            })?;
            Ok(json!({ "image": { "format": format, "source": { "bytes": data } } }))
        }
        ContentPart::File { file } => {
            let data_field = format!("{field}.file.file_data");
            let Some(data_url) = file.file_data else {
                return Err(unsupported(
                    &format!("{field}.file.file_id"),
                    PROVIDER,
                    "send the file inline as `file_data`",
                ));
            };
            let (mime, data) = openai::split_data_url(&data_url).ok_or_else(|| {
                invalid(
                    data_field.clone(),
                    "must be a base64 data URL (data:application/pdf;base64,...)",
                )
            })?;
            let format = document_format(mime).ok_or_else(|| {
                invalid(
                    data_field.clone(),
                    format!("document type {mime} is not supported by Converse"),
                )
            })?;
            let name = document_name(file.filename.as_deref(), *documents);
            *documents += 1;
            Ok(
                json!({ "document": { "format": format, "name": name, "source": { "bytes": data } } }),
            )
        }
        ContentPart::InputAudio { .. } => Err(unsupported(
            &format!("{field}.input_audio"),
            PROVIDER,
            "Converse takes no audio input",
        )),
        ContentPart::Refusal { .. } => Err(invalid(
            field.to_owned(),
            "refusal parts belong to assistant messages",
        )),
    }
}

fn messages(list: &[openai::Message]) -> Result<(Vec<Value>, Turns), ApiError> {
    let mut system = Vec::new();
    let mut turns = Turns::default();
    let mut documents = 0;
    for (i, message) in list.iter().enumerate() {
        let field = format!("messages[{i}]");
        match message.role.as_str() {
            "system" | "developer" => {
                let text = message.text(&field)?;
                if !text.trim().is_empty() {
                    system.push(json!({ "text": text }));
                }
            }
            "user" => {
                let blocks = match message.content(&field)? {
                    None => Vec::new(),
                    Some(Content::Text(text)) => vec![json!({ "text": text })],
                    Some(Content::Parts(parts)) => parts
                        .into_iter()
                        .enumerate()
                        .map(|(j, p)| {
                            user_block(p, &format!("{field}.content[{j}]"), &mut documents)
                        })
                        .collect::<Result<_, _>>()?,
                };
                turns.push("user", blocks);
            }
            "assistant" => {
                let mut blocks = Vec::new();
                let text = message.assistant_text(&field)?;
                // Converse refuses blank text blocks.
                if !text.trim().is_empty() {
                    blocks.push(json!({ "text": text }));
                }
                for (j, call) in message.tool_calls.iter().flatten().enumerate() {
                    let input = call.arguments_object(&format!("{field}.tool_calls[{j}]"))?;
                    if turns.used_tool_set.insert(call.function.name.clone()) {
                        turns.used_tools.push(call.function.name.clone());
                    }
                    blocks.push(json!({
                        "toolUse": { "toolUseId": call.id, "name": call.function.name, "input": input }
                    }));
                }
                turns.push("assistant", blocks);
            }
            "tool" => {
                let id = message
                    .tool_call_id
                    .as_deref()
                    .ok_or_else(|| invalid(format!("{field}.tool_call_id"), "is required"))?;
                let text = message.text(&field)?;
                // Converse refuses an empty text block; an empty result is still a result.
                let content = if text.is_empty() {
                    json!([])
                } else {
                    json!([{ "text": text }])
                };
                turns.push(
                    "user",
                    vec![json!({
                        "toolResult": { "toolUseId": id, "content": content, "status": "success" }
                    })],
                );
            }
            other => {
                return Err(invalid(
                    format!("{field}.role"),
                    format!("must be system, developer, user, assistant or tool, got `{other}`"),
                ));
            }
        }
    }
    if turns.turns.is_empty() {
        return Err(ApiError::invalid_request(
            "`messages` must contain at least one user or assistant message",
        )
        .with_param("messages"));
    }
    Ok((system, turns))
}

/// `additionalModelRequestFields` for `reasoning_effort`, by model family.
fn reasoning_fields(effort: &str, model: &str) -> Option<Value> {
    if model.contains("anthropic.claude") {
        // Claude's extended thinking takes a token budget (minimum 1024).
        let budget = match effort {
            "none" | "minimal" => return None,
            "low" => 1024,
            "medium" => 4096,
            "high" => 16384,
            _ => 32768,
        };
        return Some(json!({ "thinking": { "type": "enabled", "budget_tokens": budget } }));
    }
    if model.contains("amazon.nova") {
        let level = match effort {
            "none" | "minimal" => return None,
            "low" => "low",
            "medium" => "medium",
            _ => "high",
        };
        return Some(
            json!({ "reasoningConfig": { "type": "enabled", "maxReasoningEffort": level } }),
        );
    }
    Some(json!({ "reasoning_effort": effort }))
}

/// The Converse body for an OpenAI chat request to `model`.
pub fn request(request: &ParsedRequest<'_>, model: &str) -> Result<Vec<u8>, ApiError> {
    let object = &request.object;
    if let Some(field) = object
        .keys()
        .find(|k| !MAPPED.contains(k) && !DROPPED.contains(k))
    {
        return Err(unsupported(field, PROVIDER, unsupported_hint(field)));
    }
    if get::<u32>(object, "n")?.is_some_and(|n| n != 1) {
        return Err(unsupported(
            "n",
            PROVIDER,
            "Converse returns one answer per call",
        ));
    }
    if get::<bool>(object, "logprobs")?.unwrap_or(false) {
        return Err(unsupported(
            "logprobs",
            PROVIDER,
            "Converse returns no log probabilities",
        ));
    }
    let (mut system, turns) = messages(&openai::messages(request)?)?;
    let mut body = Map::new();

    let mut output_config = None;
    match get::<ResponseFormat>(object, "response_format")? {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => system.push(json!({ "text": JSON_OBJECT_INSTRUCTION })),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema
                .schema
                .unwrap_or_else(|| json!({ "type": "object" }));
            let mut structure = json!({ "name": json_schema.name, "schema": schema.to_string() });
            if let Some(description) = json_schema.description {
                structure["description"] = json!(description);
            }
            output_config = Some(json!({
                "textFormat": { "type": "json_schema", "structure": { "jsonSchema": structure } }
            }));
        }
    }

    let messages: Vec<Value> = turns
        .turns
        .into_iter()
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    body.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        body.insert("system".into(), Value::Array(system));
    }

    let mut inference = Map::new();
    if let Some(max) = request.max_output_tokens {
        inference.insert("maxTokens".into(), json!(max));
    }
    if let Some(t) = get::<f64>(object, "temperature")? {
        inference.insert("temperature".into(), json!(t));
    }
    if let Some(p) = get::<f64>(object, "top_p")? {
        inference.insert("topP".into(), json!(p));
    }
    let stop = openai::stop(request)?;
    if !stop.is_empty() {
        inference.insert("stopSequences".into(), json!(stop));
    }
    if !inference.is_empty() {
        body.insert("inferenceConfig".into(), Value::Object(inference));
    }

    let tools = openai::tools(request)?;
    let choice = openai::tool_choice(request)?;
    let mut specs: Vec<Value> = tools
        .into_iter()
        .map(|f| {
            let mut spec = json!({
                "name": f.name,
                "inputSchema": { "json": f.parameters.unwrap_or_else(|| json!({ "type": "object", "properties": {} })) }
            });
            if let Some(description) = f.description.filter(|d| !d.is_empty()) {
                spec["description"] = json!(description);
            }
            json!({ "toolSpec": spec })
        })
        .collect();
    let history_has_tools = !turns.used_tools.is_empty();
    if specs.is_empty() && history_has_tools {
        specs = turns
            .used_tools
            .iter()
            .map(|name| {
                json!({ "toolSpec": {
                    "name": name,
                    "description": "declared by the gateway for earlier tool calls",
                    "inputSchema": { "json": { "type": "object", "properties": {} } }
                } })
            })
            .collect();
    }
    // `none` has no Converse equivalent: the tools go only when the history needs them.
    let keep_tools = !specs.is_empty() && (choice != Some(ToolChoice::None) || history_has_tools);
    if keep_tools {
        let mut config = json!({ "tools": specs });
        match choice {
            Some(ToolChoice::Auto) => config["toolChoice"] = json!({ "auto": {} }),
            Some(ToolChoice::Required) => config["toolChoice"] = json!({ "any": {} }),
            Some(ToolChoice::Function(name)) => {
                config["toolChoice"] = json!({ "tool": { "name": name } })
            }
            Some(ToolChoice::None) | None => {}
        }
        body.insert("toolConfig".into(), config);
    }
    if let Some(config) = output_config {
        body.insert("outputConfig".into(), config);
    }
    if let Some(effort) = openai::reasoning_effort(request)?
        && let Some(fields) = reasoning_fields(&effort, model)
    {
        body.insert("additionalModelRequestFields".into(), fields);
    }
    if let Some(tier) = get::<String>(object, "service_tier")?
        && matches!(tier.as_str(), "default" | "flex" | "priority")
    {
        body.insert("serviceTier".into(), json!({ "type": tier }));
    }
    Ok(serde_json::to_vec(&Value::Object(body)).unwrap_or_default())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseResponse {
    output: Option<Output>,
    stop_reason: Option<String>,
    usage: Option<TokenUsage>,
}

#[derive(Debug, Deserialize)]
struct Output {
    message: Option<OutputMessage>,
}

#[derive(Debug, Deserialize)]
struct OutputMessage {
    #[serde(default)]
    content: Vec<Block>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Block {
    text: Option<String>,
    tool_use: Option<ToolUse>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolUse {
    tool_use_id: String,
    name: String,
    #[serde(default)]
    input: Option<Value>,
}

/// Converse usage (also the stream's `metadata.usage`).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TokenUsage {
    input_tokens: u64,
    output_tokens: u64,
    cache_read_input_tokens: u64,
    cache_write_input_tokens: u64,
}

impl TokenUsage {
    /// OpenAI's counts: cache reads and writes are prompt tokens (Bedrock counts them apart).
    pub fn usage(&self) -> Usage {
        // Saturating: the counts come from the upstream.
        let prompt_tokens = self
            .input_tokens
            .saturating_add(self.cache_read_input_tokens)
            .saturating_add(self.cache_write_input_tokens);
        Usage {
            prompt_tokens,
            completion_tokens: self.output_tokens,
            total_tokens: prompt_tokens.saturating_add(self.output_tokens),
            cache_read_tokens: self.cache_read_input_tokens,
            cache_write_tokens: self.cache_write_input_tokens,
            // Converse counts reasoning in `outputTokens` without reporting it apart.
            reasoning_tokens: 0,
        }
    }

    pub fn to_json(self) -> Value {
        let usage = self.usage();
        let mut details = json!({ "cached_tokens": self.cache_read_input_tokens });
        // OpenAI's newer usage type has the cache writes (optional, so only when there are
        // some): Anthropic and Responses clients, whose answers are read back from this JSON,
        // see them, and they are counted.
        if self.cache_write_input_tokens > 0 {
            details["cache_write_tokens"] = json!(self.cache_write_input_tokens);
        }
        json!({
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": details,
        })
    }
}

/// OpenAI's finish reason for a Converse stop reason.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "tool_use" => "tool_calls",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "content_filtered" | "guardrail_intervened" => "content_filter",
        // end_turn, stop_sequence, malformed_model_output, malformed_tool_use and anything new:
        // strict OpenAI clients reject values outside their enum.
        _ => "stop",
    }
}

/// The completion id: Bedrock's request id when it sent one.
pub fn completion_id(request_id: Option<&str>) -> String {
    match request_id {
        Some(id) => format!("chatcmpl-{id}"),
        None => {
            use rand::distr::{Alphanumeric, SampleString as _};
            format!(
                "chatcmpl-{}",
                Alphanumeric.sample_string(&mut rand::rng(), 24)
            )
        }
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A Converse answer as an OpenAI chat completion.
pub fn answer(
    body: &[u8],
    model: &str,
    request_id: Option<&str>,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    let response: ConverseResponse = serde_json::from_slice(body).map_err(|e| {
        ApiError::upstream_bad_answer(PROVIDER, format!("not a Converse answer: {e}"))
    })?;
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for block in response
        .output
        .and_then(|o| o.message)
        .map(|m| m.content)
        .unwrap_or_default()
    {
        if let Some(t) = block.text {
            text.get_or_insert_with(String::new).push_str(&t);
        }
        if let Some(call) = block.tool_use {
            let arguments = call
                .input
                .map_or_else(|| "{}".to_owned(), |v| v.to_string());
            calls.push(json!({
                "id": call.tool_use_id,
                "type": "function",
                "function": { "name": call.name, "arguments": arguments }
            }));
        }
    }
    let mut message = json!({ "role": "assistant", "content": text, "refusal": null });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let usage = response.usage.unwrap_or_default();
    let out = json!({
        "id": completion_id(request_id),
        "object": "chat.completion",
        "created": now_unix(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(response.stop_reason.as_deref().unwrap_or("end_turn")),
        }],
        "usage": usage.to_json(),
        "system_fingerprint": null,
    });
    Ok((
        serde_json::to_vec(&out).unwrap_or_default(),
        response.usage.map(|u| u.usage()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_has_the_cache_kinds_converse_reports() {
        // wire formats §5.3: Converse counts cache reads and writes apart from `inputTokens`.
        let body = br#"{"output":{"message":{"role":"assistant","content":[{"reasoningContent":{"reasoningText":{"text":"Count.","signature":"c2ln"}}},{"text":"1, 2, 3"}]}},
            "stopReason":"end_turn",
            "usage":{"inputTokens":10,"outputTokens":8,"totalTokens":2066,"cacheReadInputTokens":2000,"cacheWriteInputTokens":48},
            "metrics":{"latencyMs":812}}"#;
        let expected = Usage {
            prompt_tokens: 10 + 2000 + 48,
            completion_tokens: 8,
            total_tokens: 2066,
            cache_read_tokens: 2000,
            cache_write_tokens: 48,
            reasoning_tokens: 0,
        };
        let (out, usage) = answer(body, "anthropic.claude-sonnet-4-5", Some("req-1")).unwrap();
        assert_eq!(usage, Some(expected));
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            out["usage"]["prompt_tokens_details"],
            json!({"cached_tokens": 2000, "cache_write_tokens": 48})
        );
        // Anthropic and Responses clients get the counts read back from the OpenAI answer.
        let reply = crate::conversation::openai_chat::parse_reply(
            &serde_json::to_vec(&out).unwrap(),
            "bedrock",
        )
        .unwrap();
        assert_eq!(reply.usage.reported_usage(), Some(expected));
    }

    #[test]
    fn cache_writes_are_written_only_when_there_are_some() {
        let usage: TokenUsage =
            serde_json::from_str(r#"{"inputTokens":3,"outputTokens":4,"totalTokens":7}"#).unwrap();
        assert_eq!(
            usage.to_json(),
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
    }
}
