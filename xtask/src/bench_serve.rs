//! `bench-serve-model`: `ganglion serve-model` against llama-cpp-python's
//! server on the default model.

use super::{cargo, json};
use anyhow::{Result, bail};
use std::process::Command;

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
pub(crate) fn bench_serve_model() -> Result<()> {
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
