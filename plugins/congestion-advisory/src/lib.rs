//! Postprocessor for road sensors: describes the window's occupancy (and
//! speed, when the window has it) in a sentence, asks the model to classify
//! it (`llm.classify`) into the configured traffic states, and publishes an
//! advisory for signage when the most likely state is not the first (calm)
//! one.
//!
//! ```toml
//! [postprocess]
//! plugin = "congestion-advisory"
//! config = { topic = "signage/{device}", labels = ["free flowing traffic", "heavy traffic", "a traffic jam"], advice = ["", "Heavy traffic ahead", "Congestion ahead: expect delays"] }
//! ```
//!
//! Publishes `{"device":…,"state":…,"confidence":…,"advice":…,"occupancy":…}`
//! (occupancy in %, the window's mean). A window without occupancy readings
//! gives no action.

use ganglion_sdk::{
    Action, Completion, Context, PluginError, Postprocessor, Publish, Qos, ReadingBatch, config,
    llm,
};
use serde::Deserialize;
use std::sync::OnceLock;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where advisories go; `{device}` is the window's device.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Traffic states, calm first.
    #[serde(default = "default_labels")]
    pub labels: Vec<String>,
    /// What signage shows for each state, in the order of `labels`.
    #[serde(default = "default_advice")]
    pub advice: Vec<String>,
}

fn default_topic() -> String {
    "signage/{device}".into()
}

fn default_labels() -> Vec<String> {
    ["free flowing traffic", "heavy traffic", "a traffic jam"]
        .map(String::from)
        .to_vec()
}

fn default_advice() -> Vec<String> {
    ["", "Heavy traffic ahead", "Congestion ahead: expect delays"]
        .map(String::from)
        .to_vec()
}

impl Config {
    pub fn validate(self) -> Result<Self, PluginError> {
        if self.labels.len() < 2 {
            return Err(PluginError::BadConfig(
                "`labels` needs at least two states".into(),
            ));
        }
        if self.advice.len() != self.labels.len() {
            return Err(PluginError::BadConfig(format!(
                "`advice` has {} entries for {} labels",
                self.advice.len(),
                self.labels.len()
            )));
        }
        Ok(self)
    }
}

fn settings() -> Result<&'static Config, PluginError> {
    static CONFIG: OnceLock<Result<Config, PluginError>> = OnceLock::new();
    CONFIG
        .get_or_init(|| config::parse::<Config>().and_then(Config::validate))
        .as_ref()
        .map_err(Clone::clone)
}

/// The sentence the model classifies, and the mean occupancy; `None`
/// without occupancy readings.
pub fn describe(device: &str, window: &ReadingBatch) -> Option<(String, f64)> {
    let series = |metric: &str| -> Vec<f64> {
        window
            .iter()
            .filter(|r| r.metric == metric)
            .filter_map(|r| r.value.as_f64())
            .collect()
    };
    let occupancy = series("occupancy");
    let (first, last) = (*occupancy.first()?, *occupancy.last()?);
    let mean = occupancy.iter().sum::<f64>() / occupancy.len() as f64;
    let trend = if last > first * 1.5 + 2.0 {
        "rising"
    } else if last < first / 1.5 - 2.0 {
        "falling"
    } else {
        "steady"
    };
    let mut text = format!(
        "Road sensor {device}: lane occupancy {mean:.0}% on average over the last {} readings, {trend} from {first:.0}% to {last:.0}%",
        occupancy.len()
    );
    let speed = series("speed");
    if !speed.is_empty() {
        let s = speed.iter().sum::<f64>() / speed.len() as f64;
        text.push_str(&format!(", average speed {s:.0} mph"));
    }
    text.push('.');
    Some((text, mean))
}

struct Advisory;

impl Postprocessor for Advisory {
    fn postprocess(
        context: Context,
        window: ReadingBatch,
        _completion: Option<Completion>,
    ) -> Result<Vec<Action>, PluginError> {
        let cfg = settings()?;
        let Some((text, occupancy)) = describe(&context.device, &window) else {
            return Ok(Vec::new());
        };
        let scores = llm::classify(&text, &cfg.labels)?;
        let (best, confidence) = scores
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .ok_or_else(|| PluginError::Other("classify returned no scores".into()))?;
        if best == 0 {
            return Ok(Vec::new());
        }
        let payload = serde_json::json!({
            "device": context.device,
            "state": cfg.labels[best],
            "confidence": (f64::from(confidence) * 1000.0).round() / 1000.0,
            "advice": cfg.advice[best],
            "occupancy": (occupancy * 10.0).round() / 10.0,
        });
        Ok(vec![Action::Publish(Publish {
            topic: cfg.topic.replace("{device}", &context.device),
            payload: payload.to_string().into_bytes(),
            qos: Qos::AtLeastOnce,
            retain: true,
        })])
    }
}

ganglion_sdk::export!(Advisory: postprocess);
