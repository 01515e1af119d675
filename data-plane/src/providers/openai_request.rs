//! The OpenAI Chat Completions and Embeddings requests, typed, for adapters that translate them
//! to another provider's format (Google, Bedrock). OpenAI-format upstreams never parse them: their
//! body goes upstream byte for byte.
//!
//! Every parse error names the offending field (`messages[2].content[1]`, `tool_choice`...).

use crate::body::{ParsedRequest, RawObject};
use crate::errors::ApiError;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

/// A 400 that names the field, with `code: unsupported_parameter` when the field is valid OpenAI
/// but the provider has no equivalent.
pub fn unsupported(field: &str, provider: &str, hint: &str) -> ApiError {
    let mut message = format!("`{field}` is not supported for {provider} models");
    if !hint.is_empty() {
        message.push_str("; ");
        message.push_str(hint);
    }
    ApiError::invalid_request(message)
        .with_param(field)
        .with_code("unsupported_parameter")
}

fn invalid(field: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_request(format!("`{field}`: {what}")).with_param(field)
}

/// Parses `raw` as `T`, naming `field` in the error.
pub fn parse_as<T: DeserializeOwned>(raw: &RawValue, field: &str) -> Result<T, ApiError> {
    serde_json::from_str(raw.get()).map_err(|e| invalid(field, e))
}

/// The top-level field `key` as `T`; JSON `null` counts as absent.
pub fn get<T: DeserializeOwned>(object: &RawObject<'_>, key: &str) -> Result<Option<T>, ApiError> {
    match object.get(key) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => parse_as(raw, key).map(Some),
    }
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Box<RawValue>>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: FunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

/// One part of a multi-part `content`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
    InputAudio { input_audio: InputAudio },
    File { file: FileInput },
    Refusal { refusal: String },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InputAudio {
    pub data: String,
    pub format: String,
}

#[derive(Debug, Deserialize)]
pub struct FileInput {
    #[serde(default)]
    pub file_data: Option<String>,
    #[serde(default)]
    pub file_id: Option<String>,
    #[serde(default)]
    pub filename: Option<String>,
}

/// A message's `content`: a string or a list of parts.
#[derive(Debug)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl Message {
    /// The parsed `content` (`None` when absent or null); `field` is `messages[i]`.
    pub fn content(&self, field: &str) -> Result<Option<Content>, ApiError> {
        let Some(raw) = &self.content else {
            return Ok(None);
        };
        let text = raw.get().trim_start();
        if text.starts_with('"') {
            parse_as(raw, &format!("{field}.content")).map(|s| Some(Content::Text(s)))
        } else if text.starts_with('[') {
            let parts: Vec<Box<RawValue>> = parse_as(raw, &format!("{field}.content"))?;
            parts
                .iter()
                .enumerate()
                .map(|(j, part)| parse_as(part, &format!("{field}.content[{j}]")))
                .collect::<Result<Vec<_>, _>>()
                .map(|parts| Some(Content::Parts(parts)))
        } else if text == "null" {
            Ok(None)
        } else {
            Err(invalid(
                &format!("{field}.content"),
                "must be a string or an array of content parts",
            ))
        }
    }

    /// The content as plain text: a string, or text parts joined (for system and tool messages).
    pub fn text(&self, field: &str) -> Result<String, ApiError> {
        match self.content(field)? {
            None => Ok(String::new()),
            Some(Content::Text(text)) => Ok(text),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match part {
                        ContentPart::Text { text } => out.push_str(&text),
                        _ => {
                            return Err(invalid(
                                &format!("{field}.content[{j}]"),
                                format!("only text parts are allowed in a {} message", self.role),
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

impl Message {
    /// An assistant message's text: a string, or its text and refusal parts joined.
    pub fn assistant_text(&self, field: &str) -> Result<String, ApiError> {
        match self.content(field)? {
            None => Ok(String::new()),
            Some(Content::Text(text)) => Ok(text),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match part {
                        ContentPart::Text { text: t } => text.push_str(&t),
                        ContentPart::Refusal { refusal } => text.push_str(&refusal),
                        _ => {
                            return Err(invalid(
                                &format!("{field}.content[{j}]"),
                                "assistant messages take only text and refusal parts",
                            ));
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

impl ToolCall {
    /// `arguments` as a JSON object (`{}` when empty); `field` names the call
    /// (`messages[i].tool_calls[j]`).
    pub fn arguments_object(&self, field: &str) -> Result<Value, ApiError> {
        let field = format!("{field}.function.arguments");
        if self.function.arguments.trim().is_empty() {
            return Ok(Value::Object(serde_json::Map::new()));
        }
        let value: Value = serde_json::from_str(&self.function.arguments)
            .map_err(|e| invalid(&field, format!("is not valid JSON: {e}")))?;
        if value.is_object() {
            Ok(value)
        } else {
            Err(invalid(&field, "must be a JSON object"))
        }
    }
}

/// `reasoning_effort`, checked against OpenAI's values.
pub fn reasoning_effort(request: &ParsedRequest<'_>) -> Result<Option<String>, ApiError> {
    const KNOWN: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];
    let effort: Option<String> = get(&request.object, "reasoning_effort")?;
    match effort {
        Some(effort) if !KNOWN.contains(&effort.as_str()) => Err(invalid(
            "reasoning_effort",
            format!("must be one of {}, got `{effort}`", KNOWN.join(", ")),
        )),
        effort => Ok(effort),
    }
}

/// `messages`, each parsed on its own so that errors name the index.
pub fn messages(request: &ParsedRequest<'_>) -> Result<Vec<Message>, ApiError> {
    let raw: Vec<Box<RawValue>> = get(&request.object, "messages")?.ok_or_else(|| {
        ApiError::invalid_request("`messages` is required").with_param("messages")
    })?;
    if raw.is_empty() {
        return Err(
            ApiError::invalid_request("`messages` must not be empty").with_param("messages")
        );
    }
    raw.iter()
        .enumerate()
        .map(|(i, m)| parse_as(m, &format!("messages[{i}]")))
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub function: Option<FunctionDefinition>,
}

#[derive(Debug, Deserialize)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tools`: function tools only.
pub fn tools(request: &ParsedRequest<'_>) -> Result<Vec<FunctionDefinition>, ApiError> {
    let tools: Vec<Tool> = get(&request.object, "tools")?.unwrap_or_default();
    tools
        .into_iter()
        .enumerate()
        .map(|(i, tool)| match (tool.kind.as_str(), tool.function) {
            ("function", Some(function)) => Ok(function),
            ("function", None) => Err(invalid(&format!("tools[{i}].function"), "is required")),
            (other, _) => Err(invalid(
                &format!("tools[{i}].type"),
                format!("only `function` tools are supported, got `{other}`"),
            )),
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

#[derive(Deserialize)]
struct NamedToolChoice {
    #[serde(rename = "type")]
    kind: String,
    function: Option<NamedFunction>,
}

#[derive(Deserialize)]
struct NamedFunction {
    name: String,
}

pub fn tool_choice(request: &ParsedRequest<'_>) -> Result<Option<ToolChoice>, ApiError> {
    let Some(raw) = request.object.get("tool_choice") else {
        return Ok(None);
    };
    if raw.get() == "null" {
        return Ok(None);
    }
    if raw.get().trim_start().starts_with('"') {
        let choice: String = parse_as(raw, "tool_choice")?;
        return match choice.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            "required" => Ok(Some(ToolChoice::Required)),
            other => Err(invalid(
                "tool_choice",
                format!("must be auto, none, required or a function, got `{other}`"),
            )),
        };
    }
    let named: NamedToolChoice = parse_as(raw, "tool_choice")?;
    match (named.kind.as_str(), named.function) {
        ("function", Some(f)) => Ok(Some(ToolChoice::Function(f.name))),
        (kind, _) => Err(invalid(
            "tool_choice",
            format!(
                "only {{\"type\":\"function\",\"function\":{{\"name\":...}}}} is supported, got type `{kind}`"
            ),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchema },
}

#[derive(Debug, Deserialize)]
pub struct JsonSchema {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `stop`: a string or a list of strings.
pub fn stop(request: &ParsedRequest<'_>) -> Result<Vec<String>, ApiError> {
    let Some(raw) = request.object.get("stop") else {
        return Ok(Vec::new());
    };
    match raw.get().trim_start().as_bytes().first() {
        Some(b'"') => parse_as::<String>(raw, "stop").map(|s| vec![s]),
        Some(b'n') => Ok(Vec::new()),
        _ => parse_as(raw, "stop"),
    }
}

/// Embeddings `input`, which translating providers only take as text.
pub fn embedding_inputs(
    request: &ParsedRequest<'_>,
    provider: &str,
) -> Result<Vec<String>, ApiError> {
    let raw = request
        .object
        .get("input")
        .ok_or_else(|| ApiError::invalid_request("`input` is required").with_param("input"))?;
    let value: Value = parse_as(raw, "input")?;
    let texts = match value {
        Value::String(s) => vec![s],
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        Value::Array(_) => {
            return Err(unsupported(
                "input",
                provider,
                "send text (a string or a list of strings), not token arrays",
            ));
        }
        _ => {
            return Err(invalid("input", "must be a string or a list of strings"));
        }
    };
    if texts.is_empty() {
        return Err(invalid("input", "must not be empty"));
    }
    Ok(texts)
}

/// `encoding_format` of an embeddings request: true for base64.
pub fn wants_base64(request: &ParsedRequest<'_>) -> Result<bool, ApiError> {
    match get::<String>(&request.object, "encoding_format")?.as_deref() {
        None | Some("float") => Ok(false),
        Some("base64") => Ok(true),
        Some(other) => Err(invalid(
            "encoding_format",
            format!("must be float or base64, got `{other}`"),
        )),
    }
}

/// Float embeddings as OpenAI's base64: little-endian `f32`s.
pub fn embedding_base64(values: &[f64]) -> String {
    use base64::Engine as _;
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        // Narrowing is the format: OpenAI's base64 embeddings are float32.
        #[allow(clippy::cast_possible_truncation)]
        bytes.extend_from_slice(&(*v as f32).to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Splits a data URL `data:<mime>;base64,<data>` into (mime, base64 data).
pub fn split_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let mime = meta.strip_suffix(";base64")?;
    Some((
        if mime.is_empty() {
            "application/octet-stream"
        } else {
            mime
        },
        data,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    #[test]
    fn content_errors_name_the_message_and_part() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"video","video":{}}]}]}"#;
        let parsed = body::parse(
            body,
            true,
            crate::limits::Limits::default().max_top_level_keys,
        )
        .unwrap();
        let messages = messages(&parsed).unwrap();
        assert!(matches!(
            messages[0].content("messages[0]").unwrap(),
            Some(Content::Text(t)) if t == "hi"
        ));
        let err = messages[1].content("messages[1]").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[1].content[1]"));
        assert!(
            err.message.contains("unknown variant `video`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn tool_choice_forms() {
        for (raw, expected) in [
            (r#""auto""#, Some(ToolChoice::Auto)),
            (r#""none""#, Some(ToolChoice::None)),
            (r#""required""#, Some(ToolChoice::Required)),
            (
                r#"{"type":"function","function":{"name":"f"}}"#,
                Some(ToolChoice::Function("f".into())),
            ),
            ("null", None),
        ] {
            let body = format!(r#"{{"model":"m","tool_choice":{raw}}}"#);
            let parsed = body::parse(
                body.as_bytes(),
                true,
                crate::limits::Limits::default().max_top_level_keys,
            )
            .unwrap();
            assert_eq!(tool_choice(&parsed).unwrap(), expected, "{raw}");
        }
        let parsed = body::parse(
            br#"{"model":"m","tool_choice":"sometimes"}"#,
            true,
            crate::limits::Limits::default().max_top_level_keys,
        )
        .unwrap();
        assert_eq!(
            tool_choice(&parsed).unwrap_err().param.as_deref(),
            Some("tool_choice")
        );
    }

    #[test]
    fn data_urls_and_base64_embeddings() {
        assert_eq!(
            split_data_url("data:image/png;base64,iVBO"),
            Some(("image/png", "iVBO"))
        );
        assert_eq!(split_data_url("https://x/y.png"), None);
        assert_eq!(split_data_url("data:text/plain,hello"), None);
        assert_eq!(embedding_base64(&[1.0, -2.0]), "AACAPwAAAMA=");
    }

    #[test]
    fn token_array_inputs_are_refused_by_name() {
        let parsed = body::parse(
            br#"{"model":"m","input":[[1,2,3]]}"#,
            true,
            crate::limits::Limits::default().max_top_level_keys,
        )
        .unwrap();
        let err = embedding_inputs(&parsed, "google").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("input"));
        assert_eq!(err.code.as_deref(), Some("unsupported_parameter"));
        let parsed = body::parse(
            br#"{"model":"m","input":["a","b"]}"#,
            true,
            crate::limits::Limits::default().max_top_level_keys,
        )
        .unwrap();
        assert_eq!(embedding_inputs(&parsed, "google").unwrap(), ["a", "b"]);
    }
}
