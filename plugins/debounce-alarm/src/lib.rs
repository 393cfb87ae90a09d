//! Rule plugin: JSON telemetry straight to alarms, each alarm (device and
//! threshold) raised at most once per `interval_secs`. The time of the last
//! alarm is kept in the plugin's persistent state, so suppression holds across
//! restarts and reloads. Time is the message's receive time.
//!
//! ```toml
//! [handler]
//! plugin = "debounce-alarm"
//! config = { interval_secs = 300, thresholds = [{ metric = "smoke", equals = true, level = "critical" }] }
//! ```

use ganglion_sdk::telemetry::{ParseOptions, parse_json};
use ganglion_sdk::threshold::Threshold;
use ganglion_sdk::{Action, Alert, Message, PluginError, Rule, config, state};
use serde::Deserialize;
use std::sync::OnceLock;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub interval_secs: u64,
    pub thresholds: Vec<Threshold>,
    pub device_from_topic: Option<usize>,
}

struct DebounceAlarm;

static CONFIG: OnceLock<Result<Config, PluginError>> = OnceLock::new();

fn load() -> Result<Config, PluginError> {
    let cfg: Config = config::parse()?;
    if cfg.thresholds.is_empty() {
        return Err(PluginError::BadConfig("`thresholds` is empty".into()));
    }
    for t in &cfg.thresholds {
        t.validate().map_err(PluginError::BadConfig)?;
    }
    Ok(cfg)
}

impl Rule for DebounceAlarm {
    fn handle(_rule: String, message: Message) -> Result<Vec<Action>, PluginError> {
        let cfg = CONFIG.get_or_init(load).as_ref().map_err(Clone::clone)?;
        let now = message.timestamp;
        let readings = parse_json(
            &message.payload,
            &ParseOptions::from_topic(&message, cfg.device_from_topic, now),
        )?;
        let mut actions = Vec::new();
        for (i, t) in cfg.thresholds.iter().enumerate() {
            for r in readings.iter() {
                if !t.is_broken_by(&r) {
                    continue;
                }
                let key = format!("alarm/{i}/{}", r.device);
                let last = state::get_i64(&key)?;
                if last.is_some_and(|last| {
                    now.saturating_sub(last) < (cfg.interval_secs as i64).saturating_mul(1000)
                }) {
                    continue;
                }
                state::set_i64(&key, now)?;
                // Made only for an alert that goes out, not per debounced reading.
                let why = t.violated_by(&r).unwrap_or_default();
                actions.push(Action::Alert(Alert {
                    level: t.level.into(),
                    device: r.device.to_owned(),
                    text: format!("{}: {why}", r.device),
                }));
            }
        }
        Ok(actions)
    }
}

ganglion_sdk::export!(DebounceAlarm: handler);
