//! The same preprocessor (`clean-readings`) in Rust, Python, JavaScript and
//! C: load time with a cold artefact cache (Cranelift compiles the
//! component) and a warm one (the compiled artefact is mapped), the first
//! call (instantiation included) and the per-call cost on a typical payload.
//!
//! `cargo run -p xtask -- bench-polyglot` (builds the examples first)
//!
//! Calls run one after another on one instance; the figure is the median of
//! `CALLS` calls after `WARMUP`. Ratios are against Rust on the same run.

use ganglion::config::{Limits, PluginConfig};
use ganglion::llm::NoModel;
use ganglion::plugin::PluginHost;
use ganglion::state::StateStore;
use ganglion::types::{Message, ReadingBatch};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WARMUP: usize = 20;
const CALLS: usize = 200;

const PAYLOAD: &str = r#"{"device":"m1","ts":1764400000000,"readings":[{"metric":"temperature","value":70.7,"unit":"F"},{"metric":"humidity","value":45.5,"unit":"%"},{"metric":"pressure","value":1.013,"unit":"bar"},{"metric":"door","value":false}]}"#;

fn host(cache: &Path) -> PluginHost {
    let config = PluginConfig {
        cache_dir: Some(cache.to_path_buf()),
        limits: Limits {
            call_timeout_ms: 10_000,
            ..Limits::default()
        },
        ..PluginConfig::default()
    };
    PluginHost::new(config, StateStore::in_memory(), Arc::new(NoModel)).expect("plugin host")
}

struct Row {
    lang: &'static str,
    size: u64,
    cold: Duration,
    cached: Duration,
    first_call: Duration,
    per_call: Duration,
}

async fn measure(lang: &'static str, file: &Path, scratch: &Path) -> Row {
    let cache = scratch.join(lang);
    let _ = std::fs::remove_dir_all(&cache);
    let started = Instant::now();
    host(&cache).load_file(file).await.expect("cold load");
    let cold = started.elapsed();
    let warm = host(&cache);
    let started = Instant::now();
    let plugin = warm.load_file(file).await.expect("cached load");
    let cached = started.elapsed();
    let settings = serde_json::json!({"units": {"temperature": "C", "pressure": "hPa"}, "ranges": {"humidity": [0.0, 100.0]}});
    let pool = warm.pool(&plugin, "bench", settings.as_object().unwrap().clone());
    let message = Message {
        topic: "factory/m1/telemetry".into(),
        payload: PAYLOAD.as_bytes().to_vec(),
        timestamp: 0,
    };
    let started = Instant::now();
    let first = pool
        .preprocess(&message, ReadingBatch::default())
        .await
        .expect("first call");
    let first_call = started.elapsed();
    assert_eq!(first.readings.len(), 4, "{lang}: {first:?}");
    for _ in 0..WARMUP {
        pool.preprocess(&message, ReadingBatch::default())
            .await
            .unwrap();
    }
    let mut times = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let started = Instant::now();
        pool.preprocess(&message, ReadingBatch::default())
            .await
            .unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    Row {
        lang,
        size: std::fs::metadata(file).unwrap().len(),
        cold,
        cached,
        first_call,
        per_call: times[CALLS / 2],
    }
}

#[tokio::main]
async fn main() {
    let root = xtask::root();
    let scratch = root.join("target/bench-polyglot");
    let polyglot = xtask::polyglot_dir();
    let files: [(&str, PathBuf); 4] = [
        ("Rust", xtask::plugins_dir().join("clean-readings.wasm")),
        ("C", polyglot.join("c-clean-readings.wasm")),
        ("Python", polyglot.join("py-clean-readings.wasm")),
        ("JavaScript", polyglot.join("js-clean-readings.wasm")),
    ];
    let mut rows = Vec::new();
    for (lang, file) in &files {
        assert!(
            file.exists(),
            "{} is missing: run `cargo run -p xtask -- bench-polyglot`",
            file.display()
        );
        rows.push(measure(lang, file, &scratch).await);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let rust = ms(rows[0].per_call);
    println!(
        "| language | size | load, cold cache | load, cached | first call | per call | per call ÷ Rust |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1} MiB | {:.0} ms | {:.1} ms | {:.1} ms | {:.0} µs | {:.1}× |",
            r.lang,
            r.size as f64 / (1024.0 * 1024.0),
            ms(r.cold),
            ms(r.cached),
            ms(r.first_call),
            ms(r.per_call) * 1e3,
            ms(r.per_call) / rust
        );
    }
}
