//! Request and result types of the engine. The runtime re-exports them as
//! its own domain types; the WIT conversions live in the runtime's `host`
//! module.

/// Who speaks a [`ChatMessage`]; the chat template renders each role in
/// the model's own markup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions that frame the conversation; put first, so a rule's
    /// fixed system part is the prompt prefix the engine can reuse.
    System,
    /// The input to answer: in a pipeline, usually the message's text.
    User,
    /// An earlier answer of the model, for few-shot examples or a
    /// conversation carried on.
    Assistant,
}

impl Role {
    /// The role's name as chat templates expect it in `message.role`
    /// (`system`, `user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of an [`LlmInput::Chat`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// Who speaks it.
    pub role: Role,
    /// The text, inserted into the template unescaped.
    pub content: String,
}

/// What shape the output must take. Enforced token by token (llguidance):
/// tokens that cannot continue a valid output are masked before sampling,
/// so even a small model's output matches. A constraint that is not well
/// formed is [`LlmError::InvalidInput`]; one the compiler cannot handle, or
/// that leaves no token to continue with, is
/// [`LlmError::ConstraintUnsatisfiable`].
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Free text.
    None,
    /// A JSON schema, as JSON text. Output is compact JSON (no whitespace
    /// outside strings) unless the schema sets `x-guidance` itself, so a
    /// small model cannot spend `max_tokens` on whitespace.
    JsonSchema(String),
    /// Exactly one of these strings, matched literally; an empty list is
    /// invalid input.
    Choice(Vec<String>),
    /// A regex (Rust `regex` syntax) the whole output must match.
    Regex(String),
}

/// How to sample a completion. The default is greedy decoding of up to
/// 128 tokens with no cuts, penalty, stop strings or constraint, under the
/// engine's default deadline.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Tokens to generate at most; also capped by what the context leaves
    /// after the prompt. Reaching it ends with [`FinishReason::Length`].
    pub max_tokens: u32,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    /// 1.0 means no penalty.
    pub repeat_penalty: f32,
    /// Seed of the sampler's generator: the same seed, prompt and model give
    /// the same text. None seeds from the OS; greedy decoding ignores it.
    pub seed: Option<u64>,
    /// Strings that end the completion, which is cut before the first one
    /// found (the stop string itself is not returned); empty strings are
    /// ignored.
    pub stop: Vec<String>,
    /// Milliseconds from the call; none means the engine's
    /// `default_deadline_ms`.
    pub deadline_ms: Option<u32>,
    /// The shape the output must take.
    pub constraint: Constraint,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            deadline_ms: None,
            constraint: Constraint::None,
        }
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token, or the text reached a
    /// stop string.
    Stop,
    /// `max_tokens`, or the end of the context, was reached.
    Length,
    /// The deadline passed while generating; the text is what was generated
    /// by then. (With nothing generated the call fails with
    /// [`LlmError::DeadlineExceeded`] instead.)
    Deadline,
    /// The constraint accepts no longer output: the text is complete.
    ConstraintComplete,
}

/// Token counts of one completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt as the model saw it (template and BOS included).
    pub prompt_tokens: u32,
    /// Tokens generated, the end-of-generation token not counted.
    pub completion_tokens: u32,
    /// Prompt tokens whose KV state came from the prefix cache rather than a
    /// forward pass; below `prompt_tokens`, as the last prompt token always
    /// runs.
    pub cached_tokens: u32,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The generated text, without the prompt, the end-of-generation token
    /// or a stop string.
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// The model's id: its GGUF file name without the extension.
    pub model: String,
}

/// Why an engine call failed. Each maps to a WIT `llm` error of the same
/// name, so a plugin can tell retryable failures (`Overloaded`,
/// `DeadlineExceeded`) from ones that will fail again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// The model the call needs (generation model, or the encoder for
    /// `embed`) is not configured; returned at once, without queueing.
    #[error("no model is loaded")]
    ModelNotLoaded,
    /// The request cannot run as given: an empty prompt or label, a prompt
    /// longer than the context, a KV reservation beyond the engine's bound,
    /// a malformed schema or regex. The text says which.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The constraint could not be compiled, or left no token to continue
    /// with part-way through.
    #[error("constraint cannot be satisfied: {0}")]
    ConstraintUnsatisfiable(String),
    /// The deadline passed before the request produced anything.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The engine's queue (`[model] queue`) is full; returned at once so the
    /// pipeline can apply backpressure.
    #[error("the model is overloaded")]
    Overloaded,
    /// A failure inside the engine: a forward pass failed or the worker has
    /// stopped.
    #[error("engine error: {0}")]
    Internal(String),
}

/// The prompt of a [`GenerateRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum LlmInput {
    /// Rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Passed to the model as it is.
    Raw(String),
}

/// One call to generate text.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub input: LlmInput,
    /// Sampling, limits and constraint.
    pub params: GenerationParams,
    /// The rule on whose behalf the call is made (for fair scheduling).
    pub rule: String,
}

impl GenerateRequest {
    /// A chat of one system and one user message, as a prompt template
    /// renders it: the system part, fixed per rule, comes first, so it is
    /// the prefix the engine can reuse.
    pub fn system_and_user(
        system: impl Into<String>,
        user: impl Into<String>,
        params: GenerationParams,
        rule: impl Into<String>,
    ) -> GenerateRequest {
        GenerateRequest {
            input: LlmInput::Chat(vec![
                ChatMessage {
                    role: Role::System,
                    content: system.into(),
                },
                ChatMessage {
                    role: Role::User,
                    content: user.into(),
                },
            ]),
            params,
            rule: rule.into(),
        }
    }
}
