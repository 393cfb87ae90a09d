//! Counters of one rule, kept by its lanes and read at any time (the live
//! view, the summary, the admin endpoint's `/metrics`): plain atomics, no
//! lock on the message path but the dead-letter kinds' map, taken once per
//! confirmed dead letter.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Upper bounds of the latency buckets, in seconds (Prometheus `le`); a
/// last bucket, `+Inf`, takes the rest. Fixed so that a histogram is a few
/// atomics: a stage call is bounded by `call_timeout_ms` (100 ms by default)
/// and a model call by `llm_timeout_ms` (30 s), which these span.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
];

/// A latency histogram with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of the observations, in microseconds.
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A histogram read at one moment: cumulative counts per bucket (the last
/// is `+Inf`, equal to `count`), the sum in seconds, the count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations at or under each bound of [`LATENCY_BUCKETS`], then all.
    pub cumulative: Vec<u64>,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Records one observation of `ms` milliseconds.
    pub fn observe_ms(&self, ms: f64) {
        let seconds = ms / 1000.0;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((ms * 1000.0).max(0.0) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now. Read without a lock, so a scrape during an
    /// observation may see the bucket and the count one apart.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: total,
        }
    }
}

/// The stages whose latency is measured, in pipeline order; `end-to-end`
/// is a lane's whole processing of one message (delivery not included).
pub const STAGES: [&str; 5] = ["preprocess", "template", "llm", "postprocess", "end-to-end"];

/// Counters of one rule, for status views and tests.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Messages a lane took from its queue, counted as processing starts.
    pub messages: AtomicU64,
    /// Readings that entered the pipeline after preprocessing.
    pub readings: AtomicU64,
    /// Outputs whose publish the broker confirmed (counted on the
    /// confirmation; one not queued or not confirmed is not counted).
    pub published: AtomicU64,
    /// Dead letters whose publish on the rule's dead-letter topic the broker
    /// confirmed.
    pub dead_letters: AtomicU64,
    /// Messages the rule's topics matched while it was disabled, not taken.
    pub skipped: AtomicU64,
    /// Set while the rule is disabled ([`super::Gateway::set_enabled`]).
    pub disabled: AtomicBool,
    /// Messages waiting in the rule's lane queues now (at most `lanes` ×
    /// `[rules] lane_capacity`).
    pub queued: AtomicUsize,
    /// Lanes processing or delivering a message now.
    pub busy: AtomicUsize,
    /// Confirmed dead letters by kind. The kinds are the fixed names the
    /// pipeline and the gateway use (`bad-payload`, `trap`...), so the map
    /// stays small.
    dead_letter_kinds: Mutex<BTreeMap<String, u64>>,
    /// The last dead letter's stage, kind and reason.
    last_error: Mutex<Option<String>>,
    /// Latency per stage of [`STAGES`], in that order.
    latency: [Histogram; STAGES.len()],
}

impl RuleStats {
    /// Confirmed dead letters by kind, by name.
    pub fn dead_letters_by_kind(&self) -> BTreeMap<String, u64> {
        self.dead_letter_kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The last dead letter: `stage/kind: reason`.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Each stage of [`STAGES`] with its latency histogram.
    pub fn latency(&self) -> impl Iterator<Item = (&'static str, HistogramSnapshot)> + '_ {
        STAGES
            .iter()
            .zip(&self.latency)
            .map(|(s, h)| (*s, h.snapshot()))
    }

    pub(super) fn observe(&self, stage: &str, ms: f64) {
        if let Some(i) = STAGES.iter().position(|s| *s == stage) {
            self.latency[i].observe_ms(ms);
        }
    }

    pub(super) fn dead_letter_confirmed(&self, kind: &str) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
        *self
            .dead_letter_kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    pub(super) fn dead_letter_seen(&self, stage: &str, kind: &str, reason: &str) {
        // Bounded: a reason is an error message, cut here to keep the
        // `/rules` answer small whatever a plugin put in its error.
        let reason: String = reason.chars().take(500).collect();
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(format!("{stage}/{kind}: {reason}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::default();
        h.observe_ms(0.2);
        h.observe_ms(3.0);
        h.observe_ms(120_000.0);
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[2], 1, "3 ms is over 2.5 ms");
        assert_eq!(s.cumulative[3], 2, "and under 5 ms");
        assert_eq!(*s.cumulative.last().unwrap(), 3);
        assert!((s.sum_seconds - 120.0032).abs() < 1e-6);
    }
}
