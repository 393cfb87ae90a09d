//! One rule at work: message → preprocess chain → window per device →
//! prompt → model → postprocess → allow-list, or message → handler →
//! allow-list. Produces what to publish and what to dead-letter; the caller
//! (the gateway) publishes, and acknowledges the message afterwards.

use crate::llm::{GenerateRequest, LlmEngine, LlmInput};
use crate::plugin::{CallError, InstancePool, Plugin, PluginHost};
use crate::rules::{CsvSpec, Outgoing, PayloadFormat, PluginRef, Rule, Stages, WindowSpec};
use crate::types::{
    Action, ChatMessage, Completion, Context, LlmError, Message, ReadingBatch, Role, Stage, Value,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A message that could not be handled, with everything needed to retry it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub rule: String,
    pub plugin: Option<String>,
    pub version: Option<String>,
    /// intake, preprocess, window, prompt, llm, postprocess, handler, allow-list, publish.
    pub stage: String,
    /// A machine-readable reason kind (`bad-payload`, `trap`, `deadline`, `refused-action`...).
    pub kind: String,
    pub reason: String,
    pub topic: String,
    pub payload: Vec<u8>,
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
            "timestamp": self.timestamp,
        })
        .to_string()
        .into_bytes()
    }
}

/// What processing one message (or flushing windows) produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub publish: Vec<Outgoing>,
    pub dead_letters: Vec<DeadLetter>,
    /// Readings that entered the pipeline after preprocessing.
    pub readings: usize,
    pub prompts: Vec<String>,
    pub completions: Vec<String>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.publish.extend(other.publish);
        self.dead_letters.extend(other.dead_letters);
        self.readings += other.readings;
        self.prompts.extend(other.prompts);
        self.completions.extend(other.completions);
    }
}

struct Window {
    batch: ReadingBatch,
    opened: Instant,
    /// The message that opened the window, named in dead letters of a time flush.
    first: Message,
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

/// A rule bound to loaded plugins.
pub struct RulePipeline {
    pub rule: Arc<Rule>,
    bindings: Bindings,
    /// Shared with the rule's next version, so a reload loses no reading
    /// that waits in a window.
    windows: Arc<Mutex<HashMap<String, Window>>>,
    llm: Arc<dyn LlmEngine>,
    llm_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("rule `{rule}`: plugin `{plugin}`: {reason}")]
    Grant {
        rule: String,
        plugin: String,
        reason: String,
    },
    #[error("rule `{rule}`: plugin `{plugin}` is not loaded")]
    Missing { rule: String, plugin: String },
    #[error(
        "rule `{rule}`: plugin `{plugin}` does not implement the {stage} stage (it implements {has})"
    )]
    WrongStage {
        rule: String,
        plugin: String,
        stage: Stage,
        has: String,
    },
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
        Ok(RulePipeline {
            rule: Arc::new(rule),
            bindings,
            windows: Arc::default(),
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

    fn dead(
        &self,
        message: &Message,
        stage: &str,
        kind: &str,
        reason: String,
        plugin: Option<&Plugin>,
    ) -> DeadLetter {
        DeadLetter {
            rule: self.rule.name.clone(),
            plugin: plugin.map(|p| p.name.clone()),
            version: plugin.map(|p| p.version.to_string()),
            stage: stage.into(),
            kind: kind.into(),
            reason,
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            timestamp: message.timestamp,
        }
    }

    fn call_failed(&self, message: &Message, stage: &str, bound: &Bound, e: CallError) -> Outcome {
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
                Ok(actions) => self.authorize(message, "+", actions, h),
                Err(e) => self.call_failed(message, "handler", h, e),
            },
            Bindings::Chain { preprocess, .. } => {
                for p in preprocess {
                    readings = match p.pool.preprocess(message, readings).await {
                        Ok(r) => r,
                        Err(e) => return self.call_failed(message, "preprocess", p, e),
                    };
                }
                let mut outcome = Outcome {
                    readings: readings.len(),
                    ..Outcome::default()
                };
                for (device, batch) in split_by_device(readings) {
                    let ready = match self.window_spec() {
                        None => Some(batch),
                        Some(spec) => self.add_to_window(&device, batch, message, spec),
                    };
                    if let Some(window) = ready {
                        outcome.merge(self.run_window(message, &device, window).await);
                    }
                }
                outcome
            }
        }
    }

    /// Adds readings to the device's window; returns the window's readings
    /// when it is complete by count.
    fn add_to_window(
        &self,
        device: &str,
        batch: ReadingBatch,
        message: &Message,
        spec: WindowSpec,
    ) -> Option<ReadingBatch> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let w = windows.entry(device.to_owned()).or_insert_with(|| Window {
            batch: ReadingBatch::default(),
            opened: Instant::now(),
            first: message.clone(),
        });
        for r in batch.iter() {
            w.batch
                .push(r.device, r.metric, r.value.clone(), r.unit, r.timestamp);
        }
        if spec.count.is_some_and(|n| w.batch.len() >= n) {
            return windows.remove(device).map(|w| w.batch);
        }
        None
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
            _ if all => Duration::ZERO,
            None => Duration::ZERO,
            Some(WindowSpec {
                seconds: Some(secs),
                ..
            }) => Duration::from_secs(secs),
            Some(_) => return Outcome::default(),
        };
        let expired: Vec<(String, Window)> = {
            let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<String> = windows
                .iter()
                .filter(|(_, w)| w.opened.elapsed() >= max_age)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| windows.remove(&k).map(|w| (k, w)))
                .collect()
        };
        let mut outcome = Outcome::default();
        for (device, w) in expired {
            if !w.batch.is_empty() {
                outcome.merge(self.run_window(&w.first, &device, w.batch).await);
            }
        }
        outcome
    }

    /// Readings waiting in windows, per device (for status and shutdown).
    pub fn pending_windows(&self) -> usize {
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn run_window(&self, message: &Message, device: &str, window: ReadingBatch) -> Outcome {
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
                .unwrap_or(message.timestamp),
            window_end: window
                .readings
                .iter()
                .map(|r| r.timestamp)
                .max()
                .unwrap_or(message.timestamp),
        };
        let mut outcome = Outcome::default();
        let completion = match prompt {
            None => None,
            Some(p) => {
                let prompt = match p.pool.render(&context, window.clone()).await {
                    Ok(prompt) => prompt,
                    Err(e) => return self.call_failed(message, "prompt", p, e),
                };
                outcome.prompts.push(prompt.user.clone());
                match self.generate(prompt).await {
                    Ok(c) => {
                        outcome.completions.push(c.text.clone());
                        Some(c)
                    }
                    Err(e) => {
                        let kind = match e {
                            LlmError::DeadlineExceeded => "llm-deadline",
                            _ => "llm-error",
                        };
                        outcome.dead_letters.push(self.dead(
                            message,
                            "llm",
                            kind,
                            e.to_string(),
                            None,
                        ));
                        return outcome;
                    }
                }
            }
        };
        match postprocess
            .pool
            .postprocess(&context, window, completion.as_ref())
            .await
        {
            Ok(actions) => outcome.merge(self.authorize(message, device, actions, postprocess)),
            Err(e) => outcome.merge(self.call_failed(message, "postprocess", postprocess, e)),
        }
        outcome
    }

    /// Asks the engine; `overloaded` waits and retries within the timeout,
    /// which holds the message (backpressure) instead of dropping it.
    async fn generate(&self, prompt: crate::types::Prompt) -> Result<Completion, LlmError> {
        let request = GenerateRequest {
            input: LlmInput::Chat(vec![
                ChatMessage {
                    role: Role::System,
                    content: prompt.system,
                },
                ChatMessage {
                    role: Role::User,
                    content: prompt.user,
                },
            ]),
            params: prompt.params,
            rule: self.rule.name.clone(),
        };
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
        message: &Message,
        device: &str,
        actions: Vec<Action>,
        by: &Bound,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        for a in actions {
            match self.rule.authorize(&a, device) {
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

fn split_by_device(batch: ReadingBatch) -> Vec<(String, ReadingBatch)> {
    let mut groups: Vec<(String, ReadingBatch)> = Vec::new();
    for r in batch.iter() {
        let i = match groups.iter().position(|(d, _)| d == r.device) {
            Some(i) => i,
            None => {
                groups.push((r.device.to_owned(), ReadingBatch::default()));
                groups.len() - 1
            }
        };
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

/// `YYYY-MM-DD[T ]HH:MM:SS`, UTC, to ms since the epoch.
fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d, hh, mm, ss) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000)
}

/// The receive time to stamp on a message now.
pub fn received_now() -> i64 {
    now_ms()
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
}
