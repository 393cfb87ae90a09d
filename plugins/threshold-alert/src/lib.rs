//! Postprocessor for rules without the model: raises an alert for each device
//! and threshold that the window's readings break, naming the latest value and
//! how many readings broke it. With `topic` set it also publishes the alert as
//! JSON there (`{device}` and `{metric}` are replaced).
//!
//! ```toml
//! [postprocess]
//! plugin = "threshold-alert"
//! config = { thresholds = [{ metric = "temperature", above = 90.0, level = "critical" }], topic = "alerts/{device}" }
//! ```

use ganglion_sdk::batch::ReadingRef;
use ganglion_sdk::threshold::Threshold;
use ganglion_sdk::{
    Action, Alert, Completion, Context, PluginError, Postprocessor, Publish, Qos, ReadingBatch,
    config,
};
use serde::Deserialize;
use std::sync::OnceLock;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub thresholds: Vec<Threshold>,
    pub topic: Option<String>,
}

impl Config {
    pub fn validate(self) -> Result<Self, PluginError> {
        if self.thresholds.is_empty() {
            return Err(PluginError::BadConfig("`thresholds` is empty".into()));
        }
        for t in &self.thresholds {
            t.validate().map_err(PluginError::BadConfig)?;
        }
        Ok(self)
    }
}

pub fn check(cfg: &Config, window: &ReadingBatch) -> Vec<Action> {
    let mut actions = Vec::new();
    for t in &cfg.thresholds {
        // (device, its latest breaking reading, count), in order of first
        // appearance; the text is made once per device, not per reading.
        let mut hits: Vec<(&str, ReadingRef<'_>, usize)> = Vec::new();
        for r in window.iter() {
            if t.is_broken_by(&r) {
                match hits.iter_mut().find(|h| h.0 == r.device) {
                    Some(h) => {
                        h.1 = r;
                        h.2 += 1;
                    }
                    None => hits.push((r.device, r, 1)),
                }
            }
        }
        for (device, latest, count) in hits {
            let why = t.violated_by(&latest).unwrap_or_default();
            let text = if count == 1 {
                format!("{device}: {why}")
            } else {
                format!("{device}: {why} ({count} readings)")
            };
            if let Some(topic) = &cfg.topic {
                let payload = serde_json::json!({ "device": device, "metric": t.metric, "level": t.level, "text": text });
                actions.push(Action::Publish(Publish {
                    topic: topic
                        .replace("{device}", device)
                        .replace("{metric}", &t.metric),
                    payload: payload.to_string().into_bytes(),
                    qos: Qos::AtLeastOnce,
                    retain: false,
                }));
            }
            actions.push(Action::Alert(Alert {
                level: t.level.into(),
                device: device.to_owned(),
                text,
            }));
        }
    }
    actions
}

struct ThresholdAlert;

static CONFIG: OnceLock<Result<Config, PluginError>> = OnceLock::new();

impl Postprocessor for ThresholdAlert {
    fn postprocess(
        _context: Context,
        window: ReadingBatch,
        _completion: Option<Completion>,
    ) -> Result<Vec<Action>, PluginError> {
        let cfg = CONFIG
            .get_or_init(|| config::parse::<Config>().and_then(Config::validate))
            .as_ref()
            .map_err(Clone::clone)?;
        Ok(check(cfg, &window))
    }
}

ganglion_sdk::export!(ThresholdAlert: postprocess);
