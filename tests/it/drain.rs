//! Stopping: the drain waits for the messages in flight up to `[runtime]
//! drain_timeout_ms`, with the broker down too, on Ctrl-C and on SIGTERM;
//! a second signal ends it at once.

use crate::faults::SLOW_RULE;
use crate::mqtt::TELEMETRY_RULE;
use ganglion_tests::gateways::*;
use ganglion_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Outputs the broker never confirms, as with a broker that is down.
struct BrokerDown;

impl ganglion::transport::Publisher for BrokerDown {
    fn publish(&self, _out: ganglion::types::Outgoing) -> ganglion::transport::QueueFuture<'_> {
        Box::pin(async {
            let never: ganglion::transport::Confirm = Box::pin(std::future::pending());
            Ok(never)
        })
    }

    fn ack(
        &self,
        _token: ganglion::transport::AckToken,
    ) -> ganglion::transport::TransportFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// With the broker down, a stop waited forever for the confirmation of the
/// outputs in flight. The drain now has a limit (`[runtime]
/// drain_timeout_ms`): the stop returns when it passes, reporting that the
/// drain did not finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_the_broker_down_is_bounded_by_the_drain_limit() {
    let loaded = load_runtime(
        runtime_config(&[("hot", TELEMETRY_RULE)]),
        std::sync::Arc::new(ganglion::llm::NoModel),
    )
    .await;
    let rt = loaded.serve(std::sync::Arc::new(BrokerDown));
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(ganglion::transport::Delivery {
        message: ganglion::types::Message {
            topic: "t/m1/telemetry".into(),
            payload: br#"{"metric":"temperature","value":90}"#.to_vec(),
            timestamp: 0,
        },
        token: ganglion::transport::AckToken::None,
    })
    .await
    .unwrap();
    let limit = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let drained = tokio::time::timeout(
        Duration::from_secs(10),
        rt.serve_until_within(rx, tokio::time::sleep(Duration::from_millis(300)), limit),
    )
    .await
    .expect("the stop returns within the drain limit, not waiting for the broker");
    assert!(
        !drained,
        "the drain could not finish: the output was never confirmed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "stopped {took:?} after the start: 300 ms of serving, then the 500 ms limit"
    );
    drop(tx);
}

/// SIGTERM (what systemd and docker send to stop a service) used to end the
/// process at once, without the drain Ctrl-C runs. Now it drains like
/// Ctrl-C, also with the broker down, and exits 0 within the drain limit.
#[cfg(unix)]
#[test]
fn sigterm_drains_and_exits_with_the_broker_down() {
    let dir = scratch("sigterm");
    for d in ["plugins", "rules"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let config = dir.join("ganglion.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[plugins]
dir = "{dir}/plugins"
cache_dir = "{dir}/compiled"

[state]
path = "{dir}/state.redb"

[rules]
dir = "{dir}/rules"

[mqtt]
client_id = "ganglion-sigterm-test"

[audit]
enabled = false

[runtime]
drain_timeout_ms = 2000
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    // Nothing listens on this port: the broker is down.
    let broker = format!("mqtt://127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(ganglion_binary())
        .current_dir(&dir)
        .arg("--config")
        .arg(&config)
        .args(["run", "--broker", &broker])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    // Logged after the signal handlers are installed.
    assert!(
        stderr.wait_for("no rule is ready to run yet", Duration::from_secs(60)),
        "the gateway did not start: {}",
        stderr.text()
    );
    let sent = std::time::Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if sent.elapsed() > Duration::from_secs(7) {
            let _ = child.kill();
            panic!(
                "still running 7 s after SIGTERM (drain limit 2 s): {}",
                stderr.text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The reader thread may still hold the last lines.
    stderr.wait_for("stopped", Duration::from_secs(2));
    let text = stderr.text();
    assert!(status.success(), "exit status {status:?}: {text}");
    assert!(
        text.contains("stopping: draining in-flight messages") && text.contains("SIGTERM"),
        "the drain is logged: {text}"
    );
}

/// A drain waits for the messages in flight, up to `[runtime]
/// drain_timeout_ms`; an operator who cannot wait sends the stop signal
/// again. Here a plugin runs for 30 s on the only message and the drain
/// limit is a minute: the first SIGTERM starts the drain, which is still
/// waiting a second later; the second one ends the process at once with
/// SIGTERM's status (143), leaving the message unacknowledged.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_exits_at_once_during_a_long_drain() {
    let broker = Mosquitto::start("fault-second-signal");
    let dir = gateway_dir_tables(
        "fault-second-signal-gw",
        &broker.url(),
        &[
            ("misbehave", fixture("misbehave")),
            ("threshold-alert", example("threshold-alert")),
        ],
        &[("slow", SLOW_RULE)],
        "",
        "[plugins.limits]\ncall_timeout_ms = 30000\n\n[runtime]\ndrain_timeout_ms = 60000\n",
    );
    let (mut gateway, log) = start_gateway(&dir);
    let sensor = TestClient::connect(&broker.url(), "fault-second-signal-sensor", &[]).await;
    sensor.publish("flood/d1", "{}").await;
    // The message reaches the plugin, which then spins until its deadline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let term = |pid: u32| {
        let kill = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    };
    term(gateway.id());
    assert!(
        log.wait_for("stopping: draining", Duration::from_secs(10)),
        "the first signal starts the drain: {}",
        log.text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        gateway.try_wait().unwrap().is_none(),
        "the drain waits for the message in flight: {}",
        log.text()
    );
    let sent = Instant::now();
    term(gateway.id());
    let status = loop {
        if let Some(s) = gateway.try_wait().unwrap() {
            break s;
        }
        if sent.elapsed() > Duration::from_secs(5) {
            let _ = gateway.kill();
            panic!("still running 5 s after the second signal: {}", log.text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    log.wait_for("second stop signal", Duration::from_secs(2));
    assert_eq!(status.code(), Some(143), "{}", log.text());
    assert!(log.text().contains("second stop signal"), "{}", log.text());
}
