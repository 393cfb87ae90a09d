//! The `ganglion` command.

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use ganglion::config::GanglionConfig;
use ganglion::gateway::{Gateway, GatewayEvent, RuleStats};
use ganglion::llm::NoModel;
use ganglion::plugin::PluginHost;
use ganglion::reload::ReloadEvent;
use ganglion::runtime::Runtime;
use ganglion::simulate::{self, SimConfig, Source};
use ganglion::state::StateStore;
use ganglion::{broker, mqtt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    /// Run the rules over MQTT: load plugins and rules, connect (or start the
    /// embedded broker), process until Ctrl-C or SIGTERM, then drain (within
    /// `[runtime] drain_timeout_ms`) and exit.
    Run {
        /// Broker to use instead of the configured one (mqtt://host:port or mqtts://).
        #[arg(long)]
        broker: Option<String>,
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password: Option<String>,
        /// CA certificate (PEM) for mqtts://.
        #[arg(long)]
        ca_file: Option<String>,
        /// MQTT version to speak to the broker: 3.1.1 or 5.
        #[arg(long, value_parser = ["3.1.1", "5"])]
        mqtt_version: Option<String>,
        /// Also run simulated sensors against the broker.
        #[arg(long)]
        simulate: bool,
        /// Simulated messages per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// Print only the per-rule summary lines, not every event.
        #[arg(long)]
        quiet: bool,
    },
    /// Publish simulated sensor telemetry to a broker.
    Simulate {
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        /// Synthetic devices (machines and rooms).
        #[arg(long, default_value_t = 8)]
        devices: usize,
        /// Every n-th reading of a device is an anomaly (0: none).
        #[arg(long, default_value_t = 50)]
        anomaly_every: u64,
        /// Replay this CSV (timestamp,value) instead of synthetic data.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Topic, device, metric and unit of the replayed series.
        #[arg(long, default_value = "factory/machine-1/telemetry")]
        topic: String,
        #[arg(long, default_value = "machine-1")]
        device: String,
        #[arg(long, default_value = "temperature")]
        metric: String,
        #[arg(long, default_value = "F")]
        unit: String,
        /// Messages per second (0: as fast as the broker takes them).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        duration: Option<u64>,
        /// Broker login (with --password).
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password: Option<String>,
    },
    /// Take the decisions recorded in an audit log again through the current
    /// plugins, rules and model, and report which changed (or, with
    /// --export-finetune, write the recorded prompt/completion pairs instead).
    Replay {
        /// The audit log (JSON lines, as written under [audit]).
        log: PathBuf,
        /// Write chat-format training pairs here instead of replaying.
        #[arg(long)]
        export_finetune: Option<PathBuf>,
    },
    /// Start a plugin project: sources for the stage in the language, the
    /// WIT, a manifest and test input; `ganglion build` builds it.
    New {
        /// Plugin name (lowercase, digits, dashes): the component's file
        /// stem, which rules refer to.
        name: String,
        /// rust, python, js or c.
        #[arg(long, default_value = "rust")]
        lang: String,
        /// preprocess, template, postprocess or handler (the world names
        /// preprocessor, prompt-template, postprocessor and rule work too).
        #[arg(long, default_value = "preprocess")]
        stage: String,
        /// Folder to create (default: ./<name>).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The Ganglion SDK folder, for Rust (default: the one this binary
        /// was built beside).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin project (made by `ganglion new`) into <name>.wasm.
    Build {
        /// The project folder.
        #[arg(default_value = ".")]
        project: PathBuf,
    },
    /// Call one stage of a plugin on JSON cases (one per line) and print one
    /// outcome per line: how to test a plugin without a broker or rule.
    Call {
        /// The component.
        file: PathBuf,
        /// JSON lines, one case each (see docs/plugins.md); `-` reads stdin.
        #[arg(long)]
        cases: PathBuf,
        /// The plugin's settings, as the rule's `config` table would give
        /// them, as a JSON object.
        #[arg(long, default_value = "{}")]
        settings: String,
        /// preprocess, template, postprocess or handler (or the world's
        /// name); needed only when the plugin implements more than one.
        #[arg(long)]
        stage: Option<String>,
        /// Load the configured model, for plugins that call `llm`.
        #[arg(long)]
        model: bool,
    },
    /// Report what components implement and whether they load under the configured limits.
    Check {
        /// Component files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn load_config(path: &Path) -> Result<GanglionConfig> {
    if path.to_string_lossy().trim_start().starts_with('{') {
        bail!(
            "--config takes the path of ganglion.toml; give a plugin's settings as JSON with `call --settings`"
        );
    }
    if path.exists() {
        Ok(GanglionConfig::load(path)?)
    } else {
        Ok(GanglionConfig::default())
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let config = load_config(&cli.config)?;
    // candle's own compute pool is process-wide and sized from the
    // environment on first use: one thread, since the engine's pool
    // (`[model] threads`) does the parallel work and candle's workers,
    // which spin between operations, would compete with it. Set while
    // this is the only thread.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet, so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.worker_threads())
        .enable_all()
        .build()?;
    let result = runtime.block_on(async_main(cli, config));
    // Work a drain cut short by its limit left behind (a lane waiting on the
    // broker, a plugin call on a blocking thread) must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn async_main(cli: Cli, config: GanglionConfig) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Check { files } => check(config, files).await,
        Command::New {
            name,
            lang,
            stage,
            dir,
            sdk,
        } => {
            let options = ganglion_tools::project::NewOptions {
                dir: dir.unwrap_or_else(|| PathBuf::from(&name)),
                name,
                lang: lang.parse()?,
                world: stage.parse()?,
                sdk,
            };
            let files = ganglion_tools::project::new_project(&options)?;
            println!(
                "created {} ({} {}):",
                options.dir.display(),
                options.lang,
                options.world.stage()
            );
            for f in files {
                println!("  {}", f.display());
            }
            println!(
                "next: cd {} && ganglion build && ganglion call {}.wasm --cases test-input.jsonl",
                options.dir.display(),
                options.name
            );
            Ok(())
        }
        Command::Build { project } => {
            let built = tokio::task::spawn_blocking(move || ganglion_tools::build::build(&project))
                .await??;
            println!(
                "built {} ({} {}, {} bytes) in {:.1?}",
                built.component.display(),
                built.manifest.lang,
                built.manifest.world,
                built.size,
                built.time
            );
            Ok(())
        }
        Command::Call {
            file,
            cases,
            settings,
            stage,
            model,
        } => call(config, file, cases, settings, stage, model).await,
        Command::Replay {
            log,
            export_finetune,
        } => replay(config, log, export_finetune).await,
        Command::Run {
            broker,
            username,
            password,
            ca_file,
            mqtt_version,
            simulate,
            rate,
            duration,
            quiet,
        } => {
            let mut config = config;
            match mqtt_version.as_deref() {
                Some("5") => config.mqtt.protocol = mqtt::Protocol::V5,
                Some(_) => config.mqtt.protocol = mqtt::Protocol::V311,
                None => {}
            }
            if broker.is_some() {
                config.mqtt.broker = broker;
            }
            config.mqtt.username = username.or(config.mqtt.username);
            config.mqtt.password = password.or(config.mqtt.password);
            config.mqtt.ca_file = ca_file.or(config.mqtt.ca_file);
            let sim = simulate.then_some(SimConfig {
                source: Source::Synthetic {
                    devices: 8,
                    anomaly_every: 12,
                    seed: 1,
                },
                rate,
                count: None,
                duration: None,
                login: None,
            });
            run(config, sim, duration.map(Duration::from_secs), quiet).await
        }
        Command::Simulate {
            broker,
            devices,
            anomaly_every,
            csv,
            topic,
            device,
            metric,
            unit,
            rate,
            count,
            duration,
            username,
            password,
        } => {
            let source = match csv {
                Some(path) => Source::Csv {
                    path,
                    topic,
                    device,
                    metric,
                    unit,
                },
                None => Source::Synthetic {
                    devices,
                    anomaly_every,
                    seed: 1,
                },
            };
            let (host, port) = simulate::host_port(&broker)
                .with_context(|| format!("broker address `{broker}`: expected mqtt://host:port"))?;
            let config = SimConfig {
                source,
                rate,
                count,
                duration: duration.map(Duration::from_secs),
                login: username
                    .zip(password)
                    .map(|(username, password)| broker::Login { username, password }),
            };
            let acked = simulate::run(&config, &host, port, "ganglion-simulator").await?;
            println!("{acked} messages published and acknowledged");
            Ok(())
        }
    }
}

/// Replays of the scenario packs' sample data for `--simulate`, for the
/// packs whose rules are loaded (paths relative to the repository root):
/// the NAB machine temperature series as `machine-9` at half the synthetic
/// rate, road occupancy for the traffic pack at a tenth of it, utterances
/// for the smart-home pack every five seconds.
fn pack_simulations(
    rules: &[Arc<ganglion::rules::Rule>],
    rate: f64,
) -> Vec<(SimConfig, &'static str)> {
    let takes = |topic: &str| rules.iter().any(|r| r.matches(topic));
    let mut out = Vec::new();
    let machine = PathBuf::from("examples/data/nab/machine_temperature_system_failure.csv");
    if takes("factory/machine-9/telemetry") && machine.exists() {
        let source = Source::Csv {
            path: machine,
            topic: "factory/machine-9/telemetry".into(),
            device: "machine-9".into(),
            metric: "temperature".into(),
            unit: "F".into(),
        };
        out.push((sim_config(source, rate / 2.0), "ganglion-simulator-machine"));
    }
    let occupancy = PathBuf::from("examples/data/nab/occupancy_6005.csv");
    if takes("traffic/6005/occupancy") && occupancy.exists() {
        let source = Source::Csv {
            path: occupancy,
            topic: "traffic/6005/occupancy".into(),
            device: "6005".into(),
            metric: "occupancy".into(),
            unit: "%".into(),
        };
        out.push((
            sim_config(source, (rate / 10.0).max(0.5)),
            "ganglion-simulator-traffic",
        ));
    }
    let speech = PathBuf::from("examples/packs/smart-home/data/utterances.jsonl");
    if takes("home/kitchen/say") && speech.exists() {
        let source = Source::Speech { path: speech };
        out.push((sim_config(source, 0.2), "ganglion-simulator-home"));
    }
    out
}

fn sim_config(source: Source, rate: f64) -> SimConfig {
    SimConfig {
        source,
        rate,
        count: None,
        duration: None,
        login: None,
    }
}

async fn run(
    mut config: GanglionConfig,
    sim: Option<SimConfig>,
    duration: Option<Duration>,
    quiet: bool,
) -> Result<()> {
    // First, so that a stop asked while the model and plugins load is
    // taken once serving starts rather than killing the process.
    let (stop_asked, stopping) = watch_signals(StopSignals::new()?);
    let loaded = Runtime::builder(config.clone()).load().await?;
    for p in &loaded.problems {
        tracing::error!("{p}");
    }
    let rules = loaded.rules();
    if rules.is_empty() {
        if !config.reload.enabled {
            bail!(
                "no rule is ready to run (rules in {}, plugins in {})",
                config.rules.dir.display(),
                config.plugins.dir.display()
            );
        }
        tracing::warn!(rules = %config.rules.dir.display(), plugins = %config.plugins.dir.display(), "no rule is ready to run yet; waiting for rule and plugin files");
    }
    for r in &rules {
        tracing::info!(rule = %r.name, topics = ?r.topics, plugins = ?r.plugins(), "rule ready");
    }
    let broker = match config.mqtt.broker.clone() {
        Some(b) => b,
        None => {
            let embedded = broker::start(&config.broker, &config.mqtt)?;
            tracing::info!(listen = %embedded.listen, login = ?embedded.login.as_ref().map(|l| &l.username), "embedded broker started");
            if let Some(login) = embedded.login {
                config.mqtt.username = Some(login.username);
                config.mqtt.password = Some(login.password);
            }
            format!("mqtt://{}", embedded.listen)
        }
    };
    // The simulators log in as the gateway does.
    let login = config
        .mqtt
        .username
        .clone()
        .zip(config.mqtt.password.clone())
        .map(|(username, password)| broker::Login { username, password });
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mqtt = Arc::new(mqtt::GatewayLink::connect(
        &config.mqtt,
        &broker,
        loaded.topic_filters(),
        tx,
    )?);
    let mut asked = stop_asked.clone();
    tokio::select! {
        up = mqtt.wait_connected(Duration::from_secs(10)) => if !up {
            tracing::warn!(%broker, "not connected yet; messages flow once the broker answers");
        },
        // Stop asked while connecting: serve_until below stops at once.
        _ = asked.wait_for(Option::is_some) => {}
    }
    let runtime = loaded.serve(mqtt.clone());
    let status = tokio::spawn(ganglion::reload::publish_events(
        runtime.reload_events(),
        mqtt.clone(),
        format!("{}/reload", config.mqtt.status_topic()),
    ));
    let view = tokio::spawn(live_view(
        runtime.events(),
        runtime.reload_events(),
        runtime.gateway().clone(),
        quiet,
    ));
    let mut simulations: Vec<(SimConfig, &str)> = Vec::new();
    if let Some(sim) = sim {
        simulations.extend(pack_simulations(&rules, sim.rate));
        simulations.push((sim, "ganglion-simulator"));
    }
    for (sim, _) in &mut simulations {
        sim.login = login.clone();
    }
    let simulator: Vec<_> = match simulate::host_port(&broker) {
        Some((h, p)) => simulations
            .into_iter()
            .map(|(sim, client)| {
                let h = h.clone();
                tokio::spawn(async move {
                    if let Err(e) = simulate::run(&sim, &h, p, client).await {
                        tracing::error!(error = %e, client, "simulator stopped");
                    }
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let limit = config.runtime.drain_timeout();
    let stopped_at = std::cell::Cell::new(None);
    let stop = async {
        let mut asked = stop_asked.clone();
        let why = tokio::select! {
            Ok(s) = asked.wait_for(Option::is_some) => s.unwrap_or("signal"),
            () = sleep_or_forever(duration) => {
                stopping.store(true, Ordering::SeqCst);
                "--duration"
            }
        };
        stopped_at.set(Some(Instant::now()));
        tracing::info!(
            by = why,
            limit_ms = config.runtime.drain_timeout_ms,
            "stopping: draining in-flight messages (a second signal exits at once)"
        );
        for s in &simulator {
            s.abort();
        }
    };
    let drained = runtime.serve_until_within(rx, stop, limit).await;
    view.abort();
    status.abort();
    print_summary(&runtime.stats());
    if !drained {
        bail!(
            "stopped before the drain finished ([runtime] drain_timeout_ms = {}); messages not finished stay unacknowledged for the broker to deliver again",
            config.runtime.drain_timeout_ms
        );
    }
    // A DISCONNECT needs a connection: with the broker down the event loops
    // would only go on retrying. Bounded by what is left of the limit.
    let left = limit.saturating_sub(stopped_at.get().map_or(Duration::ZERO, |t| t.elapsed()));
    if (mqtt.intake.is_connected() || mqtt.output.is_connected())
        && tokio::time::timeout(left, mqtt.disconnect()).await.is_err()
    {
        tracing::warn!("the broker did not take the disconnect within the drain limit");
    }
    tracing::info!("drained; stopped");
    Ok(())
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The signals that stop `ganglion run`: SIGINT (Ctrl-C) and, on Unix,
/// SIGTERM, which systemd, docker and Kubernetes send to stop a service.
struct StopSignals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Takes the signals over from their default action (ending the process).
    fn new() -> Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                int: signal(SignalKind::interrupt()).context("handling SIGINT")?,
                term: signal(SignalKind::terminate()).context("handling SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// The next signal: its name and the exit status that tells it (128 +
    /// its number, as a shell reports a process the signal killed).
    async fn next(&mut self) -> (&'static str, i32) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.int.recv() => ("SIGINT", 130),
                _ = self.term.recv() => ("SIGTERM", 143),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            ("Ctrl-C", 130)
        }
    }
}

/// Watches the stop signals for the whole run. The first one (or the end
/// of `--duration`, which sets the flag) asks for a stop with a drain, and
/// is published on the returned channel; one more while stopping exits at
/// once, with the signal's status: the operator's way out of a drain.
fn watch_signals(
    mut signals: StopSignals,
) -> (
    tokio::sync::watch::Receiver<Option<&'static str>>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let (asked, rx) = tokio::sync::watch::channel(None);
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stopping.clone();
    tokio::spawn(async move {
        loop {
            let (name, status) = signals.next().await;
            if flag.swap(true, Ordering::SeqCst) {
                tracing::error!(
                    signal = name,
                    "second stop signal: exiting without finishing the drain; messages not finished stay unacknowledged for the broker to deliver again"
                );
                std::process::exit(status);
            }
            let _ = asked.send(Some(name));
        }
    });
    (rx, stopping)
}

fn print_summary(stats: &[(String, Arc<RuleStats>)]) {
    for (rule, s) in stats {
        println!(
            "{rule}: {} messages, {} readings, {} published, {} dead letters",
            s.messages.load(Ordering::Relaxed),
            s.readings.load(Ordering::Relaxed),
            s.published.load(Ordering::Relaxed),
            s.dead_letters.load(Ordering::Relaxed)
        );
    }
}

/// Prints what the gateway does as it happens, reloads, and per-rule rates every 5 s.
async fn live_view(
    mut events: tokio::sync::broadcast::Receiver<GatewayEvent>,
    mut reloads: tokio::sync::broadcast::Receiver<ReloadEvent>,
    gateway: Arc<Gateway>,
    quiet: bool,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut shown: HashMap<String, Instant> = HashMap::new();
    let started = Instant::now();
    loop {
        tokio::select! {
            r = reloads.recv() => match r {
                Ok(r) => {
                    let what = format!("{:?} {:?} {}", r.kind, r.action, r.name).to_lowercase();
                    match (&r.version, &r.error) {
                        (_, Some(e)) => println!("[reload] {what}: {}", one_line(e)),
                        (Some(v), None) => println!("[reload] {what} version {v} {}", r.rules.join(", ")),
                        (None, None) => println!("[reload] {what}"),
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
            e = events.recv() => match e {
                Ok(e) if !quiet => match e {
                    // One reading per rule and second: enough to see what comes in.
                    GatewayEvent::Received { rule, topic, payload } => {
                        if shown.get(&rule).is_none_or(|t: &Instant| t.elapsed() >= Duration::from_secs(1)) {
                            println!("[{rule}] reading     {topic}  {}", one_line(&payload));
                            shown.insert(rule, Instant::now());
                        }
                    }
                    GatewayEvent::Prompt { rule, text } => println!("[{rule}] prompt      {}", one_line(&text)),
                    GatewayEvent::Completion { rule, text } => println!("[{rule}] completion  {}", one_line(&text)),
                    GatewayEvent::Published { rule, topic, payload } => println!("[{rule}] publish     {topic}  {}", one_line(&payload)),
                    GatewayEvent::DeadLetter { rule, stage, kind, reason } => println!("[{rule}] DEAD LETTER {stage}/{kind}: {}", one_line(&reason)),
                },
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => println!("({n} events not shown)"),
                Err(_) => return,
            },
            _ = tick.tick() => {
                for (rule, s) in gateway.stats() {
                    let m = s.messages.load(Ordering::Relaxed);
                    let before = last.insert(rule.clone(), m).unwrap_or(0);
                    println!(
                        "-- {:>5.0}s {rule}: {:.1} msg/s, {m} messages, {} readings, {} published, {} dead letters",
                        started.elapsed().as_secs_f64(),
                        (m - before) as f64 / 5.0,
                        s.readings.load(Ordering::Relaxed),
                        s.published.load(Ordering::Relaxed),
                        s.dead_letters.load(Ordering::Relaxed)
                    );
                }
            }
        }
    }
}

fn one_line(s: &str) -> String {
    let flat: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    if flat.chars().count() > 160 {
        format!("{}…", flat.chars().take(160).collect::<String>())
    } else {
        flat
    }
}

async fn replay(config: GanglionConfig, log: PathBuf, export: Option<PathBuf>) -> Result<()> {
    let records = ganglion::audit::read(&log).map_err(anyhow::Error::msg)?;
    if let Some(out) = export {
        let n = ganglion::audit::export_finetune(&records, &out)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("{n} prompt/completion pairs written to {}", out.display());
        return Ok(());
    }
    let llm = ganglion::llm::load_configured(&config.model).await;
    let now = match &config.model.path {
        Some(p) => ganglion::audit::file_hash(p).await,
        None => None,
    };
    let recorded: std::collections::BTreeSet<Option<&str>> =
        records.iter().map(|r| r.model.hash.as_deref()).collect();
    if recorded.iter().any(|h| h.is_some() && *h != now.as_deref()) {
        println!(
            "note: decisions were recorded with another model file than {} now",
            config
                .model
                .path
                .as_deref()
                .map_or("(none)".into(), |p| p.display().to_string())
        );
    }
    // A scratch state store: replaying never changes the gateway's state.
    let host = PluginHost::new(config.plugins.clone(), StateStore::in_memory(), llm.clone())?;
    let (pipelines, problems) =
        ganglion::reload::Reloader::new(host, &config.plugins.dir, &config.rules.dir, llm)
            .with_extra_rule_dirs(&config.rules.extra_dirs)
            .load_all()
            .await;
    for p in &problems {
        tracing::warn!("{p}");
    }
    let results = ganglion::replay::replay(&records, &pipelines).await;
    let changed: Vec<_> = results.iter().filter(|c| !c.changed.is_empty()).collect();
    for c in &changed {
        println!(
            "decision {} ({} / {}): changed {}",
            c.index + 1,
            c.rule,
            c.device,
            c.changed.join(", ")
        );
    }
    println!(
        "{} decisions replayed, {} changed",
        results.len(),
        changed.len()
    );
    Ok(())
}

async fn call(
    config: GanglionConfig,
    file: PathBuf,
    cases: PathBuf,
    settings: String,
    stage: Option<String>,
    model: bool,
) -> Result<()> {
    use ganglion::devtools::harness;
    let settings: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&settings).context("--settings must be a JSON object")?;
    let text = if cases.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&cases).with_context(|| format!("reading {}", cases.display()))?
    };
    let llm: Arc<dyn ganglion::llm::LlmEngine> = if model {
        ganglion::llm::load_configured(&config.model).await
    } else {
        Arc::new(NoModel)
    };
    let host = PluginHost::new(config.plugins, StateStore::in_memory(), llm)?;
    let plugin = host.load_file(&file).await?;
    let stage = harness::stage_to_call(&plugin.stages, stage.as_deref())?;
    let pool = host.pool(&plugin, "call", settings);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", cases.display(), n + 1))?;
        let outcome = harness::run_case(&pool, stage, &case)
            .await
            .with_context(|| format!("{} line {}", cases.display(), n + 1))?;
        println!("{outcome}");
    }
    Ok(())
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
