//! Hot-reload latency: from a plugin file renamed into the plugins folder to
//! the first message processed by the new version, while messages flow (one
//! every millisecond, on one device).
//!
//! `cargo bench -p ganglion-tests --bench reload_latency`
//!
//! Cases:
//! - Rust plugin (the `tag-a`/`tag-b` fixtures, 125 KiB), compiled artefact
//!   in the cache (a version the gateway ran before);
//! - the same with a cache miss (each new file gets a unique custom section,
//!   so it is compiled);
//! - the Python plugin `py-tagger` (componentize-py), hit and miss, when
//!   `target/fixtures/py-tagger.wasm` exists (`plugins/fixtures/py-tagger/build.sh`).
//!
//! Settings: `[reload]` defaults (debounce 30 ms), the default limits.

use ganglion::config::{PluginConfig, ReloadConfig};
use ganglion::gateway::{Gateway, GatewayConfig};
use ganglion::llm::NoModel;
use ganglion::plugin::PluginHost;
use ganglion::reload::Reloader;
use ganglion::state::StateStore;
use ganglion::transport::{AckToken, Confirm, Delivery, Publisher, QueueFuture, TransportFuture};
use ganglion::types::Message;
use ganglion::types::Outgoing;
use ganglion_tests::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const RULE: &str = r#"
topics = ["reload/in/+"]
format = "raw"
[handler]
plugin = "tagger"
[allow]
publish = ["tagged/{device}"]
"#;

/// Reports the tag of each output and when it was published.
struct Tags(mpsc::UnboundedSender<(String, Instant)>);

impl Publisher for Tags {
    fn publish(&self, out: Outgoing) -> QueueFuture<'_> {
        let at = Instant::now();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.payload)
            && let Some(tag) = v["tag"].as_str()
        {
            let _ = self.0.send((tag.to_owned(), at));
        }
        Box::pin(async {
            let confirm: Confirm = Box::pin(async { Ok(()) });
            Ok(confirm)
        })
    }

    fn ack(&self, _token: AckToken) -> TransportFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// A component with a custom section appended: the same code under a new
/// content hash, so the artefact cache misses.
fn unique(bytes: &[u8], n: u64) -> Vec<u8> {
    fn leb(mut v: usize, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let name = b"ganglion-bench";
    let payload = n.to_le_bytes();
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(&payload);
    let mut out = bytes.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

struct Case {
    name: &'static str,
    /// The version swapped in and measured, and the one swapped back in
    /// between (not measured).
    measured: (Vec<u8>, &'static str),
    other: (Vec<u8>, &'static str),
    miss: bool,
    rounds: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run(case: &Case) -> Vec<Duration> {
    let root = scratch("reload-bench");
    let (plugins, rules) = (root.join("plugins"), root.join("rules"));
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(plugins.join("tagger.wasm"), &case.other.0).unwrap();
    std::fs::write(rules.join("tagged.toml"), RULE).unwrap();
    let config = PluginConfig {
        cache_dir: Some(root.join("cache")),
        total_instances: 64,
        ..Default::default()
    };
    let host = PluginHost::new(config, StateStore::in_memory(), Arc::new(NoModel)).unwrap();
    if !case.miss {
        // Warm the cache with the measured version, as after an earlier run.
        host.load_bytes("tagger", case.measured.0.clone(), Path::new("warm.wasm"))
            .await
            .expect("measured version loads");
    }
    let reloader = Arc::new(Reloader::new(host, &plugins, &rules, Arc::new(NoModel)));
    let (pipelines, problems) = reloader.load_all().await;
    assert!(problems.is_empty(), "{problems:?}");
    let (tx, mut outputs) = mpsc::unbounded_channel();
    let gateway = Arc::new(Gateway::start(
        pipelines,
        Arc::new(Tags(tx)),
        GatewayConfig::default(),
    ));
    let watch = reloader.watch(gateway.clone(), &ReloadConfig::default());
    let sender = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tick.tick().await;
                gateway
                    .dispatch(Delivery {
                        message: Message {
                            topic: "reload/in/d0".into(),
                            payload: b"x".to_vec(),
                            timestamp: 0,
                        },
                        token: AckToken::None,
                    })
                    .await;
            }
        })
    };
    let target = plugins.join("tagger.wasm");
    let staged: PathBuf = plugins.join(".tagger.wasm.new");
    let swap = |bytes: &[u8]| {
        std::fs::write(&staged, bytes).unwrap();
        let t0 = Instant::now();
        std::fs::rename(&staged, &target).unwrap();
        t0
    };
    async fn first(
        outputs: &mut mpsc::UnboundedReceiver<(String, Instant)>,
        tag: &str,
        after: Instant,
    ) -> Instant {
        let deadline = Duration::from_secs(120);
        loop {
            let (t, at) = tokio::time::timeout(deadline, outputs.recv())
                .await
                .expect("the new version serves within 120 s")
                .expect("outputs flow");
            if t == tag && at >= after {
                return at;
            }
        }
    }
    let mut times = Vec::new();
    for round in 0..case.rounds {
        let n = round as u64 + 1;
        let measured = if case.miss {
            unique(&case.measured.0, n)
        } else {
            case.measured.0.clone()
        };
        let t0 = swap(&measured);
        let at = first(&mut outputs, case.measured.1, t0).await;
        times.push(at - t0);
        // Back to the other version, unmeasured.
        let other = if case.miss {
            unique(&case.other.0, n)
        } else {
            case.other.0.clone()
        };
        let t1 = swap(&other);
        first(&mut outputs, case.other.1, t1).await;
    }
    sender.abort();
    watch.stop().await;
    gateway.shutdown().await;
    times
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = std::fs::read(fixture("tag-a")).unwrap();
    let b = std::fs::read(fixture("tag-b")).unwrap();
    let mut cases = vec![
        Case {
            name: "Rust (125 KiB), cache hit",
            measured: (b.clone(), "b"),
            other: (a.clone(), "a"),
            miss: false,
            rounds: 30,
        },
        Case {
            name: "Rust (125 KiB), cache miss",
            measured: (b.clone(), "b"),
            other: (a.clone(), "a"),
            miss: true,
            rounds: 15,
        },
    ];
    let py = built().1.join("py-tagger.wasm");
    match std::fs::read(&py) {
        Ok(p) => {
            let name_hit = "Python (componentize-py), cache hit";
            let name_miss = "Python (componentize-py), cache miss";
            cases.push(Case {
                name: name_hit,
                measured: (p.clone(), "py"),
                other: (a.clone(), "a"),
                miss: false,
                rounds: 10,
            });
            cases.push(Case {
                name: name_miss,
                measured: (p, "py"),
                other: (a.clone(), "a"),
                miss: true,
                rounds: 3,
            });
        }
        Err(_) => println!(
            "({} not built: run plugins/fixtures/py-tagger/build.sh for the Python rows)",
            py.display()
        ),
    }
    println!("| plugin | rounds | median | p95 | max |");
    println!("|---|---|---|---|---|");
    for case in &cases {
        let mut t = run(case).await;
        t.sort();
        println!(
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            case.name,
            t.len(),
            percentile(&t, 0.5).as_secs_f64() * 1000.0,
            percentile(&t, 0.95).as_secs_f64() * 1000.0,
            t.last().unwrap().as_secs_f64() * 1000.0
        );
    }
}
