use ganglion_llm::gguf::GgufFile;
use ganglion_llm::model::{KvCache, Model, Step};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let path = &args[0];
    let mut gguf = GgufFile::open(std::path::Path::new(path))?;
    let model = Model::load(&mut gguf, &candle_core::Device::Cpu, |_, _| {})?;
    let vocab = model.config.vocab as u32;
    let batches: Vec<usize> = std::env::var("BATCHES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or(vec![1, 4, 8]);
    for batch in batches {
        let mut caches = vec![KvCache::default(); batch];
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|b| {
                (0..64u32)
                    .map(|i| 100 + (i * 7919 + b as u32 * 13) % (vocab - 200))
                    .collect()
            })
            .collect();
        for (p, c) in prompts.iter().zip(caches.iter_mut()) {
            model.forward(&mut [Step {
                tokens: p,
                cache: c,
            }])?;
        }
        let steps_n = 32;
        let t = Instant::now();
        let toks: Vec<[u32; 1]> = (0..batch).map(|b| [200 + b as u32]).collect();
        for _ in 0..steps_n {
            let mut steps: Vec<Step> = toks
                .iter()
                .zip(caches.iter_mut())
                .map(|(t, c)| Step {
                    tokens: t,
                    cache: c,
                })
                .collect();
            let l = model.forward(&mut steps)?;
            let _ = l.to_vec2::<f32>()?;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "batch {batch}: {:.1} tok/s aggregate, {:.1} ms/step",
            (batch * steps_n) as f64 / s,
            s * 1000.0 / steps_n as f64
        );
    }
    Ok(())
}

#[allow(dead_code)]
fn kernel_only() {}
