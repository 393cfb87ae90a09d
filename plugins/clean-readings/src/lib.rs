//! Preprocessor: JSON telemetry to clean readings.
//!
//! Drops readings that are not finite numbers where a number is expected
//! (NaN, ±inf, "NaN" text), readings outside the configured range of their
//! metric, and duplicates (same device, metric and timestamp) within a
//! message; with `drop_stale`, also readings not newer than the last one kept
//! for that device and metric (redelivered or out-of-order messages), using
//! the plugin's persistent state. Converts units to the configured unit of
//! each metric; a reading whose unit cannot be converted is dropped and logged.
//!
//! ```toml
//! [[preprocess]]
//! plugin = "clean-readings"
//! config = { device_from_topic = 1, units = { temperature = "C" }, ranges = { temperature = [-40.0, 150.0] } }
//! ```

use ganglion_sdk::batch::{BatchBuilder, ReadingRef};
use ganglion_sdk::telemetry::{ParseOptions, parse_json};
use ganglion_sdk::{
    Message, PluginError, Preprocessor, ReadingBatch, Value, config, log, state, units,
};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Topic level (0-based) that names the device when the payload does not.
    pub device_from_topic: Option<usize>,
    /// Inclusive `[min, max]` per metric, in the metric's target unit.
    #[serde(default)]
    pub ranges: HashMap<String, [f64; 2]>,
    /// Target unit per metric.
    #[serde(default)]
    pub units: HashMap<String, String>,
    /// Text values that read as numbers become numbers (default true).
    pub numeric_text: Option<bool>,
    /// Drop readings not newer than the last kept one (uses plugin state).
    #[serde(default)]
    pub drop_stale: bool,
}

/// Why readings were dropped, for logging and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub not_finite: usize,
    pub out_of_range: usize,
    pub duplicate: usize,
    pub bad_unit: usize,
    pub stale: usize,
}

impl Dropped {
    pub fn total(&self) -> usize {
        self.not_finite + self.out_of_range + self.duplicate + self.bad_unit + self.stale
    }
}

/// The cleaning logic, independent of the host: `is_fresh` decides staleness
/// (the plugin backs it with state; native callers pass their own).
pub fn clean(
    message: &Message,
    input: ReadingBatch,
    cfg: &Config,
    mut is_fresh: impl FnMut(&ReadingRef<'_>) -> bool,
) -> Result<(ReadingBatch, Dropped), PluginError> {
    let parsed = if input.is_empty() {
        parse_json(
            &message.payload,
            &ParseOptions::from_topic(message, cfg.device_from_topic, message.timestamp),
        )?
    } else {
        input
    };
    let numeric_text = cfg.numeric_text.unwrap_or(true);
    let mut out = BatchBuilder::with_capacity(parsed.len());
    // A single reading cannot repeat; most messages carry one.
    let mut seen: HashSet<(u32, u32, i64)> = HashSet::new();
    let check_repeats = parsed.len() > 1;
    let mut dropped = Dropped::default();
    for r in parsed.iter() {
        let mut value = r.value.clone();
        if let (true, Value::Text(t)) = (numeric_text, &value)
            && let Ok(n) = t.trim().parse::<f64>()
        {
            value = Value::Number(n);
        }
        let mut unit = r.unit;
        if let Value::Number(n) = &mut value {
            if !n.is_finite() {
                dropped.not_finite += 1;
                continue;
            }
            if let Some(target) = cfg.units.get(r.metric) {
                match (unit.is_empty(), units::convert(*n, unit, target)) {
                    (true, _) => unit = target,
                    (false, Some(converted)) => {
                        *n = converted;
                        unit = target;
                    }
                    (false, None) => {
                        dropped.bad_unit += 1;
                        continue;
                    }
                }
            }
            if let Some([min, max]) = cfg.ranges.get(r.metric)
                && !(*min..=*max).contains(n)
            {
                dropped.out_of_range += 1;
                continue;
            }
        }
        let key = (out.intern(r.device), out.intern(r.metric), r.timestamp);
        if check_repeats && !seen.insert(key) {
            dropped.duplicate += 1;
            continue;
        }
        let cleaned = ReadingRef {
            value: &value,
            unit,
            ..r
        };
        if !is_fresh(&cleaned) {
            dropped.stale += 1;
            continue;
        }
        out.push_ref(cleaned);
    }
    Ok((out.finish(), dropped))
}

struct CleanReadings;

static CONFIG: OnceLock<Result<Config, PluginError>> = OnceLock::new();

impl Preprocessor for CleanReadings {
    fn preprocess(message: Message, readings: ReadingBatch) -> Result<ReadingBatch, PluginError> {
        let cfg = config::cached(&CONFIG)?;
        let mut state_error = None;
        let (batch, dropped) = clean(&message, readings, cfg, |r| {
            if !cfg.drop_stale || state_error.is_some() {
                return true;
            }
            let key = format!("last/{}/{}", r.device, r.metric);
            let result = state::get_i64(&key).and_then(|last| match last {
                Some(last) if r.timestamp <= last => Ok(false),
                _ => state::set_i64(&key, r.timestamp).map(|()| true),
            });
            result.unwrap_or_else(|e| {
                state_error = Some(e);
                true
            })
        })?;
        if let Some(e) = state_error {
            return Err(e.into());
        }
        if dropped.total() > 0 {
            log::debug(&format!(
                "{} readings dropped from {}: {dropped:?}",
                dropped.total(),
                message.topic
            ));
        }
        Ok(batch)
    }
}

ganglion_sdk::export!(CleanReadings: preprocess);
