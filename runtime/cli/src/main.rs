//! The `ganglion` command.

mod init;
mod run;
mod tools;

use run::*;
use tools::*;

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
    /// Configuration file [default: ganglion.toml, and defaults apply when
    /// that does not exist]. A file given here (or in GANGLION_CONFIG) must
    /// exist. Relative paths in it are relative to its folder.
    #[arg(long, global = true, env = "GANGLION_CONFIG")]
    config: Option<PathBuf>,
    /// Log lines as `text` (for people) or `json` (one object a line, for
    /// log collectors). The level is set by RUST_LOG (default info).
    #[arg(long, global = true, env = "GANGLION_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the rules over MQTT: load plugins and rules, connect (or start the
    /// embedded broker), process until Ctrl-C or SIGTERM, then drain (within
    /// `[runtime] drain_timeout_ms`) and exit.
    Run {
        /// Broker to use instead of the configured one (mqtt://, mqtts://,
        /// ws:// or wss://host:port).
        #[arg(long, env = "GANGLION_BROKER")]
        broker: Option<String>,
        /// Broker user name, instead of `[mqtt] username`.
        #[arg(long, env = "GANGLION_USERNAME")]
        username: Option<String>,
        /// Broker password, instead of any password source of `[mqtt]`.
        /// Prefer GANGLION_PASSWORD or `[mqtt] password_file`: a command
        /// line is visible to every user of the machine.
        #[arg(long, env = "GANGLION_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// CA certificate (PEM) for mqtts:// and wss://.
        #[arg(long, env = "GANGLION_CA_FILE")]
        ca_file: Option<String>,
        /// MQTT version to speak to the broker: 3.1.1 or 5.
        #[arg(long, value_parser = ["3.1.1", "5"])]
        mqtt_version: Option<String>,
        /// Share the rules' messages with the other gateways of this group
        /// (`[mqtt] share_group`; MQTT 5 shared subscriptions).
        #[arg(long, env = "GANGLION_SHARE_GROUP")]
        share_group: Option<String>,
        /// This gateway's number on its host (`[mqtt] instance`), part of its
        /// client id under a share group; keep it across restarts.
        #[arg(long, env = "GANGLION_INSTANCE")]
        instance: Option<u32>,
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
    /// Serve the configured model (`[model]`) as an OpenAI-compatible HTTP
    /// endpoint (`[serve]`) for other tools on the gateway, until Ctrl-C or
    /// SIGTERM: no broker, no rules. `ganglion run` serves the same beside
    /// the rules with `[serve] enabled = true`.
    ServeModel {
        /// Address and port to listen on, instead of `[serve] listen`.
        #[arg(long, env = "GANGLION_SERVE_LISTEN")]
        listen: Option<String>,
        /// Bearer token clients must send (their API key), instead of
        /// `[serve] token`. Prefer GANGLION_SERVE_TOKEN: a command line is
        /// visible to every user of the machine.
        #[arg(long, env = "GANGLION_SERVE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Publish simulated sensor telemetry to a broker.
    Simulate {
        #[arg(long, env = "GANGLION_BROKER", default_value = "mqtt://127.0.0.1:1883")]
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
        #[arg(long, env = "GANGLION_USERNAME")]
        username: Option<String>,
        #[arg(long, env = "GANGLION_PASSWORD", hide_env_values = true)]
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
    /// Make a gateway folder to run outside the repository: ganglion.toml
    /// (paths relative to it), rules/ with an example rule, plugins/ with
    /// the example plugins when built ones are found, a README.
    Init {
        /// The folder; created if missing, refused unless empty.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Copy the plugins from this folder [default: the built example
        /// plugins, beside an installed binary or in the repository it was
        /// built in].
        #[arg(long)]
        plugins: Option<PathBuf>,
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

/// The file `ganglion` reads when no `--config` (or GANGLION_CONFIG) is given.
const DEFAULT_CONFIG: &str = "ganglion.toml";

/// The configuration: the given file, which must exist, or else
/// `ganglion.toml` in the working directory when there is one, or else the
/// defaults. A mistyped `--config` used to run on the defaults silently.
fn load_config(path: Option<&Path>) -> Result<GanglionConfig> {
    let Some(path) = path else {
        let default = Path::new(DEFAULT_CONFIG);
        return Ok(if default.exists() {
            GanglionConfig::load(default)?
        } else {
            GanglionConfig::default()
        });
    };
    if path.to_string_lossy().trim_start().starts_with('{') {
        bail!(
            "--config takes the path of ganglion.toml; give a plugin's settings as JSON with `call --settings`"
        );
    }
    if !path.exists() {
        bail!(
            "config file {} does not exist (given by --config or GANGLION_CONFIG)",
            path.display()
        );
    }
    Ok(GanglionConfig::load(path)?)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // The span fields (rule, device, topic of the message) go with
        // every line, flattened into the line's object.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let config = load_config(cli.config.as_deref())?;
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
    init_logging(cli.log_format);
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
        Command::Init { dir, plugins } => {
            let made = init::init(&dir, plugins.as_deref())?;
            println!("created {}:", dir.display());
            for f in &made {
                println!("  {}", f.display());
            }
            if !made.iter().any(|f| f.starts_with("plugins")) {
                println!(
                    "note: no built example plugins found; copy components into {}/plugins (`cargo run -p xtask -- plugins` builds them in the repository)",
                    dir.display()
                );
            }
            println!(
                "next: ganglion --config {} run --simulate",
                dir.join("ganglion.toml").display()
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
            share_group,
            instance,
            simulate,
            rate,
            duration,
            quiet,
        } => {
            let mut config = config;
            if share_group.is_some() {
                config.mqtt.share_group = share_group;
            }
            if let Some(n) = instance {
                config.mqtt.instance = n;
            }
            match mqtt_version.as_deref() {
                Some("5") => config.mqtt.protocol = mqtt::Protocol::V5,
                Some(_) => config.mqtt.protocol = mqtt::Protocol::V311,
                None => {}
            }
            if broker.is_some() {
                config.mqtt.broker = broker;
            }
            config.mqtt.username = username.or(config.mqtt.username);
            if password.is_some() {
                // The command line's password replaces every configured
                // source (only one may be set).
                config.mqtt.password = password;
                config.mqtt.password_file = None;
                config.mqtt.password_env = None;
            }
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
        Command::ServeModel { listen, token } => {
            let mut config = config;
            if let Some(listen) = listen {
                config.serve.listen = listen;
            }
            if token.is_some() {
                config.serve.token = token;
            }
            serve_model(config).await
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
            let settings = config.mqtt.clone();
            let config = SimConfig {
                source,
                rate,
                count,
                duration: duration.map(Duration::from_secs),
                login: username
                    .zip(password)
                    .map(|(username, password)| broker::Login { username, password }),
            };
            let acked = simulate::run(&config, &settings, &broker, "ganglion-simulator").await?;
            println!("{acked} messages published and acknowledged");
            Ok(())
        }
    }
}
