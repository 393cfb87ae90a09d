//! Faults through the real binary and a real mosquitto: the gateway killed
//! with SIGKILL mid-stream, a QoS 0 flood far beyond what a slow rule
//! drains, hostile plugins (every fault mode of the `misbehave` fixture and a
//! component over the memory cap) beside a healthy rule, and 10,000 distinct
//! devices against a window cap. Each prints its figures (sent, received,
//! lost, duplicates, dead letters, resident memory) for docs/RELIABILITY.md.

use ganglion_tests::gateways::*;
use ganglion_tests::*;
use std::collections::HashMap;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
pub(crate) const SLOW_RULE: &str = r#"
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
    let (host, port) = ganglion::mqtt::broker_address(&broker.url())
        .map(|(h, p, _)| (h, p))
        .unwrap();
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

/// The fault modes of the `misbehave` fixture, each with the dead-letter
/// kind every one of its messages must get; `None`: the call succeeds (its
/// log lines are capped) and nothing is dead-lettered.
const HOSTILE_MODES: [(&str, Option<&str>); 7] = [
    ("loop", Some("deadline")),
    ("oom", Some("memory-limit")),
    ("trap", Some("trap")),
    ("oversize", Some("output-too-large")),
    ("bad-index", Some("invalid-output")),
    ("llm-loop", Some("plugin-error")),
    ("log-flood", None),
];

/// A rule whose preprocess misbehaves in `mode`.
fn hostile_rule(mode: &str) -> String {
    format!(
        r#"
topics = ["hostile/{mode}/+"]
format = "raw"
[[preprocess]]
plugin = "misbehave"
config = {{ mode = "{mode}" }}
[postprocess]
plugin = "threshold-alert"
config = {{ thresholds = [{{ metric = "bytes", above = 0.0 }}] }}
"#
    )
}

/// A rule on a component that cannot be loaded (four memories that
/// together pass the instance's memory cap).
const MANY_MEMORIES_RULE: &str = r#"
topics = ["hostile/many-memories/+"]
format = "raw"
[[preprocess]]
plugin = "many-memories"
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "bytes", above = 0.0 }] }
"#;

/// A healthy rule beside the hostile ones: every reading above 50 alerts.
const HEALTHY_RULE: &str = r#"
topics = ["healthy/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 50.0 }] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_never_take_the_gateway_down() {
    const PER_MODE: usize = 5;
    const HEALTHY: usize = 2 * PER_MODE;
    let broker = Mosquitto::start("fault-hostile");
    let rules: Vec<(String, String)> = HOSTILE_MODES
        .iter()
        .map(|(mode, _)| (format!("hostile-{mode}"), hostile_rule(mode)))
        .chain([
            ("hostile-many-memories".into(), MANY_MEMORIES_RULE.into()),
            ("healthy".into(), HEALTHY_RULE.into()),
        ])
        .collect();
    let rules: Vec<(&str, &str)> = rules
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    // Under a 32 MiB cap per instance, `oom` stops at the cap and the four
    // 10 MiB memories of many-memories cannot all be had.
    let dir = gateway_dir_tables(
        "fault-hostile-gw",
        &broker.url(),
        &[
            ("misbehave", fixture("misbehave")),
            ("many-memories", wat_fixture("many-memories.wat")),
            ("clean-readings", example("clean-readings")),
            ("threshold-alert", example("threshold-alert")),
        ],
        &rules,
        "",
        "[plugins.limits]\nmax_memory_mib = 32\n",
    );
    let receiver = TestClient::connect(
        &broker.url(),
        "fault-hostile-receiver",
        &["ganglion/dead-letter/#", "ganglion/alert/#"],
    )
    .await;
    let (mut gateway, log) = start_gateway(&dir);
    let sensor = TestClient::connect(&broker.url(), "fault-hostile-sensor", &[]).await;
    let started = Instant::now();
    for round in 0..PER_MODE {
        for (mode, _) in HOSTILE_MODES {
            sensor
                .publish(&format!("hostile/{mode}/d{round}"), format!("msg-{round}"))
                .await;
        }
        for h in 0..HEALTHY / PER_MODE {
            sensor
                .publish(
                    &format!("healthy/h{round}-{h}/telemetry"),
                    r#"{"metric":"temperature","value":60.0}"#,
                )
                .await;
        }
    }
    let expected_dead = PER_MODE * HOSTILE_MODES.iter().filter(|(_, k)| k.is_some()).count();
    let arrived = receiver
        .wait_until(60, |r| {
            r.on("ganglion/dead-letter/#").len() >= expected_dead
                && r.on("ganglion/alert/healthy/#").len() >= HEALTHY
        })
        .await;
    // Anything late or extra (a second dead letter for one message) shows
    // up within another second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alive = gateway.try_wait().unwrap().is_none();
    let text = log.text();
    let _ = gateway.kill();
    let _ = gateway.wait();

    let kinds = |rule: &str| -> Vec<String> {
        receiver
            .on(&format!("ganglion/dead-letter/{rule}"))
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let mut figures = Vec::new();
    for (mode, _) in HOSTILE_MODES {
        let k = kinds(&format!("hostile-{mode}"));
        let mut by_kind: Vec<(String, usize)> = Vec::new();
        for kind in &k {
            match by_kind.iter_mut().find(|(n, _)| n == kind) {
                Some((_, c)) => *c += 1,
                None => by_kind.push((kind.clone(), 1)),
            }
        }
        let by_kind: Vec<String> = by_kind.iter().map(|(n, c)| format!("{n} x{c}")).collect();
        figures.push(format!(
            "{mode}: sent {PER_MODE}, dead letters {} [{}]",
            k.len(),
            by_kind.join(", ")
        ));
    }
    let plugin_lines = text
        .lines()
        .filter(|l| l.contains("misbehave") && l.contains(" line "))
        .count();
    let refused_at_load = text
        .lines()
        .any(|l| l.contains("many-memories") && l.contains("memory"));
    let healthy_alerts = receiver.on("ganglion/alert/healthy/#").len();
    println!(
        "hostile plugins: {}; log-flood: {plugin_lines} plugin log lines for {PER_MODE} calls of 10,000; many-memories: {}; healthy: sent {HEALTHY}, alerts {healthy_alerts}, dead letters {}; gateway {} after {:.1} s",
        figures.join("; "),
        if refused_at_load {
            "refused at load"
        } else {
            "NOT refused"
        },
        kinds("healthy").len(),
        if alive { "alive" } else { "DEAD" },
        started.elapsed().as_secs_f64()
    );

    assert!(alive, "the gateway exited: {text}");
    assert!(arrived, "not every outcome arrived within 60 s: {text}");
    for (mode, kind) in HOSTILE_MODES {
        let rule = format!("hostile-{mode}");
        let k = kinds(&rule);
        match kind {
            Some(kind) => assert!(
                k.len() == PER_MODE && k.iter().all(|k| k == kind),
                "{rule}: every message is dead-lettered once with kind {kind}, got {k:?}"
            ),
            None => assert!(k.is_empty(), "{rule}: nothing dead-lettered, got {k:?}"),
        }
        assert!(
            receiver.on(&format!("ganglion/alert/{rule}/#")).is_empty(),
            "{rule} produced an output"
        );
    }
    // The model-call loop is stopped by the per-call cap on model calls
    // (not by the guest deadline: the time is spent in the host).
    for d in receiver.on("ganglion/dead-letter/hostile-llm-loop") {
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("max_llm_calls_per_call"), "{reason}");
    }
    assert!(
        plugin_lines <= 100 * PER_MODE,
        "log lines are capped at 100 per call: {plugin_lines}"
    );
    assert!(
        refused_at_load,
        "the many-memories component is refused at load, naming the memory cap: {text}"
    );
    assert!(
        receiver
            .on("ganglion/dead-letter/hostile-many-memories")
            .is_empty(),
        "a rule on a refused plugin does not run"
    );
    assert_eq!(
        healthy_alerts, HEALTHY,
        "the healthy rule's outputs: {text}"
    );
    assert!(kinds("healthy").is_empty());
}

/// A windowed rule whose device comes from the payload: every device opens
/// a window of five readings.
const WINDOWED_RULE: &str = r#"
topics = ["many/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
[window]
count = 5
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 50.0 }] }
"#;

/// What a subscriber got: (topic, JSON payload without `payload_base64`).
type Tally = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// Subscribes to `filters` at QoS 1 and keeps every message as JSON less
/// its payload copy: cheap to count while thousands of dead letters come.
async fn tally(url: &str, id: &str, filters: &[&str]) -> (Tally, tokio::task::JoinHandle<()>) {
    let (host, port) = ganglion::mqtt::broker_address(url)
        .map(|(h, p, _)| (h, p))
        .unwrap();
    let mut o = rumqttc::MqttOptions::new(id, host, port);
    o.set_inflight(100);
    let (client, mut events) = rumqttc::AsyncClient::new(o, 1024);
    let got: Tally = Arc::default();
    let (sink, filters) = (
        got.clone(),
        filters.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
    );
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    for f in &filters {
                        let _ = client.subscribe(f, rumqttc::QoS::AtLeastOnce).await;
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let mut v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("payload_base64");
                    }
                    sink.lock().unwrap().push((p.topic.clone(), v));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
    (got, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_devices_keep_memory_bounded() {
    const DEVICES: usize = 10_000;
    const MAX_WINDOWS: usize = 1_000;
    const BATCH: usize = 500;
    /// Resident memory the gateway may gain over the stream.
    const BOUND_MIB: u64 = 24;
    let broker = Mosquitto::start("fault-devices");
    let dir = gateway_dir_tables(
        "fault-devices-gw",
        &broker.url(),
        &[
            ("clean-readings", example("clean-readings")),
            ("threshold-alert", example("threshold-alert")),
        ],
        &[("windowed", WINDOWED_RULE)],
        "",
        &format!("[rules.limits]\nmax_windows = {MAX_WINDOWS}\n"),
    );
    let (got, receiver) = tally(
        &broker.url(),
        "fault-devices-receiver",
        &["ganglion/dead-letter/#", "ganglion/alert/#"],
    )
    .await;
    let (mut gateway, log) = start_gateway(&dir);
    let pid = gateway.id();
    let before = rss_kib(pid);
    let mut peak = before;
    let sensor = TestClient::connect(&broker.url(), "fault-devices-sensor", &[]).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(50);
    let outcomes = || got.lock().unwrap().len();
    // Each window keeps the opening message's first bytes (for its dead
    // letter): 2 KiB of device metadata makes open windows show in the
    // resident memory, ~20 MiB for 10,000 of them.
    let meta = "m".repeat(2048);
    let reading = |device: &str, value: f64| {
        format!(r#"{{"device":"{device}","metric":"temperature","value":{value},"meta":"{meta}"}}"#)
    };
    // One topic: one lane, so devices open windows in the order sent and
    // exactly the first MAX_WINDOWS get one. Sent in batches, each once
    // the gateway has handled the one before (its dead letters are out),
    // so that what is measured is what the gateway keeps, not a backlog
    // of deliveries (mosquitto 2.0.11 sends past its in-flight window, see
    // docs/NOTES.md).
    for start in (0..DEVICES).step_by(BATCH) {
        for i in start..start + BATCH {
            sensor
                .publish("many/gw/telemetry", reading(&format!("dev-{i}"), 20.0))
                .await;
        }
        let handled = (start + BATCH).saturating_sub(MAX_WINDOWS);
        while outcomes() < handled && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak = peak.max(rss_kib(pid));
    }
    // dev-0 has a window: four more hot readings complete it.
    for _ in 0..4 {
        sensor
            .publish("many/gw/telemetry", reading("dev-0", 90.0))
            .await;
    }
    let total = (DEVICES + 4) as u64;
    let expected = DEVICES - MAX_WINDOWS;
    while Instant::now() < deadline && (sensor.acked() < total || outcomes() < expected + 1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(pid));
    }
    // Anything late or extra shows up within another second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    peak = peak.max(rss_kib(pid));
    let alive = gateway.try_wait().unwrap().is_none();
    let text = log.text();
    let _ = gateway.kill();
    let _ = gateway.wait();
    receiver.abort();

    let got = got.lock().unwrap().clone();
    let mut refused = std::collections::BTreeSet::new();
    let mut windows_open = 0usize;
    let mut others = Vec::new();
    let mut alerts = Vec::new();
    for (topic, d) in &got {
        if topic.starts_with("ganglion/alert/") {
            alerts.push(d["device"].as_str().unwrap_or("?").to_owned());
            continue;
        }
        let reason = d["reason"].as_str().unwrap_or_default();
        if d["kind"] != "too-many-windows" {
            others.push(format!("{}: {reason}", d["kind"]));
            continue;
        }
        // "1 readings of 1 new devices (first `dev-N`) refused: the rule
        // already has M open windows (`[rules.limits] max_windows`)"
        let device = reason
            .split('`')
            .nth(1)
            .and_then(|d| d.strip_prefix("dev-"))
            .and_then(|n| n.parse::<usize>().ok());
        refused.insert(device.unwrap_or(usize::MAX));
        let open = reason
            .split("already has ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        windows_open = windows_open.max(open);
    }
    let dead = got.len() - alerts.len();
    println!(
        "10,000 devices: sent {DEVICES} readings of distinct devices (+4 to dev-0) at QoS 1 in batches of {BATCH}, {} acked, {:.1} s; max_windows {MAX_WINDOWS}, windows open at refusal {windows_open}; dead letters {dead} ({} too-many-windows for distinct devices, {} other); alerts {alerts:?}; gateway RSS {} MiB before, peak {} MiB (bound +{BOUND_MIB} MiB); gateway {}",
        sensor.acked(),
        started.elapsed().as_secs_f64(),
        refused.len(),
        others.len(),
        before / 1024,
        peak / 1024,
        if alive { "alive" } else { "DEAD" },
    );

    assert!(alive, "the gateway exited: {text}");
    assert_eq!(
        sensor.acked(),
        total,
        "the broker acknowledged every reading"
    );
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(dead, expected, "one dead letter per refused device");
    assert_eq!(
        refused,
        (MAX_WINDOWS..DEVICES).collect(),
        "exactly the devices past the first {MAX_WINDOWS} are refused"
    );
    assert_eq!(windows_open, MAX_WINDOWS);
    // The cap does not stop the devices that have a window.
    assert_eq!(alerts, ["dev-0"]);
    assert!(
        peak.saturating_sub(before) < BOUND_MIB * 1024,
        "resident memory grew by {} MiB",
        (peak - before) / 1024
    );
}

/// Windows of six readings per device, a tagged output when one runs.
const KILL_WINDOW_RULE: &str = r#"
topics = ["fault/win/+"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 2 }
[window]
count = 6
[postprocess]
plugin = "tagger"
[allow]
publish = ["tagged/{device}"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_mid_window_loses_no_reading_of_the_open_windows() {
    const DEVICES: usize = 20;
    let broker = Mosquitto::start("fault-window");
    let dir = gateway_dir(
        "fault-window-gw",
        &broker.url(),
        &[
            ("tagger", fixture("tag-a")),
            ("clean-readings", example("clean-readings")),
        ],
        &[("windows", KILL_WINDOW_RULE)],
    );
    let receiver = TestClient::connect(&broker.url(), "fault-window-receiver", &["tagged/#"]).await;
    let (mut gateway, _log) = start_gateway(&dir);
    let sensor = TestClient::connect(&broker.url(), "fault-window-sensor", &[]).await;
    let reading = |v: usize| format!(r#"{{"metric":"temperature","value":{v}}}"#);
    for round in 0..4 {
        for d in 0..DEVICES {
            sensor
                .publish(&format!("fault/win/d{d}"), reading(round))
                .await;
        }
    }
    assert!(
        sensor
            .wait_until(30, |s| s.acked() >= (4 * DEVICES) as u64)
            .await
    );
    // Long enough for the gateway to take, persist and acknowledge them all:
    // after the kill the broker has nothing of them left to deliver again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(receiver.received().is_empty(), "no window is full yet");
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    let (mut gateway, log) = start_gateway(&dir);
    for round in 4..6 {
        for d in 0..DEVICES {
            sensor
                .publish(&format!("fault/win/d{d}"), reading(round))
                .await;
        }
    }
    let full = |r: &TestClient| {
        r.received()
            .iter()
            .filter_map(|(t, p)| {
                let v: serde_json::Value = serde_json::from_slice(p).ok()?;
                (v["readings"] == 6).then(|| t.clone())
            })
            .collect::<std::collections::BTreeSet<String>>()
    };
    let complete = receiver.wait_until(60, |r| full(r).len() >= DEVICES).await;
    let outputs = receiver.received();
    println!(
        "kill -9 mid-window: {DEVICES} windows of 6, 4 readings each acknowledged before the kill, 2 after; {} windows ran with all 6 readings, {} outputs in all",
        full(&receiver).len(),
        outputs.len()
    );
    let _ = gateway.kill();
    let _ = gateway.wait();
    assert!(
        complete,
        "windows that ran complete: {:?}; outputs {:?}; {}",
        full(&receiver),
        outputs
            .iter()
            .map(|(t, p)| format!("{t} {}", String::from_utf8_lossy(p)))
            .collect::<Vec<_>>(),
        log.text()
    );
    assert!(
        log.text().contains("open windows restored"),
        "{}",
        log.text()
    );
}
