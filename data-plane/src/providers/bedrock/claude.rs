//! Claude on Bedrock, called in Anthropic's Messages format (DESIGN §17): InvokeModel
//! (`/model/{id}/invoke`, `/invoke-with-response-stream`, Claude 4.6 and earlier) or Bedrock's
//! Messages endpoint (`/anthropic/v1/messages`, newer models). The bodies and answers are
//! `providers::anthropic`'s; this file knows the URLs (auth is the connection's, as for Converse).

use super::encode_model_id;

/// `{endpoint}/model/{id}/invoke` or `/invoke-with-response-stream`.
pub fn invoke_url(endpoint: &str, model: &str, streaming: bool) -> String {
    let method = if streaming {
        "invoke-with-response-stream"
    } else {
        "invoke"
    };
    format!(
        "{}/model/{}/{method}",
        endpoint.trim_end_matches('/'),
        encode_model_id(model)
    )
}

/// `{endpoint}/anthropic/v1/messages`.
pub fn messages_url(endpoint: &str) -> String {
    format!("{}/anthropic/v1/messages", endpoint.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoke_and_messages_urls() {
        assert_eq!(
            invoke_url(
                "https://bedrock-runtime.us-east-1.amazonaws.com/",
                "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                true
            ),
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke-with-response-stream"
        );
        assert_eq!(
            invoke_url(
                "http://127.0.0.1:9",
                "anthropic.claude-3-haiku-20240307-v1:0",
                false
            ),
            "http://127.0.0.1:9/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke"
        );
        assert_eq!(
            messages_url("https://bedrock-runtime.us-east-1.amazonaws.com"),
            "https://bedrock-runtime.us-east-1.amazonaws.com/anthropic/v1/messages"
        );
    }
}
