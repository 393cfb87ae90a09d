//! Helpers for the integration tests: built plugins, hosts with test limits,
//! rule folders, gateways in this process, the `ganglion` binary's log.
//! `brokers`: a real mosquitto and a recording test client; `gateways`:
//! gateway folders for the binary; `packs`: the scenario packs' data and a
//! runner; `wire`: a minimal MQTT client for the benchmarks' load generation.

mod brokers;
pub mod gateways;
pub mod packs;
pub mod wire;

pub use brokers::{Mosquitto, TestClient};

use ganglion::config::{Limits, PluginConfig};
use ganglion::llm::{LlmEngine, NoModel};
use ganglion::plugin::{InstancePool, Plugin, PluginHost};
use ganglion::state::StateStore;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Builds the example plugins and fixtures once per test process.
pub fn built() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        xtask::build_plugins().expect("building the plugins for wasm32-wasip2");
        (xtask::plugins_dir(), xtask::fixtures_dir())
    })
}

/// The Python fixture `py-tagger`, built once per test process (see
/// plugins/fixtures/py-tagger/README.md).
pub fn python_fixture() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| xtask::build_python_fixture().expect("building the Python fixture"))
}

pub fn example(name: &str) -> PathBuf {
    built().0.join(format!("{name}.wasm"))
}

pub fn fixture(name: &str) -> PathBuf {
    built().1.join(format!("{name}.wasm"))
}

/// A `.wat` or other checked-in fixture file under tests/fixtures.
pub fn wat_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A host with no artefact cache, an in-memory state store and the given engine.
pub fn host_with(limits: Limits, llm: Arc<dyn LlmEngine>) -> PluginHost {
    let config = PluginConfig {
        cache_dir: None,
        limits,
        total_instances: 64,
        ..PluginConfig::default()
    };
    PluginHost::new(config, StateStore::in_memory(), llm).expect("plugin host")
}

pub fn host() -> PluginHost {
    host_with(Limits::default(), Arc::new(NoModel))
}

pub fn config(json: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    json.as_object().cloned().expect("config is a JSON object")
}

pub async fn load(host: &PluginHost, path: &Path) -> Arc<Plugin> {
    host.load_file(path)
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

pub async fn pool(
    host: &PluginHost,
    path: &Path,
    rule: &str,
    cfg: serde_json::Value,
) -> InstancePool {
    let plugin = load(host, path).await;
    host.pool(&plugin, rule, config(cfg))
}

/// A unique scratch directory under target/.
pub fn scratch(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = xtask::root()
        .join("target/test-scratch")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A scratch folder holding a rule file `<name>.toml` per (name, text).
pub fn rules_dir(rules: &[(&str, &str)]) -> PathBuf {
    let dir = scratch("rules");
    for (name, text) in rules {
        std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
    }
    dir
}

/// A runtime's configuration serving the example plugins (no compile
/// cache) and the rule files `rules` (name, text), with reload and the audit
/// log off.
pub fn runtime_config(rules: &[(&str, &str)]) -> ganglion::config::GanglionConfig {
    let mut config = ganglion::config::GanglionConfig::default();
    config.plugins.dir = plugins_folder();
    config.plugins.cache_dir = None;
    config.rules.dir = rules_dir(rules);
    config.reload.enabled = false;
    config.audit.enabled = false;
    config
}

/// `config` loaded with `llm` and in-memory state; panics on any problem.
pub async fn load_runtime(
    config: ganglion::config::GanglionConfig,
    llm: Arc<dyn LlmEngine>,
) -> ganglion::runtime::Loaded {
    let loaded = ganglion::runtime::Runtime::builder(config)
        .llm(llm)
        .state(StateStore::in_memory())
        .load()
        .await
        .unwrap();
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
    loaded
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A gateway running in this process against a broker.
pub struct RunningGateway {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    pub stats: Vec<(String, Arc<ganglion::gateway::RuleStats>)>,
    pub problems: Vec<String>,
    pub gateway: Arc<ganglion::gateway::Gateway>,
    /// Set when the gateway watches its folders.
    pub reloader: Option<Arc<ganglion::reload::Reloader>>,
}

/// A raw-payload rule on `topic` whose handler, the `tagger` fixture
/// (installed as `tagger`), labels each message `label` and publishes it on
/// `tagged/{device}`: which gateway or plugin version handled a message
/// shows in its output.
pub fn tagger_rule(topic: &str, label: &str) -> String {
    format!(
        r#"
topics = ["{topic}"]
format = "raw"
[handler]
plugin = "tagger"
config = {{ label = "{label}" }}
[allow]
publish = ["tagged/{{device}}"]
"#
    )
}

/// Every built example plugin and fixture, copied into a scratch folder.
pub fn plugins_folder() -> PathBuf {
    let plugins = scratch("gateway-plugins");
    for dir in [&built().0, &built().1] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, plugins.join(p.file_name().unwrap())).unwrap();
        }
    }
    plugins
}

impl RunningGateway {
    /// Loads the built example plugins and fixtures plus the rules in
    /// `rules_dir`, connects to `url` as `client_id`, and serves.
    pub async fn start(
        url: &str,
        client_id: &str,
        rules_dir: &Path,
        llm: Arc<dyn LlmEngine>,
    ) -> RunningGateway {
        let settings = ganglion::mqtt::MqttSettings {
            client_id: client_id.into(),
            ..Default::default()
        };
        Self::start_with(url, settings, rules_dir, llm).await
    }

    /// Like [`RunningGateway::start`], with full connection settings.
    pub async fn start_with(
        url: &str,
        settings: ganglion::mqtt::MqttSettings,
        rules_dir: &Path,
        llm: Arc<dyn LlmEngine>,
    ) -> RunningGateway {
        let host = host_with(Limits::default(), llm.clone());
        Self::start_in(url, settings, host, &plugins_folder(), rules_dir, llm, None).await
    }

    /// Serves the plugins and rules in the given folders and keeps up with
    /// changes to them (hot reload), publishing reload events on
    /// `<status topic>/reload`.
    pub async fn start_reloading(
        url: &str,
        settings: ganglion::mqtt::MqttSettings,
        host: PluginHost,
        plugins_dir: &Path,
        rules_dir: &Path,
        reload: ganglion::config::ReloadConfig,
    ) -> RunningGateway {
        Self::start_in(
            url,
            settings,
            host,
            plugins_dir,
            rules_dir,
            Arc::new(NoModel),
            Some(reload),
        )
        .await
    }

    async fn start_in(
        url: &str,
        settings: ganglion::mqtt::MqttSettings,
        host: PluginHost,
        plugins_dir: &Path,
        rules_dir: &Path,
        llm: Arc<dyn LlmEngine>,
        reload: Option<ganglion::config::ReloadConfig>,
    ) -> RunningGateway {
        // TEST_LOG=debug shows the runtime's log.
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let reloader = Arc::new(ganglion::reload::Reloader::new(
            host,
            plugins_dir,
            rules_dir,
            llm,
        ));
        let (pipelines, problems) = reloader.load_all().await;
        let filters = ganglion::gateway::topic_filters(&pipelines, None);
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let mqtt = Arc::new(
            ganglion::mqtt::GatewayLink::connect(&settings, url, filters, tx)
                .expect("mqtt settings"),
        );
        assert!(
            mqtt.wait_connected(std::time::Duration::from_secs(10))
                .await,
            "gateway connected to {url}"
        );
        let gateway = Arc::new(ganglion::gateway::Gateway::start(
            pipelines,
            mqtt.clone(),
            ganglion::gateway::GatewayConfig::default(),
        ));
        let stats = gateway.stats();
        let reloading = reload.is_some();
        let watching = reload.map(|config| {
            let status = tokio::spawn(ganglion::reload::publish_events(
                reloader.subscribe(),
                mqtt.clone(),
                format!("{}/reload", settings.status_topic()),
            ));
            (reloader.watch(gateway.clone(), &config), status)
        });
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = gateway.clone();
        let task = tokio::spawn(async move {
            ganglion::gateway::serve(&served, rx, async {
                let _ = stop_rx.await;
                if let Some((handle, status)) = watching {
                    handle.stop().await;
                    status.abort();
                }
            })
            .await;
            mqtt.disconnect().await;
        });
        // Let the subscriptions reach the broker.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        RunningGateway {
            stop: Some(stop),
            task,
            stats,
            problems,
            gateway,
            reloader: reloading.then_some(reloader),
        }
    }

    /// Drains and stops.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }

    pub fn count(
        &self,
        rule: &str,
        f: impl Fn(&ganglion::gateway::RuleStats) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        self.stats
            .iter()
            .find(|(r, _)| r == rule)
            .map(|(_, s)| f(s).load(std::sync::atomic::Ordering::SeqCst))
            .unwrap_or(0)
    }
}

/// A rule that turns what someone says (`{"metric":"speech","value":...}` on
/// `home/<room>/say`) into fan commands through the model.
pub const VOICE_RULE: &str = r#"
topics = ["home/+/say"]
format = "raw"
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[prompt]
plugin = "prompt-template"
config = { system = "Turn requests into device commands.", user = "{% for r in readings %}{{ r.value }}{% endfor %}" }
[postprocess]
plugin = "json-actions"
[allow]
commands = [{ device = "{device}", name = "fan", values = ["on", "off"] }]
"#;

/// The model for [`VOICE_RULE`]: a fan command, or a command outside the
/// allow-list when asked about the door.
pub fn voice_model() -> Arc<ganglion::llm::FakeLlm> {
    ganglion::llm::FakeLlm::new(|req| {
        let ganglion::llm::LlmInput::Chat(m) = &req.input else {
            return Ok(String::new());
        };
        Ok(if m.last().is_some_and(|m| m.content.contains("door")) {
            r#"{"type":"command","command":"unlock"}"#.into()
        } else {
            r#"{"type":"command","command":"fan","value":"on"}"#.into()
        })
    })
}

/// The `ganglion` binary of this workspace (target/debug/ganglion), which
/// `cargo run -p xtask -- test` builds before the tests; `GANGLION_BIN`
/// names another (a release build, for benchmarks).
pub fn ganglion_binary() -> PathBuf {
    let bin = std::env::var_os("GANGLION_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| xtask::root().join("target/debug/ganglion"));
    assert!(
        bin.exists(),
        "{} is missing: `cargo build -p ganglion-cli` (or `cargo run -p xtask -- test`) builds it",
        bin.display()
    );
    bin
}

/// A child process's stderr, collected line by line on a thread of its own.
pub struct StderrLines(Arc<std::sync::Mutex<String>>);

impl StderrLines {
    /// Starts collecting `child`'s stderr (which must be piped).
    pub fn collect(child: &mut std::process::Child) -> StderrLines {
        use std::io::BufRead as _;
        let text = Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = text.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut t = sink.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        StderrLines(text)
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Waits until the text contains `needle`; false after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < until {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }
}
