//! `ganglion init [DIR]`: a gateway folder to run from anywhere, outside
//! the repository: `ganglion.toml` with paths relative to itself, `rules/`
//! with one example rule, `plugins/` with the example plugins when built
//! ones can be found, and a README saying what to do next.

use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};

/// The example rule copied into `rules/`: it needs only the
/// `clean-readings` and `threshold-alert` plugins, no model.
const EXAMPLE_RULE: &str = include_str!("../../../examples/rules/machine-overheat.toml");

const CONFIG: &str = r#"# Made by `ganglion init`. Relative paths are relative to this file's
# folder, so `ganglion --config /path/to/this/ganglion.toml run` works from
# any working directory. Every key: docs/host.md, docs/rules.md,
# docs/operations.md.

[plugins]
dir = "plugins"
cache_dir = ".ganglion/compiled"
cache_max_bytes = 1073741824
cache_max_age_days = 30

[state]
path = ".ganglion/state.redb"

[rules]
dir = "rules"

[mqtt]
# broker = "mqtt://127.0.0.1:1883"   # unset: the embedded broker below
client_id = "ganglion"
# username = "gw"
# password_file = "mqtt-password"    # or password_env = "MQTT_PASSWORD"
# output_connection = "shared"       # with mosquitto and `broker` set: outputs on one socket

[broker]
listen = "127.0.0.1:1883"

# [model]
# path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"

# The model for other tools on the gateway, OpenAI-compatible
# (`ganglion serve-model` serves it alone).
# [serve]
# enabled = true
# listen = "127.0.0.1:8089"

[audit]
path = ".ganglion/audit.jsonl"

[runtime]
drain_timeout_ms = 8000
"#;

const README: &str = r#"# A Ganglion gateway

Made by `ganglion init`.

- `ganglion.toml`: the configuration; its relative paths are relative to
  its own folder.
- `rules/`: rule files; `machine-overheat.toml` is an example (alerts when a
  machine's temperature runs high over its last 12 readings).
- `plugins/`: WebAssembly components the rules name. `ganglion new` and
  `ganglion build` make more.
- `.ganglion/`: state, compiled components and the audit log (made at the
  first run).

Run it (the embedded broker on 127.0.0.1:1883, with simulated sensors):

    ganglion --config ganglion.toml run --simulate

Against your broker: set `[mqtt] broker` (and the credentials), or give
`--broker mqtts://host:8883`. See docs/operations.md in the Ganglion
repository for TLS, secrets, logs, signals and running as a service.
"#;

/// Where built example plugins may be: beside an installed binary
/// (`<prefix>/share/ganglion/plugins`, as the Docker image has them), or
/// the repository this binary was built in (`target/plugins`, made by
/// `cargo run -p xtask -- plugins`).
fn example_plugins() -> Option<PathBuf> {
    let installed = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("share/ganglion/plugins")));
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/plugins");
    installed
        .into_iter()
        .chain([built])
        .find(|dir| wasm_files(dir).is_some_and(|f| !f.is_empty()))
}

fn wasm_files(dir: &Path) -> Option<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    files.sort();
    Some(files)
}

/// Scaffolds `dir` (created if missing; refused unless empty) and returns
/// the files made, relative to it. `plugins` overrides where the example
/// plugins are copied from.
pub(crate) fn init(dir: &Path, plugins: Option<&Path>) -> Result<Vec<PathBuf>> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("{} is not a readable folder", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty: `ganglion init` makes a new gateway folder and overwrites nothing",
                dir.display()
            );
        }
    }
    let source = match plugins {
        Some(p) => Some(p.to_owned()),
        None => example_plugins(),
    };
    let wasm = match &source {
        Some(p) => wasm_files(p)
            .with_context(|| format!("cannot read the plugins folder {}", p.display()))?,
        None => Vec::new(),
    };
    for sub in ["rules", "plugins"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let mut made = Vec::new();
    let mut write = |name: &str, text: &str| -> Result<()> {
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("writing {}", dir.join(name).display()))?;
        made.push(PathBuf::from(name));
        Ok(())
    };
    write("ganglion.toml", CONFIG)?;
    write("rules/machine-overheat.toml", EXAMPLE_RULE)?;
    write("README.md", README)?;
    write(".gitignore", ".ganglion/\n")?;
    for file in wasm {
        let name = Path::new("plugins").join(file.file_name().unwrap_or_default());
        std::fs::copy(&file, dir.join(&name))
            .with_context(|| format!("copying {}", file.display()))?;
        made.push(name);
    }
    Ok(made)
}
