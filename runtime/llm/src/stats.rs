//! [`EngineStats`]: what the engine reports about its batch, plain data,
//! so that a runtime built without the engine (`engine` feature off) still
//! names the type in its `LlmEngine` trait.

/// Upper bounds, in seconds, of the time-to-first-token buckets (the same
/// as the runtime's stage latency buckets, so one dashboard reads both).
pub const TTFT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
];

/// A snapshot of the engine's batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests accepted and waiting for the model.
    pub waiting: usize,
    /// Sequences in the running batch.
    pub running: usize,
    /// Bytes of KV state the running sequences hold now.
    pub kv_bytes: usize,
    /// The most KV state running sequences have held at once.
    pub kv_peak_bytes: usize,
    /// Bytes the running sequences have reserved.
    pub kv_reserved_bytes: usize,
    /// The bound on KV state of running sequences (`kv_cache_mib`).
    pub kv_bound_bytes: usize,
    /// Forward passes of the generation batch.
    pub steps: u64,
    /// Sequences summed over those passes (÷ `steps` = mean batch).
    pub step_sequences: u64,
    /// The most sequences one pass has carried.
    pub largest_batch: usize,
    /// Prompt tokens fed to the model (prefill), cached prefixes not
    /// counted; their rate is the prefill speed.
    pub prefill_tokens: u64,
    /// Generated tokens fed back to the model (decode); their rate is the
    /// decode speed.
    pub decode_tokens: u64,
    /// Requests that started from a cached prompt prefix.
    pub prefix_hits: u64,
    /// Requests that found no cached prefix to start from.
    pub prefix_misses: u64,
    /// Requests per bucket of time to first token (from the engine's worker
    /// taking the request to the end of its prompt): one count per bound of [`TTFT_BUCKETS`], not
    /// cumulative, then those beyond the last bound.
    pub ttft: [u64; TTFT_BUCKETS.len() + 1],
    /// Sum of the times to first token, in microseconds.
    pub ttft_sum_us: u64,
}
