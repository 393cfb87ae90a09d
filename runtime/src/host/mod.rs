//! The host side of the WIT contract: the store data of every plugin
//! instance, the host interfaces plugins import (`log`, `config`, `state`,
//! `llm`), and typed calls into the stage exports. Generated binding types
//! stop here; callers see only `crate::types`.
//!
//! Modelled on wasmtime's `wasi-config`: a context ([`BindingCtx`]), a view
//! ([`HostState`]) and one [`add_to_linker`].

mod convert;
mod imports;
mod instance;

pub use instance::{Exports, Instance};

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
    /// Time spent waiting on the host (llm), which the guest deadline excludes.
    pub host_wait: Duration,
    pub budget: Duration,
    pub logs: u32,
}

/// Records whether the guest hit the memory cap, so a following trap can be
/// reported as what it is.
pub(crate) struct MemoryLimiter {
    pub max_bytes: usize,
    pub denied: Option<usize>,
    /// The largest size any memory of the instance has grown to.
    pub largest: usize,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = Some(desired);
            return Ok(false);
        }
        self.largest = self.largest.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
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
            limiter: MemoryLimiter {
                max_bytes,
                denied: None,
                largest: 0,
            },
            clock: CallClock {
                started: Instant::now(),
                host_wait: Duration::ZERO,
                budget: binding.limits.call_timeout(),
                logs: 0,
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
    crate::bindings::AnyStage::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)
}
