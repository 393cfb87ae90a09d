//! The host side of the WIT contract: the store data of every plugin
//! instance, the host interfaces plugins import (`log`, `config`, `state`,
//! `llm`), and typed calls into the stage exports. Generated binding types
//! stop here; callers see only `crate::types`.
//!
//! Modelled on wasmtime's `wasi-config`: a context ([`BindingCtx`]), a view
//! ([`HostState`]) and one [`add_to_linker`].
//!
//! Each WIT version has its own module ([`v0_1_0`]) holding its `bindgen!`
//! and conversions.

mod error;
mod imports;
mod instance;
pub mod v0_1_0;

pub use error::CallError;
pub(crate) use error::TICK;
pub use instance::{Exports, Instance};
// The newest version the host serves, which `ganglion new` scaffolds for.
pub use v0_1_0::{PACKAGE, WIT_VERSION};

use crate::config::Limits;
use crate::llm::LlmEngine;
use crate::state::StateScope;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// What an instance serves: one plugin version in one rule, with that rule's
/// settings for the plugin. Constant for the instance's life.
pub struct BindingCtx {
    /// The plugin's name, for logs and the state scope.
    pub plugin: String,
    /// The plugin version's short hash, for logs.
    pub version: String,
    /// The rule's name.
    pub rule: String,
    /// The rule's settings for the plugin, served by `config.get`.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// The same settings as one JSON object, served by `config.get-json`.
    pub config_json: String,
    /// The plugin's `state` entries in this rule.
    pub state: StateScope,
    /// The limits each call runs under.
    pub limits: Limits,
    /// The WASI capabilities the rule grants the plugin.
    pub grants: crate::config::Grants,
    /// The engine behind the `llm` interface.
    pub llm: Arc<dyn LlmEngine>,
    /// Log lines dropped by the per-call cap, over the binding's life.
    pub suppressed_logs: AtomicU64,
}

impl BindingCtx {
    /// Log lines dropped so far (reads the `suppressed_logs` counter).
    pub fn suppressed_logs(&self) -> u64 {
        self.suppressed_logs.load(Ordering::Relaxed)
    }
}

/// Accounting for the call in progress.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallClock {
    pub started: Instant,
    /// Time spent waiting on the host (llm), or for the executor after a
    /// yield, which the guest deadline excludes.
    pub host_wait: Duration,
    /// When the deadline was last checked (the call's start, then each
    /// epoch callback).
    pub last_check: Instant,
    pub budget: Duration,
    pub logs: u32,
    /// `generate`, `classify` and `embed` calls made (refused ones included),
    /// checked against `max_llm_calls_per_call`.
    pub llm_calls: u32,
    /// Wall time spent in `llm` calls, checked against `max_llm_time_per_call_ms`.
    pub llm_time: Duration,
}

/// Bytes a table element is counted as: one pointer (a `funcref` or
/// `externref` slot), so that tables share the memory cap.
const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

/// Enforces `max_memory_mib` on the sum of all linear memories and tables of
/// an instance, and records whether the guest hit it so that a following
/// trap can be reported as what it is. A cap per memory alone would let a
/// component with 16 memories take 16 times the cap.
pub(crate) struct MemoryLimiter {
    pub max_bytes: usize,
    /// The total the refused growth asked for.
    pub denied: Option<usize>,
    /// Bytes of all memories and tables of the instance now. Never lowered:
    /// a store's memories only grow, and a growth that fails after approval
    /// (the host out of memory) stays counted, erring on the safe side.
    pub total: usize,
}

impl MemoryLimiter {
    fn new(max_bytes: usize) -> Self {
        MemoryLimiter {
            max_bytes,
            denied: None,
            total: 0,
        }
    }

    /// Approves growing one memory or table from `current` to `desired`
    /// bytes when the instance's total stays within the cap. A growth past
    /// the memory's or table's own `maximum` is refused here, uncounted,
    /// since wasmtime would fail it after approval.
    fn grow(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> bool {
        if maximum.is_some_and(|m| desired > m) {
            return false;
        }
        let total = self.total.saturating_add(desired.saturating_sub(current));
        if total > self.max_bytes {
            self.denied = Some(total);
            return false;
        }
        self.total = total;
        true
    }
}

/// Elements one table may have, whatever the memory cap leaves.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(current, desired, maximum))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        let bytes = |elements: usize| elements.saturating_mul(TABLE_ELEMENT_BYTES);
        Ok(self.grow(bytes(current), bytes(desired), maximum.map(bytes)))
    }
}

/// The data of one instance's store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) binding: Arc<BindingCtx>,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) clock: CallClock,
}

impl HostState {
    /// A state with no WASI capabilities — no files, environment, arguments,
    /// sockets or stdio; clocks and random numbers only — beyond what the
    /// binding's grants give (environment variables, directories).
    pub fn new(binding: Arc<BindingCtx>) -> Self {
        let mut wasi = WasiCtx::builder();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (k, v) in &binding.grants.env {
            wasi.env(k, v);
        }
        for d in &binding.grants.dirs {
            let perms = if d.write {
                wasmtime_wasi::FsPerms::ReadWrite
            } else {
                wasmtime_wasi::FsPerms::ReadOnly
            };
            // Checked when the pool was made; a directory removed since then is left out.
            if let Err(e) = wasi.preopened_dir(&d.host, &d.guest, perms) {
                tracing::warn!(plugin = %binding.plugin, dir = %d.host.display(), error = %e, "granted directory not available");
            }
        }
        let wasi = wasi.build();
        let max_bytes = binding.limits.max_memory_bytes();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(max_bytes),
            clock: CallClock {
                started: Instant::now(),
                host_wait: Duration::ZERO,
                last_check: Instant::now(),
                budget: binding.limits.call_timeout(),
                logs: 0,
                llm_calls: 0,
                llm_time: Duration::ZERO,
            },
            binding,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Adds WASI (without capabilities, see [`HostState::new`]) and the Ganglion
/// host interfaces to `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    v0_1_0::bindings::AnyStage::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)
}

#[cfg(test)]
mod tests;
