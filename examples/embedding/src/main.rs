//! Ganglion embedded in a gateway program, without MQTT.
//!
//! Readings arrive on a serial-style line protocol (`<device>,<celsius>` per
//! line, from stdin with `--stdin`, otherwise a generated sequence with a
//! machine running hot), go through a rule installed from code, and what the
//! rule publishes comes back on a channel. The plugins are the example
//! components (`cargo run -p xtask -- plugins` builds them into
//! target/plugins).
//!
//! `cargo run -p ganglion-embedding-example -- [--plugins DIR] [--stdin]`
//!
//! Exits with an error when the generated sequence raised no alert, so CI
//! can run it as a check.

use anyhow::{Context, Result, bail};
use ganglion::config::GanglionConfig;
use ganglion::llm::NoModel;
use ganglion::runtime::Runtime;
use ganglion::state::StateStore;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

/// Three readings per machine window; above 90 °C is critical.
const RULE: &str = r#"
topics = ["serial/+/temperature"]
format = "csv"
[csv]
columns = ["value"]
metric = "temperature"
unit = "C"
device_from_topic = 1
[window]
count = 3
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 90.0, level = "critical" }], topic = "alerts/{device}" }
[allow]
publish = ["alerts/{device}"]
"#;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plugins = args
        .iter()
        .position(|a| a == "--plugins")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/plugins"));
    let from_stdin = args.iter().any(|a| a == "--stdin");

    // Configuration in code: the same typed struct as ganglion.toml. No
    // rules folder and no watching: the rule is installed below.
    let mut config = GanglionConfig::default();
    config.plugins.dir = plugins;
    config.plugins.cache_dir = None;
    config.rules.dir = std::env::temp_dir().join("ganglion-embedding-example-no-rules");
    std::fs::create_dir_all(&config.rules.dir)?;
    config.reload.enabled = false;

    let loaded = Runtime::builder(config)
        .llm(Arc::new(NoModel))
        .state(StateStore::in_memory())
        .load()
        .await?;
    for p in &loaded.problems {
        eprintln!("not loaded: {p}");
    }
    let (runtime, mut outputs) = loaded.serve_channel(64);
    runtime
        .install_rule("serial-overheat", RULE)
        .await
        .context("installing the rule (are the example plugins built?)")?;

    let printer = tokio::spawn(async move {
        let mut alerts = 0;
        while let Some(out) = outputs.recv().await {
            println!(
                "-> {}  {}",
                out.topic,
                String::from_utf8_lossy(&out.payload)
            );
            alerts += usize::from(out.topic.starts_with("alerts/"));
        }
        alerts
    });

    let lines: Vec<String> = if from_stdin {
        std::io::stdin().lock().lines().collect::<Result<_, _>>()?
    } else {
        (0..12)
            .map(|i| {
                let (device, celsius) = if i % 2 == 0 {
                    ("press-1", 70.0 + f64::from(i) * 0.5)
                } else {
                    ("press-2", 85.0 + f64::from(i))
                };
                format!("{device},{celsius}")
            })
            .collect()
    };
    for line in &lines {
        let Some((device, value)) = line.split_once(',') else {
            eprintln!("skipped: `{line}` (expected <device>,<celsius>)");
            continue;
        };
        println!("<- {device} {value}");
        // Returns once the reading is handled (in a window, or its alert out).
        runtime
            .push(
                format!("serial/{}/temperature", device.trim()),
                value.trim().as_bytes().to_vec(),
            )
            .await?;
    }
    runtime.shutdown().await;
    drop(runtime);
    let alerts = printer.await?;
    println!("{} readings, {alerts} alerts", lines.len());
    if !from_stdin && alerts == 0 {
        bail!("the generated sequence has a machine above 90 °C, but no alert came");
    }
    Ok(())
}
