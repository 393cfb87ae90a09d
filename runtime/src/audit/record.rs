//! What one decision record holds, and the conversions between the
//! runtime's types and their recorded form. The format is versioned
//! (`"v": 1`): fields are only ever added, with defaults.

use crate::types::{
    Completion, Constraint, Context, GenerationParams, LlmError, Prompt, ReadingBatch, Value,
};
use serde::{Deserialize, Serialize};

/// A reading as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedReading {
    /// Device name.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// A number, a boolean or a text.
    pub value: serde_json::Value,
    /// Unit, empty when none.
    pub unit: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
}

/// A plugin version as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedPlugin {
    /// Plugin name (the component's file stem).
    pub name: String,
    /// Content hash, 12 hex digits.
    pub version: String,
}

/// The model as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedModel {
    /// The model id the engine reports (the GGUF file stem).
    pub id: String,
    /// blake3 of the model file, hex, when known.
    pub hash: Option<String>,
}

/// The prompt as recorded, with every generation parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedPrompt {
    /// The system message.
    pub system: String,
    /// The user message.
    pub user: String,
    /// Generation limit in tokens.
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 is no top-k cut.
    pub top_k: u32,
    /// 1.0 is no nucleus cut.
    pub top_p: f32,
    /// 1.0 is no penalty.
    pub repeat_penalty: f32,
    /// Sampling seed, when set.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Deadline in ms from the call, when set.
    pub deadline_ms: Option<u32>,
    /// `none`, `json-schema`, `choice` or `regex`.
    pub constraint: String,
    /// The schema, the choices (a JSON array) or the regex.
    pub constraint_value: Option<String>,
}

/// The model's answer as recorded, or its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedCompletion {
    /// The completion text; empty on error.
    pub text: String,
    /// Why generation stopped (`stop`, `length`, ...), or `error`.
    pub finish: String,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// The model's error, when generation failed.
    pub error: Option<String>,
}

/// One action the postprocessor proposed, and what the allow-list said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedAction {
    /// Let out (published) or refused (dead-lettered).
    pub allowed: bool,
    /// Where it was published (allowed only).
    pub topic: Option<String>,
    /// What was published, as text (allowed only).
    pub payload: Option<String>,
    /// Why it was refused (refused only).
    pub reason: Option<String>,
}

/// Milliseconds spent per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordedTimings {
    /// Rendering the prompt.
    pub prompt_ms: f64,
    /// Waiting for the model (queue and generation).
    pub llm_ms: f64,
    /// Parsing the completion into actions.
    pub postprocess_ms: f64,
}

/// One decision; a line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Record format version: 1.
    pub v: u32,
    /// When the decision was taken, ms since the Unix epoch.
    pub timestamp: i64,
    /// The rule's name.
    pub rule: String,
    /// The device whose window was decided on.
    pub device: String,
    /// Earliest reading of the window, ms since the Unix epoch.
    pub window_start: i64,
    /// Latest reading of the window, ms since the Unix epoch.
    pub window_end: i64,
    /// The window's readings.
    pub window: Vec<RecordedReading>,
    /// The prompt-template plugin.
    pub prompt_plugin: RecordedPlugin,
    /// The postprocess plugin.
    pub postprocess_plugin: RecordedPlugin,
    /// The model.
    pub model: RecordedModel,
    /// The rendered prompt and its parameters.
    pub prompt: RecordedPrompt,
    /// The completion, or the model's error.
    pub completion: RecordedCompletion,
    /// Every action proposed, with the allow-list's answer; empty when the
    /// postprocessor failed (see `error`).
    pub actions: Vec<RecordedAction>,
    /// The postprocessor's failure, when it failed.
    pub error: Option<String>,
    /// Time per stage.
    pub timings: RecordedTimings,
}

impl DecisionRecord {
    /// The recorded window as a batch for the plugins.
    pub fn window_batch(&self) -> ReadingBatch {
        recorded_batch(&self.window)
    }

    /// The recorded context for the plugins.
    pub fn context(&self) -> Context {
        Context {
            rule: self.rule.clone(),
            device: self.device.clone(),
            window_start: self.window_start,
            window_end: self.window_end,
        }
    }
}

/// Recorded readings as a batch for the plugins, names interned in order of
/// appearance (the inverse of [`record_window`]).
pub fn recorded_batch(readings: &[RecordedReading]) -> ReadingBatch {
    let mut b = ReadingBatch::default();
    for r in readings {
        let value = match &r.value {
            serde_json::Value::Bool(v) => Value::Boolean(*v),
            serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        };
        b.push(&r.device, &r.metric, value, &r.unit, r.timestamp);
    }
    b
}

/// The window as recorded.
pub fn record_window(window: &ReadingBatch) -> Vec<RecordedReading> {
    window
        .iter()
        .map(|r| RecordedReading {
            device: r.device.to_owned(),
            metric: r.metric.to_owned(),
            value: match r.value {
                Value::Number(n) => serde_json::Number::from_f64(*n)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number),
                Value::Boolean(b) => serde_json::Value::Bool(*b),
                Value::Text(t) => serde_json::Value::String(t.clone()),
            },
            unit: r.unit.to_owned(),
            timestamp: r.timestamp,
        })
        .collect()
}

/// The prompt as recorded.
pub fn record_prompt(prompt: &Prompt) -> RecordedPrompt {
    let p: &GenerationParams = &prompt.params;
    let (constraint, constraint_value) = match &p.constraint {
        Constraint::None => ("none", None),
        Constraint::JsonSchema(s) => ("json-schema", Some(s.clone())),
        Constraint::Choice(c) => ("choice", Some(serde_json::to_string(c).unwrap_or_default())),
        Constraint::Regex(r) => ("regex", Some(r.clone())),
    };
    RecordedPrompt {
        system: prompt.system.clone(),
        user: prompt.user.clone(),
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        repeat_penalty: p.repeat_penalty,
        seed: p.seed,
        stop: p.stop.clone(),
        deadline_ms: p.deadline_ms,
        constraint: constraint.into(),
        constraint_value,
    }
}

/// The completion (or error) as recorded.
pub fn record_completion(completion: &Result<Completion, LlmError>) -> RecordedCompletion {
    match completion {
        Ok(c) => RecordedCompletion {
            text: c.text.clone(),
            finish: format!("{:?}", c.finish_reason).to_lowercase(),
            prompt_tokens: c.usage.prompt_tokens,
            completion_tokens: c.usage.completion_tokens,
            error: None,
        },
        Err(e) => RecordedCompletion {
            text: String::new(),
            finish: "error".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            error: Some(e.to_string()),
        },
    }
}

/// What taking a recorded decision again gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    /// The prompt rendered now, or why rendering failed.
    pub prompt: Result<RecordedPrompt, String>,
    /// The completion now.
    pub completion: Option<RecordedCompletion>,
    /// The actions now, with the allow-list's answers.
    pub actions: Vec<RecordedAction>,
    /// The postprocessor's failure now.
    pub error: Option<String>,
}
