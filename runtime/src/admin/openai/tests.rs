use super::*;
use crate::llm::{Deltas, FakeLlm, LlmFuture};
use std::sync::atomic::AtomicBool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(config: ServeConfig, llm: Arc<dyn LlmEngine>) -> ModelServer {
    let config = ServeConfig {
        listen: "127.0.0.1:0".into(),
        ..config
    };
    serve_model(&config, llm).await.unwrap()
}

/// One request on its own connection; the status, and the body once the
/// server closes it.
async fn http(
    server: &ModelServer,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
    (status, body)
}

/// The JSON of a body that is not chunked.
fn parsed(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The `data:` payloads of a chunked event stream, in order.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test]
async fn chat_and_text_completions_answer_in_openais_shape() {
    let llm = FakeLlm::fixed("the kitchen is warm");
    let server = start(ServeConfig::default(), llm.clone()).await;
    let body = json!({"model": "whatever", "messages": user("how warm?"), "temperature": 0, "max_tokens": 20});
    let (status, answer) = http(
        &server,
        "POST",
        "/v1/chat/completions",
        "",
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let v = parsed(&answer);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "fake");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "the kitchen is warm");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let seen = &llm.requests()[0];
    assert_eq!(seen.rule, SCHEDULED_AS);
    assert_eq!(seen.params.max_tokens, 20);
    let (status, answer) = http(
        &server,
        "POST",
        "/v1/completions",
        "",
        &json!({"prompt": "Once", "max_tokens": 5}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let v = parsed(&answer);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "the kitchen is warm");
    let (status, models) = http(&server, "GET", "/v1/models", "", "").await;
    assert_eq!(status, 200);
    assert_eq!(parsed(&models)["data"][0]["id"], "fake");
}

#[tokio::test]
async fn a_streamed_chat_sends_the_text_in_pieces_then_the_end_and_usage() {
    let llm = FakeLlm::fixed("the kitchen is warm");
    let server = start(ServeConfig::default(), llm).await;
    let body = json!({"messages": user("how warm?"), "stream": true, "stream_options": {"include_usage": true}});
    let (status, answer) = http(
        &server,
        "POST",
        "/v1/chat/completions",
        "",
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let events = events(&answer);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| parsed(e))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "the kitchen is warm");
    let pieces = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(pieces, 4, "one piece per word: {events:?}");
    let end = &chunks[chunks.len() - 2];
    assert_eq!(end["choices"][0]["finish_reason"], "stop");
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
}

#[tokio::test]
async fn engine_failures_get_their_status_codes_even_when_streaming() {
    for (error, status) in [
        (LlmError::Overloaded, 429),
        (LlmError::ModelNotLoaded, 503),
        (LlmError::InvalidInput("too long".into()), 400),
        (LlmError::DeadlineExceeded, 504),
    ] {
        let e = error.clone();
        let server = start(
            ServeConfig::default(),
            FakeLlm::new(move |_| Err(e.clone())),
        )
        .await;
        for stream in [false, true] {
            let body = json!({"messages": user("x"), "stream": stream});
            let (got, answer) = http(
                &server,
                "POST",
                "/v1/chat/completions",
                "",
                &body.to_string(),
            )
            .await;
            assert_eq!(got, status, "{error:?} stream={stream}: {answer}");
            assert_eq!(parsed(&answer)["error"]["message"], error.to_string());
        }
    }
}

#[tokio::test]
async fn refused_fields_and_bad_bodies_are_openai_errors() {
    let server = start(ServeConfig::default(), FakeLlm::fixed("x")).await;
    let (status, answer) = http(
        &server,
        "POST",
        "/v1/chat/completions",
        "",
        &json!({"messages": user("x"), "n": 3}).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(parsed(&answer)["error"]["param"], "n");
    let (status, answer) = http(&server, "POST", "/v1/chat/completions", "", "{not json").await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(parsed(&answer)["error"]["type"], "invalid_request_error");
    let (status, answer) = http(&server, "GET", "/v1/engines", "", "").await;
    assert_eq!(status, 404);
    assert!(parsed(&answer)["error"]["message"].is_string());
}

#[tokio::test]
async fn a_megabyte_prompt_is_refused_before_it_is_read() {
    let config = ServeConfig {
        max_body_bytes: 4096,
        ..ServeConfig::default()
    };
    let llm = FakeLlm::fixed("x");
    let server = start(config, llm.clone()).await;
    let body = json!({"messages": user(&"A".repeat(1 << 20))}).to_string();
    let (status, answer) = http(&server, "POST", "/v1/chat/completions", "", &body).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(parsed(&answer)["error"]["type"], "request_too_large");
    assert!(llm.requests().is_empty());
}

#[tokio::test]
async fn a_request_without_the_token_is_refused_and_health_needs_none() {
    let config = ServeConfig {
        token: Some("s3cret".into()),
        ..ServeConfig::default()
    };
    let llm = FakeLlm::fixed("x");
    let server = start(config, llm.clone()).await;
    let body = json!({"messages": user("x")}).to_string();
    for auth in [
        "",
        "authorization: Bearer wrong\r\n",
        "authorization: s3cret\r\n",
    ] {
        let (status, _) = http(&server, "POST", "/v1/chat/completions", auth, &body).await;
        assert_eq!(status, 401, "{auth:?}");
    }
    assert!(llm.requests().is_empty());
    let (status, _) = http(
        &server,
        "POST",
        "/v1/chat/completions",
        "authorization: Bearer s3cret\r\n",
        &body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(http(&server, "GET", "/health", "", "").await.0, 200);
    assert_eq!(http(&server, "GET", "/v1/models", "", "").await.0, 401);
}

#[tokio::test]
async fn embeddings_come_as_floats_or_base64() {
    let server = start(ServeConfig::default(), FakeLlm::fixed("x")).await;
    let (status, floats) = http(
        &server,
        "POST",
        "/v1/embeddings",
        "",
        &json!({"input": ["warm kitchen", "cold garage"]}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{floats}");
    let floats = parsed(&floats);
    assert_eq!(floats["data"].as_array().unwrap().len(), 2);
    let first: Vec<f32> = serde_json::from_value(floats["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(first.len(), 64);
    let (_, packed) = http(
        &server,
        "POST",
        "/v1/embeddings",
        "",
        &json!({"input": "warm kitchen", "encoding_format": "base64"}).to_string(),
    )
    .await;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(parsed(&packed)["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let unpacked: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(unpacked, first);
}

/// Streams a piece every few milliseconds until dropped, and says when it
/// was.
struct Endless {
    dropped: Arc<AtomicBool>,
}

struct Flag(Arc<AtomicBool>);

impl Drop for Flag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl LlmEngine for Endless {
    fn model_id(&self) -> String {
        "endless".into()
    }
    fn generate(&self, _: GenerateRequest) -> LlmFuture<'_, Completion> {
        Box::pin(async { Err(LlmError::Internal("stream only".into())) })
    }
    fn generate_streaming(&self, _: GenerateRequest, deltas: Deltas) -> LlmFuture<'_, Completion> {
        let flag = Flag(self.dropped.clone());
        Box::pin(async move {
            let _flag = flag;
            loop {
                let _ = deltas.try_send("more ".into());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }
    fn classify(&self, _: String, _: Vec<String>) -> LlmFuture<'_, Vec<f32>> {
        Box::pin(async { Err(LlmError::ModelNotLoaded) })
    }
    fn embed(&self, _: Vec<String>) -> LlmFuture<'_, Vec<Vec<f32>>> {
        Box::pin(async { Err(LlmError::ModelNotLoaded) })
    }
    fn count_tokens(&self, _: String) -> LlmFuture<'_, u32> {
        Box::pin(async { Err(LlmError::ModelNotLoaded) })
    }
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_abandons_its_generation() {
    let dropped = Arc::new(AtomicBool::new(false));
    let server = start(
        ServeConfig::default(),
        Arc::new(Endless {
            dropped: dropped.clone(),
        }),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let body = json!({"messages": user("x"), "stream": true}).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("more") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before any text");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        !dropped.load(Ordering::SeqCst),
        "still generating while read"
    );
    drop(s);
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while !dropped.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "the generation kept running after the client left"
    );
}

#[tokio::test]
async fn metrics_count_answers_by_endpoint_and_outcome() {
    let server = start(ServeConfig::default(), FakeLlm::fixed("warm")).await;
    let ok = json!({"messages": user("x")}).to_string();
    let refused = json!({"messages": user("x"), "n": 2}).to_string();
    for body in [&ok, &ok, &refused] {
        http(&server, "POST", "/v1/chat/completions", "", body).await;
    }
    http(
        &server,
        "POST",
        "/v1/embeddings",
        "",
        &json!({"input": "x"}).to_string(),
    )
    .await;
    let (status, text) = http(&server, "GET", "/metrics", "", "").await;
    assert_eq!(status, 200);
    for line in [
        "ganglion_serve_requests_total{endpoint=\"chat\",outcome=\"ok\"} 2",
        "ganglion_serve_requests_total{endpoint=\"chat\",outcome=\"refused\"} 1",
        "ganglion_serve_requests_total{endpoint=\"embeddings\",outcome=\"ok\"} 1",
        "ganglion_serve_requests_total{endpoint=\"completions\",outcome=\"ok\"} 0",
        "ganglion_model_loaded 1",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

#[tokio::test]
async fn a_hundred_kilobyte_stop_string_is_refused_before_it_reaches_the_engine() {
    let llm = FakeLlm::fixed("x");
    let server = start(ServeConfig::default(), llm.clone()).await;
    let body = json!({"messages": user("x"), "stop": ["x".repeat(100_000)]}).to_string();
    let (status, answer) = http(&server, "POST", "/v1/chat/completions", "", &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        parsed(&answer)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_stop_bytes")
    );
    assert!(llm.requests().is_empty());
}
