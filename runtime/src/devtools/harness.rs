//! Calling one stage of one plugin by hand, from JSON cases: what
//! `ganglion call` runs, and how plugins in different languages are compared.
//!
//! A case is one JSON object; its shape depends on the stage:
//! - preprocess: `{"topic", "payload" | "payload_base64", "timestamp", "readings"}`
//! - template: `{"context", "window"}`
//! - postprocess: `{"context", "window", "completion"}` (`completion`: null,
//!   the text, or `{"text", "finish"}`)
//! - handler: `{"rule", "topic", "payload" | "payload_base64", "timestamp"}`
//!
//! A reading is `{"device", "metric", "value", "unit", "timestamp"}` and a
//! context `{"rule", "device", "window_start", "window_end"}`; fields left out
//! are empty or zero. The outcome is `{"ok": ...}`, `{"error": {"kind",
//! "message"}}` for an error the plugin returned, or `{"fault": "..."}` for a
//! trap, timeout or broken contract. Outcomes are compared as JSON values, so
//! the same readings from plugins that lay out their name tables differently
//! compare equal.

use crate::audit::{RecordedReading, record_prompt, record_window, recorded_batch};
use crate::plugin::{CallError, InstancePool};
use crate::types::{
    Action, AlertLevel, Completion, Context, FinishReason, Message, PluginError, Qos, ReadingBatch,
    Stage, Usage, Value,
};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value as Json, json};

/// A case that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("case: {0}")]
pub struct CaseError(String);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CaseContext {
    rule: String,
    device: String,
    window_start: i64,
    window_end: i64,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CaseCompletion {
    Text(String),
    Full {
        text: String,
        #[serde(default)]
        finish: Option<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Case {
    topic: String,
    payload: Option<String>,
    payload_base64: Option<String>,
    timestamp: i64,
    readings: Vec<RecordedReading>,
    rule: Option<String>,
    context: CaseContext,
    window: Vec<RecordedReading>,
    completion: Option<CaseCompletion>,
}

impl Case {
    fn message(&self) -> Result<Message, CaseError> {
        let payload = match (&self.payload, &self.payload_base64) {
            (Some(_), Some(_)) => {
                return Err(CaseError(
                    "give `payload` or `payload_base64`, not both".into(),
                ));
            }
            (Some(p), None) => p.clone().into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| CaseError(format!("payload_base64: {e}")))?,
            (None, None) => Vec::new(),
        };
        Ok(Message {
            topic: self.topic.clone(),
            payload,
            timestamp: self.timestamp,
        })
    }

    fn context(&self) -> Context {
        Context {
            rule: self.context.rule.clone(),
            device: self.context.device.clone(),
            window_start: self.context.window_start,
            window_end: self.context.window_end,
        }
    }

    fn completion(&self) -> Result<Option<Completion>, CaseError> {
        let (text, finish) = match &self.completion {
            None => return Ok(None),
            Some(CaseCompletion::Text(t)) => (t.clone(), None),
            Some(CaseCompletion::Full { text, finish }) => (text.clone(), finish.clone()),
        };
        let finish_reason = match finish.as_deref().unwrap_or("stop") {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            "deadline" => FinishReason::Deadline,
            "constraint-complete" => FinishReason::ConstraintComplete,
            other => return Err(CaseError(format!("unknown finish reason {other:?}"))),
        };
        Ok(Some(Completion {
            text,
            finish_reason,
            usage: Usage::default(),
            model: "case".into(),
        }))
    }
}

/// The readings of a batch as JSON, names resolved. A number that JSON cannot
/// hold (NaN, infinity) is written as its text, so it shows up in a diff.
pub fn readings_json(batch: &ReadingBatch) -> Json {
    let mut out = record_window(batch);
    for (r, original) in out.iter_mut().zip(batch.iter()) {
        if let Value::Number(n) = original.value
            && !n.is_finite()
        {
            r.value = Json::String(n.to_string());
        }
    }
    serde_json::to_value(out).unwrap_or(Json::Null)
}

fn value_json(v: &Option<Value>) -> Json {
    match v {
        None => Json::Null,
        Some(Value::Number(n)) => {
            serde_json::Number::from_f64(*n).map_or(Json::String(n.to_string()), Json::Number)
        }
        Some(Value::Boolean(b)) => Json::Bool(*b),
        Some(Value::Text(t)) => Json::String(t.clone()),
    }
}

/// Actions as JSON: `{"type": "publish" | "alert" | "command", ...}`.
pub fn actions_json(actions: &[Action]) -> Json {
    Json::Array(
        actions
            .iter()
            .map(|a| match a {
                Action::Publish {
                    topic,
                    payload,
                    qos,
                    retain,
                } => json!({
                    "type": "publish",
                    "topic": topic,
                    "payload": String::from_utf8_lossy(payload),
                    "qos": match qos { Qos::AtMostOnce => 0, Qos::AtLeastOnce => 1, Qos::ExactlyOnce => 2 },
                    "retain": retain,
                }),
                Action::Alert {
                    level,
                    device,
                    text,
                } => json!({
                    "type": "alert",
                    "level": match level { AlertLevel::Info => "info", AlertLevel::Warning => "warning", AlertLevel::Critical => "critical" },
                    "device": device,
                    "text": text,
                }),
                Action::Command {
                    device,
                    name,
                    value,
                } => json!({
                    "type": "command",
                    "device": device,
                    "name": name,
                    "value": value_json(value),
                }),
            })
            .collect(),
    )
}

fn outcome(result: Result<Json, CallError>) -> Json {
    match result {
        Ok(v) => json!({ "ok": v }),
        Err(CallError::Plugin(e)) => {
            let (kind, message) = match &e {
                PluginError::BadPayload(m) => ("bad-payload", m.clone()),
                PluginError::BadConfig(m) => ("bad-config", m.clone()),
                PluginError::BadCompletion(m) => ("bad-completion", m.clone()),
                PluginError::Llm(l) => ("llm", l.to_string()),
                PluginError::Other(m) => ("other", m.clone()),
            };
            json!({ "error": { "kind": kind, "message": message } })
        }
        Err(fault) => json!({ "fault": fault.to_string() }),
    }
}

/// Runs one case through `stage` of the plugin behind `pool`.
pub async fn run_case(pool: &InstancePool, stage: Stage, case: &Json) -> Result<Json, CaseError> {
    let case: Case = serde_json::from_value(case.clone()).map_err(|e| CaseError(e.to_string()))?;
    let result = match stage {
        Stage::Preprocessor => pool
            .preprocess(&case.message()?, recorded_batch(&case.readings))
            .await
            .map(|b| readings_json(&b)),
        Stage::PromptTemplate => pool
            .render(&case.context(), recorded_batch(&case.window))
            .await
            .map(|p| serde_json::to_value(record_prompt(&p)).unwrap_or(Json::Null)),
        Stage::Postprocessor => {
            let completion = case.completion()?;
            pool.postprocess(
                &case.context(),
                recorded_batch(&case.window),
                completion.as_ref(),
            )
            .await
            .map(|a| actions_json(&a))
        }
        Stage::Rule => {
            let rule = case.rule.clone().unwrap_or_else(|| "case".into());
            pool.handle(&rule, &case.message()?)
                .await
                .map(|a| actions_json(&a))
        }
    };
    Ok(outcome(result))
}

/// The stage a case file exercises: the one given, else the plugin's only one.
pub fn stage_to_call(implemented: &[Stage], asked: Option<&str>) -> Result<Stage, CaseError> {
    match asked {
        Some(name) => {
            let stage: Stage = name.parse().map_err(|e| CaseError(format!("{e}")))?;
            if implemented.contains(&stage) {
                Ok(stage)
            } else {
                Err(CaseError(format!("the plugin does not implement {stage}")))
            }
        }
        None => match implemented {
            [one] => Ok(*one),
            many => Err(CaseError(format!(
                "the plugin implements {} stages; pick one with --stage",
                many.len()
            ))),
        },
    }
}
