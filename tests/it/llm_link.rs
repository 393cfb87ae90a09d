//! Plugins reach the model through the WIT `llm` interface; the host waits on
//! the engine outside the guest's deadline and bounds the wait itself.

use ganglion::config::Limits;
use ganglion::llm::{FakeLlm, LlmInput, NoModel};
use ganglion::plugin::CallError;
use ganglion::types::*;
use ganglion_tests::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn msg(payload: &str) -> Message {
    Message {
        topic: "t".into(),
        payload: payload.as_bytes().to_vec(),
        timestamp: 1,
    }
}

#[tokio::test]
async fn generate_reaches_the_engine_and_returns_its_text() {
    let fake = FakeLlm::new(|req| match &req.input {
        LlmInput::Chat(m) => Ok(format!(
            "echo: {}",
            m.last().map(|m| m.content.as_str()).unwrap_or("")
        )),
        LlmInput::Raw(_) => Err(LlmError::InvalidInput("raw not expected".into())),
    });
    let host = host_with(Limits::default(), fake.clone());
    let pool = pool(
        &host,
        &fixture("misbehave"),
        "rule-x",
        json!({ "mode": "llm" }),
    )
    .await;
    let out = pool
        .preprocess(&msg("is it warm?"), ReadingBatch::default())
        .await
        .unwrap();
    assert_eq!(
        out.iter().next().unwrap().value,
        &Value::Text("echo: is it warm?".into())
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].rule, "rule-x");
    assert!(
        matches!(&reqs[0].input, LlmInput::Chat(m) if m[0].role == Role::System && m[0].content == "fixture")
    );
}

#[tokio::test]
async fn slow_model_does_not_count_against_the_plugin_deadline() {
    let fake = FakeLlm::with_delay(Duration::from_millis(400), |_| Ok("late but fine".into()));
    let host = host_with(
        Limits {
            call_timeout_ms: 100,
            ..Limits::default()
        },
        fake,
    );
    let pool = pool(&host, &fixture("misbehave"), "r", json!({ "mode": "llm" })).await;
    let out = pool
        .preprocess(&msg("q"), ReadingBatch::default())
        .await
        .unwrap();
    assert_eq!(
        out.iter().next().unwrap().value,
        &Value::Text("late but fine".into())
    );
}

#[tokio::test]
async fn llm_wait_is_bounded_and_errors_are_typed() {
    let fake = FakeLlm::with_delay(Duration::from_secs(5), |_| Ok("never".into()));
    let host = host_with(
        Limits {
            llm_timeout_ms: 100,
            ..Limits::default()
        },
        fake,
    );
    let pool = pool(&host, &fixture("misbehave"), "r", json!({ "mode": "llm" })).await;
    let r = pool.preprocess(&msg("q"), ReadingBatch::default()).await;
    assert_eq!(
        r,
        Err(CallError::Plugin(PluginError::Llm(
            LlmError::DeadlineExceeded
        )))
    );

    let host = host_with(Limits::default(), Arc::new(NoModel));
    let pool =
        ganglion_tests::pool(&host, &fixture("misbehave"), "r", json!({ "mode": "llm" })).await;
    let r = pool.preprocess(&msg("q"), ReadingBatch::default()).await;
    assert_eq!(
        r,
        Err(CallError::Plugin(PluginError::Llm(
            LlmError::ModelNotLoaded
        )))
    );
    assert_eq!(pool.stats().discarded, 0);
}
