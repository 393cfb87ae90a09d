//! `[plugins.limits]`, the limits every plugin instance runs under, and
//! the `limits` a rule may set for one plugin within their bounds.

use serde::Deserialize;
use std::time::Duration;

/// Resource limits applied to every plugin instance (`[plugins.limits]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Guest time per stage call, in milliseconds; time spent waiting on the
    /// host (e.g. `llm` calls) is not counted. Default 100.
    pub call_timeout_ms: u64,
    /// Cap on an instance's linear memories and tables together, in MiB
    /// (a component may define up to 16 memories; each counts against the
    /// same cap). Default 64.
    pub max_memory_mib: u64,
    /// Size of the data one call may return, in bytes. Default 1 MiB.
    pub max_output_bytes: usize,
    /// Fuel (roughly, Wasm instructions) per call; 0 disables metering. Default 0.
    pub fuel: u64,
    /// Concurrent instances per plugin and rule; further calls wait. Default 8.
    pub max_instances: u32,
    /// Log lines a call may emit; later lines are dropped and counted. Default 100.
    pub max_log_lines_per_call: u32,
    /// Bytes of one log line after control characters are escaped; the rest
    /// is cut and replaced by a marker giving its length. Default 4096.
    pub max_log_line_bytes: usize,
    /// How long a plugin may wait on one `llm` call, in milliseconds; a
    /// shorter `deadline-ms` in the request wins. Default 30 000.
    pub llm_timeout_ms: u64,
    /// `generate`, `classify` and `embed` calls one stage call may make;
    /// further ones get `invalid-input` without reaching the model, so a
    /// plugin looping on the model cannot hold its lane and the engine.
    /// Default 16.
    pub max_llm_calls_per_call: u32,
    /// Wall time one stage call may spend waiting on `llm` calls (all four,
    /// `count-tokens` included), in milliseconds; a call that would run past
    /// it gets `deadline-exceeded`. Default 60 000.
    pub max_llm_time_per_call_ms: u64,
    /// Texts (`embed`) or labels (`classify`) one request may carry; more
    /// are refused with `invalid-input`. Default 64.
    pub max_texts_per_request: usize,
    /// Bytes of all texts and labels of one `classify` or `embed` request
    /// together; more are refused with `invalid-input`. Default 65 536.
    pub max_text_bytes_per_request: usize,
    /// Guest time for instantiating an instance and for that instance's
    /// first call, each, in milliseconds: where a plugin loads what it
    /// keeps (a model's weights, a table). 0: `call_timeout_ms`. Default 0.
    pub load_timeout_ms: u64,
    /// The largest memory cap a rule may set for one plugin
    /// (`limits.max_memory_mib`), in MiB; the pooling allocator lets every
    /// linear memory grow this far and the per-instance cap does the rest.
    /// Default 64 (no plugin may ask for more than the default cap).
    pub max_plugin_memory_mib: u64,
    /// The longest `call_timeout_ms` or `load_timeout_ms` a rule may set
    /// for one plugin, in milliseconds. Default 60 000.
    pub max_plugin_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_timeout_ms: 100,
            max_memory_mib: 64,
            max_output_bytes: 1 << 20,
            fuel: 0,
            max_instances: 8,
            max_log_lines_per_call: 100,
            max_log_line_bytes: 4096,
            llm_timeout_ms: 30_000,
            max_llm_calls_per_call: 16,
            max_llm_time_per_call_ms: 60_000,
            max_texts_per_request: 64,
            max_text_bytes_per_request: 65_536,
            load_timeout_ms: 0,
            max_plugin_memory_mib: 64,
            max_plugin_timeout_ms: 60_000,
        }
    }
}

impl Limits {
    /// [`Self::call_timeout_ms`] as a [`Duration`].
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// [`Self::max_memory_mib`] in bytes (saturating).
    pub fn max_memory_bytes(&self) -> usize {
        (self.max_memory_mib as usize).saturating_mul(1 << 20)
    }

    /// [`Self::load_timeout_ms`] as a [`Duration`]; the call timeout when 0.
    pub fn load_timeout(&self) -> Duration {
        match self.load_timeout_ms {
            0 => self.call_timeout(),
            ms => Duration::from_millis(ms),
        }
    }

    /// The size every linear memory may reach in the pooling allocator: the
    /// default cap or the largest a rule may set, whichever is larger.
    pub fn pool_memory_bytes(&self) -> usize {
        (self.max_memory_mib.max(self.max_plugin_memory_mib) as usize).saturating_mul(1 << 20)
    }

    /// These limits with a rule's `limits` for one plugin applied.
    ///
    /// # Errors
    ///
    /// A value over its bound (`max_plugin_memory_mib`,
    /// `max_plugin_timeout_ms`) or 0, naming both.
    pub fn with(&self, rule: &PluginLimits) -> Result<Limits, String> {
        let mut limits = self.clone();
        if let Some(mib) = rule.max_memory_mib {
            let bound = self.max_plugin_memory_mib.max(self.max_memory_mib);
            if mib == 0 || mib > bound {
                return Err(format!(
                    "limits.max_memory_mib = {mib} is not within 1..={bound} \
                     ([plugins.limits] max_plugin_memory_mib in ganglion.toml)"
                ));
            }
            limits.max_memory_mib = mib;
        }
        let timeout = |name: &str, ms: u64| {
            if ms == 0 || ms > self.max_plugin_timeout_ms {
                return Err(format!(
                    "limits.{name} = {ms} is not within 1..={} \
                     ([plugins.limits] max_plugin_timeout_ms in ganglion.toml)",
                    self.max_plugin_timeout_ms
                ));
            }
            Ok(ms)
        };
        if let Some(ms) = rule.call_timeout_ms {
            limits.call_timeout_ms = timeout("call_timeout_ms", ms)?;
        }
        if let Some(ms) = rule.load_timeout_ms {
            limits.load_timeout_ms = timeout("load_timeout_ms", ms)?;
        }
        Ok(limits)
    }

    /// [`Self::llm_timeout_ms`] as a [`Duration`].
    pub fn llm_timeout(&self) -> Duration {
        Duration::from_millis(self.llm_timeout_ms)
    }

    /// [`Self::max_llm_time_per_call_ms`] as a [`Duration`].
    pub fn max_llm_time_per_call(&self) -> Duration {
        Duration::from_millis(self.max_llm_time_per_call_ms)
    }
}

/// Limits a rule sets for one plugin, over `[plugins.limits]` and within
/// its bounds; what is left out stays as configured there. In a rule:
///
/// ```toml
/// [[preprocess]]
/// plugin = "minilm-classify"
/// limits = { max_memory_mib = 160, call_timeout_ms = 500, load_timeout_ms = 20000 }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// The instance's memory cap in MiB; at most `max_plugin_memory_mib`.
    pub max_memory_mib: Option<u64>,
    /// Guest time per call in milliseconds; at most `max_plugin_timeout_ms`.
    pub call_timeout_ms: Option<u64>,
    /// Guest time for instantiation and the first call, in milliseconds; at
    /// most `max_plugin_timeout_ms`.
    pub load_timeout_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_raises_limits_within_the_bounds_only() {
        let host = Limits {
            max_plugin_memory_mib: 256,
            ..Limits::default()
        };
        assert_eq!(
            host.load_timeout(),
            host.call_timeout(),
            "0: the call timeout"
        );
        let rule = PluginLimits {
            max_memory_mib: Some(160),
            call_timeout_ms: Some(500),
            load_timeout_ms: Some(20_000),
        };
        let l = host.with(&rule).unwrap();
        assert_eq!(
            (l.max_memory_mib, l.call_timeout_ms, l.load_timeout()),
            (160, 500, Duration::from_secs(20))
        );
        assert_eq!(host.pool_memory_bytes(), 256 << 20);
        let too_much = |r: PluginLimits| host.with(&r).unwrap_err();
        let e = too_much(PluginLimits {
            max_memory_mib: Some(257),
            ..PluginLimits::default()
        });
        assert!(e.contains("max_plugin_memory_mib"), "{e}");
        let e = too_much(PluginLimits {
            load_timeout_ms: Some(60_001),
            ..PluginLimits::default()
        });
        assert!(e.contains("max_plugin_timeout_ms"), "{e}");
        assert!(
            host.with(&PluginLimits {
                call_timeout_ms: Some(0),
                ..PluginLimits::default()
            })
            .is_err()
        );
        assert_eq!(host.with(&PluginLimits::default()).unwrap(), host);
    }
}
