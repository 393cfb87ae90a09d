//! Aggregate decode speed at several batch sizes, measured as llama.cpp's
//! `llama-batched-bench` measures it, as one JSON line per batch size.
//!
//! `cargo bench -p ganglion-llm --bench batch_decode -- MODEL [NPP NTG BATCHES REPS]`
//!
//! - `forward`: the model alone. B sequences each prefill NPP prompt tokens,
//!   then NTG steps decode one token per sequence in one forward pass;
//!   `decode_tps` = B × NTG ÷ decode time (llama-batched-bench's S_TG).
//! - `engine`: the same through the engine's scheduler: B concurrent
//!   `generate` requests (greedy, NTG tokens at most, distinct prompts);
//!   `tps` = completion tokens ÷ wall time from submission to the last
//!   answer (prefill included, so a little below `forward`).
//!
//! `cargo run -p xtask -- bench-llm` runs it beside llama-batched-bench.

use ganglion_llm::gguf::GgufFile;
use ganglion_llm::model::{KvCache, Model, Step};
use ganglion_llm::{Engine, EngineConfig, GenerateRequest, GenerationParams, LlmInput};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(path) = args.first() else {
        anyhow::bail!("usage: batch_decode MODEL.gguf [NPP NTG BATCHES REPS]");
    };
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (npp, ntg) = (arg(1, 128), arg(2, 64));
    let batches: Vec<usize> = args
        .get(3)
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 8]);
    let reps = arg(4, 3);
    let mut gguf = GgufFile::open(std::path::Path::new(path))?;
    let model = Model::load(&mut gguf, &candle_core::Device::Cpu, |_, _| {})?;
    let vocab = model.config.vocab as u32;
    for &b in &batches {
        let mut best = 0f64;
        for _ in 0..reps {
            let prompts: Vec<Vec<u32>> = (0..b as u32)
                .map(|s| {
                    (0..npp as u32)
                        .map(|i| 100 + (i * 7919 + s * 104_729) % (vocab - 200))
                        .collect()
                })
                .collect();
            let mut caches = vec![KvCache::default(); b];
            for c in caches.iter_mut() {
                c.reserve(npp + ntg);
            }
            let mut steps: Vec<Step> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, c)| Step {
                    tokens: p,
                    cache: c,
                })
                .collect();
            model.forward(&mut steps)?.to_vec2::<f32>()?;
            let mut tokens: Vec<[u32; 1]> = (0..b as u32).map(|s| [100 + s]).collect();
            let t = Instant::now();
            for i in 0..ntg as u32 {
                let mut steps: Vec<Step> = tokens
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(t, c)| Step {
                        tokens: t,
                        cache: c,
                    })
                    .collect();
                let logits = model.forward(&mut steps)?.to_vec2::<f32>()?;
                for (s, (tok, row)) in tokens.iter_mut().zip(&logits).enumerate() {
                    tok[0] = 100 + (row.len() as u32 + i * 31 + s as u32) % (vocab - 200);
                }
            }
            best = best.max((b * ntg) as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "{{\"engine\":\"ganglion\",\"kind\":\"forward\",\"batch\":{b},\"npp\":{npp},\"ntg\":{ntg},\"decode_tps\":{best:.1}}}"
        );
    }
    drop(model);
    let config = EngineConfig {
        path: Some(path.into()),
        prefix_cache_mib: 0,
        max_batch: batches.iter().copied().max().unwrap_or(8),
        default_deadline_ms: 3_600_000,
        ..Default::default()
    };
    let (engine, _) = Engine::load_with_progress(&config, false)?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    for &b in &batches {
        let mut best = 0f64;
        for rep in 0..reps {
            let t = Instant::now();
            let requests: Vec<_> = (0..b)
                .map(|s| {
                    engine.generate(GenerateRequest {
                        input: LlmInput::Raw(format!(
                            "Story {rep}-{s}. Once upon a time, in a factory full of sensors,"
                        )),
                        params: GenerationParams {
                            max_tokens: ntg as u32,
                            ..Default::default()
                        },
                        rule: format!("rule-{s}"),
                    })
                })
                .collect();
            let mut tokens = 0u32;
            for r in requests {
                tokens += runtime.block_on(r)?.usage.completion_tokens;
            }
            best = best.max(tokens as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "{{\"engine\":\"ganglion\",\"kind\":\"engine\",\"batch\":{b},\"ntg\":{ntg},\"tps\":{best:.1}}}"
        );
    }
    Ok(())
}
