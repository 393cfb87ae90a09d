//! Domain types the runtime works with. They mirror the WIT contract but are
//! the runtime's own: generated bindings never leave `host/`.

use std::fmt;

/// The value of one reading (WIT `value`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A measurement.
    Number(f64),
    /// An on/off state.
    Boolean(bool),
    /// Text, such as a spoken command or a log line.
    Text(String),
}

impl Value {
    /// The value as a number: booleans as 0 or 1, text as `None`.
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
    /// Index of the device name.
    pub device: u32,
    /// Index of the metric name.
    pub metric: u32,
    /// Index of the unit name (an empty unit is the index of an empty string).
    pub unit: u32,
    /// The value read.
    pub value: Value,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
}

/// Readings with a shared name table (see the WIT `reading-batch`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadingBatch {
    /// Device, metric and unit names, each stored once.
    pub names: Vec<String>,
    /// The readings, whose names index into `names`.
    pub readings: Vec<Reading>,
}

/// A reading with its names resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingRef<'a> {
    /// Device name.
    pub device: &'a str,
    /// Metric name.
    pub metric: &'a str,
    /// Unit name; empty when the reading has none.
    pub unit: &'a str,
    /// The value read.
    pub value: &'a Value,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
}

impl ReadingBatch {
    /// Number of readings.
    pub fn len(&self) -> usize {
        self.readings.len()
    }

    /// True when the batch holds no readings.
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

    /// Appends a reading, interning its names; `timestamp` is milliseconds since the Unix epoch.
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

    /// The readings with names resolved; an index out of range resolves to `""`.
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

/// An incoming MQTT message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The raw payload.
    pub payload: Vec<u8>,
    /// When the host received it, milliseconds since the Unix epoch.
    pub timestamp: i64,
}

/// What a stage knows about the rule it runs for.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// The rule's name.
    pub rule: String,
    /// The window's device key.
    pub device: String,
    /// Earliest reading timestamp in the window, milliseconds since the Unix epoch.
    pub window_start: i64,
    /// Latest reading timestamp in the window, milliseconds since the Unix epoch.
    pub window_end: i64,
}

pub use ganglion_llm::types::{
    ChatMessage, Completion, Constraint, FinishReason, GenerationParams, LlmError, Role, Usage,
};

/// A prompt for the model, as a template stage renders it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The part that stays fixed across calls of a rule; the engine may reuse
    /// its KV state as a cached prefix.
    pub system: String,
    /// The part that changes per call.
    pub user: String,
    /// Sampling, limits and output constraint.
    pub params: GenerationParams,
}

/// MQTT quality of service; ordered, so the lower of two levels is their `min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    /// QoS 0.
    AtMostOnce,
    /// QoS 1.
    AtLeastOnce,
    /// QoS 2.
    ExactlyOnce,
}

/// Severity of an [`Action::Alert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertLevel {
    /// For information.
    Info,
    /// Needs attention.
    Warning,
    /// Needs immediate attention.
    Critical,
}

/// What a plugin asks the host to do; checked against the rule's allow-list
/// ([`crate::rules::Rule::authorize`]) before anything is published.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish a message on a topic the allow-list permits.
    Publish {
        /// Target topic; no wildcards.
        topic: String,
        /// Message body.
        payload: Vec<u8>,
        /// Requested QoS; capped at the rule's `qos`.
        qos: Qos,
        /// Whether the broker retains the message.
        retain: bool,
    },
    /// Raise an alert, published as JSON on the rule's alert topic.
    Alert {
        /// Severity.
        level: AlertLevel,
        /// Device the alert is about; empty means the window's device.
        device: String,
        /// Human-readable description.
        text: String,
    },
    /// Send a command to a device, published as JSON on the rule's command topic.
    Command {
        /// Target device.
        device: String,
        /// Command name, matched against the allow-list.
        name: String,
        /// Argument, checked against the allow-list's bounds or values.
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
    /// The message payload could not be understood.
    #[error("bad payload: {0}")]
    BadPayload(String),
    /// The plugin's settings in the rule file are wrong.
    #[error("bad config: {0}")]
    BadConfig(String),
    /// The model's completion could not be turned into actions.
    #[error("bad completion: {0}")]
    BadCompletion(String),
    /// A call to the `llm` interface failed.
    #[error("llm: {0}")]
    Llm(LlmError),
    /// Any other failure, described by the plugin.
    #[error("{0}")]
    Other(String),
}

/// The four pipeline stages a component can implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Message to readings (`preprocess` interface).
    Preprocessor,
    /// Window of readings to a prompt (`template` interface).
    PromptTemplate,
    /// Window and completion to actions (`postprocess` interface).
    Postprocessor,
    /// Message to actions, in full control (`handler` interface).
    Rule,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 4] = [
        Stage::Preprocessor,
        Stage::PromptTemplate,
        Stage::Postprocessor,
        Stage::Rule,
    ];

    /// The stage's name, that of its WIT interface: `preprocess`, `template`,
    /// `postprocess` or `handler`. The same on the command line, in rule
    /// files, in the SDK's `export!`, in logs and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Preprocessor => "preprocess",
            Stage::PromptTemplate => "template",
            Stage::Postprocessor => "postprocess",
            Stage::Rule => "handler",
        }
    }

    /// The WIT world that exports this stage alone (`preprocessor`,
    /// `prompt-template`, `postprocessor`, `rule`): the name a plugin is
    /// built for, and an older spelling of the stage that parsing accepts.
    pub fn world(self) -> &'static str {
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

/// A stage name that is neither a stage's nor its world's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown stage {0:?}: use preprocess, template, postprocess or handler (or the world names preprocessor, prompt-template, postprocessor, rule)"
)]
pub struct UnknownStage(pub String);

impl std::str::FromStr for Stage {
    type Err = UnknownStage;

    /// A stage by its name or, as before the names were unified, its world's.
    fn from_str(s: &str) -> Result<Stage, UnknownStage> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.name() == s || stage.world() == s)
            .ok_or_else(|| UnknownStage(s.to_owned()))
    }
}

/// A message to publish, after the allow-list check.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The topic, with patterns filled in.
    pub topic: String,
    /// The message body (JSON for alerts and commands).
    pub payload: Vec<u8>,
    /// The QoS, at most the rule's.
    pub qos: Qos,
    /// Whether the broker retains the message.
    pub retain: bool,
}

/// Milliseconds since the Unix epoch, now (0 before 1970: a clock that
/// far wrong stamps every message alike rather than failing).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The receive time to stamp on a message now.
pub fn received_now() -> i64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ganglion_tools::project::World;

    #[test]
    fn a_stage_parses_from_its_name_and_its_worlds_as_ganglion_new_does() {
        for stage in Stage::ALL {
            assert_eq!(stage.name().parse(), Ok(stage));
            assert_eq!(stage.world().parse(), Ok(stage));
            let world: World = stage.name().parse().unwrap();
            assert_eq!(stage.world().parse::<World>().unwrap(), world);
            assert_eq!((world.stage(), world.name()), (stage.name(), stage.world()));
        }
        assert_eq!(
            "preprocessors".parse::<Stage>(),
            Err(UnknownStage("preprocessors".into()))
        );
    }
}
