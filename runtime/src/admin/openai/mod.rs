//! The model as an OpenAI-compatible HTTP endpoint (`[serve]`, `ganglion
//! serve-model`), for other tools on the gateway: they share the engine's
//! continuous batch and prefix cache with the rules.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /health` | 200 while the process serves (no token needed) |
//! | `GET /metrics` | Prometheus text: the engine's families (as on the admin endpoint) and requests by endpoint and outcome |
//! | `GET /v1/models`, `/v1/models/{id}` | the model |
//! | `POST /v1/chat/completions` | a chat completion; `stream` sends server-sent events |
//! | `POST /v1/completions` | a text completion of one prompt; `stream` as above |
//! | `POST /v1/embeddings` | vectors from `[model] embedding`, as floats or base64 |
//!
//! Errors are OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`: 400 for a request the engine cannot honour (the message names
//! the field), 401 without the token, 413 over `[serve] max_body_bytes`,
//! 429 when the engine's queue is full (clients retry), 503 without a
//! model, 504 past the engine's deadline.
//!
//! A streamed answer's pieces come from the engine as it generates them
//! ([`crate::llm::Deltas`]); a client that goes away abandons its request
//! at the engine's next step. Headers go out with the first piece, so a
//! request refused by the engine gets its status code, not an event.

mod request;

pub use request::SCHEDULED_AS;

use super::{AdminError, bearer_accepted};
use crate::config::ServeConfig;
use crate::llm::{GenerateRequest, LlmEngine};
use crate::types::{Completion, FinishReason, LlmError};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use request::{ChatRequest, Checked, CompletionRequest, Delivery, EmbeddingRequest, Refusal};
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Pieces of text one streamed request may have waiting for its writer;
/// past this the engine keeps the text in the sequence until there is room.
const DELTA_QUEUE: usize = 64;
/// Server-sent events waiting for a slow client; the writer then waits.
const EVENT_QUEUE: usize = 16;

/// The endpoint, serving until dropped.
pub struct ModelServer {
    /// The address bound (the port is the one chosen when `listen` says 0).
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The endpoints counted on `/metrics`, and the outcomes by status class.
const ENDPOINTS: [&str; 3] = ["chat", "completions", "embeddings"];
const OUTCOMES: [&str; 3] = ["ok", "refused", "failed"];

struct Shared {
    config: ServeConfig,
    llm: Arc<dyn LlmEngine>,
    requests: AtomicU64,
    /// Answers per endpoint and outcome (2xx, 4xx, 5xx).
    answered: [[AtomicU64; 3]; 3],
}

/// Binds `[serve] listen` and serves `llm` on the current tokio runtime.
pub async fn serve_model(
    config: &ServeConfig,
    llm: Arc<dyn LlmEngine>,
) -> Result<ModelServer, AdminError> {
    let addr = config.check().map_err(AdminError::Config)?;
    let (listener, addr) = super::bind(addr, "serve", &config.listen).await?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        llm,
        requests: AtomicU64::new(0),
        answered: Default::default(),
    });
    let limits = (
        config.max_connections,
        Duration::from_secs(config.connection_secs),
    );
    let task = tokio::spawn(super::serve(listener, router(shared), limits));
    Ok(ModelServer { addr, task })
}

fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_body_bytes;
    let guarded = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/*id", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), count))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authorize,
        ));
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .merge(guarded)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such endpoint (/v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings)",
                None,
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

/// An answer in OpenAI's error shape.
fn error(status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Response {
    let body =
        json!({"error": {"message": message, "type": kind, "param": param, "code": Value::Null}});
    (status, axum::Json(body)).into_response()
}

fn refused(r: Refusal) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        &r.message,
        r.param,
    )
}

/// A body that is too large, not JSON, or of the wrong shape.
fn unreadable(e: JsonRejection) -> Response {
    let status = e.status();
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "request_too_large"
    } else {
        "invalid_request_error"
    };
    error(status, kind, &e.body_text(), None)
}

/// The status and type of an engine failure.
fn failed(e: &LlmError) -> Response {
    let (status, kind) = match e {
        LlmError::InvalidInput(_) | LlmError::ConstraintUnsatisfiable(_) => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        LlmError::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        LlmError::ModelNotLoaded => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        LlmError::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error"),
        LlmError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    };
    error(status, kind, &e.to_string(), None)
}

async fn authorize(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if !bearer_accepted(&headers, shared.config.token()) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "a bearer token is required ([serve] token; OpenAI clients send it as their API key)",
            None,
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
        return r;
    }
    next.run(request).await
}

/// Counts each answer of the completion and embedding endpoints by its
/// status class (a stream's status is the one its headers carried).
async fn count(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let endpoint = match request.uri().path() {
        "/v1/chat/completions" => Some(0),
        "/v1/completions" => Some(1),
        "/v1/embeddings" => Some(2),
        _ => None,
    };
    let response = next.run(request).await;
    if let Some(i) = endpoint {
        let status = response.status();
        let outcome = if status.is_success() {
            0
        } else if status.is_client_error() {
            1
        } else {
            2
        };
        shared.answered[i][outcome].fetch_add(1, Ordering::Relaxed);
    }
    response
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let mut e = super::Exposition::default();
    super::metrics::engine(&mut e, shared.llm.as_ref());
    e.family(
        "ganglion_serve_requests_total",
        "counter",
        "Answers of the OpenAI-compatible endpoint, by endpoint and outcome (ok: 2xx, refused: 4xx, failed: 5xx).",
    );
    for (i, endpoint) in ENDPOINTS.iter().enumerate() {
        for (j, outcome) in OUTCOMES.iter().enumerate() {
            let n = shared.answered[i][j].load(Ordering::Relaxed);
            e.sample(
                "ganglion_serve_requests_total",
                &[("endpoint", endpoint), ("outcome", outcome)],
                n as f64,
            );
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        e.finish(),
    )
        .into_response()
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "ganglion"})
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    let id = shared.llm.model_id();
    let data: Vec<Value> = if id.is_empty() {
        Vec::new()
    } else {
        vec![model_json(&id)]
    };
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(State(shared): State<Arc<Shared>>, Path(asked): Path<String>) -> Response {
    let id = shared.llm.model_id();
    if id.is_empty() || asked != id {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("no model {asked:?} here"),
            Some("model"),
        );
    }
    axum::Json(model_json(&id)).into_response()
}

/// Chat or text completion: what differs between the two in answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// An answer's id and creation time.
struct Stamp {
    id: String,
    created: u64,
}

impl Shared {
    fn stamp(&self, kind: Kind) -> Stamp {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        Stamp {
            id: format!("{prefix}-{created:x}{n:06x}"),
            created,
        }
    }
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::Json<ChatRequest>, JsonRejection>,
) -> Response {
    let checked = body.map(|axum::Json(r)| r.check(&shared.config));
    answer(shared, checked, Kind::Chat).await
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let checked = body.map(|axum::Json(r)| r.check(&shared.config));
    answer(shared, checked, Kind::Text).await
}

/// A chat or text completion request as read and checked: the body's
/// problem, the field refused, or the request to run.
async fn answer(
    shared: Arc<Shared>,
    checked: Result<Result<Checked, Refusal>, JsonRejection>,
    kind: Kind,
) -> Response {
    match checked {
        Err(e) => unreadable(e),
        Ok(Err(r)) => refused(r),
        Ok(Ok((input, params, delivery))) => {
            let request = GenerateRequest {
                input,
                params,
                rule: SCHEDULED_AS.into(),
            };
            complete(shared, request, kind, delivery).await
        }
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::ConstraintComplete => "stop",
        // Cut short either way: the client sees the text is not whole.
        FinishReason::Length | FinishReason::Deadline => "length",
    }
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.usage.prompt_tokens,
        "completion_tokens": c.usage.completion_tokens,
        "total_tokens": c.usage.prompt_tokens + c.usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.usage.cached_tokens},
    })
}

fn whole(kind: Kind, stamp: &Stamp, c: &Completion) -> Value {
    let (object, choice) = match kind {
        Kind::Chat => (
            "chat.completion",
            json!({"index": 0, "message": {"role": "assistant", "content": c.text},
                   "finish_reason": finish_reason(c.finish_reason), "logprobs": Value::Null}),
        ),
        Kind::Text => (
            "text_completion",
            json!({"index": 0, "text": c.text,
                   "finish_reason": finish_reason(c.finish_reason), "logprobs": Value::Null}),
        ),
    };
    json!({"id": stamp.id, "object": object, "created": stamp.created, "model": c.model,
           "choices": [choice], "usage": usage(c)})
}

/// One streamed chunk: a piece of text, or the end with its reason.
fn chunk(
    kind: Kind,
    stamp: &Stamp,
    model: &str,
    text: Option<&str>,
    finish: Option<&str>,
    with_usage: bool,
) -> Value {
    let (object, choice) = match kind {
        Kind::Chat => {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": Value::Null}),
            )
        }
        Kind::Text => (
            "text_completion",
            json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": Value::Null}),
        ),
    };
    let mut v = json!({"id": stamp.id, "object": object, "created": stamp.created,
                       "model": model, "choices": [choice]});
    if with_usage {
        v["usage"] = Value::Null;
    }
    v
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

type Generation = Pin<Box<dyn Future<Output = Result<Completion, LlmError>> + Send>>;

async fn complete(
    shared: Arc<Shared>,
    request: GenerateRequest,
    kind: Kind,
    delivery: Delivery,
) -> Response {
    let stamp = shared.stamp(kind);
    if !delivery.stream {
        // Dropped with the connection, which abandons the request.
        return match shared.llm.generate(request).await {
            Ok(c) => axum::Json(whole(kind, &stamp, &c)).into_response(),
            Err(e) => failed(&e),
        };
    }
    let (tx, mut deltas) = mpsc::channel(DELTA_QUEUE);
    let llm = shared.llm.clone();
    let mut generation: Generation =
        Box::pin(async move { llm.generate_streaming(request, tx).await });
    // Wait for the first piece (or the end) before the headers, so a
    // refusal gets its status code.
    let first = tokio::select! {
        piece = deltas.recv() => piece.map(First::Piece),
        r = &mut generation => Some(First::Done(r)),
    };
    let first = match first {
        Some(f) => f,
        None => First::Done(generation.as_mut().await),
    };
    if let First::Done(Err(e)) = &first {
        return failed(e);
    }
    let (events, rx) = mpsc::channel::<Bytes>(EVENT_QUEUE);
    let writer = Writer {
        events,
        kind,
        stamp,
        model: shared.llm.model_id(),
        include_usage: delivery.include_usage,
        sent: String::new(),
    };
    tokio::spawn(writer.run(first, generation, deltas));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

enum First {
    Piece(String),
    Done(Result<Completion, LlmError>),
}

/// Turns one streamed generation into server-sent events.
struct Writer {
    events: mpsc::Sender<Bytes>,
    kind: Kind,
    stamp: Stamp,
    model: String,
    include_usage: bool,
    /// The text sent so far.
    sent: String,
}

/// The client has gone.
struct Gone;

impl Writer {
    async fn send(&self, v: &Value) -> Result<(), Gone> {
        self.events.send(event(v)).await.map_err(|_| Gone)
    }

    async fn piece(&mut self, text: &str) -> Result<(), Gone> {
        if text.is_empty() {
            return Ok(());
        }
        let v = chunk(
            self.kind,
            &self.stamp,
            &self.model,
            Some(text),
            None,
            self.include_usage,
        );
        self.sent.push_str(text);
        self.send(&v).await
    }

    /// Sends events until the generation ends or the client goes; then the
    /// generation is dropped, which abandons it in the engine.
    async fn run(
        mut self,
        first: First,
        mut generation: Generation,
        mut deltas: mpsc::Receiver<String>,
    ) {
        let _ = self.stream(first, &mut generation, &mut deltas).await;
    }

    async fn stream(
        &mut self,
        first: First,
        generation: &mut Generation,
        deltas: &mut mpsc::Receiver<String>,
    ) -> Result<(), Gone> {
        if self.kind == Kind::Chat {
            let mut opening = chunk(
                self.kind,
                &self.stamp,
                &self.model,
                Some(""),
                None,
                self.include_usage,
            );
            opening["choices"][0]["delta"]["role"] = json!("assistant");
            self.send(&opening).await?;
        }
        let result = match first {
            First::Done(r) => r,
            First::Piece(p) => {
                self.piece(&p).await?;
                loop {
                    tokio::select! {
                        _ = self.events.closed() => return Err(Gone),
                        Some(p) = deltas.recv() => self.piece(&p).await?,
                        r = &mut *generation => break r,
                    }
                }
            }
        };
        while let Ok(p) = deltas.try_recv() {
            self.piece(&p).await?;
        }
        match result {
            Ok(c) => {
                // What the pieces did not carry: the last of the text, or
                // what a full channel held back.
                match c.text.strip_prefix(self.sent.as_str()) {
                    Some(rest) => {
                        let rest = rest.to_owned();
                        self.piece(&rest).await?;
                    }
                    None => tracing::warn!(
                        sent = %self.sent,
                        text = %c.text,
                        "the streamed pieces are not the start of the completion's text"
                    ),
                }
                let end = chunk(
                    self.kind,
                    &self.stamp,
                    &self.model,
                    None,
                    Some(finish_reason(c.finish_reason)),
                    self.include_usage,
                );
                self.send(&end).await?;
                if self.include_usage {
                    let mut u = chunk(self.kind, &self.stamp, &self.model, None, None, true);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&c);
                    self.send(&u).await?;
                }
            }
            Err(e) => {
                let kind = if matches!(
                    e,
                    LlmError::InvalidInput(_) | LlmError::ConstraintUnsatisfiable(_)
                ) {
                    "invalid_request_error"
                } else {
                    "server_error"
                };
                self.send(&json!({"error": {"message": e.to_string(), "type": kind, "param": Value::Null, "code": Value::Null}}))
                    .await?;
            }
        }
        self.events
            .send(Bytes::from_static(b"data: [DONE]\n\n"))
            .await
            .map_err(|_| Gone)
    }
}

async fn embeddings(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::Json<EmbeddingRequest>, JsonRejection>,
) -> Response {
    let axum::Json(request) = match body {
        Ok(b) => b,
        Err(e) => return unreadable(e),
    };
    let (texts, base64) = match request.check(&shared.config) {
        Ok(t) => t,
        Err(r) => return refused(r),
    };
    let vectors = match shared.llm.embed(texts).await {
        Ok(v) => v,
        Err(e) => return failed(&e),
    };
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    // The encoder's word pieces are not counted: usage says 0.
    axum::Json(
        json!({"object": "list", "data": data, "model": shared.llm.model_id(),
                      "usage": {"prompt_tokens": 0, "total_tokens": 0}}),
    )
    .into_response()
}

#[cfg(test)]
mod tests;
