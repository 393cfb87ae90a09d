//! `GET /metrics`: the Prometheus text format (version 0.0.4), rendered at
//! scrape time from the counters the gateway, the plugin pools, the engine
//! and the MQTT link already keep; nothing is stored for it.

use super::{LinkGauges, Sources};
use crate::gateway::{HistogramSnapshot, LATENCY_BUCKETS};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

/// A label value as the text format wants it: `\`, `"` and newline escaped.
/// Rule names are checked when loaded, but plugin names, dead-letter kinds
/// and anything else may hold what a rule file or component put there.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes metric families: each name's HELP and TYPE once, then its samples.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts a family: `kind` is `counter`, `gauge` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of the family just started.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }

    /// The samples of one histogram (`_bucket`, `_sum`, `_count`).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bounds: Vec<String> = LATENCY_BUCKETS
            .iter()
            .map(|b| number(*b))
            .chain(std::iter::once("+Inf".to_owned()))
            .collect();
        for (le, n) in bounds.iter().zip(&h.cumulative) {
            let mut with_le = labels.to_vec();
            with_le.push(("le", le));
            self.sample(&format!("{name}_bucket"), &with_le, *n as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.is_nan() {
        "NaN".to_owned()
    } else {
        format!("{v}")
    }
}

/// Every metric, now.
pub(super) fn render(sources: &Sources, reloads: (u64, u64)) -> String {
    let mut e = Exposition::default();
    let stats = sources.gateway.stats();
    type Counter = fn(&crate::gateway::RuleStats) -> u64;
    let counters: [(&str, &str, Counter); 5] = [
        (
            "ganglion_rule_messages_total",
            "Messages a rule's lanes took.",
            |s| s.messages.load(Ordering::Relaxed),
        ),
        (
            "ganglion_rule_readings_total",
            "Readings that entered a rule's pipeline after preprocessing.",
            |s| s.readings.load(Ordering::Relaxed),
        ),
        (
            "ganglion_rule_published_total",
            "Outputs of a rule the broker confirmed.",
            |s| s.published.load(Ordering::Relaxed),
        ),
        (
            "ganglion_rule_dead_letters_total",
            "Dead letters of a rule the broker confirmed.",
            |s| s.dead_letters.load(Ordering::Relaxed),
        ),
        (
            "ganglion_rule_skipped_total",
            "Messages that matched a rule while it was disabled.",
            |s| s.skipped.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        e.family(name, "counter", help);
        for (rule, s) in &stats {
            e.sample(name, &[("rule", rule)], get(s) as f64);
        }
    }
    type Gauge = fn(&crate::gateway::RuleStats) -> usize;
    let gauges: [(&str, &str, Gauge); 2] = [
        (
            "ganglion_rule_queued",
            "Messages waiting in the rule's lane queues.",
            |s| s.queued.load(Ordering::Relaxed),
        ),
        (
            "ganglion_rule_lanes_busy",
            "The rule's lanes processing or delivering a message.",
            |s| s.busy.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in gauges {
        e.family(name, "gauge", help);
        for (rule, s) in &stats {
            e.sample(name, &[("rule", rule)], get(s) as f64);
        }
    }
    e.family(
        "ganglion_rule_dead_letters_by_kind_total",
        "counter",
        "Confirmed dead letters of a rule by reason kind.",
    );
    for (rule, s) in &stats {
        for (kind, n) in s.dead_letters_by_kind() {
            e.sample(
                "ganglion_rule_dead_letters_by_kind_total",
                &[("rule", rule), ("kind", &kind)],
                n as f64,
            );
        }
    }
    e.family(
        "ganglion_rule_enabled",
        "gauge",
        "1 while a rule takes messages, 0 while it is disabled.",
    );
    for (rule, s) in &stats {
        let on = !s.disabled.load(Ordering::Relaxed);
        e.sample(
            "ganglion_rule_enabled",
            &[("rule", rule)],
            f64::from(u8::from(on)),
        );
    }
    e.family(
        "ganglion_stage_duration_seconds",
        "histogram",
        "Time per stage of a rule's pipeline; end-to-end is a lane's whole processing of one message.",
    );
    for (rule, s) in &stats {
        for (stage, h) in s.latency() {
            e.histogram(
                "ganglion_stage_duration_seconds",
                &[("rule", rule), ("stage", stage)],
                &h,
            );
        }
    }
    plugins(&mut e, sources);
    engine(&mut e, sources.llm.as_ref());
    #[cfg(feature = "remote")]
    remotes(&mut e, sources);
    if let Some(link) = &sources.link {
        mqtt(&mut e, &link());
    }
    e.family(
        "ganglion_reloads_total",
        "counter",
        "Plugin and rule file changes applied (ok) or refused since the start.",
    );
    e.sample(
        "ganglion_reloads_total",
        &[("result", "ok")],
        reloads.0 as f64,
    );
    e.sample(
        "ganglion_reloads_total",
        &[("result", "refused")],
        reloads.1 as f64,
    );
    e.finish()
}

fn plugins(e: &mut Exposition, sources: &Sources) {
    let pipelines = sources.gateway.pipelines();
    type Pool = fn(&crate::plugin::PoolStats) -> f64;
    let pools: [(&str, &str, &str, Pool); 11] = [
        (
            "ganglion_plugin_calls_total",
            "counter",
            "Stage calls a rule made to a plugin.",
            |p| p.calls as f64,
        ),
        (
            "ganglion_plugin_call_failures_total",
            "counter",
            "Stage calls that failed for any reason (the plugin's own errors too).",
            |p| p.failed as f64,
        ),
        (
            "ganglion_plugin_traps_total",
            "counter",
            "Stage calls that ended in a trap.",
            |p| p.traps as f64,
        ),
        (
            "ganglion_plugin_deadlines_total",
            "counter",
            "Stage calls stopped at the guest-time deadline (call_timeout_ms).",
            |p| p.deadlines as f64,
        ),
        (
            "ganglion_plugin_instances_created_total",
            "counter",
            "Instances a rule's pool of a plugin made.",
            |p| p.created as f64,
        ),
        (
            "ganglion_plugin_instances_discarded_total",
            "counter",
            "Instances dropped after a fault (trap, deadline, fuel).",
            |p| p.discarded as f64,
        ),
        (
            "ganglion_plugin_instances_retired_total",
            "counter",
            "Instances dropped after a call because their memory grew too large.",
            |p| p.retired as f64,
        ),
        (
            "ganglion_plugin_instances_idle",
            "gauge",
            "Instances waiting for a call.",
            |p| p.idle as f64,
        ),
        (
            "ganglion_plugin_fuel_total",
            "counter",
            "Fuel the calls used (about one unit per instruction); 0 while calls are unmetered (fuel = 0).",
            |p| p.fuel as f64,
        ),
        (
            "ganglion_plugin_memory_bytes",
            "gauge",
            "Bytes of linear memories and tables the idle instances hold.",
            |p| p.memory_bytes as f64,
        ),
        (
            "ganglion_plugin_instance_memory_peak_bytes",
            "gauge",
            "The most bytes one instance held after a call (the cap is max_memory_mib).",
            |p| p.peak_memory_bytes as f64,
        ),
    ];
    for (name, kind, help, get) in pools {
        e.family(name, kind, help);
        for p in &pipelines {
            for (stage, plugin, stats) in p.plugins() {
                let version = plugin.version.to_string();
                let labels = [
                    ("rule", p.rule.name.as_str()),
                    ("plugin", plugin.name.as_str()),
                    ("stage", stage),
                    ("version", version.as_str()),
                ];
                e.sample(name, &labels, get(&stats));
            }
        }
    }
}

#[cfg(feature = "remote")]
fn remotes(e: &mut Exposition, sources: &Sources) {
    let stats: Vec<(String, crate::llm::RemoteStats)> = sources
        .engines
        .remotes()
        .map(|r| (r.name().to_owned(), r.remote_stats()))
        .collect();
    if stats.is_empty() {
        return;
    }
    type Counter = fn(&crate::llm::RemoteStats) -> u64;
    let counters: [(&str, &str, Counter); 6] = [
        (
            "ganglion_remote_requests_total",
            "Generate and embed calls made to a remote engine.",
            |s| s.requests,
        ),
        (
            "ganglion_remote_retries_total",
            "HTTP attempts after the first of a call.",
            |s| s.retries,
        ),
        (
            "ganglion_remote_failures_total",
            "Calls the remote server failed, after their retries.",
            |s| s.failures,
        ),
        (
            "ganglion_remote_refused_total",
            "Calls the open circuit kept from the server.",
            |s| s.refused,
        ),
        (
            "ganglion_remote_fallbacks_total",
            "Calls the local engine answered instead of the server.",
            |s| s.fallbacks,
        ),
        (
            "ganglion_remote_breaker_opened_total",
            "Times the circuit breaker opened.",
            |s| s.breaker_opened,
        ),
    ];
    for (name, help, get) in counters {
        e.family(name, "counter", help);
        for (remote, s) in &stats {
            e.sample(name, &[("remote", remote.as_str())], get(s) as f64);
        }
    }
    e.family(
        "ganglion_remote_breaker_state",
        "gauge",
        "The circuit breaker: 0 closed, 1 open, 2 half-open.",
    );
    for (remote, s) in &stats {
        e.sample(
            "ganglion_remote_breaker_state",
            &[("remote", remote.as_str())],
            f64::from(s.breaker.as_number()),
        );
    }
}

/// The model's families: whether it is loaded, and the engine's batch,
/// KV cache and speed counters when it keeps them.
pub(super) fn engine(e: &mut Exposition, llm: &dyn crate::llm::LlmEngine) {
    e.family(
        "ganglion_model_loaded",
        "gauge",
        "1 when a model is loaded, 0 when rules that need it dead-letter.",
    );
    let loaded = !llm.model_id().is_empty();
    e.sample("ganglion_model_loaded", &[], f64::from(u8::from(loaded)));
    let Some(s) = llm.stats() else {
        return;
    };
    let gauges = [
        (
            "ganglion_engine_waiting",
            "Requests waiting for the model.",
            s.waiting as f64,
        ),
        (
            "ganglion_engine_running",
            "Sequences in the running batch.",
            s.running as f64,
        ),
        (
            "ganglion_engine_kv_bytes",
            "KV cache bytes the running sequences hold.",
            s.kv_bytes as f64,
        ),
        (
            "ganglion_engine_kv_peak_bytes",
            "Most KV cache bytes held at once.",
            s.kv_peak_bytes as f64,
        ),
        (
            "ganglion_engine_kv_reserved_bytes",
            "KV cache bytes reserved by running sequences.",
            s.kv_reserved_bytes as f64,
        ),
        (
            "ganglion_engine_kv_bound_bytes",
            "The bound on KV cache bytes (kv_cache_mib).",
            s.kv_bound_bytes as f64,
        ),
        (
            "ganglion_engine_largest_batch",
            "Most sequences one forward pass carried.",
            s.largest_batch as f64,
        ),
    ];
    for (name, help, v) in gauges {
        e.family(name, "gauge", help);
        e.sample(name, &[], v);
    }
    let counters = [
        (
            "ganglion_engine_steps_total",
            "Forward passes of the generation batch.",
            s.steps as f64,
        ),
        (
            "ganglion_engine_step_sequences_total",
            "Sequences summed over forward passes (divided by steps: the mean batch).",
            s.step_sequences as f64,
        ),
        (
            "ganglion_engine_prefill_tokens_total",
            "Prompt tokens the model read (cached prefixes not counted); rate() is the prefill speed.",
            s.prefill_tokens as f64,
        ),
        (
            "ganglion_engine_decode_tokens_total",
            "Generated tokens fed back to the model; rate() is the decode speed.",
            s.decode_tokens as f64,
        ),
        (
            "ganglion_engine_prefix_cache_hits_total",
            "Requests that started from a cached prompt prefix.",
            s.prefix_hits as f64,
        ),
        (
            "ganglion_engine_prefix_cache_misses_total",
            "Requests that found no cached prompt prefix.",
            s.prefix_misses as f64,
        ),
    ];
    for (name, help, v) in counters {
        e.family(name, "counter", help);
        e.sample(name, &[], v);
    }
    e.family(
        "ganglion_engine_time_to_first_token_seconds",
        "histogram",
        "From the engine taking a generation request to the end of its prompt.",
    );
    e.histogram(
        "ganglion_engine_time_to_first_token_seconds",
        &[],
        &ttft(&s),
    );
}

/// The engine's time-to-first-token counts as a histogram snapshot: its
/// buckets are the stage latency buckets (a test holds them equal).
fn ttft(s: &ganglion_llm::EngineStats) -> HistogramSnapshot {
    let mut total = 0;
    let cumulative = s
        .ttft
        .iter()
        .map(|n| {
            total += n;
            total
        })
        .collect();
    HistogramSnapshot {
        cumulative,
        sum_seconds: s.ttft_sum_us as f64 / 1e6,
        count: total,
    }
}

fn mqtt(e: &mut Exposition, g: &LinkGauges) {
    let metrics = [
        (
            "ganglion_mqtt_connected",
            "gauge",
            "1 while both MQTT connections (intake and output) are up.",
            f64::from(u8::from(g.connected)),
        ),
        (
            "ganglion_mqtt_connections_total",
            "counter",
            "Connections the broker accepted, both clients together; reconnections are the rest after the first of each.",
            g.connections as f64,
        ),
        (
            "ganglion_mqtt_in_flight",
            "gauge",
            "Publishes written and not yet acknowledged by the broker.",
            g.in_flight as f64,
        ),
        (
            "ganglion_mqtt_outbox",
            "gauge",
            "Publishes asked for and not yet written: they wait for the connection or a free in-flight slot.",
            g.outbox as f64,
        ),
        (
            "ganglion_mqtt_intake_backlog",
            "gauge",
            "Deliveries received and not yet taken by the gateway.",
            g.intake_backlog as f64,
        ),
        (
            "ganglion_mqtt_dropped_qos0_total",
            "counter",
            "QoS 0 deliveries dropped because the intake buffer was full.",
            g.dropped_qos0 as f64,
        ),
    ];
    for (name, kind, help, v) in metrics {
        e.family(name, kind, help);
        e.sample(name, &[], v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's histogram is rendered with the stage buckets' bounds.
    #[test]
    fn time_to_first_token_buckets_are_the_latency_buckets() {
        assert_eq!(ganglion_llm::stats::TTFT_BUCKETS, LATENCY_BUCKETS);
        let mut s = ganglion_llm::EngineStats::default();
        s.ttft[0] = 2;
        s.ttft[LATENCY_BUCKETS.len()] = 1;
        s.ttft_sum_us = 31_000_000;
        let h = ttft(&s);
        assert_eq!(h.count, 3);
        assert_eq!(h.cumulative.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(h.cumulative[0], 2);
        assert_eq!(*h.cumulative.last().unwrap(), 3);
        assert_eq!(h.sum_seconds, 31.0);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.family(
            "ganglion_x_total",
            "counter",
            "A help text\nwith a newline.",
        );
        e.sample(
            "ganglion_x_total",
            &[("rule", "a\"b\\c\nd"), ("kind", "ok")],
            3.0,
        );
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP ganglion_x_total A help text\\nwith a newline.\n# TYPE ganglion_x_total counter\nganglion_x_total{rule=\"a\\\"b\\\\c\\nd\",kind=\"ok\"} 3\n"
        );
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_sum_and_count() {
        let h = crate::gateway::RuleStats::default();
        let snap = h.latency().next().unwrap().1;
        let mut e = Exposition::default();
        e.histogram("ganglion_h", &[("rule", "r")], &snap);
        let text = e.finish();
        assert!(
            text.contains("ganglion_h_bucket{rule=\"r\",le=\"0.0005\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("ganglion_h_bucket{rule=\"r\",le=\"+Inf\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("ganglion_h_sum{rule=\"r\"} 0\n"), "{text}");
        assert!(text.contains("ganglion_h_count{rule=\"r\"} 0\n"), "{text}");
        assert_eq!(text.lines().count(), LATENCY_BUCKETS.len() + 3);
    }

    #[test]
    fn special_values_use_the_formats_spelling() {
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(7.0), "7");
    }
}
