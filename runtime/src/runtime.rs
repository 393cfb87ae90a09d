//! The embedding API: Ganglion inside a gateway program, with or without
//! MQTT.
//!
//! [`Runtime::builder`] takes a [`GanglionConfig`] (the same typed struct as
//! `ganglion.toml`), opens the state store, loads the model, the plugins and
//! the rules ([`RuntimeBuilder::load`]); [`Loaded::serve`] then starts the
//! rules with a [`Publisher`] for their outputs: the MQTT link, or
//! [`Loaded::serve_channel`] for outputs on a channel. Messages come in
//! through [`Runtime::push`] from any transport (Modbus, BLE, serial...),
//! or through [`Runtime::serve_until`] from an MQTT intake. Rules can be
//! installed and removed programmatically, and with `[reload] enabled` the
//! plugins and rules folders are watched as in `ganglion run`.
//!
//! ```no_run
//! use ganglion::config::GanglionConfig;
//! use ganglion::runtime::Runtime;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = GanglionConfig::load("ganglion.toml".as_ref())?;
//! let (runtime, mut outputs) = Runtime::builder(config).load().await?.serve_channel(256);
//! tokio::spawn(async move {
//!     while let Some(out) = outputs.recv().await {
//!         println!("{} {}", out.topic, String::from_utf8_lossy(&out.payload));
//!     }
//! });
//! // A reading from a serial line, say: handled once `push` returns.
//! runtime.push("factory/press-1/telemetry", br#"{"metric":"temperature","value":97.5}"#.to_vec()).await?;
//! runtime.shutdown().await;
//! # Ok(()) }
//! ```

use crate::audit::AuditLog;
use crate::config::GanglionConfig;
use crate::gateway::{Gateway, GatewayConfig, GatewayEvent, RuleStats};
use crate::llm::LlmEngine;
use crate::pipeline::RulePipeline;
use crate::plugin::{HostError, PluginHost};
use crate::reload::{ReloadEvent, ReloadHandle, Reloader};
use crate::rules::{Rule, RuleError};
use crate::state::{StateError, StateStore};
use crate::transport::{
    AckToken, Confirm, Delivery, DoneSignal, Publisher, QueueFuture, TransportError,
    TransportFuture,
};
use crate::types::Message;
use crate::types::Outgoing;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};

/// Why the runtime could not start, or refused a request.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The state store could not be opened.
    #[error("state store: {0}")]
    State(#[from] StateError),
    /// The plugin host could not be set up.
    #[error("plugin host: {0}")]
    Host(#[from] HostError),
    /// Rule text given to [`Runtime::install_rule`] is not a valid rule.
    #[error("rule: {0}")]
    Rule(#[from] RuleError),
    /// The audit log (`[audit] enabled`) could not be opened.
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
    /// A rule could not be bound to the loaded plugins, or
    /// [`Runtime::remove_rule`] named no running rule.
    #[error("{0}")]
    Bind(String),
    /// `[remote.<name>]` or `[model] engine` is refused (a bad URL, an API
    /// key that cannot be read, an engine that is not configured).
    #[error("{0}")]
    Engine(String),
    /// The runtime is shutting down and takes no rule change, or a pushed
    /// message was dropped before it was handled.
    #[error("the runtime is shutting down")]
    Closed,
}

/// Builds a [`Runtime`]; see the [module docs](self).
pub struct RuntimeBuilder {
    config: GanglionConfig,
    llm: Option<Arc<dyn LlmEngine>>,
    state: Option<StateStore>,
}

impl RuntimeBuilder {
    /// Uses this engine instead of loading `[model]` (a fake in tests, or an
    /// engine the program shares with other work); it is the local engine
    /// the `[remote.<name>]` engines fall back on.
    pub fn llm(mut self, llm: Arc<dyn LlmEngine>) -> Self {
        self.llm = Some(llm);
        self
    }

    /// Uses this state store instead of opening `[state] path`.
    pub fn state(mut self, state: StateStore) -> Self {
        self.state = Some(state);
        self
    }

    /// Opens the state store, loads the model (on a blocking thread; a model
    /// that does not load is logged and replaced by [`crate::llm::NoModel`]),
    /// sets up the `[remote.<name>]` engines, then the plugins and rules. A bad plugin or rule file does not stop
    /// the others: it is listed in [`Loaded::problems`].
    ///
    /// The model's compute pool is process-wide, sized by the first engine
    /// loaded (`[model] threads`). candle's own pool should be one thread:
    /// set `CANDLE_NUM_THREADS=1` before the program starts other threads,
    /// as `ganglion run` does.
    pub async fn load(self) -> Result<Loaded, RuntimeError> {
        let config = self.config;
        let state = match self.state {
            Some(s) => s,
            None => StateStore::open(&config.state.path, (&config.state).into())?,
        };
        let local = match self.llm {
            Some(l) => l,
            None => crate::llm::load_configured(&config.model).await,
        };
        let engines =
            crate::llm::Engines::build(local, &config.remote, config.model.engine.as_deref())
                .map_err(RuntimeError::Engine)?;
        let llm = engines.default_engine().clone();
        let audit = if config.audit.enabled {
            let model_hash = match &config.model.path {
                Some(p) => crate::audit::file_hash(p).await,
                None => None,
            };
            Some(AuditLog::open(&config.audit, model_hash)?)
        } else {
            None
        };
        let audit_handle = audit.clone();
        let host = PluginHost::new(config.plugins.clone(), state.clone(), llm.clone())?;
        let reloader = Arc::new(
            Reloader::new(host, &config.plugins.dir, &config.rules.dir, llm.clone())
                .with_extra_rule_dirs(&config.rules.extra_dirs)
                .with_engines(engines.clone())
                .with_audit(audit)
                .with_limits(config.rules.limits)
                .with_share_group(config.mqtt.share_group.clone()),
        );
        let (pipelines, problems) = reloader.load_all().await;
        Ok(Loaded {
            config,
            audit: audit_handle,
            state,
            llm,
            engines,
            reloader,
            pipelines,
            problems,
        })
    }
}

/// Plugins and rules loaded, not yet serving.
pub struct Loaded {
    config: GanglionConfig,
    audit: Option<AuditLog>,
    state: StateStore,
    llm: Arc<dyn LlmEngine>,
    engines: crate::llm::Engines,
    reloader: Arc<Reloader>,
    pipelines: Vec<RulePipeline>,
    /// Files that did not load, each naming the file and the cause.
    pub problems: Vec<String>,
}

impl Loaded {
    /// The rules ready to run.
    pub fn rules(&self) -> Vec<Arc<Rule>> {
        self.pipelines.iter().map(|p| p.rule.clone()).collect()
    }

    /// The topic filters of the loaded rules, each once: what an MQTT intake
    /// subscribes to before [`Loaded::serve`].
    pub fn topic_filters(&self) -> Vec<String> {
        crate::gateway::topic_filters(&self.pipelines, self.config.mqtt.share_group.as_deref())
    }

    /// Starts the rules, publishing their outputs and dead letters through
    /// `publisher`, and (with `[reload] enabled`) starts watching the
    /// plugins and rules folders.
    pub fn serve(self, publisher: Arc<dyn Publisher>) -> Runtime {
        let gateway = Arc::new(Gateway::start(
            self.pipelines,
            publisher,
            GatewayConfig {
                lanes: self.config.rules.lanes,
                lane_capacity: self.config.rules.lane_capacity,
                share_group: self.config.mqtt.share_group.clone(),
            },
        ));
        let watch = self
            .config
            .reload
            .enabled
            .then(|| self.reloader.watch(gateway.clone(), &self.config.reload));
        Runtime {
            gateway,
            reloader: self.reloader,
            watch: tokio::sync::Mutex::new(watch),
            state: self.state,
            llm: self.llm,
            engines: self.engines,
            audit: self.audit,
        }
    }

    /// Like [`Loaded::serve`], with every output and dead letter sent to the
    /// returned channel (`capacity` messages; a full channel holds the rules
    /// back rather than dropping anything).
    pub fn serve_channel(self, capacity: usize) -> (Runtime, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (self.serve(Arc::new(ChannelPublisher(tx))), rx)
    }
}

/// Sends outputs to a channel; a publish completes once the channel took it.
struct ChannelPublisher(mpsc::Sender<Outgoing>);

impl Publisher for ChannelPublisher {
    fn publish(&self, out: Outgoing) -> QueueFuture<'_> {
        Box::pin(async move {
            self.0
                .send(out)
                .await
                .map_err(|_| TransportError::Stopped)?;
            let confirm: Confirm = Box::pin(async { Ok(()) });
            Ok(confirm)
        })
    }

    fn ack(&self, _token: AckToken) -> TransportFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// Ganglion running inside a program; see the [module docs](self).
pub struct Runtime {
    gateway: Arc<Gateway>,
    reloader: Arc<Reloader>,
    watch: tokio::sync::Mutex<Option<ReloadHandle>>,
    state: StateStore,
    llm: Arc<dyn LlmEngine>,
    engines: crate::llm::Engines,
    audit: Option<AuditLog>,
}

impl Runtime {
    /// Starts building a runtime from configuration.
    pub fn builder(config: GanglionConfig) -> RuntimeBuilder {
        RuntimeBuilder {
            config,
            llm: None,
            state: None,
        }
    }

    /// Hands a message to every rule whose topic filters match `topic`, and
    /// returns once it is handled: its outputs and dead letters published
    /// (or, on a channel, taken). Waits while the rules' queues are full
    /// (backpressure). A message no rule matches returns at once.
    pub async fn push(
        &self,
        topic: impl Into<String>,
        payload: Vec<u8>,
    ) -> Result<(), RuntimeError> {
        let done = self.push_queued(topic, payload).await;
        done.await.map_err(|_| RuntimeError::Closed)
    }

    /// Hands a message to the rules and returns once it is queued, with what
    /// completes when it is handled: for a transport that pushes many
    /// messages at once and confirms them to its sender later.
    pub async fn push_queued(
        &self,
        topic: impl Into<String>,
        payload: Vec<u8>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (signal, done) = DoneSignal::new();
        self.gateway
            .dispatch(Delivery {
                message: Message {
                    topic: topic.into(),
                    payload,
                    timestamp: crate::types::received_now(),
                },
                token: AckToken::Done(signal),
            })
            .await;
        done
    }

    /// Takes deliveries (from [`crate::mqtt::GatewayLink`], say), each
    /// acknowledged to its transport once handled, until `stop` completes or
    /// the channel closes; then shuts down as [`Runtime::shutdown`] does.
    /// The channel stays open during the drain, so the transport keeps
    /// running for the acknowledgements; deliveries not taken are left
    /// unacknowledged for the broker to deliver again.
    pub async fn serve_until(
        &self,
        deliveries: mpsc::Receiver<Delivery>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        crate::gateway::serve(&self.gateway, deliveries, async {
            stop.await;
            self.stop_watching().await;
        })
        .await;
        self.shutdown().await;
    }

    /// Like [`Runtime::serve_until`], with a time limit on the drain: once
    /// `stop` completes, queued and in-flight messages get `limit` to be
    /// published and acknowledged. Returns whether they all were. When the
    /// limit passes first, the drain is left where it is: what it did not
    /// finish stays unacknowledged for the broker to deliver again, and the
    /// state store and audit log are flushed all the same. (A broker that is
    /// down never confirms an output, so an unlimited drain would wait for
    /// it forever.)
    pub async fn serve_until_within(
        &self,
        deliveries: mpsc::Receiver<Delivery>,
        stop: impl std::future::Future<Output = ()>,
        limit: std::time::Duration,
    ) -> bool {
        let (stopped, on_stop) = tokio::sync::oneshot::channel::<()>();
        let serve = self.serve_until(deliveries, async move {
            stop.await;
            let _ = stopped.send(());
        });
        let expired = async move {
            match on_stop.await {
                Ok(()) => tokio::time::sleep(limit).await,
                // The intake closed without a stop being asked: no limit.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = serve => true,
            () = expired => {
                tracing::error!(limit_ms = limit.as_millis() as u64, "drain not finished within its limit; what is left stays unacknowledged for the broker to deliver again");
                self.flush_stores().await;
                false
            }
        }
    }

    async fn stop_watching(&self) {
        if let Some(w) = self.watch.lock().await.take() {
            w.stop().await;
        }
    }

    /// Parses rule text (TOML, as in a rule file; `name` applies when it sets
    /// none) and installs it, binding the currently loaded plugins: a new
    /// rule starts, a rule of the same name is replaced the way a hot reload
    /// replaces it (messages in flight finish on the old version).
    pub async fn install_rule(&self, name: &str, text: &str) -> Result<(), RuntimeError> {
        let rule = Rule::parse(text, name, None)?;
        self.install(rule).await
    }

    /// Installs a parsed rule; see [`Runtime::install_rule`].
    pub async fn install(&self, rule: Rule) -> Result<(), RuntimeError> {
        let pipeline = self
            .reloader
            .bind(rule)
            .await
            .map_err(|e| RuntimeError::Bind(e.to_string()))?;
        self.gateway
            .install(pipeline)
            .await
            .map_err(|_| RuntimeError::Closed)
    }

    /// Removes a rule: its queued and in-flight messages finish first.
    pub async fn remove_rule(&self, name: &str) -> Result<(), RuntimeError> {
        self.gateway.remove(name).await.map_err(|e| match e {
            crate::gateway::GatewayError::Closed => RuntimeError::Closed,
            other => RuntimeError::Bind(other.to_string()),
        })
    }

    /// The rules running now, with their current definitions.
    pub fn rules(&self) -> Vec<Arc<Rule>> {
        self.gateway
            .pipelines()
            .iter()
            .map(|p| p.rule.clone())
            .collect()
    }

    /// Counters per rule.
    pub fn stats(&self) -> Vec<(String, Arc<RuleStats>)> {
        self.gateway.stats()
    }

    /// What the rules do, as it happens: prompts, completions, publishes,
    /// dead letters.
    pub fn events(&self) -> broadcast::Receiver<GatewayEvent> {
        self.gateway.subscribe_events()
    }

    /// Plugin and rule files taken or refused by hot reload.
    pub fn reload_events(&self) -> broadcast::Receiver<ReloadEvent> {
        self.reloader.subscribe()
    }

    /// The model engine the plugins use.
    pub fn llm(&self) -> &Arc<dyn LlmEngine> {
        &self.llm
    }

    /// The local engine and the remotes, which rules pick from.
    pub fn engines(&self) -> &crate::llm::Engines {
        &self.engines
    }

    /// The gateway underneath, for what this type does not wrap.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stops watching folders, lets every queued and in-flight message
    /// finish, runs open windows to the end and flushes the state store.
    pub async fn shutdown(&self) {
        self.stop_watching().await;
        self.gateway.shutdown().await;
        self.flush_stores().await;
    }

    /// Makes the audit log and the state store durable.
    async fn flush_stores(&self) {
        if let Some(a) = self.audit.clone() {
            let _ = tokio::task::spawn_blocking(move || a.flush()).await;
        }
        if let Err(e) = self.state.flush() {
            tracing::error!(error = %e, "state store not flushed");
        }
    }
}
