//! The native engine behind the WIT `llm` interface: a tiny random-weight
//! model written by the test, and the real default model (SmolLM2-135M,
//! fetched by `cargo run -p xtask -- model`, as `.ci/run` does).

use ganglion::config::Limits;
use ganglion::llm::{GenerateRequest, LlmEngine, LlmInput};
use ganglion::types::*;
use ganglion_llm::testing::{TinySpec, write_tiny_model};
use ganglion_llm::{Engine, EngineConfig};
use ganglion_tests::*;
use serde_json::json;
use std::sync::{Arc, OnceLock};

fn msg(payload: &str) -> Message {
    Message {
        topic: "home/livingroom/say".into(),
        payload: payload.as_bytes().to_vec(),
        timestamp: 1,
    }
}

fn tiny_engine() -> Engine {
    let dir = scratch("tiny-engine");
    let path = dir.join("tiny.gguf");
    write_tiny_model(&path, &TinySpec::default()).unwrap();
    let config = EngineConfig {
        path: Some(path),
        ..Default::default()
    };
    Engine::load_with_progress(&config, false).unwrap().0
}

/// The default model's path, which the test command fetches.
fn default_model() -> std::path::PathBuf {
    let model = xtask::model_path();
    assert!(
        model.exists(),
        "the default model is missing: `cargo run -p xtask -- model`"
    );
    model
}

/// The default model and the embedding model, loaded once for the tests
/// that use them.
fn real_engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let model = xtask::model_path();
            let embedding = xtask::embedding_path();
            assert!(
                model.exists() && embedding.exists(),
                "the default models are missing: run `cargo run -p xtask -- model` (the test command does)"
            );
            let config = EngineConfig {
                path: Some(model),
                embedding: Some(embedding),
                ..Default::default()
            };
            Engine::load_with_progress(&config, false)
                .unwrap_or_else(|e| panic!("{e}"))
                .0
        })
        .clone()
}

const ACTIONS: [&str; 4] = ["fan_on", "fan_off", "alert", "none"];

/// What the `llm-action` fixture returns: the completion text, parsed, and
/// the finish reason.
async fn ask_fixture_for_an_action(engine: Engine, text: &str) -> (serde_json::Value, String) {
    let limits = Limits {
        llm_timeout_ms: 120_000,
        ..Limits::default()
    };
    let host = host_with(limits, Arc::new(engine));
    let pool = pool(
        &host,
        &fixture("misbehave"),
        "home",
        json!({ "mode": "llm-action" }),
    )
    .await;
    let out = pool
        .preprocess(&msg(text), ReadingBatch::default())
        .await
        .unwrap();
    let readings: Vec<_> = out.iter().collect();
    let Value::Text(completion) = readings[0].value else {
        panic!("no completion text: {readings:?}")
    };
    let Value::Text(finish) = readings[1].value else {
        panic!("no finish reason: {readings:?}")
    };
    let v = serde_json::from_str(completion)
        .unwrap_or_else(|e| panic!("completion is not JSON ({e}): {completion:?}"));
    (v, finish.clone())
}

fn assert_action(v: &serde_json::Value) {
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), 3, "{v}");
    assert!(ACTIONS.contains(&v["action"].as_str().unwrap()), "{v}");
    assert!(v["device"].as_str().unwrap().chars().count() <= 24, "{v}");
    assert!(v["reason"].as_str().unwrap().chars().count() <= 80, "{v}");
}

#[tokio::test]
async fn sdk_plugin_gets_schema_valid_json_from_a_random_model() {
    let (v, finish) = ask_fixture_for_an_action(tiny_engine(), "it is hot").await;
    assert_action(&v);
    assert!(
        finish.ends_with("Stop") || finish.ends_with("ConstraintComplete"),
        "{finish}"
    );
}

#[tokio::test]
async fn sdk_plugin_gets_schema_valid_json_from_the_default_model() {
    let (v, finish) =
        ask_fixture_for_an_action(real_engine(), "it's too warm in the bedroom").await;
    assert_action(&v);
    assert!(
        finish.ends_with("Stop") || finish.ends_with("ConstraintComplete"),
        "{finish}"
    );
}

/// llama.cpp's ids for the same GGUF, produced by
/// tests/fixtures/llm/llama_cpp_tokens.py (its docstring has the command).
#[test]
fn default_tokenizer_matches_llama_cpp() {
    let engine = real_engine();
    let tokenizer = engine.tokenizer().unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(wat_fixture("llm/smollm2-tokens.json")).unwrap(),
    )
    .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, expected, "ids differ for {text:?}");
        let plain = tokenizer.decode(&ids);
        if !text.contains("<|") {
            assert_eq!(plain, text, "round trip of {text:?}");
        }
    }
}

#[tokio::test]
async fn default_model_generates_within_its_limits() {
    let engine = real_engine();
    let request = GenerateRequest {
        input: LlmInput::Chat(vec![ChatMessage {
            role: Role::User,
            content: "Name one colour.".into(),
        }]),
        params: GenerationParams {
            max_tokens: 16,
            ..Default::default()
        },
        rule: "t".into(),
    };
    let a = LlmEngine::generate(&engine, request.clone()).await.unwrap();
    let b = LlmEngine::generate(&engine, request).await.unwrap();
    assert_eq!(a.text, b.text, "greedy decoding is deterministic");
    assert!(!a.text.trim().is_empty());
    assert!(a.usage.completion_tokens <= 16);
    assert!(a.model.contains("SmolLM2"), "{}", a.model);
    let n = LlmEngine::count_tokens(&engine, "smoke detected in kitchen".into())
        .await
        .unwrap();
    assert_eq!(
        n, 5,
        "llama.cpp's count, see tests/fixtures/llm/smollm2-tokens.json"
    );
}

#[tokio::test]
async fn classify_ranks_the_obvious_label_first() {
    let engine = real_engine();
    let cases = [
        ("smoke detected in kitchen", ["alarm", "routine"], 0),
        (
            "daily heartbeat: all sensors reporting normally",
            ["alarm", "routine"],
            1,
        ),
        (
            "water leak detected under the sink, floor is flooding",
            ["routine", "alarm"],
            1,
        ),
        (
            "carbon monoxide level critical in garage",
            ["routine", "alarm"],
            1,
        ),
        ("weekly battery check passed", ["routine", "alarm"], 0),
        (
            "firmware update completed successfully on thermostat",
            ["alarm", "routine"],
            1,
        ),
    ];
    for (text, labels, expected) in cases {
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let p = LlmEngine::classify(&engine, text.into(), labels.clone())
            .await
            .unwrap();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-3);
        let best = if p[0] >= p[1] { 0 } else { 1 };
        assert_eq!(best, expected, "{text:?}: {labels:?} scored {p:?}");
    }
}

#[tokio::test]
async fn embed_puts_related_sentences_closer() {
    let engine = real_engine();
    let texts: Vec<String> = [
        "The machine temperature is rising above the normal range.",
        "The equipment is overheating.",
        "The football match ended in a draw.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let v = LlmEngine::embed(&engine, texts).await.unwrap();
    assert_eq!(v.len(), 3);
    assert_eq!(v[0].len(), 384);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for e in &v {
        assert!((dot(e, e) - 1.0).abs() < 1e-3, "not L2-normalised");
    }
    let related = dot(&v[0], &v[1]);
    let unrelated = dot(&v[0], &v[2]);
    assert!(
        related > unrelated + 0.2,
        "related {related} vs unrelated {unrelated}"
    );
}

#[tokio::test]
async fn the_default_model_gives_the_same_answer_on_a_prefix_cache_hit() {
    let model = default_model();
    let load = |mib: usize| {
        // Generous: other model tests share the two cores, and a request
        // cut by its deadline would differ for that reason alone.
        let config = EngineConfig {
            path: Some(model.clone()),
            prefix_cache_mib: mib,
            default_deadline_ms: 600_000,
            ..Default::default()
        };
        Engine::load_with_progress(&config, false).unwrap().0
    };
    let (cached, plain) = (load(64), load(0));
    let system = "You are the controller of a smart home. Devices: living-room lamp, \
                  kitchen fan, hall thermostat, garage door. Answer with one short \
                  sentence naming the device to act on and the action.";
    let request = |user: &str| {
        let params = GenerationParams {
            max_tokens: 24,
            ..Default::default()
        };
        GenerateRequest::system_and_user(system, user, params, "prefix")
    };
    let system_tokens = cached.count_tokens(system).unwrap();
    let first = LlmEngine::generate(&cached, request("it is too dark in here"))
        .await
        .unwrap();
    assert_eq!(first.usage.cached_tokens, 0);
    for user in [
        "the kitchen smells of smoke",
        "open the garage please",
        "it is too dark in here",
    ] {
        let hit = LlmEngine::generate(&cached, request(user)).await.unwrap();
        let miss = LlmEngine::generate(&plain, request(user)).await.unwrap();
        assert_ne!(hit.finish_reason, FinishReason::Deadline, "{hit:?}");
        assert!(hit.usage.cached_tokens >= system_tokens, "{user}: {hit:?}");
        assert_eq!(miss.usage.cached_tokens, 0);
        assert_eq!(hit.text, miss.text, "{user}");
    }
}

#[tokio::test]
async fn eight_concurrent_requests_to_the_default_model_match_running_alone() {
    let model = default_model();
    let config = EngineConfig {
        path: Some(model),
        // A hit would take another path through the model than a miss.
        prefix_cache_mib: 0,
        default_deadline_ms: 600_000,
        ..Default::default()
    };
    let engine = Engine::load_with_progress(&config, false).unwrap().0;
    let readings = [
        "kitchen smoke 0.31, temperature 48 C",
        "garage door open for 40 minutes",
        "hall thermostat 12 C at night",
        "living-room lamp on, nobody home",
        "cellar humidity 91 percent",
        "front door lock battery 4 percent",
        "bedroom CO2 1900 ppm",
        "freezer temperature -2 C",
    ];
    let request = |r: &str| {
        let params = GenerationParams {
            max_tokens: 20,
            ..Default::default()
        };
        GenerateRequest::system_and_user(
            "You watch a smart home. Reply with one short sentence: the device and the action.",
            r,
            params,
            "batch",
        )
    };
    let mut alone = Vec::new();
    for r in readings {
        alone.push(engine.generate(request(r)).await.unwrap());
    }
    let together: Vec<_> = readings
        .iter()
        .map(|r| engine.generate(request(r)))
        .collect();
    let mut results = Vec::new();
    for f in together {
        results.push(f.await.unwrap());
    }
    let stats = engine.stats();
    assert!(stats.largest_batch >= 4, "{stats:?}");
    for ((r, a), t) in readings.iter().zip(&alone).zip(&results) {
        assert_ne!(a.finish_reason, FinishReason::Deadline, "{a:?}");
        assert_eq!(t.text, a.text, "{r}");
        assert_eq!(t.usage, a.usage, "{r}");
    }
}

#[tokio::test]
async fn thirty_two_concurrent_requests_to_the_default_model_stay_within_the_kv_bound() {
    let model = default_model();
    let config = EngineConfig {
        path: Some(model),
        queue: 16,
        max_batch: 32,
        // 45 KiB per token: a request (a prompt of at least 20 tokens and
        // 8 to generate) reserves at least 1.26 MiB, so at most 6 fit.
        kv_cache_mib: 8,
        ..Default::default()
    };
    let engine = Engine::load_with_progress(&config, false).unwrap().0;
    let requests: Vec<_> = (0..32)
        .map(|i| {
            let params = GenerationParams {
                max_tokens: 8,
                deadline_ms: Some([30, 300, 120_000][i % 3]),
                ..Default::default()
            };
            engine.generate(GenerateRequest::system_and_user(
                "You watch a smart home. Reply with one short sentence.",
                format!("sensor {i} reads {} C", 20 + i),
                params,
                format!("rule-{}", i % 4),
            ))
        })
        .collect();
    let mut outcomes = (0, 0, 0);
    for f in requests {
        match f.await {
            Ok(c) if c.finish_reason == FinishReason::Deadline => outcomes.1 += 1,
            Ok(_) => outcomes.0 += 1,
            Err(LlmError::DeadlineExceeded) => outcomes.1 += 1,
            Err(LlmError::Overloaded) => outcomes.2 += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let stats = engine.stats();
    assert!(stats.kv_peak_bytes <= 8 << 20, "{stats:?}");
    assert!(stats.kv_peak_bytes > 2 << 20, "{stats:?}");
    assert!((2..=6).contains(&stats.largest_batch), "{stats:?}");
    let (ok, late, refused) = outcomes;
    assert_eq!(ok + late + refused, 32);
    assert!(ok > 0 && late > 0 && refused > 0, "{outcomes:?}");
    assert_eq!((stats.running, stats.waiting, stats.kv_bytes), (0, 0, 0));
}
