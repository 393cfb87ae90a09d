//! `ganglion serve-model` as a process, with the default SmolLM2 model and
//! all-MiniLM-L6-v2, spoken to by the official `openai` Python client; and
//! `ganglion run` serving the model beside its rules.

use ganglion_tests::gateways::*;
use ganglion_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn models() -> (std::path::PathBuf, std::path::PathBuf) {
    let model = xtask::fetch_model().unwrap_or_else(|e| {
        panic!("the default model is needed (`cargo run -p xtask -- model`): {e:#}")
    });
    let embedding = xtask::fetch_embedding_model().unwrap_or_else(|e| {
        panic!("all-MiniLM-L6-v2 is needed (`cargo run -p xtask -- model`): {e:#}")
    });
    (model, embedding)
}

/// Waits until `GET /health` on `port` answers 200.
fn wait_healthy(port: u16, stderr: &StderrLines) {
    for _ in 0..600 {
        if xtask::answers_200(port, "/health") {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the endpoint did not come up: {}", stderr.text());
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn the_openai_client_speaks_to_serve_model() {
    let python = xtask::ensure_openai_client()
        .unwrap_or_else(|e| panic!("the openai client is needed (CI installs it): {e:#}"));
    let (model, embedding) = models();
    let dir = scratch("serve-model");
    let port = free_port();
    std::fs::write(
        dir.join("ganglion.toml"),
        format!(
            "[model]\npath = {:?}\nembedding = {:?}\nthreads = 2\n\n[serve]\nlisten = \"127.0.0.1:{port}\"\n",
            model.display().to_string(),
            embedding.display().to_string()
        ),
    )
    .unwrap();
    let mut child = xtask::KillOnDrop(
        Command::new(ganglion_binary())
            .arg("--config")
            .arg(dir.join("ganglion.toml"))
            .arg("serve-model")
            .env("GANGLION_SERVE_TOKEN", "test-key")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = StderrLines::collect(&mut child.0);
    wait_healthy(port, &stderr);
    let out = Command::new(&python)
        .arg(xtask::root().join("tests/fixtures/serve/openai_client.py"))
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("test-key")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai_client.py failed:\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        stderr.text()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(
        v["models"],
        serde_json::json!(["SmolLM2-135M-Instruct.Q4_1"])
    );
    let chat = &v["chat"];
    assert!(!chat["text"].as_str().unwrap().trim().is_empty(), "{chat}");
    assert!(chat["prompt_tokens"].as_u64().unwrap() > 20, "{chat}");
    // Streamed and whole, greedy: the same text, in pieces of about a token.
    let streamed = &v["chat_stream"];
    assert_eq!(streamed["text"], chat["text"], "{v}");
    assert_eq!(streamed["finish"], chat["finish"]);
    assert_eq!(streamed["completion_tokens"], chat["completion_tokens"]);
    assert!(
        streamed["pieces"].as_u64().unwrap() * 2 >= chat["completion_tokens"].as_u64().unwrap(),
        "streamed in too few pieces: {streamed}"
    );
    assert_eq!(v["completion"]["text"], v["completion"]["stream"]);
    assert!(!v["completion"]["text"].as_str().unwrap().is_empty());
    // The schema held, however small the model.
    let reading = &v["json"];
    assert!(
        ["kitchen", "garage", "bedroom"].contains(&reading["room"].as_str().unwrap()),
        "{reading}"
    );
    assert!(reading["warm"].is_boolean(), "{reading}");
    assert_eq!(reading.as_object().unwrap().len(), 2);
    // Embeddings (base64 on the wire, as the client asks by default).
    let e: Vec<Vec<f64>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    assert_eq!(e.len(), 3);
    assert!(e.iter().all(|x| x.len() == 384));
    assert!((cosine(&e[0], &e[0]) - 1.0).abs() < 1e-3);
    assert!(cosine(&e[0], &e[1]) > cosine(&e[0], &e[2]) + 0.2, "{e:?}");
    // Eight at once in one batch answer as each does alone.
    assert_eq!(v["concurrent"]["together"], v["concurrent"]["alone"]);
    assert!(v["errors"]["n"].to_string().contains("n = 1"), "{v}");
    assert_eq!(v["errors"]["auth"], 401);

    // SIGTERM stops it, cleanly.
    let pid = child.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = wait_exit(&mut child.0, Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", stderr.text());
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_model_refuses_what_it_cannot_serve() {
    let dir = scratch("serve-model-refusals");
    let run = |toml: &str| {
        std::fs::write(dir.join("ganglion.toml"), toml).unwrap();
        let out = Command::new(ganglion_binary())
            .arg("--config")
            .arg(dir.join("ganglion.toml"))
            .arg("serve-model")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{toml}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run("").contains("no model to serve"));
    let broken = dir.join("broken.gguf");
    std::fs::write(&broken, b"GGUF but not really").unwrap();
    let err = run(&format!(
        "[model]\npath = {:?}\n",
        broken.display().to_string()
    ));
    assert!(err.contains("did not load"), "{err}");
    let (model, _) = models();
    let err = run(&format!(
        "[model]\npath = {:?}\n[serve]\nlisten = \"0.0.0.0:0\"\n",
        model.display().to_string()
    ));
    assert!(err.contains("set [serve] token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ganglion_run_serves_the_model_beside_its_rules() {
    let (model, _) = models();
    let mosquitto = Mosquitto::start("serve-beside-rules");
    let port = free_port();
    let dir = gateway_dir_tables(
        "serve-beside-rules",
        &mosquitto.url(),
        &[
            ("clean-readings", example("clean-readings")),
            ("threshold-alert", example("threshold-alert")),
        ],
        &[(
            "hot",
            r#"
topics = ["sensors/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 30.0 }], topic = "alerts/{device}" }
[allow]
publish = ["alerts/{device}"]
"#,
        )],
        "",
        &format!(
            "[model]\npath = {:?}\nthreads = 1\n\n[serve]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n",
            model.display().to_string()
        ),
    );
    let (child, stderr) = start_gateway(&dir);
    let _child = xtask::KillOnDrop(child);
    assert!(
        stderr.wait_for("model served", Duration::from_secs(120)),
        "{}",
        stderr.text()
    );
    let client =
        TestClient::connect(&mosquitto.url(), "serve-beside-rules-client", &["alerts/#"]).await;
    client
        .publish(
            "sensors/kitchen/telemetry",
            r#"{"device":"kitchen","metric":"temperature","value":35.0,"unit":"C"}"#,
        )
        .await;
    // A completion through the endpoint while the rule runs.
    let body =
        serde_json::json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}).to_string();
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"text_completion\""), "{answer}");
    assert!(
        client
            .wait_until(30, |c| !c.on("alerts/#").is_empty())
            .await,
        "the rule did not act: {}",
        stderr.text()
    );
}
