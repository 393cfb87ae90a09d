//! Rules over MQTT, through the real gateway, against a real mosquitto broker
//! and the embedded one: telemetry in, actions out, dead letters with their
//! reasons, and no message lost across a broker restart.

use ganglion::llm::FakeLlm;
use ganglion::mqtt::OutputConnection;
use ganglion_tests::*;
use serde_json::Value as Json;
use std::time::Duration;

pub(crate) const TELEMETRY_RULE: &str = r#"
topics = ["t/+/telemetry"]
max_payload_bytes = 2048
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 50.0, level = "critical" }] }
"#;

const TRAP_RULE: &str = r#"
topics = ["fixture/trap"]
format = "raw"
[[preprocess]]
plugin = "misbehave"
config = { mode = "trap" }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "bytes", above = 0.0 }] }
"#;

async fn telemetry_to_actions_and_dead_letters(url: &str) {
    telemetry_to_actions_and_dead_letters_with(url, ganglion::mqtt::Protocol::V311).await
}

async fn telemetry_to_actions_and_dead_letters_with(url: &str, protocol: ganglion::mqtt::Protocol) {
    telemetry_to_actions_and_dead_letters_on(url, protocol, OutputConnection::Separate).await
}

async fn telemetry_to_actions_and_dead_letters_on(
    url: &str,
    protocol: ganglion::mqtt::Protocol,
    output_connection: OutputConnection,
) {
    let dir = rules_dir(&[
        ("hot", TELEMETRY_RULE),
        ("voice", VOICE_RULE),
        ("trap", TRAP_RULE),
    ]);
    let settings = ganglion::mqtt::MqttSettings {
        client_id: format!("gw-{}", free_port()),
        protocol,
        output_connection,
        ..Default::default()
    };
    let status = settings.status_topic();
    let gw = RunningGateway::start_with(url, settings, &dir, voice_model()).await;
    assert!(gw.problems.is_empty(), "{:?}", gw.problems);
    let watcher =
        TestClient::connect(url, &format!("watch-{}", free_port()), &["ganglion/#"]).await;
    let sensor = TestClient::connect(url, &format!("sensor-{}", free_port()), &[]).await;

    sensor
        .publish("t/m1/telemetry", r#"{"metric":"temperature","value":20}"#)
        .await;
    sensor
        .publish("t/m1/telemetry", r#"{"metric":"temperature","value":75.5}"#)
        .await;
    sensor
        .publish(
            "t/m2/telemetry",
            "{\"metric\": \"temperature\", \"value\": 7",
        )
        .await;
    sensor
        .publish("t/m3/telemetry", vec![0xff, 0x00, 0x9c, 0x12])
        .await;
    sensor
        .publish(
            "t/m4/telemetry",
            format!(
                r#"{{"metric":"temperature","value":99,"pad":"{}"}}"#,
                "x".repeat(4096)
            ),
        )
        .await;
    sensor.publish("fixture/trap", "boom").await;
    sensor
        .publish(
            "home/kitchen/say",
            r#"{"metric":"speech","value":"it is too warm"}"#,
        )
        .await;
    sensor
        .publish(
            "home/hall/say",
            r#"{"metric":"speech","value":"open the door"}"#,
        )
        .await;
    sensor
        .publish("t/m5/telemetry", r#"{"metric":"temperature","value":60}"#)
        .await;

    let done = watcher
        .wait_until(20, |w| {
            w.on("ganglion/alert/hot/+").len() >= 2
                && w.on("ganglion/dead-letter/+").len() >= 5
                && !w.on("ganglion/command/#").is_empty()
        })
        .await;
    let alerts = watcher.on("ganglion/alert/hot/+");
    let dead: Vec<Json> = [
        watcher.on("ganglion/dead-letter/hot"),
        watcher.on("ganglion/dead-letter/voice"),
        watcher.on("ganglion/dead-letter/trap"),
    ]
    .concat();
    assert!(
        done,
        "alerts {alerts:?}\ndead letters {dead:?}\nall {:?}",
        watcher.received().len()
    );

    let mut devices: Vec<&str> = alerts
        .iter()
        .map(|a| a["device"].as_str().unwrap())
        .collect();
    devices.sort();
    let processed = gw.count("hot", |s| &s.messages);
    let published = gw.count("hot", |s| &s.published);
    assert_eq!(
        devices,
        vec!["m1", "m5"],
        "good traffic flows around the bad (hot: {processed} messages, {published} published; {:?})",
        watcher
            .received()
            .iter()
            .map(|(t, _)| t.clone())
            .collect::<Vec<_>>()
    );
    let commands = watcher.on("ganglion/command/#");
    assert_eq!(commands.len(), 1);
    assert_eq!(
        (
            commands[0]["device"].as_str(),
            commands[0]["command"].as_str(),
            commands[0]["value"].as_str()
        ),
        (Some("kitchen"), Some("fan"), Some("on"))
    );
    // Each connection announces itself (retained) under its client id: the
    // output connection's id ends in `-out`, and a shared link has none.
    let online = |topic: &str| {
        watcher
            .received()
            .iter()
            .any(|(t, p)| t == topic && p.as_slice() == b"online")
    };
    assert!(online(&status), "intake connection online on {status}");
    assert_eq!(
        online(&format!("{status}-out")),
        output_connection == OutputConnection::Separate,
        "an output connection of its own only when separate"
    );

    let find = |kind: &str| {
        dead.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no `{kind}` dead letter in {dead:?}"))
    };
    let bad_json = find("bad-payload");
    assert_eq!(bad_json["stage"], "intake");
    assert!(
        dead.iter().filter(|d| d["kind"] == "bad-payload").count() >= 2,
        "malformed JSON and binary garbage: {dead:?}"
    );
    let oversized = find("oversized-payload");
    assert_eq!(oversized["topic"], "t/m4/telemetry");
    let trap = find("trap");
    assert_eq!(
        (trap["stage"].as_str(), trap["plugin"].as_str()),
        (Some("preprocess"), Some("misbehave"))
    );
    assert_eq!(trap["version"].as_str().map(str::len), Some(12));
    use base64::Engine as _;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(trap["payload_base64"].as_str().unwrap())
            .unwrap(),
        b"boom"
    );
    let refused = find("refused-action");
    assert_eq!(
        (refused["stage"].as_str(), refused["rule"].as_str()),
        (Some("allow-list"), Some("voice"))
    );
    assert!(
        refused["reason"].as_str().unwrap().contains("unlock"),
        "{refused}"
    );

    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mosquitto() {
    let broker = Mosquitto::start("mosquitto-e2e");
    telemetry_to_actions_and_dead_letters(&broker.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mosquitto_with_mqtt5() {
    let broker = Mosquitto::start("mosquitto-e2e-v5");
    telemetry_to_actions_and_dead_letters_with(&broker.url(), ganglion::mqtt::Protocol::V5).await;
}

/// Outputs on the intake connection: the same traffic, the same outcomes,
/// one client at the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mosquitto_on_one_connection() {
    let broker = Mosquitto::start("mosquitto-e2e-one");
    telemetry_to_actions_and_dead_letters_on(
        &broker.url(),
        ganglion::mqtt::Protocol::V311,
        OutputConnection::Shared,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mosquitto_with_mqtt5_on_one_connection() {
    let broker = Mosquitto::start("mosquitto-e2e-v5-one");
    telemetry_to_actions_and_dead_letters_on(
        &broker.url(),
        ganglion::mqtt::Protocol::V5,
        OutputConnection::Shared,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_embedded_broker() {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    ganglion::broker::start_embedded(addr).unwrap();
    telemetry_to_actions_and_dead_letters(&format!("mqtt://{addr}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing() {
    restart_in_the_middle(ganglion::mqtt::Protocol::V311).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing_with_mqtt5() {
    restart_in_the_middle(ganglion::mqtt::Protocol::V5).await
}

/// With outputs and acknowledgements on one connection, a restart cuts
/// both at once: unacknowledged outputs are sent again and unacknowledged
/// deliveries come again; every message still gets its alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing_on_one_connection() {
    restart_on(ganglion::mqtt::Protocol::V311, OutputConnection::Shared).await
}

async fn restart_in_the_middle(protocol: ganglion::mqtt::Protocol) {
    restart_on(protocol, OutputConnection::Separate).await
}

async fn restart_on(protocol: ganglion::mqtt::Protocol, output_connection: OutputConnection) {
    const N: u64 = 5_000;
    let mut broker = Mosquitto::start("mosquitto-restart");
    let url = broker.url();
    let dir = rules_dir(&[("hot", TELEMETRY_RULE)]);
    let settings = ganglion::mqtt::MqttSettings {
        client_id: "gw-restart".into(),
        protocol,
        output_connection,
        ..Default::default()
    };
    let gw = RunningGateway::start_with(&url, settings, &dir, voice_model()).await;
    let watcher = TestClient::connect(
        &url,
        "watch-restart",
        &["ganglion/alert/#", "ganglion/dead-letter/#"],
    )
    .await;
    let sensor = TestClient::connect(&url, "sensor-restart", &[]).await;

    // Every reading is above the bound, so every message has exactly one
    // alert; the value names the message.
    let publisher = tokio::spawn({
        let client = sensor.client.clone();
        async move {
            for i in 0..N {
                let payload = format!(r#"{{"metric":"temperature","value":{}}}"#, 100 + i);
                client
                    .publish(
                        format!("t/d{}/telemetry", i % 50),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .unwrap();
            }
        }
    });
    assert!(
        watcher
            .wait_until(60, |w| w.received().len() >= 1_000)
            .await,
        "stream under way"
    );
    broker.restart();
    publisher.await.unwrap();

    // A message's outcome is its alert, or its dead letter: on a loaded
    // machine a plugin call can overrun its guest-time budget (`deadline`),
    // which dead-letters the message rather than losing it. The value names
    // the message.
    let value_of = |text: &str| -> Option<u64> {
        text.split("temperature ")
            .nth(1)?
            .split(' ')
            .next()?
            .parse::<u64>()
            .ok()
    };
    // (messages with an outcome, sorted; duplicate outcomes; dead-letter
    // kinds seen)
    let tally = |w: &TestClient| -> (Vec<u64>, usize, Vec<String>) {
        let alerts = w
            .on("ganglion/alert/#")
            .into_iter()
            .filter_map(|a| value_of(a["text"].as_str()?));
        use base64::Engine as _;
        let mut kinds = Vec::new();
        let dead: Vec<u64> = w
            .on("ganglion/dead-letter/#")
            .into_iter()
            .filter_map(|d| {
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(d["payload_base64"].as_str()?)
                    .ok()?;
                let value = serde_json::from_slice::<Json>(&payload).ok()?["value"].as_u64()?;
                kinds.push(d["kind"].as_str().unwrap_or("").to_owned());
                Some(value)
            })
            .collect();
        let mut ids: Vec<u64> = alerts.chain(dead).map(|v| v - 100).collect();
        let total = ids.len();
        ids.sort();
        ids.dedup();
        kinds.sort();
        kinds.dedup();
        let duplicates = total - ids.len();
        (ids, duplicates, kinds)
    };
    let complete = watcher
        .wait_until(120, |w| tally(w).0.len() as u64 >= N)
        .await;
    let (ids, duplicates, kinds) = tally(&watcher);
    let unique = ids.len() as u64;
    if !complete {
        let missing: Vec<(u64, u64)> = (0..N)
            .filter(|i| ids.binary_search(i).is_err())
            .take(20)
            .map(|i| (i, i % 50))
            .collect();
        let stats = &gw.stats[0].1;
        panic!(
            "{unique} of {N} messages had an outcome ({duplicates} duplicates); first missing (message, device): {missing:?}; gateway: {} messages, {} published, {:?} dead letters, {} queued, {} busy",
            gw.count("hot", |s| &s.messages),
            gw.count("hot", |s| &s.published),
            stats.dead_letters_by_kind(),
            stats.queued.load(std::sync::atomic::Ordering::SeqCst),
            stats.busy.load(std::sync::atomic::Ordering::SeqCst),
        );
    }
    assert_eq!(unique, N, "0 lost");
    assert!(
        kinds.iter().all(|k| *k == "deadline"),
        "only a plugin overrunning its budget may dead-letter a reading here: {kinds:?}"
    );
    eprintln!(
        "broker restart: {N} messages, {duplicates} duplicate outcomes, dead-letter kinds {kinds:?}"
    );
    gw.stop().await;
}

/// A burst of 10,000 messages over 16 topics all get their outcome. Before
/// TCP_NODELAY and pipelined confirmations this ran at ~84 msg/s and did not
/// finish within the minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_over_many_topics_completes() {
    const N: u64 = 10_000;
    let broker = Mosquitto::start("mosquitto-stress");
    let url = broker.url();
    let dir = rules_dir(&[("hot", TELEMETRY_RULE)]);
    let gw = RunningGateway::start(&url, "gw-stress", &dir, voice_model()).await;
    let watcher = TestClient::connect(&url, "watch-stress", &["ganglion/alert/#"]).await;
    let sensor = TestClient::connect(&url, "sensor-stress", &[]).await;
    for i in 0..N {
        let payload = format!(r#"{{"metric":"temperature","value":{}}}"#, 100 + i);
        sensor
            .client
            .publish(
                format!("t/d{}/telemetry", i % 16),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    let ok = watcher
        .wait_until(60, |w| w.received().len() as u64 >= N)
        .await;
    assert!(
        ok,
        "{} of {N}; gateway processed {} published {}",
        watcher.received().len(),
        gw.count("hot", |s| &s.messages),
        gw.count("hot", |s| &s.published)
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_password_to_an_external_broker() {
    let (broker, tls_port, ca) = Mosquitto::start_tls_auth("mosquitto-tls");
    let dir = rules_dir(&[("hot", TELEMETRY_RULE)]);
    let url = format!("mqtts://localhost:{tls_port}");
    let settings = |password: &str| ganglion::mqtt::MqttSettings {
        client_id: format!("gw-tls-{}", free_port()),
        username: Some("gw".into()),
        password: Some(password.into()),
        ca_file: Some(ca.display().to_string()),
        ..Default::default()
    };

    // A wrong password never connects, and says so without taking anything down.
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let (refused, task) =
        ganglion::mqtt::connect(&settings("wrong"), &url, vec!["t/#".into()], tx).unwrap();
    assert!(
        !refused
            .wait_connected(std::time::Duration::from_secs(2))
            .await
    );
    task.abort();
    // mqtts without a CA file trusts the system's roots, which do not hold
    // the test CA: no connection.
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let no_ca = ganglion::mqtt::MqttSettings {
        ca_file: None,
        ..settings("secret")
    };
    match ganglion::mqtt::connect(&no_ca, &url, vec![], tx) {
        Ok((untrusted, task)) => {
            assert!(
                !untrusted
                    .wait_connected(std::time::Duration::from_secs(2))
                    .await
            );
            task.abort();
        }
        // A machine without any root certificate says so.
        Err(e) => assert!(e.to_string().contains("system root"), "{e}"),
    }

    let gw = RunningGateway::start_with(&url, settings("secret"), &dir, voice_model()).await;
    let watcher = TestClient::connect(&broker.url(), "watch-tls", &["ganglion/alert/#"]).await;
    let sensor = TestClient::connect(&broker.url(), "sensor-tls", &[]).await;
    sensor
        .publish("t/m9/telemetry", r#"{"metric":"temperature","value":80}"#)
        .await;
    assert!(
        watcher
            .wait_until(10, |w| !w.on("ganglion/alert/hot/m9").is_empty())
            .await,
        "alert through the TLS gateway"
    );
    gw.stop().await;
}

/// A slow model keeps more messages unacknowledged than the embedded
/// broker's window (100) while their outputs wait for PUBACKs. Outputs go out
/// on a connection of their own, so every message still gets its output
/// (on one connection rumqttd withheld the PUBACKs and everything stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_model_does_not_stall_the_embedded_broker() {
    const N: usize = 300;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    ganglion::broker::start_embedded(addr).unwrap();
    let url = format!("mqtt://{addr}");
    let dir = rules_dir(&[("voice", VOICE_RULE)]);
    let slow = FakeLlm::with_delay(Duration::from_millis(30), |_| {
        Ok(r#"{"type":"command","command":"fan","value":"on"}"#.into())
    });
    let gw = RunningGateway::start(&url, "gw-slow", &dir, slow).await;
    let watcher = TestClient::connect(&url, "watch-slow", &["ganglion/command/#"]).await;
    let sensor = TestClient::connect(&url, "sensor-slow", &[]).await;
    for i in 0..N {
        sensor
            .publish(
                &format!("home/room{}/say", i % 3),
                r#"{"metric":"speech","value":"turn the fan on"}"#,
            )
            .await;
    }
    assert!(
        watcher.wait_until(120, |w| w.received().len() >= N).await,
        "{} of {N} commands arrived",
        watcher.received().len()
    );
    gw.stop().await;
}

/// The embedded broker withholds PUBACKs from a client whose window is
/// full, which on one connection would stall the flow: `ganglion run`
/// refuses the combination before it loads anything, and says why.
#[test]
fn ganglion_run_refuses_one_connection_with_the_embedded_broker() {
    let dir = scratch("one-connection-embedded");
    let config = dir.join("ganglion.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\noutput_connection = \"shared\"\n\n[broker]\nlisten = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(ganglion_binary())
        .current_dir(&dir)
        .arg("--config")
        .arg(&config)
        .args(["run", "--duration", "5", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("output_connection") && stderr.contains("embedded broker"),
        "{stderr}"
    );
}

/// With accounts on the embedded broker (so anonymous clients are refused),
/// `ganglion run --simulate` logs its own clients in: the gateway and the
/// simulator connect, and the simulated telemetry is processed.
#[test]
fn ganglion_run_logs_its_own_clients_in_to_an_embedded_broker_with_users() {
    built();
    let root = xtask::root();
    let dir = scratch("broker-users");
    let config = dir.join("ganglion.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[plugins]
dir = "{plugins}"
cache_dir = "{dir}/compiled"

[state]
path = "{dir}/state.redb"

[rules]
dir = "{rules}"

[mqtt]
client_id = "ganglion-users-test"

[broker]
listen = "127.0.0.1:{port}"
users = {{ sensor = "s3cret" }}

[audit]
enabled = false

# The drain's default limit is not what this test is about (a loaded CI
# machine can exceed it; a drain cut short exits 1 by design).
[runtime]
drain_timeout_ms = 60000
"#,
            plugins = built().0.display(),
            rules = root.join("examples/rules").display(),
            dir = dir.display(),
            port = free_port(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(ganglion_binary())
        .current_dir(&dir)
        .arg("--config")
        .arg(&config)
        .args(["run", "--simulate", "--duration", "6", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let messages: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("machine-overheat: "))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary for machine-overheat: {stdout}\n{stderr}"));
    assert!(messages > 0, "{stdout}\n{stderr}");
    assert!(
        !stderr.contains("login refused"),
        "the gateway's clients log in: {stderr}"
    );
}
