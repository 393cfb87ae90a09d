//! Throughput of 1, 2 and 3 `ganglion run` processes in one MQTT 5 share
//! group on one mosquitto, in one run, with the CPU each party spends per
//! message:
//!
//! JSON telemetry → clean-readings → threshold-alert → alert published (QoS 1
//! in and out), the rule of the `mqtt_throughput` bench.
//!
//! `cargo bench -p ganglion-tests --bench scale_out` (the binary must be
//! built: `cargo build --release -p ganglion-cli`, or with
//! `GANGLION_BIN=target/debug/ganglion`). `SCALE_MESSAGES` sets the messages
//! per row (default 20 000).
//!
//! On a machine with fewer cores than gateways plus broker plus load
//! generator, more gateways cannot add throughput: the figure that carries
//! over to a bigger machine is the CPU per message of the gateways together,
//! which should stay flat as instances are added (sharing costs nothing per
//! message).

use ganglion_tests::gateways::*;
use ganglion_tests::*;
use std::time::Duration;

struct Row {
    instances: usize,
    throughput: f64,
    received: usize,
    /// µs per message: all gateways together, mosquitto.
    gateways: f64,
    broker: f64,
}

fn row(instances: usize, n: usize) -> Row {
    let broker = Mosquitto::start(&format!("scale-bench-{instances}"));
    let url = broker.url();
    let dirs: Vec<_> = (1..=instances)
        .map(|i| {
            gateway_dir_as(
                &format!("scale-bench-{instances}-{i}"),
                "bench",
                &url,
                &[
                    ("clean-readings", example("clean-readings")),
                    ("threshold-alert", example("threshold-alert")),
                ],
                &[("bench", wire::BENCH_RULE)],
                &format!("protocol = \"5\"\nshare_group = \"bench\"\ninstance = {i}"),
                "",
            )
        })
        .collect();
    let gateways: Vec<_> = dirs.iter().map(|d| start_gateway(d)).collect();
    // Subscribed: each gateway publishes `online` after its SUBSCRIBE.
    for (_, log) in &gateways {
        assert!(
            log.wait_for("connected to the MQTT broker", Duration::from_secs(30)),
            "{}",
            log.text()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let pids: Vec<String> = gateways.iter().map(|(c, _)| c.id().to_string()).collect();
    let broker_pid = broker.pid().expect("mosquitto runs").to_string();
    let cpu = || -> (f64, f64) {
        (
            pids.iter().map(|p| wire::cpu_ns(p, |_, _| true)).sum(),
            wire::cpu_ns(&broker_pid, |_, _| true),
        )
    };
    let before = cpu();
    let (sent, got) = wire::drive(broker.port, "bench", "ganglion/alert/bench/#", n, 0);
    let after = cpu();
    let first = sent.iter().flatten().min().copied().expect("sent");
    let last = got.iter().flatten().max().copied().unwrap_or(first);
    let received = got.iter().flatten().count();
    let per_message = |a: f64, b: f64| (a - b) / 1e3 / received.max(1) as f64;
    for (mut g, _) in gateways {
        let _ = g.kill();
        let _ = g.wait();
    }
    Row {
        instances,
        throughput: received as f64 / (last - first).as_secs_f64(),
        received,
        gateways: per_message(after.0, before.0),
        broker: per_message(after.1, before.1),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("SCALE_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!(
        "share group on one mosquitto, {n} QoS 1 messages per row, {cores} cores, binary {}",
        ganglion_binary().display()
    );
    let rows: Vec<Row> = (1..=3).map(|k| row(k, n)).collect();
    println!(
        "| gateways | received | msg/s | ÷ one gateway | gateways' CPU µs/msg | mosquitto CPU µs/msg |"
    );
    println!("|---|---|---|---|---|---|");
    let base = rows[0].throughput;
    for r in &rows {
        println!(
            "| {} | {}/{n} | {:.0} | {:.2} | {:.1} | {:.1} |",
            r.instances,
            r.received,
            r.throughput,
            r.throughput / base,
            r.gateways,
            r.broker
        );
    }
}
