//! The README's demo, headless: `ganglion run --simulate` on the embedded
//! broker with the default model, the example rules and the scenario packs
//! of ganglion.toml, for half a minute. Every scenario publishes actions.

use ganglion_tests::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `rule: N messages, N readings, N published, N dead letters` lines of the
/// summary, by rule: (messages, published).
fn summary(stdout: &str) -> HashMap<String, (u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let (rule, rest) = l.split_once(": ")?;
            let n: Vec<u64> = rest
                .split(", ")
                .filter_map(|p| p.split(' ').next()?.parse().ok())
                .collect();
            (n.len() == 4 && !rule.contains(' ')).then(|| (rule.to_owned(), (n[0], n[2])))
        })
        .collect()
}

#[test]
fn the_demo_publishes_actions_for_every_scenario() {
    let root = xtask::root();
    let bin = root.join("target/debug/ganglion");
    assert!(
        bin.exists(),
        "{} is missing: `cargo run -p xtask -- test` builds it before the tests",
        bin.display()
    );
    built();
    let model = xtask::model_path();
    assert!(
        model.exists(),
        "the default model is missing: `cargo run -p xtask -- model`"
    );
    let dir = scratch("demo");
    let config = dir.join("ganglion.toml");
    // The repository's demo configuration, with its own broker port and
    // scratch state, cache and audit files. Its relative folders are made
    // absolute: in a config file they are relative to the file's folder.
    let repo = std::fs::read_to_string(root.join("ganglion.toml")).unwrap();
    let repo: toml::Table = toml::from_str(&repo).unwrap();
    let at_root =
        |v: &toml::Value| toml::Value::String(root.join(v.as_str().unwrap()).display().to_string());
    let rules_dir = at_root(&repo["rules"]["dir"]);
    let extra = toml::Value::Array(
        repo["rules"]["extra_dirs"]
            .as_array()
            .unwrap()
            .iter()
            .map(at_root)
            .collect(),
    );
    let text = format!(
        r#"
[plugins]
dir = "{plugins}"
cache_dir = "{dir}/compiled"

[state]
path = "{dir}/state.redb"

[rules]
dir = {rules_dir}
extra_dirs = {extra}

[mqtt]
client_id = "ganglion-demo-test"

[broker]
listen = "127.0.0.1:{port}"

[audit]
path = "{dir}/audit.jsonl"

[model]
path = "{model}"

# A shared 2-core CI machine can take longer than the default 8 s to finish
# the model calls in flight at the stop; a drain cut short exits 1 by design.
[runtime]
drain_timeout_ms = 120000
"#,
        dir = dir.display(),
        plugins = root.join("target/plugins").display(),
        port = free_port(),
        model = model.display(),
    );
    std::fs::write(&config, text).unwrap();
    let mut child = std::process::Command::new(&bin)
        .current_dir(&root)
        .args(["--config"])
        .arg(&config)
        .args(["run", "--simulate", "--duration", "30", "--quiet"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("the demo did not stop within 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let rules = summary(&stdout);
    for rule in [
        "machine-overheat",
        "machine-diagnosis",
        "congestion",
        "home-commands",
    ] {
        let (messages, published) = rules
            .get(rule)
            .copied()
            .unwrap_or_else(|| panic!("no summary for {rule}: {stdout}"));
        assert!(
            messages > 0 && published > 0,
            "{rule}: {messages} messages, {published} published\n{stdout}"
        );
    }
    // The model-backed decisions were recorded.
    let audit = ganglion::audit::read(&dir.join("audit.jsonl")).unwrap();
    for rule in ["machine-diagnosis", "home-commands"] {
        assert!(
            audit.iter().any(|r| r.rule == rule),
            "no decision of {rule} recorded"
        );
    }
}
