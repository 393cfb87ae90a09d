//! `[model]` settings: plain data, so that a build without the engine
//! (the runtime's `llm` feature off) still reads and checks them.

use serde::Deserialize;
use std::path::PathBuf;

/// `[model]` in `ganglion.toml`.
///
/// ```toml
/// [model]
/// path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
/// embedding = "models/all-MiniLM-L6-v2"
/// threads = 2
/// queue = 64
/// context = 2048
/// prefix_cache_mib = 64   # KV state of recent prompts, reused by prompts that share their start
/// max_batch = 8           # generation requests decoded together
/// kv_cache_mib = 256      # KV state of the running requests, reserved at admission
/// prefill_chunk = 64      # prompt tokens per step: a new prompt delays the others by this much
/// engine = "local"        # or "remote:<name>": where rules' model calls go by default
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// A GGUF file of the llama family; none means no generation.
    pub path: Option<PathBuf>,
    /// A folder with a BERT-family sentence encoder; none means no `embed`.
    pub embedding: Option<PathBuf>,
    /// Model threads; default: cores − 1 on more than 2 cores, else all.
    /// The compute pool is process-wide, so the first engine (or
    /// `GANGLION_MODEL_THREADS`) sets it.
    pub threads: Option<usize>,
    /// Requests waiting for the model beyond those running.
    pub queue: usize,
    /// Generation requests in the running batch at most.
    pub max_batch: usize,
    /// Bound on the KV state of running requests, in MiB. A request
    /// reserves its prompt plus `max-tokens` when it starts.
    pub kv_cache_mib: usize,
    /// Prompt tokens fed per forward pass, in all: a long prompt is fed in
    /// chunks of this size, between the decode steps of the others.
    pub prefill_chunk: usize,
    /// Longest sequence (prompt + completion) in tokens; capped by the model's own.
    pub context: usize,
    /// Deadline for requests that set none, in milliseconds.
    pub default_deadline_ms: u64,
    /// KV state of recent prompts kept for reuse by later prompts that
    /// start the same way, in MiB; 0 turns prefix reuse off.
    pub prefix_cache_mib: usize,
    /// `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    pub device: String,
    /// Where the rules' and plugins' model calls go unless a rule says
    /// otherwise: `local` (this engine) or `remote:<name>` (the runtime's
    /// `[remote.<name>]` server). Read by the runtime, not by this crate.
    /// Default `local`.
    pub engine: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            path: None,
            embedding: None,
            threads: None,
            queue: 64,
            max_batch: 8,
            kv_cache_mib: 256,
            prefill_chunk: 64,
            context: 2048,
            default_deadline_ms: 60_000,
            prefix_cache_mib: 64,
            device: "cpu".into(),
            engine: None,
        }
    }
}
