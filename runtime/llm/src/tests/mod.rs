use crate::testing::{TinySpec, write_tiny_model};
use crate::*;
use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod batching;
mod reference;

fn model_file(dir: &Path, spec: &TinySpec) -> PathBuf {
    let path = dir.join(format!("{}-{:?}-{}.gguf", spec.arch, spec.dtype, spec.seed));
    write_tiny_model(&path, spec).unwrap();
    path
}

fn engine(spec: &TinySpec) -> (Engine, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let path = model_file(dir.path(), spec);
    let config = EngineConfig {
        path: Some(path),
        ..Default::default()
    };
    let (engine, summary) = Engine::load_with_progress(&config, false).unwrap();
    assert_eq!(summary.unwrap().layers, spec.layers);
    (engine, dir)
}

mod tempdir {
    /// A folder removed on drop; the engine crate has no test dependencies
    /// beyond the workspace's.
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("ganglion-llm-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn raw(prompt: &str, params: GenerationParams) -> GenerateRequest {
    GenerateRequest {
        input: LlmInput::Raw(prompt.into()),
        params,
        rule: "test".into(),
    }
}

fn chat(user: &str, params: GenerationParams) -> GenerateRequest {
    GenerateRequest {
        input: LlmInput::Chat(vec![ChatMessage {
            role: Role::User,
            content: user.into(),
        }]),
        params,
        rule: "test".into(),
    }
}

fn greedy(max_tokens: u32) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn tokenizer_round_trips_text_and_splits_digits() {
    let (engine, _dir) = engine(&TinySpec::default());
    let t = engine.tokenizer().unwrap();
    for text in [
        "the temperature in the kitchen is 23.5 °C",
        "  leading spaces, tabs\tand\nnewlines  ",
        "ünïcödé 温度 🔥 {\"alarm\": true}",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids), text);
    }
    // smollm splits digits one by one, so "123" is three tokens.
    assert_eq!(t.encode("123").unwrap().len(), 3);
    // Merges apply: " the" is a single token.
    assert_eq!(t.encode(" the").unwrap().len(), 1);
    // Special tokens written in text are recognised.
    assert_eq!(t.encode("<|im_start|>").unwrap(), vec![1]);
}

#[test]
fn chat_template_renders_chatml() {
    let (engine, _dir) = engine(&TinySpec::default());
    let t = engine.tokenizer().unwrap();
    let text = t
        .apply_chat_template(&[
            ChatMessage {
                role: Role::System,
                content: "be brief".into(),
            },
            ChatMessage {
                role: Role::User,
                content: "hi".into(),
            },
        ])
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[tokio::test]
async fn greedy_decoding_is_deterministic_and_respects_max_tokens() {
    let (engine, _dir) = engine(&TinySpec::default());
    let a = engine
        .generate(chat("hello there", greedy(12)))
        .await
        .unwrap();
    let b = engine
        .generate(chat("hello there", greedy(12)))
        .await
        .unwrap();
    assert_eq!(a.text, b.text);
    assert!(a.usage.completion_tokens <= 12);
    assert!(a.usage.prompt_tokens > 5);
    assert_eq!(a.model, "llama-Q8_0-42");
    if a.finish_reason == FinishReason::Length {
        assert_eq!(a.usage.completion_tokens, 12);
    }
    let one = engine.generate(raw("abc", greedy(1))).await.unwrap();
    assert!(one.usage.completion_tokens <= 1);
}

#[tokio::test]
async fn seeded_sampling_is_reproducible() {
    let (engine, _dir) = engine(&TinySpec::default());
    let params = |seed| GenerationParams {
        max_tokens: 24,
        temperature: 1.5,
        seed: Some(seed),
        ..Default::default()
    };
    let a = engine.generate(raw("sensor", params(7))).await.unwrap();
    let b = engine.generate(raw("sensor", params(7))).await.unwrap();
    assert_eq!(a.text, b.text);
    let mut differs = false;
    for seed in 8..14 {
        let c = engine.generate(raw("sensor", params(seed))).await.unwrap();
        differs |= c.text != a.text;
    }
    assert!(differs, "six other seeds all gave the same text");
}

#[tokio::test]
async fn stop_sequences_cut_the_text() {
    let (engine, _dir) = engine(&TinySpec::default());
    let full = engine.generate(raw("x", greedy(40))).await.unwrap();
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 4, "too short to cut: {:?}", full.text);
    let stop: String = chars[2..4].iter().collect();
    let expected: String = full.text[..full.text.find(&stop).unwrap()].to_owned();
    let params = GenerationParams {
        stop: vec![stop.clone()],
        ..greedy(40)
    };
    let cut = engine.generate(raw("x", params)).await.unwrap();
    assert_eq!(cut.text, expected);
    assert_eq!(cut.finish_reason, FinishReason::Stop);
}

fn constrained(constraint: Constraint, seed: u64) -> GenerationParams {
    GenerationParams {
        max_tokens: 200,
        temperature: 1.0,
        seed: Some(seed),
        constraint,
        ..Default::default()
    }
}

#[tokio::test]
async fn json_schema_constraint_gives_valid_json_from_random_weights() {
    let (engine, _dir) = engine(&TinySpec::default());
    let schema = r#"{"type":"object","properties":{"action":{"enum":["fan_on","fan_off","alert"]},"level":{"type":"integer","minimum":0,"maximum":9},"note":{"type":"string","maxLength":8}},"required":["action","level","note"],"additionalProperties":false}"#;
    for seed in 0..4 {
        let c = engine
            .generate(chat(
                "decide",
                constrained(Constraint::JsonSchema(schema.into()), seed),
            ))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&c.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", c.text));
        assert!(["fan_on", "fan_off", "alert"].contains(&v["action"].as_str().unwrap()));
        let level = v["level"].as_i64().unwrap();
        assert!((0..=9).contains(&level));
        assert!(v["note"].as_str().unwrap().chars().count() <= 8);
        assert_eq!(v.as_object().unwrap().len(), 3);
        assert!(matches!(
            c.finish_reason,
            FinishReason::Stop | FinishReason::ConstraintComplete
        ));
    }
}

#[tokio::test]
async fn choice_and_regex_constraints_hold() {
    let (engine, _dir) = engine(&TinySpec::default());
    let choices = vec!["alarm".to_string(), "routine".into(), "unknown".into()];
    for seed in 0..4 {
        let c = engine
            .generate(chat(
                "classify",
                constrained(Constraint::Choice(choices.clone()), seed),
            ))
            .await
            .unwrap();
        assert!(choices.contains(&c.text), "{:?}", c.text);
        let r = engine
            .generate(raw(
                "code",
                constrained(Constraint::Regex("[A-F][0-9]{3}-(ok|fail)".into()), seed),
            ))
            .await
            .unwrap();
        let bytes = r.text.as_bytes();
        assert_eq!(
            bytes.len(),
            if r.text.ends_with("fail") { 9 } else { 7 },
            "{:?}",
            r.text
        );
        assert!((b'A'..=b'F').contains(&bytes[0]), "{:?}", r.text);
        assert!(bytes[1..4].iter().all(u8::is_ascii_digit), "{:?}", r.text);
        assert!(
            r.text[4..] == *"-ok" || r.text[4..] == *"-fail",
            "{:?}",
            r.text
        );
    }
}

#[tokio::test]
async fn bad_constraints_are_errors() {
    let (engine, _dir) = engine(&TinySpec::default());
    let e = engine
        .generate(raw(
            "x",
            constrained(Constraint::JsonSchema("{not json".into()), 0),
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, LlmError::InvalidInput(_)), "{e:?}");
    let e = engine
        .generate(raw("x", constrained(Constraint::Regex("(".into()), 0)))
        .await
        .unwrap_err();
    assert!(matches!(e, LlmError::InvalidInput(_)), "{e:?}");
    let e = engine
        .generate(raw("x", constrained(Constraint::Choice(vec![]), 0)))
        .await
        .unwrap_err();
    assert!(matches!(e, LlmError::InvalidInput(_)), "{e:?}");
}

#[tokio::test]
async fn classify_returns_a_distribution_and_count_tokens_counts() {
    let (engine, _dir) = engine(&TinySpec::default());
    let labels = vec!["alarm".to_string(), "routine maintenance".into()];
    let p = engine
        .classify("smoke in the kitchen".into(), labels)
        .await
        .unwrap();
    assert_eq!(p.len(), 2);
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    assert!(p.iter().all(|x| x.is_finite() && *x >= 0.0));
    // The same label twice scores the same, through the batched path for
    // multi-token labels too.
    for label in ["alarm", "routine maintenance"] {
        let p = engine
            .classify("smoke".into(), vec![label.into(), label.into(), "x".into()])
            .await
            .unwrap();
        assert!((p[0] - p[1]).abs() < 1e-5, "{label}: {p:?}");
    }
    assert_eq!(engine.count_tokens("123").unwrap(), 3);
    let e = engine.classify("x".into(), vec![]).await.unwrap_err();
    assert!(matches!(e, LlmError::InvalidInput(_)));
    let e = engine.embed(vec!["x".into()]).await.unwrap_err();
    assert_eq!(e, LlmError::ModelNotLoaded);
}

#[tokio::test]
async fn every_supported_quant_type_and_family_generates() {
    let cases = [
        ("llama", GgmlDType::Q4_0, 64, 128),
        ("llama", GgmlDType::Q4_1, 64, 128),
        ("llama", GgmlDType::Q5_0, 64, 128),
        ("llama", GgmlDType::Q8_0, 64, 128),
        ("llama", GgmlDType::Q4K, 256, 256),
        ("llama", GgmlDType::Q6K, 256, 256),
        ("qwen2", GgmlDType::Q8_0, 64, 128),
        ("qwen3", GgmlDType::Q4_1, 64, 128),
    ];
    for (arch, dtype, width, ff) in cases {
        let spec = TinySpec {
            arch,
            dtype,
            width,
            feed_forward: ff,
            tied: arch != "qwen2",
            ..Default::default()
        };
        let (engine, _dir) = engine(&spec);
        let c = engine.generate(chat("hi", greedy(6))).await.unwrap();
        let again = engine.generate(chat("hi", greedy(6))).await.unwrap();
        assert_eq!(c.text, again.text, "{arch} {dtype:?}");
        assert!(c.usage.completion_tokens >= 1, "{arch} {dtype:?}");
    }
}

#[test]
fn bad_model_files_are_clear_errors() {
    let dir = tempdir::Dir::new();
    let load = |path: PathBuf| {
        let config = EngineConfig {
            path: Some(path),
            ..Default::default()
        };
        match Engine::load_with_progress(&config, false) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    };
    let missing = dir.path().join("absent.gguf");
    let e = load(missing.clone());
    assert!(e.contains("absent.gguf") && e.contains("not found"), "{e}");

    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "hello, not a model").unwrap();
    let e = load(text);
    assert!(
        e.contains("notes.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );

    let good = model_file(dir.path(), &TinySpec::default());
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load(cut);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");

    let mamba = model_file(
        dir.path(),
        &TinySpec {
            arch: "mamba",
            ..Default::default()
        },
    );
    let e = load(mamba);
    assert!(e.contains("architecture 'mamba' is not supported"), "{e}");

    let odd = model_file(
        dir.path(),
        &TinySpec {
            pre: "klingon",
            seed: 9,
            ..Default::default()
        },
    );
    let e = load(odd);
    assert!(e.contains("tokenizer.ggml.pre = 'klingon'"), "{e}");
}

#[tokio::test]
async fn a_full_queue_is_overloaded_and_expired_requests_are_refused() {
    let dir = tempdir::Dir::new();
    let path = model_file(dir.path(), &TinySpec::default());
    let config = EngineConfig {
        path: Some(path),
        queue: 1,
        max_batch: 1,
        ..Default::default()
    };
    let (engine, _) = Engine::load_with_progress(&config, false).unwrap();
    let slow = || {
        engine.generate(raw(
            "x",
            GenerationParams {
                max_tokens: 300,
                ..Default::default()
            },
        ))
    };
    let futures: Vec<_> = (0..8).map(|_| slow()).collect();
    let results = futures_join(futures).await;
    let overloaded = results
        .iter()
        .filter(|r| matches!(r, Err(LlmError::Overloaded)))
        .count();
    assert!(overloaded >= 5, "{overloaded} of 8 were refused");
    assert!(results.iter().any(|r| r.is_ok()));
    let expired = engine
        .generate(raw(
            "x",
            GenerationParams {
                deadline_ms: Some(0),
                ..greedy(5)
            },
        ))
        .await;
    assert_eq!(expired.unwrap_err(), LlmError::DeadlineExceeded);
}

async fn futures_join<T: Send + 'static>(
    futures: Vec<impl Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[test]
fn device_choice_is_checked() {
    let cfg = |d: &str| EngineConfig {
        device: d.into(),
        ..Default::default()
    };
    assert!(cfg("cpu").device().unwrap().is_cpu());
    let e = cfg("tpu").device().unwrap_err().to_string();
    assert!(e.contains("'tpu' is not one of cpu, cuda, cuda:N"), "{e}");
    if !cfg!(feature = "cuda") {
        let e = cfg("cuda:0").device().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}

/// A `tokenizer.json` beside the model is used instead of the metadata, so
/// a model whose pre-tokenizer the engine does not know still loads.
#[test]
fn a_tokenizer_json_beside_the_model_is_used() {
    let dir = tempdir::Dir::new();
    let path = model_file(
        dir.path(),
        &TinySpec {
            pre: "klingon",
            ..Default::default()
        },
    );
    crate::testing::write_tokenizer_json(&dir.path().join("tokenizer.json")).unwrap();
    let config = EngineConfig {
        path: Some(path),
        ..Default::default()
    };
    let (engine, _) = Engine::load_with_progress(&config, false).unwrap();
    let t = engine.tokenizer().unwrap();
    assert_eq!(t.source, dir.path().join("tokenizer.json"));
    let text = "the alarm in the kitchen: 42";
    let ids = t.encode(text).unwrap();
    assert_eq!(t.decode(&ids), text);
    assert_eq!(t.encode("<|im_end|>").unwrap(), vec![2]);
}

/// Everything a streaming request sent, then its completion.
async fn streamed(
    engine: &Engine,
    request: GenerateRequest,
    capacity: usize,
) -> (Vec<String>, Completion) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(capacity);
    let completion = engine.generate_streaming(request, tx).await.unwrap();
    let mut pieces = Vec::new();
    while let Ok(p) = rx.try_recv() {
        pieces.push(p);
    }
    (pieces, completion)
}

#[tokio::test]
async fn streamed_pieces_are_the_completions_text_in_order() {
    let (engine, _dir) = engine(&TinySpec::default());
    let whole = engine.generate(raw("x", greedy(60))).await.unwrap();
    let (pieces, completion) = streamed(&engine, raw("x", greedy(60)), 256).await;
    assert_eq!(completion, whole);
    assert!(pieces.len() > 10, "one piece per token or so: {pieces:?}");
    let joined = pieces.concat();
    assert!(
        whole.text.starts_with(&joined),
        "{joined:?} is not the start of {:?}",
        whole.text
    );
    assert!(pieces.iter().all(|p| !p.is_empty()));
}

#[tokio::test]
async fn a_full_stream_channel_holds_text_back_without_losing_it() {
    let (engine, _dir) = engine(&TinySpec::default());
    let whole = engine.generate(raw("x", greedy(60))).await.unwrap();
    // Nobody reads while it runs: one piece gets in, the rest stays in the
    // completion.
    let (pieces, completion) = streamed(&engine, raw("x", greedy(60)), 1).await;
    assert_eq!(pieces.len(), 1);
    assert_eq!(completion.text, whole.text);
    assert!(whole.text.starts_with(&pieces[0]));
}

#[tokio::test]
async fn streamed_text_never_shows_part_of_a_stop_string() {
    let (engine, _dir) = engine(&TinySpec::default());
    let full = engine.generate(raw("x", greedy(40))).await.unwrap();
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 6, "too short to cut: {:?}", full.text);
    let stop: String = chars[3..6].iter().collect();
    let params = GenerationParams {
        stop: vec![stop.clone()],
        ..greedy(40)
    };
    let (pieces, completion) = streamed(&engine, raw("x", params), 256).await;
    assert_eq!(completion.finish_reason, FinishReason::Stop);
    let joined = pieces.concat();
    assert!(
        completion.text.starts_with(&joined),
        "streamed {joined:?}, completion {:?}",
        completion.text
    );
    assert!(!joined.contains(&stop));
}

#[test]
fn stream_cuts_hold_back_a_partial_character_and_stop_prefixes() {
    use crate::scheduler::safe_end;
    assert_eq!(safe_end("abc", &[]), 3);
    assert_eq!(safe_end("ab\u{FFFD}", &[]), 2);
    assert_eq!(safe_end("hello wor", &["world".into()]), 6);
    assert_eq!(safe_end("hello w", &["world".into(), "xyz".into()]), 6);
    assert_eq!(safe_end("hello", &["world".into()]), 5);
    assert_eq!(safe_end("ab°", &["°C".into()]), 2);
}
