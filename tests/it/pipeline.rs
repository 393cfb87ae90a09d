//! Rule pipelines without a broker: windows, the model stage, CSV intake,
//! dead letters, and the gateway's routing and acknowledgements.

use ganglion::gateway::{Gateway, GatewayConfig};
use ganglion::llm::{FakeLlm, LlmEngine, LlmInput, NoModel};
use ganglion::pipeline::RulePipeline;
use ganglion::rules::Rule;
use ganglion::transport::{AckToken, Delivery, RecordingPublisher};
use ganglion::types::{LlmError, Message};
use ganglion_tests::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

async fn pipeline(text: &str, llm: Arc<dyn LlmEngine>) -> RulePipeline {
    let host = host_with(Default::default(), llm.clone());
    let mut plugins = HashMap::new();
    for name in [
        "clean-readings",
        "prompt-template",
        "json-actions",
        "threshold-alert",
    ] {
        plugins.insert(name.to_owned(), load(&host, &example(name)).await);
    }
    let rule = Rule::parse(text, "r", None).unwrap();
    RulePipeline::new(&host, rule, &plugins, llm).unwrap()
}

fn msg(topic: &str, payload: &str) -> Message {
    Message {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        timestamp: 1_000,
    }
}

fn reading(v: f64) -> String {
    format!(r#"{{"metric":"temperature","value":{v}}}"#)
}

const WINDOWED: &str = r#"
topics = ["t/+/x"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[window]
count = 3
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 50.0 }] }
"#;

#[tokio::test]
async fn count_windows_are_per_device() {
    let p = pipeline(WINDOWED, Arc::new(NoModel)).await;
    for v in [60.0, 10.0] {
        assert!(
            p.process(&msg("t/a/x", &reading(v)))
                .await
                .publish
                .is_empty(),
            "window of a not full"
        );
    }
    assert!(
        p.process(&msg("t/b/x", &reading(70.0)))
            .await
            .publish
            .is_empty(),
        "b has its own window"
    );
    let out = p.process(&msg("t/a/x", &reading(20.0))).await;
    assert_eq!(out.publish.len(), 1, "a's window of 3 ran");
    assert_eq!(out.publish[0].topic, "ganglion/alert/r/a");
    assert!(String::from_utf8_lossy(&out.publish[0].payload).contains("temperature 60 above 50"));
    assert_eq!(p.pending_windows(), 1, "b still open");
    let flushed = p.flush_expired(true).await;
    assert_eq!(flushed.publish.len(), 1, "shutdown runs b's partial window");
    assert_eq!(p.pending_windows(), 0);
}

#[tokio::test]
async fn time_windows_close_on_their_own() {
    let rule = WINDOWED.replace("count = 3", "seconds = 1");
    let p = pipeline(&rule, Arc::new(NoModel)).await;
    assert!(
        p.process(&msg("t/a/x", &reading(99.0)))
            .await
            .publish
            .is_empty()
    );
    assert!(
        p.flush_expired(false).await.publish.is_empty(),
        "not a second old yet"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(p.flush_expired(false).await.publish.len(), 1);
}

const WITH_MODEL: &str = r#"
topics = ["home/+/say"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[prompt]
plugin = "prompt-template"
config = { system = "Commands for {{ device }}.", user = "{% for r in readings %}{{ r.value }}{% endfor %}", max_tokens = 40, choices = ["on", "off"] }
[postprocess]
plugin = "json-actions"
[allow]
commands = [{ device = "{device}", name = "fan", values = ["on", "off"] }]
"#;

#[tokio::test]
async fn the_model_sees_the_rendered_prompt_and_its_answer_becomes_actions() {
    let fake = FakeLlm::fixed(r#"{"type":"command","command":"fan","value":"on"}"#);
    let p = pipeline(WITH_MODEL, fake.clone()).await;
    let out = p
        .process(&msg(
            "home/kitchen/say",
            r#"{"metric":"speech","value":"too warm"}"#,
        ))
        .await;
    assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters);
    assert_eq!(out.publish[0].topic, "ganglion/command/kitchen/fan");
    let req = &fake.requests()[0];
    let LlmInput::Chat(m) = &req.input else {
        panic!("chat expected")
    };
    assert_eq!(
        (m[0].content.as_str(), m[1].content.as_str()),
        ("Commands for kitchen.", "too warm")
    );
    assert_eq!(req.params.max_tokens, 40);
    assert_eq!(req.rule, "r");
    assert_eq!(out.prompts, vec!["too warm".to_owned()]);
}

#[tokio::test]
async fn model_failures_are_dead_letters_and_overload_is_waited_out() {
    let p = pipeline(WITH_MODEL, Arc::new(NoModel)).await;
    let out = p
        .process(&msg(
            "home/kitchen/say",
            r#"{"metric":"speech","value":"hi"}"#,
        ))
        .await;
    assert_eq!(
        (
            out.dead_letters[0].stage.as_str(),
            out.dead_letters[0].kind.as_str()
        ),
        ("llm", "llm-error")
    );

    // Overloaded twice, then an answer: the message waits instead of failing.
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = calls.clone();
    let busy = FakeLlm::new(move |_| {
        if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            Err(LlmError::Overloaded)
        } else {
            Ok(r#"{"type":"command","command":"fan","value":"off"}"#.into())
        }
    });
    let p = pipeline(WITH_MODEL, busy).await;
    let out = p
        .process(&msg(
            "home/kitchen/say",
            r#"{"metric":"speech","value":"hi"}"#,
        ))
        .await;
    assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters);
    assert_eq!(out.publish.len(), 1);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn csv_payloads_are_parsed_by_the_host() {
    let rule = r#"
topics = ["traffic/+/occupancy"]
format = "csv"
[csv]
columns = ["timestamp", "value"]
metric = "occupancy"
unit = "%"
device_from_topic = 1
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "occupancy", above = 20.0 }] }
"#;
    let p = pipeline(rule, Arc::new(NoModel)).await;
    let out = p
        .process(&msg("traffic/6005/occupancy", "2015-09-01 13:45:00,31.5\n"))
        .await;
    assert_eq!(out.readings, 1);
    assert_eq!(out.publish[0].topic, "ganglion/alert/r/6005");
    let bad = p
        .process(&msg("traffic/6005/occupancy", "2015-09-01 13:45:00;31.5\n"))
        .await;
    assert_eq!(bad.dead_letters[0].kind, "bad-payload");
}

#[tokio::test]
async fn gateway_acks_each_message_once_after_all_its_rules() {
    let a = pipeline(
        WINDOWED.replace("count = 3", "count = 1").as_str(),
        Arc::new(NoModel),
    )
    .await;
    let mut b_rule = Rule::parse(&WINDOWED.replace("count = 3", "count = 1"), "b", None).unwrap();
    b_rule.dead_letter_topic = "dl/b".into();
    let host = host();
    let mut plugins = HashMap::new();
    for name in ["clean-readings", "threshold-alert"] {
        plugins.insert(name.to_owned(), load(&host, &example(name)).await);
    }
    let b = RulePipeline::new(&host, b_rule, &plugins, Arc::new(NoModel)).unwrap();
    let publisher = Arc::new(RecordingPublisher::default());
    let gateway = Gateway::start(
        vec![a, b],
        publisher.clone(),
        GatewayConfig {
            lanes: 2,
            lane_capacity: 1,
            ..GatewayConfig::default()
        },
    );
    for i in 0..20 {
        let d = Delivery {
            message: msg(&format!("t/d{}/x", i % 3), &reading(100.0 + f64::from(i))),
            token: AckToken::None,
        };
        gateway.dispatch(d).await;
    }
    gateway
        .dispatch(Delivery {
            message: msg("unrelated/topic", "x"),
            token: AckToken::None,
        })
        .await;
    gateway.shutdown().await;
    assert_eq!(
        publisher.acks(),
        21,
        "20 matched messages acked once each after both rules, 1 unmatched at once"
    );
    let published = publisher.published();
    assert_eq!(published.len(), 40, "one alert per rule per message");
    // Per topic, outputs keep the order of their messages.
    let values: Vec<u32> = published
        .iter()
        .filter(|o| o.topic == "ganglion/alert/r/d1")
        .filter_map(|o| {
            String::from_utf8_lossy(&o.payload)
                .split("temperature ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let mut sorted = values.clone();
    sorted.sort();
    assert_eq!(values, sorted);
    assert_eq!(values.len(), 7);
}

#[tokio::test]
async fn bad_rule_and_plugin_files_are_reported_and_the_rest_runs() {
    let plugins = scratch("load-plugins");
    for name in ["clean-readings", "threshold-alert"] {
        std::fs::copy(example(name), plugins.join(format!("{name}.wasm"))).unwrap();
    }
    std::fs::copy(wat_fixture("corrupt.wasm"), plugins.join("broken.wasm")).unwrap();
    let rules = scratch("load-rules");
    std::fs::write(rules.join("good.toml"), WINDOWED).unwrap();
    std::fs::write(
        rules.join("typo.toml"),
        WINDOWED.replace("[window]", "[windw]"),
    )
    .unwrap();
    std::fs::write(
        rules.join("missing.toml"),
        WINDOWED.replace("threshold-alert", "no-such-plugin"),
    )
    .unwrap();
    std::fs::write(
        rules.join("wrong-stage.toml"),
        WINDOWED.replace(
            "plugin = \"threshold-alert\"",
            "plugin = \"clean-readings\"",
        ),
    )
    .unwrap();
    std::fs::write(rules.join("notes.txt"), "not a rule").unwrap();
    let host = host();
    let (pipelines, problems) =
        ganglion::reload::load(&host, &plugins, &rules, Arc::new(NoModel)).await;
    assert_eq!(
        pipelines
            .iter()
            .map(|p| p.rule.name.as_str())
            .collect::<Vec<_>>(),
        vec!["good"]
    );
    assert_eq!(problems.len(), 4, "{problems:#?}");
    let has = |file: &str, text: &str| {
        problems
            .iter()
            .any(|p| p.contains(file) && p.contains(text))
    };
    assert!(
        has("broken.wasm", "not a valid WebAssembly component"),
        "{problems:#?}"
    );
    assert!(has("typo.toml", "windw"), "{problems:#?}");
    assert!(
        has("missing.toml", "`no-such-plugin` is not loaded"),
        "{problems:#?}"
    );
    assert!(
        has(
            "wrong-stage.toml",
            "does not implement the postprocess stage"
        ),
        "{problems:#?}"
    );
}
