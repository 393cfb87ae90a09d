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

    /// True when `reading` breaks this threshold; what [`Self::violated_by`]
    /// decides, without making the text.
    pub fn is_broken_by(&self, reading: &ReadingRef<'_>) -> bool {
        self.breach(reading).is_some()
    }

    fn breach(&self, reading: &ReadingRef<'_>) -> Option<Breach> {
        if reading.metric != self.metric {
            return None;
        }
        if let (Some(expected), crate::Value::Boolean(b)) = (self.equals, reading.value) {
            return (*b == expected).then_some(Breach::Equals(*b));
        }
        let v = reading.value.as_f64().filter(|v| v.is_finite())?;
        match (self.above, self.below) {
            (Some(max), _) if v > max => Some(Breach::Above(v, max)),
            (_, Some(min)) if v < min => Some(Breach::Below(v, min)),
            _ => None,
        }
    }

    /// A description of the violation when `reading` breaks this threshold.
    pub fn violated_by(&self, reading: &ReadingRef<'_>) -> Option<String> {
        let (v, word, bound) = match self.breach(reading)? {
            Breach::Equals(b) => return Some(format!("{} is {b}", self.metric)),
            Breach::Above(v, max) => (v, "above", max),
            Breach::Below(v, min) => (v, "below", min),
        };
        let unit = if reading.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", reading.unit)
        };
        Some(format!(
            "{} {}{unit} {word} {}{unit}",
            self.metric,
            num(v),
            num(bound)
        ))
    }
}

/// How a reading breaks a threshold: the boolean it equals, or the value
/// and the bound it crossed.
enum Breach {
    Equals(bool),
    Above(f64, f64),
    Below(f64, f64),
}

/// A number for people: at most two decimals, no trailing zeros.
///
/// The shortest form that reads back as `v` is tried first: when it has at
/// most two decimals it is what rounding to two gives, and it is made
/// without the exact-digits formatter, whose arbitrary-precision fallback
/// took a fifth of an alert's guest time for whole numbers such as `95.00`.
/// Below 1e12 a double's spacing is under 1e-4, so a shortest form with at
/// most two decimals lies within that of `v` and is its nearest hundredth;
/// larger numbers take the exact path.
fn num(v: f64) -> String {
    if v.abs() < 1e12 {
        let shortest = v.to_string();
        match shortest.find('.') {
            Some(dot) if shortest.len() - dot > 3 => {}
            _ => return shortest,
        }
    }
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;
    use proptest::prelude::*;

    /// What `num` returned before the shortest-form path.
    fn rounded(v: f64) -> String {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }

    #[test]
    fn numbers_keep_at_most_two_decimals_without_trailing_zeros() {
        for (v, text) in [
            (95.0, "95"),
            (0.0, "0"),
            (-0.0, "-0"),
            (-0.001, "-0"),
            (70.1, "70.1"),
            (70.12, "70.12"),
            (21.111_111, "21.11"),
            (99.999, "100"),
            (-40.25, "-40.25"),
            (1e20, "100000000000000000000"),
            (1e-7, "0"),
        ] {
            assert_eq!(num(v), text, "{v}");
        }
    }

    proptest! {
        #[test]
        fn shortest_form_agrees_with_rounding_to_two_decimals(v in any::<f64>().prop_filter("finite", |v| v.is_finite())) {
            prop_assert_eq!(num(v), rounded(v));
        }

        #[test]
        fn sensor_range_numbers_agree_too(v in -1e6f64..1e6) {
            prop_assert_eq!(num(v), rounded(v));
        }

        #[test]
        fn numbers_near_the_exact_path_agree_too(v in -2e12f64..2e12) {
            prop_assert_eq!(num(v), rounded(v));
        }

        #[test]
        fn readings_with_two_decimals_agree_too(cents in -10_000_000i64..10_000_000) {
            let v = cents as f64 / 100.0;
            prop_assert_eq!(num(v), rounded(v));
        }
    }

    #[test]
    fn a_violation_names_the_value_the_bound_and_the_unit() {
        let t = Threshold {
            metric: "temperature".into(),
            above: Some(90.0),
            below: Some(-10.0),
            equals: None,
            level: Level::Critical,
        };
        let check = |v: f64| {
            let value = Value::Number(v);
            t.violated_by(&ReadingRef {
                device: "m1",
                metric: "temperature",
                unit: "C",
                value: &value,
                timestamp: 0,
            })
        };
        assert_eq!(
            check(95.5).as_deref(),
            Some("temperature 95.5 C above 90 C")
        );
        assert_eq!(
            check(-12.345).as_deref(),
            Some("temperature -12.35 C below -10 C")
        );
        assert_eq!(check(20.0), None);
    }
}
