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

/// Scores `labels` as the category of `text`: one probability per label,
/// in the order given, summing to 1. Unlike generating a label, the answer
/// is always one of the labels and comes with a confidence to act on; keep
/// labels short and distinct.
///
/// # Errors
///
/// `InvalidInput` for no labels, a blank label, a text too long for the
/// context, or a stage call past its `max_llm_calls_per_call`; the other
/// [`LlmError`]s as for [`chat`].
pub fn classify(text: &str, labels: &[String]) -> Result<Vec<f32>, LlmError> {
    host::classify(text, labels)
}

/// Sentence embeddings of `texts`: one L2-normalised vector per text, in
/// order, so a dot product is the cosine similarity. Needs the host's
/// `[model] embedding`; long texts are truncated (256 word pieces for the
/// default encoder).
///
/// # Errors
///
/// `ModelNotLoaded` without an embedding model; the others as for
/// [`chat`].
pub fn embed(texts: &[String]) -> Result<Vec<Vec<f32>>, LlmError> {
    host::embed(texts)
}

/// Tokens of `text` as the generation model sees it (BOS included when
/// the model adds one), to keep a prompt within the context. Does not run
/// the model and does not count against the call limit.
///
/// # Errors
///
/// `ModelNotLoaded` without a model; `InvalidInput` when the text cannot
/// be tokenised.
pub fn count_tokens(text: &str) -> Result<u32, LlmError> {
    host::count_tokens(text)
}

impl From<LlmError> for PluginError {
    fn from(e: LlmError) -> Self {
        PluginError::Llm(e)
    }
}
