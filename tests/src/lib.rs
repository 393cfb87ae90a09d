//! Helpers for the integration tests: built plugins, hosts with test limits.
//! `wire` is a minimal MQTT client for the benchmarks' load generation.

pub mod gateways;
pub mod wire;

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

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16, up: bool) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() == up {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "port {port} did not come {}",
        if up { "up" } else { "down" }
    );
}

/// A real mosquitto broker on a free loopback port, with persistence in a
/// scratch folder so that a restart keeps sessions and queued messages.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Mosquitto {
    pub fn start(name: &str) -> Mosquitto {
        Self::start_with(name, |port, _dir| {
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n")
        })
    }

    /// An anonymous broker that applies `acl` (mosquitto's `acl_file`
    /// syntax) to every client.
    pub fn start_with_acl(name: &str, acl: &str) -> Mosquitto {
        Self::start_with(name, |port, dir| {
            std::fs::write(dir.join("acl"), acl).expect("acl file");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("acl"), std::fs::Permissions::from_mode(0o644))
                .expect("chmod acl");
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {}/acl\n",
                dir.display()
            )
        })
    }

    /// A broker whose `port` is plain and anonymous (for test clients) and
    /// whose `tls_port` takes TLS with a test CA and the user `gw` /
    /// `secret`. Returns the broker, the TLS port and the CA file.
    pub fn start_tls_auth(name: &str) -> (Mosquitto, u16, PathBuf) {
        let tls_port = free_port();
        let mut ca = PathBuf::new();
        let m = Self::start_with(name, |port, dir| {
            let sh = |cmd: &str| {
                let ok = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .current_dir(dir)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                assert!(ok, "test certificate step failed: {cmd}");
            };
            sh(
                "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=ganglion-test-ca 2>/dev/null",
            );
            sh(
                "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null",
            );
            std::fs::write(
                dir.join("san.ext"),
                "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
            )
            .unwrap();
            sh(
                "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null",
            );
            sh("mosquitto_passwd -b -c passwd gw secret && chmod 644 server.key passwd");
            ca = dir.join("ca.pem");
            let d = dir.display();
            format!(
                "per_listener_settings true\nlistener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nallow_anonymous false\npassword_file {d}/passwd\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
            )
        });
        wait_for_port(tls_port, true);
        (m, tls_port, ca)
    }

    /// A broker whose configuration starts with `listeners(port, dir)`: the
    /// listener lines for the plain `port`, and any more (TLS, say).
    pub fn start_with(name: &str, listeners: impl FnOnce(u16, &Path) -> String) -> Mosquitto {
        let dir = scratch(name);
        let port = free_port();
        let conf = format!(
            "{}persistence true\npersistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 100\nautosave_interval 1\n",
            listeners(port, &dir),
            dir.display()
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("mosquitto config");
        // Run as root, mosquitto drops to its own user, which must be able to
        // write the persistence file here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .expect("chmod scratch dir");
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("mosquitto.log")).expect("log file"))
            .spawn()
            .expect("starting mosquitto (install it: apt-get install -y mosquitto)");
        self.child = Some(child);
        wait_for_port(self.port, true);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Stops the broker with SIGTERM (it saves its persistence file) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
            wait_for_port(self.port, false);
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// (topic, payload) of every message a test client received.
type Received = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT client for tests: publishes, and records what arrives on its subscriptions.
pub struct TestClient {
    pub client: rumqttc::AsyncClient,
    received: Received,
    acked: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Connects with a persistent session (so nothing is lost across a broker
    /// restart) and subscribes to `filters` at QoS 1.
    pub async fn connect(url: &str, id: &str, filters: &[&str]) -> TestClient {
        let (host, port) = ganglion::mqtt::broker_address(url)
            .map(|(h, p, _)| (h, p))
            .expect("broker url");
        let mut o = rumqttc::MqttOptions::new(id, host, port);
        o.set_clean_session(false)
            .set_inflight(100)
            .set_keep_alive(std::time::Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 1024);
        eventloop.set_network_options(ganglion::mqtt::network_options());
        let received: Received = Arc::default();
        let acked: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let (r, a, c) = (received.clone(), acked.clone(), client.clone());
        let filters_empty = filters.is_empty();
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        for f in &filters {
                            let _ = c.subscribe(f.clone(), rumqttc::QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        r.lock()
                            .unwrap()
                            .push((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        });
        if !filters_empty {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), ready_rx).await;
        }
        TestClient {
            client,
            received,
            acked,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish request");
    }

    /// Publishes the broker acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().unwrap().clone()
    }

    /// Messages received on topics that match `filter`.
    pub fn on(&self, filter: &str) -> Vec<serde_json::Value> {
        self.received()
            .into_iter()
            .filter(|(t, _)| ganglion::rules::filter_matches(filter, t))
            .map(|(_, p)| {
                serde_json::from_slice(&p).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&p).into_owned())
                })
            })
            .collect()
    }

    /// Waits until `pred` holds for what was received, at most `secs`.
    pub async fn wait_until(&self, secs: u64, pred: impl Fn(&TestClient) -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if pred(self) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        pred(self)
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
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

/// The scenario packs in examples/packs/: their data and a runner.
pub mod packs {
    use super::*;
    use ganglion::config::GanglionConfig;
    use ganglion::runtime::Runtime;
    use ganglion::types::Outgoing;
    use serde_json::Value as Json;

    /// A scenario pack's folder.
    pub fn pack(name: &str) -> PathBuf {
        xtask::root().join("examples/packs").join(name)
    }

    /// One line of examples/packs/smart-home/data/utterances.jsonl.
    pub struct Utterance {
        /// The room (the device in the topic).
        pub room: String,
        /// What was said.
        pub text: String,
        /// Acceptable actions, `<command> <value>` or `alert <level>`; empty: none.
        pub expect: Vec<String>,
    }

    /// The smart-home pack's sample utterances.
    pub fn utterances() -> Vec<Utterance> {
        let text =
            std::fs::read_to_string(pack("smart-home").join("data/utterances.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let v: Json = serde_json::from_str(l).unwrap();
                Utterance {
                    room: v["room"].as_str().unwrap().into(),
                    text: v["text"].as_str().unwrap().into(),
                    expect: v["expect"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e.as_str().unwrap().into())
                        .collect(),
                }
            })
            .collect()
    }

    /// Runs messages through the rules in `rules` (the built example plugins,
    /// no reload, no audit); returns every output and dead letter.
    pub async fn run_rules(
        rules: &Path,
        llm: Arc<dyn LlmEngine>,
        messages: &[(String, String)],
    ) -> Vec<Outgoing> {
        let (rt, mut out) = start(rules, llm).await;
        for (topic, payload) in messages {
            rt.push(topic.clone(), payload.clone().into_bytes())
                .await
                .unwrap();
        }
        rt.shutdown().await;
        drop(rt);
        let mut all = Vec::new();
        while let Some(o) = out.recv().await {
            all.push(o);
        }
        all
    }

    /// A runtime serving the rules in `rules` with the built example
    /// plugins (no reload, no audit), outputs on the channel (4096 deep).
    pub async fn start(
        rules: &Path,
        llm: Arc<dyn LlmEngine>,
    ) -> (Runtime, tokio::sync::mpsc::Receiver<Outgoing>) {
        let mut config = GanglionConfig::default();
        config.audit.enabled = false;
        start_with(config, &plugins_folder(), rules, llm).await
    }

    /// A runtime serving `plugins` and `rules` from `config` (compile cache
    /// and watching off, generous model timeout), in-memory state, outputs
    /// on the channel (4096 deep).
    pub async fn start_with(
        mut config: GanglionConfig,
        plugins: &Path,
        rules: &Path,
        llm: Arc<dyn LlmEngine>,
    ) -> (Runtime, tokio::sync::mpsc::Receiver<Outgoing>) {
        config.plugins.dir = plugins.to_owned();
        config.plugins.cache_dir = None;
        config.plugins.limits.llm_timeout_ms = 120_000;
        config.rules.dir = rules.to_owned();
        config.reload.enabled = false;
        let loaded = Runtime::builder(config)
            .llm(llm)
            .state(StateStore::in_memory())
            .load()
            .await
            .unwrap();
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        loaded.serve_channel(4096)
    }

    /// The industrial pack's replay: NAB machine temperature, one message
    /// per row on `factory/machine-1/telemetry`, with each row's timestamp.
    pub fn machine_rows() -> Vec<(String, (String, String))> {
        nab_rows(
            "machine_temperature_system_failure.csv",
            "factory/machine-1/telemetry",
            "machine-1",
            "temperature",
            "F",
        )
    }

    /// The traffic pack's replay: NAB occupancy_6005, one message per row on
    /// `traffic/6005/occupancy`, with each row's timestamp.
    pub fn occupancy_rows() -> Vec<(String, (String, String))> {
        nab_rows(
            "occupancy_6005.csv",
            "traffic/6005/occupancy",
            "6005",
            "occupancy",
            "%",
        )
    }

    fn nab_rows(
        file: &str,
        topic: &str,
        device: &str,
        metric: &str,
        unit: &str,
    ) -> Vec<(String, (String, String))> {
        let path = xtask::root().join("examples/data/nab").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let stamps: Vec<String> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap_or_default().trim().to_owned())
            .collect();
        let source = ganglion::simulate::Source::Csv {
            path,
            topic: topic.into(),
            device: device.into(),
            metric: metric.into(),
            unit: unit.into(),
        };
        let messages = ganglion::simulate::messages(&source).unwrap();
        stamps
            .into_iter()
            .zip(messages.map(|(t, p)| (t, String::from_utf8(p).unwrap())))
            .collect()
    }

    /// Labelled windows of a pack's data file (`data/<file>`, key `key`),
    /// as (start, end) timestamps in the CSV's format.
    pub fn labelled_windows(pack_name: &str, file: &str, key: &str) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(pack(pack_name).join("data").join(file)).unwrap();
        let v: Json = serde_json::from_str(&text).unwrap();
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w[0].as_str().unwrap().to_owned(),
                    w[1].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// The labelled failure windows of the industrial pack's data.
    pub fn failure_windows() -> Vec<(String, String)> {
        labelled_windows("industrial", "failure-windows.json", "failure_windows")
    }

    /// A speech reading said in `room`.
    pub fn say(room: &str, text: &str) -> (String, String) {
        (
            format!("home/{room}/say"),
            serde_json::json!({"metric": "speech", "value": text}).to_string(),
        )
    }
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
