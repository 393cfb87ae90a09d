//! The remote engine against a real OpenAI-compatible server:
//! llama-cpp-python's (`python -m llama_cpp.server`, built by `cargo run -p
//! xtask -- test`) on loopback with the default SmolLM2 GGUF, behind a
//! byte-forwarding proxy that tells the test when the first streamed event
//! has passed, so the server can be killed mid-stream.

use ganglion::config::{EngineChoice, Fallback, GanglionConfig, RemoteConfig, SchemaFormat};
use ganglion::llm::{BreakerState, FakeLlm, RemoteStats};
use ganglion::runtime::Runtime;
use ganglion::types::{Constraint, GenerationParams, Outgoing};
use ganglion_llm::types::GenerateRequest;
use ganglion_tests::*;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

/// llama-cpp-python's server, killed when dropped.
struct LlamaServer {
    child: Child,
    log: std::path::PathBuf,
}

impl LlamaServer {
    fn start(port: u16, dir: &std::path::Path) -> LlamaServer {
        let python = xtask::ensure_llama_server().unwrap_or_else(|e| {
            panic!("llama-cpp-python's server is needed (CI builds it with `cargo run -p xtask -- test`): {e:#}")
        });
        let model = xtask::fetch_model().unwrap_or_else(|e| {
            panic!("the default model is needed (`cargo run -p xtask -- model`): {e:#}")
        });
        let log = dir.join("llama-server.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--n_ctx", "2048", "--n_threads", "1"])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("starting python -m llama_cpp.server");
        LlamaServer { child, log }
    }

    /// Waits until `/v1/models` answers 200.
    async fn wait_ready(&mut self, port: u16) {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "llama_cpp.server exited with {status}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if get_status(port, "/v1/models").await == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!(
            "llama_cpp.server did not answer /v1/models within 180 s:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Forwards loopback connections to `upstream`; [`Proxy::streaming`] is
/// notified when a server-sent event first passes back. A connection whose
/// upstream cannot be reached is closed at once.
struct Proxy {
    port: u16,
    streaming: Arc<Notify>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let streaming = Arc::new(Notify::new());
        let notify = streaming.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let notify = notify.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if buf[..n].windows(5).any(|w| w == b"data:") {
                            notify.notify_one();
                        }
                    }
                    up.abort();
                    let _ = cw.shutdown().await;
                });
            }
        });
        Proxy { port, streaming }
    }
}

const WATCH: &str = r#"
topics = ["plant/+/telemetry"]
engine = "remote:llama"
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[template]
plugin = "prompt-template"
config = { system = "You watch machines.", user = "Temperatures: {% for r in readings %}{{ r.value }} {% endfor %}. Hot?", max_tokens = 8 }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 50.0, level = "critical" }], topic = "alerts/{device}" }
[allow]
publish = ["alerts/{device}"]
"#;

fn remote(port: u16, fallback: Fallback, failures: u32) -> RemoteConfig {
    let mut c = RemoteConfig::new(format!("http://127.0.0.1:{port}/v1"), "smollm2");
    c.retries = 1;
    c.backoff_ms = 10;
    c.breaker_failures = failures;
    c.breaker_cooldown_ms = 3_600_000;
    c.fallback = fallback;
    c.response_format = SchemaFormat::JsonObject;
    c.timeout_ms = 120_000;
    c
}

fn stats(rt: &Runtime, name: &str) -> RemoteStats {
    rt.engines()
        .remotes()
        .find(|r| r.name() == name)
        .map(|r| r.remote_stats())
        .unwrap()
}

fn chat(user: &str, params: GenerationParams) -> GenerateRequest {
    GenerateRequest::system_and_user("You are a helpful assistant.", user, params, "test")
}

async fn push(rt: &Runtime, out: &mut mpsc::Receiver<Outgoing>, topic: &str) -> Vec<Outgoing> {
    rt.push(topic, br#"{"metric":"temperature","value":70}"#.to_vec())
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Ok(o) = out.try_recv() {
        got.push(o);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_streams_and_killed_mid_stream_opens_the_breaker_and_falls_back() {
    let dir = scratch("remote-llama");
    let port = free_port();
    let mut server = LlamaServer::start(port, &dir);
    server.wait_ready(port).await;
    let proxy = Proxy::start(port).await;

    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("watch.toml"), WATCH).unwrap();
    let strict = WATCH
        .replace("remote:llama", "remote:strict")
        .replace("plant/+/telemetry", "strict/+/telemetry");
    std::fs::write(rules.join("strict.toml"), strict).unwrap();
    let mut config = GanglionConfig::default();
    config.plugins.dir = plugins_folder();
    config.plugins.cache_dir = None;
    config.rules.dir = rules;
    config.reload.enabled = false;
    config.audit.enabled = false;
    config
        .remote
        .insert("llama".into(), remote(proxy.port, Fallback::Local, 2));
    config
        .remote
        .insert("strict".into(), remote(proxy.port, Fallback::None, 1));
    let local = FakeLlm::fixed("local answer");
    let loaded = load_runtime(config, local.clone()).await;
    let (rt, mut out) = loaded.serve_channel(64);
    let llama = rt
        .engines()
        .select(Some(&EngineChoice::Remote("llama".into())))
        .unwrap();

    // Streamed from the real server.
    let params = GenerationParams {
        max_tokens: 16,
        ..GenerationParams::default()
    };
    let c = llama.generate(chat("Say hello.", params)).await.unwrap();
    assert!(!c.text.is_empty() && c.text != "local answer", "{c:?}");
    // A JSON schema, as llama-cpp-python takes it (`json_object` + `schema`).
    let schema = r#"{"type":"object","properties":{"fan":{"type":"string","enum":["on","off"]}},"required":["fan"]}"#;
    let params = GenerationParams {
        max_tokens: 32,
        constraint: Constraint::JsonSchema(schema.into()),
        ..GenerationParams::default()
    };
    let c = llama
        .generate(chat("Is the fan on or off?", params))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&c.text).expect(&c.text);
    assert!(
        ["on", "off"].contains(&v["fan"].as_str().unwrap_or("")),
        "{v}"
    );
    // A rule whose `engine` is the remote: the alert is out, the local
    // engine was not asked.
    let got = push(&rt, &mut out, "plant/m1/telemetry").await;
    assert!(got.iter().any(|o| o.topic == "alerts/m1"), "{got:?}");
    assert!(local.requests().is_empty());
    let s = stats(&rt, "llama");
    assert_eq!((s.requests, s.failures, s.fallbacks), (3, 0, 0), "{s:?}");

    // Killed mid-stream: the call is retried, cannot reach the server, and
    // the local engine answers.
    let long = GenerationParams {
        max_tokens: 1500,
        ..GenerationParams::default()
    };
    let call = {
        let llama = llama.clone();
        tokio::spawn(async move {
            llama
                .generate(chat("Write a very long story about a lighthouse.", long))
                .await
        })
    };
    proxy.streaming.notified().await;
    server.kill();
    let c = call.await.unwrap().unwrap();
    assert_eq!(c.text, "local answer");
    let s = stats(&rt, "llama");
    assert_eq!(
        (s.failures, s.fallbacks, s.retries, s.breaker),
        (1, 1, 1, BreakerState::Closed),
        "{s:?}"
    );
    // A second failure in a row opens the circuit (breaker_failures = 2).
    let c = llama
        .generate(chat("Hello?", GenerationParams::default()))
        .await
        .unwrap();
    assert_eq!(c.text, "local answer");
    let s = stats(&rt, "llama");
    assert_eq!(
        (s.failures, s.breaker_opened, s.breaker),
        (2, 1, BreakerState::Open),
        "{s:?}"
    );
    // The rule goes on with the local engine; nothing reaches the server.
    let asked = local.requests().len();
    let got = push(&rt, &mut out, "plant/m1/telemetry").await;
    assert!(got.iter().any(|o| o.topic == "alerts/m1"), "{got:?}");
    assert_eq!(local.requests().len(), asked + 1);
    let s = stats(&rt, "llama");
    assert_eq!((s.refused, s.fallbacks), (1, 3), "{s:?}");

    // Without fallback the rule dead-letters with llm-error: first the
    // failure itself, then the open circuit.
    for expected in ["remote `strict`: cannot connect", "circuit open"] {
        let got = push(&rt, &mut out, "strict/m1/telemetry").await;
        let dead: Vec<String> = got
            .iter()
            .filter(|o| o.topic == "ganglion/dead-letter/strict")
            .map(|o| String::from_utf8_lossy(&o.payload).into_owned())
            .collect();
        assert_eq!(dead.len(), 1, "{got:?}");
        assert!(
            dead[0].contains("llm-error") && dead[0].contains(expected),
            "{} lacks {expected}",
            dead[0]
        );
    }
    let s = stats(&rt, "strict");
    assert_eq!((s.fallbacks, s.breaker), (0, BreakerState::Open), "{s:?}");
    rt.shutdown().await;
}
