//! The host's language model.

use crate::bindings::ganglion::plugin::llm as host;
pub use crate::bindings::ganglion::plugin::llm::Input;
use crate::{ChatMessage, Completion, GenerationParams, LlmError, PluginError, Role};

/// Generates a completion for chat messages (rendered with the model's chat template).
pub fn chat(messages: Vec<ChatMessage>, params: &GenerationParams) -> Result<Completion, LlmError> {
    host::generate(&Input::Chat(messages), params)
}

/// Generates from a system and a user message.
pub fn ask(system: &str, user: &str, params: &GenerationParams) -> Result<Completion, LlmError> {
    chat(
        vec![
            ChatMessage {
                role: Role::System,
                content: system.to_owned(),
            },
            ChatMessage {
                role: Role::User,
                content: user.to_owned(),
            },
        ],
        params,
    )
}

/// Generates from raw text, without a chat template.
pub fn raw(text: &str, params: &GenerationParams) -> Result<Completion, LlmError> {
    host::generate(&Input::Raw(text.to_owned()), params)
}

pub fn classify(text: &str, labels: &[String]) -> Result<Vec<f32>, LlmError> {
    host::classify(text, labels)
}

pub fn embed(texts: &[String]) -> Result<Vec<Vec<f32>>, LlmError> {
    host::embed(texts)
}

pub fn count_tokens(text: &str) -> Result<u32, LlmError> {
    host::count_tokens(text)
}

impl From<LlmError> for PluginError {
    fn from(e: LlmError) -> Self {
        PluginError::Llm(e)
    }
}
