//! Gateways as real processes for the fault and scale-out tests: a folder
//! with `ganglion.toml`, plugins and rules, and `ganglion run` started in it.

use crate::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A folder with `ganglion.toml`, the plugins and the rules for one test.
pub fn gateway_dir(
    name: &str,
    broker: &str,
    plugins: &[(&str, PathBuf)],
    rules: &[(&str, &str)],
) -> PathBuf {
    gateway_dir_with(name, broker, plugins, rules, "")
}

/// As [`gateway_dir`], with more `[mqtt]` keys.
pub fn gateway_dir_with(
    name: &str,
    broker: &str,
    plugins: &[(&str, PathBuf)],
    rules: &[(&str, &str)],
    mqtt: &str,
) -> PathBuf {
    gateway_dir_tables(name, broker, plugins, rules, mqtt, "")
}

/// As [`gateway_dir_with`], with more tables at the end of `ganglion.toml`
/// (`[rules.limits]`, `[plugins.limits]`, ...).
pub fn gateway_dir_tables(
    name: &str,
    broker: &str,
    plugins: &[(&str, PathBuf)],
    rules: &[(&str, &str)],
    mqtt: &str,
    tables: &str,
) -> PathBuf {
    gateway_dir_as(name, name, broker, plugins, rules, mqtt, tables)
}

/// As [`gateway_dir_tables`], with `client_id` apart from the folder's name
/// (gateways of one share group use one id, each its own folder).
pub fn gateway_dir_as(
    name: &str,
    client_id: &str,
    broker: &str,
    plugins: &[(&str, PathBuf)],
    rules: &[(&str, &str)],
    mqtt: &str,
    tables: &str,
) -> PathBuf {
    let dir = scratch(name);
    for d in ["plugins", "rules"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    for (n, from) in plugins {
        std::fs::copy(from, dir.join("plugins").join(format!("{n}.wasm"))).unwrap();
    }
    for (n, text) in rules {
        std::fs::write(dir.join("rules").join(format!("{n}.toml")), text).unwrap();
    }
    std::fs::write(
        dir.join("ganglion.toml"),
        format!(
            r#"
[plugins]
dir = "{d}/plugins"
cache_dir = "{d}/compiled"

[state]
path = "{d}/state.redb"

[rules]
dir = "{d}/rules"

[mqtt]
broker = "{broker}"
client_id = "{client_id}"
{mqtt}

[reload]
enabled = false

[audit]
enabled = false

{tables}
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    dir
}

/// Starts `ganglion run` in `dir` and waits until its rules are ready.
pub fn start_gateway(dir: &Path) -> (Child, StderrLines) {
    start_gateway_with(dir, &[])
}

/// As [`start_gateway`], with more arguments to `ganglion run`.
pub fn start_gateway_with(dir: &Path, args: &[&str]) -> (Child, StderrLines) {
    let mut child = Command::new(ganglion_binary())
        .current_dir(dir)
        .arg("--config")
        .arg(dir.join("ganglion.toml"))
        .args(["run", "--quiet"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    assert!(
        stderr.wait_for("connected to the MQTT broker", Duration::from_secs(60)),
        "the gateway did not connect: {}",
        stderr.text()
    );
    (child, stderr)
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
