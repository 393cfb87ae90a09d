//! One rule at work: message → preprocess chain → window per device →
//! prompt → model → postprocess → allow-list, or message → handler →
//! allow-list. Produces what to publish and what to dead-letter; the caller
//! (the gateway) publishes, and acknowledges the message afterwards.

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
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.publish.extend(other.publish);
        self.dead_letters.extend(other.dead_letters);
        self.readings += other.readings;
        self.prompts.extend(other.prompts);
        self.completions.extend(other.completions);
        self.persisted = self.persisted.max(other.persisted);
    }
}

struct Window {
    batch: ReadingBatch,
    opened: Instant,
    /// When the last reading came in, for `window_idle_seconds`.
    last: Instant,
    /// The message that opened the window, named in dead letters of a time
    /// flush; only a bounded prefix of its payload is kept.
    first: Origin,
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
    /// The stage (`prompt` or `postprocess`) whose call failed.
    failure: Option<(&'static str, CallError)>,
    timings: crate::audit::RecordedTimings,
}

impl Decision {
    fn replayed(&self) -> Replayed {
        use crate::audit::{RecordedAction, record_completion, record_prompt};
        Replayed {
            prompt: match (&self.prompt, &self.failure) {
                (Some(p), _) => Ok(record_prompt(p)),
                (None, Some(("prompt", e))) => Err(e.to_string()),
                (None, _) => Err("no prompt".into()),
            },
            completion: self.completion.as_ref().map(record_completion),
            actions: self
                .actions
                .iter()
                .map(|a| match a {
                    Ok(out) => RecordedAction {
                        allowed: true,
                        topic: Some(out.topic.clone()),
                        payload: Some(String::from_utf8_lossy(&out.payload).into_owned()),
                        reason: None,
                    },
                    Err(reason) => RecordedAction {
                        allowed: false,
                        topic: None,
                        payload: None,
                        reason: Some(reason.clone()),
                    },
                })
                .collect(),
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
}

/// Why a rule could not be bound to its plugins.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
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
            let pool = host
                .pool_with_grants(plugin, &rule.name, r.config_json(), r.grants.clone())
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
        Ok(RulePipeline {
            rule: Arc::new(rule),
            bindings,
            windows: Arc::new(Mutex::new(windows)),
            limits: PipelineLimits::default(),
            store,
            audit: None,
            llm,
            llm_timeout,
        })
    }

    /// The rule's window length in seconds, when it has a time window.
    pub fn window_seconds(&self) -> Option<u64> {
        self.window_spec().and_then(|w| w.seconds)
    }

    fn window_spec(&self) -> Option<WindowSpec> {
        match &self.rule.stages {
            Stages::Chain { window, .. } => *window,
            Stages::Handler(_) => None,
        }
    }

    fn dead<'a>(
        &self,
        source: impl Into<Source<'a>>,
        stage: &str,
        kind: &str,
        reason: String,
        plugin: Option<&Plugin>,
    ) -> DeadLetter {
        let origin;
        let o = match source.into() {
            Source::Window(o) => o,
            Source::Message(m) => {
                origin = Origin::of(m, self.limits.dead_letter_payload_bytes);
                &origin
            }
        };
        DeadLetter {
            rule: self.rule.name.clone(),
            plugin: plugin.map(|p| p.name.clone()),
            version: plugin.map(|p| p.version.to_string()),
            stage: stage.into(),
            kind: kind.into(),
            reason,
            topic: o.topic.clone(),
            payload: o.prefix.clone(),
            payload_bytes: o.bytes,
            payload_blake3: o.blake3.clone(),
            timestamp: o.timestamp,
        }
    }

    /// A dead letter of this rule about `message`, no plugin at fault (for
    /// the gateway: a lane that panicked).
    pub fn dead_letter(
        &self,
        message: &Message,
        stage: &str,
        kind: &str,
        reason: String,
    ) -> DeadLetter {
        self.dead(message, stage, kind, reason, None)
    }

    /// A dead letter of this rule about an output that could not be
    /// published (`kind` `oversized-output` or `publish-refused`): the
    /// output's topic and a prefix of its payload.
    pub fn output_dead_letter(&self, out: &Outgoing, kind: &str, reason: String) -> DeadLetter {
        let origin = Origin::new(
            &out.topic,
            &out.payload,
            now_ms(),
            self.limits.dead_letter_payload_bytes,
        );
        self.dead(&origin, "publish", kind, reason, None)
    }

    fn call_failed(
        &self,
        message: Source<'_>,
        stage: &str,
        bound: &Bound,
        e: CallError,
    ) -> Outcome {
        let kind = match &e {
            CallError::Plugin(crate::types::PluginError::BadPayload(_)) => "bad-payload",
            CallError::Plugin(crate::types::PluginError::BadCompletion(_)) => "invalid-completion",
            other => other.kind(),
        };
        Outcome {
            dead_letters: vec![self.dead(
                message,
                stage,
                kind,
                e.to_string(),
                Some(bound.plugin()),
            )],
            ..Outcome::default()
        }
    }

    /// Processes one message to the end of the pipeline (or into a window).
    pub async fn process(&self, message: &Message) -> Outcome {
        if message.payload.len() > self.rule.max_payload_bytes {
            let reason = format!(
                "payload of {} bytes over the rule's cap of {}",
                message.payload.len(),
                self.rule.max_payload_bytes
            );
            return Outcome {
                dead_letters: vec![self.dead(message, "intake", "oversized-payload", reason, None)],
                ..Outcome::default()
            };
        }
        let mut readings = ReadingBatch::default();
        match self.rule.format {
            PayloadFormat::Json => {
                if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&message.payload) {
                    return Outcome {
                        dead_letters: vec![self.dead(
                            message,
                            "intake",
                            "bad-payload",
                            format!("invalid JSON: {e}"),
                            None,
                        )],
                        ..Outcome::default()
                    };
                }
            }
            PayloadFormat::Csv => match parse_csv(
                message,
                self.rule
                    .csv
                    .as_ref()
                    .expect("validated: csv rules have [csv]"),
            ) {
                Ok(b) => readings = b,
                Err(reason) => {
                    return Outcome {
                        dead_letters: vec![self.dead(
                            message,
                            "intake",
                            "bad-payload",
                            reason,
                            None,
                        )],
                        ..Outcome::default()
                    };
                }
            },
            PayloadFormat::Raw => {}
        }
        match &self.bindings {
            Bindings::Handler(h) => match h.pool.handle(&self.rule.name, message).await {
                Ok(actions) => {
                    let device = self
                        .rule
                        .topic_device(&message.topic, self.limits.max_device_bytes)
                        .unwrap_or_default();
                    self.authorize(message.into(), device, actions, h)
                }
                Err(e) => self.call_failed(message.into(), "handler", h, e),
            },
            Bindings::Chain { preprocess, .. } => {
                for p in preprocess {
                    readings = match p.pool.preprocess(message, readings).await {
                        Ok(r) => r,
                        Err(e) => return self.call_failed(message.into(), "preprocess", p, e),
                    };
                }
                let mut outcome = Outcome {
                    readings: readings.len(),
                    ..Outcome::default()
                };
                let mut bad_devices = 0usize;
                let mut crowded: Vec<(String, usize)> = Vec::new();
                let topic_device = self
                    .rule
                    .device_level
                    .map(|i| message.topic.split('/').nth(i).unwrap_or_default());
                let mut spoofed = 0;
                for (device, batch) in split_by_device(readings) {
                    if let Some(own) = topic_device
                        && device != own
                    {
                        if spoofed == 0 {
                            let why = format!(
                                "readings of device `{}` on a topic of device `{own}` (`device_level = {}`)",
                                device.escape_debug(),
                                self.rule.device_level.unwrap_or_default()
                            );
                            outcome.dead_letters.push(self.dead(
                                message,
                                "window",
                                "device-mismatch",
                                why,
                                None,
                            ));
                        }
                        spoofed += 1;
                        continue;
                    }
                    if let Err(why) = check_device(&device, self.limits.max_device_bytes) {
                        if bad_devices == 0 {
                            outcome.dead_letters.push(self.dead(
                                message,
                                "window",
                                "bad-device",
                                why,
                                None,
                            ));
                        }
                        bad_devices += 1;
                        continue;
                    }
                    let ready = match self.window_spec() {
                        None => Some(batch),
                        Some(spec) => match self.add_to_window(&device, batch, message, spec) {
                            Ok((ready, commit)) => {
                                outcome.persisted = outcome.persisted.max(commit);
                                ready
                            }
                            Err(n) => {
                                crowded.push((device, n));
                                continue;
                            }
                        },
                    };
                    if let Some(window) = ready {
                        outcome.merge(self.run_window(message.into(), &device, window).await);
                    }
                }
                if bad_devices > 1
                    && let Some(dl) = outcome
                        .dead_letters
                        .iter_mut()
                        .find(|d| d.kind == "bad-device")
                {
                    dl.reason = format!(
                        "{} (and {} more refused device ids in this message)",
                        dl.reason,
                        bad_devices - 1
                    );
                }
                if !crowded.is_empty() {
                    let readings: usize = crowded.iter().map(|(_, n)| n).sum();
                    let reason = format!(
                        "{readings} readings of {} new devices (first `{}`) refused: the rule already has {} open windows (`[rules.limits] max_windows`)",
                        crowded.len(),
                        crowded[0].0,
                        self.limits.max_windows
                    );
                    outcome.dead_letters.push(self.dead(
                        message,
                        "window",
                        "too-many-windows",
                        reason,
                        None,
                    ));
                }
                outcome
            }
        }
    }

    /// Adds readings to the device's window; returns the window's readings
    /// when it is complete by count or full (`max_window_readings`). Refuses
    /// a new device's readings (`Err` with their number) when the rule
    /// already has `max_windows` windows open.
    fn add_to_window(
        &self,
        device: &str,
        batch: ReadingBatch,
        message: &Message,
        spec: WindowSpec,
    ) -> Result<(Option<ReadingBatch>, Option<u64>), usize> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if !windows.contains_key(device) && windows.len() >= self.limits.max_windows {
            return Err(batch.len());
        }
        let now = Instant::now();
        let w = windows.entry(device.to_owned()).or_insert_with(|| Window {
            batch: ReadingBatch::default(),
            opened: now,
            last: now,
            first: Origin::of(message, self.limits.dead_letter_payload_bytes),
        });
        w.last = now;
        for r in batch.iter() {
            w.batch
                .push(r.device, r.metric, r.value.clone(), r.unit, r.timestamp);
        }
        let full = spec.count.map_or(self.limits.max_window_readings, |n| {
            n.min(self.limits.max_window_readings)
        });
        if w.batch.len() >= full.max(1) {
            let ran = windows.remove(device).map(|w| w.batch);
            return Ok((ran, self.forget_window(device)));
        }
        let commit = if self.limits.persist_windows {
            let bytes = encode_window(w);
            self.store
                .save_window(&self.rule.name, device, &bytes)
                .map_err(|e| {
                    tracing::error!(rule = %self.rule.name, device, error = %e, "window not persisted");
                })
                .ok()
        } else {
            None
        };
        Ok((None, commit))
    }

    /// Removes a window that ran from the store; the commit, if any.
    fn forget_window(&self, device: &str) -> Option<u64> {
        if !self.limits.persist_windows {
            return None;
        }
        self.store
            .delete_window(&self.rule.name, device)
            .map_err(|e| {
                tracing::error!(rule = %self.rule.name, device, error = %e, "ran window not removed from the store");
            })
            .ok()
    }

    /// Completes once the state store's commit `persisted` (an outcome's
    /// [`Outcome::persisted`]) is durable.
    pub async fn durable(&self, persisted: Option<u64>) {
        if let Some(commit) = persisted {
            self.store.durable(commit).await;
        }
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

    /// This pipeline, taking over the open windows of `previous` (an
    /// earlier version of the same rule): readings already accepted wait on
    /// under the new version's window settings.
    pub fn sharing_windows_of(mut self, previous: &RulePipeline) -> Self {
        self.windows = previous.windows.clone();
        self
    }

    /// Runs every window older than the rule's `seconds` to the end; with
    /// `all`, every open window (at shutdown, so no accepted reading is lost).
    /// A rule without a window runs whatever an earlier version of it left
    /// in windows; one with a count-only window leaves them to fill up.
    pub async fn flush_expired(&self, all: bool) -> Outcome {
        let max_age = match self.window_spec() {
            _ if all => Some(Duration::ZERO),
            None => Some(Duration::ZERO),
            Some(WindowSpec {
                seconds: Some(secs),
                ..
            }) => Some(Duration::from_secs(secs)),
            Some(_) => None,
        };
        // A count-only window fed by a device that went quiet would hold its
        // readings (and memory) for ever.
        let max_idle = (self.limits.window_idle_seconds > 0)
            .then(|| Duration::from_secs(self.limits.window_idle_seconds));
        if max_age.is_none() && max_idle.is_none() {
            return Outcome::default();
        }
        let expired: Vec<(String, Window)> = {
            let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<String> = windows
                .iter()
                .filter(|(_, w)| {
                    max_age.is_some_and(|a| w.opened.elapsed() >= a)
                        || max_idle.is_some_and(|i| w.last.elapsed() >= i)
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| windows.remove(&k).map(|w| (k, w)))
                .collect()
        };
        let mut outcome = Outcome::default();
        for (device, w) in expired {
            outcome.persisted = outcome.persisted.max(self.forget_window(&device));
            if !w.batch.is_empty() {
                outcome.merge(self.run_window((&w.first).into(), &device, w.batch).await);
            }
        }
        outcome
    }

    /// How many windows are open (one per device with readings waiting).
    pub fn pending_windows(&self) -> usize {
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn run_window(&self, message: Source<'_>, device: &str, window: ReadingBatch) -> Outcome {
        let Bindings::Chain {
            prompt,
            postprocess,
            ..
        } = &self.bindings
        else {
            // Only a window an earlier version of the rule left open gets
            // here: a handler rule has no stage to take readings.
            let reason = format!(
                "the rule was changed to a handler rule; {} readings of device `{device}` waiting in its window have no stage to go to",
                window.len()
            );
            return Outcome {
                dead_letters: vec![self.dead(message, "window", "rule-changed", reason, None)],
                ..Outcome::default()
            };
        };
        let context = Context {
            rule: self.rule.name.clone(),
            device: device.to_owned(),
            window_start: window
                .readings
                .iter()
                .map(|r| r.timestamp)
                .min()
                .unwrap_or(message.timestamp()),
            window_end: window
                .readings
                .iter()
                .map(|r| r.timestamp)
                .max()
                .unwrap_or(message.timestamp()),
        };
        let auditing = self.audit.as_ref().filter(|_| prompt.is_some());
        let recorded_window = auditing.map(|_| crate::audit::record_window(&window));
        let d = self.decide(&context, window).await;
        if let (Some(log), Some(window)) = (auditing, recorded_window) {
            log.append(&self.record(&context, window, &d, log));
        }
        let mut outcome = Outcome::default();
        if let Some(p) = &d.prompt {
            outcome.prompts.push(p.user.clone());
        }
        match &d.completion {
            Some(Ok(c)) => outcome.completions.push(c.text.clone()),
            Some(Err(e)) => {
                let kind = match e {
                    LlmError::DeadlineExceeded => "llm-deadline",
                    _ => "llm-error",
                };
                outcome
                    .dead_letters
                    .push(self.dead(message, "llm", kind, e.to_string(), None));
            }
            None => {}
        }
        if let Some((stage, e)) = d.failure {
            let bound = match stage {
                "prompt" => prompt.as_ref().unwrap_or(postprocess),
                _ => postprocess,
            };
            outcome.merge(self.call_failed(message, stage, bound, e));
        }
        outcome.merge(self.deliverable(message, d.actions, postprocess));
        outcome
    }

    /// The window's way through prompt, model, postprocess and allow-list.
    async fn decide(&self, context: &Context, window: ReadingBatch) -> Decision {
        let mut d = Decision::default();
        let Bindings::Chain {
            prompt,
            postprocess,
            ..
        } = &self.bindings
        else {
            return d;
        };
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
        let completion = match prompt {
            None => None,
            Some(p) => {
                let t = Instant::now();
                let rendered = p.pool.render(context, window.clone()).await;
                d.timings.prompt_ms = ms(t);
                let mut rendered = match rendered {
                    Ok(r) => r,
                    Err(e) => {
                        d.failure = Some(("prompt", e));
                        return d;
                    }
                };
                if self.rule.allow.constrain_model {
                    let schema = self.rule.allow.action_schema(
                        &self.rule.name,
                        &context.device,
                        MODEL_ACTIONS,
                    );
                    rendered.params.constraint =
                        crate::types::Constraint::JsonSchema(schema.to_string());
                }
                d.prompt = Some(rendered.clone());
                let t = Instant::now();
                let c = self.generate(rendered).await;
                d.timings.llm_ms = ms(t);
                let ok = c.as_ref().ok().cloned();
                d.completion = Some(c);
                match ok {
                    Some(c) => Some(c),
                    None => return d,
                }
            }
        };
        let t = Instant::now();
        let result = postprocess
            .pool
            .postprocess(context, window, completion.as_ref())
            .await;
        d.timings.postprocess_ms = ms(t);
        match result {
            Ok(actions) => {
                d.actions = actions
                    .iter()
                    .map(|a| self.rule.authorize(a, &context.device))
                    .collect();
            }
            Err(e) => d.failure = Some(("postprocess", e)),
        }
        d
    }

    /// The audit record of a decision.
    fn record(
        &self,
        context: &Context,
        window: Vec<crate::audit::RecordedReading>,
        d: &Decision,
        log: &AuditLog,
    ) -> DecisionRecord {
        use crate::audit::{RecordedModel, RecordedPlugin};
        let plugin = |b: Option<&Bound>| RecordedPlugin {
            name: b.map(|b| b.plugin().name.clone()).unwrap_or_default(),
            version: b
                .map(|b| b.plugin().version.to_string())
                .unwrap_or_default(),
        };
        let (prompt_bound, post_bound) = match &self.bindings {
            Bindings::Chain {
                prompt,
                postprocess,
                ..
            } => (prompt.as_ref(), Some(postprocess)),
            Bindings::Handler(_) => (None, None),
        };
        let replayed = d.replayed();
        DecisionRecord {
            v: 1,
            timestamp: now_ms(),
            rule: self.rule.name.clone(),
            device: context.device.clone(),
            window_start: context.window_start,
            window_end: context.window_end,
            window,
            prompt_plugin: plugin(prompt_bound),
            postprocess_plugin: plugin(post_bound),
            model: RecordedModel {
                id: self.llm.model_id(),
                hash: log.model_hash(),
            },
            prompt: replayed.prompt.unwrap_or_else(|_| {
                crate::audit::record_prompt(&crate::types::Prompt {
                    system: String::new(),
                    user: String::new(),
                    params: Default::default(),
                })
            }),
            completion: replayed.completion.unwrap_or_else(|| {
                crate::audit::record_completion(&Err(LlmError::InvalidInput(
                    "no model call".into(),
                )))
            }),
            actions: replayed.actions,
            error: replayed.error,
            timings: d.timings,
        }
    }

    /// Takes a recorded decision again through this rule's current prompt
    /// plugin, the current model and the current postprocess plugin (for
    /// `ganglion replay`).
    pub async fn replay(&self, record: &DecisionRecord) -> Replayed {
        let has_prompt = matches!(
            &self.bindings,
            Bindings::Chain {
                prompt: Some(_),
                ..
            }
        );
        if !has_prompt {
            return Replayed {
                prompt: Err(format!("rule `{}` has no prompt stage now", self.rule.name)),
                completion: None,
                actions: Vec::new(),
                error: None,
            };
        }
        self.decide(&record.context(), record.window_batch())
            .await
            .replayed()
    }

    /// Asks the engine; `overloaded` waits and retries within the timeout,
    /// which holds the message (backpressure) instead of dropping it.
    async fn generate(&self, prompt: crate::types::Prompt) -> Result<Completion, LlmError> {
        let request = GenerateRequest::system_and_user(
            prompt.system,
            prompt.user,
            prompt.params,
            self.rule.name.clone(),
        );
        let limit = request.params.deadline_ms.map_or(self.llm_timeout, |ms| {
            self.llm_timeout.min(Duration::from_millis(u64::from(ms)))
        });
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let left = limit.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.llm.generate(request.clone())).await {
                Err(_) => return Err(LlmError::DeadlineExceeded),
                Ok(Err(LlmError::Overloaded)) if started.elapsed() + backoff < limit => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Ok(r) => return r,
            }
        }
    }

    fn authorize(
        &self,
        message: Source<'_>,
        device: &str,
        actions: Vec<Action>,
        by: &Bound,
    ) -> Outcome {
        let checked = actions
            .iter()
            .map(|a| self.rule.authorize(a, device))
            .collect();
        self.deliverable(message, checked, by)
    }

    /// Actions the allow-list let out, to publish; refused ones, dead-lettered
    /// with the reason and the plugin that proposed them.
    fn deliverable(
        &self,
        message: Source<'_>,
        checked: Vec<Result<Outgoing, String>>,
        by: &Bound,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        for a in checked {
            match a {
                Ok(out) => outcome.publish.push(out),
                Err(reason) => outcome.dead_letters.push(self.dead(
                    message,
                    "allow-list",
                    "refused-action",
                    reason,
                    Some(by.plugin()),
                )),
            }
        }
        outcome
    }
}

/// The open windows `rule` left in the store (after a crash, or a stop
/// without a drain); an entry that cannot be read is logged and skipped.
fn restore_windows(store: &crate::state::StateStore, rule: &str) -> HashMap<String, Window> {
    let stored = match store.windows(rule) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(rule, error = %e, "open windows not read from the state store");
            return HashMap::new();
        }
    };
    let mut windows = HashMap::new();
    for (device, bytes) in stored {
        match decode_window(&bytes) {
            Some(w) => {
                windows.insert(device, w);
            }
            None => tracing::error!(rule, device, "a stored window could not be read; skipped"),
        }
    }
    if !windows.is_empty() {
        tracing::info!(
            rule,
            windows = windows.len(),
            "open windows restored from the state store"
        );
    }
    windows
}

/// A window as stored: JSON, with times as wall-clock milliseconds (an
/// `Instant` does not survive a restart).
fn encode_window(w: &Window) -> Vec<u8> {
    use base64::Engine as _;
    let now = now_ms();
    let age = |t: Instant| now - t.elapsed().as_millis() as i64;
    let readings: Vec<serde_json::Value> = w
        .batch
        .iter()
        .map(|r| {
            let value = match r.value {
                Value::Number(n) => serde_json::json!(n),
                Value::Boolean(b) => serde_json::json!(b),
                Value::Text(t) => serde_json::json!({ "text": t }),
            };
            serde_json::json!([r.device, r.metric, r.unit, value, r.timestamp])
        })
        .collect();
    serde_json::json!({
        "v": 1,
        "opened_ms": age(w.opened),
        "last_ms": age(w.last),
        "first": {
            "topic": w.first.topic,
            "timestamp": w.first.timestamp,
            "prefix": base64::engine::general_purpose::STANDARD.encode(&w.first.prefix),
            "bytes": w.first.bytes,
            "blake3": w.first.blake3,
        },
        "readings": readings,
    })
    .to_string()
    .into_bytes()
}

fn decode_window(bytes: &[u8]) -> Option<Window> {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v["v"] != 1 {
        return None;
    }
    let now = now_ms();
    let since = |ms: &serde_json::Value| {
        let ago =
            Duration::from_millis(now.saturating_sub(ms.as_i64().unwrap_or(now)).max(0) as u64);
        Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
    };
    let first = &v["first"];
    let mut batch = ReadingBatch::default();
    for r in v["readings"].as_array()? {
        let value = match &r[3] {
            serde_json::Value::Bool(b) => Value::Boolean(*b),
            serde_json::Value::Object(o) => Value::Text(o.get("text")?.as_str()?.to_owned()),
            n => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        };
        batch.push(
            r[0].as_str()?,
            r[1].as_str()?,
            value,
            r[2].as_str()?,
            r[4].as_i64()?,
        );
    }
    Some(Window {
        batch,
        opened: since(&v["opened_ms"]),
        last: since(&v["last_ms"]),
        first: Origin {
            topic: first["topic"].as_str()?.to_owned(),
            timestamp: first["timestamp"].as_i64()?,
            prefix: base64::engine::general_purpose::STANDARD
                .decode(first["prefix"].as_str()?)
                .ok()?,
            bytes: first["bytes"].as_u64()? as usize,
            blake3: first["blake3"].as_str()?.to_owned(),
        },
    })
}

/// The batch's readings grouped by device, in order of first appearance;
/// linear in the readings (a payload may name thousands of devices).
fn split_by_device(batch: ReadingBatch) -> Vec<(String, ReadingBatch)> {
    let mut groups: Vec<(String, ReadingBatch)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for r in batch.iter() {
        let i = *index.entry(r.device).or_insert_with(|| {
            groups.push((r.device.to_owned(), ReadingBatch::default()));
            groups.len() - 1
        });
        groups[i]
            .1
            .push(r.device, r.metric, r.value.clone(), r.unit, r.timestamp);
    }
    groups
}

/// Parses a CSV payload (one or more lines) into readings.
fn parse_csv(message: &Message, spec: &CsvSpec) -> Result<ReadingBatch, String> {
    let text = std::str::from_utf8(&message.payload)
        .map_err(|e| format!("CSV payload is not UTF-8: {e}"))?;
    let topic_device = spec
        .device_from_topic
        .and_then(|i| message.topic.split('/').nth(i))
        .unwrap_or("");
    let mut batch = ReadingBatch::default();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let fields: Vec<&str> = line.split(spec.delimiter).map(str::trim).collect();
        if fields.len() != spec.columns.len() {
            return Err(format!(
                "line {}: {} fields, expected {} ({})",
                n + 1,
                fields.len(),
                spec.columns.len(),
                spec.columns.join(",")
            ));
        }
        let get = |name: &str| {
            spec.columns
                .iter()
                .position(|c| c == name)
                .map(|i| fields[i])
        };
        let value_text = get("value").unwrap_or_default();
        let value = match value_text {
            "true" => Value::Boolean(true),
            "false" => Value::Boolean(false),
            v => v
                .parse::<f64>()
                .map(Value::Number)
                .unwrap_or_else(|_| Value::Text(v.to_owned())),
        };
        let timestamp = match get("timestamp") {
            None => message.timestamp,
            Some(t) => match t.parse::<f64>() {
                // `inf`, `NaN`, `1e400`: not a time (was i64::MAX or 0).
                Ok(x) if !x.is_finite() => {
                    return Err(format!("line {}: time {t:?} is not a finite number", n + 1));
                }
                Ok(n) if n.abs() < 1e11 => (n * 1000.0) as i64,
                Ok(n) => n as i64,
                Err(_) => parse_time(t)
                    .ok_or_else(|| format!("line {}: cannot read time {t:?}", n + 1))?,
            },
        };
        let device = get("device").unwrap_or(topic_device);
        let metric = get("metric").or(spec.metric.as_deref()).unwrap_or_default();
        let unit = get("unit").unwrap_or(&spec.unit);
        batch.push(device, metric, value, unit, timestamp);
    }
    Ok(batch)
}

/// `YYYY-MM-DD[T ]HH:MM:SS`, UTC, to ms since the epoch. Fields must be
/// digits and in range (second 60 for a leap second); what follows the
/// seconds is ignored.
fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    // Digits only: `parse` alone takes `+1` and `-1`.
    let n = |r: std::ops::Range<usize>| {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse::<i64>().ok()
    };
    let (y, m, d, hh, mm, ss) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000)
}

/// The private CSV and time parsers, for the cargo-fuzz targets in
/// tests/fuzz (a fuzz target sees only the public API). Not for other use.
#[doc(hidden)]
pub mod fuzzing {
    use super::{CsvSpec, Message, ReadingBatch};

    /// [`super::parse_csv`].
    pub fn parse_csv(message: &Message, spec: &CsvSpec) -> Result<ReadingBatch, String> {
        super::parse_csv(message, spec)
    }

    /// [`super::parse_time`].
    pub fn parse_time(s: &str) -> Option<i64> {
        super::parse_time(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_become_readings() {
        let spec = CsvSpec {
            columns: vec!["timestamp".into(), "value".into()],
            metric: Some("occupancy".into()),
            unit: "%".into(),
            device_from_topic: Some(1),
            delimiter: ',',
        };
        let m = Message {
            topic: "traffic/6005/occupancy".into(),
            payload: b"2015-09-01 13:45:00,3.06\n2015-09-01 13:50:00,6.44\n".to_vec(),
            timestamp: 0,
        };
        let b = parse_csv(&m, &spec).unwrap();
        let r: Vec<_> = b
            .iter()
            .map(|r| {
                (
                    r.device.to_owned(),
                    r.metric.to_owned(),
                    r.value.clone(),
                    r.timestamp,
                )
            })
            .collect();
        assert_eq!(
            r[0],
            (
                "6005".into(),
                "occupancy".into(),
                Value::Number(3.06),
                1_441_115_100_000
            )
        );
        assert_eq!(r.len(), 2);
        let bad = Message {
            payload: b"1,2,3".to_vec(),
            ..m
        };
        assert!(
            parse_csv(&bad, &spec)
                .unwrap_err()
                .contains("3 fields, expected 2")
        );
    }

    /// Found by `malformed_times_are_refused`: month 13 was read as January
    /// of the next year, `+1` and `-1` as numbers, any byte as the `T`.
    #[test]
    fn time_0000_13_01_is_refused() {
        for bad in [
            "0000-13-01 00:00:00",
            "2015-00-01 00:00:00",
            "2015-09-32 00:00:00",
            "2015-09-01 24:00:00",
            "2015-09-01 13:60:00",
            "2015-09-01 13:45:61",
            "2015-+9-01 13:45:00",
            "2015-09-01x13:45:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(parse_time("2015-09-01T13:45:00"), Some(1_441_115_100_000));
        assert_eq!(parse_time("2016-12-31 23:59:60"), Some(1_483_228_800_000));
    }

    /// Found by `non_finite_timestamps_are_refused`: `inf` was read as
    /// i64::MAX ms and `NaN` as the epoch.
    #[test]
    fn csv_timestamp_inf_is_refused() {
        let spec = CsvSpec {
            columns: vec!["timestamp".into(), "value".into()],
            metric: Some("m".into()),
            unit: String::new(),
            device_from_topic: Some(0),
            delimiter: ',',
        };
        for t in ["inf", "-inf", "NaN", "1e400"] {
            let m = Message {
                topic: "d".into(),
                payload: format!("{t},1").into_bytes(),
                timestamp: 0,
            };
            let e = parse_csv(&m, &spec).unwrap_err();
            assert!(e.contains("not a finite number"), "{t}: {e}");
        }
    }

    /// Property tests of the CSV and time parsers on hostile input. Cases
    /// per property: proptest's default (256), or `PROPTEST_CASES`.
    mod proptests {
        use super::*;
        use proptest::prelude::*;

        const COLUMNS: &[&str] = &["timestamp", "value", "device", "metric", "unit", "_"];

        fn spec(columns: Vec<&str>, delimiter: char) -> CsvSpec {
            CsvSpec {
                columns: columns.into_iter().map(str::to_owned).collect(),
                metric: Some("m".into()),
                unit: "u".into(),
                device_from_topic: Some(1),
                delimiter,
            }
        }

        fn message(topic: String, payload: Vec<u8>) -> Message {
            Message {
                topic,
                payload,
                timestamp: 7,
            }
        }

        /// Text made of CSV and time syntax, digits and a few others.
        fn csvish() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    proptest::sample::select(vec![
                        ',', ';', '\n', '\r', ' ', '\t', '-', ':', 'T', '.', '+', 'e', '\0',
                        '\u{e9}'
                    ]),
                    proptest::char::range('0', '9'),
                    any::<char>(),
                ],
                0..64,
            )
            .prop_map(|c| c.into_iter().collect())
        }

        /// A name that survives a CSV field as it is: no delimiter, no
        /// whitespace to trim, not read as a number or a boolean.
        fn name() -> impl Strategy<Value = String> {
            "[a-z][a-z0-9_.-]{0,8}".prop_filter("a name, not a number or boolean", |s| {
                s.parse::<f64>().is_err() && s != "true" && s != "false"
            })
        }

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<f64>()
                    .prop_filter("finite", |v| v.is_finite())
                    .prop_map(Value::Number),
                any::<bool>().prop_map(Value::Boolean),
                name().prop_map(Value::Text),
            ]
        }

        fn field(v: &Value) -> String {
            match v {
                Value::Number(n) => n.to_string(),
                Value::Boolean(b) => b.to_string(),
                Value::Text(t) => t.clone(),
            }
        }

        fn leap(y: i64) -> bool {
            y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
        }

        fn month_days(y: i64, m: i64) -> i64 {
            match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            }
        }

        /// Milliseconds since the epoch by counting days, year by year: an
        /// independent reference for `parse_time`.
        fn reference_ms(y: i64, m: i64, d: i64, hh: i64, mm: i64, ss: i64) -> i64 {
            let year = |y: i64| if leap(y) { 366 } else { 365 };
            let mut days: i64 = if y >= 1970 {
                (1970..y).map(year).sum()
            } else {
                -(y..1970).map(year).sum::<i64>()
            };
            days += (1..m).map(|m| month_days(y, m)).sum::<i64>() + d - 1;
            (days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000
        }

        /// A valid date and time: (y, m, d, hh, mm, ss).
        fn civil() -> impl Strategy<Value = (i64, i64, i64, i64, i64, i64)> {
            (0i64..=9999, 1i64..=12).prop_flat_map(|(y, m)| {
                (
                    Just(y),
                    Just(m),
                    1..=month_days(y, m),
                    0i64..24,
                    0i64..60,
                    0i64..60,
                )
            })
        }

        proptest! {
            /// Arbitrary bytes, topics, column layouts and delimiters: an
            /// error or readings, never a panic.
            #[test]
            fn csv_parsing_never_panics_on_arbitrary_bytes(
                payload in proptest::collection::vec(any::<u8>(), 0..256),
                topic in any::<String>(),
                columns in proptest::collection::vec(proptest::sample::select(COLUMNS), 1..6),
                delimiter in any::<char>(),
            ) {
                let _ = parse_csv(&message(topic, payload), &spec(columns, delimiter));
            }

            /// CSV-like text (separators, digits, times, signs, NUL):
            /// never a panic; what parses has one reading per non-blank line.
            #[test]
            fn csv_parsing_never_panics_on_csvish_text(
                text in csvish(),
                columns in proptest::collection::vec(proptest::sample::select(COLUMNS), 1..6),
                delimiter in proptest::sample::select(vec![',', ';', '\t', ' ', ':', '-']),
            ) {
                let m = message("a/b/c".into(), text.clone().into_bytes());
                if let Ok(batch) = parse_csv(&m, &spec(columns, delimiter)) {
                    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
                    prop_assert_eq!(batch.len(), lines);
                }
            }

            /// Lines formatted from generated (epoch seconds, value) pairs
            /// parse back to the same readings, the device from the topic.
            #[test]
            fn formatted_timestamp_value_lines_round_trip(
                device in name(),
                rows in proptest::collection::vec((-99_999_999_999i64..99_999_999_999, value()), 1..16),
            ) {
                let text: String = rows.iter().map(|(t, v)| format!("{t},{}\n", field(v))).collect();
                let m = message(format!("site/{device}/x"), text.into_bytes());
                let batch = parse_csv(&m, &spec(vec!["timestamp", "value"], ',')).unwrap();
                let got: Vec<_> = batch.iter().map(|r| (r.device, r.metric, r.unit, r.value.clone(), r.timestamp)).collect();
                let want: Vec<_> = rows.iter().map(|(t, v)| (device.as_str(), "m", "u", v.clone(), t * 1000)).collect();
                prop_assert_eq!(got, want);
            }

            /// Every column, a text time and another delimiter: lines built
            /// from generated readings parse back to them.
            #[test]
            fn formatted_full_lines_round_trip(
                rows in proptest::collection::vec((name(), name(), value(), name(), civil()), 1..8),
                t in any::<bool>(),
            ) {
                let sep = if t { 'T' } else { ' ' };
                let text: String = rows
                    .iter()
                    .map(|(d, m, v, u, (y, mo, da, hh, mi, ss))| {
                        format!("{d};{m};{};{u};{y:04}-{mo:02}-{da:02}{sep}{hh:02}:{mi:02}:{ss:02}\r\n", field(v))
                    })
                    .collect();
                let columns = vec!["device", "metric", "value", "unit", "timestamp"];
                let batch = parse_csv(&message("t".into(), text.into_bytes()), &spec(columns, ';')).unwrap();
                let got: Vec<_> = batch.iter().map(|r| (r.device.to_owned(), r.metric.to_owned(), r.value.clone(), r.unit.to_owned(), r.timestamp)).collect();
                let want: Vec<_> = rows
                    .iter()
                    .map(|(d, m, v, u, (y, mo, da, hh, mi, ss))| {
                        (d.clone(), m.clone(), v.clone(), u.clone(), reference_ms(*y, *mo, *da, *hh, *mi, *ss))
                    })
                    .collect();
                prop_assert_eq!(got, want);
            }

            /// A timestamp that is not a finite number is refused, not read
            /// as a time at the end of the range or at the epoch.
            #[test]
            fn non_finite_timestamps_are_refused(
                t in proptest::sample::select(vec!["inf", "-inf", "NaN", "infinity", "1e400", "-1e999"]),
            ) {
                let m = message("a/b".into(), format!("{t},1").into_bytes());
                let r = parse_csv(&m, &spec(vec!["timestamp", "value"], ','));
                prop_assert!(r.is_err(), "{:?}", r);
            }

            /// `parse_time` on arbitrary text and on time-like text: `None`
            /// or a time, never a panic.
            #[test]
            fn time_parsing_never_panics(s in any::<String>(), t in csvish()) {
                let _ = parse_time(&s);
                let _ = parse_time(&t);
            }

            /// Every `YYYY-MM-DD[T ]HH:MM:SS` from year 0 to 9999 is read as
            /// the same instant as counting days from the epoch gives.
            #[test]
            fn documented_times_are_read_exactly((y, m, d, hh, mm, ss) in civil(), t in any::<bool>()) {
                let sep = if t { 'T' } else { ' ' };
                let text = format!("{y:04}-{m:02}-{d:02}{sep}{hh:02}:{mm:02}:{ss:02}");
                prop_assert_eq!(parse_time(&text), Some(reference_ms(y, m, d, hh, mm, ss)), "{}", text);
            }

            /// A time whose fields are out of range or not digits, or whose
            /// date and time are not separated by `T` or a space, is refused.
            #[test]
            fn malformed_times_are_refused(
                (y, m, d, hh, mm, ss) in civil(),
                field in 0usize..7,
                bad in prop_oneof![
                    Just("99".to_owned()),
                    Just("+1".to_owned()),
                    Just("-1".to_owned()),
                    Just(" 1".to_owned()),
                    "[!-/:-~]{2}",
                ],
            ) {
                let mut parts = [
                    format!("{y:04}"), format!("{m:02}"), format!("{d:02}"), " ".to_owned(),
                    format!("{hh:02}"), format!("{mm:02}"), format!("{ss:02}"),
                ];
                // Out of range: month 13, day 32, hour 24, minute 60,
                // second 61 (60 is a leap second).
                let bad = match (field, bad == "99") {
                    (0, true) => "19x0".to_owned(),
                    (0, false) => format!("{bad}{bad}"),
                    (1, true) => "13".to_owned(),
                    (2, true) => "32".to_owned(),
                    (3, _) => bad.chars().next().filter(|c| *c != 'T' && *c != ' ').unwrap_or('x').to_string(),
                    (4, true) => "24".to_owned(),
                    (5, true) => "60".to_owned(),
                    (6, true) => "61".to_owned(),
                    _ => bad,
                };
                parts[field] = bad;
                let [y, m, d, sep, hh, mm, ss] = parts;
                let text = format!("{y}-{m}-{d}{sep}{hh}:{mm}:{ss}");
                prop_assert_eq!(parse_time(&text), None, "{:?}", text);
            }
        }
    }
}
