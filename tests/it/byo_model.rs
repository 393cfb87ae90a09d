//! A plugin that brings its own model (plugins/minilm-classify):
//! all-MiniLM-L6-v2 on candle compiled to WebAssembly, weights read from a
//! directory the rule grants, memory and load time set by the rule.
//!
//! Needs models/all-MiniLM-L6-v2 (`cargo run -p xtask -- model`, which the
//! test command runs).

use ganglion::config::{DirGrant, GanglionConfig, Grants, Limits, PluginConfig, PluginLimits};
use ganglion::llm::{FakeLlm, LlmEngine};
use ganglion::plugin::{CallError, InstancePool, PluginHost};
use ganglion::state::StateStore;
use ganglion::types::*;
use ganglion_llm::testing::{TinySpec, write_tiny_model};
use ganglion_llm::{Engine, EngineConfig};
use ganglion_tests::*;
use serde_json::json;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The embedding model's folder, which the test command fetches.
fn model_dir() -> PathBuf {
    let dir = xtask::embedding_path();
    assert!(
        dir.join("model.safetensors").exists(),
        "the embedding model is missing: `cargo run -p xtask -- model`"
    );
    dir
}

/// The built plugin (with the other example plugins, on first use).
fn minilm() -> PathBuf {
    built();
    xtask::model_plugins_dir().join("minilm-classify.wasm")
}

fn grants() -> Grants {
    Grants {
        dirs: vec![DirGrant {
            host: model_dir(),
            guest: "/model".into(),
            write: false,
        }],
        ..Grants::default()
    }
}

/// What a rule sets for the plugin: room for the weights (87 MiB) and a
/// first call that loads them. Timeouts are generous: the tests share two
/// cores, and nothing here measures speed.
fn rule_limits() -> PluginLimits {
    PluginLimits {
        max_memory_mib: Some(160),
        call_timeout_ms: Some(60_000),
        load_timeout_ms: Some(120_000),
    }
}

/// `[plugins.limits]` that let a rule raise a plugin's cap to 256 MiB.
fn host_limits() -> Limits {
    Limits {
        max_plugin_memory_mib: 256,
        max_plugin_timeout_ms: 120_000,
        ..Limits::default()
    }
}

/// A host whose compile cache is shared by the tests of this file: the
/// component (candle and a tokenizer inside) takes seconds to compile.
fn host(limits: Limits) -> PluginHost {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    let cache = CACHE.get_or_init(|| scratch("byo-model-cache"));
    let config = PluginConfig {
        cache_dir: Some(cache.clone()),
        limits,
        total_instances: 16,
        ..PluginConfig::default()
    };
    PluginHost::new(
        config,
        StateStore::in_memory(),
        Arc::new(ganglion::llm::NoModel),
    )
    .expect("plugin host")
}

async fn classifier(settings: serde_json::Value) -> InstancePool {
    let host = host(host_limits());
    let plugin = load(&host, &minilm()).await;
    host.pool_for_rule(&plugin, "home", config(settings), grants(), &rule_limits())
        .expect("limits within the host's bounds")
}

fn msg() -> Message {
    Message {
        topic: "home/kitchen/say".into(),
        payload: b"{}".to_vec(),
        timestamp: 1,
    }
}

/// Text readings of device `kitchen`, metric `speech`.
fn speech(texts: &[&str]) -> ReadingBatch {
    let mut b = ReadingBatch::default();
    for (i, t) in texts.iter().enumerate() {
        b.push("kitchen", "speech", Value::Text((*t).into()), "", i as i64);
    }
    b
}

/// The host engine's `embed`: the embedding model beside a tiny
/// random-weight generator (the engine needs one; `embed` does not use it).
fn host_engine() -> Engine {
    let dir = scratch("byo-model-tiny");
    let path = dir.join("tiny.gguf");
    write_tiny_model(&path, &TinySpec::default()).unwrap();
    let config = EngineConfig {
        path: Some(path),
        embedding: Some(model_dir()),
        ..Default::default()
    };
    Engine::load_with_progress(&config, false)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

const TEXTS: [&str; 8] = [
    "turn on the kitchen light",
    "It's too warm in the bedroom!",
    "smoke detected in kitchen",
    "The boiler makes a knocking noise since Tuesday; please schedule a service visit before the weekend.",
    "nice weather today",
    "lights off please, I'm leaving",
    "Filter replacement due: HVAC unit 3 (hall), 2026-12-01",
    "ünïcödé and CAPITALS — with punctuation…",
];

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

#[tokio::test]
async fn the_plugins_embeddings_equal_the_host_engines() {
    let pool = classifier(json!({ "output": "embedding" })).await;
    let out = pool.preprocess(&msg(), speech(&TEXTS)).await.unwrap();
    let values: Vec<f32> = out
        .iter()
        .map(|r| {
            assert_eq!(r.metric, "embedding");
            match r.value {
                Value::Number(x) => *x as f32,
                other => panic!("not a number: {other:?}"),
            }
        })
        .collect();
    assert_eq!(values.len(), TEXTS.len() * 384, "384 numbers per text");
    let texts = TEXTS.iter().map(|t| t.to_string()).collect();
    let native = LlmEngine::embed(&host_engine(), texts).await.unwrap();
    for ((text, wasm), native) in TEXTS.iter().zip(values.chunks(384)).zip(&native) {
        let c = cosine(wasm, native);
        assert!(c >= 1.0 - 1e-4, "{text:?}: cosine {c}");
    }
}

/// The labels of the smart-home pack's pre-filter rule
/// (examples/packs/smart-home/prefilter/home-commands.toml).
fn pack_settings() -> serde_json::Value {
    let rule: toml::Table = toml::from_str(
        &std::fs::read_to_string(packs::pack("smart-home").join("prefilter/home-commands.toml"))
            .unwrap(),
    )
    .unwrap();
    let pre = rule["preprocess"].as_array().unwrap();
    let minilm = pre
        .iter()
        .find(|p| p["plugin"].as_str() == Some("minilm-classify"))
        .expect("the pre-filter in the pack's rule");
    let mut settings = serde_json::to_value(&minilm["config"]).unwrap();
    settings["keep"] = json!([]);
    settings["label_metric"] = json!("label");
    settings
}

/// Thirty utterances written for this test, none of them a label's example
/// phrase, with the label each must get.
const UTTERANCES: [(&str, &str); 30] = [
    ("could you switch the ceiling lamp on", "command"),
    ("please turn the heating up, I'm freezing", "command"),
    ("open the bedroom window a bit", "command"),
    ("fan off, it's getting cold", "command"),
    ("dim the lights in the living room", "command"),
    ("it is way too hot in here", "command"),
    ("close the window, it's raining in", "command"),
    ("switch everything off, we're going out", "command"),
    ("too dark in here to read", "command"),
    ("can you start the ventilation", "command"),
    ("there is smoke coming from the oven", "alarm"),
    ("the smoke alarm in the hallway is going off", "alarm"),
    ("I can smell gas near the stove", "alarm"),
    ("fire in the garage!", "alarm"),
    (
        "carbon monoxide detector triggered in the basement",
        "alarm",
    ),
    ("water is leaking all over the bathroom floor", "alarm"),
    ("the smoke detector battery is low", "maintenance"),
    ("the boiler needs its yearly service", "maintenance"),
    (
        "replace the air filter of the ventilation unit",
        "maintenance",
    ),
    ("the dishwasher makes a grinding noise", "maintenance"),
    ("thermostat firmware update available", "maintenance"),
    ("the fridge door seal is worn out", "maintenance"),
    ("light bulb in the hall has burned out", "maintenance"),
    ("what a lovely sunny afternoon", "chatter"),
    ("did you watch the football game yesterday", "chatter"),
    ("I'm reading a really good book", "chatter"),
    ("my sister is visiting next week", "chatter"),
    ("what should we cook for dinner tonight", "chatter"),
    ("ha ha, that was a funny joke", "chatter"),
    ("I love this song", "chatter"),
];

#[tokio::test]
async fn thirty_utterances_get_the_expected_labels() {
    let pool = classifier(pack_settings()).await;
    let mut wrong = Vec::new();
    for (text, expected) in UTTERANCES {
        let out = pool.preprocess(&msg(), speech(&[text])).await.unwrap();
        let got: Vec<_> = out.iter().collect();
        assert_eq!(got.len(), 2, "the reading and its label: {got:?}");
        assert_eq!(got[0].value, &Value::Text(text.into()));
        assert_eq!(got[1].metric, "label");
        let Value::Text(label) = got[1].value else {
            panic!("label is not text: {got:?}")
        };
        if label != expected {
            wrong.push(format!("{text:?}: {label}, expected {expected}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let stats = pool.stats();
    assert_eq!(
        (stats.created, stats.calls, stats.idle),
        (1, 30, 1),
        "one instance, loaded once and kept warm"
    );
}

#[tokio::test]
async fn a_plugin_over_its_memory_cap_is_refused_with_a_clear_error() {
    // A rule that gives the first call time but leaves the memory cap at
    // the default 64 MiB, which cannot hold the weights.
    let host = host(host_limits());
    let plugin = load(&host, &minilm()).await;
    let forgot_the_cap = PluginLimits {
        max_memory_mib: None,
        ..rule_limits()
    };
    let pool = host
        .pool_for_rule(
            &plugin,
            "home",
            config(pack_settings()),
            grants(),
            &forgot_the_cap,
        )
        .unwrap();
    let err = pool
        .preprocess(&msg(), speech(&["turn on the light"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::MemoryLimit { limit, .. } if limit == 64 << 20),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("memory cap of 67108864 bytes"),
        "{err}"
    );
    assert_eq!(pool.stats().discarded, 1, "the instance is dropped");

    // A rule asking for more than the host allows is refused when bound.
    let over = PluginLimits {
        max_memory_mib: Some(512),
        ..rule_limits()
    };
    let Err(reason) = host.pool_for_rule(&plugin, "home", config(pack_settings()), grants(), &over)
    else {
        panic!("a cap over max_plugin_memory_mib was accepted")
    };
    assert!(
        reason.contains("max_memory_mib = 512") && reason.contains("max_plugin_memory_mib"),
        "{reason}"
    );
}

/// The pack's pre-filter rule, its granted model folder made absolute (the
/// rule names it relative to the repository root, where `ganglion run`
/// starts).
fn prefilter_rules() -> PathBuf {
    let pack = packs::pack("smart-home");
    let text = std::fs::read_to_string(pack.join("prefilter/home-commands.toml")).unwrap();
    let text = text.replace(
        "\"models/all-MiniLM-L6-v2\"",
        &format!("{:?}", model_dir().display().to_string()),
    );
    let dir = scratch("byo-model-rules");
    std::fs::write(dir.join("home-commands.toml"), text).unwrap();
    dir
}

#[tokio::test]
async fn the_smart_home_prefilter_lets_only_commands_and_alarms_reach_the_model() {
    let plugins = scratch("byo-model-plugins");
    for p in [
        example("clean-readings"),
        example("prompt-template"),
        example("json-actions"),
        minilm(),
    ] {
        std::fs::copy(&p, plugins.join(p.file_name().unwrap())).unwrap();
    }
    let llm = FakeLlm::fixed(
        r#"{"actions":[{"type":"command","device":"kitchen","command":"light","value":"on"}]}"#,
    );
    let mut config = GanglionConfig::default();
    config.audit.enabled = false;
    config.plugins.limits = host_limits();
    let (rt, mut out) = packs::start_with(config, &plugins, &prefilter_rules(), llm.clone()).await;
    let said = [
        ("turn the kitchen light on", true),
        ("smoke detected in kitchen", true),
        ("nice weather today", false),
        ("did you watch the match yesterday", false),
    ];
    for (text, _) in said {
        let (topic, payload) = packs::say("kitchen", text);
        rt.push(topic, payload.into_bytes()).await.unwrap();
    }
    rt.shutdown().await;
    drop(rt);
    let mut outputs = Vec::new();
    while let Some(o) = out.recv().await {
        outputs.push(o);
    }
    let asked: Vec<String> = llm
        .requests()
        .iter()
        .map(|r| format!("{:?}", r.input))
        .collect();
    for (text, reaches) in said {
        assert_eq!(
            asked.iter().any(|a| a.contains(text)),
            reaches,
            "{text:?}; the model was asked: {asked:?}"
        );
    }
    assert!(
        !outputs.iter().any(|o| o.topic.contains("dead-letter")),
        "nothing dead-lettered: {outputs:?}"
    );
}
