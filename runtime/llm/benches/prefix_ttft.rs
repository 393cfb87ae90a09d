//! Time to first token with and without prompt-prefix KV reuse: a rule's
//! fixed system message of about 500 tokens, then a short user message that
//! changes per request. "Cached": the engine has served one request with
//! the same system message before; "uncached": `prefix_cache_mib = 0`.
//!
//! `cargo bench -p ganglion-llm --bench prefix_ttft -- $PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf [REPS]`
//! (an absolute path: cargo runs benchmarks in the package folder)
//!
//! Prints one JSON line: median milliseconds to the first token of each, the
//! ratio, and the prompt and cached token counts.

use ganglion_llm::{Engine, EngineConfig, GenerateRequest, GenerationParams};
use std::time::Instant;

fn request(system: &str, user: &str) -> GenerateRequest {
    let params = GenerationParams {
        max_tokens: 1,
        ..Default::default()
    };
    GenerateRequest::system_and_user(system, user, params, "bench")
}

fn system_message(engine: &Engine, tokens: u32) -> String {
    let mut text = String::from(
        "You are the controller of a factory floor. Answer with one JSON action.\nDevices:\n",
    );
    let mut i = 0;
    while engine.count_tokens(&text).unwrap_or(0) < tokens {
        text.push_str(&format!(
            "- press-{i}: hydraulic press, bay {}, alert above 90 C, service every {} days\n",
            i % 7,
            30 + i % 11
        ));
        i += 1;
    }
    text
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(path) = args.first() else {
        anyhow::bail!("usage: prefix_ttft MODEL.gguf [REPS]");
    };
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(7);
    let load = |mib: usize| -> anyhow::Result<Engine> {
        let config = EngineConfig {
            path: Some(path.into()),
            prefix_cache_mib: mib,
            ..Default::default()
        };
        Ok(Engine::load_with_progress(&config, false)?.0)
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let (cached, plain) = (load(256)?, load(0)?);
    let system = system_message(&cached, 500);
    let ttft = |engine: &Engine, user: String| -> anyhow::Result<(f64, u32, u32)> {
        let t = Instant::now();
        let c = runtime.block_on(engine.generate(request(&system, &user)))?;
        Ok((
            t.elapsed().as_secs_f64() * 1e3,
            c.usage.prompt_tokens,
            c.usage.cached_tokens,
        ))
    };
    ttft(&cached, "warm-up: press-0 reads 71 C".into())?;
    ttft(&plain, "warm-up: press-0 reads 71 C".into())?;
    let (mut hit, mut miss) = (Vec::new(), Vec::new());
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    for r in 0..reps {
        let user = format!("press-{r} reads {} C", 80 + r);
        let (ms, p, c) = ttft(&cached, user.clone())?;
        hit.push(ms);
        (prompt_tokens, cached_tokens) = (p, c);
        miss.push(ttft(&plain, user)?.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (hit, miss) = (median(&mut hit), median(&mut miss));
    println!(
        "{}",
        serde_json::json!({
            "prompt_tokens": prompt_tokens,
            "cached_tokens": cached_tokens,
            "ttft_uncached_ms": (miss * 10.0).round() / 10.0,
            "ttft_cached_ms": (hit * 10.0).round() / 10.0,
            "speedup": (miss / hit * 10.0).round() / 10.0,
        })
    );
    Ok(())
}
