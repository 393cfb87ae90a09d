//! Loading plugins and calling them under limits.
//!
//! - [`PluginHost`] owns the wasmtime engine (pooling allocator, epoch
//!   interruption, async), the linker and the compiled-artefact cache, and
//!   loads components: compile on a blocking thread, check imports, detect
//!   stages, instantiate once to check export types.
//! - [`Plugin`] is one loaded version of a component, named by its file stem
//!   and identified by its content hash.
//! - [`InstancePool`] serves one plugin in one rule: it reuses instances
//!   across calls, discards any that trapped, and bounds concurrency.
//! - [`perf_map`] names plugin functions for Linux `perf` when
//!   `[plugins] perf_map_max_bytes` is set.

mod cache;
pub mod perf_map;
mod pool;

pub use cache::{ArtifactCache, CompileSource, Evicted};
pub use pool::{InstancePool, PoolStats};

use crate::config::{Limits, PluginConfig, PluginLimits};
pub use crate::host::CallError;
use crate::host::{self, BindingCtx, Exports, HostState, Instance, TICK};
use crate::llm::LlmEngine;
use crate::state::StateStore;
use crate::types::Stage;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Why a component could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The plugin name (the file stem) is empty or has characters other
    /// than lower-case letters, digits, `-` and `_`.
    #[error("{path}: plugin name `{name}` must be lower-case letters, digits, `-` or `_`")]
    BadName {
        /// The component file.
        path: PathBuf,
        /// The refused name.
        name: String,
    },
    /// The bytes do not compile as a component (e.g. a core module).
    #[error("{path}: not a valid WebAssembly component: {reason}")]
    Invalid {
        /// The component file.
        path: PathBuf,
        /// The compiler's message, or a hint for a core module.
        reason: String,
    },
    /// The component imports something the linker does not provide.
    #[error("{path}: imports what the host does not provide: {reason}")]
    Imports {
        /// The component file.
        path: PathBuf,
        /// The linker's message.
        reason: String,
    },
    /// The component exports no stage interface.
    #[error(
        "{path}: exports none of the stage interfaces (ganglion:plugin/preprocess, template, postprocess or handler @{version}); it exports: {exports}",
        version = crate::host::WIT_VERSION
    )]
    NoStage {
        /// The component file.
        path: PathBuf,
        /// What it exports instead, comma-separated, or `nothing`.
        exports: String,
    },
    /// The trial instantiation at load failed (export types, start function, limits).
    #[error("{path}: {reason}")]
    Instantiate {
        /// The component file.
        path: PathBuf,
        /// Why the instantiation failed.
        reason: CallError,
    },
}

impl LoadError {
    /// The file (or folder) the error is about.
    pub fn path(&self) -> &Path {
        match self {
            LoadError::Io { path, .. }
            | LoadError::BadName { path, .. }
            | LoadError::Invalid { path, .. }
            | LoadError::Imports { path, .. }
            | LoadError::NoStage { path, .. }
            | LoadError::Instantiate { path, .. } => path,
        }
    }
}

/// Why [`PluginHost::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The engine could not be built from the config, the linker could not
    /// be set up, or the epoch thread could not start.
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
    /// The compiled-artefact cache folder could not be created.
    #[error("compiled-artefact cache {path}: {source}")]
    Cache {
        /// The cache folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The identity of one loaded version of a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginVersion {
    /// blake3 of the component bytes, hex.
    pub hash: String,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
}

impl fmt::Display for PluginVersion {
    /// The first 12 hex digits of the content hash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hash[..12])
    }
}

/// One loaded version of a component.
pub struct Plugin {
    /// The plugin's name (the file stem when loaded from a file): lower-case
    /// letters, digits, `-` and `_`.
    pub name: String,
    /// Which version of the plugin this is.
    pub version: PluginVersion,
    /// The stages the component exports, in pipeline order.
    pub stages: Vec<Stage>,
    /// Where it was loaded from, if from a file.
    pub source: Option<PathBuf>,
    /// Size of the component in bytes.
    pub size: usize,
    /// Interfaces the component imports.
    pub imports: Vec<String>,
    /// Whether it was compiled now or taken from the artefact cache.
    pub compiled: CompileSource,
    /// Time to compile or to load the compiled artefact.
    pub load_time: Duration,
    exports: Exports,
}

impl Plugin {
    /// True when the component exports `stage`.
    pub fn implements(&self, stage: Stage) -> bool {
        self.stages.contains(&stage)
    }
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("stages", &self.stages)
            .finish()
    }
}

struct HostInner {
    engine: Engine,
    linker: Linker<HostState>,
    config: PluginConfig,
    state: StateStore,
    llm: Arc<dyn LlmEngine>,
    cache: Option<ArtifactCache>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// Loads plugins and makes instance pools; cheap to clone.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<HostInner>,
}

/// Result of loading a folder: what loaded, and what did not and why.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// The plugins that loaded, in file-name order.
    pub plugins: Vec<Arc<Plugin>>,
    /// One error per file that did not load.
    pub errors: Vec<LoadError>,
}

fn engine_config(config: &PluginConfig) -> Config {
    let limits = &config.limits;
    let mut pool = PoolingAllocationConfig::default();
    let total = config.total_instances.max(1);
    pool.total_component_instances(total)
        // A componentize-py component instantiates 14 core modules (CPython,
        // its libc, adapters), a jco one 4 to 8; every component slot gets
        // room for 16, so the pool holds `total` Python instances as well as
        // Rust ones. Slots are counted, not reserved, so this costs nothing
        // until used.
        .max_core_instances_per_component(64)
        .max_memories_per_component(16)
        .max_tables_per_component(64)
        .total_core_instances(total * 16)
        .total_memories(total * 2)
        .total_tables(total * 8)
        .total_stacks(total)
        // Every memory may grow to the largest cap a rule may set; each
        // instance's own cap (`MemoryLimiter`) stops it earlier. Address
        // space per slot is reserved whatever this is, and pages are
        // committed only as a guest grows, so a larger bound costs nothing
        // until a plugin uses it.
        .max_memory_size(limits.pool_memory_bytes());
    let mut cfg = Config::new();
    cfg.epoch_interruption(true)
        .consume_fuel(limits.fuel > 0)
        .wasm_component_model(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    cfg
}

impl PluginHost {
    /// Builds the engine and starts its epoch ticker thread.
    pub fn new(
        config: PluginConfig,
        state: StateStore,
        llm: Arc<dyn LlmEngine>,
    ) -> Result<Self, HostError> {
        let engine = Engine::new(&engine_config(&config))
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let cache = match &config.cache_dir {
            Some(dir) => Some(
                ArtifactCache::new(dir, &engine)
                    .map_err(|source| HostError::Cache {
                        path: dir.clone(),
                        source,
                    })?
                    .bounded(config.cache_max_bytes, config.cache_max_age_days),
            ),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (ticker_engine, ticker_stop) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("ganglion-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| HostError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(PluginHost {
            inner: Arc::new(HostInner {
                engine,
                linker,
                config,
                state,
                llm,
                cache,
                stop_ticker: stop,
            }),
        })
    }

    /// The wasmtime engine all plugins are compiled for.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The limits every instance runs under.
    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    /// The state store plugins and rule windows persist in.
    pub fn state(&self) -> &StateStore {
        &self.inner.state
    }

    /// Clears what `plugin` keeps in its `state` store for `rule`.
    pub fn clear_state(&self, plugin: &str, rule: &str) -> Result<(), crate::state::StateError> {
        self.inner.state.clear_scope(plugin, rule)
    }

    /// Loads every `*.wasm` file in `dir` (sorted by name). A file that fails
    /// is reported in the result and does not stop the others.
    pub async fn load_dir(&self, dir: &Path) -> Result<LoadReport, LoadError> {
        let io = |source| LoadError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut entries = tokio::fs::read_dir(dir).await.map_err(io)?;
        let mut paths = Vec::new();
        while let Some(e) = entries.next_entry().await.map_err(io)? {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "wasm")
                && e.file_type().await.map(|t| !t.is_dir()).unwrap_or(false)
            {
                paths.push(p);
            }
        }
        paths.sort();
        let mut report = LoadReport::default();
        for p in paths {
            match self.load_file(&p).await {
                Ok(plugin) => report.plugins.push(plugin),
                Err(e) => report.errors.push(e),
            }
        }
        Ok(report)
    }

    /// Loads one component file; the plugin is named by the file stem.
    pub async fn load_file(&self, path: &Path) -> Result<Arc<Plugin>, LoadError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| LoadError::Io {
                path: path.to_owned(),
                source,
            })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.load_bytes(&name, bytes, path).await
    }

    /// Loads a component from memory; `path` names it in errors.
    pub async fn load_bytes(
        &self,
        name: &str,
        bytes: Vec<u8>,
        path: &Path,
    ) -> Result<Arc<Plugin>, LoadError> {
        let hash = blake3::hash(&bytes);
        self.load_hashed(name, bytes, hash, path).await
    }

    /// Like [`PluginHost::load_bytes`], for a caller that already hashed the
    /// bytes (blake3), so a large component is not hashed twice.
    pub async fn load_hashed(
        &self,
        name: &str,
        bytes: Vec<u8>,
        hash: blake3::Hash,
        path: &Path,
    ) -> Result<Arc<Plugin>, LoadError> {
        let path = path.to_owned();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(LoadError::BadName {
                path,
                name: name.to_owned(),
            });
        }
        let hash = hash.to_hex().to_string();
        let size = bytes.len();
        let inner = self.inner.clone();
        let hash2 = hash.clone();
        let started = Instant::now();
        let plugin_name = name.to_owned();
        let compiled = tokio::task::spawn_blocking(move || {
            let compiled = match &inner.cache {
                Some(cache) => cache.load_or_compile(&inner.engine, &hash2, &bytes),
                None => Component::new(&inner.engine, &bytes).map(|c| (c, CompileSource::Compiled)),
            };
            let max = inner.config.perf_map_max_bytes;
            if max > 0
                && let Ok((component, _)) = &compiled
            {
                perf_map::record(&plugin_name, component, max);
            }
            compiled
        })
        .await
        .map_err(|e| LoadError::Invalid {
            path: path.clone(),
            reason: format!("compiler thread failed: {e}"),
        })?;
        let (component, source) = compiled.map_err(|e| LoadError::Invalid {
            path: path.clone(),
            reason: invalid_reason(&e),
        })?;
        let load_time = started.elapsed();
        let engine = &self.inner.engine;
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_owned()).collect();
        let pre =
            self.inner
                .linker
                .instantiate_pre(&component)
                .map_err(|e| LoadError::Imports {
                    path: path.clone(),
                    reason: format!("{e:#}"),
                })?;
        let exports = Exports::new(pre);
        let stages = exports.stages();
        if stages.is_empty() {
            let names: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_owned()).collect();
            let exports = if names.is_empty() {
                "nothing".to_owned()
            } else {
                names.join(", ")
            };
            return Err(LoadError::NoStage { path, exports });
        }
        let plugin = Arc::new(Plugin {
            name: name.to_owned(),
            version: PluginVersion {
                hash,
                loaded_at: SystemTime::now(),
            },
            stages,
            source: Some(path.clone()),
            size,
            imports,
            compiled: source,
            load_time,
            exports,
        });
        // Instantiate once: checks export types and that instantiation
        // itself succeeds within the limits.
        let probe = self.binding(
            &plugin,
            "(load check)",
            serde_json::Map::new(),
            Default::default(),
            self.inner.config.limits.clone(),
            self.inner.llm.clone(),
        );
        Instance::new(engine, &plugin.exports, probe)
            .await
            .map_err(|reason| LoadError::Instantiate { path, reason })?;
        tracing::debug!(plugin = %plugin.name, version = %plugin.version, stages = ?plugin.stages, ?source, ?load_time, "plugin loaded");
        Ok(plugin)
    }

    fn binding(
        &self,
        plugin: &Plugin,
        rule: &str,
        config: serde_json::Map<String, serde_json::Value>,
        grants: crate::config::Grants,
        limits: Limits,
        llm: Arc<dyn LlmEngine>,
    ) -> Arc<BindingCtx> {
        Arc::new(BindingCtx {
            plugin: plugin.name.clone(),
            version: plugin.version.to_string(),
            rule: rule.to_owned(),
            config_json: serde_json::Value::Object(config.clone()).to_string(),
            config,
            state: self.inner.state.scope(&plugin.name, rule),
            limits,
            grants,
            llm,
            suppressed_logs: AtomicU64::new(0),
        })
    }

    /// An instance pool serving `plugin` in `rule` with the rule's settings
    /// for it and no WASI capabilities.
    pub fn pool(
        &self,
        plugin: &Arc<Plugin>,
        rule: &str,
        config: serde_json::Map<String, serde_json::Value>,
    ) -> InstancePool {
        let limits = self.inner.config.limits.clone();
        let llm = self.inner.llm.clone();
        self.make_pool(plugin, rule, config, Default::default(), limits, llm)
    }

    /// Like [`PluginHost::pool`], with the capabilities the rule grants the plugin.
    pub fn pool_with_grants(
        &self,
        plugin: &Arc<Plugin>,
        rule: &str,
        config: serde_json::Map<String, serde_json::Value>,
        grants: crate::config::Grants,
    ) -> Result<InstancePool, String> {
        self.pool_for_rule(plugin, rule, config, grants, &PluginLimits::default())
    }

    /// Like [`PluginHost::pool_with_grants`], with the rule's limits for the
    /// plugin applied over `[plugins.limits]`.
    ///
    /// # Errors
    ///
    /// A grant that is not a directory or not absolute, or a limit over its
    /// bound in `[plugins.limits]`; the message names it.
    pub fn pool_for_rule(
        &self,
        plugin: &Arc<Plugin>,
        rule: &str,
        config: serde_json::Map<String, serde_json::Value>,
        grants: crate::config::Grants,
        limits: &PluginLimits,
    ) -> Result<InstancePool, String> {
        let llm = self.inner.llm.clone();
        self.pool_with_engine(plugin, rule, config, grants, limits, llm)
    }

    /// Like [`PluginHost::pool_for_rule`], with the plugin's `llm` calls
    /// going to `llm` (the rule's engine) rather than the host's.
    ///
    /// # Errors
    ///
    /// As [`PluginHost::pool_for_rule`].
    pub fn pool_with_engine(
        &self,
        plugin: &Arc<Plugin>,
        rule: &str,
        config: serde_json::Map<String, serde_json::Value>,
        grants: crate::config::Grants,
        limits: &PluginLimits,
        llm: Arc<dyn LlmEngine>,
    ) -> Result<InstancePool, String> {
        let limits = self.inner.config.limits.with(limits)?;
        grants.validate()?;
        let grants = bind_grants(grants)?;
        Ok(self.make_pool(plugin, rule, config, grants, limits, llm))
    }

    fn make_pool(
        &self,
        plugin: &Arc<Plugin>,
        rule: &str,
        config: serde_json::Map<String, serde_json::Value>,
        grants: crate::config::Grants,
        limits: Limits,
        llm: Arc<dyn LlmEngine>,
    ) -> InstancePool {
        let binding = self.binding(plugin, rule, config, grants, limits, llm);
        let max = binding.limits.max_instances.max(1) as usize;
        InstancePool {
            plugin: plugin.clone(),
            binding,
            host: self.inner.clone(),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max),
            created: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            traps: AtomicU64::new(0),
            deadlines: AtomicU64::new(0),
            fuel: AtomicU64::new(0),
            peak_memory: AtomicU64::new(0),
        }
    }
}

/// The grants with each directory's host path made canonical (absolute,
/// symbolic links resolved) once, when the rule binds the plugin: instances
/// made later open that directory, so a link swapped afterwards cannot point
/// the plugin at another one. A path that is not a directory is refused.
fn bind_grants(mut grants: crate::config::Grants) -> Result<crate::config::Grants, String> {
    for d in &mut grants.dirs {
        let host = std::fs::canonicalize(&d.host)
            .map_err(|e| format!("granted directory {}: {e}", d.host.display()))?;
        if !host.is_dir() {
            return Err(format!(
                "granted directory {} is not a directory",
                d.host.display()
            ));
        }
        d.host = host;
    }
    Ok(grants)
}

fn invalid_reason(e: &wasmtime::Error) -> String {
    let text = format!("{e:#}");
    if text.contains("parse a wasm module with a component parser")
        || text.contains("expected a WebAssembly component")
    {
        "it is a core WebAssembly module, not a component (build for wasm32-wasip2, or wrap it with `wasm-tools component new`)".into()
    } else {
        text
    }
}
