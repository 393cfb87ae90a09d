//! Hot reload of the plugins and rules folders while messages flow.
//!
//! How a change is taken:
//! - notify reports events in either folder, and in their parents so that a
//!   folder replaced as a whole is watched again; a full rescan also runs
//!   every `poll_ms`, in case the file system drops a notification.
//! - After `debounce_ms` without events the folders are scanned. A file is
//!   taken only once its size, modification time and inode are the same in
//!   two scans `debounce_ms` apart, so a file written in several chunks is
//!   read once it is complete. Only `*.wasm` and `*.toml` files whose name
//!   does not start with `.` count: editors' swap, backup and temporary
//!   files do not.
//! - A plugin is compiled on a blocking thread (from the artefact cache when
//!   it holds the content hash) and instantiated once; then every rule that
//!   uses it is bound to the new version; only if all of that succeeds are
//!   the rules swapped ([`Gateway::install`]). Messages already in a stage
//!   finish on the old version. A rule file is parsed and bound the same
//!   way; a removed rule is drained and unsubscribed ([`Gateway::remove`]).
//! - Whatever is refused leaves the previous version running, is logged
//!   with file and cause, and is reported as a [`ReloadEvent`] (the `ganglion`
//!   binary publishes those on `<status topic>/reload`). The same content is
//!   not tried again until the file changes, or, for a rule, until a plugin
//!   it names is loaded.
//! - A removed plugin file unregisters the plugin for new bindings; rules
//!   that use it keep running the version they have (the event names them).
//!   A folder that disappears changes nothing until it is back.

mod apply;
#[cfg(feature = "reload")]
mod events;
mod scan;
mod watcher;

use scan::{Stat, read_folder, scan, stem};
pub use watcher::{ReloadHandle, publish_events};

use crate::config::ReloadConfig;
use crate::gateway::Gateway;
use crate::llm::LlmEngine;
use crate::pipeline::RulePipeline;
use crate::plugin::{Plugin, PluginHost};
use crate::rules::Rule;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{broadcast, mpsc, watch};

/// What a reload event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    /// A `*.wasm` component in the plugins folder.
    Plugin,
    /// A `*.toml` rule in the rules folder.
    Rule,
}

/// What happened to the file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadAction {
    /// A new plugin or rule now serves.
    Loaded,
    /// A new version replaced a running one.
    Replaced,
    /// The file is gone: the rule was drained, or the plugin unregistered.
    Removed,
    /// The content was not taken; the previous version (if any) runs on.
    Refused,
}

/// One change taken or refused, as published on the status topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReloadEvent {
    /// Whether the file is a plugin or a rule.
    pub kind: FileKind,
    /// What was done with it.
    pub action: ReloadAction,
    /// The file's path in the plugins or rules folder.
    pub file: PathBuf,
    /// The plugin's or the rule's name.
    pub name: String,
    /// For a plugin, the first 12 hex digits of its content hash.
    pub version: Option<String>,
    /// The rules the change applies to: rebound to a new plugin version,
    /// or still running a removed plugin.
    pub rules: Vec<String>,
    /// Why the content was refused, naming the file; set only for
    /// [`ReloadAction::Refused`].
    pub error: Option<String>,
    /// When the change was taken, ms since the Unix epoch.
    pub timestamp: i64,
}

impl ReloadEvent {
    /// The event as a JSON object, as [`publish_events`] publishes it.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why a folder is not watched. Only logged: the periodic rescan still
/// takes its changes.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// notify could not watch the folder.
    #[error("cannot watch {path}: {reason}")]
    Watch {
        /// The folder.
        path: PathBuf,
        /// notify's error.
        reason: String,
    },
}

struct Applied {
    stat: Stat,
    hash: blake3::Hash,
}

struct Refused {
    hash: blake3::Hash,
    /// For a rule: the plugins it names; loading one of them retries it.
    plugins: Vec<String>,
}

#[derive(Default)]
struct Tracked {
    /// The registry: the version of each plugin new bindings get.
    plugins: HashMap<String, Arc<Plugin>>,
    plugin_files: HashMap<PathBuf, Applied>,
    rules: HashMap<PathBuf, (Rule, Applied)>,
    /// Each file's state at the previous scan.
    seen: HashMap<PathBuf, Stat>,
    refused: HashMap<PathBuf, Refused>,
}

/// Loads the plugins and rules folders and keeps the gateway in step with
/// them.
pub struct Reloader {
    host: PluginHost,
    engines: crate::llm::Engines,
    plugins_dir: PathBuf,
    /// The rules folder and any more (`[rules] extra_dirs`).
    rules_dirs: Vec<PathBuf>,
    tracked: tokio::sync::Mutex<Tracked>,
    events: broadcast::Sender<ReloadEvent>,
    audit: Option<crate::audit::AuditLog>,
    limits: crate::config::PipelineLimits,
    /// `[mqtt] share_group`: windowed rules must then opt out of sharing.
    share_group: Option<String>,
}

impl Reloader {
    /// A reloader for these folders, binding rules to `llm`; nothing is read
    /// before [`Reloader::load_all`].
    pub fn new(
        host: PluginHost,
        plugins_dir: &Path,
        rules_dir: &Path,
        llm: Arc<dyn LlmEngine>,
    ) -> Reloader {
        let (events, _) = broadcast::channel(256);
        Reloader {
            host,
            engines: crate::llm::Engines::local(llm),
            plugins_dir: plugins_dir.to_owned(),
            rules_dirs: vec![rules_dir.to_owned()],
            tracked: tokio::sync::Mutex::new(Tracked::default()),
            events,
            audit: None,
            limits: crate::config::PipelineLimits::default(),
            share_group: None,
        }
    }

    /// Also loads and watches the rules in these folders (rule names must be
    /// unique across all of them).
    pub fn with_extra_rule_dirs(mut self, dirs: &[PathBuf]) -> Self {
        self.rules_dirs.extend(dirs.iter().cloned());
        self
    }

    /// Binds each rule to the engine its `engine` key names among
    /// `engines` (the default one when it names none), instead of the one
    /// given to [`Reloader::new`].
    pub fn with_engines(mut self, engines: crate::llm::Engines) -> Self {
        self.engines = engines;
        self
    }

    /// Records the model decisions of every rule it binds in `audit`.
    pub fn with_audit(mut self, audit: Option<crate::audit::AuditLog>) -> Self {
        self.audit = audit;
        self
    }

    /// Binds every rule under `limits` (`[rules.limits]`).
    pub fn with_limits(mut self, limits: crate::config::PipelineLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Refuses rules that a share group would split
    /// ([`Rule::check_sharing`]).
    pub fn with_share_group(mut self, group: Option<String>) -> Self {
        self.share_group = group;
        self
    }

    /// Every change taken or refused from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ReloadEvent> {
        self.events.subscribe()
    }

    /// The version of each plugin new bindings get.
    pub async fn plugins(&self) -> Vec<Arc<Plugin>> {
        let mut p: Vec<Arc<Plugin>> = self
            .tracked
            .lock()
            .await
            .plugins
            .values()
            .cloned()
            .collect();
        p.sort_by(|a, b| a.name.cmp(&b.name));
        p
    }

    /// Binds a rule to the plugins registered now (for rules installed
    /// programmatically rather than from the rules folder).
    pub async fn bind(&self, rule: Rule) -> Result<RulePipeline, crate::pipeline::BindError> {
        rule.check_sharing(self.share_group.as_deref())
            .map_err(crate::pipeline::BindError::Sharing)?;
        let t = self.tracked.lock().await;
        self.pipeline(rule, &t.plugins)
            .map(|p| p.with_audit(self.audit.clone()).with_limits(self.limits))
    }

    /// Loads both folders and binds the rules; returns the pipelines and
    /// every problem found (a bad file never stops the others). What is
    /// loaded is tracked, so that [`Reloader::watch`] then applies changes only.
    pub async fn load_all(&self) -> (Vec<RulePipeline>, Vec<String>) {
        let mut t = self.tracked.lock().await;
        let mut problems = Vec::new();
        for (path, stat, bytes, hash) in
            read_folder(&mut t, &self.plugins_dir, "wasm", "plugins", &mut problems)
        {
            match self
                .host
                .load_hashed(&stem(&path), bytes, hash, &path)
                .await
            {
                Ok(plugin) => {
                    t.plugins.insert(plugin.name.clone(), plugin);
                    t.plugin_files.insert(path, Applied { stat, hash });
                }
                Err(e) => {
                    problems.push(e.to_string());
                    let plugins = Vec::new();
                    t.refused.insert(path, Refused { hash, plugins });
                }
            }
        }
        let mut pipelines = Vec::new();
        let mut files = Vec::new();
        for dir in &self.rules_dirs {
            files.extend(read_folder(&mut t, dir, "toml", "rules", &mut problems));
        }
        for (path, stat, bytes, hash) in files {
            match self.bind_rule(&t, &path, &bytes) {
                Ok(p) => {
                    t.rules
                        .insert(path, ((*p.rule).clone(), Applied { stat, hash }));
                    pipelines.push(p);
                }
                Err((reason, plugins)) => {
                    problems.push(reason);
                    t.refused.insert(path, Refused { hash, plugins });
                }
            }
        }
        (pipelines, problems)
    }

    /// Parses and binds a rule file against the registry. On error: the
    /// reason (naming the file) and the plugins the rule names, if known.
    fn bind_rule(
        &self,
        t: &Tracked,
        path: &Path,
        bytes: &[u8],
    ) -> Result<RulePipeline, (String, Vec<String>)> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            (
                format!("{}: not UTF-8 text: {e}", path.display()),
                Vec::new(),
            )
        })?;
        let rule =
            Rule::parse(text, &stem(path), Some(path)).map_err(|e| (e.to_string(), Vec::new()))?;
        let plugins: Vec<String> = rule.plugins().into_iter().map(str::to_owned).collect();
        rule.check_sharing(self.share_group.as_deref())
            .map_err(|e| (format!("{}: {e}", path.display()), plugins.clone()))?;
        if let Some((other, _)) = t
            .rules
            .iter()
            .find(|(p, (r, _))| p.as_path() != path && r.name == rule.name)
        {
            return Err((
                format!(
                    "{}: another file ({}) already defines rule `{}`",
                    path.display(),
                    other.display(),
                    rule.name
                ),
                plugins,
            ));
        }
        self.pipeline(rule, &t.plugins)
            .map(|p| p.with_audit(self.audit.clone()).with_limits(self.limits))
            .map_err(|e| (format!("{}: {e}", path.display()), plugins))
    }

    /// `rule` bound to `plugins` and to the engine it names.
    fn pipeline(
        &self,
        rule: Rule,
        plugins: &HashMap<String, Arc<Plugin>>,
    ) -> Result<RulePipeline, crate::pipeline::BindError> {
        let llm = self
            .engines
            .select(rule.engine.as_ref())
            .map_err(|reason| crate::pipeline::BindError::Engine {
                rule: rule.name.clone(),
                reason,
            })?;
        RulePipeline::new(&self.host, rule, plugins, llm)
    }

    fn emit(&self, event: ReloadEvent) {
        match (&event.action, &event.error) {
            (ReloadAction::Refused, Some(e)) => {
                tracing::error!(file = %event.file.display(), "{e}; the previous version keeps running")
            }
            _ => {
                tracing::info!(kind = ?event.kind, action = ?event.action, name = %event.name, version = ?event.version, rules = ?event.rules, file = %event.file.display(), "reloaded")
            }
        }
        let _ = self.events.send(event);
    }

    fn event(&self, kind: FileKind, action: ReloadAction, file: &Path, name: &str) -> ReloadEvent {
        ReloadEvent {
            kind,
            action,
            file: file.to_owned(),
            name: name.to_owned(),
            version: None,
            rules: Vec::new(),
            error: None,
            timestamp: crate::types::now_ms(),
        }
    }
}

/// Loads plugins and rules from folders and binds them; returns the
/// pipelines and every problem found (a bad file never stops the others).
/// To keep the gateway in step with the folders afterwards, use a
/// [`Reloader`] instead.
pub async fn load(
    host: &crate::plugin::PluginHost,
    plugins_dir: &std::path::Path,
    rules_dir: &std::path::Path,
    llm: Arc<dyn crate::llm::LlmEngine>,
) -> (Vec<RulePipeline>, Vec<String>) {
    Reloader::new(host.clone(), plugins_dir, rules_dir, llm)
        .load_all()
        .await
}
