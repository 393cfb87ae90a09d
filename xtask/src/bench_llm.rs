//! `bench-llm`: the engine beside llama.cpp (llama-cpp-python) on the default
//! model and on random-weight models; prefix reuse; batched decode.

use super::{cargo, json, run};
use anyhow::{Result, bail};
use std::process::Command;

/// The engine beside llama.cpp on the same GGUF, in one run: each thread
/// count alternates the two, three rounds, and the table shows the best of
/// each and their ratio (engine ÷ llama.cpp).
/// `cargo bench -q -p ganglion-llm --bench <bench> -- <model>`, run from the
/// repository root.
fn engine_bench(bench: &str, model: &std::path::Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // candle's own pool at one thread, as `ganglion run` sets it: the
    // engine's pool does the parallel work.
    cmd.current_dir(xtask::root())
        .env("CANDLE_NUM_THREADS", "1")
        .args(["bench", "-q", "-p", "ganglion-llm", "--bench", bench, "--"])
        .arg(model);
    cmd
}

pub(crate) fn bench_llm(rest: &[String]) -> Result<()> {
    let root = xtask::root();
    let model = match rest.first() {
        Some(p) => std::path::PathBuf::from(p),
        None => xtask::fetch_model()?,
    };
    // cargo runs benchmarks in the package folder.
    let model = std::path::absolute(&model)?;
    let python = xtask::ensure_llama_server()?;
    let venv = root.join("target/llamacpp");
    cargo(
        &[
            "bench",
            "-p",
            "ganglion-llm",
            "--bench",
            "llm_speed",
            "--no-run",
        ],
        &[] as &[&str],
    )?;
    // Random-weight files of two shapes in four formats, written once.
    let generated = root.join("target/bench-models");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "bench",
            "-q",
            "-p",
            "ganglion-llm",
            "--bench",
            "bench_models",
            "--",
        ])
        .arg(&generated)
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut rows = vec![(
        "SmolLM2-135M Q4_1 (the default model)".to_string(),
        model.clone(),
        1,
    )];
    rows.push((rows[0].0.clone(), model.clone(), 2));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let (Some(shape), Some(quant), Some(path)) =
            (v["shape"].as_str(), v["quant"].as_str(), v["path"].as_str())
        else {
            bail!("bench_models printed {line}");
        };
        rows.push((
            format!("{shape} {} (random)", quant.to_uppercase()),
            std::path::PathBuf::from(path),
            1,
        ));
    }
    let best = |a: f64, v: &serde_json::Value, k: &str| a.max(v[k].as_f64().unwrap_or(0.0));
    println!(
        "| model | threads | engine prefill tok/s | llama.cpp prefill tok/s | prefill ratio | engine decode tok/s | llama.cpp decode tok/s | decode ratio | read GB/s | decode bound tok/s | decode ÷ bound | resident ÷ file |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, path, threads) in &rows {
        let (mut ep, mut ed, mut lp, mut ld) = (0f64, 0f64, 0f64, 0f64);
        let mut last = serde_json::Value::Null;
        for _ in 0..3 {
            let ours = json(
                engine_bench("llm_speed", path)
                    .env("GANGLION_MODEL_THREADS", threads.to_string())
                    .output()?,
            )?;
            let theirs = json(
                Command::new(&python)
                    .arg(root.join("tests/benches/llama_cpp_speed.py"))
                    .arg(path)
                    .arg(threads.to_string())
                    .output()?,
            )?;
            ep = best(ep, &ours, "prefill_tps");
            ed = best(ed, &ours, "decode_tps");
            lp = best(lp, &theirs, "prefill_tps");
            ld = best(ld, &theirs, "decode_tps");
            last = ours;
        }
        let f = |k: &str| last[k].as_f64().unwrap_or(0.0);
        // The bound is one thread's read bandwidth, so it is shown for
        // one thread only.
        let bound = if *threads == 1 { f("bound_tps") } else { 0.0 };
        println!(
            "| {name} | {threads} | {ep:.0} | {lp:.0} | {:.2} | {ed:.1} | {ld:.1} | {:.2} | {} | {} | {} | {:.2} |",
            ep / lp,
            ed / ld,
            if bound > 0.0 {
                format!("{:.1}", f("bandwidth_gbs"))
            } else {
                "–".into()
            },
            if bound > 0.0 {
                format!("{bound:.0}")
            } else {
                "–".into()
            },
            if bound > 0.0 {
                format!("{:.2}", ed / bound)
            } else {
                "–".into()
            },
            f("resident_mib") / f("file_mib"),
        );
    }
    println!(
        "\ndecode bound: one thread's read bandwidth over a buffer the size of the weights a decode step reads (engine layout), divided by that size"
    );
    oversubscribed(&model, &python)?;
    // Time to first token with the rule's system message cached or not
    // (prompt-prefix KV reuse).
    let ttft = json(engine_bench("prefix_ttft", &model).output()?)?;
    println!("\nprefix reuse, time to first token: {ttft}");
    batched(&model, &venv)
}

/// Decode speed on the default model while other threads keep the cores
/// busy (standing in for plugin calls and the MQTT tasks), against the
/// same with the cores free: the engine's and llama.cpp's, same threads.
fn oversubscribed(model: &std::path::Path, python: &std::path::Path) -> Result<()> {
    let root = xtask::root();
    println!(
        "\n| model threads | busy threads | engine decode tok/s | llama.cpp decode tok/s | decode ratio | engine ÷ unloaded | llama.cpp ÷ unloaded |"
    );
    println!("|---|---|---|---|---|---|---|");
    for threads in [1usize, 2] {
        let mut unloaded = (0f64, 0f64);
        for busy in [0usize, 1, 2] {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let spinners: Vec<_> = (0..busy)
                .map(|_| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut x = 1u64;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                        }
                    })
                })
                .collect();
            let (mut ours, mut theirs) = (0f64, 0f64);
            for _ in 0..2 {
                let o = json(
                    engine_bench("llm_speed", model)
                        .env("GANGLION_MODEL_THREADS", threads.to_string())
                        .args(["16", "64", "3"])
                        .output()?,
                )?;
                let t = json(
                    Command::new(python)
                        .arg(root.join("tests/benches/llama_cpp_speed.py"))
                        .arg(model)
                        .arg(threads.to_string())
                        .args(["16", "64", "3"])
                        .output()?,
                )?;
                ours = ours.max(o["decode_tps"].as_f64().unwrap_or(0.0));
                theirs = theirs.max(t["decode_tps"].as_f64().unwrap_or(0.0));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for s in spinners {
                let _ = s.join();
            }
            if busy == 0 {
                unloaded = (ours, theirs);
            }
            println!(
                "| {threads} | {busy} | {ours:.1} | {theirs:.1} | {:.2} | {:.2} | {:.2} |",
                ours / theirs,
                ours / unloaded.0,
                theirs / unloaded.1
            );
        }
    }
    Ok(())
}

/// Aggregate decode speed at 1, 4 and 8 sequences: the engine's forward
/// pass and its scheduler against llama.cpp's `llama-batched-bench`, built
/// from the same llama.cpp as the single-stream comparison.
fn batched(model: &std::path::Path, venv: &std::path::Path) -> Result<()> {
    let root = xtask::root();
    let src = root.join("target/llamacpp-src");
    let tool = src.join("build/bin/llama-batched-bench");
    if !tool.exists() {
        let tree = src.join("llama.cpp");
        if !tree.join("CMakeLists.txt").exists() {
            std::fs::create_dir_all(&src)?;
            run(Command::new(venv.join("bin/pip"))
                .args([
                    "download",
                    "--no-deps",
                    "--no-binary",
                    "llama-cpp-python",
                    "llama-cpp-python==0.3.36",
                    "-d",
                ])
                .arg(&src))?;
            run(Command::new("tar")
                .arg("xzf")
                .arg(src.join("llama_cpp_python-0.3.36.tar.gz"))
                .arg("-C")
                .arg(&src)
                .arg("--strip-components=2")
                .arg("llama_cpp_python-0.3.36/vendor/llama.cpp"))?;
        }
        run(Command::new(venv.join("bin/pip")).args(["install", "cmake", "ninja"]))?;
        let path = format!(
            "{}:{}",
            venv.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new(venv.join("bin/cmake"))
            .env("PATH", &path)
            .arg("-S")
            .arg(&tree)
            .arg("-B")
            .arg(src.join("build"))
            .args([
                "-G",
                "Ninja",
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
                "-DLLAMA_BUILD_TOOLS=ON",
            ])
            .args(xtask::llama_cpu_flags().split(' ')))?;
        run(Command::new(venv.join("bin/cmake"))
            .env("PATH", &path)
            .arg("--build")
            .arg(src.join("build"))
            .args(["--target", "llama-batched-bench", "-j2"]))?;
    }
    cargo(
        &[
            "bench",
            "-p",
            "ganglion-llm",
            "--bench",
            "batch_decode",
            "--no-run",
        ],
        &[] as &[&str],
    )?;
    let lines = |out: std::process::Output| -> Result<Vec<serde_json::Value>> {
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    };
    let batches = [1u64, 4, 8];
    let (mut forward, mut engine, mut llama) = ([0f64; 3], [0f64; 3], [0f64; 3]);
    let slot = |b: u64| batches.iter().position(|&x| x == b);
    // Alternating rounds, best of each: the machine is shared.
    for _ in 0..3 {
        for v in lines(
            engine_bench("batch_decode", model)
                .args(["128", "64", "1,4,8", "1"])
                .output()?,
        )? {
            let Some(i) = v["batch"].as_u64().and_then(slot) else {
                continue;
            };
            match v["kind"].as_str() {
                Some("forward") => {
                    forward[i] = forward[i].max(v["decode_tps"].as_f64().unwrap_or(0.0))
                }
                Some("engine") => engine[i] = engine[i].max(v["tps"].as_f64().unwrap_or(0.0)),
                _ => {}
            }
        }
        for v in lines(
            Command::new(&tool)
                .arg("-m")
                .arg(model)
                .args([
                    "-c",
                    "2048",
                    "-b",
                    "2048",
                    "-ub",
                    "512",
                    "-npp",
                    "128",
                    "-ntg",
                    "64",
                    "-npl",
                    "1,4,8",
                    "-t",
                    "2",
                    "-tb",
                    "2",
                    "--output-format",
                    "jsonl",
                ])
                .output()?,
        )? {
            if let Some(i) = v["pl"].as_u64().and_then(slot) {
                llama[i] = llama[i].max(v["speed_tg"].as_f64().unwrap_or(0.0));
            }
        }
    }
    println!(
        "\n| sequences | engine forward decode tok/s | engine scheduler tok/s | llama-batched-bench S_TG tok/s | forward ÷ llama.cpp | forward ÷ own single stream |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, b) in batches.iter().enumerate() {
        println!(
            "| {b} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            forward[i],
            engine[i],
            llama[i],
            forward[i] / llama[i],
            forward[i] / forward[0]
        );
    }
    Ok(())
}
