//! llama-cpp-python's server and the openai client, installed into
//! target/llamacpp for the remote engine's tests and benches.

use crate::root;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The llama-cpp-python release built for `bench-llm` and the remote
/// engine's test.
pub const LLAMA_CPP_PYTHON: &str = "0.3.36";

/// llama.cpp's CPU build flags (`CMAKE_ARGS`) for this machine, the same
/// for llama-cpp-python and the batched bench: each x86 extension on when
/// /proc/cpuinfo lists it, AMX always off. `GGML_NATIVE` would pick the
/// extensions too, but also AMX on hosts that advertise it without enabling
/// it, where its tile instructions fault; and fixed AVX-512 flags fault on
/// CPUs without it (an "Illegal instruction" at model load).
pub fn llama_cpu_flags() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has: std::collections::BTreeSet<&str> = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let mut flags = vec!["-DGGML_NATIVE=OFF".to_string()];
    for (ggml, cpu_flag) in [
        ("AVX", "avx"),
        ("AVX2", "avx2"),
        ("FMA", "fma"),
        ("F16C", "f16c"),
        ("BMI2", "bmi2"),
        ("AVX512", "avx512f"),
        ("AVX512_VNNI", "avx512_vnni"),
        ("AVX512_VBMI", "avx512vbmi"),
        ("AVX512_BF16", "avx512_bf16"),
    ] {
        let on = if has.contains(cpu_flag) { "ON" } else { "OFF" };
        flags.push(format!("-DGGML_{ggml}={on}"));
    }
    for amx in ["AMX_TILE", "AMX_INT8", "AMX_BF16"] {
        flags.push(format!("-DGGML_{amx}=OFF"));
    }
    flags.join(" ")
}

/// The Python of the virtual environment in target/llamacpp.
pub fn llama_python() -> PathBuf {
    root().join("target/llamacpp/bin/python")
}

fn llama_server_imports(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import llama_cpp, llama_cpp.server.app"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// llama-cpp-python with its OpenAI-compatible server (`python -m
/// llama_cpp.server`) in target/llamacpp: a virtual environment, then
/// `pip install llama-cpp-python[server]` from PyPI, llama.cpp built from
/// source with [`llama_cpu_flags`] and without the multimodal library
/// (5 minutes on 2 idle cores; again only for another version or CPU).
/// The server's dependencies (fastapi, uvicorn, sse-starlette,
/// pydantic-settings, starlette-context) come as wheels. Returns the
/// environment's Python.
pub fn ensure_llama_server() -> Result<PathBuf> {
    let python = llama_python();
    let venv = root().join("target/llamacpp");
    // One build at a time: `.ci/run` starts one in the background while
    // the Rust builds run, and the test task then waits here for it (or,
    // had it failed, builds again and says why).
    std::fs::create_dir_all(root().join("target"))?;
    let lock = std::fs::File::create(root().join("target/llamacpp.lock"))?;
    lock.lock().context("locking target/llamacpp.lock")?;
    // What the build was made with: another version or other CPU flags
    // (a target folder copied from another machine) build again.
    let stamp = venv.join("ganglion-build");
    // Without the multimodal (llava/mtmd) library, which the server does
    // not need for text (the whole build: 5 minutes on 2 idle cores).
    let cmake_args = format!("{} -DLLAVA_BUILD=OFF", llama_cpu_flags());
    let wanted = format!("llama-cpp-python[server]=={LLAMA_CPP_PYTHON} {cmake_args}\n");
    let built = std::fs::read_to_string(&stamp).unwrap_or_default();
    if built == wanted && llama_server_imports(&python) {
        return Ok(python);
    }
    if !python.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("running python3 -m venv for llama-cpp-python")?;
        if !status.success() {
            bail!("python3 -m venv {} failed", venv.display());
        }
    }
    eprintln!(
        "building llama-cpp-python {LLAMA_CPP_PYTHON} from source into {} (5 minutes on 2 idle cores, more beside other builds)",
        venv.display()
    );
    let status = Command::new(&python)
        .env("CMAKE_ARGS", &cmake_args)
        .args([
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--force-reinstall",
            "--no-binary",
            "llama-cpp-python",
        ])
        .arg(format!("llama-cpp-python[server]=={LLAMA_CPP_PYTHON}"))
        .status()
        .context("running pip in target/llamacpp")?;
    if !status.success() || !llama_server_imports(&python) {
        bail!(
            "llama-cpp-python[server]=={LLAMA_CPP_PYTHON} did not install into {} (needs python3 with venv, a C++ compiler and PyPI)",
            venv.display()
        );
    }
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// The `openai` Python client the `serve-model` test and bench speak with.
pub const OPENAI_PYTHON: &str = "3.63.0";

/// [`ensure_llama_server`]'s environment with the `openai` client
/// ([`OPENAI_PYTHON`], from PyPI, a few seconds) in it too. Returns the
/// environment's Python.
pub fn ensure_openai_client() -> Result<PathBuf> {
    let python = ensure_llama_server()?;
    let lock = std::fs::File::create(root().join("target/llamacpp.lock"))?;
    lock.lock().context("locking target/llamacpp.lock")?;
    let check = format!("import openai, sys; sys.exit(openai.__version__ != '{OPENAI_PYTHON}')");
    let present = |python: &Path| {
        Command::new(python)
            .args(["-c", &check])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if present(&python) {
        return Ok(python);
    }
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--no-cache-dir", "-q"])
        .arg(format!("openai=={OPENAI_PYTHON}"))
        .status()
        .context("running pip in target/llamacpp")?;
    if !status.success() || !present(&python) {
        bail!("openai=={OPENAI_PYTHON} did not install into target/llamacpp (needs PyPI)");
    }
    Ok(python)
}
