//! One message through a rule without publishing anything: what `POST
//! /rules/{name}/test` answers (as eKuiper's rule test does). The rule's
//! live plugins and the model run; every stage's output is kept, and the
//! actions the allow-list lets out are returned, not published.
//!
//! Limits, by design: no window is opened or added to (a windowed rule's
//! readings are decided at once, per device, as if the window closed with
//! this message; [`Trial::window_skipped`] says so), and the audit log
//! records nothing. Plugins that use the `state` interface read and write
//! the rule's live state, as a live message would, and the model call
//! queues with the live ones.

use super::*;
use crate::audit::{record_completion, record_prompt, record_window};
use serde::Serialize;

/// What a trial of one message produced.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// The rule.
    pub rule: String,
    /// Each stage that ran, in order (per device from the prompt on).
    pub stages: Vec<TrialStage>,
    /// The outputs the allow-list let out: what would be published.
    pub actions: Vec<TrialAction>,
    /// Actions the allow-list refused, with the reason.
    pub refused: Vec<String>,
    /// What would be dead-lettered.
    pub dead_letters: Vec<TrialDeadLetter>,
    /// The rule has a window, which the trial did not use.
    pub window_skipped: bool,
}

/// One stage's output.
#[derive(Debug, Clone, Serialize)]
pub struct TrialStage {
    /// `preprocess`, `prompt`, `llm`, `postprocess` or `handler`.
    pub stage: &'static str,
    /// The plugin that ran it (none for the model).
    pub plugin: Option<String>,
    /// That plugin's version.
    pub version: Option<String>,
    /// The device whose readings it took (prompt, llm, postprocess).
    pub device: Option<String>,
    /// The readings, the prompt, the completion, or the proposed actions
    /// with the allow-list's verdict, as the audit log writes them.
    pub output: serde_json::Value,
    /// Milliseconds it took.
    pub ms: f64,
}

/// An output that would be published.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrialAction {
    /// Its topic.
    pub topic: String,
    /// Its payload as UTF-8 (invalid bytes replaced).
    pub payload: String,
    /// Its QoS, 0 to 2.
    pub qos: u8,
    /// Whether it would be retained.
    pub retain: bool,
}

impl From<&Outgoing> for TrialAction {
    fn from(o: &Outgoing) -> Self {
        TrialAction {
            topic: o.topic.clone(),
            payload: String::from_utf8_lossy(&o.payload).into_owned(),
            qos: match o.qos {
                crate::types::Qos::AtMostOnce => 0,
                crate::types::Qos::AtLeastOnce => 1,
                crate::types::Qos::ExactlyOnce => 2,
            },
            retain: o.retain,
        }
    }
}

/// A dead letter the message would cause.
#[derive(Debug, Clone, Serialize)]
pub struct TrialDeadLetter {
    /// Where it failed.
    pub stage: String,
    /// The reason kind.
    pub kind: String,
    /// The cause.
    pub reason: String,
    /// The plugin at fault, if one is.
    pub plugin: Option<String>,
}

impl Trial {
    fn take(&mut self, outcome: Outcome) {
        self.actions
            .extend(outcome.publish.iter().map(TrialAction::from));
        self.dead_letters
            .extend(outcome.dead_letters.into_iter().map(|d| TrialDeadLetter {
                stage: d.stage,
                kind: d.kind,
                reason: d.reason,
                plugin: d.plugin,
            }));
    }

    fn allow(&mut self, checked: &[Result<Outgoing, String>]) {
        for c in checked {
            match c {
                Ok(out) => self.actions.push(out.into()),
                Err(reason) => self.refused.push(reason.clone()),
            }
        }
    }

    fn stage(
        &mut self,
        stage: &'static str,
        by: Option<&Bound>,
        device: Option<&str>,
        output: impl Serialize,
        ms: f64,
    ) {
        self.stages.push(TrialStage {
            stage,
            plugin: by.map(|b| b.plugin().name.clone()),
            version: by.map(|b| b.plugin().version.to_string()),
            device: device.map(str::to_owned),
            output: serde_json::to_value(output).unwrap_or_default(),
            ms,
        });
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

impl RulePipeline {
    /// Runs `message` through the rule, publishing nothing (see the module
    /// documentation for what a trial does not do).
    pub async fn trial(&self, message: &Message) -> Trial {
        let mut t = Trial {
            rule: self.rule.name.clone(),
            stages: Vec::new(),
            actions: Vec::new(),
            refused: Vec::new(),
            dead_letters: Vec::new(),
            window_skipped: self.window_spec().is_some(),
        };
        let mut readings = match self.intake(message) {
            Ok(r) => r,
            Err(outcome) => {
                t.take(*outcome);
                return t;
            }
        };
        let (preprocess, prompt, postprocess) = match &self.bindings {
            Bindings::Handler(h) => {
                let started = Instant::now();
                match h.pool.handle(&self.rule.name, message).await {
                    Ok(actions) => {
                        let device = self
                            .rule
                            .topic_device(&message.topic, self.limits.max_device_bytes)
                            .unwrap_or_default();
                        let checked: Vec<_> = actions
                            .iter()
                            .map(|a| self.rule.authorize(a, device))
                            .collect();
                        t.stage(
                            "handler",
                            Some(h),
                            None,
                            recorded(&checked),
                            ms_since(started),
                        );
                        t.allow(&checked);
                    }
                    Err(e) => t.take(self.call_failed(message.into(), "handler", h, e)),
                }
                return t;
            }
            Bindings::Chain {
                preprocess,
                prompt,
                postprocess,
            } => (preprocess, prompt, postprocess),
        };
        for p in preprocess {
            let started = Instant::now();
            readings = match p.pool.preprocess(message, readings).await {
                Ok(r) => r,
                Err(e) => {
                    t.take(self.call_failed(message.into(), "preprocess", p, e));
                    return t;
                }
            };
            let output = record_window(&readings);
            t.stage("preprocess", Some(p), None, output, ms_since(started));
        }
        let topic_device = self
            .rule
            .device_level
            .map(|i| message.topic.split('/').nth(i).unwrap_or_default());
        for (device, batch) in split_by_device(readings) {
            let refused = match (
                topic_device,
                check_device(&device, self.limits.max_device_bytes),
            ) {
                (Some(own), _) if device != own => Some((
                    "device-mismatch",
                    format!(
                        "readings of device `{}` on a topic of device `{own}`",
                        device.escape_debug()
                    ),
                )),
                (_, Err(why)) => Some(("bad-device", why)),
                _ => None,
            };
            if let Some((kind, reason)) = refused {
                t.dead_letters.push(TrialDeadLetter {
                    stage: "window".into(),
                    kind: kind.into(),
                    reason,
                    plugin: None,
                });
                continue;
            }
            let context = self.window_context(&device, &batch, message.timestamp);
            let d = self.decide(&context, batch).await;
            let dev = Some(device.as_str());
            if let Some(p) = &d.prompt {
                t.stage(
                    "template",
                    prompt.as_ref(),
                    dev,
                    record_prompt(p),
                    d.timings.prompt_ms,
                );
            }
            if let Some(c) = &d.completion {
                t.stage("llm", None, dev, record_completion(c), d.timings.llm_ms);
                if let Err(e) = c {
                    let kind = match e {
                        LlmError::DeadlineExceeded => "llm-deadline",
                        _ => "llm-error",
                    };
                    t.dead_letters.push(TrialDeadLetter {
                        stage: "llm".into(),
                        kind: kind.into(),
                        reason: e.to_string(),
                        plugin: None,
                    });
                    continue;
                }
            }
            match d.failure {
                Some((stage, e)) => {
                    let bound = match stage {
                        "template" => prompt.as_ref().unwrap_or(postprocess),
                        _ => postprocess,
                    };
                    t.take(self.call_failed(message.into(), stage, bound, e));
                }
                None => {
                    let output = recorded(&d.actions);
                    t.stage(
                        "postprocess",
                        Some(postprocess),
                        dev,
                        output,
                        d.timings.postprocess_ms,
                    );
                    t.allow(&d.actions);
                }
            }
        }
        t
    }
}
