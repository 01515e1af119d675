//! OpenAI embeddings ↔ Gemini `batchEmbedContents` and Vertex `predict` (wire formats §3.5, §4.1).
//!
//! The Gemini API reports no token counts for embeddings: usage is estimated at 4 bytes a token
//! (so that TPM limits still count them). Vertex reports `statistics.token_count` per input.

use super::Api;
use crate::body::ParsedRequest;
use crate::errors::ApiError;
use crate::providers::openai_request::{self as openai, get, unsupported};
use crate::usage::Usage;
use serde::Deserialize;
use serde_json::{Value, json};

const PROVIDER: &str = llm_proxy_catalog::Provider::Google.as_str();

#[derive(Debug)]
pub struct EmbeddingsAnswer {
    api: Api,
    model: String,
    base64: bool,
    /// Used when the answer has no token counts.
    estimated_tokens: u64,
}

/// The method, body and answer handling of an embeddings request.
pub fn request(
    request: &ParsedRequest<'_>,
    api: Api,
    model: &str,
) -> Result<(&'static str, Vec<u8>, EmbeddingsAnswer), ApiError> {
    if let Some(field) = request
        .object
        .keys()
        .find(|k| !["model", "input", "encoding_format", "dimensions", "user"].contains(k))
    {
        return Err(unsupported(field, PROVIDER, ""));
    }
    let inputs = openai::embedding_inputs(request, PROVIDER)?;
    let dimensions = get::<u32>(&request.object, "dimensions")?;
    let base64 = openai::wants_base64(request)?;
    let estimated_tokens = inputs.iter().map(|t| (t.len() as u64).div_ceil(4)).sum();
    let (method, body) = match api {
        Api::Gemini => {
            let model_name = format!("models/{}", model.strip_prefix("models/").unwrap_or(model));
            let requests: Vec<Value> = inputs
                .into_iter()
                .map(|text| {
                    let mut one =
                        json!({ "model": model_name, "content": { "parts": [{ "text": text }] } });
                    if let Some(d) = dimensions {
                        one["outputDimensionality"] = json!(d);
                    }
                    one
                })
                .collect();
            ("batchEmbedContents", json!({ "requests": requests }))
        }
        Api::Vertex => {
            let instances: Vec<Value> = inputs
                .into_iter()
                .map(|text| json!({ "content": text }))
                .collect();
            let mut body = json!({ "instances": instances });
            if let Some(d) = dimensions {
                body["parameters"] = json!({ "outputDimensionality": d });
            }
            ("predict", body)
        }
    };
    Ok((
        method,
        serde_json::to_vec(&body).unwrap_or_default(),
        EmbeddingsAnswer {
            api,
            model: model.to_owned(),
            base64,
            estimated_tokens,
        },
    ))
}

#[derive(Deserialize)]
struct Values {
    #[serde(default)]
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    embeddings: Vec<Values>,
}

#[derive(Deserialize)]
struct PredictAnswer {
    #[serde(default)]
    predictions: Vec<Prediction>,
}

#[derive(Deserialize)]
struct Prediction {
    embeddings: VertexEmbedding,
}

#[derive(Deserialize)]
struct VertexEmbedding {
    #[serde(default)]
    values: Vec<f64>,
    statistics: Option<Statistics>,
}

#[derive(Deserialize)]
struct Statistics {
    #[serde(default)]
    token_count: f64,
}

impl EmbeddingsAnswer {
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn translate(&self, body: &[u8]) -> Result<(Vec<u8>, Option<Usage>), ApiError> {
        let bad = |e: serde_json::Error| {
            ApiError::upstream_bad_answer(PROVIDER, format!("not an embeddings answer: {e}"))
        };
        let (vectors, tokens): (Vec<Vec<f64>>, u64) = match self.api {
            Api::Gemini => {
                let answer: BatchAnswer = serde_json::from_slice(body).map_err(bad)?;
                (
                    answer.embeddings.into_iter().map(|e| e.values).collect(),
                    self.estimated_tokens,
                )
            }
            Api::Vertex => {
                let answer: PredictAnswer = serde_json::from_slice(body).map_err(bad)?;
                let mut tokens = 0.0;
                let mut counted = false;
                let vectors = answer
                    .predictions
                    .into_iter()
                    .map(|p| {
                        if let Some(s) = p.embeddings.statistics {
                            tokens += s.token_count;
                            counted = true;
                        }
                        p.embeddings.values
                    })
                    .collect();
                // Token counts are whole numbers sent as JSON numbers.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let tokens = if counted {
                    tokens.max(0.0) as u64
                } else {
                    self.estimated_tokens
                };
                (vectors, tokens)
            }
        };
        let data: Vec<Value> = vectors
            .iter()
            .enumerate()
            .map(|(index, values)| {
                let embedding = if self.base64 {
                    json!(openai::embedding_base64(values))
                } else {
                    json!(values)
                };
                json!({ "object": "embedding", "index": index, "embedding": embedding })
            })
            .collect();
        let out = json!({
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
        });
        let usage = Usage {
            prompt_tokens: tokens,
            completion_tokens: 0,
            total_tokens: tokens,
            ..Usage::default()
        };
        Ok((serde_json::to_vec(&out).unwrap_or_default(), Some(usage)))
    }
}
