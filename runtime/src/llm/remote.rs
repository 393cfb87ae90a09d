//! An [`LlmEngine`] that sends generation and embedding to an
//! OpenAI-compatible server (`[remote.<name>]`, see
//! [`crate::config::RemoteConfig`]): `/chat/completions` for chat input,
//! `/completions` for raw text, `/embeddings`; streamed with server-sent
//! events unless `stream = false`.
//!
//! Every call holds one of `max_concurrent` slots, tries up to `1 +
//! retries` times (connection errors, timeouts, 5xx, 429; exponential
//! backoff with jitter, within the request's deadline), and goes through
//! the circuit breaker. A call the server fails, or one the open circuit
//! refuses, goes to the local engine with `fallback = "local"`, else fails
//! with [`LlmError::Internal`] (`llm-error`, which dead-letters the
//! message). A 400 or 422 is the request's fault: it fails with
//! `invalid-input` and neither opens the circuit nor falls back.
//!
//! Limits: the OpenAI API has no classification or tokenizer endpoint, so
//! `classify` and `count-tokens` always run on the local engine (a token
//! count is then the local tokenizer's, not the remote model's). A JSON
//! schema is sent as `response_format`, choices as a schema of a string
//! enum (the answer must be one of them); a regex has no standard form and
//! is refused with `invalid-input`. With
//! streaming, a server that reports no usage gets one completion token
//! counted per content event.

use super::breaker::{Breaker, BreakerState};
use super::http::{Endpoint, Failure, post};
use super::{LlmEngine, LlmFuture};
use crate::config::{Fallback, RemoteConfig, SchemaFormat};
use crate::types::{Completion, Constraint, FinishReason, LlmError, Usage};
use ganglion_llm::types::{GenerateRequest, LlmInput};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters of one remote engine, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteStats {
    /// Calls made to the engine (generate and embed).
    pub requests: u64,
    /// HTTP attempts after the first of a call.
    pub retries: u64,
    /// Calls the server failed, after their retries.
    pub failures: u64,
    /// Calls the open circuit refused without sending anything.
    pub refused: u64,
    /// Calls answered by the local engine instead.
    pub fallbacks: u64,
    /// Times the circuit opened.
    pub breaker_opened: u64,
    /// The circuit now.
    pub breaker: BreakerState,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    refused: AtomicU64,
    fallbacks: AtomicU64,
}

/// The remote engine; see the [module docs](self).
pub struct RemoteEngine {
    name: String,
    config: RemoteConfig,
    endpoint: Endpoint,
    api_key: Option<String>,
    slots: tokio::sync::Semaphore,
    breaker: Breaker,
    local: Arc<dyn LlmEngine>,
    counters: Counters,
}

/// What a call could not get from the server.
enum Outcome {
    /// The circuit is open: nothing was sent.
    Refused(Duration),
    /// The server failed it (after its retries).
    Failed(Failure),
}

impl RemoteEngine {
    /// The engine for `[remote.<name>]`; `local` answers `classify`,
    /// `count-tokens` and, with `fallback = "local"`, what the server does
    /// not. An error names the setting at fault (the URL, the API key).
    pub fn new(
        name: &str,
        config: RemoteConfig,
        local: Arc<dyn LlmEngine>,
    ) -> Result<RemoteEngine, String> {
        let endpoint = Endpoint::parse(&config.url).map_err(|e| format!("[remote.{name}] {e}"))?;
        let api_key = config
            .api_key()
            .map_err(|e| format!("[remote.{name}] {e}"))?;
        Ok(RemoteEngine {
            name: name.to_owned(),
            endpoint,
            api_key,
            slots: tokio::sync::Semaphore::new(config.max_concurrent.max(1)),
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown()),
            local,
            counters: Counters::default(),
            config,
        })
    }

    /// The name of its `[remote.<name>]` table.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The counters now.
    pub fn remote_stats(&self) -> RemoteStats {
        let c = &self.counters;
        RemoteStats {
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
            breaker_opened: self.breaker.opened(),
            breaker: self.breaker.state(),
        }
    }

    /// Sends `body` to `path` through the slots, retries and breaker, and
    /// reads the answer with `read`.
    async fn call<T, R, Fut>(
        &self,
        path: &str,
        body: Value,
        stream: bool,
        deadline: Option<Instant>,
        read: R,
    ) -> Result<Result<T, Outcome>, LlmError>
    where
        R: Fn(super::http::Response) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let ticket = match self.breaker.admit() {
            Ok(t) => t,
            Err(wait) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(Err(Outcome::Refused(wait)));
            }
        };
        let _slot = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), self.slots.acquire())
                .await
                .map_err(|_| LlmError::DeadlineExceeded)?,
            None => self.slots.acquire().await,
        }
        .map_err(|_| LlmError::Internal("remote engine closed".into()))?;
        let body = serde_json::to_vec(&body).map_err(|e| LlmError::Internal(e.to_string()))?;
        let mut attempt = 0u32;
        loop {
            let limit = self.config.timeout();
            let limit = deadline.map_or(limit, |d| {
                limit.min(d.saturating_duration_since(Instant::now()))
            });
            let result = tokio::time::timeout(limit, async {
                let response = post(
                    &self.endpoint,
                    path,
                    body.clone(),
                    self.api_key.as_deref(),
                    stream,
                    self.config.connect_timeout().min(limit),
                )
                .await?;
                if !response.status.is_success() {
                    return Err(response.error().await);
                }
                read(response).await
            })
            .await
            .unwrap_or(Err(Failure::Timeout));
            let failure = match result {
                Ok(v) => {
                    ticket.success();
                    return Ok(Ok(v));
                }
                Err(f) if f.is_bad_request() => {
                    ticket.success();
                    return Err(LlmError::InvalidInput(format!(
                        "remote `{}`: {f}",
                        self.name
                    )));
                }
                Err(f) => f,
            };
            let wait = self.backoff(attempt, &failure);
            let in_time = deadline.is_none_or(|d| Instant::now() + wait < d);
            if attempt >= self.config.retries || !failure.retryable() || !in_time {
                tracing::warn!(remote = %self.name, attempts = attempt + 1, error = %failure, "remote model call failed");
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                ticket.failure();
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(LlmError::DeadlineExceeded);
                }
                return Ok(Err(Outcome::Failed(failure)));
            }
            tracing::debug!(remote = %self.name, attempt, error = %failure, ?wait, "retrying remote model call");
            tokio::time::sleep(wait).await;
            attempt += 1;
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `backoff_ms · 2^attempt`, at most `backoff_max_ms`, less a random
    /// part of up to half; a 429's `Retry-After` (within the same bound)
    /// wins.
    fn backoff(&self, attempt: u32, failure: &Failure) -> Duration {
        let max = self.config.backoff_max_ms;
        if let Failure::Status {
            retry_after: Some(secs),
            ..
        } = failure
        {
            return Duration::from_millis(secs.saturating_mul(1000).min(max));
        }
        let full = self
            .config
            .backoff_ms
            .saturating_mul(1u64 << attempt.min(20))
            .min(max);
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
        Duration::from_millis(full - random % (full / 2 + 1))
    }

    /// What a call the server could not answer becomes: the local engine's
    /// answer, or `llm-error`.
    fn unavailable(&self, outcome: Outcome) -> Result<(), LlmError> {
        let why = match outcome {
            Outcome::Refused(wait) => format!(
                "remote `{}` is unavailable: circuit open after {} failures in a row (next probe in {} ms)",
                self.name,
                self.config.breaker_failures.max(1),
                wait.as_millis()
            ),
            Outcome::Failed(f) => format!("remote `{}`: {f}", self.name),
        };
        match self.config.fallback {
            Fallback::Local => {
                self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(remote = %self.name, "{why}; the local engine answers");
                Ok(())
            }
            Fallback::None => Err(LlmError::Internal(why)),
        }
    }

    fn generate_body(&self, request: &GenerateRequest, stream: bool) -> Result<Value, LlmError> {
        let p = &request.params;
        let mut body = json!({
            "model": self.config.model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "stream": stream,
        });
        match &request.input {
            LlmInput::Chat(messages) => {
                body["messages"] = messages
                    .iter()
                    .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                    .collect();
            }
            LlmInput::Raw(text) => body["prompt"] = json!(text),
        }
        // Only what differs from the server's defaults: fields outside the
        // OpenAI API (top_k, repeat_penalty) are refused by some servers.
        if p.top_p < 1.0 {
            body["top_p"] = json!(p.top_p);
        }
        if p.top_k > 0 {
            body["top_k"] = json!(p.top_k);
        }
        if p.repeat_penalty != 1.0 {
            body["repeat_penalty"] = json!(p.repeat_penalty);
        }
        if let Some(seed) = p.seed {
            body["seed"] = json!(seed);
        }
        let stop: Vec<&String> = p.stop.iter().filter(|s| !s.is_empty()).collect();
        if !stop.is_empty() {
            body["stop"] = json!(stop);
        }
        let schema = match &p.constraint {
            Constraint::None => None,
            Constraint::JsonSchema(schema) => Some(
                serde_json::from_str::<Value>(schema)
                    .map_err(|e| LlmError::InvalidInput(format!("JSON schema: {e}")))?,
            ),
            // Sent as a JSON string out of an enum, and read back by
            // [`chosen`].
            Constraint::Choice(choices) if !choices.is_empty() => {
                Some(json!({"type": "string", "enum": choices}))
            }
            Constraint::Choice(_) => {
                return Err(LlmError::InvalidInput("no choices".into()));
            }
            Constraint::Regex(_) => {
                return Err(LlmError::InvalidInput(format!(
                    "remote `{}` takes JSON-schema and choice constraints only; a regex needs the local engine",
                    self.name
                )));
            }
        };
        if let Some(schema) = schema {
            body["response_format"] = match self.config.response_format {
                SchemaFormat::JsonSchema => json!({
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema, "strict": true},
                }),
                SchemaFormat::JsonObject => json!({"type": "json_object", "schema": schema}),
            };
        }
        Ok(body)
    }
}

/// A choice answered as a JSON string (or bare, by a server that ignored
/// `response_format`) becomes the choice itself, as the local engine
/// gives it; anything else is refused.
fn chosen(name: &str, choices: &[String], mut c: Completion) -> Result<Completion, LlmError> {
    let text = c.text.trim();
    let text = serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned());
    if !choices.contains(&text) {
        return Err(LlmError::ConstraintUnsatisfiable(format!(
            "remote `{name}` answered {:?}, which is none of the choices",
            c.text.chars().take(200).collect::<String>()
        )));
    }
    c.text = text;
    Ok(c)
}

fn finish(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

fn usage(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let n = |k: &str| {
        u.get(k)
            .and_then(Value::as_u64)
            .map(|n| n.min(u32::MAX as u64) as u32)
    };
    Some(Usage {
        prompt_tokens: n("prompt_tokens")?,
        completion_tokens: n("completion_tokens").unwrap_or(0),
        cached_tokens: 0,
    })
}

/// The first choice's text: `message.content` (chat), `delta.content`
/// (chat stream) or `text` (completions).
fn choice_text(choice: &Value) -> Option<&str> {
    choice
        .pointer("/message/content")
        .or_else(|| choice.pointer("/delta/content"))
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
}

fn server_error(v: &Value) -> Option<Failure> {
    let e = v.get("error")?;
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| e.to_string(), str::to_owned);
    Some(Failure::Protocol(format!(
        "server error: {}",
        message.chars().take(512).collect::<String>()
    )))
}

fn whole(v: Value, model: &str) -> Result<Completion, Failure> {
    if let Some(f) = server_error(&v) {
        return Err(f);
    }
    let choice = v
        .pointer("/choices/0")
        .ok_or_else(|| Failure::Protocol("no choices".into()))?;
    let text = choice_text(choice)
        .ok_or_else(|| Failure::Protocol("no text in the first choice".into()))?
        .to_owned();
    Ok(Completion {
        finish_reason: finish(choice.get("finish_reason").and_then(Value::as_str)),
        usage: usage(&v).unwrap_or_default(),
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(model)
            .to_owned(),
        text,
    })
}

async fn streamed(
    response: super::http::Response,
    model: &str,
    max_bytes: usize,
    max_line: usize,
) -> Result<Completion, Failure> {
    let mut events = response.events(max_bytes, max_line);
    let mut text = String::new();
    let mut reason = None;
    let mut reported = None;
    let mut chunks = 0u32;
    let mut model = model.to_owned();
    loop {
        let Some(data) = events.next().await? else {
            return Err(Failure::Broken("the stream ended before [DONE]".into()));
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data)
            .map_err(|e| Failure::Protocol(format!("event is not JSON: {e}")))?;
        if let Some(f) = server_error(&v) {
            return Err(f);
        }
        if let Some(u) = usage(&v) {
            reported = Some(u);
        }
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            model = m.chars().take(256).collect();
        }
        let Some(choice) = v.pointer("/choices/0") else {
            continue;
        };
        if let Some(piece) = choice_text(choice)
            && !piece.is_empty()
        {
            text.push_str(piece);
            chunks += 1;
        }
        if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
            reason = Some(r.to_owned());
        }
    }
    Ok(Completion {
        text,
        finish_reason: finish(reason.as_deref()),
        usage: reported.unwrap_or(Usage {
            prompt_tokens: 0,
            completion_tokens: chunks,
            cached_tokens: 0,
        }),
        model,
    })
}

fn embeddings(v: Value, count: usize) -> Result<Vec<Vec<f32>>, Failure> {
    if let Some(f) = server_error(&v) {
        return Err(f);
    }
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::Protocol("no `data` array".into()))?;
    if data.len() != count {
        return Err(Failure::Protocol(format!(
            "{} embeddings for {count} texts",
            data.len()
        )));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; count];
    for (i, item) in data.iter().enumerate() {
        let index = item
            .get("index")
            .and_then(Value::as_u64)
            .map_or(i, |n| n as usize);
        let vector: Vec<f32> = item
            .get("embedding")
            .and_then(Value::as_array)
            .ok_or_else(|| Failure::Protocol("an item has no `embedding` array".into()))?
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32).filter(|x| x.is_finite()))
            .collect::<Option<_>>()
            .ok_or_else(|| Failure::Protocol("an embedding holds a non-number".into()))?;
        let slot = out
            .get_mut(index)
            .ok_or_else(|| Failure::Protocol(format!("embedding index {index} out of range")))?;
        if slot.replace(vector).is_some() {
            return Err(Failure::Protocol(format!("embedding index {index} twice")));
        }
    }
    let out: Vec<Vec<f32>> = out.into_iter().map(Option::unwrap_or_default).collect();
    let width = out.first().map_or(0, Vec::len);
    if width == 0 || out.iter().any(|v| v.len() != width) {
        return Err(Failure::Protocol(
            "embeddings are empty or of different lengths".into(),
        ));
    }
    // The trait promises L2-normalised vectors; not every server sends them.
    Ok(out.into_iter().map(super::l2_normalised).collect())
}

impl LlmEngine for RemoteEngine {
    fn model_id(&self) -> String {
        self.config.model.clone()
    }

    fn generate(&self, request: GenerateRequest) -> LlmFuture<'_, Completion> {
        Box::pin(async move {
            let stream = self.config.stream;
            let body = self.generate_body(&request, stream)?;
            let deadline = request
                .params
                .deadline_ms
                .map(|ms| Instant::now() + Duration::from_millis(u64::from(ms)));
            let path = match request.input {
                LlmInput::Chat(_) => "/chat/completions",
                LlmInput::Raw(_) => "/completions",
            };
            let model = self.config.model.as_str();
            let (max, line) = (self.config.max_response_bytes, self.config.max_line_bytes);
            let result = self
                .call(path, body, stream, deadline, |response| async move {
                    if stream {
                        streamed(response, model, max, line).await
                    } else {
                        whole(response.json(max).await?, model)
                    }
                })
                .await?;
            match result {
                Ok(c) => match &request.params.constraint {
                    Constraint::Choice(choices) => chosen(&self.name, choices, c),
                    _ => Ok(c),
                },
                Err(outcome) => {
                    self.unavailable(outcome)?;
                    self.local.generate(request).await
                }
            }
        })
    }

    fn classify(&self, text: String, labels: Vec<String>) -> LlmFuture<'_, Vec<f32>> {
        self.local.classify(text, labels)
    }

    fn embed(&self, texts: Vec<String>) -> LlmFuture<'_, Vec<Vec<f32>>> {
        Box::pin(async move {
            if texts.is_empty() {
                return Ok(Vec::new());
            }
            let body = json!({"model": self.config.model, "input": texts});
            let (max, count) = (self.config.max_response_bytes, texts.len());
            let result = self
                .call("/embeddings", body, false, None, |response| async move {
                    embeddings(response.json(max).await?, count)
                })
                .await?;
            match result {
                Ok(v) => Ok(v),
                Err(outcome) => {
                    self.unavailable(outcome)?;
                    self.local.embed(texts).await
                }
            }
        })
    }

    fn count_tokens(&self, text: String) -> LlmFuture<'_, u32> {
        self.local.count_tokens(text)
    }

    fn stats(&self) -> Option<ganglion_llm::EngineStats> {
        self.local.stats()
    }
}
