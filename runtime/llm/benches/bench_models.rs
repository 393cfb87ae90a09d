//! Writes the random-weight GGUF files the kernel benchmark runs on:
//! SmolLM2-135M and Qwen2.5-0.5B shapes in Q4_0, Q5_0, Q8_0 and Q4_K_M
//! (llama.cpp's recipe, with its fallbacks for rows that are not a multiple
//! of 256). Files already there are kept; one JSON line per file.
//!
//! `cargo bench -p ganglion-llm --bench bench_models -- DIR`

use candle_core::quantized::GgmlDType;
use ganglion_llm::testing::{Mix, TinySpec, write_tiny_model};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(dir) = args.first() else {
        anyhow::bail!("usage: bench_models DIR");
    };
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir)?;
    let smollm2 = TinySpec {
        arch: "llama",
        width: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        feed_forward: 1536,
        context: 2048,
        tied: true,
        pre: "smollm",
        vocab: 49152,
        rope_base: 100_000.0,
        ..TinySpec::default()
    };
    let qwen = TinySpec {
        arch: "qwen2",
        width: 896,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        feed_forward: 4864,
        context: 2048,
        tied: true,
        pre: "qwen2",
        vocab: 151936,
        rope_base: 1_000_000.0,
        ..TinySpec::default()
    };
    let quants = [
        ("q4_0", GgmlDType::Q4_0, Mix::Uniform),
        ("q5_0", GgmlDType::Q5_0, Mix::Uniform),
        ("q8_0", GgmlDType::Q8_0, Mix::Uniform),
        ("q4_k_m", GgmlDType::Q4K, Mix::Q4KM),
    ];
    for (shape, spec) in [("smollm2-135m", &smollm2), ("qwen2.5-0.5b", &qwen)] {
        for (quant, dtype, mix) in quants {
            let path = dir.join(format!("{shape}-{quant}.gguf"));
            if !path.exists() {
                let spec = TinySpec {
                    dtype,
                    mix,
                    ..spec.clone()
                };
                let part = path.with_extension("part");
                write_tiny_model(&part, &spec)?;
                std::fs::rename(&part, &path)?;
            }
            println!(
                "{{\"shape\":\"{shape}\",\"quant\":\"{quant}\",\"path\":{:?}}}",
                path.display().to_string()
            );
        }
    }
    Ok(())
}
