//! The HTTP admin endpoint (`[admin]`, feature `admin`): Prometheus
//! metrics, liveness and readiness, the rules with their counters, enabling
//! and disabling a rule, and a small read-only page.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /health` | 200 while the process serves (no token needed) |
//! | `GET /ready` | 200 when the broker is connected, rules are loaded and the model is, if a rule needs it; else 503 with the reasons (JSON) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /rules` | every rule: file, topics, plugins and versions, enabled, counters, last error (JSON) |
//! | `POST /rules/{name}/disable`, `/enable` | the rule stops / starts taking messages |
//! | `POST /rules/{name}/test` | `{"topic", "payload"}` through the live rule, nothing published: every stage's output and the actions the allow-list lets out ([`crate::pipeline::Trial`]) |
//! | `GET /` | an HTML page: rules, rate sparklines, recent decisions from the audit log |
//!
//! The server is axum on the gateway's own tokio runtime; everything it
//! shows is read from counters at request time, except the rate samples of
//! the sparklines, a ring of `[admin] sparkline_samples` per rule. Request
//! bodies are capped at `[admin] max_body_bytes`.

mod metrics;
mod openai;
mod page;

pub use metrics::{Exposition, escape_label};
pub use openai::{ModelServer, SCHEDULED_AS, serve_model};
pub use page::escape_html;

use crate::config::AdminConfig;
use crate::gateway::{Gateway, GatewayError};
use crate::llm::LlmEngine;
use crate::reload::ReloadEvent;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// The MQTT link's state at one moment, as the admin endpoint shows it; the
/// program that owns the link reads it (the endpoint names no transport).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkGauges {
    /// Both connections (intake and output) are up.
    pub connected: bool,
    /// Connections the broker accepted since the start, both together.
    pub connections: u64,
    /// Publishes written and not yet acknowledged.
    pub in_flight: usize,
    /// Publishes asked for and not yet written (waiting for the connection
    /// or a free in-flight slot).
    pub outbox: usize,
    /// Deliveries received and not yet taken by the gateway.
    pub intake_backlog: usize,
    /// QoS 0 deliveries dropped because the intake buffer was full.
    pub dropped_qos0: u64,
}

/// What the endpoint reads.
pub struct Sources {
    /// The running rules and their counters.
    pub gateway: Arc<Gateway>,
    /// The model; its id is empty when none is loaded.
    pub llm: Arc<dyn LlmEngine>,
    /// The local engine and the remotes, whose counters `/metrics` shows.
    pub engines: crate::llm::Engines,
    /// Reads the broker link; none when there is no broker (embedding).
    pub link: Option<Arc<dyn Fn() -> LinkGauges + Send + Sync>>,
    /// Reload outcomes, counted for `/metrics`; none without hot reload.
    pub reloads: Option<broadcast::Receiver<ReloadEvent>>,
    /// The audit log, for the page's recent decisions; none when disabled.
    pub audit: Option<PathBuf>,
}

/// Why the endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// `[admin]` or `[serve]` is refused (see [`AdminConfig::check`],
    /// [`crate::config::ServeConfig::check`]).
    #[error("{0}")]
    Config(String),
    /// The address could not be bound.
    #[error("[{table}] listen = {listen:?}: {source}")]
    Bind {
        /// The table whose `listen` it is: `admin` or `serve`.
        table: &'static str,
        /// The address.
        listen: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The endpoint, serving until dropped.
pub struct Admin {
    /// The address bound (the port is the one chosen when `listen` says 0).
    pub addr: std::net::SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Admin {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Shared {
    sources: Sources,
    config: AdminConfig,
    reloads_ok: AtomicU64,
    reloads_refused: AtomicU64,
    /// Per rule: the message count at the last sample, and the rates (msg/s)
    /// of the last `sparkline_samples` periods, oldest first.
    samples: Mutex<BTreeMap<String, (u64, VecDeque<f64>)>>,
}

/// Binds `[admin] listen` and serves on the current tokio runtime.
pub async fn start(config: &AdminConfig, mut sources: Sources) -> Result<Admin, AdminError> {
    let addr = config.check().map_err(AdminError::Config)?;
    let (listener, addr) = bind(addr, "admin", &config.listen).await?;
    let reloads = sources.reloads.take();
    let shared = Arc::new(Shared {
        sources,
        config: config.clone(),
        reloads_ok: AtomicU64::new(0),
        reloads_refused: AtomicU64::new(0),
        samples: Mutex::new(BTreeMap::new()),
    });
    let mut tasks = vec![tokio::spawn(sample(shared.clone()))];
    if let Some(rx) = reloads {
        tasks.push(tokio::spawn(count_reloads(shared.clone(), rx)));
    }
    let app = router(shared);
    let limits = (
        config.max_connections.max(1),
        Duration::from_secs(config.connection_secs.max(1)),
    );
    tasks.push(tokio::spawn(serve(listener, app, limits)));
    Ok(Admin { addr, tasks })
}

/// Binds `addr` (the checked `listen` of `[table]`); the address bound,
/// with the port chosen when `listen` says 0.
async fn bind(
    addr: std::net::SocketAddr,
    table: &'static str,
    listen: &str,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), AdminError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind {
            table,
            listen: listen.to_owned(),
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(addr);
    Ok((listener, addr))
}

/// Accepts connections, at most `max` open at once (one more is closed at
/// once), each closed after `life` whatever it is doing. The connections'
/// tasks end with this one (the `Admin` is dropped).
async fn serve(listener: tokio::net::TcpListener, app: Router, (max, life): (usize, Duration)) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "admin endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                max,
                "admin connection refused: the endpoint has its most open"
            );
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(life)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(life, connection).await;
            drop(slot);
        });
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_body_bytes;
    let guarded = Router::new()
        .route("/", get(page::page))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/rules", get(rules))
        .route("/rules/:name/enable", post(enable))
        .route("/rules/:name/disable", post(disable))
        .route("/rules/:name/test", post(test))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authorize,
        ));
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .merge(guarded)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

/// Equal strings, compared without stopping at the first difference, so
/// the answer's timing does not tell how much of a guessed token is right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Whether `headers` carry `Authorization: Bearer <token>`; true when no
/// token is set.
fn bearer_accepted(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|g| same(g.as_bytes(), token.as_bytes()))
}

async fn authorize(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if !bearer_accepted(&headers, shared.config.token()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({"error": "a bearer token is required ([admin] token)"})),
        )
            .into_response();
    }
    next.run(request).await
}

/// Takes a rate sample of every rule each `sample_ms`.
async fn sample(shared: Arc<Shared>) {
    let period = std::time::Duration::from_millis(shared.config.sample_ms.max(1));
    let keep = shared.config.sparkline_samples.max(1);
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let stats = shared.sources.gateway.stats();
        let mut samples = shared.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.retain(|name, _| stats.iter().any(|(n, _)| n == name));
        for (name, s) in stats {
            let now = s.messages.load(Ordering::Relaxed);
            let (last, ring) = samples
                .entry(name)
                .or_insert_with(|| (now, VecDeque::with_capacity(keep)));
            let rate = now.saturating_sub(*last) as f64 / period.as_secs_f64();
            *last = now;
            if ring.len() == keep {
                ring.pop_front();
            }
            ring.push_back(rate);
        }
    }
}

async fn count_reloads(shared: Arc<Shared>, mut rx: broadcast::Receiver<ReloadEvent>) {
    loop {
        match rx.recv().await {
            Ok(e) if e.error.is_some() => {
                shared.reloads_refused.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                shared.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            // Missed events are not counted: the counters only go up.
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let reloads = (
        shared.reloads_ok.load(Ordering::Relaxed),
        shared.reloads_refused.load(Ordering::Relaxed),
    );
    let text = metrics::render(&shared.sources, reloads);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Why the gateway is not ready; empty when it is.
fn not_ready(sources: &Sources) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(link) = &sources.link
        && !link().connected
    {
        why.push("the broker is not connected".to_owned());
    }
    let pipelines = sources.gateway.pipelines();
    if pipelines.is_empty() {
        why.push("no rule is loaded".to_owned());
    }
    let needs_model: Vec<&str> = pipelines
        .iter()
        .filter(|p| uses_model(&p.rule))
        .map(|p| p.rule.name.as_str())
        .collect();
    if !needs_model.is_empty() && sources.llm.model_id().is_empty() {
        why.push(format!(
            "no model is loaded, and rules use it: {}",
            needs_model.join(", ")
        ));
    }
    why
}

fn uses_model(rule: &crate::rules::Rule) -> bool {
    matches!(
        rule.stages,
        crate::rules::Stages::Chain {
            prompt: Some(_),
            ..
        }
    )
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let why = not_ready(&shared.sources);
    if why.is_empty() {
        axum::Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "reasons": why})),
        )
            .into_response()
    }
}

/// Every rule, for `/rules` and the page.
fn rules_json(gateway: &Gateway) -> Vec<serde_json::Value> {
    let stats = gateway.stats();
    gateway
        .pipelines()
        .iter()
        .map(|p| {
            let s = stats
                .iter()
                .find(|(n, _)| *n == p.rule.name)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            let plugins: Vec<_> = p
                .plugins()
                .into_iter()
                .map(|(stage, plugin, _)| {
                    json!({
                        "stage": stage,
                        "name": plugin.name,
                        "version": plugin.version.to_string(),
                        "blake3": plugin.version.hash,
                    })
                })
                .collect();
            let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
            json!({
                "name": p.rule.name,
                "file": p.rule.source,
                "topics": p.rule.topics,
                "uses_model": uses_model(&p.rule),
                "enabled": !s.disabled.load(Ordering::Relaxed),
                "plugins": plugins,
                "counters": {
                    "messages": n(&s.messages),
                    "readings": n(&s.readings),
                    "published": n(&s.published),
                    "dead_letters": n(&s.dead_letters),
                    "skipped": n(&s.skipped),
                },
                "dead_letters_by_kind": s.dead_letters_by_kind(),
                "last_error": s.last_error(),
            })
        })
        .collect()
}

async fn rules(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(json!({ "rules": rules_json(&shared.sources.gateway) })).into_response()
}

async fn set_enabled(shared: Arc<Shared>, name: String, enabled: bool) -> Response {
    let (gateway, rule) = (shared.sources.gateway.clone(), name.clone());
    // The switch is written durably (an fsync): off the executor.
    let switched = tokio::task::spawn_blocking(move || gateway.set_enabled(&rule, enabled))
        .await
        .unwrap_or(Err(GatewayError::Closed));
    let name = name.as_str();
    match switched {
        Ok(()) => {
            tracing::info!(rule = %name.escape_debug(), enabled, "rule switched through the admin endpoint");
            axum::Json(json!({"rule": name, "enabled": enabled})).into_response()
        }
        Err(GatewayError::NoSuchRule(_)) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "no such rule", "rule": name})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn enable(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    set_enabled(shared, name, true).await
}

async fn disable(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    set_enabled(shared, name, false).await
}

/// The body of `POST /rules/{name}/test`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TestMessage {
    topic: String,
    /// A string is the payload as it is; any other JSON value is the
    /// payload written as JSON.
    payload: serde_json::Value,
}

async fn test(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Result<axum::Json<TestMessage>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let bad = |status: StatusCode, error: String| {
        (status, axum::Json(json!({"error": error, "rule": name}))).into_response()
    };
    let axum::Json(m) = match body {
        Ok(b) => b,
        // Too large (over [admin] max_body_bytes), not JSON, wrong fields.
        Err(e) => return bad(e.status(), e.body_text()),
    };
    let Some(pipeline) = shared
        .sources
        .gateway
        .pipelines()
        .into_iter()
        .find(|p| p.rule.name == name)
    else {
        return bad(StatusCode::NOT_FOUND, "no such rule".into());
    };
    if !pipeline.rule.matches(&m.topic) {
        return bad(
            StatusCode::BAD_REQUEST,
            format!(
                "the rule's topics ({}) do not match the topic",
                pipeline.rule.topics.join(", ")
            ),
        );
    }
    let payload = match m.payload {
        serde_json::Value::String(s) => s.into_bytes(),
        other => other.to_string().into_bytes(),
    };
    let message = crate::types::Message {
        topic: m.topic,
        payload,
        timestamp: crate::types::received_now(),
    };
    axum::Json(pipeline.trial(&message).await).into_response()
}

/// The page's answer type, for `page.rs`.
type PageResponse = Html<String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"", b"x"));
    }
}
