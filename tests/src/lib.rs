//! Helpers for the integration tests: built plugins, hosts with test limits.

use ganglion::config::{Limits, PluginConfig};
use ganglion::llm::{LlmEngine, NoModel};
use ganglion::plugin::{InstancePool, Plugin, PluginHost};
use ganglion::state::StateStore;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Builds the example plugins and fixtures once per test process.
pub fn built() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        xtask::build_plugins().expect("building the plugins for wasm32-wasip2");
        (xtask::plugins_dir(), xtask::fixtures_dir())
    })
}

pub fn example(name: &str) -> PathBuf {
    built().0.join(format!("{name}.wasm"))
}

pub fn fixture(name: &str) -> PathBuf {
    built().1.join(format!("{name}.wasm"))
}

/// A `.wat` or other checked-in fixture file under tests/fixtures.
pub fn wat_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A host with no artefact cache, an in-memory state store and the given engine.
pub fn host_with(limits: Limits, llm: Arc<dyn LlmEngine>) -> PluginHost {
    let config = PluginConfig {
        cache_dir: None,
        limits,
        total_instances: 64,
        ..PluginConfig::default()
    };
    PluginHost::new(config, StateStore::in_memory(), llm).expect("plugin host")
}

pub fn host() -> PluginHost {
    host_with(Limits::default(), Arc::new(NoModel))
}

pub fn config(json: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    json.as_object().cloned().expect("config is a JSON object")
}

pub async fn load(host: &PluginHost, path: &Path) -> Arc<Plugin> {
    host.load_file(path)
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

pub async fn pool(
    host: &PluginHost,
    path: &Path,
    rule: &str,
    cfg: serde_json::Value,
) -> InstancePool {
    let plugin = load(host, path).await;
    host.pool(&plugin, rule, config(cfg))
}

/// A unique scratch directory under target/.
pub fn scratch(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = xtask::root()
        .join("target/test-scratch")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
