//! The host interfaces plugins import.

use super::HostState;
use super::v0_1_0::bindings::ganglion::plugin::{config, llm, log, state, types};
use super::v0_1_0::convert;
use crate::llm::GenerateRequest;
use crate::types::LlmError;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl types::Host for HostState {}

/// Characters a plugin's log line must not carry to the terminal or log
/// file as they are: C0 and C1 controls (ANSI escape sequences start with
/// ESC or CSI; CR and LF forge lines; NUL cuts them in C readers) and the
/// bidirectional overrides that reorder what a reader sees.
fn must_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A plugin's log line as it may be logged: characters of [`must_escape`]
/// written as Rust escapes (`\u{1b}`, `\r`, `\u{0}`...), and the line cut to
/// `max_bytes` bytes (after escaping, on a character boundary), followed by
/// a marker giving how many bytes of the original were cut.
pub(crate) fn sanitize_log_line(message: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(message.len().min(max_bytes));
    for (i, c) in message.char_indices() {
        let before = out.len();
        if must_escape(c) {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > max_bytes {
            out.truncate(before);
            let _ = write!(out, "… [{} bytes cut]", message.len() - i);
            break;
        }
    }
    out
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        self.clock.logs += 1;
        let b = &self.binding;
        if self.clock.logs > b.limits.max_log_lines_per_call {
            b.suppressed_logs.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let message = sanitize_log_line(&message, b.limits.max_log_line_bytes);
        let (plugin, version, rule) = (&b.plugin, &b.version, &b.rule);
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "plugin", plugin, version, rule, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "plugin", plugin, version, rule, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "plugin", plugin, version, rule, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "plugin", plugin, version, rule, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "plugin", plugin, version, rule, "{message}")
            }
        }
        Ok(())
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.binding.config.get(&key).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }))
    }

    fn get_json(&mut self) -> wasmtime::Result<String> {
        Ok(self.binding.config_json.clone())
    }
}

impl state::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, state::StateError>> {
        Ok(self.binding.state.get(&key).map_err(convert::state_error))
    }

    fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), state::StateError>> {
        Ok(self
            .binding
            .state
            .set(&key, &value)
            .map_err(convert::state_error))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), state::StateError>> {
        Ok(self
            .binding
            .state
            .delete(&key)
            .map_err(convert::state_error))
    }
}

impl HostState {
    /// Counts a `generate`, `classify` or `embed` call of the current stage
    /// call; past `max_llm_calls_per_call` the call is refused before it
    /// reaches the model.
    fn count_llm_call(&mut self) -> Result<(), LlmError> {
        self.clock.llm_calls = self.clock.llm_calls.saturating_add(1);
        let max = self.binding.limits.max_llm_calls_per_call;
        if self.clock.llm_calls > max {
            return Err(LlmError::InvalidInput(format!(
                "model call refused: a plugin call may make at most {max} generate, classify or embed calls (max_llm_calls_per_call)"
            )));
        }
        Ok(())
    }

    /// Checks the texts (or labels) of a `classify` or `embed` request
    /// against `max_texts_per_request`, and their bytes with those of
    /// `extra` against `max_text_bytes_per_request`.
    fn check_texts(&self, what: &str, texts: &[String], extra: &str) -> Result<(), LlmError> {
        let limits = &self.binding.limits;
        if texts.len() > limits.max_texts_per_request {
            return Err(LlmError::InvalidInput(format!(
                "{} {what}, over the limit of {} per request (max_texts_per_request)",
                texts.len(),
                limits.max_texts_per_request
            )));
        }
        let bytes = texts.iter().map(String::len).sum::<usize>() + extra.len();
        if bytes > limits.max_text_bytes_per_request {
            return Err(LlmError::InvalidInput(format!(
                "{bytes} bytes of text, over the limit of {} per request (max_text_bytes_per_request)",
                limits.max_text_bytes_per_request
            )));
        }
        Ok(())
    }

    /// Runs a host wait with the llm timeout, cut to what is left of the
    /// call's `max_llm_time_per_call_ms`; its duration is excluded from the
    /// guest's deadline (epoch deadlines do not see host waits) and counted
    /// against that budget.
    async fn wait_llm<T>(
        &mut self,
        deadline_ms: Option<u32>,
        f: crate::llm::LlmFuture<'_, T>,
    ) -> Result<T, LlmError> {
        let limits = &self.binding.limits;
        let left = limits
            .max_llm_time_per_call()
            .saturating_sub(self.clock.llm_time);
        if left.is_zero() {
            return Err(LlmError::DeadlineExceeded);
        }
        let mut limit = limits.llm_timeout().min(left);
        if let Some(ms) = deadline_ms {
            limit = limit.min(Duration::from_millis(u64::from(ms)));
        }
        let start = Instant::now();
        let result = match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(LlmError::DeadlineExceeded),
        };
        let waited = start.elapsed();
        self.clock.host_wait += waited;
        self.clock.llm_time += waited;
        result
    }
}

impl llm::Host for HostState {
    async fn generate(
        &mut self,
        input: llm::Input,
        params: types::GenerationParams,
    ) -> wasmtime::Result<Result<types::Completion, types::LlmError>> {
        if let Err(e) = self.count_llm_call() {
            return Ok(Err(convert::llm_error_out(e)));
        }
        let request = GenerateRequest {
            input: convert::llm_input(input),
            params: convert::params(params),
            rule: self.binding.rule.clone(),
        };
        let deadline = request.params.deadline_ms;
        let engine = self.binding.llm.clone();
        let result = self.wait_llm(deadline, engine.generate(request)).await;
        Ok(result
            .map(convert::completion_out)
            .map_err(convert::llm_error_out))
    }

    async fn classify(
        &mut self,
        text: String,
        labels: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<f32>, types::LlmError>> {
        if let Err(e) = self
            .count_llm_call()
            .and_then(|()| self.check_texts("labels", &labels, &text))
        {
            return Ok(Err(convert::llm_error_out(e)));
        }
        let engine = self.binding.llm.clone();
        Ok(self
            .wait_llm(None, engine.classify(text, labels))
            .await
            .map_err(convert::llm_error_out))
    }

    async fn embed(
        &mut self,
        texts: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Vec<f32>>, types::LlmError>> {
        if let Err(e) = self
            .count_llm_call()
            .and_then(|()| self.check_texts("texts", &texts, ""))
        {
            return Ok(Err(convert::llm_error_out(e)));
        }
        let engine = self.binding.llm.clone();
        Ok(self
            .wait_llm(None, engine.embed(texts))
            .await
            .map_err(convert::llm_error_out))
    }

    async fn count_tokens(
        &mut self,
        text: String,
    ) -> wasmtime::Result<Result<u32, types::LlmError>> {
        let engine = self.binding.llm.clone();
        Ok(self
            .wait_llm(None, engine.count_tokens(text))
            .await
            .map_err(convert::llm_error_out))
    }
}
