//! Faults through the real binary and a real mosquitto: the gateway killed
//! with SIGKILL mid-stream, and a QoS 0 flood far beyond what a slow rule
//! drains. Each prints its figures (sent, received, lost, duplicates,
//! resident memory) for docs/RELIABILITY.md.

use ganglion_tests::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A folder with `ganglion.toml`, the plugins and the rules for one test.
fn gateway_dir(
    name: &str,
    broker: &str,
    plugins: &[(&str, PathBuf)],
    rules: &[(&str, &str)],
) -> PathBuf {
    gateway_dir_with(name, broker, plugins, rules, "")
}

/// As [`gateway_dir`], with more `[mqtt]` keys.
fn gateway_dir_with(
    name: &str,
    broker: &str,
    plugins: &[(&str, PathBuf)],
    rules: &[(&str, &str)],
    mqtt: &str,
) -> PathBuf {
    let dir = scratch(name);
    for d in ["plugins", "rules"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    for (n, from) in plugins {
        std::fs::copy(from, dir.join("plugins").join(format!("{n}.wasm"))).unwrap();
    }
    for (n, text) in rules {
        std::fs::write(dir.join("rules").join(format!("{n}.toml")), text).unwrap();
    }
    std::fs::write(
        dir.join("ganglion.toml"),
        format!(
            r#"
[plugins]
dir = "{d}/plugins"
cache_dir = "{d}/compiled"

[state]
path = "{d}/state.redb"

[rules]
dir = "{d}/rules"

[mqtt]
broker = "{broker}"
client_id = "{name}"
{mqtt}

[reload]
enabled = false

[audit]
enabled = false
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    dir
}

/// Starts `ganglion run` in `dir` and waits until its rules are ready.
fn start_gateway(dir: &Path) -> (Child, StderrLines) {
    let mut child = Command::new(ganglion_binary())
        .current_dir(dir)
        .arg("--config")
        .arg(dir.join("ganglion.toml"))
        .args(["run", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    assert!(
        stderr.wait_for("connected to the MQTT broker", Duration::from_secs(60)),
        "the gateway did not connect: {}",
        stderr.text()
    );
    (child, stderr)
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

const TAG_RULE: &str = r#"
topics = ["fault/in/+"]
format = "raw"
[handler]
plugin = "tagger"
[allow]
publish = ["tagged/{device}"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_stream_loses_no_message() {
    const N: usize = 20_000;
    let broker = Mosquitto::start("fault-kill");
    let dir = gateway_dir(
        "fault-kill-gw",
        &broker.url(),
        &[("tagger", fixture("tag-a"))],
        &[("tag", TAG_RULE)],
    );
    let receiver = TestClient::connect(
        &broker.url(),
        "fault-kill-receiver",
        &["tagged/#", "ganglion/dead-letter/#"],
    )
    .await;
    let (mut gateway, _log) = start_gateway(&dir);
    let sensor = TestClient::connect(&broker.url(), "fault-kill-sensor", &[]).await;
    let started = Instant::now();
    for i in 0..N {
        sensor
            .publish(&format!("fault/in/d{}", i % 50), i.to_string())
            .await;
    }
    // Distinct inputs handled (an output, or a dead letter naming the
    // input: both are delivered outcomes), and how often each.
    let seen = |r: &TestClient| -> HashMap<String, usize> {
        use base64::Engine as _;
        let mut m = HashMap::new();
        for (_, p) in r.received() {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p) else {
                continue;
            };
            let input = match (v["input"].as_str(), v["payload_base64"].as_str()) {
                (Some(i), _) => i.to_owned(),
                (None, Some(b)) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
                _ => continue,
            };
            *m.entry(input).or_insert(0) += 1;
        }
        m
    };
    assert!(
        receiver
            .wait_until(120, |r| r.received().len() >= N / 2)
            .await,
        "half the stream came through before the kill"
    );
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    let at_kill = seen(&receiver).len();
    let (mut gateway, log) = start_gateway(&dir);
    let complete = receiver.wait_until(180, |r| seen(r).len() >= N).await;
    let counts = seen(&receiver);
    let lost: Vec<usize> = (0..N)
        .filter(|i| !counts.contains_key(&i.to_string()))
        .collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let dead_letters = receiver
        .received()
        .iter()
        .filter(|(t, _)| t.starts_with("ganglion/dead-letter/"))
        .count();
    println!(
        "kill -9 mid-stream: sent {N} QoS 1, {at_kill} handled at the kill, {} handled after restart ({dead_letters} as dead letters), lost {}, duplicates {duplicates}, {:.1} s",
        counts.len(),
        lost.len(),
        started.elapsed().as_secs_f64()
    );
    let _ = gateway.kill();
    let _ = gateway.wait();
    assert!(
        complete && lost.is_empty(),
        "lost {} messages, first {:?}: {}",
        lost.len(),
        &lost[..lost.len().min(10)],
        log.text()
    );
    assert!(at_kill < N, "the kill came before the end of the stream");
}

/// A rule whose every message runs into the plugin deadline (100 ms): four
/// lanes drain about 40 messages a second.
const SLOW_RULE: &str = r#"
topics = ["flood/+"]
format = "raw"
[[preprocess]]
plugin = "misbehave"
config = { mode = "loop" }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "bytes", above = 0.0 }] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_cannot_exhaust_the_gateways_memory() {
    const N: usize = 100_000;
    const PAYLOAD: usize = 2048;
    let broker = Mosquitto::start("fault-flood");
    let dir = gateway_dir_with(
        "fault-flood-gw",
        &broker.url(),
        &[
            ("misbehave", fixture("misbehave")),
            ("threshold-alert", example("threshold-alert")),
        ],
        &[("slow", SLOW_RULE)],
        "intake_buffer = 1000",
    );
    let (mut gateway, log) = start_gateway(&dir);
    let probe = TestClient::connect(&broker.url(), "fault-flood-probe", &["flood/#"]).await;
    let pid = gateway.id();
    let before = rss_kib(pid);
    let (host, port) = ganglion::simulate::host_port(&broker.url()).unwrap();
    let mut o = rumqttc::MqttOptions::new("fault-flood-sensor", host, port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(o, 1024);
    let driver = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let payload = vec![b'{'; PAYLOAD];
    let started = Instant::now();
    let mut peak = before;
    for i in 0..N {
        client
            .publish(
                format!("flood/d{}", i % 100),
                rumqttc::QoS::AtMostOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
        if i % 5_000 == 0 {
            peak = peak.max(rss_kib(pid));
        }
    }
    // Let the broker hand everything over, sampling memory meanwhile.
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rss_kib(pid));
    }
    let text = log.text();
    println!(
        "QoS 0 flood: {N} messages of {PAYLOAD} bytes ({} MiB) in {:.1} s at a rule draining ~40/s, {} of them delivered to a probe subscriber; gateway RSS {} MiB before, peak {} MiB",
        (N * PAYLOAD) >> 20,
        started.elapsed().as_secs_f64(),
        probe.received().len(),
        before / 1024,
        peak / 1024
    );
    let _ = gateway.kill();
    let _ = gateway.wait();
    driver.abort();
    assert!(
        text.contains("intake buffer full"),
        "the drops are counted and logged: {text}"
    );
    // 1000 buffered deliveries of 2 KiB are 2 MiB; without the bound the
    // flood's 195 MiB would be held.
    assert!(
        peak - before < 100 * 1024,
        "resident memory grew by {} MiB",
        (peak - before) / 1024
    );
}
