//! The remote engine against a scripted HTTP server in the test process.

use super::remote::RemoteEngine;
use super::{BreakerState, FakeLlm, LlmEngine};
use crate::config::{Fallback, RemoteConfig, SchemaFormat};
use crate::types::{Constraint, FinishReason, GenerationParams, LlmError};
use ganglion_llm::types::{GenerateRequest, LlmInput};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scripted answer; every answer closes the connection.
#[derive(Clone)]
enum Reply {
    /// A status and a JSON body with its length.
    Json(u16, String),
    /// An event stream: these events' data, then `[DONE]` when `done`.
    Events(Vec<String>, bool),
    /// A 200 whose body is these bytes, read until the connection closes.
    Raw(String),
}

struct Server {
    url: String,
    requests: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Server {
    /// Answers in `script`'s order, then `rest` to every further request.
    async fn start(script: Vec<Reply>, rest: Reply) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let (seen, script, rest) = (seen.clone(), script.clone(), rest.clone());
                tokio::spawn(async move {
                    let Some((path, body)) = read_request(&mut socket).await else {
                        return;
                    };
                    seen.lock().unwrap().push((path, body));
                    let reply = script.lock().unwrap().pop_front().unwrap_or(rest);
                    let bytes = match reply {
                        Reply::Json(code, body) => format!(
                            "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        Reply::Events(events, done) => {
                            let mut s = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n: a comment\r\n\r\n".to_string();
                            for e in events {
                                s.push_str(&format!("data: {e}\r\n\r\n"));
                            }
                            if done {
                                s.push_str("data: [DONE]\n\n");
                            }
                            s
                        }
                        Reply::Raw(body) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
                        ),
                    };
                    let _ = socket.write_all(bytes.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Server { url, requests }
    }

    fn requests(&self) -> Vec<(String, Value)> {
        self.requests.lock().unwrap().clone()
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<(String, Value)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let path = head.split_whitespace().nth(1)?.to_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((path, serde_json::from_slice(&buf[head_end..]).ok()?))
}

fn config(server: &Server) -> RemoteConfig {
    let mut c = RemoteConfig::new(server.url.clone(), "big-model");
    c.retries = 0;
    c.backoff_ms = 1;
    c.stream = false;
    c
}

fn engine(config: RemoteConfig) -> RemoteEngine {
    RemoteEngine::new("big", config, FakeLlm::fixed("local answer")).unwrap()
}

fn chat(params: GenerationParams) -> GenerateRequest {
    GenerateRequest::system_and_user("be brief", "hot?", params, "r")
}

fn answer(text: &str) -> Reply {
    Reply::Json(
        200,
        serde_json::json!({
            "model": "served-model",
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3},
        })
        .to_string(),
    )
}

fn delta(text: &str, finish: Option<&str>) -> String {
    serde_json::json!({"choices": [{"delta": {"content": text}, "finish_reason": finish}]})
        .to_string()
}

#[tokio::test]
async fn a_chat_without_streaming_returns_the_servers_text_and_usage() {
    let server = Server::start(vec![], answer("yes, 91 C")).await;
    let engine = engine(config(&server));
    let c = engine
        .generate(chat(GenerationParams::default()))
        .await
        .unwrap();
    assert_eq!(c.text, "yes, 91 C");
    assert_eq!((c.usage.prompt_tokens, c.usage.completion_tokens), (12, 3));
    assert_eq!(c.model, "served-model");
    assert_eq!(c.finish_reason, FinishReason::Stop);
    let requests = server.requests();
    let (path, body) = &requests[0];
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(body["model"], "big-model");
    assert_eq!(body["stream"], false);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["content"], "hot?");
    assert_eq!(body["max_tokens"], 128);
    assert!(body.get("top_k").is_none() && body.get("response_format").is_none());
}

#[tokio::test]
async fn a_streamed_chat_joins_the_deltas_and_raw_text_goes_to_completions() {
    let events = vec![
        delta("fan", None),
        delta(" on", None),
        delta("", Some("length")),
    ];
    let server = Server::start(
        vec![Reply::Events(events, true)],
        Reply::Events(
            vec![
                serde_json::json!({"choices": [{"text": "raw!", "finish_reason": "stop"}]})
                    .to_string(),
            ],
            true,
        ),
    )
    .await;
    let mut c = config(&server);
    c.stream = true;
    let engine = engine(c);
    let done = engine
        .generate(chat(GenerationParams::default()))
        .await
        .unwrap();
    assert_eq!(done.text, "fan on");
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert_eq!(done.usage.completion_tokens, 2, "one per content event");
    let raw = GenerateRequest {
        input: LlmInput::Raw("say raw".into()),
        params: GenerationParams::default(),
        rule: "r".into(),
    };
    assert_eq!(engine.generate(raw).await.unwrap().text, "raw!");
    let requests = server.requests();
    assert_eq!(requests[0].1["stream"], true);
    assert_eq!(requests[1].0, "/v1/completions");
    assert_eq!(requests[1].1["prompt"], "say raw");
}

#[tokio::test]
async fn a_json_schema_goes_in_response_format_and_a_regex_is_refused() {
    let server = Server::start(vec![], answer("{}")).await;
    let schema = r#"{"type":"object"}"#;
    let params = GenerationParams {
        constraint: Constraint::JsonSchema(schema.into()),
        top_k: 5,
        ..GenerationParams::default()
    };
    let mut c = config(&server);
    engine(c.clone())
        .generate(chat(params.clone()))
        .await
        .unwrap();
    c.response_format = SchemaFormat::JsonObject;
    engine(c).generate(chat(params)).await.unwrap();
    let requests = server.requests();
    assert_eq!(requests[0].1["response_format"]["type"], "json_schema");
    assert_eq!(
        requests[0].1["response_format"]["json_schema"]["schema"]["type"],
        "object"
    );
    assert_eq!(requests[0].1["top_k"], 5);
    assert_eq!(requests[1].1["response_format"]["type"], "json_object");
    assert_eq!(requests[1].1["response_format"]["schema"]["type"], "object");
    let regex = GenerationParams {
        constraint: Constraint::Regex("a+".into()),
        ..GenerationParams::default()
    };
    let err = engine(config(&server))
        .generate(chat(regex))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LlmError::InvalidInput(ref m) if m.contains("regex")),
        "{err}"
    );
    assert_eq!(server.requests().len(), 2, "nothing sent for a regex");
}

#[tokio::test]
async fn choices_are_sent_as_an_enum_and_read_back_as_the_choice() {
    let server = Server::start(vec![answer("\"off\""), answer("maybe")], answer("on")).await;
    let params = GenerationParams {
        constraint: Constraint::Choice(vec!["on".into(), "off".into()]),
        ..GenerationParams::default()
    };
    let engine = engine(config(&server));
    let first = engine.generate(chat(params.clone())).await.unwrap();
    assert_eq!(first.text, "off");
    let err = engine.generate(chat(params.clone())).await.unwrap_err();
    assert!(matches!(err, LlmError::ConstraintUnsatisfiable(_)), "{err}");
    assert_eq!(engine.generate(chat(params)).await.unwrap().text, "on");
    let schema = &server.requests()[0].1["response_format"]["json_schema"]["schema"];
    assert_eq!(schema["enum"], serde_json::json!(["on", "off"]));
}

#[tokio::test]
async fn embeddings_come_back_in_index_order_and_normalised() {
    let body = serde_json::json!({"data": [
        {"index": 1, "embedding": [0.0, 2.0]},
        {"index": 0, "embedding": [3.0, 4.0]},
    ]});
    let server = Server::start(vec![], Reply::Json(200, body.to_string())).await;
    let v = engine(config(&server))
        .embed(vec!["a".into(), "b".into()])
        .await
        .unwrap();
    assert_eq!(v, vec![vec![0.6, 0.8], vec![0.0, 1.0]]);
    let requests = server.requests();
    assert_eq!(requests[0].0, "/v1/embeddings");
    assert_eq!(requests[0].1["input"], serde_json::json!(["a", "b"]));
}

#[tokio::test]
async fn a_500_is_retried_and_the_retry_answers() {
    let server = Server::start(
        vec![Reply::Json(500, r#"{"error":"busy"}"#.into())],
        answer("second time"),
    )
    .await;
    let mut c = config(&server);
    c.retries = 2;
    let engine = engine(c);
    let done = engine
        .generate(chat(GenerationParams::default()))
        .await
        .unwrap();
    assert_eq!(done.text, "second time");
    assert_eq!(server.requests().len(), 2);
    let s = engine.remote_stats();
    assert_eq!((s.retries, s.failures, s.fallbacks), (1, 0, 0));
    assert_eq!(s.breaker, BreakerState::Closed);
}

#[tokio::test]
async fn the_circuit_opens_after_the_failures_and_the_local_engine_answers() {
    let server = Server::start(vec![], Reply::Json(503, "down".into())).await;
    let mut c = config(&server);
    c.breaker_failures = 2;
    c.breaker_cooldown_ms = 3_600_000;
    let engine = engine(c);
    for _ in 0..3 {
        let done = engine
            .generate(chat(GenerationParams::default()))
            .await
            .unwrap();
        assert_eq!(done.text, "local answer");
    }
    assert_eq!(server.requests().len(), 2, "the third call is not sent");
    let s = engine.remote_stats();
    assert_eq!(
        (
            s.requests,
            s.failures,
            s.refused,
            s.fallbacks,
            s.breaker_opened
        ),
        (3, 2, 1, 3, 1)
    );
    assert_eq!(s.breaker, BreakerState::Open);
}

#[tokio::test]
async fn without_fallback_a_failure_and_an_open_circuit_are_llm_errors() {
    let server = Server::start(vec![], Reply::Json(500, "boom".into())).await;
    let mut c = config(&server);
    c.breaker_failures = 1;
    c.breaker_cooldown_ms = 3_600_000;
    c.fallback = Fallback::None;
    let engine = engine(c);
    let first = engine
        .generate(chat(GenerationParams::default()))
        .await
        .unwrap_err();
    assert!(
        matches!(first, LlmError::Internal(ref m) if m.contains("HTTP 500: boom")),
        "{first}"
    );
    let second = engine
        .generate(chat(GenerationParams::default()))
        .await
        .unwrap_err();
    assert!(
        matches!(second, LlmError::Internal(ref m) if m.contains("circuit open")),
        "{second}"
    );
    assert_eq!(engine.remote_stats().fallbacks, 0);
}

#[tokio::test]
async fn after_the_cooldown_one_probe_closes_the_circuit_or_opens_it_again() {
    let server = Server::start(
        vec![Reply::Json(500, "a".into()), Reply::Json(500, "b".into())],
        answer("back"),
    )
    .await;
    let mut c = config(&server);
    c.breaker_failures = 1;
    c.breaker_cooldown_ms = 50;
    let engine = engine(c);
    let wait_out_cooldown = || tokio::time::sleep(std::time::Duration::from_millis(120));
    let call = || engine.generate(chat(GenerationParams::default()));
    assert_eq!(call().await.unwrap().text, "local answer");
    assert_eq!(engine.remote_stats().breaker, BreakerState::Open);
    wait_out_cooldown().await;
    assert_eq!(engine.remote_stats().breaker, BreakerState::HalfOpen);
    // The probe fails: open again.
    assert_eq!(call().await.unwrap().text, "local answer");
    assert_eq!(engine.remote_stats().breaker_opened, 2);
    wait_out_cooldown().await;
    assert_eq!(call().await.unwrap().text, "back");
    assert_eq!(engine.remote_stats().breaker, BreakerState::Closed);
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn a_response_past_max_response_bytes_is_refused_without_a_retry() {
    let big = "x".repeat(10_000);
    let server = Server::start(
        vec![answer(&big)],
        Reply::Events(vec![delta(&big, None), delta(&big, None)], true),
    )
    .await;
    let mut c = config(&server);
    c.retries = 3;
    c.fallback = Fallback::None;
    c.max_response_bytes = 8_000;
    c.max_line_bytes = 16_000;
    let err = engine(c.clone())
        .generate(chat(GenerationParams::default()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("max_response_bytes (8000)"),
        "{err}"
    );
    c.stream = true;
    c.max_response_bytes = 15_000;
    let err = engine(c)
        .generate(chat(GenerationParams::default()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("max_response_bytes (15000)"),
        "{err}"
    );
    assert_eq!(server.requests().len(), 2, "refused, not retried");
}

#[tokio::test]
async fn malformed_event_streams_are_refused_with_what_is_wrong() {
    let cases = [
        (
            Reply::Events(vec!["{not json".into()], true),
            "event is not JSON",
        ),
        (
            Reply::Raw(format!("data: {}", "y".repeat(5_000))),
            "max_line_bytes (4096)",
        ),
        (
            Reply::Raw(format!("data: {}\n\ndata: [DONE]\n\n", "y".repeat(5_000))),
            "max_line_bytes (4096)",
        ),
        (
            Reply::Events(vec![delta("half", None)], false),
            "ended before [DONE]",
        ),
        (
            Reply::Events(
                vec![r#"{"error":{"message":"model crashed"}}"#.into()],
                true,
            ),
            "model crashed",
        ),
    ];
    for (reply, expected) in cases {
        let server = Server::start(vec![], reply).await;
        let mut c = config(&server);
        c.stream = true;
        c.fallback = Fallback::None;
        c.max_line_bytes = 4096;
        let err = engine(c)
            .generate(chat(GenerationParams::default()))
            .await
            .unwrap_err();
        assert!(matches!(err, LlmError::Internal(_)), "{err}");
        assert!(err.to_string().contains(expected), "{err} lacks {expected}");
    }
}

#[tokio::test]
async fn a_400_is_invalid_input_and_leaves_the_circuit_closed() {
    let server = Server::start(
        vec![],
        Reply::Json(400, r#"{"error":"prompt too long"}"#.into()),
    )
    .await;
    let mut c = config(&server);
    c.breaker_failures = 1;
    let engine = engine(c);
    let err = engine
        .generate(chat(GenerationParams::default()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LlmError::InvalidInput(ref m) if m.contains("prompt too long")),
        "{err}"
    );
    let s = engine.remote_stats();
    assert_eq!((s.breaker, s.fallbacks), (BreakerState::Closed, 0));
}

#[test]
fn engines_pick_the_default_and_per_rule_engines_and_refuse_unknown_ones() {
    use super::Engines;
    use crate::config::EngineChoice;
    let mut remotes = std::collections::BTreeMap::new();
    remotes.insert(
        "big".to_string(),
        RemoteConfig::new("http://127.0.0.1:9/v1", "big-model"),
    );
    let local = FakeLlm::fixed("local answer");
    let engines = Engines::build(local.clone(), &remotes, Some("remote:big")).unwrap();
    assert_eq!(engines.default_engine().model_id(), "big-model");
    let pick = |c: EngineChoice| engines.select(Some(&c)).map(|e| e.model_id());
    assert_eq!(pick(EngineChoice::Local).unwrap(), "fake");
    assert_eq!(
        pick(EngineChoice::Remote("big".into())).unwrap(),
        "big-model"
    );
    let err = pick(EngineChoice::Remote("nope".into())).unwrap_err();
    assert!(err.contains("no [remote.nope] in ganglion.toml"), "{err}");
    assert_eq!(engines.remotes().count(), 1);
    let err = Engines::build(local.clone(), &remotes, Some("remote:nope"))
        .err()
        .unwrap();
    assert!(err.starts_with("[model] engine `remote:nope`"), "{err}");
    remotes.insert("tls".to_string(), RemoteConfig::new("https://a/v1", "m"));
    let err = Engines::build(local, &remotes, None).err().unwrap();
    assert!(err.starts_with("[remote.tls] url"), "{err}");
}
