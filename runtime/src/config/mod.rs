//! Typed configuration of the plugin host. In `ganglion.toml`:
//!
//! ```toml
//! [plugins]
//! dir = "target/plugins"          # every *.wasm component here is loaded
//! cache_dir = ".ganglion/compiled" # compiled artefacts, keyed by content and engine
//! cache_max_bytes = 1073741824     # past this, least recently used artefacts go; 0: no bound
//! cache_max_age_days = 30          # artefacts unused this long go; 0: no bound
//! perf_map_max_bytes = 0           # > 0: plugin function names for `perf`, up to this size
//!
//! [plugins.limits]
//! call_timeout_ms = 100        # guest time per stage call (host waits excluded)
//! max_memory_mib = 64          # all linear memories and tables of an instance together
//! max_output_bytes = 1048576   # data a call may return
//! fuel = 0                     # instructions per call; 0 = unmetered
//! max_instances = 8            # concurrent instances per plugin and rule
//! max_log_lines_per_call = 100
//! max_log_line_bytes = 4096    # longer lines are cut, with a marker
//! llm_timeout_ms = 30000       # how long a plugin may wait on one llm call
//! max_llm_calls_per_call = 16  # generate/classify/embed calls per stage call
//! max_llm_time_per_call_ms = 60000 # wall time in llm calls per stage call
//! max_texts_per_request = 64   # texts (embed) or labels (classify) per request
//! max_text_bytes_per_request = 65536 # bytes of all texts and labels of one request
//! load_timeout_ms = 0          # instantiation and an instance's first call; 0 = call_timeout_ms
//! max_plugin_memory_mib = 64   # the most a rule's `limits.max_memory_mib` may ask for
//! max_plugin_timeout_ms = 60000 # the most a rule's call or load timeout may ask for
//! ```
//!
//! A rule may set its own limits for one plugin, within those bounds
//! ([`PluginLimits`]): `limits = { max_memory_mib = 160, load_timeout_ms = 20000 }`.

mod admin;
mod limits;
mod mqtt;
mod paths;
mod remote;
mod serve;

pub use admin::AdminConfig;
pub use limits::{Limits, PluginLimits};
pub use mqtt::{Login, MqttSettings, OutputConnection, PasswordError, Protocol, host_name};
pub use remote::{EngineChoice, Fallback, RemoteConfig, SchemaFormat};
use serde::Deserialize;
pub use serve::ServeConfig;
use std::path::PathBuf;
use std::time::Duration;

/// The plugin host (`[plugins]`): where components are, the compile cache, limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Folder whose `*.wasm` components are loaded. Default `plugins`.
    pub dir: PathBuf,
    /// Where compiled artefacts are kept; none disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Total size of the artefacts in `cache_dir`, in bytes: at start and
    /// after each new artefact, the least recently used ones are removed
    /// until the rest fit (the newest is always kept). Every plugin version
    /// and every wasmtime upgrade leaves a new artefact, so without a bound
    /// the folder only grows. 0: no bound. Default 1 GiB.
    pub cache_max_bytes: u64,
    /// Artefacts not used (loaded or stored) for this many days are removed
    /// at the same times. 0: no bound. Default 30.
    pub cache_max_age_days: u64,
    /// Per-instance limits (`[plugins.limits]`).
    pub limits: Limits,
    /// Instance slots the engine reserves across all plugins.
    pub total_instances: u32,
    /// When above 0, each plugin's compiled functions are named in
    /// `/tmp/perf-<pid>.map`, so that `perf report` shows plugin code by
    /// function; nothing more is written once the file would pass this many
    /// bytes. A profiling aid, off (0) by default: see
    /// [`crate::plugin::perf_map`].
    pub perf_map_max_bytes: u64,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            dir: PathBuf::from("plugins"),
            cache_dir: Some(PathBuf::from(".ganglion/compiled")),
            cache_max_bytes: 1 << 30,
            cache_max_age_days: 30,
            limits: Limits::default(),
            total_instances: 256,
            perf_map_max_bytes: 0,
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

/// The `[audit]` table: where decisions are recorded and how much is
/// kept (see `crate::audit`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Record decisions (default true).
    pub enabled: bool,
    /// The live file; rotated files get `.1`, `.2`, ... appended.
    pub path: PathBuf,
    /// Size in MiB at which the file is rotated (default 16).
    pub max_mib: u64,
    /// Rotated files kept (default 4).
    pub keep: u32,
    /// Records that may wait for the writer thread (default 1024; 0 counts
    /// as 1). When the disk cannot keep up, further records are dropped and
    /// counted (`AuditLog::dropped`) rather than held in memory without
    /// bound or making the pipeline wait.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            path: PathBuf::from(".ganglion/audit.jsonl"),
            max_mib: 16,
            keep: 4,
            queue: 1024,
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
///
/// [rules.limits]       # bounds on what devices can make a rule hold
/// max_device_bytes = 128           # longer device ids are dead-lettered (`bad-device`)
/// max_windows = 10000              # open windows per rule; a new device past it is dead-lettered (`too-many-windows`)
/// max_window_readings = 10000      # a window this full runs at once, whatever its count
/// window_idle_seconds = 3600       # a window without a new reading this long runs (count-only windows too)
/// dead_letter_payload_bytes = 4096 # payload prefix a dead letter carries, with the length and BLAKE3 hash
/// persist_windows = true           # open windows are kept in the state store and survive a crash
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
    /// Bounds on windows, device ids and dead letters (`[rules.limits]`).
    pub limits: PipelineLimits,
}

/// Bounds on what devices can make a rule hold (`[rules.limits]`): devices
/// are untrusted, and every device id opens a window that holds memory
/// until it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineLimits {
    /// Longest device id, in bytes; longer ones are dead-lettered with kind
    /// `bad-device`, like ids holding `/`, `+`, `#`, `$` or control
    /// characters. Default 128.
    pub max_device_bytes: usize,
    /// Open windows per rule (one per device); readings of a further device
    /// are dead-lettered with kind `too-many-windows`. Default 10 000.
    pub max_windows: usize,
    /// Readings one window holds; a window that reaches it runs at once.
    /// Default 10 000.
    pub max_window_readings: usize,
    /// A window that has had no new reading for this long runs, also one
    /// that closes only by count; 0 never. Default 3600.
    pub window_idle_seconds: u64,
    /// Bytes of the payload a dead letter carries (with the payload's length
    /// and BLAKE3 hash), so that a large message cannot make a larger dead
    /// letter. Default 4096.
    pub dead_letter_payload_bytes: usize,
    /// Keep open windows in the state store (`[state] path`), so that a
    /// crash or kill loses no reading a window accepted: a message that adds
    /// to a window is acknowledged once the window is durable (at most
    /// `[state] flush_interval_ms` later). Default true.
    pub persist_windows: bool,
}

impl Default for PipelineLimits {
    fn default() -> Self {
        PipelineLimits {
            max_device_bytes: 128,
            max_windows: 10_000,
            max_window_readings: 10_000,
            window_idle_seconds: 3600,
            dead_letter_payload_bytes: 4096,
            persist_windows: true,
        }
    }
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: PathBuf::from("rules"),
            extra_dirs: Vec::new(),
            lanes: 4,
            lane_capacity: 64,
            limits: PipelineLimits::default(),
        }
    }
}

/// The embedded broker, used when `[mqtt] broker` is not set.
///
/// ```toml
/// [broker]
/// listen = "127.0.0.1:1883"
/// users = { sensor = "s3cret" }             # accounts (user name = password); none: anonymous
/// users_file = "/etc/ganglion/broker-users" # more accounts, `name:password` per line, read at start
/// ```
///
/// With no account, any client may connect, so the broker listens on a
/// loopback address only: any other `listen` is refused at start. With
/// accounts, every client must log in with one, and the gateway's own client
/// ids (`[mqtt] client_id` and its `-out` connection) are reserved to the
/// account the gateway uses (`[mqtt] username`, or an account made at each
/// start with a random password when that is unset).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Address the broker listens on. Default `127.0.0.1:1883`.
    pub listen: std::net::SocketAddr,
    /// Accounts, user name to password. Default none.
    pub users: std::collections::BTreeMap<String, String>,
    /// A file of more accounts, one `name:password` a line (blank lines and
    /// lines starting with `#` are skipped), read when the broker starts so
    /// passwords need not sit in this file. Default none.
    pub users_file: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 1883)),
            users: std::collections::BTreeMap::new(),
            users_file: None,
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
/// drain_timeout_ms = 8000  # how long a stop (Ctrl-C, SIGTERM) waits for messages in flight
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    /// How long `ganglion run`, once told to stop (Ctrl-C, SIGTERM, or the
    /// end of `--duration`), waits for the messages in flight to be
    /// published and acknowledged, in milliseconds. What is not done by
    /// then stays unacknowledged for the broker to deliver again, and the
    /// process exits with status 1 (a broker that is down never confirms
    /// anything, so without a limit the stop would wait for it forever).
    /// Keep it below the supervisor's own kill timeout (systemd's
    /// `TimeoutStopSec`, 90 s by default; docker's `stop` grace, 10 s by
    /// default, hence the default's 2 s margin). Default 8000.
    pub drain_timeout_ms: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            workers: 0,
            drain_timeout_ms: 8_000,
        }
    }
}

impl RuntimeConfig {
    /// [`Self::drain_timeout_ms`] as a [`Duration`].
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

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
    pub mqtt: MqttSettings,
    /// `[broker]`: the embedded broker, used when `[mqtt] broker` is not set.
    pub broker: BrokerConfig,
    /// `[reload]`: hot reload of plugins and rules.
    pub reload: ReloadConfig,
    /// The decision audit log (see [`AuditConfig`]).
    pub audit: AuditConfig,
    /// The language model (see [`ganglion_llm::EngineConfig`]).
    pub model: ganglion_llm::EngineConfig,
    /// `[runtime]`: the async runtime's threads.
    pub runtime: RuntimeConfig,
    /// `[admin]`: the HTTP admin endpoint of `ganglion run`.
    pub admin: AdminConfig,
    /// `[serve]`: the model as an OpenAI-compatible endpoint.
    pub serve: ServeConfig,
    /// `[remote.<name>]`: OpenAI-compatible servers rules can send their
    /// model calls to (see [`RemoteConfig`]).
    pub remote: std::collections::BTreeMap<String, RemoteConfig>,
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
    /// Relative paths in it (and the defaults, which are relative) are made
    /// relative to the file's folder ([`GanglionConfig::resolve_paths`]).
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config.resolve_paths(path.parent().unwrap_or(std::path::Path::new("")));
        Ok(config)
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
