//! A plugin that brings its own model against the host's engine:
//! `minilm-classify` (all-MiniLM-L6-v2 on candle compiled to wasm32 with
//! SIMD128, in the sandbox) and the host's native `embed` (the same model
//! on candle, native code) on the same texts.
//!
//! `cargo run -p xtask -- bench-byo-model --profile dev` (builds the
//! plugins and fetches the model first)
//!
//! Load: a fresh artefact cache (Cranelift compiles the component) and a
//! second host reading the compiled artefact. First call: instantiation,
//! reading the weights from the granted folder, embedding the label
//! phrases. Per call: one utterance per call, the median over every
//! utterance of `ROUNDS` rounds after one warm-up round; the wasm side
//! labels it (embedding plus a few dot products), the host side embeds it.
//! Memory: the instance's linear memory after the calls, against the
//! growth of the process's resident set when the host engine loads the
//! embedding model. Ratios are against the host on the same run.

use ganglion::config::{DirGrant, Grants, Limits, PluginConfig, PluginLimits};
use ganglion::llm::{LlmEngine, NoModel};
use ganglion::plugin::PluginHost;
use ganglion::state::StateStore;
use ganglion::types::{Message, ReadingBatch, Value};
use ganglion_llm::testing::{TinySpec, write_tiny_model};
use ganglion_llm::{Engine, EngineConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;

const UTTERANCES: [&str; 12] = [
    "it's too warm in the bedroom",
    "smoke detected in kitchen",
    "it is freezing in here",
    "it is too dark to read",
    "good night, turn everything off",
    "it is stuffy and humid in here",
    "I smell gas in the garage",
    "the room is cold, close the window",
    "lights off please, I'm leaving",
    "nice weather today",
    "unlock the front door",
    "switch on the fan",
];

fn host(cache: &Path) -> PluginHost {
    let config = PluginConfig {
        cache_dir: Some(cache.to_path_buf()),
        limits: Limits {
            max_plugin_memory_mib: 256,
            max_plugin_timeout_ms: 600_000,
            ..Limits::default()
        },
        ..PluginConfig::default()
    };
    PluginHost::new(config, StateStore::in_memory(), Arc::new(NoModel)).expect("plugin host")
}

/// Resident set of this process, in bytes (Linux).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn speech(text: &str) -> ReadingBatch {
    let mut b = ReadingBatch::default();
    b.push("kitchen", "speech", Value::Text(text.into()), "", 0);
    b
}

#[tokio::main]
async fn main() {
    let root = xtask::root();
    let plugin_file = xtask::model_plugins_dir().join("minilm-classify.wasm");
    let model = xtask::embedding_path();
    assert!(
        plugin_file.exists() && model.join("model.safetensors").exists(),
        "run `cargo run -p xtask -- bench-byo-model` (builds the plugin, fetches the model)"
    );
    let scratch = root.join("target/bench-byo-model");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    // The host engine first, so that its resident-set growth is not
    // hidden by memory the plugin host freed.
    let tiny = scratch.join("tiny.gguf");
    write_tiny_model(&tiny, &TinySpec::default()).unwrap();
    let before = rss();
    let started = Instant::now();
    let engine = Engine::load_with_progress(
        &EngineConfig {
            path: Some(tiny),
            embedding: Some(model.clone()),
            ..Default::default()
        },
        false,
    )
    .expect("host engine")
    .0;
    let host_load = started.elapsed();
    let host_bytes = rss().saturating_sub(before);
    let mut host_times = Vec::new();
    for round in 0..=ROUNDS {
        for text in UTTERANCES {
            let started = Instant::now();
            LlmEngine::embed(&engine, vec![text.to_string()])
                .await
                .unwrap();
            if round > 0 {
                host_times.push(started.elapsed());
            }
        }
    }
    let host_call = median(host_times);

    let cache = scratch.join("cache");
    let started = Instant::now();
    host(&cache)
        .load_file(&plugin_file)
        .await
        .expect("cold load");
    let cold = started.elapsed();
    let plugins = host(&cache);
    let started = Instant::now();
    let plugin = plugins.load_file(&plugin_file).await.expect("cached load");
    let cached = started.elapsed();
    let grants = Grants {
        dirs: vec![DirGrant {
            host: model,
            guest: "/model".into(),
            write: false,
        }],
        ..Grants::default()
    };
    let settings = serde_json::json!({
        "labels": {
            "command": ["turn on the light", "switch off the fan", "open the window", "it is too warm in here"],
            "alarm": ["smoke detected", "I smell gas", "there is a fire"],
            "chatter": ["nice weather today", "how was your day"],
        },
        "label_metric": "label",
    });
    let limits = PluginLimits {
        max_memory_mib: Some(160),
        call_timeout_ms: Some(600_000),
        load_timeout_ms: Some(600_000),
    };
    let pool = plugins
        .pool_for_rule(
            &plugin,
            "bench",
            settings.as_object().unwrap().clone(),
            grants,
            &limits,
        )
        .expect("pool");
    let message = Message {
        topic: "home/kitchen/say".into(),
        payload: b"{}".to_vec(),
        timestamp: 0,
    };
    let started = Instant::now();
    pool.preprocess(&message, speech(UTTERANCES[0]))
        .await
        .expect("first call");
    let first_call = started.elapsed();
    let mut wasm_times = Vec::new();
    for round in 0..=ROUNDS {
        for text in UTTERANCES {
            let started = Instant::now();
            pool.preprocess(&message, speech(text)).await.unwrap();
            if round > 0 {
                wasm_times.push(started.elapsed());
            }
        }
    }
    let wasm_call = median(wasm_times);
    let stats = pool.stats();
    assert_eq!(stats.created, 1, "one instance, kept warm");

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "component {:.1} MiB; wasm load: cold {:.0} ms, cached {:.0} ms; first call {:.0} ms; host engine load {:.0} ms",
        mib(std::fs::metadata(&plugin_file).unwrap().len()),
        ms(cold),
        ms(cached),
        ms(first_call),
        ms(host_load)
    );
    println!("| | per call (median) | memory | per call ÷ host | memory ÷ host |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| host `embed` (native) | {:.2} ms | {:.0} MiB (RSS growth) | 1.0× | 1.0× |",
        ms(host_call),
        mib(host_bytes)
    );
    println!(
        "| minilm-classify (wasm, SIMD128) | {:.2} ms | {:.0} MiB (linear memory) | {:.1}× | {:.2}× |",
        ms(wasm_call),
        mib(stats.peak_memory_bytes),
        ms(wasm_call) / ms(host_call),
        stats.peak_memory_bytes as f64 / host_bytes.max(1) as f64
    );
    println!(
        "load: cold ÷ cached {:.0}×; first call ÷ per call {:.0}×",
        ms(cold) / ms(cached),
        ms(first_call) / ms(wasm_call)
    );
}
