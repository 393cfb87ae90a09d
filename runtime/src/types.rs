//! Domain types the runtime works with. They mirror the WIT contract but are
//! the runtime's own: generated bindings never leave `host/`.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Boolean(bool),
    Text(String),
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            Value::Boolean(b) => Some(f64::from(u8::from(*b))),
            Value::Text(_) => None,
        }
    }
}

/// A reading inside a [`ReadingBatch`]; names are indexes into the batch's table.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: u32,
    pub metric: u32,
    pub unit: u32,
    pub value: Value,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
}

/// Readings with a shared name table (see the WIT `reading-batch`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadingBatch {
    pub names: Vec<String>,
    pub readings: Vec<Reading>,
}

/// A reading with its names resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingRef<'a> {
    pub device: &'a str,
    pub metric: &'a str,
    pub unit: &'a str,
    pub value: &'a Value,
    pub timestamp: i64,
}

impl ReadingBatch {
    pub fn len(&self) -> usize {
        self.readings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
    }

    /// Index of `name`, adding it when new. Linear: batches hold few names.
    pub fn intern(&mut self, name: &str) -> u32 {
        match self.names.iter().position(|n| n == name) {
            Some(i) => i as u32,
            None => {
                self.names.push(name.to_owned());
                (self.names.len() - 1) as u32
            }
        }
    }

    pub fn push(&mut self, device: &str, metric: &str, value: Value, unit: &str, timestamp: i64) {
        let reading = Reading {
            device: self.intern(device),
            metric: self.intern(metric),
            unit: self.intern(unit),
            value,
            timestamp,
        };
        self.readings.push(reading);
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = ReadingRef<'_>> + '_ {
        self.readings.iter().map(|r| ReadingRef {
            device: self.name(r.device),
            metric: self.name(r.metric),
            unit: self.name(r.unit),
            value: &r.value,
            timestamp: r.timestamp,
        })
    }

    fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map(String::as_str).unwrap_or("")
    }

    /// Checks that every name index is in range.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.names.len() as u32;
        for (i, r) in self.readings.iter().enumerate() {
            for (field, idx) in [("device", r.device), ("metric", r.metric), ("unit", r.unit)] {
                if idx >= n {
                    return Err(format!(
                        "reading {i}: {field} index {idx} out of range of {n} names"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Bytes of variable-size data (names and text values), for output caps.
    pub fn data_size(&self) -> usize {
        let names: usize = self.names.iter().map(String::len).sum();
        let texts: usize = self
            .readings
            .iter()
            .map(|r| {
                if let Value::Text(t) = &r.value {
                    t.len()
                } else {
                    0
                }
            })
            .sum();
        names + texts + self.readings.len() * std::mem::size_of::<Reading>()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// When the host received it, milliseconds since the Unix epoch.
    pub timestamp: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub rule: String,
    pub device: String,
    pub window_start: i64,
    pub window_end: i64,
}

pub use ganglion_llm::types::{
    ChatMessage, Completion, Constraint, FinishReason, GenerationParams, LlmError, Role, Usage,
};

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub system: String,
    pub user: String,
    pub params: GenerationParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertLevel {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: Qos,
        retain: bool,
    },
    Alert {
        level: AlertLevel,
        device: String,
        text: String,
    },
    Command {
        device: String,
        name: String,
        value: Option<Value>,
    },
}

impl Action {
    /// Bytes of variable-size data, for output caps.
    pub fn data_size(&self) -> usize {
        let var = match self {
            Action::Publish { topic, payload, .. } => topic.len() + payload.len(),
            Action::Alert { device, text, .. } => device.len() + text.len(),
            Action::Command {
                device,
                name,
                value,
            } => {
                device.len()
                    + name.len()
                    + if let Some(Value::Text(t)) = value {
                        t.len()
                    } else {
                        0
                    }
            }
        };
        var + std::mem::size_of::<Action>()
    }
}

/// An error a plugin returned (as opposed to a fault the host detected).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    #[error("bad payload: {0}")]
    BadPayload(String),
    #[error("bad config: {0}")]
    BadConfig(String),
    #[error("bad completion: {0}")]
    BadCompletion(String),
    #[error("llm: {0}")]
    Llm(LlmError),
    #[error("{0}")]
    Other(String),
}

/// The four pipeline stages a component can implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Preprocessor,
    PromptTemplate,
    Postprocessor,
    Rule,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Preprocessor,
        Stage::PromptTemplate,
        Stage::Postprocessor,
        Stage::Rule,
    ];

    /// The WIT interface a component exports for this stage.
    pub fn interface(self) -> &'static str {
        match self {
            Stage::Preprocessor => "ganglion:plugin/preprocess@0.1.0",
            Stage::PromptTemplate => "ganglion:plugin/template@0.1.0",
            Stage::Postprocessor => "ganglion:plugin/postprocess@0.1.0",
            Stage::Rule => "ganglion:plugin/handler@0.1.0",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Preprocessor => "preprocessor",
            Stage::PromptTemplate => "prompt-template",
            Stage::Postprocessor => "postprocessor",
            Stage::Rule => "rule",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
