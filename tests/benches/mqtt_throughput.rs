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
//! 100 in flight); messages/s = N ÷ (last output − first publish). The load
//! generator and the receiver are minimal MQTT clients on blocking sockets
//! (`ganglion_tests::wire`), many messages to a write, so that they take as
//! little as they can of the two cores they share with what they measure;
//! sensors would publish from other machines.
//! Latency: messages at a fixed rate; each output's arrival minus its
//! message's publish, p50 and p99.
//!
//! Ganglion runs three times: with its defaults (`[mqtt] write_batch`:
//! requests queued together go out in one write; outputs on a connection of
//! their own), with `write_batch = 1` (each PUBACK and PUBLISH written
//! alone, as unpatched rumqttc does), and with `output_connection =
//! "shared"` (outputs on the intake connection), so that both are compared
//! within one run.
//!
//! Two more figures tell what the machine allows, whatever the flow does:
//! - a relay row: one rumqttc client that turns each message into the same
//!   alert with no pipeline, plugin or confirmation, over the same four QoS 1
//!   legs;
//! - CPU per message in the throughput phase, from each thread's
//!   `/proc/…/schedstat`: mosquitto, the flow under test, and the load
//!   generator with the receiver; 2 cores ÷ their sum is the most this flow
//!   could reach with both cores busy. Beside it, how many times per
//!   message the flow's threads were put on a CPU (schedstat's third
//!   field): each is a wake-up after the thread slept, which costs a
//!   context switch however little work it brings.
//!
//! And the host's steadiness: one thread running a fixed integer loop with
//! nothing else running, its rate per 50 ms bin against its median. On a
//! shared host the rate dips while the host runs other work; no process in
//! this machine sees that as CPU time taken from it.

use ganglion::llm::NoModel;
use ganglion_tests::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// µs of CPU per message in the throughput phase.
    cpu: Cpu,
}

/// CPU time by party: in ns while sampled, in µs per message in a [`Run`].
#[derive(Clone, Copy, Default)]
struct Cpu {
    broker: f64,
    flow: f64,
    harness: f64,
    /// Times the flow's threads were put on a CPU: a count while sampled,
    /// per message in a [`Run`].
    flow_runs: f64,
}

/// The bench's own threads: the main thread (the publisher) and the `load…`
/// threads are the harness, the rest (the flow runtime's, the gateway's
/// epoch ticker) the flow.
fn own_thread_is_harness(tid: &str, comm: &str) -> bool {
    tid == std::process::id().to_string() || comm.starts_with("load")
}

/// Samples CPU time so far for the parties of one flow.
fn sampler(broker: u32, external_flow: Option<u32>) -> impl Fn() -> Cpu {
    move || Cpu {
        broker: wire::cpu_ns(&broker.to_string(), |_, _| true),
        flow: match external_flow {
            Some(pid) => wire::cpu_ns(&pid.to_string(), |_, _| true),
            None => wire::cpu_ns("self", |t, c| !own_thread_is_harness(t, c)),
        },
        harness: wire::cpu_ns("self", own_thread_is_harness),
        flow_runs: match external_flow {
            Some(pid) => wire::runs(&pid.to_string(), |_, _| true),
            None => wire::runs("self", |t, c| !own_thread_is_harness(t, c)),
        },
    }
}

/// Rate of a fixed integer loop on this thread per 50 ms bin for `secs`,
/// divided by the median bin: (share of bins under half the median, lowest
/// bin).
fn host_steadiness(secs: f64) -> (f64, f64) {
    let start = Instant::now();
    let mut bins = Vec::new();
    let mut x = 1u64;
    while start.elapsed().as_secs_f64() < secs {
        let bin = Instant::now();
        let mut rounds = 0u64;
        while bin.elapsed() < Duration::from_millis(50) {
            for _ in 0..10_000 {
                x = std::hint::black_box(
                    x.wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407),
                );
            }
            rounds += 1;
        }
        bins.push(rounds as f64 / bin.elapsed().as_secs_f64());
    }
    let mut sorted = bins.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let low = bins.iter().filter(|&&b| b < median / 2.0).count();
    (low as f64 / bins.len() as f64, sorted[0] / median)
}

/// A client of the bench's broker, named `<name>-<unique>`.
fn client(port: u16, name: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(format!("{name}-{}", free_port()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
    let (client, mut events) = AsyncClient::new(o, 1024);
    events.set_network_options(ganglion::mqtt::network_options());
    (client, events)
}

/// Subscribes a new client to `filter` at QoS 1 and hands each message to
/// `on_publish` on the client's event loop (each acknowledged on arrival);
/// returns once the broker confirms the subscription.
async fn subscriber(
    port: u16,
    name: &str,
    filter: &str,
    mut on_publish: impl FnMut(rumqttc::Publish) + Send + 'static,
) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let (client, mut events) = client(port, name);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (subscribing, filter) = (client.clone(), filter.to_owned());
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => subscribing
                    .subscribe(filter.clone(), QoS::AtLeastOnce)
                    .await
                    .unwrap(),
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_publish(p),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready_rx.await.unwrap();
    (client, task)
}

/// A client that turns each `relay/<device>/telemetry` message into the
/// alert the flows publish, on `relay/alert/<device>`: no pipeline, no plugin,
/// and the input acknowledged on arrival, not after its output's PUBACK.
async fn start_relay(port: u16) -> Vec<tokio::task::JoinHandle<()>> {
    let (in_tx, mut in_rx) = tokio::sync::mpsc::unbounded_channel::<rumqttc::Publish>();
    let (client, poll) = subscriber(port, "bench-relay", "relay/+/telemetry", move |p| {
        let _ = in_tx.send(p);
    })
    .await;
    let publish = tokio::spawn(async move {
        while let Some(p) = in_rx.recv().await {
            let dev = p.topic.split('/').nth(1).unwrap_or_default().to_owned();
            let text = String::from_utf8_lossy(&p.payload);
            let value = text
                .split("\"value\":")
                .nth(1)
                .and_then(|v| v.split([',', '}']).next())
                .unwrap_or_default();
            let alert = format!(
                r#"{{"device":"{dev}","level":"critical","text":"{dev}: temperature {value} above 0"}}"#
            );
            if client
                .publish(format!("relay/alert/{dev}"), QoS::AtLeastOnce, false, alert)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    vec![poll, publish]
}

fn measure(
    port: u16,
    prefix: &str,
    out_filter: &str,
    n: usize,
    latency_rate: u64,
    cpu: impl Fn() -> Cpu,
) -> Run {
    let before = cpu();
    let (sent, got) = wire::drive(port, prefix, out_filter, n, 0);
    let after = cpu();
    let first = sent.iter().flatten().min().copied().unwrap();
    let last = got.iter().flatten().max().copied().unwrap_or(first);
    let received = got.iter().flatten().count();
    let throughput = received as f64 / (last - first).as_secs_f64();
    let per_message = |a: f64, b: f64| (a - b) / 1e3 / received.max(1) as f64;
    let cpu = Cpu {
        broker: per_message(after.broker, before.broker),
        flow: per_message(after.flow, before.flow),
        harness: per_message(after.harness, before.harness),
        flow_runs: (after.flow_runs - before.flow_runs) / received.max(1) as f64,
    };

    let m = (latency_rate * 5) as usize;
    let (sent, got) = wire::drive(port, prefix, out_filter, m, latency_rate);
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
        cpu,
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
    let (dipped, lowest) = host_steadiness(3.0);

    // The flow (gateway or relay) on a runtime of its own with as many
    // workers as `ganglion run` would start (`[runtime] workers`,
    // `FLOW_WORKERS` here); the load generator and receiver on threads of
    // their own (Node-RED is a process of its own). The thread names tell
    // the parties apart for the CPU figures.
    let workers = std::env::var("FLOW_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| ganglion::config::RuntimeConfig::default().worker_threads());
    let flow_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("flow")
        .enable_all()
        .build()
        .unwrap();
    let broker = Mosquitto::start("bench-mosquitto");
    let broker_pid = broker.pid().unwrap();
    let dir = scratch("bench-rules");
    std::fs::write(dir.join("bench.toml"), wire::BENCH_RULE).unwrap();
    // Ganglion three times: its defaults, writing each request alone
    // (unpatched rumqttc's behaviour), and one connection for everything;
    // under the same client id so that each takes the last one's session
    // back. The A/Bs in one run.
    let mut runs = Vec::new();
    let defaults = ganglion::mqtt::MqttSettings::default();
    for (name, write_batch, output_connection) in [
        ("Ganglion", defaults.write_batch, defaults.output_connection),
        ("Ganglion, write_batch = 1", 1, defaults.output_connection),
        (
            "Ganglion, one connection",
            defaults.write_batch,
            ganglion::mqtt::OutputConnection::Shared,
        ),
    ] {
        let settings = ganglion::mqtt::MqttSettings {
            client_id: "bench-gw".into(),
            write_batch,
            output_connection,
            ..Default::default()
        };
        let gw = flow_rt.block_on(RunningGateway::start_with(
            &broker.url(),
            settings,
            &dir,
            Arc::new(NoModel),
        ));
        assert!(gw.problems.is_empty(), "{:?}", gw.problems);
        runs.push((
            name,
            measure(
                broker.port,
                "bench",
                "ganglion/alert/bench/#",
                n,
                latency_rate,
                sampler(broker_pid, None),
            ),
        ));
        flow_rt.block_on(gw.stop());
    }

    let relay = flow_rt.block_on(start_relay(broker.port));
    runs.push((
        "relay (no pipeline)",
        measure(
            broker.port,
            "relay",
            "relay/alert/#",
            n,
            latency_rate,
            sampler(broker_pid, None),
        ),
    ));
    relay.iter().for_each(tokio::task::JoinHandle::abort);

    if let Some(mut child) = start_node_red(broker.port) {
        runs.push((
            "Node-RED",
            measure(
                broker.port,
                "nr",
                "nodered/alert/#",
                n,
                latency_rate,
                sampler(broker_pid, Some(child.id())),
            ),
        ));
        let _ = child.kill();
        let _ = child.wait();
    }

    println!("\n| flow | messages out of | throughput (msg/s) | latency at | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, r) in &runs {
        println!(
            "| {name} | {} / {} | {:.0} | {} msg/s | {:.2} ms | {:.2} ms |",
            r.received,
            r.sent,
            r.throughput,
            r.latency_rate,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
    }
    println!("\nCPU per message in the throughput phase (µs); ceiling = 2 cores ÷ all:\n");
    println!(
        "| flow | mosquitto | flow | load generator + receiver | all | ceiling (msg/s) | flow threads put on a CPU per message |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, r) in &runs {
        let all = r.cpu.broker + r.cpu.flow + r.cpu.harness;
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} |",
            r.cpu.broker,
            r.cpu.flow,
            r.cpu.harness,
            all,
            2e6 / all,
            r.cpu.flow_runs
        );
    }
    if let (Some((_, g)), Some((_, nr))) = (
        runs.iter().find(|(n, _)| *n == "Ganglion"),
        runs.iter().find(|(n, _)| *n == "Node-RED"),
    ) {
        println!(
            "\nthroughput ratio Ganglion ÷ Node-RED: {:.2}×",
            g.throughput / nr.throughput
        );
    }
    // Issue 21's targets are ratios of flow CPU per message in one run.
    let flow_of = |name: &str| {
        runs.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.cpu.flow)
    };
    let (relay_cpu, node_red_cpu) = (flow_of("relay (no pipeline)"), flow_of("Node-RED"));
    println!("\nflow CPU per message, ratios:\n");
    println!("| flow | ÷ relay | ÷ Node-RED |");
    println!("|---|---:|---:|");
    for (name, r) in runs.iter().filter(|(n, _)| n.starts_with("Ganglion")) {
        let ratio = |base: Option<f64>| {
            base.filter(|b| *b > 0.0)
                .map_or_else(|| "–".to_owned(), |b| format!("{:.2}", r.cpu.flow / b))
        };
        println!(
            "| {name} | {} | {} |",
            ratio(relay_cpu),
            ratio(node_red_cpu)
        );
    }
    println!("\nflow runtime: {workers} worker thread(s)");
    println!(
        "host steadiness (one thread, 3 s, before the flows): {:.0} % of 50 ms bins under half the median rate; lowest bin {:.0} % of the median",
        dipped * 100.0,
        lowest * 100.0
    );
}
