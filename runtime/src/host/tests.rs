//! The host interfaces called directly, as a guest's import would: the model
//! budgets per stage call and plugin log lines.

use super::v0_1_0::bindings::ganglion::plugin::{llm, log, types};
use super::{BindingCtx, HostState};
use crate::config::Limits;
use crate::llm::{FakeLlm, LlmEngine};
use crate::state::StateStore;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn state(limits: Limits, engine: Arc<dyn LlmEngine>) -> HostState {
    HostState::new(Arc::new(BindingCtx {
        plugin: "p".into(),
        version: "v".into(),
        rule: "r".into(),
        config: serde_json::Map::new(),
        config_json: "{}".into(),
        state: StateStore::in_memory().scope("p", "r"),
        limits,
        grants: Default::default(),
        llm: engine,
        suppressed_logs: AtomicU64::new(0),
    }))
}

fn params() -> types::GenerationParams {
    types::GenerationParams {
        max_tokens: 8,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repeat_penalty: 1.0,
        seed: None,
        stop: Vec::new(),
        deadline_ms: None,
        constraint: types::Constraint::None,
    }
}

async fn generate(s: &mut HostState) -> Result<types::Completion, types::LlmError> {
    llm::Host::generate(s, llm::Input::Raw("hi".into()), params())
        .await
        .expect("a refusal is a guest-visible error, not a trap")
}

/// What a new stage call does to the per-call accounting (`Instance::begin`).
fn next_call(s: &mut HostState) {
    s.clock.llm_calls = 0;
    s.clock.llm_time = Duration::ZERO;
}

#[tokio::test]
async fn a_plugin_looping_on_generate_is_refused_after_its_call_budget() {
    let fake = FakeLlm::fixed("ok");
    let mut s = state(
        Limits {
            max_llm_calls_per_call: 3,
            ..Limits::default()
        },
        fake.clone(),
    );
    let mut refused = 0;
    for _ in 0..1000 {
        match generate(&mut s).await {
            Ok(c) => assert_eq!(c.text, "ok"),
            Err(types::LlmError::InvalidInput(m)) => {
                assert!(m.contains("max_llm_calls_per_call"), "{m}");
                refused += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(refused, 997);
    assert_eq!(
        fake.requests().len(),
        3,
        "refused calls never reach the model"
    );
    // Embedding and classifying share the budget.
    let embed = llm::Host::embed(&mut s, vec!["a".into()]).await.unwrap();
    assert!(
        matches!(embed, Err(types::LlmError::InvalidInput(_))),
        "{embed:?}"
    );
    // The next stage call has a fresh budget.
    next_call(&mut s);
    assert!(generate(&mut s).await.is_ok());
}

#[tokio::test]
async fn a_plugin_cannot_wait_on_the_model_past_its_time_budget() {
    let slow = FakeLlm::with_delay(Duration::from_millis(50), |_| Ok("slow".into()));
    let mut s = state(
        Limits {
            max_llm_calls_per_call: 1000,
            max_llm_time_per_call_ms: 120,
            ..Limits::default()
        },
        slow.clone(),
    );
    let started = std::time::Instant::now();
    let mut answered = 0;
    let mut refused = 0;
    for _ in 0..100 {
        match generate(&mut s).await {
            Ok(_) => answered += 1,
            Err(types::LlmError::DeadlineExceeded) => refused += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // 50 ms each: two answer (one on a loaded machine), the next is cut at
    // the budget's 120 ms, and every later one is refused at once.
    assert!((1..=2).contains(&answered), "{answered} answered");
    assert_eq!(refused, 100 - answered);
    assert_eq!(slow.requests().len(), answered, "cut calls do not answer");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(s.clock.llm_time >= Duration::from_millis(120));
    assert!(s.clock.llm_time < Duration::from_secs(1));
    next_call(&mut s);
    assert!(generate(&mut s).await.is_ok());
}

#[tokio::test]
async fn classify_and_embed_refuse_too_many_or_too_large_texts() {
    let mut s = state(
        Limits {
            max_texts_per_request: 4,
            max_text_bytes_per_request: 100,
            ..Limits::default()
        },
        FakeLlm::fixed("ok"),
    );
    let labels = |n: usize| (0..n).map(|i| format!("l{i}")).collect::<Vec<_>>();
    let ok = llm::Host::classify(&mut s, "text".into(), labels(4))
        .await
        .unwrap();
    assert_eq!(ok.unwrap().len(), 4);
    let many = llm::Host::classify(&mut s, "text".into(), labels(5))
        .await
        .unwrap();
    assert!(
        matches!(&many, Err(types::LlmError::InvalidInput(m)) if m.contains("5 labels") && m.contains("max_texts_per_request")),
        "{many:?}"
    );
    let long_text = llm::Host::classify(&mut s, "x".repeat(99), labels(1))
        .await
        .unwrap();
    assert!(
        matches!(&long_text, Err(types::LlmError::InvalidInput(m)) if m.contains("max_text_bytes_per_request")),
        "{long_text:?}"
    );
    next_call(&mut s);
    let ok = llm::Host::embed(&mut s, labels(4)).await.unwrap();
    assert_eq!(ok.unwrap().len(), 4);
    let many = llm::Host::embed(&mut s, labels(65)).await.unwrap();
    assert!(
        matches!(&many, Err(types::LlmError::InvalidInput(m)) if m.contains("65 texts")),
        "{many:?}"
    );
    let large = llm::Host::embed(&mut s, vec!["y".repeat(60), "z".repeat(41)])
        .await
        .unwrap();
    assert!(
        matches!(&large, Err(types::LlmError::InvalidInput(m)) if m.contains("101 bytes")),
        "{large:?}"
    );
}

/// The `message` of every event logged while `f` runs, as it reached tracing.
fn captured(f: impl FnOnce()) -> Vec<String> {
    use tracing_subscriber::layer::SubscriberExt as _;

    struct Capture(Arc<Mutex<Vec<String>>>);
    struct Message(String);
    impl tracing::field::Visit for Message {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
    }
    let lines = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Capture(lines.clone()));
    tracing::subscriber::with_default(subscriber, f);
    lines.lock().unwrap().clone()
}

#[test]
fn plugin_log_escape_sequences_are_neutralised() {
    let mut s = state(Limits::default(), Arc::new(crate::llm::NoModel));
    let hostile =
        "\u{1b}[2J\u{1b}]0;owned\u{7}fake\r\nERROR gateway: forged\0tail\u{9b}31m\u{202e}txt";
    let lines = captured(|| log::Host::log(&mut s, log::Level::Warn, hostile.into()).unwrap());
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert!(
        !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
        "{line:?}"
    );
    assert_eq!(
        line,
        r"\u{1b}[2J\u{1b}]0;owned\u{7}fake\r\nERROR gateway: forged\u{0}tail\u{9b}31m\u{202e}txt"
    );
}

#[test]
fn plugin_log_lines_are_cut_at_max_log_line_bytes() {
    let mut s = state(
        Limits {
            max_log_line_bytes: 64,
            ..Limits::default()
        },
        Arc::new(crate::llm::NoModel),
    );
    let long = "é".repeat(1000);
    let lines = captured(|| {
        log::Host::log(&mut s, log::Level::Info, long.clone()).unwrap();
        log::Host::log(&mut s, log::Level::Info, "short".into()).unwrap();
    });
    let marker = "… [1936 bytes cut]";
    assert_eq!(lines[0], format!("{}{marker}", "é".repeat(32)));
    assert_eq!(lines[1], "short");
    // Escapes count towards the cap: 12 escaped ESCs are 72 bytes.
    let escaped =
        captured(|| log::Host::log(&mut s, log::Level::Info, "\u{1b}".repeat(12)).unwrap());
    assert_eq!(
        escaped[0],
        format!("{}… [2 bytes cut]", r"\u{1b}".repeat(10))
    );
}

/// `ganglion new` gives projects the contract the host serves.
#[test]
fn new_projects_get_the_version_the_host_serves() {
    assert_eq!(ganglion_tools::WIT_VERSION, super::WIT_VERSION);
    assert!(
        ganglion_tools::WIT
            .lines()
            .any(|l| l == format!("package {};", super::PACKAGE))
    );
}
