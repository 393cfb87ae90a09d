//! The scenario packs in examples/packs/: their data and a runner.

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
    let text = std::fs::read_to_string(pack("smart-home").join("data/utterances.jsonl")).unwrap();
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
    load_runtime(config, llm).await.serve_channel(4096)
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
