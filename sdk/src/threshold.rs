//! Threshold checks shared by alerting plugins.

use crate::AlertLevel;
use crate::batch::ReadingRef;
use serde::{Deserialize, Serialize};

/// A bound on one metric, as written in a rule file:
/// `{ metric = "temperature", above = 90.0, level = "critical" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// The metric it applies to, matched exactly; readings of other
    /// metrics never violate it.
    pub metric: String,
    /// Alert when the value is strictly above this.
    pub above: Option<f64>,
    /// Alert when the value is strictly below this.
    pub below: Option<f64>,
    /// Alert when a boolean reading has this value.
    pub equals: Option<bool>,
    /// How serious a violation is; `warning` when not given.
    #[serde(default)]
    pub level: Level,
}

/// The alert level a threshold raises, spelled in lower case in rule
/// files; converts into the WIT [`AlertLevel`].
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Worth recording; no one need act.
    Info,
    /// Needs attention soon. The default.
    #[default]
    Warning,
    /// Needs attention now.
    Critical,
}

impl From<Level> for AlertLevel {
    fn from(l: Level) -> Self {
        match l {
            Level::Info => AlertLevel::Info,
            Level::Warning => AlertLevel::Warning,
            Level::Critical => AlertLevel::Critical,
        }
    }
}

impl Threshold {
    /// Checks that at least one bound is set; call once after parsing config.
    pub fn validate(&self) -> Result<(), String> {
        if self.above.is_none() && self.below.is_none() && self.equals.is_none() {
            return Err(format!(
                "threshold on `{}` sets none of above, below, equals",
                self.metric
            ));
        }
        Ok(())
    }

    /// A description of the violation when `reading` breaks this threshold.
    pub fn violated_by(&self, reading: &ReadingRef<'_>) -> Option<String> {
        if reading.metric != self.metric {
            return None;
        }
        if let (Some(expected), crate::Value::Boolean(b)) = (self.equals, reading.value) {
            return (*b == expected).then(|| format!("{} is {b}", self.metric));
        }
        let v = reading.value.as_f64().filter(|v| v.is_finite())?;
        let v_text = num(v);
        let unit = if reading.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", reading.unit)
        };
        if let Some(max) = self.above.filter(|max| v > *max) {
            return Some(format!(
                "{} {v_text}{unit} above {}{unit}",
                self.metric,
                num(max)
            ));
        }
        if let Some(min) = self.below.filter(|min| v < *min) {
            return Some(format!(
                "{} {v_text}{unit} below {}{unit}",
                self.metric,
                num(min)
            ));
        }
        None
    }
}

/// A number for people: at most two decimals, no trailing zeros.
fn num(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}
