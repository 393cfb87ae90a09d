//! Typed configuration of the plugin host. In `ganglion.toml`:
//!
//! ```toml
//! [plugins]
//! dir = "target/plugins"          # every *.wasm component here is loaded
//! cache_dir = ".ganglion/compiled" # compiled artefacts, keyed by content and engine
//!
//! [plugins.limits]
//! call_timeout_ms = 100        # guest time per stage call (host waits excluded)
//! max_memory_mib = 64          # linear memory per instance
//! max_output_bytes = 1048576   # data a call may return
//! fuel = 0                     # instructions per call; 0 = unmetered
//! max_instances = 8            # concurrent instances per plugin and rule
//! max_log_lines_per_call = 100
//! llm_timeout_ms = 30000       # how long a plugin may wait on one llm call
//! ```

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Resource limits applied to every plugin instance (`[plugins.limits]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Guest time per stage call, in milliseconds; time spent waiting on the
    /// host (e.g. `llm` calls) is not counted. Default 100.
    pub call_timeout_ms: u64,
    /// Cap on each linear memory of an instance, in MiB. Default 64.
    pub max_memory_mib: u64,
    /// Size of the data one call may return, in bytes. Default 1 MiB.
    pub max_output_bytes: usize,
    /// Fuel (roughly, Wasm instructions) per call; 0 disables metering. Default 0.
    pub fuel: u64,
    /// Concurrent instances per plugin and rule; further calls wait. Default 8.
    pub max_instances: u32,
    /// Log lines a call may emit; later lines are dropped and counted. Default 100.
    pub max_log_lines_per_call: u32,
    /// How long a plugin may wait on one `llm` call, in milliseconds; a
    /// shorter `deadline-ms` in the request wins. Default 30 000.
    pub llm_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_timeout_ms: 100,
            max_memory_mib: 64,
            max_output_bytes: 1 << 20,
            fuel: 0,
            max_instances: 8,
            max_log_lines_per_call: 100,
            llm_timeout_ms: 30_000,
        }
    }
}

impl Limits {
    /// [`Self::call_timeout_ms`] as a [`Duration`].
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// [`Self::max_memory_mib`] in bytes (saturating).
    pub fn max_memory_bytes(&self) -> usize {
        (self.max_memory_mib as usize).saturating_mul(1 << 20)
    }

    /// [`Self::llm_timeout_ms`] as a [`Duration`].
    pub fn llm_timeout(&self) -> Duration {
        Duration::from_millis(self.llm_timeout_ms)
    }
}

/// The plugin host (`[plugins]`): where components are, the compile cache, limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Folder whose `*.wasm` components are loaded. Default `plugins`.
    pub dir: PathBuf,
    /// Where compiled artefacts are kept; none disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Per-instance limits (`[plugins.limits]`).
    pub limits: Limits,
    /// Instance slots the engine reserves across all plugins.
    pub total_instances: u32,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            dir: PathBuf::from("plugins"),
            cache_dir: Some(PathBuf::from(".ganglion/compiled")),
            limits: Limits::default(),
            total_instances: 256,
        }
    }
}

/// WASI capabilities a rule grants one plugin; none by default. In a rule:
///
/// ```toml
/// [[preprocess]]
/// plugin = "lookup"
/// grants = { env = { SITE = "plant-3" }, dirs = [{ host = "/srv/ganglion/tables", guest = "/tables" }] }
/// ```
///
/// Directories are read-only unless `write = true`. Sockets are never granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Environment variables the plugin sees. Default empty.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Host directories mounted into the plugin. Default none.
    #[serde(default)]
    pub dirs: Vec<DirGrant>,
}

/// One host directory granted to a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// The directory on the host; must exist.
    pub host: PathBuf,
    /// Where the plugin sees it; must be an absolute path.
    pub guest: String,
    /// Whether the plugin may write to it. Default false (read-only).
    #[serde(default)]
    pub write: bool,
}

impl Grants {
    /// Checks that every granted directory exists on the host and that its
    /// guest path is absolute.
    pub fn validate(&self) -> Result<(), String> {
        for d in &self.dirs {
            if !d.host.is_dir() {
                return Err(format!(
                    "granted directory {} is not a directory",
                    d.host.display()
                ));
            }
            if !d.guest.starts_with('/') {
                return Err(format!(
                    "granted directory's guest path `{}` must be absolute",
                    d.guest
                ));
            }
        }
        Ok(())
    }
}

/// Where plugin state is kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The redb database file. Default `.ganglion/state.redb`.
    pub path: PathBuf,
    /// How often buffered writes are made durable, in milliseconds; a crash
    /// loses at most this much, and 0 makes every write durable. Default 100.
    pub flush_interval_ms: u64,
    /// Keys one plugin may hold per rule. Default 10 000.
    pub max_keys_per_scope: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            path: PathBuf::from(".ganglion/state.redb"),
            flush_interval_ms: 100,
            max_keys_per_scope: 10_000,
        }
    }
}

impl StateConfig {
    /// The store limits from this config; key and value size caps keep their defaults.
    pub fn limits(&self) -> crate::state::StateLimits {
        crate::state::StateLimits {
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            max_keys_per_scope: self.max_keys_per_scope,
            ..Default::default()
        }
    }
}

/// Where rule files are, and how many workers each rule gets.
///
/// ```toml
/// [rules]
/// dir = "examples/rules"
/// extra_dirs = ["examples/packs/traffic/rules"]
/// lanes = 4            # concurrent messages per rule (ordered per topic)
/// lane_capacity = 64   # queued messages per lane before intake waits
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Folder of rule files. Default `rules`.
    pub dir: PathBuf,
    /// More folders of rule files (scenario packs, say), loaded and watched
    /// like `dir`; rule names must be unique across all. Default none.
    pub extra_dirs: Vec<PathBuf>,
    /// Messages a rule processes concurrently, ordered per topic; 0 counts as 1. Default 4.
    pub lanes: usize,
    /// Messages queued per lane before intake waits; 0 counts as 1. Default 64.
    pub lane_capacity: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: PathBuf::from("rules"),
            extra_dirs: Vec::new(),
            lanes: 4,
            lane_capacity: 64,
        }
    }
}

/// The embedded broker, used when `[mqtt] broker` is not set.
///
/// ```toml
/// [broker]
/// listen = "127.0.0.1:1883"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Address the broker listens on. Default `127.0.0.1:1883`.
    pub listen: std::net::SocketAddr,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 1883)),
        }
    }
}

/// Hot reload of the plugins and rules folders while the gateway runs.
///
/// ```toml
/// [reload]
/// enabled = true
/// debounce_ms = 30   # quiet time after a change; a file must then be unchanged for as long again
/// poll_ms = 2000     # full rescan, in case the file system drops a notification
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Whether the folders are watched. Default true.
    pub enabled: bool,
    /// Quiet time after a change before it is applied, in milliseconds. Default 30.
    pub debounce_ms: u64,
    /// Interval of the full rescan, in milliseconds. Default 2000.
    pub poll_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            enabled: true,
            debounce_ms: 30,
            poll_ms: 2000,
        }
    }
}

impl ReloadConfig {
    /// [`Self::debounce_ms`] as a [`Duration`], at least 1 ms.
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms.max(1))
    }

    /// [`Self::poll_ms`] as a [`Duration`], at least 100 ms.
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms.max(100))
    }
}

/// The async runtime that `ganglion run` serves on.
///
/// ```toml
/// [runtime]
/// workers = 1   # threads for MQTT, the rules and plugin calls
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads; 0 or unset: one fewer than the cores, at least 1.
    /// The spare core is for the broker (mosquitto beside the gateway, or
    /// the embedded one, which has threads of its own): on 2 cores, one
    /// worker gave about 13 % more messages per second than two through a
    /// local mosquitto, and 14 % less CPU per message, since fewer threads
    /// then compete for the cores (docs/BENCHMARKS.md). The model's compute
    /// pool is sized apart (`[model] threads`).
    pub workers: usize,
}

impl RuntimeConfig {
    /// The worker threads to start.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .max(1)
    }
}

/// The whole `ganglion.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GanglionConfig {
    /// `[plugins]`: components, compile cache and limits.
    pub plugins: PluginConfig,
    /// `[state]`: the plugins' key–value store.
    pub state: StateConfig,
    /// `[rules]`: rule files and lanes.
    pub rules: RulesConfig,
    /// `[mqtt]`: the broker connection.
    pub mqtt: crate::mqtt::MqttSettings,
    /// `[broker]`: the embedded broker, used when `[mqtt] broker` is not set.
    pub broker: BrokerConfig,
    /// `[reload]`: hot reload of plugins and rules.
    pub reload: ReloadConfig,
    /// The decision audit log (see [`crate::audit::AuditConfig`]).
    pub audit: crate::audit::AuditConfig,
    /// The language model (see [`ganglion_llm::EngineConfig`]).
    pub model: ganglion_llm::EngineConfig,
    /// `[runtime]`: the async runtime's threads.
    pub runtime: RuntimeConfig,
}

/// Why [`GanglionConfig::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the config's fields.
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, with line and field.
        message: String,
    },
}

impl GanglionConfig {
    /// Reads a config file; errors name the file, and the line and field.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses config text; unset fields take their defaults, unknown fields are refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Parses a `grants` table on its own (as written inside a rule).
    pub fn parse_grants(text: &str) -> Result<Grants, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused_with_their_place() {
        let err =
            GanglionConfig::parse("[plugins.limits]\ncall_timeout_ms = 5\nmax_memroy_mib = 3\n")
                .unwrap_err();
        assert!(
            err.contains("max_memroy_mib") && err.contains("line 3"),
            "{err}"
        );
        let ok = GanglionConfig::parse("[plugins.limits]\ncall_timeout_ms = 5\n").unwrap();
        assert_eq!(ok.plugins.limits.call_timeout_ms, 5);
        assert_eq!(ok.plugins.limits.max_memory_mib, 64);
    }

    #[test]
    fn workers_default_to_one_fewer_than_the_cores() {
        let cores = std::thread::available_parallelism().unwrap().get();
        let default = GanglionConfig::parse("").unwrap().runtime;
        assert_eq!(default.worker_threads(), (cores - 1).max(1));
        let zero = GanglionConfig::parse("[runtime]\nworkers = 0\n").unwrap();
        assert_eq!(zero.runtime.worker_threads(), (cores - 1).max(1));
        let three = GanglionConfig::parse("[runtime]\nworkers = 3\n").unwrap();
        assert_eq!(three.runtime.worker_threads(), 3);
        let err = GanglionConfig::parse("[runtime]\nthreads = 3\n").unwrap_err();
        assert!(err.contains("threads") && err.contains("line 2"), "{err}");
    }
}
