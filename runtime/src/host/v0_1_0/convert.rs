//! Conversions between generated binding types (`wit`) and the runtime's own.

use super::bindings::ganglion::plugin::llm::Input;
use super::bindings::ganglion::plugin::state::StateError as WitStateError;
use super::bindings::ganglion::plugin::types as wit;
use crate::llm::LlmInput;
use crate::state::StateError;
use crate::types as dom;

pub(crate) fn state_error(e: StateError) -> WitStateError {
    match e {
        StateError::TooLarge => WitStateError::TooLarge,
        StateError::QuotaExceeded => WitStateError::QuotaExceeded,
        StateError::Io(m) => WitStateError::Io(m),
    }
}

fn value_in(v: dom::Value) -> wit::Value {
    match v {
        dom::Value::Number(n) => wit::Value::Number(n),
        dom::Value::Boolean(b) => wit::Value::Boolean(b),
        dom::Value::Text(t) => wit::Value::Text(t),
    }
}

fn value_out(v: wit::Value) -> dom::Value {
    match v {
        wit::Value::Number(n) => dom::Value::Number(n),
        wit::Value::Boolean(b) => dom::Value::Boolean(b),
        wit::Value::Text(t) => dom::Value::Text(t),
    }
}

pub(crate) fn batch_in(b: dom::ReadingBatch) -> wit::ReadingBatch {
    wit::ReadingBatch {
        names: b.names,
        readings: b
            .readings
            .into_iter()
            .map(|r| wit::Reading {
                device: r.device,
                metric: r.metric,
                unit: r.unit,
                value: value_in(r.value),
                timestamp: r.timestamp,
            })
            .collect(),
    }
}

pub(crate) fn batch_out(b: wit::ReadingBatch) -> dom::ReadingBatch {
    dom::ReadingBatch {
        names: b.names,
        readings: b
            .readings
            .into_iter()
            .map(|r| dom::Reading {
                device: r.device,
                metric: r.metric,
                unit: r.unit,
                value: value_out(r.value),
                timestamp: r.timestamp,
            })
            .collect(),
    }
}

pub(crate) fn message_in(m: &dom::Message) -> wit::Message {
    wit::Message {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        timestamp: m.timestamp,
    }
}

pub(crate) fn context_in(c: &dom::Context) -> wit::Context {
    wit::Context {
        rule: c.rule.clone(),
        device: c.device.clone(),
        window_start: c.window_start,
        window_end: c.window_end,
    }
}

fn role_out(r: wit::Role) -> dom::Role {
    match r {
        wit::Role::System => dom::Role::System,
        wit::Role::User => dom::Role::User,
        wit::Role::Assistant => dom::Role::Assistant,
    }
}

pub(crate) fn llm_input(i: Input) -> LlmInput {
    match i {
        Input::Chat(messages) => LlmInput::Chat(
            messages
                .into_iter()
                .map(|m| dom::ChatMessage {
                    role: role_out(m.role),
                    content: m.content,
                })
                .collect(),
        ),
        Input::Raw(text) => LlmInput::Raw(text),
    }
}

pub(crate) fn params(p: wit::GenerationParams) -> dom::GenerationParams {
    dom::GenerationParams {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        repeat_penalty: p.repeat_penalty,
        seed: p.seed,
        stop: p.stop,
        deadline_ms: p.deadline_ms,
        constraint: match p.constraint {
            wit::Constraint::None => dom::Constraint::None,
            wit::Constraint::JsonSchema(s) => dom::Constraint::JsonSchema(s),
            wit::Constraint::Choice(c) => dom::Constraint::Choice(c),
            wit::Constraint::Regex(r) => dom::Constraint::Regex(r),
        },
    }
}

pub(crate) fn prompt_out(p: wit::Prompt) -> dom::Prompt {
    dom::Prompt {
        system: p.system,
        user: p.user,
        params: params(p.params),
    }
}

fn finish_in(f: dom::FinishReason) -> wit::FinishReason {
    match f {
        dom::FinishReason::Stop => wit::FinishReason::Stop,
        dom::FinishReason::Length => wit::FinishReason::Length,
        dom::FinishReason::Deadline => wit::FinishReason::Deadline,
        dom::FinishReason::ConstraintComplete => wit::FinishReason::ConstraintComplete,
    }
}

pub(crate) fn completion_out(c: dom::Completion) -> wit::Completion {
    wit::Completion {
        text: c.text,
        finish_reason: finish_in(c.finish_reason),
        usage: wit::Usage {
            prompt_tokens: c.usage.prompt_tokens,
            completion_tokens: c.usage.completion_tokens,
            cached_tokens: c.usage.cached_tokens,
        },
        model: c.model,
    }
}

pub(crate) fn completion_in(c: &dom::Completion) -> wit::Completion {
    completion_out(c.clone())
}

pub(crate) fn llm_error_out(e: dom::LlmError) -> wit::LlmError {
    match e {
        dom::LlmError::ModelNotLoaded => wit::LlmError::ModelNotLoaded,
        dom::LlmError::InvalidInput(m) => wit::LlmError::InvalidInput(m),
        dom::LlmError::ConstraintUnsatisfiable(m) => wit::LlmError::ConstraintUnsatisfiable(m),
        dom::LlmError::DeadlineExceeded => wit::LlmError::DeadlineExceeded,
        dom::LlmError::Overloaded => wit::LlmError::Overloaded,
        dom::LlmError::Internal(m) => wit::LlmError::Internal(m),
    }
}

fn llm_error_in(e: wit::LlmError) -> dom::LlmError {
    match e {
        wit::LlmError::ModelNotLoaded => dom::LlmError::ModelNotLoaded,
        wit::LlmError::InvalidInput(m) => dom::LlmError::InvalidInput(m),
        wit::LlmError::ConstraintUnsatisfiable(m) => dom::LlmError::ConstraintUnsatisfiable(m),
        wit::LlmError::DeadlineExceeded => dom::LlmError::DeadlineExceeded,
        wit::LlmError::Overloaded => dom::LlmError::Overloaded,
        wit::LlmError::Internal(m) => dom::LlmError::Internal(m),
    }
}

pub(crate) fn plugin_error_out(e: wit::PluginError) -> dom::PluginError {
    match e {
        wit::PluginError::BadPayload(m) => dom::PluginError::BadPayload(m),
        wit::PluginError::BadConfig(m) => dom::PluginError::BadConfig(m),
        wit::PluginError::BadCompletion(m) => dom::PluginError::BadCompletion(m),
        wit::PluginError::Llm(e) => dom::PluginError::Llm(llm_error_in(e)),
        wit::PluginError::Other(m) => dom::PluginError::Other(m),
    }
}

pub(crate) fn action_out(a: wit::Action) -> dom::Action {
    match a {
        wit::Action::Publish(p) => dom::Action::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: match p.qos {
                wit::Qos::AtMostOnce => dom::Qos::AtMostOnce,
                wit::Qos::AtLeastOnce => dom::Qos::AtLeastOnce,
                wit::Qos::ExactlyOnce => dom::Qos::ExactlyOnce,
            },
            retain: p.retain,
        },
        wit::Action::Alert(a) => dom::Action::Alert {
            level: match a.level {
                wit::AlertLevel::Info => dom::AlertLevel::Info,
                wit::AlertLevel::Warning => dom::AlertLevel::Warning,
                wit::AlertLevel::Critical => dom::AlertLevel::Critical,
            },
            device: a.device,
            text: a.text,
        },
        wit::Action::Command(c) => dom::Action::Command {
            device: c.device,
            name: c.name,
            value: c.value.map(value_out),
        },
    }
}
