//! A fault while a lane handles one message (a panicking model backend, a
//! panicking transport) is that message's dead letter: the lane goes on and
//! every later message is still acknowledged.

use ganglion::llm::FakeLlm;
use ganglion_tests::*;
use serde_json::Value as Json;
use std::time::Duration;

/// A panic while a lane processes a message (here the model backend's) used
/// to end that lane: its message and every later one routed to it were never
/// acknowledged, and over MQTT, where acknowledgements go out in arrival
/// order, that held back the whole connection's. Now the panic is a dead
/// letter (stage `lane`, kind `panic`), the message is acknowledged and the
/// lane goes on. `Runtime::push` returns once the gateway acknowledged the
/// message, through the same path as a broker delivery's PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_lane_keeps_acknowledging_later_messages() {
    let model = FakeLlm::new(|req| {
        let ganglion::llm::LlmInput::Chat(m) = &req.input else {
            return Ok(String::new());
        };
        if m.last().is_some_and(|m| m.content.contains("explode")) {
            panic!("model backend bug");
        }
        Ok(r#"{"type":"command","command":"fan","value":"on"}"#.into())
    });
    let mut config = runtime_config(&[("voice", VOICE_RULE)]);
    // One lane: every message goes through the lane that panicked.
    config.rules.lanes = 1;
    let loaded = load_runtime(config, model).await;
    let (rt, mut out) = loaded.serve_channel(64);
    let say = |text: &str| format!(r#"{{"metric":"speech","value":"{text}"}}"#).into_bytes();
    let pushed = tokio::time::timeout(
        Duration::from_secs(10),
        rt.push("home/kitchen/say", say("explode now")),
    )
    .await;
    assert!(
        matches!(pushed, Ok(Ok(()))),
        "the message whose processing panicked is acknowledged: {pushed:?}"
    );
    for _ in 0..5 {
        let pushed = tokio::time::timeout(
            Duration::from_secs(10),
            rt.push("home/kitchen/say", say("turn the fan on")),
        )
        .await;
        assert!(
            matches!(pushed, Ok(Ok(()))),
            "later messages are acknowledged: {pushed:?}"
        );
    }
    let mut got = Vec::new();
    while let Ok(o) = out.try_recv() {
        got.push(o);
    }
    let (dead, outputs): (Vec<_>, Vec<_>) = got
        .iter()
        .partition(|o| o.topic.starts_with("ganglion/dead-letter/"));
    assert_eq!(dead.len(), 1, "{got:?}");
    let dl: Json = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(dl["kind"], "panic", "{dl}");
    assert_eq!(dl["stage"], "lane", "{dl}");
    assert!(
        dl["reason"].as_str().unwrap().contains("model backend bug"),
        "{dl}"
    );
    assert_eq!(
        outputs.len(),
        5,
        "every later message was processed: {got:?}"
    );
    rt.shutdown().await;
}

/// A transport with bugs: the first publish panics, and so does the
/// confirmation of the second; the rest are recorded.
#[derive(Default)]
struct PanickingTransport {
    publishes: std::sync::atomic::AtomicUsize,
    recorded: ganglion::transport::RecordingPublisher,
}

impl ganglion::transport::Publisher for PanickingTransport {
    fn publish(&self, out: ganglion::types::Outgoing) -> ganglion::transport::QueueFuture<'_> {
        let n = self
            .publishes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            match n {
                0 => panic!("transport bug while queueing"),
                1 => {
                    let _ = self.recorded.publish(out).await;
                    let confirm: ganglion::transport::Confirm =
                        Box::pin(async { panic!("transport bug while confirming") });
                    Ok(confirm)
                }
                _ => self.recorded.publish(out).await,
            }
        })
    }

    fn ack(
        &self,
        token: ganglion::transport::AckToken,
    ) -> ganglion::transport::TransportFuture<'_> {
        self.recorded.ack(token)
    }
}

/// A panic in the transport while a lane queues or confirms a message's
/// outputs used to end the lane (only processing was guarded): its queue
/// stopped and, over MQTT, the acknowledgements of the whole connection
/// with it. Now the message is released (left for the broker to deliver
/// again, since which outputs went out is unknown) and the lane goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_delivering_releases_the_message_and_the_lane_goes_on() {
    let model = FakeLlm::new(|_| Ok(r#"{"type":"command","command":"fan","value":"on"}"#.into()));
    let mut config = runtime_config(&[("voice", VOICE_RULE)]);
    config.rules.lanes = 1;
    let loaded = load_runtime(config, model).await;
    let transport = std::sync::Arc::new(PanickingTransport::default());
    let rt = loaded.serve(transport.clone());
    let say = br#"{"metric":"speech","value":"turn the fan on"}"#.to_vec();
    let mut results = Vec::new();
    for _ in 0..6 {
        let pushed = tokio::time::timeout(
            Duration::from_secs(10),
            rt.push("home/kitchen/say", say.clone()),
        )
        .await;
        results.push(pushed.map(|r| r.is_ok()));
    }
    assert_eq!(
        results,
        vec![Ok(false), Ok(false), Ok(true), Ok(true), Ok(true), Ok(true)],
        "the two messages whose delivery panicked are released, every later one is handled"
    );
    let published = transport.recorded.published();
    assert_eq!(published.len(), 5, "{published:?}");
    assert!(
        published
            .iter()
            .all(|o| !o.topic.starts_with("ganglion/dead-letter/")),
        "{published:?}"
    );
    rt.shutdown().await;
}
