//! Prompt-processing and decode speed of the engine's forward pass on a GGUF
//! model, as one JSON line (tokens per second, best of the repetitions).
//!
//! `CANDLE_NUM_THREADS=1 GANGLION_MODEL_THREADS=1 cargo bench -p ganglion-llm --bench llm_speed -- MODEL [PROMPT_TOKENS DECODE_TOKENS REPS]`
//!
//! `cargo run -p xtask -- bench-llm` runs it beside llama.cpp on the same file.

use ganglion_llm::gguf::GgufFile;
use ganglion_llm::model::{KvCache, Model, Step};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(path) = args.first() else {
        anyhow::bail!("usage: llm_speed MODEL.gguf [PROMPT_TOKENS DECODE_TOKENS REPS]");
    };
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (prompt_n, decode_n, reps) = (arg(1, 128), arg(2, 64), arg(3, 3));
    let mut gguf = GgufFile::open(std::path::Path::new(path))?;
    let model = Model::load(&mut gguf, &candle_core::Device::Cpu, |_, _| {})?;
    let resident = resident_bytes();
    let file = std::fs::metadata(path)?.len();
    let read_per_token = model.matrix_bytes() as f64;
    let bandwidth = read_bandwidth(read_per_token as usize);
    let vocab = model.config.vocab as u32;
    // Deterministic, ordinary token ids (past the special tokens).
    let prompt: Vec<u32> = (0..prompt_n as u32)
        .map(|i| 100 + (i * 7919) % (vocab - 200))
        .collect();
    let (mut best_prefill, mut best_decode) = (0f64, 0f64);
    for _ in 0..reps {
        let mut cache = KvCache::default();
        let t = Instant::now();
        let logits = model.forward(&mut [Step {
            tokens: &prompt,
            cache: &mut cache,
        }])?;
        let _ = logits.to_vec2::<f32>()?;
        best_prefill = best_prefill.max(prompt_n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut token = 100u32;
        for i in 0..decode_n {
            let logits = model.forward(&mut [Step {
                tokens: &[token],
                cache: &mut cache,
            }])?;
            let row = logits.squeeze(0)?.to_vec1::<f32>()?;
            token = 100 + (row.len() as u32 + i as u32 * 31) % (vocab - 200);
        }
        best_decode = best_decode.max(decode_n as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"engine\":\"ganglion\",\"threads\":{},\"prompt_tokens\":{prompt_n},\"decode_tokens\":{decode_n},\"prefill_tps\":{best_prefill:.1},\"decode_tps\":{best_decode:.1},\"resident_mib\":{:.0},\"file_mib\":{:.0},\"read_per_token_mib\":{:.1},\"bandwidth_gbs\":{:.2},\"bound_tps\":{:.1}}}",
        ganglion_llm::pool::pool().threads(),
        resident as f64 / 1048576.0,
        file as f64 / 1048576.0,
        read_per_token / 1048576.0,
        bandwidth / 1e9,
        bandwidth / read_per_token,
    );
    Ok(())
}

/// Bytes per second one thread reads from memory: a sum over a buffer of
/// `bytes` (the weights a decode step reads), best of eight passes after one
/// to warm it. Sized like the weights, so that a model that fits in the
/// last-level cache (this machine's is 300 MiB, shared) is held to the
/// cache's bandwidth, not DRAM's. The decode bound is this over `bytes`.
fn read_bandwidth(bytes: usize) -> f64 {
    let words = vec![1u64; bytes.div_ceil(64) * 8];
    let mut best = 0f64;
    for pass in 0..9 {
        let t = Instant::now();
        let sum = std::hint::black_box(&words)
            .chunks_exact(8)
            .fold([0u64; 8], |mut acc, c| {
                for (a, v) in acc.iter_mut().zip(c) {
                    *a = a.wrapping_add(*v);
                }
                acc
            });
        std::hint::black_box(sum);
        if pass > 0 {
            best = best.max((words.len() * 8) as f64 / t.elapsed().as_secs_f64());
        }
    }
    best
}

/// Resident memory of this process after loading (Linux; 0 elsewhere).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
