//! `ganglion run`: the gateway over MQTT (or the embedded broker), with
//! simulated sensors on request, a live view, and a bounded drain on
//! Ctrl-C or SIGTERM.

use super::*;

/// Replays of the scenario packs' sample data for `--simulate`, for the
/// packs whose rules are loaded (paths relative to the repository root):
/// the NAB machine temperature series as `machine-9` at half the synthetic
/// rate, road occupancy for the traffic pack at a tenth of it, utterances
/// for the smart-home pack every five seconds.
pub(crate) fn pack_simulations(
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

pub(crate) fn sim_config(source: Source, rate: f64) -> SimConfig {
    SimConfig {
        source,
        rate,
        count: None,
        duration: None,
        login: None,
    }
}

pub(crate) async fn run(
    mut config: GanglionConfig,
    sim: Option<SimConfig>,
    duration: Option<Duration>,
    quiet: bool,
) -> Result<()> {
    // First, so that a stop asked while the model and plugins load is
    // taken once serving starts rather than killing the process.
    let (stop_asked, stopping) = watch_signals(StopSignals::new()?);
    // A refused [admin] is a configuration error: found before the model loads.
    if config.admin.enabled {
        config.admin.check().map_err(anyhow::Error::msg)?;
    }
    if config.serve.enabled {
        config.serve.check().map_err(anyhow::Error::msg)?;
    }
    config.mqtt.check().map_err(anyhow::Error::msg)?;
    if config.mqtt.output_connection == mqtt::OutputConnection::Shared
        && config.mqtt.broker.is_none()
    {
        bail!(
            "[mqtt] output_connection = \"shared\" cannot be used with the embedded broker: it withholds PUBACKs from a client whose window of deliveries is full, and the gateway acknowledges a delivery only after its outputs' PUBACKs, so the flow would stop; use \"separate\" (the default) or set [mqtt] broker"
        );
    }
    if config.mqtt.share_group.is_some() && config.mqtt.broker.is_none() {
        bail!(
            "[mqtt] share_group shares messages among gateways on one broker: set [mqtt] broker (or --broker); each gateway's embedded broker is its own"
        );
    }
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
    let _admin = start_admin(&config, &runtime, &mqtt).await?;
    let _served = if config.serve.enabled {
        start_serving(&config, runtime.engines().local_engine().clone()).await?
    } else {
        None
    };
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
    let simulator: Vec<_> = simulations
        .into_iter()
        .map(|(sim, client)| {
            let (settings, broker) = (config.mqtt.clone(), broker.clone());
            tokio::spawn(async move {
                if let Err(e) = simulate::run(&sim, &settings, &broker, client).await {
                    tracing::error!(error = %e, client, "simulator stopped");
                }
            })
        })
        .collect();
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
    if mqtt.handles().any(mqtt::MqttHandle::is_connected)
        && tokio::time::timeout(left, mqtt.disconnect()).await.is_err()
    {
        tracing::warn!("the broker did not take the disconnect within the drain limit");
    }
    tracing::info!("drained; stopped");
    Ok(())
}

/// Starts the admin endpoint when `[admin] enabled`. An address already in
/// use is logged and the gateway serves on without the endpoint: the
/// gateway's work does not depend on it (metrics scrapes then fail, and the
/// log says why).
async fn start_admin(
    config: &GanglionConfig,
    runtime: &Runtime,
    link: &Arc<mqtt::GatewayLink>,
) -> Result<Option<ganglion::admin::Admin>> {
    if !config.admin.enabled {
        return Ok(None);
    }
    let link = link.clone();
    let sources = ganglion::admin::Sources {
        gateway: runtime.gateway().clone(),
        llm: runtime.llm().clone(),
        engines: runtime.engines().clone(),
        link: Some(Arc::new(move || ganglion::admin::LinkGauges {
            connected: link.handles().all(mqtt::MqttHandle::is_connected),
            connections: link.handles().map(mqtt::MqttHandle::connections).sum(),
            in_flight: link.handles().map(mqtt::MqttHandle::in_flight).sum(),
            outbox: link.handles().map(mqtt::MqttHandle::outbox).sum(),
            intake_backlog: link.intake.intake_backlog(),
            dropped_qos0: link.intake.dropped_qos0(),
        })),
        reloads: Some(runtime.reload_events()),
        audit: config.audit.enabled.then(|| config.audit.path.clone()),
    };
    match ganglion::admin::start(&config.admin, sources).await {
        Ok(admin) => {
            tracing::info!(url = %format!("http://{}/", admin.addr), token = config.admin.token().is_some(), "admin endpoint serving");
            Ok(Some(admin))
        }
        Err(e @ ganglion::admin::AdminError::Bind { .. }) => {
            tracing::error!("{e}; serving without the admin endpoint");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Serves the model on `[serve] listen`. As for the admin endpoint, an
/// address in use is logged and the gateway runs on without it.
async fn start_serving(
    config: &GanglionConfig,
    llm: Arc<dyn ganglion::llm::LlmEngine>,
) -> Result<Option<ganglion::admin::ModelServer>> {
    match ganglion::admin::serve_model(&config.serve, llm).await {
        Ok(server) => {
            tracing::info!(url = %format!("http://{}/v1", server.addr), token = config.serve.token().is_some(), "model served (OpenAI-compatible)");
            Ok(Some(server))
        }
        Err(e @ ganglion::admin::AdminError::Bind { .. }) => {
            tracing::error!("{e}; running without serving the model");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// `ganglion serve-model`: the model alone, on `[serve] listen`, until a
/// stop signal; requests running then are cut off with the connections.
pub(crate) async fn serve_model(config: GanglionConfig) -> Result<()> {
    let (mut stop_asked, _) = watch_signals(StopSignals::new()?);
    config.serve.check().map_err(anyhow::Error::msg)?;
    if config.model.path.is_none() && config.model.embedding.is_none() {
        bail!("no model to serve: set [model] path (and [model] embedding for /v1/embeddings)");
    }
    let llm = ganglion::llm::load_configured(&config.model).await;
    if llm.model_id().is_empty() && config.model.path.is_some() {
        bail!("the model did not load (the log above says why); nothing to serve");
    }
    let server = ganglion::admin::serve_model(&config.serve, llm).await?;
    tracing::info!(url = %format!("http://{}/v1", server.addr), token = config.serve.token().is_some(), "model served (OpenAI-compatible)");
    let _ = stop_asked.wait_for(Option::is_some).await;
    tracing::info!("stopped");
    Ok(())
}

pub(crate) async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The signals that stop `ganglion run`: SIGINT (Ctrl-C) and, on Unix,
/// SIGTERM, which systemd, docker and Kubernetes send to stop a service.
pub(crate) struct StopSignals {
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
pub(crate) fn watch_signals(
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

pub(crate) fn print_summary(stats: &[(String, Arc<RuleStats>)]) {
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
pub(crate) async fn live_view(
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

pub(crate) fn one_line(s: &str) -> String {
    let flat: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    if flat.chars().count() > 160 {
        format!("{}…", flat.chars().take(160).collect::<String>())
    } else {
        flat
    }
}
