//! [`InstancePool`]: one plugin in one rule, its instances kept warm
//! across calls, a faulted one replaced.

use super::{HostInner, Plugin};
use crate::host::{BindingCtx, CallError, Instance};
use crate::types::{Action, Completion, Context, Message, Prompt, ReadingBatch};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Serves one plugin in one rule. Calls run on pooled instances: at most
/// `max_instances` at once (later calls wait), an instance that faulted is
/// dropped and replaced by a fresh one on the next call.
pub struct InstancePool {
    pub(super) plugin: Arc<Plugin>,
    pub(super) binding: Arc<BindingCtx>,
    /// Keeps the engine and its epoch ticker alive while the pool is.
    pub(super) host: Arc<HostInner>,
    pub(super) idle: Mutex<Vec<Instance>>,
    pub(super) permits: Semaphore,
    pub(super) created: AtomicU64,
    pub(super) discarded: AtomicU64,
    pub(super) retired: AtomicU64,
    pub(super) calls: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) traps: AtomicU64,
    pub(super) deadlines: AtomicU64,
    pub(super) fuel: AtomicU64,
    pub(super) peak_memory: AtomicU64,
}

/// Counters of a pool, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Instances made since the pool was created.
    pub created: u64,
    /// Instances dropped after a fault.
    pub discarded: u64,
    /// Instances dropped after a successful call because their memory grew
    /// past three quarters of `max_memory_mib`.
    pub retired: u64,
    /// Instances waiting for a call now.
    pub idle: usize,
    /// Stage calls made (each ran on an instance).
    pub calls: u64,
    /// Calls that failed, for any reason (the plugin's own errors too).
    pub failed: u64,
    /// Calls that ended in a trap.
    pub traps: u64,
    /// Calls stopped at the guest-time deadline (`call_timeout_ms`).
    pub deadlines: u64,
    /// Log lines dropped by the per-call cap.
    pub suppressed_logs: u64,
    /// Fuel (instructions, roughly) the calls used; stays 0 while calls are
    /// unmetered (`[plugins.limits] fuel = 0`).
    pub fuel: u64,
    /// Bytes of memories and tables the idle instances hold now.
    pub memory_bytes: u64,
    /// The most bytes one instance held after a call.
    pub peak_memory_bytes: u64,
}

impl InstancePool {
    /// The plugin version this pool serves.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// A snapshot of the pool's counters.
    pub fn stats(&self) -> PoolStats {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        PoolStats {
            created: self.created.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            retired: self.retired.load(Ordering::Relaxed),
            idle: idle.len(),
            calls: self.calls.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            traps: self.traps.load(Ordering::Relaxed),
            deadlines: self.deadlines.load(Ordering::Relaxed),
            suppressed_logs: self.binding.suppressed_logs(),
            fuel: self.fuel.load(Ordering::Relaxed),
            memory_bytes: idle.iter().map(|i| i.memory_bytes() as u64).sum(),
            peak_memory_bytes: self.peak_memory.load(Ordering::Relaxed),
        }
    }

    async fn run<R>(
        &self,
        call: impl AsyncFnOnce(&mut Instance) -> Result<R, CallError>,
    ) -> Result<R, CallError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("pool semaphore is never closed");
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut instance = match idle {
            Some(i) => i,
            None => {
                self.created.fetch_add(1, Ordering::Relaxed);
                Instance::new(
                    &self.host.engine,
                    &self.plugin.exports,
                    self.binding.clone(),
                )
                .await?
            }
        };
        let result = call(&mut instance).await;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.fuel.fetch_add(instance.fuel_used(), Ordering::Relaxed);
        self.peak_memory
            .fetch_max(instance.memory_bytes() as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            match e {
                CallError::Trap(_) => self.traps.fetch_add(1, Ordering::Relaxed),
                CallError::Deadline { .. } => self.deadlines.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
        }
        if instance.is_poisoned() {
            self.discarded.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(plugin = %self.plugin.name, version = %self.plugin.version, rule = %self.binding.rule,
                error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(), "instance discarded after a fault");
        } else if instance.is_worn() {
            self.retired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(plugin = %self.plugin.name, version = %self.plugin.version, rule = %self.binding.rule,
                "instance retired: its memory grew past 3/4 of the cap");
        } else {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(instance);
        }
        result
    }

    /// Calls the `preprocess` stage: `readings` are the previous
    /// preprocessor's output (empty for the first).
    pub async fn preprocess(
        &self,
        message: &Message,
        readings: ReadingBatch,
    ) -> Result<ReadingBatch, CallError> {
        self.run(async |i: &mut Instance| i.preprocess(message, readings).await)
            .await
    }

    /// Calls the `template` stage: a window of readings to a prompt.
    pub async fn render(
        &self,
        context: &Context,
        window: ReadingBatch,
    ) -> Result<Prompt, CallError> {
        self.run(async |i: &mut Instance| i.render(context, window).await)
            .await
    }

    /// Calls the `postprocess` stage: a window, and the completion when the
    /// rule used the model, to actions.
    pub async fn postprocess(
        &self,
        context: &Context,
        window: ReadingBatch,
        completion: Option<&Completion>,
    ) -> Result<Vec<Action>, CallError> {
        self.run(async |i: &mut Instance| i.postprocess(context, window, completion).await)
            .await
    }

    /// Calls the `handler` stage: a message to actions.
    pub async fn handle(&self, rule: &str, message: &Message) -> Result<Vec<Action>, CallError> {
        self.run(async |i: &mut Instance| i.handle(rule, message).await)
            .await
    }
}
