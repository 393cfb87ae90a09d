//! One rule at work: message → preprocess chain → window per device →
//! prompt → model → postprocess → allow-list, or message → handler →
//! allow-list. Produces what to publish and what to dead-letter; the caller
//! (the gateway) publishes, and acknowledges the message afterwards.

mod parse;
mod process;
mod trial;
mod window;

#[doc(hidden)]
pub use parse::fuzzing;
use parse::parse_csv;
pub use trial::{Trial, TrialAction, TrialDeadLetter, TrialStage};
use window::{Window, restore_windows, split_by_device};

use crate::audit::{AuditLog, DecisionRecord, Replayed};
use crate::config::PipelineLimits;
use crate::llm::{GenerateRequest, LlmEngine};
use crate::plugin::{CallError, InstancePool, Plugin, PluginHost};
use crate::rules::{CsvSpec, PayloadFormat, PluginRef, Rule, Stages, WindowSpec, check_device};
use crate::types::{
    Action, Completion, Context, LlmError, Message, Outgoing, ReadingBatch, Stage, Value, now_ms,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A message that could not be handled, with everything needed to retry it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The rule that could not handle the message.
    pub rule: String,
    /// The plugin whose call failed or whose action the allow-list refused;
    /// `None` when no plugin is at fault (intake, window, model).
    pub plugin: Option<String>,
    /// That plugin's version: the first 12 hex digits of its content hash.
    pub version: Option<String>,
    /// intake, preprocess, window, prompt, llm, postprocess, handler or allow-list.
    pub stage: String,
    /// A machine-readable reason kind (`bad-payload`, `trap`, `deadline`, `refused-action`...).
    pub kind: String,
    /// The cause, for people (the error message).
    pub reason: String,
    /// The message's topic (for a window flushed by time: that of the
    /// message that opened the window).
    pub topic: String,
    /// The first bytes of the message's payload as received (base64 in the
    /// JSON), at most `[rules.limits] dead_letter_payload_bytes`: a whole
    /// large payload would make a dead letter larger than the message, which
    /// the broker may refuse.
    pub payload: Vec<u8>,
    /// The whole payload's length in bytes.
    pub payload_bytes: usize,
    /// The whole payload's BLAKE3 hash (hex), to find the message in a
    /// device's or broker's log.
    pub payload_blake3: String,
    /// When the message was received, ms since the Unix epoch.
    pub timestamp: i64,
}

impl DeadLetter {
    /// The JSON published on the rule's dead-letter topic.
    pub fn to_json(&self) -> Vec<u8> {
        use base64::Engine as _;
        serde_json::json!({
            "rule": self.rule,
            "plugin": self.plugin,
            "version": self.version,
            "stage": self.stage,
            "kind": self.kind,
            "reason": self.reason,
            "topic": self.topic,
            "payload_base64": base64::engine::general_purpose::STANDARD.encode(&self.payload),
            "payload_bytes": self.payload_bytes,
            "payload_blake3": self.payload_blake3,
            "payload_truncated": self.payload.len() < self.payload_bytes,
            "timestamp": self.timestamp,
        })
        .to_string()
        .into_bytes()
    }
}

/// What processing one message (or flushing windows) produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Outputs the allow-list let through, to publish in this order.
    pub publish: Vec<Outgoing>,
    /// What could not be handled, for the rule's dead-letter topic.
    pub dead_letters: Vec<DeadLetter>,
    /// Readings that entered the pipeline after preprocessing.
    pub readings: usize,
    /// The user message of each prompt sent to the model, for the live view.
    pub prompts: Vec<String>,
    /// The text of each completion the model returned, for the live view.
    pub completions: Vec<String>,
    /// The state store's commit that holds the windows this message added
    /// to; the message is acknowledged once it is durable
    /// ([`RulePipeline::durable`]).
    pub persisted: Option<u64>,
    /// Milliseconds spent in each stage that ran (`preprocess`, `prompt`,
    /// `llm`, `postprocess`), for the latency histograms of `/metrics`.
    pub stage_ms: Vec<(&'static str, f64)>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.publish.extend(other.publish);
        self.dead_letters.extend(other.dead_letters);
        self.readings += other.readings;
        self.prompts.extend(other.prompts);
        self.completions.extend(other.completions);
        self.persisted = self.persisted.max(other.persisted);
        self.stage_ms.extend(other.stage_ms);
    }
}

/// What a dead letter tells of a message: its topic, time, and a prefix of
/// its payload with the whole payload's length and hash.
#[derive(Debug, Clone)]
struct Origin {
    topic: String,
    timestamp: i64,
    prefix: Vec<u8>,
    bytes: usize,
    blake3: String,
}

impl Origin {
    fn new(topic: &str, payload: &[u8], timestamp: i64, cap: usize) -> Origin {
        Origin {
            topic: topic.to_owned(),
            timestamp,
            prefix: payload[..payload.len().min(cap)].to_vec(),
            bytes: payload.len(),
            blake3: blake3::hash(payload).to_hex().to_string(),
        }
    }

    fn of(message: &Message, cap: usize) -> Origin {
        Origin::new(&message.topic, &message.payload, message.timestamp, cap)
    }
}

/// The message a dead letter is about: the one being processed, or the one
/// that opened a window (kept as an [`Origin`]). The hash of a message in
/// flight is only taken when a dead letter needs it.
#[derive(Clone, Copy)]
enum Source<'a> {
    Message(&'a Message),
    Window(&'a Origin),
}

impl<'a> From<&'a Message> for Source<'a> {
    fn from(m: &'a Message) -> Self {
        Source::Message(m)
    }
}

impl<'a> From<&'a Origin> for Source<'a> {
    fn from(o: &'a Origin) -> Self {
        Source::Window(o)
    }
}

impl Source<'_> {
    fn timestamp(&self) -> i64 {
        match self {
            Source::Message(m) => m.timestamp,
            Source::Window(o) => o.timestamp,
        }
    }
}

struct Bound {
    pool: InstancePool,
}

impl Bound {
    fn plugin(&self) -> &Arc<Plugin> {
        self.pool.plugin()
    }
}

enum Bindings {
    Chain {
        preprocess: Vec<Bound>,
        prompt: Option<Bound>,
        postprocess: Bound,
    },
    Handler(Bound),
}

/// Most actions a constrained model answer may hold
/// (`[allow] constrain_model`).
const MODEL_ACTIONS: usize = 4;

/// One window's way through the model path, for the outcome, the audit log
/// and replay.
#[derive(Default)]
struct Decision {
    prompt: Option<crate::types::Prompt>,
    completion: Option<Result<Completion, LlmError>>,
    /// Each proposed action: what to publish, or why the allow-list refused it.
    actions: Vec<Result<Outgoing, String>>,
    /// The stage (`template` or `postprocess`) whose call failed.
    failure: Option<(&'static str, CallError)>,
    timings: crate::audit::RecordedTimings,
}

impl Decision {
    fn replayed(&self) -> Replayed {
        use crate::audit::{record_completion, record_prompt};
        Replayed {
            prompt: match (&self.prompt, &self.failure) {
                (Some(p), _) => Ok(record_prompt(p)),
                (None, Some(("template", e))) => Err(e.to_string()),
                (None, _) => Err("no prompt".into()),
            },
            completion: self.completion.as_ref().map(record_completion),
            actions: recorded(&self.actions),
            error: match &self.failure {
                Some(("postprocess", e)) => Some(e.to_string()),
                _ => None,
            },
        }
    }
}

/// A rule bound to loaded plugins.
pub struct RulePipeline {
    /// The rule as parsed; shared with status views.
    pub rule: Arc<Rule>,
    bindings: Bindings,
    /// Shared with the rule's next version, so a reload loses no reading
    /// that waits in a window.
    windows: Arc<Mutex<HashMap<String, Window>>>,
    limits: PipelineLimits,
    /// Where open windows are kept, when `persist_windows`.
    store: crate::state::StateStore,
    audit: Option<AuditLog>,
    llm: Arc<dyn LlmEngine>,
    llm_timeout: Duration,
    /// `name@version` of every bound plugin, in pipeline order, for the
    /// span each message is processed in (made once, not per message).
    versions: String,
}

impl RulePipeline {
    /// The store the rule keeps its windows and its on/off switch in.
    pub(crate) fn state(&self) -> &crate::state::StateStore {
        &self.store
    }
}

/// Why a rule could not be bound to its plugins.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The rule has a window and shared filters under `[mqtt] share_group`
    /// ([`crate::rules::Rule::check_sharing`]).
    #[error("{0}")]
    Sharing(String),
    /// The rule's grants for a plugin are invalid: a granted host directory
    /// is not a directory, or a guest path is not absolute.
    #[error("rule `{rule}`: plugin `{plugin}`: {reason}")]
    Grant {
        /// The rule's name.
        rule: String,
        /// The plugin the grants are for.
        plugin: String,
        /// What is wrong with them.
        reason: String,
    },
    /// The rule's limits for a plugin are over their bounds in
    /// `[plugins.limits]` (or 0).
    #[error("rule `{rule}`: plugin `{plugin}`: {reason}")]
    Limits {
        /// The rule's name.
        rule: String,
        /// The plugin the limits are for.
        plugin: String,
        /// Which limit, its value and its bound.
        reason: String,
    },
    /// The rule names an engine that is not configured (`engine =
    /// "remote:<name>"` without `[remote.<name>]`).
    #[error("rule `{rule}`: {reason}")]
    Engine {
        /// The rule's name.
        rule: String,
        /// What is wrong.
        reason: String,
    },
    /// The rule names a plugin that is not loaded.
    #[error("rule `{rule}`: plugin `{plugin}` is not loaded")]
    Missing {
        /// The rule's name.
        rule: String,
        /// The plugin it names.
        plugin: String,
    },
    /// The plugin is loaded but does not export the stage the rule uses it
    /// for.
    #[error(
        "rule `{rule}`: plugin `{plugin}` does not implement the {stage} stage (it implements {has})"
    )]
    WrongStage {
        /// The rule's name.
        rule: String,
        /// The plugin it names.
        plugin: String,
        /// The stage the rule uses it for.
        stage: Stage,
        /// The stages it does implement, comma-separated.
        has: String,
    },
}

impl RulePipeline {
    /// Binds `rule` to plugins by name; each must implement its stage.
    pub fn new(
        host: &PluginHost,
        rule: Rule,
        plugins: &HashMap<String, Arc<Plugin>>,
        llm: Arc<dyn LlmEngine>,
    ) -> Result<Self, BindError> {
        let bind = |r: &PluginRef, stage: Stage| -> Result<Bound, BindError> {
            let plugin = plugins.get(&r.plugin).ok_or_else(|| BindError::Missing {
                rule: rule.name.clone(),
                plugin: r.plugin.clone(),
            })?;
            if !plugin.implements(stage) {
                let has = plugin
                    .stages
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(BindError::WrongStage {
                    rule: rule.name.clone(),
                    plugin: r.plugin.clone(),
                    stage,
                    has,
                });
            }
            host.limits()
                .with(&r.limits)
                .map_err(|reason| BindError::Limits {
                    rule: rule.name.clone(),
                    plugin: r.plugin.clone(),
                    reason,
                })?;
            let pool = host
                .pool_with_engine(
                    plugin,
                    &rule.name,
                    r.config_json(),
                    r.grants.clone(),
                    &r.limits,
                    llm.clone(),
                )
                .map_err(|reason| BindError::Grant {
                    rule: rule.name.clone(),
                    plugin: r.plugin.clone(),
                    reason,
                })?;
            Ok(Bound { pool })
        };
        let bindings = match &rule.stages {
            Stages::Handler(h) => Bindings::Handler(bind(h, Stage::Rule)?),
            Stages::Chain {
                preprocess,
                prompt,
                postprocess,
                ..
            } => Bindings::Chain {
                preprocess: preprocess
                    .iter()
                    .map(|p| bind(p, Stage::Preprocessor))
                    .collect::<Result<_, _>>()?,
                prompt: prompt
                    .as_ref()
                    .map(|p| bind(p, Stage::PromptTemplate))
                    .transpose()?,
                postprocess: bind(postprocess, Stage::Postprocessor)?,
            },
        };
        let llm_timeout = host.limits().llm_timeout();
        let store = host.state().clone();
        let windows = restore_windows(&store, &rule.name);
        let versions = staged(&bindings)
            .iter()
            .map(|(_, b)| format!("{}@{}", b.plugin().name, b.plugin().version))
            .collect::<Vec<_>>()
            .join(",");
        Ok(RulePipeline {
            rule: Arc::new(rule),
            bindings,
            windows: Arc::new(Mutex::new(windows)),
            limits: PipelineLimits::default(),
            store,
            audit: None,
            llm,
            llm_timeout,
            versions,
        })
    }

    /// Each plugin the rule is bound to, with the stage it serves
    /// (`preprocess`, `template`, `postprocess` or `handler`) and its
    /// instance pool's counters, in pipeline order.
    pub fn plugins(&self) -> Vec<(&'static str, Arc<Plugin>, crate::plugin::PoolStats)> {
        staged(&self.bindings)
            .into_iter()
            .map(|(stage, b)| (stage, b.plugin().clone(), b.pool.stats()))
            .collect()
    }

    /// `name@version` of the rule's plugins in pipeline order, comma
    /// separated; the version is the first 12 hex digits of the component's
    /// hash, as in dead letters and the audit log.
    pub fn plugin_versions(&self) -> &str {
        &self.versions
    }

    /// The rule's window length in seconds, when it has a time window.
    pub fn window_seconds(&self) -> Option<u64> {
        self.window_spec().and_then(|w| w.seconds)
    }

    fn window_spec(&self) -> Option<WindowSpec> {
        self.rule.window().copied()
    }

    /// This pipeline, under `limits` (`[rules.limits]`).
    pub fn with_limits(mut self, limits: PipelineLimits) -> Self {
        self.limits = limits;
        self
    }

    /// This pipeline, recording its model decisions in `audit`.
    pub fn with_audit(mut self, audit: Option<AuditLog>) -> Self {
        self.audit = audit;
        self
    }
}

/// Actions as the audit log and the rule test record them: allowed ones
/// with their topic and payload, refused ones with the reason.
fn recorded(checked: &[Result<Outgoing, String>]) -> Vec<crate::audit::RecordedAction> {
    checked
        .iter()
        .map(|c| match c {
            Ok(out) => crate::audit::RecordedAction {
                allowed: true,
                topic: Some(out.topic.clone()),
                payload: Some(String::from_utf8_lossy(&out.payload).into_owned()),
                reason: None,
            },
            Err(reason) => crate::audit::RecordedAction {
                allowed: false,
                topic: None,
                payload: None,
                reason: Some(reason.clone()),
            },
        })
        .collect()
}

/// The bound plugins in pipeline order, each with the stage it serves.
fn staged(bindings: &Bindings) -> Vec<(&'static str, &Bound)> {
    match bindings {
        Bindings::Handler(h) => vec![("handler", h)],
        Bindings::Chain {
            preprocess,
            prompt,
            postprocess,
        } => preprocess
            .iter()
            .map(|b| ("preprocess", b))
            .chain(prompt.iter().map(|b| ("template", b)))
            .chain(std::iter::once(("postprocess", postprocess)))
            .collect(),
    }
}
