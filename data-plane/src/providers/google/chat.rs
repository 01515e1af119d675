//! OpenAI Chat Completions ↔ Gemini `generateContent` (wire formats §6.1, §6.3).
//!
//! Requests: system/developer messages become `systemInstruction`; consecutive user and tool
//! messages merge into one `user` turn (Gemini wants alternation); tool results need the function
//! name, recovered from the assistant turn that called it. Gemini 3 wants each function call it
//! made echoed with its `thoughtSignature`; OpenAI clients only keep the tool call's `id`, so the
//! signature travels inside it (`<id>__thought__<signature>`, the convention LiteLLM uses).
//!
//! Answers: candidates become choices, non-thought text joins into `content`, function calls become
//! `tool_calls` (`finish_reason: tool_calls`), finish reasons are limited to OpenAI's values, and a
//! prompt blocked before any candidate is a 400 with code `content_filter`, streamed or not
//! (DESIGN §16); output stopped by a filter is `finish_reason: content_filter`.

use super::error::google_error;
use crate::body::ParsedRequest;
use crate::errors::ApiError;
use crate::limits::Limits;
use crate::providers::openai_request::{
    self as openai, Content, ContentPart, ResponseFormat, ToolChoice, get, unsupported,
};
use crate::sse::{self, ChunkWriter, EventSplitter, StreamTranslator};
use crate::usage::Usage;
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

const PROVIDER: &str = llm_proxy_catalog::Provider::Google.as_str();

/// Separates a tool call's id from the Gemini thought signature carried with it.
pub const THOUGHT_SIGNATURE_SEPARATOR: &str = "__thought__";

/// The value Gemini documents for "no signature known" (history from another model or client).
const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// Fields translated into the Gemini request.
const MAPPED: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "reasoning_effort",
    "logprobs",
    "top_logprobs",
];

/// Fields that have no effect on the answer's content; dropped like LiteLLM and Envoy do.
const DROPPED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "parallel_tool_calls",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

fn unsupported_hint(field: &str) -> &'static str {
    match field {
        "functions" | "function_call" => "use `tools` and `tool_choice`",
        "logit_bias" => "Gemini has no logit bias",
        "modalities" | "audio" => "only text answers are available through this gateway",
        _ => "",
    }
}

fn is_gemini_3(model: &str) -> bool {
    model.contains("gemini-3")
}

/// The `generateContent` body for an OpenAI chat request to `model`.
pub fn request(request: &ParsedRequest<'_>, model: &str) -> Result<Vec<u8>, ApiError> {
    if let Some(field) = request
        .object
        .keys()
        .find(|k| !MAPPED.contains(k) && !DROPPED.contains(k))
    {
        return Err(unsupported(field, PROVIDER, unsupported_hint(field)));
    }
    let mut body = Map::new();
    let (system, contents) = contents(&openai::messages(request)?, model)?;
    body.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    let tools = openai::tools(request)?;
    if !tools.is_empty() {
        let declarations: Vec<Value> = tools
            .into_iter()
            .map(|f| {
                let mut declaration = Map::new();
                declaration.insert("name".into(), Value::String(f.name));
                if let Some(description) = f.description {
                    declaration.insert("description".into(), Value::String(description));
                }
                if let Some(parameters) = f.parameters {
                    declaration.insert("parametersJsonSchema".into(), parameters);
                }
                Value::Object(declaration)
            })
            .collect();
        body.insert(
            "tools".into(),
            json!([{ "functionDeclarations": declarations }]),
        );
    }
    if let Some(choice) = openai::tool_choice(request)? {
        let config = match choice {
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Required => json!({"mode": "ANY"}),
            ToolChoice::Function(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
        };
        body.insert(
            "toolConfig".into(),
            json!({ "functionCallingConfig": config }),
        );
    }
    let generation = generation_config(request, model)?;
    if !generation.is_empty() {
        body.insert("generationConfig".into(), Value::Object(generation));
    }
    // Serialising a Value into a Vec cannot fail.
    Ok(serde_json::to_vec(&Value::Object(body)).unwrap_or_default())
}

fn generation_config(
    request: &ParsedRequest<'_>,
    model: &str,
) -> Result<Map<String, Value>, ApiError> {
    let object = &request.object;
    let mut config = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(value) = get::<f64>(object, from)? {
            config.insert(to.into(), json!(value));
        }
    }
    if let Some(seed) = get::<i64>(object, "seed")? {
        config.insert("seed".into(), json!(seed));
    }
    if let Some(n) = get::<u32>(object, "n")? {
        if n == 0 {
            return Err(ApiError::invalid_request("`n` must be at least 1").with_param("n"));
        }
        config.insert("candidateCount".into(), json!(n));
    }
    if let Some(max) = request.max_output_tokens {
        config.insert("maxOutputTokens".into(), json!(max));
    }
    let stop = openai::stop(request)?;
    if !stop.is_empty() {
        config.insert("stopSequences".into(), json!(stop));
    }
    if get::<bool>(object, "logprobs")?.unwrap_or(false) {
        config.insert("responseLogprobs".into(), Value::Bool(true));
        if let Some(top) = get::<u32>(object, "top_logprobs")? {
            config.insert("logprobs".into(), json!(top));
        }
    }
    match get::<ResponseFormat>(object, "response_format")? {
        None => {}
        Some(ResponseFormat::Text) => {
            config.insert("responseMimeType".into(), json!("text/plain"));
        }
        Some(ResponseFormat::JsonObject) => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            config.insert("responseMimeType".into(), json!("application/json"));
            if let Some(schema) = json_schema.schema {
                config.insert("responseJsonSchema".into(), schema);
            }
        }
    }
    if let Some(effort) = openai::reasoning_effort(request)? {
        config.insert("thinkingConfig".into(), thinking_config(&effort, model));
    }
    Ok(config)
}

/// `reasoning_effort` → `thinkingLevel` (Gemini 3) or `thinkingBudget` (2.5), as Envoy maps it.
fn thinking_config(effort: &str, model: &str) -> Value {
    if is_gemini_3(model) {
        let level = match effort {
            "none" | "minimal" => "MINIMAL",
            "low" => "LOW",
            "medium" => "MEDIUM",
            _ => "HIGH",
        };
        return json!({ "thinkingLevel": level });
    }
    // 2.5 Pro cannot switch thinking off (minimum 128) and allows up to 32768; Flash caps at 24576.
    let pro = model.contains("pro");
    let budget = match effort {
        "none" | "minimal" if pro => 128,
        "none" | "minimal" => 0,
        "low" => 1024,
        "medium" => 8192,
        "xhigh" if pro => 32768,
        _ => 24576,
    };
    json!({ "thinkingBudget": budget })
}

/// Turns with the same role merged (Gemini requires user/model alternation).
#[derive(Default)]
struct Turns {
    turns: Vec<(&'static str, Vec<Value>)>,
}

impl Turns {
    fn push(&mut self, role: &'static str, parts: Vec<Value>) {
        if parts.is_empty() {
            return;
        }
        match self.turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(parts),
            _ => self.turns.push((role, parts)),
        }
    }

    fn into_json(self) -> Vec<Value> {
        self.turns
            .into_iter()
            .map(|(role, parts)| json!({ "role": role, "parts": parts }))
            .collect()
    }
}

/// Splits a tool call id into the id Gemini gave (or we made) and the thought signature.
pub fn split_call_id(id: &str) -> (&str, Option<&str>) {
    match id.split_once(THOUGHT_SIGNATURE_SEPARATOR) {
        Some((id, signature)) if !signature.is_empty() => (id, Some(signature)),
        _ => (id, None),
    }
}

/// `systemInstruction` parts and `contents`.
fn contents(
    messages: &[openai::Message],
    model: &str,
) -> Result<(Vec<Value>, Vec<Value>), ApiError> {
    let mut system = Vec::new();
    let mut turns = Turns::default();
    // Tool call id → function name, for tool results (Gemini's functionResponse needs the name);
    // a later call with the same id wins. A map: a body can hold many thousands of calls.
    let mut call_names: HashMap<String, String> = HashMap::new();
    for (i, message) in messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        match message.role.as_str() {
            "system" | "developer" => {
                let text = message.text(&field)?;
                if !text.is_empty() {
                    system.push(json!({ "text": text }));
                }
            }
            "user" => {
                let parts = match message.content(&field)? {
                    None => Vec::new(),
                    Some(Content::Text(text)) => vec![json!({ "text": text })],
                    Some(Content::Parts(parts)) => parts
                        .into_iter()
                        .enumerate()
                        .map(|(j, part)| user_part(part, &format!("{field}.content[{j}]")))
                        .collect::<Result<_, _>>()?,
                };
                turns.push("user", parts);
            }
            "assistant" => {
                let mut parts = Vec::new();
                let text = message.assistant_text(&field)?;
                if !text.is_empty() {
                    parts.push(json!({ "text": text }));
                }
                for (j, call) in message.tool_calls.iter().flatten().enumerate() {
                    let args = call.arguments_object(&format!("{field}.tool_calls[{j}]"))?;
                    let (id, signature) = split_call_id(&call.id);
                    call_names.insert(call.id.clone(), call.function.name.clone());
                    let mut part = json!({
                        "functionCall": { "id": id, "name": call.function.name, "args": args }
                    });
                    // Gemini 3 checks the signature on the first call of each turn.
                    let signature =
                        signature.or((j == 0 && is_gemini_3(model)).then_some(SKIP_SIGNATURE));
                    if let Some(signature) = signature {
                        part["thoughtSignature"] = json!(signature);
                    }
                    parts.push(part);
                }
                turns.push("model", parts);
            }
            "tool" => {
                let call_id = message.tool_call_id.as_deref().ok_or_else(|| {
                    ApiError::invalid_request(format!("`{field}.tool_call_id` is required"))
                        .with_param(format!("{field}.tool_call_id"))
                })?;
                let name = call_names
                    .get(call_id)
                    .cloned()
                    .or_else(|| message.name.clone())
                    .ok_or_else(|| {
                        ApiError::invalid_request(format!(
                            "`{field}.tool_call_id` {call_id:?} does not match a tool call of an earlier assistant message"
                        ))
                        .with_param(format!("{field}.tool_call_id"))
                    })?;
                let output = message.text(&field)?;
                let (id, _) = split_call_id(call_id);
                turns.push(
                    "user",
                    vec![json!({
                        "functionResponse": { "id": id, "name": name, "response": { "output": output } }
                    })],
                );
            }
            other => {
                return Err(ApiError::invalid_request(format!(
                    "`{field}.role` must be system, developer, user, assistant or tool, got `{other}`"
                ))
                .with_param(format!("{field}.role")));
            }
        }
    }
    let contents = turns.into_json();
    if contents.is_empty() {
        return Err(ApiError::invalid_request(
            "`messages` must contain at least one user or assistant message",
        )
        .with_param("messages"));
    }
    Ok((system, contents))
}

/// The MIME type of a linked file, from its extension.
fn mime_of_url(url: &str) -> &'static str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .to_ascii_lowercase();
    let ext = path.rsplit('.').next().unwrap_or("");
    match ext {
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "pdf" => "application/pdf",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        _ => "image/jpeg",
    }
}

fn user_part(part: ContentPart, field: &str) -> Result<Value, ApiError> {
    match part {
        ContentPart::Text { text } => Ok(json!({ "text": text })),
        ContentPart::ImageUrl { image_url } => {
            let url = image_url.url;
            if let Some((mime, data)) = openai::split_data_url(&url) {
                Ok(json!({ "inlineData": { "mimeType": mime, "data": data } }))
            } else if url.starts_with("https://")
                || url.starts_with("http://")
                || url.starts_with("gs://")
            {
                Ok(json!({ "fileData": { "mimeType": mime_of_url(&url), "fileUri": url } }))
            } else {
                Err(ApiError::invalid_request(format!(
                    "`{field}.image_url.url` must be a base64 data URL or an http(s) URL"
                ))
                .with_param(format!("{field}.image_url.url")))
            }
        }
        ContentPart::InputAudio { input_audio } => Ok(json!({
            "inlineData": { "mimeType": format!("audio/{}", input_audio.format), "data": input_audio.data }
        })),
        ContentPart::File { file } => match (file.file_data, file.file_id) {
            (Some(data), _) => {
                let (mime, data) = openai::split_data_url(&data).ok_or_else(|| {
                    ApiError::invalid_request(format!(
                        "`{field}.file.file_data` must be a base64 data URL (data:application/pdf;base64,...)"
                    ))
                    .with_param(format!("{field}.file.file_data"))
                })?;
                Ok(json!({ "inlineData": { "mimeType": mime, "data": data } }))
            }
            (None, Some(_)) => Err(unsupported(
                &format!("{field}.file.file_id"),
                PROVIDER,
                "send the file inline as `file_data`",
            )),
            (None, None) => Err(ApiError::invalid_request(format!(
                "`{field}.file` needs `file_data`"
            ))
            .with_param(format!("{field}.file"))),
        },
        ContentPart::Refusal { .. } => Err(ApiError::invalid_request(format!(
            "`{field}`: refusal parts belong to assistant messages"
        ))
        .with_param(field.to_owned())),
    }
}

// ---------------------------------------------------------------------------------------------
// Answers

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
    model_version: Option<String>,
    response_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<CandidateContent>,
    finish_reason: Option<String>,
    index: Option<u32>,
    logprobs_result: Option<LogprobsResult>,
}

#[derive(Debug, Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    #[serde(default)]
    thought: bool,
    thought_signature: Option<String>,
    function_call: Option<GeminiFunctionCall>,
}

#[derive(Debug, Deserialize)]
struct GeminiFunctionCall {
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UsageMetadata {
    prompt_token_count: u64,
    candidates_token_count: u64,
    thoughts_token_count: u64,
    cached_content_token_count: u64,
    tool_use_prompt_token_count: u64,
    total_token_count: u64,
}

impl UsageMetadata {
    /// OpenAI's counts: reasoning tokens are part of the completion, tool-use prompt tokens of
    /// the prompt (so that prompt + completion = total, as OpenAI clients expect).
    pub fn usage(&self) -> Usage {
        // Saturating: the counts come from the upstream.
        let prompt_tokens = self
            .prompt_token_count
            .saturating_add(self.tool_use_prompt_token_count);
        let completion_tokens = self
            .candidates_token_count
            .saturating_add(self.thoughts_token_count);
        let total_tokens = if self.total_token_count > 0 {
            self.total_token_count
        } else {
            prompt_tokens.saturating_add(completion_tokens)
        };
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
            // Gemini counts cached tokens inside `promptTokenCount`, as OpenAI does.
            cache_read_tokens: self.cached_content_token_count,
            // Context caches are created apart (`cachedContents`), never by a generation.
            cache_write_tokens: 0,
            reasoning_tokens: self.thoughts_token_count,
        }
    }

    fn to_json(self) -> Value {
        let usage = self.usage();
        json!({
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_content_token_count },
            "completion_tokens_details": { "reasoning_tokens": self.thoughts_token_count }
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogprobsResult {
    #[serde(default)]
    top_candidates: Vec<TopCandidates>,
    #[serde(default)]
    chosen_candidates: Vec<LogprobCandidate>,
}

#[derive(Debug, Deserialize)]
struct TopCandidates {
    #[serde(default)]
    candidates: Vec<LogprobCandidate>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogprobCandidate {
    #[serde(default)]
    token: String,
    #[serde(default)]
    log_probability: f64,
}

fn token_logprob(c: &LogprobCandidate) -> Value {
    json!({ "token": c.token, "logprob": c.log_probability, "bytes": c.token.as_bytes() })
}

fn logprobs_json(result: &LogprobsResult) -> Value {
    let content: Vec<Value> = result
        .chosen_candidates
        .iter()
        .enumerate()
        .map(|(i, chosen)| {
            let mut entry = token_logprob(chosen);
            let top: Vec<Value> = result
                .top_candidates
                .get(i)
                .map(|t| t.candidates.iter().map(token_logprob).collect())
                .unwrap_or_default();
            entry["top_logprobs"] = Value::Array(top);
            entry
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

fn block_reason(feedback: Option<&PromptFeedback>) -> Option<&str> {
    feedback.and_then(|f| f.block_reason.as_deref())
}

/// OpenAI's finish reason for a Gemini one (`None` while the candidate is still going).
fn finish_reason(reason: Option<&str>, called_tools: bool) -> Option<&'static str> {
    Some(match reason? {
        "MAX_TOKENS" => "length",
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => "content_filter",
        _ if called_tools => "tool_calls",
        // STOP and the rest (MALFORMED_FUNCTION_CALL, LANGUAGE, OTHER...): strict OpenAI clients
        // reject values outside their enum.
        _ => "stop",
    })
}

fn tool_call_json(
    call: GeminiFunctionCall,
    signature: Option<String>,
    index: Option<usize>,
) -> Value {
    let mut id = call
        .id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(new_call_id);
    if let Some(signature) = signature {
        id.push_str(THOUGHT_SIGNATURE_SEPARATOR);
        id.push_str(&signature);
    }
    let arguments = call
        .args
        .map_or_else(|| "{}".to_owned(), |args| args.to_string());
    let mut value = json!({
        "id": id,
        "type": "function",
        "function": { "name": call.name, "arguments": arguments }
    });
    if let Some(index) = index {
        value["index"] = json!(index);
    }
    value
}

fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString as _};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

fn completion_id(response_id: Option<&str>) -> String {
    match response_id {
        Some(id) if !id.is_empty() => format!("chatcmpl-{id}"),
        _ => {
            use rand::distr::{Alphanumeric, SampleString as _};
            format!(
                "chatcmpl-{}",
                Alphanumeric.sample_string(&mut rand::rng(), 24)
            )
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The choice index of the candidate at `position`: its own `index`, else its position; past
/// `max_index` (`--max-upstream-index`) an error.
fn choice_index(
    candidate_index: Option<u32>,
    position: usize,
    max_index: u32,
) -> Result<usize, ApiError> {
    let index = candidate_index.map_or(position as u64, u64::from);
    if index > u64::from(max_index) {
        return Err(sse::index_too_large(
            PROVIDER,
            "candidate index",
            index,
            max_index,
        ));
    }
    // At most `max_index`, a u32: fits a usize on every supported target.
    Ok(usize::try_from(index).unwrap_or(usize::MAX))
}

/// A non-streamed Gemini answer as an OpenAI chat completion (`model` names the remote model
/// when Gemini does not say which version answered). Candidate indexes past `max_index`
/// (`--max-upstream-index`) are refused.
pub fn answer(
    body: &[u8],
    model: &str,
    max_index: u32,
) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
    let response: GenerateContentResponse = serde_json::from_slice(body).map_err(|e| {
        ApiError::upstream_bad_answer(PROVIDER, format!("not a GenerateContentResponse: {e}"))
    })?;
    let mut choices = Vec::with_capacity(response.candidates.len().max(1));
    for (position, candidate) in response.candidates.into_iter().enumerate() {
        let index = choice_index(candidate.index, position, max_index)?;
        let mut text: Option<String> = None;
        let mut calls = Vec::new();
        for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
            if part.thought {
                continue;
            }
            if let Some(t) = part.text {
                text.get_or_insert_with(String::new).push_str(&t);
            }
            if let Some(call) = part.function_call {
                calls.push(tool_call_json(call, part.thought_signature, None));
            }
        }
        let finish = finish_reason(
            Some(candidate.finish_reason.as_deref().unwrap_or("STOP")),
            !calls.is_empty(),
        );
        let mut message = json!({ "role": "assistant", "content": text, "refusal": null });
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        choices.push(json!({
            "index": index,
            "message": message,
            "logprobs": candidate.logprobs_result.as_ref().map(logprobs_json),
            "finish_reason": finish,
        }));
    }
    if choices.is_empty() {
        if let Some(reason) = block_reason(response.prompt_feedback.as_ref()) {
            return Err(ApiError::prompt_blocked(PROVIDER, reason));
        }
        choices.push(json!({
            "index": 0,
            "message": { "role": "assistant", "content": null, "refusal": null },
            "logprobs": null,
            "finish_reason": "stop",
        }));
    }
    let usage = response.usage_metadata.unwrap_or_default();
    let out = json!({
        "id": completion_id(response.response_id.as_deref()),
        "object": "chat.completion",
        "created": now_unix(),
        "model": response.model_version.as_deref().unwrap_or(model),
        "choices": choices,
        "usage": usage.to_json(),
        "system_fingerprint": null,
    });
    let usage = response.usage_metadata.map(|u| u.usage());
    Ok((serde_json::to_vec(&out).unwrap_or_default(), usage))
}

// ---------------------------------------------------------------------------------------------
// Streams

#[derive(Debug, Default, Clone, Copy)]
struct ChoiceState {
    started: bool,
    tool_calls: usize,
    finished: bool,
}

/// Translates `streamGenerateContent?alt=sse` events to OpenAI chunks (wire formats §6.3). Gemini
/// sends no `[DONE]`; the gateway adds it when the upstream closes after every candidate finished.
#[derive(Debug)]
pub struct GeminiStream {
    splitter: EventSplitter,
    /// Its id comes from the first event's `responseId`, its model from `modelVersion`.
    writer: ChunkWriter,
    id_known: bool,
    model_from_upstream: bool,
    /// By choice index, at most `max_index + 1` long.
    choices: Vec<ChoiceState>,
    usage: Option<UsageMetadata>,
    complete: bool,
    /// Largest candidate index and tool-call count accepted (`--max-upstream-index`).
    max_index: u32,
}

impl GeminiStream {
    /// A translator with the default [`Limits`]; see [`with_limits`](Self::with_limits).
    pub fn new(model: &str, client_wants_usage: bool) -> Self {
        Self {
            splitter: EventSplitter::default(),
            writer: ChunkWriter {
                id: String::new(),
                created: now_unix(),
                model: model.to_owned(),
                client_wants_usage,
            },
            id_known: false,
            model_from_upstream: false,
            choices: Vec::new(),
            usage: None,
            complete: false,
            max_index: Limits::default().max_upstream_index,
        }
    }

    /// Applies `--max-stream-event-bytes` and `--max-upstream-index`.
    pub fn with_limits(mut self, limits: &Limits) -> Self {
        self.splitter = EventSplitter::new(limits.max_stream_event_bytes);
        self.max_index = limits.max_upstream_index;
        self
    }

    fn chunk(&self, choices: Value, out: &mut BytesMut) {
        self.writer.choices(choices, out);
    }

    /// The state of choice `index`, which [`choice_index`] bounded by `max_index`: the vector
    /// never grows past `max_index + 1` entries, whatever index the upstream sends.
    fn choice_state(&mut self, index: usize) -> &mut ChoiceState {
        if self.choices.len() <= index {
            self.choices.resize(index + 1, ChoiceState::default());
        }
        &mut self.choices[index]
    }

    /// The role chunk OpenAI streams open each choice with.
    fn start_choice(&mut self, index: usize, out: &mut BytesMut) {
        if !self.choice_state(index).started {
            self.choice_state(index).started = true;
            self.chunk(
                json!([{ "index": index, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]),
                out,
            );
        }
    }

    fn finish_choice(&mut self, index: usize, reason: &'static str, out: &mut BytesMut) {
        self.choice_state(index).finished = true;
        self.chunk(
            json!([{ "index": index, "delta": {}, "logprobs": null, "finish_reason": reason }]),
            out,
        );
    }

    fn event(&mut self, data: &str, out: &mut BytesMut) -> Result<(), ApiError> {
        let value: Value = serde_json::from_str(data).map_err(|e| {
            ApiError::upstream_bad_answer(PROVIDER, format!("a stream event is not JSON: {e}"))
        })?;
        if value.get("error").is_some() {
            return Err(google_error(None, &value));
        }
        let response: GenerateContentResponse = serde_json::from_value(value).map_err(|e| {
            ApiError::upstream_bad_answer(
                PROVIDER,
                format!("a stream event is not a GenerateContentResponse: {e}"),
            )
        })?;
        if !self.id_known {
            self.writer.id = completion_id(response.response_id.as_deref());
            self.id_known = true;
        }
        if !self.model_from_upstream
            && let Some(version) = response.model_version
        {
            self.writer.model = version;
            self.model_from_upstream = true;
        }
        if response.usage_metadata.is_some() {
            self.usage = response.usage_metadata;
        }
        if response.candidates.is_empty()
            && let Some(reason) = block_reason(response.prompt_feedback.as_ref())
        {
            // Arrives as the first event: the gateway answers 400 before any stream starts.
            return Err(ApiError::prompt_blocked(PROVIDER, reason));
        }
        for (position, candidate) in response.candidates.into_iter().enumerate() {
            let index = choice_index(candidate.index, position, self.max_index)?;
            self.start_choice(index, out);
            let mut text = String::new();
            let mut calls = Vec::new();
            for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
                if part.thought {
                    continue;
                }
                if let Some(t) = part.text {
                    text.push_str(&t);
                }
                if let Some(call) = part.function_call {
                    let k = self.choice_state(index).tool_calls;
                    if k > self.max_index as usize {
                        return Err(sse::index_too_large(
                            PROVIDER,
                            "tool call index",
                            k as u64,
                            self.max_index,
                        ));
                    }
                    self.choice_state(index).tool_calls = k + 1;
                    calls.push(tool_call_json(call, part.thought_signature, Some(k)));
                }
            }
            let logprobs = candidate.logprobs_result.as_ref().map(logprobs_json);
            if !text.is_empty() || logprobs.is_some() {
                self.chunk(
                    json!([{ "index": index, "delta": { "content": text }, "logprobs": logprobs, "finish_reason": null }]),
                    out,
                );
            }
            if !calls.is_empty() {
                self.chunk(
                    json!([{ "index": index, "delta": { "tool_calls": calls }, "logprobs": null, "finish_reason": null }]),
                    out,
                );
            }
            let called = self.choice_state(index).tool_calls > 0;
            if let Some(reason) = finish_reason(candidate.finish_reason.as_deref(), called)
                && !self.choice_state(index).finished
            {
                self.finish_choice(index, reason, out);
            }
        }
        Ok(())
    }
}

impl StreamTranslator for GeminiStream {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        self.splitter.push(chunk);
        while let Some(event) = self.splitter.next_event() {
            if let Some(data) = sse::data_of(&event) {
                self.event(&data, out)?;
            }
        }
        if self.splitter.overflowed() {
            return Err(sse::event_too_large(
                PROVIDER,
                self.splitter.max_event_bytes(),
            ));
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        if let Some(rest) = self.splitter.finish()
            && let Some(data) = sse::data_of(&rest)
        {
            self.event(&data, out)?;
        }
        if self.choices.is_empty() || self.choices.iter().any(|c| c.started && !c.finished) {
            return Err(sse::stream_truncated(
                PROVIDER,
                "a finishReason for every candidate",
            ));
        }
        self.writer
            .end(self.usage.unwrap_or_default().to_json(), out);
        self.complete = true;
        Ok(())
    }

    fn complete(&self) -> bool {
        self.complete
    }

    fn usage(&self) -> Option<Usage> {
        self.usage.map(|u| u.usage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_upstream_index: u32) -> Limits {
        Limits {
            max_upstream_index,
            ..Limits::default()
        }
    }

    fn event(json: &str) -> Vec<u8> {
        format!("data: {json}\r\n\r\n").into_bytes()
    }

    #[test]
    fn a_huge_candidate_index_is_refused_without_allocating_for_it() {
        let mut stream = GeminiStream::new("gemini-2.5-flash", false);
        let mut out = BytesMut::new();
        let err = stream
            .push(
                &event(
                    r#"{"candidates":[{"index":4000000000,"content":{"parts":[{"text":"x"}]}}]}"#,
                ),
                &mut out,
            )
            .unwrap_err();
        assert_eq!(err.status, http::StatusCode::BAD_GATEWAY);
        assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
        assert!(
            err.message.contains(
                "candidate index 4000000000 exceeds the limit of 1024 (--max-upstream-index)"
            ),
            "{}",
            err.message
        );
        assert!(stream.choices.capacity() <= 1025);
        let err = answer(
            br#"{"candidates":[{"index":4000000000,"content":{"parts":[{"text":"x"}]}}]}"#,
            "gemini-2.5-flash",
            1024,
        )
        .unwrap_err();
        assert!(
            err.message.contains("candidate index 4000000000"),
            "{}",
            err.message
        );
    }

    #[test]
    fn indexes_up_to_the_limit_pass_and_one_past_it_does_not() {
        let mut stream = GeminiStream::new("m", false).with_limits(&limits(2));
        let mut out = BytesMut::new();
        stream
            .push(
                &event(r#"{"candidates":[{"index":2,"content":{"parts":[{"text":"x"}]}}]}"#),
                &mut out,
            )
            .unwrap();
        assert_eq!(stream.choices.len(), 3);
        assert!(
            stream
                .push(&event(r#"{"candidates":[{"index":3}]}"#), &mut out)
                .is_err()
        );
        // Positions count too: four candidates without an index are indexes 0..=3.
        let mut stream = GeminiStream::new("m", false).with_limits(&limits(2));
        assert!(
            stream
                .push(&event(r#"{"candidates":[{},{},{},{}]}"#), &mut out)
                .is_err()
        );
        assert!(answer(br#"{"candidates":[{"index":2}]}"#, "m", 2).is_ok());
        assert!(answer(br#"{"candidates":[{},{},{},{}]}"#, "m", 2).is_err());
    }

    #[test]
    fn tool_calls_past_the_limit_are_refused() {
        let call = r#"{"functionCall":{"name":"f","args":{}}}"#;
        let parts = [call; 3].join(",");
        let mut stream = GeminiStream::new("m", false).with_limits(&limits(1));
        let mut out = BytesMut::new();
        let err = stream
            .push(
                &event(&format!(
                    r#"{{"candidates":[{{"content":{{"parts":[{parts}]}}}}]}}"#
                )),
                &mut out,
            )
            .unwrap_err();
        assert!(
            err.message
                .contains("tool call index 2 exceeds the limit of 1"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_stream_without_a_finish_reason_ends_in_an_error() {
        let mut stream = GeminiStream::new("m", false);
        let mut out = BytesMut::new();
        stream
            .push(
                &event(r#"{"candidates":[{"content":{"parts":[{"text":"Once"}]}}]}"#),
                &mut out,
            )
            .unwrap();
        let err = stream.finish(&mut out).unwrap_err();
        assert_eq!(err.code.as_deref(), Some("upstream_invalid_response"));
        assert!(err.message.contains("finishReason"), "{}", err.message);
        assert!(!stream.complete());
    }

    #[test]
    fn an_event_past_the_event_limit_is_refused() {
        let mut stream = GeminiStream::new("m", false).with_limits(&Limits {
            max_stream_event_bytes: 100,
            ..Limits::default()
        });
        let mut out = BytesMut::new();
        let err = stream.push(&[b'a'; 101], &mut out).unwrap_err();
        assert!(
            err.message.contains("100 bytes (--max-stream-event-bytes)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn usage_has_every_kind_gemini_reports_and_thoughts_are_completion_tokens() {
        // wire formats §3.3, with a cache hit and a tool-use prompt.
        let body = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Let me think...","thought":true},{"text":"It is 21 degrees.","thoughtSignature":"EjQK"}]},"finishReason":"STOP","index":0}],
            "usageMetadata":{"promptTokenCount":15,"candidatesTokenCount":6,"thoughtsTokenCount":40,"cachedContentTokenCount":5,"toolUsePromptTokenCount":3,"totalTokenCount":64,
                "promptTokensDetails":[{"modality":"TEXT","tokenCount":15}],"cacheTokensDetails":[{"modality":"TEXT","tokenCount":5}]},
            "modelVersion":"gemini-2.5-flash","responseId":"r1"}"#;
        let expected = Usage {
            prompt_tokens: 15 + 3,
            completion_tokens: 6 + 40,
            total_tokens: 64,
            cache_read_tokens: 5,
            cache_write_tokens: 0,
            reasoning_tokens: 40,
        };
        let (out, usage) = answer(body, "gemini-2.5-flash", 8).unwrap();
        assert_eq!(usage, Some(expected));
        // Anthropic and Responses clients get the counts read back from the OpenAI answer.
        let reply = crate::conversation::openai_chat::parse_reply(&out, PROVIDER).unwrap();
        assert_eq!(reply.usage.reported_usage(), Some(expected));

        // Streamed: the last chunk's usageMetadata.
        let mut stream = GeminiStream::new("gemini-2.5-flash", true);
        let mut out = BytesMut::new();
        stream
            .push(
                concat!(
                    "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"It is\"}],\"role\":\"model\"},\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":9,\"totalTokenCount\":9}}\r\n\r\n",
                    "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\" 21\"}],\"role\":\"model\"},\"finishReason\":\"STOP\",\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":5,\"thoughtsTokenCount\":12,\"cachedContentTokenCount\":4,\"totalTokenCount\":26}}\r\n\r\n",
                )
                .as_bytes(),
                &mut out,
            )
            .unwrap();
        stream.finish(&mut out).unwrap();
        assert_eq!(
            stream.usage(),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 17,
                total_tokens: 26,
                cache_read_tokens: 4,
                cache_write_tokens: 0,
                reasoning_tokens: 12,
            })
        );
    }

    #[test]
    fn usage_sums_saturate() {
        let usage: UsageMetadata = serde_json::from_str(&format!(
            r#"{{"promptTokenCount":{max},"toolUsePromptTokenCount":{max},"candidatesTokenCount":{max},"thoughtsTokenCount":1}}"#,
            max = u64::MAX
        ))
        .unwrap();
        let usage = usage.usage();
        assert_eq!(usage.prompt_tokens, u64::MAX);
        assert_eq!(usage.completion_tokens, u64::MAX);
        assert_eq!(usage.total_tokens, u64::MAX);
    }
}
