//! The embedding API: a runtime built from config, messages pushed from
//! code, outputs on a channel, rules installed and removed from code.

use ganglion::config::GanglionConfig;
use ganglion::llm::NoModel;
use ganglion::runtime::{Runtime, RuntimeError};
use ganglion::types::Outgoing;
use ganglion_tests::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

fn rule(above: f64) -> String {
    format!(
        r#"
topics = ["plant/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
config = {{ device_from_topic = 1 }}
[postprocess]
plugin = "threshold-alert"
config = {{ thresholds = [{{ metric = "temperature", above = {above:.1}, level = "critical" }}], topic = "alerts/{{device}}" }}
[allow]
publish = ["alerts/{{device}}"]
"#
    )
}

fn reading(v: f64) -> Vec<u8> {
    format!(r#"{{"metric":"temperature","value":{v}}}"#).into_bytes()
}

async fn start(rules: &[(&str, String)], capacity: usize) -> (Runtime, mpsc::Receiver<Outgoing>) {
    let rules: Vec<(&str, &str)> = rules.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let mut config = GanglionConfig::default();
    config.plugins.dir = plugins_folder();
    config.plugins.cache_dir = None;
    config.rules.dir = rules_dir(&rules);
    config.reload.enabled = false;
    let loaded = load_runtime(config, Arc::new(NoModel)).await;
    loaded.serve_channel(capacity)
}

/// What is on the channel now, without waiting.
fn drain(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<Outgoing> {
    let mut v = Vec::new();
    while let Ok(o) = rx.try_recv() {
        v.push(o);
    }
    v
}

#[tokio::test]
async fn pushed_messages_come_out_on_the_channel_once_push_returns() {
    let (rt, mut out) = start(&[("hot", rule(50.0))], 64).await;
    rt.push("plant/m1/telemetry", reading(70.0)).await.unwrap();
    let got = drain(&mut out);
    assert!(
        got.iter().any(|o| o.topic == "alerts/m1"),
        "the alert is out when push returns: {got:?}"
    );
    rt.push("plant/m1/telemetry", reading(20.0)).await.unwrap();
    assert!(drain(&mut out).is_empty(), "no alert below the threshold");
    // A message no rule takes returns at once; a bad one is dead-lettered.
    rt.push("elsewhere/x", b"y".to_vec()).await.unwrap();
    rt.push("plant/m1/telemetry", b"{not json".to_vec())
        .await
        .unwrap();
    let got = drain(&mut out);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].topic, "ganglion/dead-letter/hot");
    assert_eq!(
        rt.stats()[0]
            .1
            .messages
            .load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn rules_are_installed_replaced_and_removed_from_code() {
    let (rt, mut out) = start(&[], 64).await;
    assert!(rt.rules().is_empty());
    rt.install_rule("hot", &rule(50.0)).await.unwrap();
    rt.push("plant/m1/telemetry", reading(60.0)).await.unwrap();
    assert!(drain(&mut out).iter().any(|o| o.topic == "alerts/m1"));
    // Replaced: the new threshold applies to the next message.
    rt.install_rule("hot", &rule(65.0)).await.unwrap();
    rt.push("plant/m1/telemetry", reading(60.0)).await.unwrap();
    assert!(drain(&mut out).is_empty());
    assert_eq!(rt.rules().len(), 1);
    // Refused: the running version stays.
    let e = rt.install_rule("hot", "topics = [").await.unwrap_err();
    assert!(matches!(e, RuntimeError::Rule(_)), "{e}");
    let e = rt
        .install_rule(
            "hot",
            &rule(1.0).replace("threshold-alert", "no-such-plugin"),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("`no-such-plugin` is not loaded"),
        "{e}"
    );
    rt.push("plant/m1/telemetry", reading(70.0)).await.unwrap();
    assert!(drain(&mut out).iter().any(|o| o.topic == "alerts/m1"));
    // Removed: nothing takes the topic any more.
    rt.remove_rule("hot").await.unwrap();
    assert!(rt.rules().is_empty());
    rt.push("plant/m1/telemetry", reading(70.0)).await.unwrap();
    assert!(drain(&mut out).is_empty());
    assert!(rt.remove_rule("hot").await.is_err());
    rt.shutdown().await;
}

#[tokio::test]
async fn a_full_output_channel_holds_push_back_and_loses_nothing() {
    let (rt, mut out) = start(&[("hot", rule(50.0))], 1).await;
    let rt = Arc::new(rt);
    let pusher = {
        let rt = rt.clone();
        tokio::spawn(async move {
            for i in 0..5 {
                rt.push(format!("plant/m{i}/telemetry"), reading(90.0))
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pusher.is_finished(),
        "push waits while nobody takes the outputs"
    );
    let mut got = Vec::new();
    while got
        .iter()
        .filter(|o: &&Outgoing| o.topic.starts_with("alerts/"))
        .count()
        < 5
    {
        let o = tokio::time::timeout(Duration::from_secs(5), out.recv())
            .await
            .expect("outputs keep coming")
            .unwrap();
        got.push(o);
    }
    tokio::time::timeout(Duration::from_secs(5), pusher)
        .await
        .expect("push completes once outputs are taken")
        .unwrap();
    rt.shutdown().await;
}
