//! End-to-end throughput and latency of a rule without the model, through a
//! real mosquitto, for Ganglion and for Node-RED doing the same work, in one
//! run:
//!
//! JSON telemetry → clean-readings → threshold-alert → alert published (QoS 1 in and out).
//!
//! `cargo run -p xtask -- bench-mqtt` (installs Node-RED with npm into
//! target/node-red first), or `cargo bench -p ganglion-tests --bench
//! mqtt_throughput` (Node-RED rows only when target/node-red has it).
//!
//! Throughput: N messages published as fast as the broker takes them (QoS 1,
//! 100 in flight); messages/s = N ÷ (last output − first publish).
//! Latency: messages at a fixed rate; each output's arrival minus its
//! message's publish, p50 and p99.

use ganglion::llm::NoModel;
use ganglion_tests::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RULE: &str = r#"
topics = ["bench/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 0.0, level = "critical" }] }
"#;

const NODE_RED_FUNCTION: &str = r#"
const d = JSON.parse(msg.payload);
const dev = msg.topic.split('/')[1];
const v = Number(d.value);
if (d.metric === 'temperature' && Number.isFinite(v) && v > 0) {
  msg.topic = 'nodered/alert/' + dev;
  msg.payload = JSON.stringify({ device: dev, level: 'critical', text: dev + ': temperature ' + v + ' above 0' });
  return msg;
}
return null;
"#;

struct Run {
    throughput: f64,
    p50: Duration,
    p99: Duration,
    latency_rate: u64,
    received: usize,
    sent: usize,
}

/// Publishes `n` messages (ids 1..=n) on `topic(i)` at `rate` per second
/// (0: as fast as possible) and times the outputs on `out_filter`.
async fn drive(
    port: u16,
    prefix: &str,
    out_filter: &str,
    n: usize,
    rate: u64,
) -> (Vec<Option<Instant>>, Vec<Option<Instant>>) {
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n + 1]));
    let got: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n + 1]));
    let mut o = MqttOptions::new(format!("bench-rx-{}", free_port()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
    let (rx_client, mut rx_loop) = AsyncClient::new(o, 1024);
    rx_loop.set_network_options(ganglion::mqtt::network_options());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let got2 = got.clone();
    let filter = out_filter.to_owned();
    let receiver = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match rx_loop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => rx_client
                    .subscribe(filter.clone(), QoS::AtLeastOnce)
                    .await
                    .unwrap(),
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    let text = String::from_utf8_lossy(&p.payload);
                    if let Some(id) = text
                        .split("temperature ")
                        .nth(1)
                        .and_then(|t| t.split(' ').next())
                        .and_then(|v| v.parse::<usize>().ok())
                    {
                        let mut g = got2.lock().unwrap();
                        if id < g.len() && g[id].is_none() {
                            g[id] = Some(now);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready_rx.await.unwrap();

    let mut o = MqttOptions::new(format!("bench-tx-{}", free_port()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
    let (tx_client, mut tx_loop) = AsyncClient::new(o, 1024);
    tx_loop.set_network_options(ganglion::mqtt::network_options());
    let poller = tokio::spawn(async move { while tx_loop.poll().await.is_ok() {} });
    let start = Instant::now();
    for id in 1..=n {
        if rate > 0 {
            tokio::time::sleep_until(
                (start + Duration::from_secs_f64((id - 1) as f64 / rate as f64)).into(),
            )
            .await;
        }
        let payload = format!(r#"{{"metric":"temperature","value":{id},"unit":"C"}}"#);
        sent.lock().unwrap()[id] = Some(Instant::now());
        tx_client
            .publish(
                format!("{prefix}/d{}/telemetry", id % 16),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.lock().unwrap().iter().skip(1).any(Option::is_none) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.abort();
    poller.abort();
    let s = sent.lock().unwrap().clone();
    let g = got.lock().unwrap().clone();
    (s, g)
}

async fn measure(port: u16, prefix: &str, out_filter: &str, n: usize, latency_rate: u64) -> Run {
    let (sent, got) = drive(port, prefix, out_filter, n, 0).await;
    let first = sent.iter().flatten().min().copied().unwrap();
    let last = got.iter().flatten().max().copied().unwrap_or(first);
    let received = got.iter().flatten().count();
    let throughput = received as f64 / (last - first).as_secs_f64();

    let m = (latency_rate * 5) as usize;
    let (sent, got) = drive(port, prefix, out_filter, m, latency_rate).await;
    let mut lat: Vec<Duration> = sent
        .iter()
        .zip(&got)
        .filter_map(|(s, g)| Some(g.as_ref()?.duration_since(*s.as_ref()?)))
        .collect();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Run {
        throughput,
        p50: pct(0.50),
        p99: pct(0.99),
        latency_rate,
        received,
        sent: n,
    }
}

fn node_red_flow(port: u16) -> String {
    serde_json::json!([
        { "id": "broker", "type": "mqtt-broker", "name": "bench", "broker": "127.0.0.1", "port": port.to_string(), "clientid": "node-red-bench",
          "protocolVersion": "4", "keepalive": "30", "cleansession": true, "autoConnect": true },
        { "id": "tab", "type": "tab", "label": "bench" },
        { "id": "in", "type": "mqtt in", "z": "tab", "topic": "nr/+/telemetry", "qos": "1", "datatype": "utf8", "broker": "broker", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "tab", "func": NODE_RED_FUNCTION, "outputs": 1, "wires": [["out"]] },
        { "id": "out", "type": "mqtt out", "z": "tab", "qos": "1", "retain": "false", "broker": "broker", "wires": [] }
    ])
    .to_string()
}

fn start_node_red(port: u16) -> Option<std::process::Child> {
    let bin = xtask::root().join("target/node-red/node_modules/.bin/node-red");
    if !bin.exists() {
        eprintln!(
            "Node-RED not installed in target/node-red (cargo run -p xtask -- bench-mqtt installs it); its rows are skipped"
        );
        return None;
    }
    let dir = scratch("node-red");
    std::fs::write(dir.join("flows.json"), node_red_flow(port)).unwrap();
    let child = std::process::Command::new(bin)
        .arg("--userDir")
        .arg(&dir)
        .arg("--port")
        .arg(free_port().to_string())
        .arg(dir.join("flows.json"))
        .stdout(std::fs::File::create(dir.join("node-red.log")).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let log = dir.join("node-red.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("Connected to broker")
        {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "Node-RED did not connect to the broker; see {}",
        log.display()
    );
    None
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let latency_rate: u64 = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    // The load generator and the receiver on one runtime, the gateway on
    // another, as `ganglion run` has its own: sharing the gateway's two
    // workers with the generator held its throughput down by about a third
    // (Node-RED is a process of its own either way).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = Mosquitto::start("bench-mosquitto");
    let dir = scratch("bench-rules");
    std::fs::write(dir.join("bench.toml"), RULE).unwrap();
    let gw = gateway_rt.block_on(RunningGateway::start(
        &broker.url(),
        "bench-gw",
        &dir,
        Arc::new(NoModel),
    ));
    assert!(gw.problems.is_empty(), "{:?}", gw.problems);
    let ganglion = rt.block_on(measure(
        broker.port,
        "bench",
        "ganglion/alert/bench/#",
        n,
        latency_rate,
    ));
    gateway_rt.block_on(gw.stop());
    rt.block_on(async {
        let node_red = match start_node_red(broker.port) {
            Some(mut child) => {
                let r = measure(broker.port, "nr", "nodered/alert/#", n, latency_rate).await;
                let _ = child.kill();
                let _ = child.wait();
                Some(r)
            }
            None => None,
        };

        println!("\n| flow | messages out of | throughput (msg/s) | latency at | p50 | p99 |");
        println!("|---|---:|---:|---:|---:|---:|");
        let row = |name: &str, r: &Run| {
            println!(
                "| {name} | {} / {} | {:.0} | {} msg/s | {:.2} ms | {:.2} ms |",
                r.received,
                r.sent,
                r.throughput,
                r.latency_rate,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3
            )
        };
        row("Ganglion", &ganglion);
        if let Some(nr) = &node_red {
            row("Node-RED", nr);
            println!(
                "\nthroughput ratio Ganglion ÷ Node-RED: {:.2}×",
                ganglion.throughput / nr.throughput
            );
        }
    });
}
