//! The `ganglion` command.

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use ganglion::config::GanglionConfig;
use ganglion::llm::NoModel;
use ganglion::plugin::{InstancePool, PluginHost};
use ganglion::state::StateStore;
use ganglion::types::{Action, Context, Message, ReadingBatch, Stage};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "ganglion",
    version,
    about = "IoT gateway runtime: WebAssembly plugins and a local LLM over MQTT rules"
)]
struct Cli {
    /// Configuration file; defaults apply when it does not exist.
    #[arg(long, global = true, default_value = "ganglion.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report what components implement and whether they load under the configured limits.
    Check {
        /// Component files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Replay the bundled machine-temperature series through the example plugins
    /// (clean-readings → hourly window → threshold-alert) and print the actions.
    Demo {
        /// CSV of timestamp,value (default: the bundled NAB machine temperature series).
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Alert above this temperature, °C.
        #[arg(long, default_value_t = 38.0)]
        above: f64,
        /// Readings per window.
        #[arg(long, default_value_t = 12)]
        window: usize,
    },
}

fn load_config(path: &Path) -> Result<GanglionConfig> {
    if path.exists() {
        Ok(GanglionConfig::load(path)?)
    } else {
        Ok(GanglionConfig::default())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = load_config(&cli.config)?;
    match cli.command {
        Command::Check { files } => check(config, files).await,
        Command::Demo { csv, above, window } => demo(config, csv, above, window).await,
    }
}

async fn check(config: GanglionConfig, files: Vec<PathBuf>) -> Result<()> {
    let limits = config.plugins.limits.clone();
    let host = PluginHost::new(config.plugins, StateStore::in_memory(), Arc::new(NoModel))?;
    let mut failed = 0;
    for file in files {
        match host.load_file(&file).await {
            Ok(p) => {
                let stages: Vec<&str> = p.stages.iter().map(|s| s.name()).collect();
                println!("{}: ok", file.display());
                println!("  name      {}", p.name);
                println!("  version   {}", p.version);
                println!("  stages    {}", stages.join(", "));
                println!("  imports   {}", p.imports.join(", "));
                println!("  size      {} bytes", p.size);
                println!("  load      {:?} ({:?})", p.load_time, p.compiled);
                println!(
                    "  limits    instantiates within {} ms and {} MiB",
                    limits.call_timeout_ms, limits.max_memory_mib
                );
            }
            Err(e) => {
                failed += 1;
                println!("{}: REFUSED\n  {e}", file.display());
            }
        }
    }
    if failed > 0 {
        bail!("{failed} file(s) refused");
    }
    Ok(())
}

async fn demo(
    config: GanglionConfig,
    csv: Option<PathBuf>,
    above: f64,
    window: usize,
) -> Result<()> {
    let csv = csv.unwrap_or_else(|| {
        PathBuf::from("examples/data/nab/machine_temperature_system_failure.csv")
    });
    let text =
        std::fs::read_to_string(&csv).with_context(|| format!("reading {}", csv.display()))?;
    let dir = config.plugins.dir.clone();
    let state = StateStore::open(&config.state.path, config.state.limits())?;
    let host = PluginHost::new(config.plugins, state, Arc::new(NoModel))?;
    let report = host
        .load_dir(&dir)
        .await
        .with_context(|| format!("loading plugins from {}", dir.display()))?;
    for e in &report.errors {
        eprintln!("plugin refused: {e}");
    }
    let find = |name: &str| {
        report.plugins.iter().find(|p| p.name == name).cloned().with_context(|| {
            format!("plugin `{name}` not found in {} (build them with `cargo run -p xtask -- plugins`)", dir.display())
        })
    };
    let rule = "demo-machine-temperature";
    let clean_cfg = serde_json::json!({ "units": { "temperature": "C" }, "ranges": { "temperature": [-40.0, 150.0] } });
    let clean = host.pool(
        &find("clean-readings")?,
        rule,
        clean_cfg.as_object().cloned().unwrap_or_default(),
    );
    let alert_cfg = serde_json::json!({ "thresholds": [{ "metric": "temperature", "above": above, "level": "critical" }] });
    let alert = host.pool(
        &find("threshold-alert")?,
        rule,
        alert_cfg.as_object().cloned().unwrap_or_default(),
    );
    for p in [&clean, &alert] {
        println!(
            "{} {} ({})",
            p.plugin().name,
            p.plugin().version,
            p.plugin()
                .stages
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(",")
        );
    }

    let started = Instant::now();
    let (mut messages, mut readings, mut alerts, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut current = ReadingBatch::default();
    for line in text.lines().skip(1) {
        let Some((ts, value)) = line.split_once(',') else {
            continue;
        };
        let payload = format!(
            r#"{{"device":"machine-1","metric":"temperature","value":"{value}","unit":"F","ts":"{ts}"}}"#
        );
        let message = Message {
            topic: "factory/machine-1/telemetry".into(),
            payload: payload.into_bytes(),
            timestamp: 0,
        };
        messages += 1;
        let batch = match clean.preprocess(&message, ReadingBatch::default()).await {
            Ok(b) => b,
            Err(e) => {
                errors += 1;
                eprintln!("{ts}: dead letter ({}): {e}", e.kind());
                continue;
            }
        };
        readings += batch.len() as u64;
        for r in batch.iter() {
            current.push(r.device, r.metric, r.value.clone(), r.unit, r.timestamp);
        }
        if current.len() < window {
            continue;
        }
        let win = std::mem::take(&mut current);
        let ctx = Context {
            rule: rule.into(),
            device: "machine-1".into(),
            window_start: win.readings.first().map_or(0, |r| r.timestamp),
            window_end: win.readings.last().map_or(0, |r| r.timestamp),
        };
        match alert.postprocess(&ctx, win, None).await {
            Ok(actions) => {
                for a in actions {
                    if let Action::Alert { level, text, .. } = a {
                        alerts += 1;
                        println!("{ts}  {level:?}  {text}");
                    }
                }
            }
            Err(e) => {
                errors += 1;
                eprintln!("{ts}: dead letter ({}): {e}", e.kind());
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{messages} messages, {readings} readings kept, {alerts} alerts, {errors} errors in {secs:.2} s ({:.0} msg/s through {} and {} stages)",
        messages as f64 / secs,
        Stage::Preprocessor,
        Stage::Postprocessor
    );
    print_pool("clean-readings", &clean);
    print_pool("threshold-alert", &alert);
    Ok(())
}

fn print_pool(name: &str, pool: &InstancePool) {
    let s = pool.stats();
    println!(
        "{name}: {} instance(s) created, {} discarded",
        s.created, s.discarded
    );
}
