//! Each example plugin through the real host.

use ganglion::plugin::CallError;
use ganglion::state::{StateLimits, StateStore};
use ganglion::types::*;
use ganglion_tests::*;
use serde_json::json;
use std::sync::Arc;

fn msg(topic: &str, payload: &str, ts: i64) -> Message {
    Message {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        timestamp: ts,
    }
}

fn ctx(device: &str) -> Context {
    Context {
        rule: "r".into(),
        device: device.into(),
        window_start: 0,
        window_end: 1,
    }
}

fn window(values: &[(&str, &str, f64)]) -> ReadingBatch {
    let mut b = ReadingBatch::default();
    for (i, (device, metric, v)) in values.iter().enumerate() {
        b.push(device, metric, Value::Number(*v), "C", i as i64);
    }
    b
}

#[tokio::test]
async fn clean_readings_cleans_converts_and_dedupes() {
    let host = host();
    let plugin = load(&host, &example("clean-readings")).await;
    assert_eq!(plugin.stages, vec![Stage::Preprocessor]);
    let pool = host.pool(&plugin, "r", config(json!({ "device_from_topic": 1, "units": { "temperature": "C" }, "ranges": { "temperature": [-40.0, 150.0], "humidity": [0.0, 100.0] } })));
    let payload = r#"{"ts": 1700000000000, "readings": [
        {"metric": "temperature", "value": 212, "unit": "F"},
        {"metric": "temperature", "value": 20, "unit": "C"},
        {"metric": "humidity", "value": "NaN"},
        {"metric": "humidity", "value": 140},
        {"metric": "humidity", "value": "55.5"},
        {"metric": "temperature", "value": 1, "unit": "bar"},
        {"metric": "door", "value": true},
        {"metric": "speech", "value": "too warm in here"}
    ]}"#;
    let out = pool
        .preprocess(
            &msg("site/boiler-7/telemetry", payload, 5),
            ReadingBatch::default(),
        )
        .await
        .unwrap();
    let got: Vec<(String, String, Value, String)> = out
        .iter()
        .map(|r| {
            (
                r.device.to_owned(),
                r.metric.to_owned(),
                r.value.clone(),
                r.unit.to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "boiler-7".into(),
                "temperature".into(),
                Value::Number(100.0),
                "C".into()
            ),
            (
                "boiler-7".into(),
                "humidity".into(),
                Value::Number(55.5),
                "".into()
            ),
            (
                "boiler-7".into(),
                "door".into(),
                Value::Boolean(true),
                "".into()
            ),
            (
                "boiler-7".into(),
                "speech".into(),
                Value::Text("too warm in here".into()),
                "".into()
            ),
        ],
        "the duplicate 20 C (same timestamp), NaN, 140 % and the bar reading are dropped"
    );

    let bad = pool
        .preprocess(&msg("site/x/t", "{not json", 5), ReadingBatch::default())
        .await;
    assert!(
        matches!(&bad, Err(CallError::Plugin(PluginError::BadPayload(m))) if m.contains("invalid JSON")),
        "{bad:?}"
    );

    // Second in a chain: cleans the readings it is given instead of the payload.
    let mut chained = ReadingBatch::default();
    chained.push("d", "temperature", Value::Number(32.0), "F", 1);
    chained.push("d", "temperature", Value::Number(f64::INFINITY), "F", 2);
    let out = pool
        .preprocess(&msg("t", "ignored", 0), chained)
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out.iter().next().unwrap().value, &Value::Number(0.0));
}

#[tokio::test]
async fn clean_readings_drops_stale_with_state() {
    let host = host();
    let pool = pool(
        &host,
        &example("clean-readings"),
        "r",
        json!({ "drop_stale": true }),
    )
    .await;
    let send = |ts: i64| {
        msg(
            "t",
            &format!(r#"{{"device":"d","metric":"m","value":1,"ts":{ts}}}"#),
            0,
        )
    };
    assert_eq!(
        pool.preprocess(&send(2_000_000_000_000), ReadingBatch::default())
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        pool.preprocess(&send(2_000_000_000_000), ReadingBatch::default())
            .await
            .unwrap()
            .len(),
        0,
        "redelivery"
    );
    assert_eq!(
        pool.preprocess(&send(1_999_000_000_000), ReadingBatch::default())
            .await
            .unwrap()
            .len(),
        0,
        "older"
    );
    assert_eq!(
        pool.preprocess(&send(2_000_000_001_000), ReadingBatch::default())
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn prompt_template_renders_window() {
    let host = host();
    let plugin = load(&host, &example("prompt-template")).await;
    assert_eq!(plugin.stages, vec![Stage::PromptTemplate]);
    let pool = host.pool(
        &plugin,
        "r",
        config(json!({
            "system": "You watch {{ rule }}.",
            "user": "{{ device }}: {% for r in readings %}{{ r.value }}{{ r.unit }} {% endfor %}max {{ metrics.temperature.max }} mean {{ metrics.temperature.mean }}",
            "max_tokens": 32,
            "choices": ["ok", "alarm"]
        })),
    );
    let p = pool
        .render(
            &ctx("m1"),
            window(&[("m1", "temperature", 20.0), ("m1", "temperature", 30.0)]),
        )
        .await
        .unwrap();
    assert_eq!(p.system, "You watch r.");
    assert_eq!(p.user, "m1: 20.0C 30.0C max 30.0 mean 25.0");
    assert_eq!(p.params.max_tokens, 32);
    assert_eq!(
        p.params.constraint,
        Constraint::Choice(vec!["ok".into(), "alarm".into()])
    );

    let broken = host.pool(&plugin, "r2", config(json!({ "user": "{{ unclosed" })));
    let err = broken.render(&ctx("m1"), ReadingBatch::default()).await;
    assert!(
        matches!(&err, Err(CallError::Plugin(PluginError::BadConfig(m))) if m.contains("user template")),
        "{err:?}"
    );
    let undefined = host.pool(
        &plugin,
        "r3",
        config(json!({ "user": "{{ metrics.pressure.max }}" })),
    );
    assert!(matches!(
        undefined
            .render(&ctx("m1"), window(&[("m1", "temperature", 1.0)]))
            .await,
        Err(CallError::Plugin(PluginError::BadConfig(_)))
    ));
}

#[tokio::test]
async fn json_actions_parses_completions() {
    let host = host();
    let plugin = load(&host, &example("json-actions")).await;
    assert_eq!(plugin.stages, vec![Stage::Postprocessor]);
    let pool = host.pool(&plugin, "r", config(json!({})));
    let completion = |text: &str| Completion {
        text: text.into(),
        finish_reason: FinishReason::Stop,
        usage: Usage::default(),
        model: "fake".into(),
    };
    let c = completion(
        r#"```json
{"actions":[{"type":"alert","level":"critical","text":"bearing overheating"},{"type":"publish","topic":"plant/m1/cmd","payload":{"fan":"on"},"qos":0},{"type":"command","command":"slow_down","value":0.5}]}
```"#,
    );
    let actions = pool
        .postprocess(&ctx("m1"), ReadingBatch::default(), Some(&c))
        .await
        .unwrap();
    assert_eq!(
        actions,
        vec![
            Action::Alert {
                level: AlertLevel::Critical,
                device: "m1".into(),
                text: "bearing overheating".into()
            },
            Action::Publish {
                topic: "plant/m1/cmd".into(),
                payload: br#"{"fan":"on"}"#.to_vec(),
                qos: Qos::AtMostOnce,
                retain: false
            },
            Action::Command {
                device: "m1".into(),
                name: "slow_down".into(),
                value: Some(Value::Number(0.5))
            },
        ]
    );
    for bad in [
        "I think it is fine.",
        r#"{"type":"alert"}"#,
        r#"{"actions":[{"type":"launch"}]}"#,
        r#"{"type":"alert","text":"x""#,
    ] {
        let r = pool
            .postprocess(&ctx("m1"), ReadingBatch::default(), Some(&completion(bad)))
            .await;
        assert!(
            matches!(r, Err(CallError::Plugin(PluginError::BadCompletion(_)))),
            "{bad}: {r:?}"
        );
    }
    let none = pool
        .postprocess(&ctx("m1"), ReadingBatch::default(), None)
        .await;
    assert!(
        matches!(none, Err(CallError::Plugin(PluginError::BadConfig(_)))),
        "{none:?}"
    );
    assert_eq!(pool.stats().discarded, 0, "errors are not faults");
}

#[tokio::test]
async fn threshold_alert_raises_one_alert_per_device() {
    let host = host();
    let plugin = load(&host, &example("threshold-alert")).await;
    assert_eq!(plugin.stages, vec![Stage::Postprocessor]);
    let pool = host.pool(
        &plugin,
        "r",
        config(json!({ "thresholds": [{ "metric": "temperature", "above": 90.0, "level": "critical" }, { "metric": "temperature", "below": 0.0 }], "topic": "alerts/{device}" })),
    );
    let w = window(&[
        ("m1", "temperature", 95.0),
        ("m1", "temperature", 99.0),
        ("m2", "temperature", 50.0),
        ("m2", "temperature", -3.0),
    ]);
    let actions = pool.postprocess(&ctx("m1"), w, None).await.unwrap();
    let alerts: Vec<_> = actions
        .iter()
        .filter_map(|a| {
            if let Action::Alert {
                level,
                device,
                text,
            } = a
            {
                Some((*level, device.as_str(), text.as_str()))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        alerts,
        vec![
            (
                AlertLevel::Critical,
                "m1",
                "m1: temperature 99 C above 90 C (2 readings)"
            ),
            (AlertLevel::Warning, "m2", "m2: temperature -3 C below 0 C"),
        ]
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Publish { topic, .. } if topic == "alerts/m2"))
    );
    assert!(
        pool.postprocess(&ctx("m1"), window(&[("m1", "temperature", 50.0)]), None)
            .await
            .unwrap()
            .is_empty()
    );

    let unset = host.pool(
        &plugin,
        "r2",
        config(json!({ "thresholds": [{ "metric": "t" }] })),
    );
    assert!(matches!(
        unset
            .postprocess(&ctx("m1"), ReadingBatch::default(), None)
            .await,
        Err(CallError::Plugin(PluginError::BadConfig(_)))
    ));
}

#[tokio::test]
async fn debounce_alarm_suppresses_repeats_across_restarts() {
    let dir = scratch("debounce");
    let path = dir.join("state.redb");
    let cfg = json!({ "interval_secs": 60, "thresholds": [{ "metric": "smoke", "equals": true, "level": "critical" }] });
    let smoke = |device: &str, ts: i64| {
        msg(
            "home/kitchen",
            &format!(r#"{{"device":"{device}","smoke":true}}"#),
            ts,
        )
    };
    let count = |a: Vec<Action>| {
        a.iter()
            .filter(|a| matches!(a, Action::Alert { .. }))
            .count()
    };
    {
        let state = StateStore::open(&path, StateLimits::default()).unwrap();
        let host = ganglion::plugin::PluginHost::new(
            ganglion::config::PluginConfig {
                cache_dir: None,
                ..Default::default()
            },
            state,
            Arc::new(ganglion::llm::NoModel),
        )
        .unwrap();
        let plugin = load(&host, &example("debounce-alarm")).await;
        assert_eq!(plugin.stages, vec![Stage::Rule]);
        let pool = host.pool(&plugin, "smoke", config(cfg.clone()));
        assert_eq!(
            count(
                pool.handle("smoke", &smoke("kitchen", 1_000_000))
                    .await
                    .unwrap()
            ),
            1
        );
        assert_eq!(
            count(
                pool.handle("smoke", &smoke("kitchen", 1_030_000))
                    .await
                    .unwrap()
            ),
            0,
            "within 60 s"
        );
        assert_eq!(
            count(
                pool.handle("smoke", &smoke("hall", 1_030_000))
                    .await
                    .unwrap()
            ),
            1,
            "another device"
        );
        let no_smoke = msg(
            "home/kitchen",
            r#"{"device":"kitchen","smoke":false}"#,
            1_040_000,
        );
        assert_eq!(count(pool.handle("smoke", &no_smoke).await.unwrap()), 0);
    }
    // A new host on the same state file: the suppression window still holds.
    let state = StateStore::open(&path, StateLimits::default()).unwrap();
    let host = ganglion::plugin::PluginHost::new(
        ganglion::config::PluginConfig {
            cache_dir: None,
            ..Default::default()
        },
        state,
        Arc::new(ganglion::llm::NoModel),
    )
    .unwrap();
    let pool = pool(&host, &example("debounce-alarm"), "smoke", cfg).await;
    assert_eq!(
        count(
            pool.handle("smoke", &smoke("kitchen", 1_050_000))
                .await
                .unwrap()
        ),
        0,
        "state survived the restart"
    );
    assert_eq!(
        count(
            pool.handle("smoke", &smoke("kitchen", 1_061_000))
                .await
                .unwrap()
        ),
        1,
        "interval over"
    );
}
