//! The host interfaces plugins import.

use super::HostState;
use super::convert;
use crate::bindings::ganglion::plugin::{config, llm, log, state, types};
use crate::llm::GenerateRequest;
use crate::types::LlmError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        self.clock.logs += 1;
        let b = &self.binding;
        if self.clock.logs > b.limits.max_log_lines_per_call {
            b.suppressed_logs.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
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
    /// Runs a host wait with the llm timeout; its duration is excluded from
    /// the guest's deadline (epoch deadlines do not see host waits).
    async fn wait_llm<T>(
        &mut self,
        deadline_ms: Option<u32>,
        f: crate::llm::LlmFuture<'_, T>,
    ) -> Result<T, LlmError> {
        let mut limit = self.binding.limits.llm_timeout();
        if let Some(ms) = deadline_ms {
            limit = limit.min(Duration::from_millis(u64::from(ms)));
        }
        let start = Instant::now();
        let result = match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(LlmError::DeadlineExceeded),
        };
        self.clock.host_wait += start.elapsed();
        result
    }
}

impl llm::Host for HostState {
    async fn generate(
        &mut self,
        input: llm::Input,
        params: types::GenerationParams,
    ) -> wasmtime::Result<Result<types::Completion, types::LlmError>> {
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
