//! One stage call on a reused instance against the same logic compiled
//! natively, for 1 and 100 readings. Prints a Markdown table with ratios.
//!
//! `cargo bench -p ganglion --bench stage_call`
//!
//! Then what the instance pool adds to a call (taking an instance and
//! giving it back) against calls on one instance held by the caller, as a
//! lane holding its own instance would make them; and the call path alone,
//! on a component that imports nothing and returns its argument: a sync
//! call against an async one (a fiber switch in and out) on the same
//! engine, which is what a sync path for plugins would save per call.
//!
//! Each figure is the median over 31 samples of the mean time per call in a
//! sample (each sample runs for about 20 ms). Native and wasm run alternately
//! in the same process, so machine noise hits both alike.
//!
//! With `STAGE_CALL_PROFILE` set to `preprocess` (clean-readings),
//! `postprocess` (threshold-alert, no breach) or `postprocess-alert` (one
//! breach), it instead makes that one call, on one reading, through the
//! pool, for `STAGE_CALL_SECONDS` (default 8), with the plugins named for
//! perf (`[plugins] perf_map_max_bytes`), and prints the time per call:
//!
//! ```sh
//! cargo bench -p ganglion --bench stage_call --no-run
//! STAGE_CALL_PROFILE=postprocess perf record -F 5000 -o stage.data -- target/release/deps/stage_call-<hash>
//! perf report -i stage.data --no-children --sort dso,symbol | python3 runtime/benches/perf_breakdown.py
//! ```

use ganglion::config::{Limits, PluginConfig};
use ganglion::llm::NoModel;
use ganglion::plugin::PluginHost;
use ganglion::state::StateStore;
use ganglion::types::{Context, Message, ReadingBatch, Value};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SAMPLES: usize = 31;
const SAMPLE_TIME: Duration = Duration::from_millis(20);

/// Median time per call of `f`.
fn measure(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < SAMPLE_TIME {
        f();
        n += 1;
    }
    let per_sample = n.max(1);
    let mut samples: Vec<Duration> = (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_sample {
                f();
            }
            t.elapsed() / per_sample
        })
        .collect();
    samples.sort();
    samples[SAMPLES / 2]
}

fn payload(n: usize) -> String {
    let readings: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"metric":"temperature","value":{:.2},"unit":"F","ts":{}}}"#,
                70.0 + i as f64 * 0.1,
                1_700_000_000_000i64 + i as i64
            )
        })
        .collect();
    format!(
        r#"{{"device":"machine-1","readings":[{}]}}"#,
        readings.join(",")
    )
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        format!("{us:.2} µs")
    } else {
        format!("{us:.1} µs")
    }
}

fn main() {
    xtask::build_plugins().expect("building plugins");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let profile = std::env::var("STAGE_CALL_PROFILE").ok();
    let config = PluginConfig {
        cache_dir: None,
        limits: Limits::default(),
        total_instances: 16,
        perf_map_max_bytes: if profile.is_some() { 64 << 20 } else { 0 },
        ..Default::default()
    };
    let host = PluginHost::new(config, StateStore::in_memory(), Arc::new(NoModel)).unwrap();
    let load = |name: &str| {
        rt.block_on(host.load_file(&xtask::plugins_dir().join(format!("{name}.wasm"))))
            .unwrap()
    };

    let clean_json = serde_json::json!({ "units": { "temperature": "C" }, "ranges": { "temperature": [-40.0, 150.0] } });
    let clean_pool = host.pool(
        &load("clean-readings"),
        "bench",
        clean_json.as_object().cloned().unwrap(),
    );
    let clean_native: clean_readings::Config = serde_json::from_value(clean_json).unwrap();

    let alert_json =
        serde_json::json!({ "thresholds": [{ "metric": "temperature", "above": 90.0 }] });
    let alert_pool = host.pool(
        &load("threshold-alert"),
        "bench",
        alert_json.as_object().cloned().unwrap(),
    );
    let alert_native =
        threshold_alert::Config::validate(serde_json::from_value(alert_json.clone()).unwrap())
            .unwrap();
    if let Some(call) = profile {
        profile_one(&rt, &call, &clean_pool, &alert_pool);
        return;
    }

    println!("| stage call | readings | native | wasm (reused instance) | ratio wasm ÷ native |");
    println!("|---|---:|---:|---:|---:|");
    for n in [1usize, 100] {
        let p = payload(n);
        let msg = Message {
            topic: "factory/machine-1/telemetry".into(),
            payload: p.clone().into_bytes(),
            timestamp: 0,
        };
        let sdk_msg = ganglion_sdk::Message {
            topic: msg.topic.clone(),
            payload: msg.payload.clone(),
            timestamp: 0,
        };

        let out = rt
            .block_on(clean_pool.preprocess(&msg, ReadingBatch::default()))
            .unwrap();
        assert_eq!(out.len(), n);
        let native = measure(|| {
            let r = clean_readings::clean(
                black_box(&sdk_msg),
                ganglion_sdk::ReadingBatch::default(),
                &clean_native,
                |_| true,
            );
            black_box(r.unwrap());
        });
        let wasm = measure(|| {
            black_box(
                rt.block_on(clean_pool.preprocess(black_box(&msg), ReadingBatch::default()))
                    .unwrap(),
            );
        });
        println!(
            "| clean-readings (preprocess) | {n} | {} | {} | {:.2}× |",
            fmt(native),
            fmt(wasm),
            wasm.as_secs_f64() / native.as_secs_f64()
        );

        // A window of n readings, a tenth of them over the bound.
        let mut window = ReadingBatch::default();
        let mut sdk_window = ganglion_sdk::batch::BatchBuilder::new();
        for i in 0..n {
            let v = if i % 10 == 9 {
                95.0
            } else {
                20.0 + i as f64 * 0.1
            };
            window.push("machine-1", "temperature", Value::Number(v), "C", i as i64);
            sdk_window.push(
                "machine-1",
                "temperature",
                ganglion_sdk::Value::Number(v),
                "C",
                i as i64,
            );
        }
        let sdk_window = sdk_window.finish();
        let ctx = Context {
            rule: "bench".into(),
            device: "machine-1".into(),
            window_start: 0,
            window_end: n as i64,
        };
        let native = measure(|| {
            // Cloned on both sides: the host hands windows over by value.
            black_box(threshold_alert::check(
                &alert_native,
                &black_box(sdk_window.clone()),
            ));
        });
        let wasm = measure(|| {
            black_box(
                rt.block_on(alert_pool.postprocess(black_box(&ctx), window.clone(), None))
                    .unwrap(),
            );
        });
        println!(
            "| threshold-alert (postprocess) | {n} | {} | {} | {:.2}× |",
            fmt(native),
            fmt(wasm),
            wasm.as_secs_f64() / native.as_secs_f64()
        );
    }
    pool_overhead(
        &rt,
        &host,
        &alert_pool,
        alert_json.as_object().cloned().unwrap(),
    );
    call_path(host.engine());
}

/// One stage call on one reading, repeated for `STAGE_CALL_SECONDS`, for a
/// profiler to sample.
fn profile_one(
    rt: &tokio::runtime::Runtime,
    call: &str,
    clean: &ganglion::plugin::InstancePool,
    alert: &ganglion::plugin::InstancePool,
) {
    let seconds: u64 = std::env::var("STAGE_CALL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let msg = Message {
        topic: "factory/machine-1/telemetry".into(),
        payload: payload(1).into_bytes(),
        timestamp: 0,
    };
    // threshold-alert's bound is 90: 95 breaks it, 70 does not.
    let value = if call == "postprocess-alert" {
        95.0
    } else {
        70.0
    };
    let mut window = ReadingBatch::default();
    window.push("machine-1", "temperature", Value::Number(value), "C", 0);
    let ctx = Context {
        rule: "bench".into(),
        device: "machine-1".into(),
        window_start: 0,
        window_end: 1,
    };
    let start = Instant::now();
    let mut calls = 0u64;
    rt.block_on(async {
        while start.elapsed() < Duration::from_secs(seconds) {
            for _ in 0..1000 {
                match call {
                    "preprocess" => {
                        black_box(clean.preprocess(&msg, ReadingBatch::default()).await.unwrap());
                    }
                    "postprocess" | "postprocess-alert" => {
                        let actions = alert.postprocess(&ctx, window.clone(), None).await.unwrap();
                        assert_eq!(actions.len(), usize::from(value > 90.0));
                    }
                    other => panic!(
                        "STAGE_CALL_PROFILE={other}: expected preprocess, postprocess or postprocess-alert"
                    ),
                }
            }
            calls += 1000;
        }
    });
    println!(
        "{call}: {} per call over {calls} calls",
        fmt(start.elapsed() / calls as u32)
    );
}

/// threshold-alert at one reading through its pool (take, call, give
/// back) and on one instance the caller holds, alternately.
fn pool_overhead(
    rt: &tokio::runtime::Runtime,
    host: &PluginHost,
    pool: &ganglion::plugin::InstancePool,
    config: serde_json::Map<String, serde_json::Value>,
) {
    use ganglion::host::{BindingCtx, Exports, Instance};
    let engine = host.engine();
    let path = xtask::plugins_dir().join("threshold-alert.wasm");
    let component = wasmtime::component::Component::from_file(engine, path).unwrap();
    let mut linker = wasmtime::component::Linker::new(engine);
    ganglion::host::add_to_linker(&mut linker).unwrap();
    let exports = Exports::new(linker.instantiate_pre(&component).unwrap());
    let binding = Arc::new(BindingCtx {
        plugin: "threshold-alert".into(),
        version: "bench".into(),
        rule: "bench".into(),
        config_json: serde_json::Value::Object(config.clone()).to_string(),
        config,
        state: StateStore::in_memory().scope("threshold-alert", "bench"),
        limits: Limits::default(),
        grants: Default::default(),
        llm: Arc::new(NoModel),
        suppressed_logs: Default::default(),
    });
    let mut held = rt
        .block_on(Instance::new(engine, &exports, binding))
        .unwrap();
    let mut window = ReadingBatch::default();
    window.push("machine-1", "temperature", Value::Number(95.0), "C", 0);
    let ctx = Context {
        rule: "bench".into(),
        device: "machine-1".into(),
        window_start: 0,
        window_end: 1,
    };
    let (mut pooled, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        pooled.push(measure(|| {
            black_box(
                rt.block_on(pool.postprocess(black_box(&ctx), window.clone(), None))
                    .unwrap(),
            );
        }));
        direct.push(measure(|| {
            black_box(
                rt.block_on(held.postprocess(black_box(&ctx), window.clone(), None))
                    .unwrap(),
            );
        }));
    }
    pooled.sort();
    direct.sort();
    let (pooled, direct) = (pooled[2], direct[2]);
    println!("\n| threshold-alert, 1 reading | time per call |");
    println!("|---|---:|");
    println!(
        "| through the pool (take, call, give back) | {} |",
        fmt(pooled)
    );
    println!("| on an instance the caller holds | {} |", fmt(direct));
    println!(
        "\npool − held: {} per call",
        fmt(pooled.saturating_sub(direct))
    );
}

/// A sync call and an async call of the same identity export, each on a
/// store of its own in `engine` (pooling, epoch interruption), as a stage
/// call makes them but for lowering and checking real values.
fn call_path(engine: &wasmtime::Engine) {
    use wasmtime::component::{Component, Linker};
    const IDENTITY: &str = r#"(component
        (core module $m (func (export "f") (param i32) (result i32) local.get 0))
        (core instance $i (instantiate $m))
        (func (export "f") (param "x" u32) (result u32) (canon lift (core func $i "f"))))"#;
    let component = Component::new(engine, IDENTITY).unwrap();
    let linker = Linker::<()>::new(engine);

    let mut sync_store = wasmtime::Store::new(engine, ());
    sync_store.set_epoch_deadline(u64::MAX / 2);
    let instance = linker.instantiate(&mut sync_store, &component).unwrap();
    let f = instance
        .get_typed_func::<(u32,), (u32,)>(&mut sync_store, "f")
        .unwrap();
    let sync = measure(|| {
        black_box(f.call(&mut sync_store, (black_box(7),)).unwrap());
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut async_store = wasmtime::Store::new(engine, ());
    async_store.set_epoch_deadline(u64::MAX / 2);
    let instance = rt
        .block_on(linker.instantiate_async(&mut async_store, &component))
        .unwrap();
    let g = instance
        .get_typed_func::<(u32,), (u32,)>(&mut async_store, "f")
        .unwrap();
    // 100 calls per `block_on`, as a lane task makes them one after
    // another, so that entering the executor is not counted.
    let asynchronous = measure(|| {
        rt.block_on(async {
            for _ in 0..100 {
                black_box(
                    g.call_async(&mut async_store, (black_box(7),))
                        .await
                        .unwrap(),
                );
            }
        })
    }) / 100;
    println!("\n| call path (identity export, no imports) | time per call |");
    println!("|---|---:|");
    println!("| sync `call` | {} |", fmt(sync));
    println!("| async `call_async` (fiber) | {} |", fmt(asynchronous));
    println!(
        "\nasync − sync: {} per call",
        fmt(asynchronous.saturating_sub(sync))
    );
}
