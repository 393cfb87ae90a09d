//! Ganglion's native LLM engine. Plugins reach it only through the WIT `llm`
//! interface; the runtime holds an [`Engine`] behind its `LlmEngine` trait.
//!
//! - [`engine`]: the [`Engine`] handle, its worker thread and bounded queue,
//!   generation, classification and embedding jobs.
//! - [`model`]: the llama-family forward pass (llama, qwen2, qwen3) over
//!   quantized GGUF weights, batched over sequences with per-sequence KV
//!   caches.
//! - [`scheduler`]: continuous batching of generation requests: one running
//!   batch, chunked prefill, fair admission across rules, deadlines, a bound
//!   on KV memory.
//! - [`prefix`]: prompt-prefix KV reuse, bounded in bytes, least recently
//!   used out first.
//! - [`kernels`]: the candle glue of the engine's own matrix product for
//!   the CPU (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; the kernels
//!   themselves, x86-64, aarch64 and portable, are the `ganglion-kernels`
//!   crate in runtime/llm/kernels); candle's for the other formats, in row
//!   pieces.
//! - [`pool`]: the model's compute threads, a pool of its own that degrades
//!   gently when the cores are oversubscribed.
//! - [`gguf`]: opening and checking GGUF files; [`LoadError`].
//! - [`tokenizer`]: the tokenizer from GGUF metadata or `tokenizer.json`, and
//!   the chat template.
//! - [`sampling`]: temperature, top-k, top-p, repeat penalty, seeds.
//! - [`constraint`]: JSON-schema, choice and regex constraints (llguidance).
//! - [`embed`]: sentence embeddings with a BERT-family encoder.
//! - [`testing`]: tiny random-weight GGUF models for tests.
//! - [`types`]: requests and results.
//! - [`config`]: [`EngineConfig`], the `[model]` settings.
//! - [`stats`]: [`EngineStats`], what the engine reports about its batch.
//!
//! Everything but `types`, `config` and `stats` needs the `engine` feature (on by
//! default): it brings candle, the tokenizer and the constraint engine. An
//! embedder whose runtime has no model builds without it.

#![warn(missing_docs)]

#[cfg(feature = "engine")]
mod attention;
pub mod config;
#[cfg(feature = "engine")]
pub mod constraint;
#[cfg(feature = "engine")]
pub mod embed;
#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod gguf;
#[cfg(feature = "engine")]
pub mod kernels;
#[cfg(feature = "engine")]
pub mod model;
#[cfg(feature = "engine")]
pub mod pool;
#[cfg(feature = "engine")]
pub mod prefix;
#[cfg(feature = "engine")]
pub mod sampling;
#[cfg(feature = "engine")]
pub mod scheduler;
pub mod stats;
#[cfg(feature = "engine")]
pub mod testing;
#[cfg(feature = "engine")]
pub mod tokenizer;
pub mod types;

pub use config::EngineConfig;
#[cfg(feature = "engine")]
pub use engine::{Engine, ModelSummary};
#[cfg(feature = "engine")]
pub use gguf::LoadError;
#[cfg(feature = "engine")]
pub use scheduler::Deltas;
pub use stats::EngineStats;
pub use types::*;
#[cfg(all(test, feature = "engine"))]
mod proptests;
#[cfg(all(test, feature = "engine"))]
mod tests;
