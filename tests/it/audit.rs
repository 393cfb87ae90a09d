//! The decision audit log: what a model-backed decision records, rotation,
//! replay through current plugins, and the fine-tuning export.

use ganglion::audit::{self, AuditLog, DecisionRecord};
use ganglion::config::AuditConfig;
use ganglion::config::GanglionConfig;
use ganglion::llm::{FakeLlm, LlmEngine};
use ganglion::reload::Reloader;
use ganglion_tests::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct Setup {
    plugins: PathBuf,
    rules: PathBuf,
    log: PathBuf,
}

fn setup(rules: &[(&str, &str)]) -> Setup {
    let root = scratch("audit");
    let plugins = plugins_folder();
    let rules_dir = root.join("rules");
    std::fs::create_dir_all(&rules_dir).unwrap();
    for (name, text) in rules {
        std::fs::write(rules_dir.join(format!("{name}.toml")), text).unwrap();
    }
    Setup {
        plugins,
        rules: rules_dir,
        log: root.join("audit/decisions.jsonl"),
    }
}

/// Runs `messages` through a runtime that records decisions; returns the log.
async fn record(
    s: &Setup,
    llm: Arc<dyn LlmEngine>,
    messages: &[(&str, &str)],
) -> Vec<DecisionRecord> {
    record_with(s, llm, GanglionConfig::default(), messages).await
}

/// Like [`record`], starting from `config`.
async fn record_with(
    s: &Setup,
    llm: Arc<dyn LlmEngine>,
    mut config: GanglionConfig,
    messages: &[(&str, &str)],
) -> Vec<DecisionRecord> {
    config.audit.path = s.log.clone();
    let (rt, _outputs) = ganglion_tests::packs::start_with(config, &s.plugins, &s.rules, llm).await;
    for (topic, payload) in messages {
        // Plain text is what someone said: a speech reading.
        let payload = if payload.starts_with('{') {
            payload.to_string()
        } else {
            serde_json::json!({"metric": "speech", "value": payload}).to_string()
        };
        rt.push(*topic, payload.into_bytes()).await.unwrap();
    }
    rt.shutdown().await;
    audit::read(&s.log).unwrap()
}

async fn replay(
    s: &Setup,
    llm: Arc<dyn LlmEngine>,
    records: &[DecisionRecord],
) -> Vec<ganglion::replay::Comparison> {
    replay_with(s, Default::default(), llm, records).await
}

async fn replay_with(
    s: &Setup,
    limits: ganglion::config::Limits,
    llm: Arc<dyn LlmEngine>,
    records: &[DecisionRecord],
) -> Vec<ganglion::replay::Comparison> {
    let host = host_with(limits, llm.clone());
    let (pipelines, problems) = Reloader::new(host, &s.plugins, &s.rules, llm)
        .load_all()
        .await;
    assert!(problems.is_empty(), "{problems:?}");
    ganglion::replay::replay(records, &pipelines).await
}

#[tokio::test]
async fn a_model_decision_records_what_is_needed_to_judge_and_repeat_it() {
    let s = setup(&[("voice", VOICE_RULE)]);
    let records = record(
        &s,
        voice_model(),
        &[
            ("home/hall/say", "it is hot in here"),
            ("home/hall/say", "open the door"),
        ],
    )
    .await;
    assert_eq!(records.len(), 2);
    let hot = &records[0];
    assert_eq!(
        (hot.v, hot.rule.as_str(), hot.device.as_str()),
        (1, "voice", "hall")
    );
    assert_eq!(hot.window.len(), 1);
    assert_eq!(hot.window[0].value, "it is hot in here");
    assert_eq!(hot.prompt_plugin.name, "prompt-template");
    assert_eq!(hot.postprocess_plugin.name, "json-actions");
    assert_eq!(hot.prompt_plugin.version.len(), 12);
    assert_eq!(hot.model.id, "fake");
    assert_eq!(hot.prompt.system, "Turn requests into device commands.");
    assert_eq!(hot.prompt.user, "it is hot in here");
    assert_eq!(hot.prompt.constraint, "none");
    assert!(hot.completion.text.contains("fan"));
    assert_eq!(hot.completion.error, None);
    assert_eq!(hot.actions.len(), 1);
    assert!(hot.actions[0].allowed);
    assert!(hot.timings.llm_ms >= 0.0 && hot.timings.postprocess_ms > 0.0);
    // The refused action is recorded with the allow-list's reason.
    let door = &records[1];
    assert_eq!(door.actions.len(), 1);
    assert!(!door.actions[0].allowed);
    assert!(
        door.actions[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("unlock"),
        "{door:?}"
    );
}

#[tokio::test]
async fn rules_without_the_model_record_nothing() {
    let rule = r#"
topics = ["plant/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 50.0 }] }
"#;
    let s = setup(&[("hot", rule)]);
    let records = record(
        &s,
        voice_model(),
        &[(
            "plant/m1/telemetry",
            r#"{"metric":"temperature","value":90}"#,
        )],
    )
    .await;
    assert!(records.is_empty());
}

#[tokio::test]
async fn replay_finds_no_change_with_the_same_plugins_and_the_changed_postprocessor_decisions() {
    let rule = VOICE_RULE
        .replace("plugin = \"json-actions\"", "plugin = \"tagger\"")
        .replace(
            "commands = [{ device = \"{device}\", name = \"fan\", values = [\"on\", \"off\"] }]",
            "publish = [\"tagged/{device}\"]",
        );
    let s = setup(&[("voice", &rule)]);
    std::fs::copy(fixture("tag-a"), s.plugins.join("tagger.wasm")).unwrap();
    let llm = voice_model();
    let says = [
        ("home/hall/say", "it is hot"),
        ("home/kitchen/say", "open the door"),
        ("home/bed/say", "too warm"),
    ];
    let records = record(&s, llm.clone(), &says).await;
    assert_eq!(records.len(), 3);
    let same = replay(&s, llm.clone(), &records).await;
    assert!(same.iter().all(|c| c.changed.is_empty()), "{same:?}");
    // A new version of the postprocessor: every decision's actions differ.
    std::fs::copy(fixture("tag-b"), s.plugins.join("tagger.wasm")).unwrap();
    let changed = replay(&s, llm.clone(), &records).await;
    assert_eq!(changed.len(), 3);
    for c in &changed {
        assert_eq!(c.changed, ["actions"], "{c:?}");
    }
    // A model that answers differently changes completions (and actions).
    let other = FakeLlm::fixed("{}");
    let by_model = replay(&s, other, &records).await;
    assert!(
        by_model
            .iter()
            .all(|c| c.changed.contains(&"completion".to_owned()))
    );
    // A rule that is gone is reported, not skipped.
    std::fs::remove_file(s.rules.join("voice.toml")).unwrap();
    let gone = replay(&s, llm, &records).await;
    assert!(gone[0].changed[0].contains("not loaded"), "{gone:?}");
}

#[tokio::test]
async fn the_log_rotates_by_size_and_keeps_whole_records() {
    let root = scratch("audit-rotate");
    let path = root.join("a.jsonl");
    let log = AuditLog::open(
        &AuditConfig {
            enabled: true,
            path: path.clone(),
            max_mib: 1,
            keep: 2,
            ..AuditConfig::default()
        },
        Some("h".into()),
    )
    .unwrap();
    let s = setup(&[("voice", VOICE_RULE)]);
    let one = record(&s, voice_model(), &[("home/hall/say", "hot")])
        .await
        .remove(0);
    let mut big = one.clone();
    big.prompt.user = "x".repeat(100_000);
    for _ in 0..40 {
        log.append(&big);
    }
    log.flush();
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    for p in [path.clone(), numbered(1), numbered(2)] {
        let size = std::fs::metadata(&p).unwrap().len();
        assert!(size <= 1 << 20, "{} is {size} bytes", p.display());
        let records = audit::read(&p).unwrap();
        assert!(!records.is_empty());
        assert!(records.iter().all(|r| r.prompt.user.len() == 100_000));
    }
    assert!(!numbered(3).exists(), "only `keep` rotated files are kept");
}

#[tokio::test]
async fn the_finetune_export_writes_chat_pairs_of_successful_decisions() {
    let s = setup(&[("voice", VOICE_RULE)]);
    let mut records = record(
        &s,
        voice_model(),
        &[("home/a/say", "hot"), ("home/b/say", "cold")],
    )
    .await;
    records[1].completion.error = Some("deadline exceeded".into());
    let out: &Path = &s.log.with_file_name("pairs.jsonl");
    assert_eq!(audit::export_finetune(&records, out).unwrap(), 1);
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(out).unwrap().trim()).unwrap();
    let m = &line["messages"];
    assert_eq!(m[0]["role"], "system");
    assert_eq!(m[1]["content"], "hot");
    assert_eq!(m[2]["role"], "assistant");
    assert!(m[2]["content"].as_str().unwrap().contains("fan"));
}

#[tokio::test]
async fn replay_with_the_default_model_and_greedy_decoding_changes_nothing() {
    let model = xtask::model_path();
    assert!(
        model.exists(),
        "the default model is missing: run `cargo run -p xtask -- model` (the test command does)"
    );
    let config = ganglion_llm::EngineConfig {
        path: Some(model.clone()),
        ..Default::default()
    };
    let engine: Arc<dyn LlmEngine> = Arc::new(
        ganglion_llm::Engine::load_with_progress(&config, false)
            .unwrap()
            .0,
    );
    let rule = VOICE_RULE.replace(
        "user = \"{% for r in readings %}{{ r.value }}{% endfor %}\"",
        "user = \"{% for r in readings %}{{ r.value }}{% endfor %}\", max_tokens = 24",
    );
    assert_ne!(rule, VOICE_RULE);
    let s = setup(&[("voice", &rule)]);
    // The test binary runs other model tests beside this one on two cores:
    // a generous deadline keeps a slow machine from turning into a diff.
    let mut runtime_config = GanglionConfig::default();
    runtime_config.model.path = Some(model.clone());
    runtime_config.plugins.limits.llm_timeout_ms = 600_000;
    runtime_config.plugins.limits.call_timeout_ms = 10_000;
    let limits = runtime_config.plugins.limits.clone();
    let records = record_with(
        &s,
        engine.clone(),
        runtime_config,
        &[
            ("home/hall/say", "it is too warm in here"),
            ("home/kitchen/say", "smoke detected in kitchen"),
        ],
    )
    .await;
    assert_eq!(records.len(), 2);
    let hash = blake3::hash(&std::fs::read(&model).unwrap())
        .to_hex()
        .to_string();
    for r in &records {
        assert_eq!(r.model.hash.as_deref(), Some(hash.as_str()));
        assert_eq!(r.model.id, "SmolLM2-135M-Instruct.Q4_1");
        assert!(r.completion.completion_tokens > 0, "{r:?}");
        assert_eq!(r.completion.error, None, "{r:?}");
    }
    let again = replay_with(&s, limits, engine, &records).await;
    assert!(
        again.iter().all(|c| c.changed.is_empty()),
        "{again:?}\nrecorded: {records:?}"
    );
}

/// A record whose prompt is `user_bytes` long, built without a runtime.
fn synthetic_record(user_bytes: usize) -> DecisionRecord {
    serde_json::from_value(serde_json::json!({
        "v": 1, "timestamp": 0, "rule": "r", "device": "d",
        "window_start": 0, "window_end": 0, "window": [],
        "prompt_plugin": {"name": "p", "version": "000000000000"},
        "postprocess_plugin": {"name": "q", "version": "000000000000"},
        "model": {"id": "m", "hash": null},
        "prompt": {
            "system": "", "user": "x".repeat(user_bytes), "max_tokens": 1,
            "temperature": 0.0, "top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0,
            "seed": null, "stop": [], "deadline_ms": null,
            "constraint": "none", "constraint_value": null
        },
        "completion": {"text": "", "finish": "stop", "prompt_tokens": 0,
            "completion_tokens": 0, "error": null},
        "actions": [], "error": null,
        "timings": {"prompt_ms": 0.0, "llm_ms": 0.0, "postprocess_ms": 0.0}
    }))
    .unwrap()
}

#[cfg(unix)]
#[test]
fn a_stalled_audit_disk_cannot_queue_decisions_without_bound() {
    use std::io::Read as _;
    // A FIFO nobody reads yet stands for a disk that stopped: the writer
    // thread blocks on its first record (larger than the pipe's buffer).
    let root = scratch("audit-queue");
    let path = root.join("a.jsonl");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    let reader = {
        let path = path.clone();
        std::thread::spawn(move || std::fs::File::open(path).unwrap())
    };
    let log = AuditLog::open(
        &AuditConfig {
            path: path.clone(),
            queue: 4,
            ..AuditConfig::default()
        },
        None,
    )
    .unwrap();
    let mut reader = reader.join().unwrap();
    let big = synthetic_record(200_000);
    let started = std::time::Instant::now();
    for _ in 0..200 {
        log.append(&big);
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "appending never waits for the writer: {:?}",
        started.elapsed()
    );
    // At most the queue and the record being written are kept.
    let dropped = log.dropped();
    assert!((195..=196).contains(&dropped), "{dropped} dropped");
    // The disk comes back: what was kept is written, whole.
    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        text
    });
    log.flush();
    drop(log);
    let text = drain.join().unwrap();
    let lines = text.lines().count() as u64;
    assert_eq!(lines + dropped, 200);
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<DecisionRecord>(l).is_ok())
    );
}

#[cfg(unix)]
#[test]
fn audit_log_files_are_not_readable_by_other_users() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = scratch("audit-mode");
    let path = root.join("a.jsonl");
    // A log left world-readable by an earlier version is made private too.
    std::fs::write(&path, "").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = AuditLog::open(
        &AuditConfig {
            path: path.clone(),
            max_mib: 1,
            keep: 2,
            ..AuditConfig::default()
        },
        None,
    )
    .unwrap();
    let big = synthetic_record(300_000);
    for _ in 0..8 {
        log.append(&big);
    }
    log.flush();
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    for p in [path.clone(), numbered(1), numbered(2)] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
}
