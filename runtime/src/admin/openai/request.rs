//! OpenAI request bodies, read leniently (clients send fields of their own,
//! such as `user` or `metadata`, which are ignored) but never silently
//! wrong: a field that would change the answer and that the engine cannot
//! honour (`n` above 1, tools, logprobs, penalties other than
//! `repeat_penalty`) is refused with a message that names it.

use crate::config::ServeConfig;
use crate::llm::LlmInput;
use crate::types::{ChatMessage, Constraint, GenerationParams, Role};
use serde::Deserialize;
use serde_json::Value;

/// The name the engine schedules the endpoint's requests under, fairly
/// against the rules' names.
pub const SCHEDULED_AS: &str = "serve-model";

/// A refused request: the message, and the field at fault when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub message: String,
    pub param: Option<&'static str>,
}

fn refuse(param: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        message: message.into(),
        param: Some(param),
    }
}

/// A string or a list of strings (`stop`, `input`, `prompt`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Message content: a string, or a list of parts of which only text ones
/// are taken.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// What chat and text completions share.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// llama.cpp's extension, taken for the same meaning.
    pub top_k: Option<u32>,
    /// llama.cpp's extension, taken for the same meaning.
    pub repeat_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<u32>,
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub logit_bias: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub schema: Option<Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub input: OneOrMany,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u32>,
}

/// A completion request ready to run: the prompt, how to sample it, and
/// how to deliver the answer.
pub type Checked = (LlmInput, GenerationParams, Delivery);

/// How a request wants its answer delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub stream: bool,
    pub include_usage: bool,
}

impl ChatRequest {
    /// The engine's input, parameters and delivery; a refusal names the
    /// field at fault.
    pub fn check(self, limits: &ServeConfig) -> Result<Checked, Refusal> {
        if self.messages.is_empty() {
            return Err(refuse("messages", "`messages` is empty"));
        }
        if self.messages.len() > limits.max_messages {
            return Err(refuse(
                "messages",
                format!(
                    "{} messages; this endpoint takes at most {} ([serve] max_messages)",
                    self.messages.len(),
                    limits.max_messages
                ),
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in self.messages {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(refuse(
                        "messages",
                        format!(
                            "role {other:?} is not supported (system, developer, user, assistant)"
                        ),
                    ));
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(refuse(
                                    "messages",
                                    format!(
                                        "content parts of type {kind:?} are not supported: the model reads text"
                                    ),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage { role, content });
        }
        let (params, delivery) = self.sampling.check(limits)?;
        Ok((LlmInput::Chat(messages), params, delivery))
    }
}

impl CompletionRequest {
    /// As [`ChatRequest::check`]; one prompt only.
    pub fn check(self, limits: &ServeConfig) -> Result<Checked, Refusal> {
        let mut prompts = self.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(refuse(
                "prompt",
                format!(
                    "{} prompts; this endpoint takes one per request (send them concurrently: they share the batch)",
                    prompts.len()
                ),
            ));
        }
        let s = &self.sampling;
        if s.echo == Some(true) {
            return Err(refuse("echo", "`echo` is not supported"));
        }
        if s.best_of.is_some_and(|b| b > 1) {
            return Err(refuse("best_of", "`best_of` above 1 is not supported"));
        }
        if s.suffix.as_deref().is_some_and(|x| !x.is_empty()) {
            return Err(refuse("suffix", "`suffix` is not supported"));
        }
        let (params, delivery) = self.sampling.check(limits)?;
        Ok((LlmInput::Raw(prompts.remove(0)), params, delivery))
    }
}

impl Sampling {
    fn check(self, limits: &ServeConfig) -> Result<(GenerationParams, Delivery), Refusal> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(refuse(
                "n",
                "only n = 1 is supported (send requests concurrently: they share the batch)",
            ));
        }
        for (param, value) in [
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
            ("function_call", &self.function_call),
        ] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(refuse(
                    param,
                    format!(
                        "`{param}` is not supported; ask for JSON with response_format instead"
                    ),
                ));
            }
        }
        let on = |v: &Option<Value>| {
            v.as_ref().is_some_and(|v| {
                !(v.is_null() || *v == Value::Bool(false) || v.as_u64() == Some(0))
            })
        };
        if on(&self.logprobs) || on(&self.top_logprobs) {
            return Err(refuse("logprobs", "`logprobs` is not supported"));
        }
        if self
            .logit_bias
            .as_ref()
            .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        {
            return Err(refuse("logit_bias", "`logit_bias` is not supported"));
        }
        for (param, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(refuse(
                    param,
                    format!("`{param}` is not supported; `repeat_penalty` (llama.cpp's) is"),
                ));
            }
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(refuse("temperature", "`temperature` must be within 0 to 2"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(refuse("top_p", "`top_p` must be above 0 and at most 1"));
        }
        let repeat_penalty = self.repeat_penalty.unwrap_or(1.0);
        if !(repeat_penalty > 0.0 && repeat_penalty.is_finite()) {
            return Err(refuse("repeat_penalty", "`repeat_penalty` must be above 0"));
        }
        let stop = self.stop.map(OneOrMany::into_vec).unwrap_or_default();
        if stop.len() > limits.max_stops {
            return Err(refuse(
                "stop",
                format!(
                    "{} stop strings; at most {} ([serve] max_stops)",
                    stop.len(),
                    limits.max_stops
                ),
            ));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > limits.max_stop_bytes) {
            return Err(refuse(
                "stop",
                format!(
                    "a stop string of {} bytes; at most {} ([serve] max_stop_bytes)",
                    long.len(),
                    limits.max_stop_bytes
                ),
            ));
        }
        let constraint = match self.response_format {
            None => Constraint::None,
            Some(f) => match f.kind.as_str() {
                "text" => Constraint::None,
                "json_object" => Constraint::JsonSchema(r#"{"type":"object"}"#.into()),
                "json_schema" => match f.json_schema.and_then(|j| j.schema) {
                    Some(schema) if schema.is_object() => {
                        Constraint::JsonSchema(schema.to_string())
                    }
                    _ => {
                        return Err(refuse(
                            "response_format",
                            "`response_format.json_schema.schema` must be a JSON schema object",
                        ));
                    }
                },
                other => {
                    return Err(refuse(
                        "response_format",
                        format!(
                            "response_format type {other:?} is not supported (text, json_object, json_schema)"
                        ),
                    ));
                }
            },
        };
        let asked = self.max_completion_tokens.or(self.max_tokens);
        let params = GenerationParams {
            max_tokens: asked.unwrap_or(limits.max_tokens).min(limits.max_tokens),
            temperature,
            top_k: self.top_k.unwrap_or(0),
            top_p,
            repeat_penalty,
            seed: self.seed.map(|s| s as u64),
            stop,
            deadline_ms: None,
            constraint,
        };
        let delivery = Delivery {
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        };
        Ok((params, delivery))
    }
}

impl EmbeddingRequest {
    /// The texts, and whether the vectors go as base64 (the `openai`
    /// clients ask for that by default) rather than JSON numbers.
    pub fn check(self, limits: &ServeConfig) -> Result<(Vec<String>, bool), Refusal> {
        let texts = self.input.into_vec();
        if texts.is_empty() {
            return Err(refuse("input", "`input` is empty"));
        }
        if texts.len() > limits.max_inputs {
            return Err(refuse(
                "input",
                format!(
                    "{} texts; at most {} per request ([serve] max_inputs)",
                    texts.len(),
                    limits.max_inputs
                ),
            ));
        }
        if self.dimensions.is_some() {
            return Err(refuse(
                "dimensions",
                "`dimensions` is not supported: the encoder's vectors have a fixed size",
            ));
        }
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(refuse(
                    "encoding_format",
                    format!("encoding_format {other:?} is not supported (float, base64)"),
                ));
            }
        };
        Ok((texts, base64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Checked, Refusal> {
        serde_json::from_value::<ChatRequest>(body)
            .unwrap()
            .check(&ServeConfig::default())
    }

    #[test]
    fn a_chat_request_maps_onto_the_engines_parameters() {
        let (input, params, delivery) = chat(serde_json::json!({
            "model": "anything", "user": "tool-7",
            "messages": [
                {"role": "developer", "content": "Answer in JSON."},
                {"role": "user", "content": [{"type": "text", "text": "kitchen "}, {"type": "text", "text": "23 C"}]}
            ],
            "max_completion_tokens": 9000, "temperature": 0, "seed": 7, "stop": "\n",
            "stream": true, "stream_options": {"include_usage": true},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
        }))
        .unwrap();
        let LlmInput::Chat(m) = input else {
            panic!("a chat")
        };
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m[1].content, "kitchen 23 C");
        assert_eq!(params.max_tokens, 512, "capped at [serve] max_tokens");
        assert_eq!(params.temperature, 0.0);
        assert_eq!(params.seed, Some(7));
        assert_eq!(params.stop, vec!["\n".to_owned()]);
        assert_eq!(
            params.constraint,
            Constraint::JsonSchema(r#"{"type":"object"}"#.into())
        );
        assert_eq!(
            delivery,
            Delivery {
                stream: true,
                include_usage: true
            }
        );
        let (_, defaults, _) =
            chat(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!(
            defaults.temperature, 1.0,
            "OpenAI's default, not greedy decoding"
        );
        assert_eq!(defaults.max_tokens, 512);
    }

    #[test]
    fn what_the_engine_cannot_honour_is_refused_by_name() {
        let user = serde_json::json!([{"role": "user", "content": "hi"}]);
        for (extra, param) in [
            (serde_json::json!({"n": 2}), "n"),
            (
                serde_json::json!({"tools": [{"type": "function"}]}),
                "tools",
            ),
            (serde_json::json!({"logprobs": true}), "logprobs"),
            (
                serde_json::json!({"presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (serde_json::json!({"logit_bias": {"42": 5}}), "logit_bias"),
            (serde_json::json!({"temperature": 3}), "temperature"),
            (
                serde_json::json!({"stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (
                serde_json::json!({"response_format": {"type": "json_schema"}}),
                "response_format",
            ),
        ] {
            let mut body = extra.clone();
            body["messages"] = user.clone();
            assert_eq!(chat(body).unwrap_err().param, Some(param), "{extra}");
        }
        let tool_role = chat(serde_json::json!({"messages": [{"role": "tool", "content": "x"}]}));
        assert!(tool_role.unwrap_err().message.contains("\"tool\""));
        let image = chat(
            serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        );
        assert!(image.unwrap_err().message.contains("image_url"));
        let many: Vec<Value> = (0..65)
            .map(|_| serde_json::json!({"role": "user", "content": "x"}))
            .collect();
        let many = chat(serde_json::json!({ "messages": many }));
        assert!(many.unwrap_err().message.contains("max_messages"));
        // Zeros and nulls, as many clients send them, are no request at all.
        let zeros = chat(serde_json::json!({
            "messages": user, "n": 1, "logprobs": false, "presence_penalty": 0,
            "frequency_penalty": 0.0, "tools": null, "logit_bias": {}
        }));
        assert!(zeros.is_ok());
    }

    #[test]
    fn completion_and_embedding_requests_are_checked() {
        let limits = ServeConfig::default();
        let two: CompletionRequest =
            serde_json::from_value(serde_json::json!({"prompt": ["a", "b"]})).unwrap();
        assert_eq!(two.check(&limits).unwrap_err().param, Some("prompt"));
        let one: CompletionRequest =
            serde_json::from_value(serde_json::json!({"prompt": "a", "max_tokens": 3})).unwrap();
        let (input, params, _) = one.check(&limits).unwrap();
        assert_eq!(input, LlmInput::Raw("a".into()));
        assert_eq!(params.max_tokens, 3);
        let e: EmbeddingRequest =
            serde_json::from_value(serde_json::json!({"input": "a", "encoding_format": "base64"}))
                .unwrap();
        assert_eq!(e.check(&limits).unwrap(), (vec!["a".to_owned()], true));
        let many: EmbeddingRequest =
            serde_json::from_value(serde_json::json!({ "input": vec!["x"; 65] })).unwrap();
        assert!(
            many.check(&limits)
                .unwrap_err()
                .message
                .contains("max_inputs")
        );
    }
}
