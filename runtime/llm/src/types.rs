//! Request and result types of the engine. The runtime re-exports them as
//! its own domain types; the WIT conversions live in the runtime's `host`
//! module.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    None,
    JsonSchema(String),
    Choice(Vec<String>),
    Regex(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: u32,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    /// 1.0 means no penalty.
    pub repeat_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Milliseconds from the call.
    pub deadline_ms: Option<u32>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Deadline,
    ConstraintComplete,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub model: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    #[error("no model is loaded")]
    ModelNotLoaded,
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("constraint cannot be satisfied: {0}")]
    ConstraintUnsatisfiable(String),
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("the model is overloaded")]
    Overloaded,
    #[error("engine error: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum LlmInput {
    /// Rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Passed to the model as it is.
    Raw(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub input: LlmInput,
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
