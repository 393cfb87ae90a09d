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

/// What identifies a file's state between scans without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
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
    llm: Arc<dyn LlmEngine>,
    plugins_dir: PathBuf,
    /// The rules folder and any more (`[rules] extra_dirs`).
    rules_dirs: Vec<PathBuf>,
    tracked: tokio::sync::Mutex<Tracked>,
    events: broadcast::Sender<ReloadEvent>,
    audit: Option<crate::audit::AuditLog>,
    limits: crate::config::PipelineLimits,
}

/// The candidate files of a folder: `None` when it cannot be read (gone, or
/// being replaced).
fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn scan(dir: &Path, extension: &str) -> Option<HashMap<PathBuf, Stat>> {
    use std::os::unix::fs::MetadataExt;
    let entries = std::fs::read_dir(dir).ok()?;
    let mut found = HashMap::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || path.extension().is_none_or(|x| x != extension) {
            continue;
        }
        // Follows symbolic links: a link to a component counts as the component.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        found.insert(
            path,
            Stat {
                len: meta.len(),
                modified: meta.modified().ok(),
                inode: meta.ino(),
            },
        );
    }
    Some(found)
}

/// Every candidate file of a folder, sorted, with its content and hash,
/// recorded as seen; what cannot be read goes to `problems`.
fn read_folder(
    t: &mut Tracked,
    dir: &Path,
    extension: &str,
    what: &str,
    problems: &mut Vec<String>,
) -> Vec<(PathBuf, Stat, Vec<u8>, blake3::Hash)> {
    let Some(files) = scan(dir, extension) else {
        problems.push(format!("{}: cannot read the {what} folder", dir.display()));
        return Vec::new();
    };
    let mut files: Vec<(PathBuf, Stat)> = files.into_iter().collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (path, stat) in files {
        t.seen.insert(path.clone(), stat);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let hash = blake3::hash(&bytes);
                out.push((path, stat, bytes, hash));
            }
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    out
}

/// Files of one folder that are ready: unchanged since the last scan, and
/// those confirmed gone. Sets `settled` to false when something is still
/// moving.
struct Ready {
    present: Vec<(PathBuf, Stat)>,
    gone: Vec<PathBuf>,
}

impl Tracked {
    fn settle(
        &mut self,
        dir: &Path,
        scan: Option<HashMap<PathBuf, Stat>>,
        known: &[PathBuf],
        settled: &mut bool,
    ) -> Ready {
        let mut ready = Ready {
            present: Vec::new(),
            gone: Vec::new(),
        };
        let Some(scan) = scan else {
            return ready;
        };
        let mut paths: Vec<&PathBuf> = scan.keys().collect();
        paths.sort();
        for path in paths {
            let stat = scan[path];
            if self.seen.insert(path.clone(), stat) == Some(stat) {
                ready.present.push((path.clone(), stat));
            } else {
                *settled = false;
            }
        }
        for path in known {
            if !scan.contains_key(path) {
                // Gone twice in a row (a file replaced by rename never is).
                if self.seen.remove(path).is_some() {
                    *settled = false;
                } else {
                    ready.gone.push(path.clone());
                }
            }
        }
        // Forget files of this folder that came and went between scans.
        self.seen
            .retain(|p, _| !p.starts_with(dir) || scan.contains_key(p) || known.contains(p));
        ready
    }
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
            llm,
            plugins_dir: plugins_dir.to_owned(),
            rules_dirs: vec![rules_dir.to_owned()],
            tracked: tokio::sync::Mutex::new(Tracked::default()),
            events,
            audit: None,
            limits: crate::config::PipelineLimits::default(),
        }
    }

    /// Also loads and watches the rules in these folders (rule names must be
    /// unique across all of them).
    pub fn with_extra_rule_dirs(mut self, dirs: &[PathBuf]) -> Self {
        self.rules_dirs.extend(dirs.iter().cloned());
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
        let t = self.tracked.lock().await;
        RulePipeline::new(&self.host, rule, &t.plugins, self.llm.clone())
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
        RulePipeline::new(&self.host, rule, &t.plugins, self.llm.clone())
            .map(|p| p.with_audit(self.audit.clone()).with_limits(self.limits))
            .map_err(|e| (format!("{}: {e}", path.display()), plugins))
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

    /// Scans both folders once and applies what is ready. Returns false when
    /// something is still changing, so the caller scans again after the
    /// debounce time.
    pub async fn reconcile(&self, gateway: &Gateway) -> bool {
        let mut guard = self.tracked.lock().await;
        let t = &mut *guard;
        let mut settled = true;
        let known: Vec<PathBuf> = t.plugin_files.keys().cloned().collect();
        let plugins = t.settle(
            &self.plugins_dir,
            scan(&self.plugins_dir, "wasm"),
            &known,
            &mut settled,
        );
        let mut loaded = HashSet::new();
        for (path, stat) in plugins.present {
            if let Some(name) = self.take_plugin(t, gateway, &path, stat).await {
                loaded.insert(name);
            }
        }
        for path in plugins.gone {
            self.remove_plugin(t, &path);
        }
        // A rule refused for want of a plugin is tried again once it loads.
        t.refused
            .retain(|_, r| !r.plugins.iter().any(|p| loaded.contains(p)));
        let (mut present, mut gone) = (Vec::new(), Vec::new());
        for dir in &self.rules_dirs {
            let known: Vec<PathBuf> = t
                .rules
                .keys()
                .filter(|p| p.parent() == Some(dir.as_path()))
                .cloned()
                .collect();
            let ready = t.settle(dir, scan(dir, "toml"), &known, &mut settled);
            present.extend(ready.present);
            gone.extend(ready.gone);
        }
        // Files gone are forgotten before new ones are read, so that a rule
        // file renamed (its `name` unchanged) is taken from its new path
        // instead of refused as a duplicate; the rule leaves the gateway
        // only when no file defines it any more.
        let gone: Vec<(PathBuf, Rule)> = gone
            .into_iter()
            .filter_map(|path| t.rules.remove(&path).map(|(rule, _)| (path, rule)))
            .collect();
        if !gone.is_empty() {
            // A file refused as a duplicate of a rule now gone is read again.
            t.refused
                .retain(|p, _| p.extension().is_none_or(|x| x != "toml"));
        }
        for (path, stat) in present {
            self.take_rule(t, gateway, &path, stat).await;
        }
        for (path, rule) in gone {
            if t.rules.values().any(|(r, _)| r.name == rule.name) {
                tracing::info!(rule = %rule.name, file = %path.display(), "rule file moved; the rule goes on");
                continue;
            }
            if let Err(e) = gateway.remove(&rule.name).await {
                tracing::warn!(rule = %rule.name, error = %e, "rule not removed");
            }
            self.emit(self.event(FileKind::Rule, ReloadAction::Removed, &path, &rule.name));
        }
        settled
    }

    /// Reads a settled file; `None` when its content is what already runs
    /// or what was already refused.
    fn changed_content(
        applied: Option<&mut Applied>,
        refused: Option<&Refused>,
        path: &Path,
        stat: Stat,
    ) -> Option<(Vec<u8>, blake3::Hash)> {
        if applied.as_ref().is_some_and(|a| a.stat == stat) {
            return None;
        }
        let bytes = std::fs::read(path).ok()?;
        let hash = blake3::hash(&bytes);
        if let Some(a) = applied
            && a.hash == hash
        {
            a.stat = stat;
            return None;
        }
        if refused.is_some_and(|r| r.hash == hash) {
            return None;
        }
        Some((bytes, hash))
    }

    /// Loads a plugin file and rebinds the rules that use it; returns the
    /// plugin's name when a new version serves.
    async fn take_plugin(
        &self,
        t: &mut Tracked,
        gateway: &Gateway,
        path: &Path,
        stat: Stat,
    ) -> Option<String> {
        let (bytes, hash) = Self::changed_content(
            t.plugin_files.get_mut(path),
            t.refused.get(path),
            path,
            stat,
        )?;
        let name = stem(path);
        let mut event = self.event(FileKind::Plugin, ReloadAction::Refused, path, &name);
        let refuse = |t: &mut Tracked, mut event: ReloadEvent, error: String| {
            event.error = Some(error);
            t.refused.insert(
                path.to_owned(),
                Refused {
                    hash,
                    plugins: Vec::new(),
                },
            );
            self.emit(event);
            None
        };
        let plugin = match self.host.load_hashed(&name, bytes, hash, path).await {
            Ok(p) => p,
            Err(e) => return refuse(t, event, e.to_string()),
        };
        event.version = Some(plugin.version.to_string());
        let mut registry = t.plugins.clone();
        registry.insert(name.clone(), plugin.clone());
        let mut users: Vec<Rule> = t
            .rules
            .values()
            .map(|(r, _)| r)
            .filter(|r| r.plugins().contains(&name.as_str()))
            .cloned()
            .collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pipelines = Vec::new();
        for rule in &users {
            match RulePipeline::new(&self.host, rule.clone(), &registry, self.llm.clone()) {
                Ok(p) => pipelines.push(p.with_audit(self.audit.clone()).with_limits(self.limits)),
                Err(e) => {
                    let reason = format!(
                        "{}: version {} cannot serve rule `{}`: {e}",
                        path.display(),
                        plugin.version,
                        rule.name
                    );
                    return refuse(t, event, reason);
                }
            }
        }
        let resets: Vec<String> = users
            .iter()
            .filter(|r| resets_state(r, &name))
            .map(|r| r.name.clone())
            .collect();
        event.rules = users.iter().map(|r| r.name.clone()).collect();
        let previous = t.plugins.insert(name.clone(), plugin);
        for p in pipelines {
            if gateway.install(p).await.is_err() {
                return None;
            }
        }
        if previous.is_some() {
            for rule in resets {
                if let Err(e) = self.host.clear_state(&name, &rule) {
                    tracing::error!(plugin = %name, %rule, error = %e, "state not reset on reload");
                }
            }
        }
        t.plugin_files
            .insert(path.to_owned(), Applied { stat, hash });
        t.refused.remove(path);
        event.action = if previous.is_some() {
            ReloadAction::Replaced
        } else {
            ReloadAction::Loaded
        };
        self.emit(event);
        Some(name)
    }

    fn remove_plugin(&self, t: &mut Tracked, path: &Path) {
        t.plugin_files.remove(path);
        let name = stem(path);
        let Some(plugin) = t.plugins.remove(&name) else {
            return;
        };
        let mut event = self.event(FileKind::Plugin, ReloadAction::Removed, path, &name);
        event.version = Some(plugin.version.to_string());
        event.rules = t
            .rules
            .values()
            .map(|(r, _)| r)
            .filter(|r| r.plugins().contains(&name.as_str()))
            .map(|r| r.name.clone())
            .collect();
        event.rules.sort();
        self.emit(event);
    }

    async fn take_rule(&self, t: &mut Tracked, gateway: &Gateway, path: &Path, stat: Stat) {
        let Some((bytes, hash)) = Self::changed_content(
            t.rules.get_mut(path).map(|(_, a)| a),
            t.refused.get(path),
            path,
            stat,
        ) else {
            return;
        };
        let name = stem(path);
        let pipeline = match self.bind_rule(t, path, &bytes) {
            Ok(p) => p,
            Err((reason, plugins)) => {
                let mut event = self.event(FileKind::Rule, ReloadAction::Refused, path, &name);
                event.error = Some(reason);
                t.refused.insert(path.to_owned(), Refused { hash, plugins });
                self.emit(event);
                return;
            }
        };
        let rule = (*pipeline.rule).clone();
        let previous = t.rules.get(path).map(|(r, _)| r.name.clone());
        if gateway.install(pipeline).await.is_err() {
            return;
        }
        if let Some(old) = &previous
            && *old != rule.name
            && let Err(e) = gateway.remove(old).await
        {
            tracing::warn!(rule = %old, error = %e, "renamed rule's old name not removed");
        }
        let mut event = self.event(
            FileKind::Rule,
            if previous.is_some() {
                ReloadAction::Replaced
            } else {
                ReloadAction::Loaded
            },
            path,
            &rule.name,
        );
        event.rules = vec![rule.name.clone()];
        t.rules
            .insert(path.to_owned(), (rule, Applied { stat, hash }));
        t.refused.remove(path);
        self.emit(event);
    }

    /// Watches both folders and applies changes to `gateway` until the
    /// handle is stopped or dropped. Without file-system notifications (say,
    /// the inotify limit is reached) it falls back to rescanning every `poll_ms`.
    pub fn watch(self: &Arc<Self>, gateway: Arc<Gateway>, config: &ReloadConfig) -> ReloadHandle {
        let (stop, mut stopped) = watch::channel(false);
        let (tx, rx) = mpsc::channel::<()>(1);
        let dirs: Vec<PathBuf> = std::iter::once(&self.plugins_dir)
            .chain(&self.rules_dirs)
            .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
            .collect();
        let mut watcher = FolderWatcher::new(dirs, tx);
        let mut rx = Some(rx).filter(|_| watcher.is_some());
        let (reloader, debounce, poll) = (self.clone(), config.debounce(), config.poll());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = next_event(&mut rx) => {}
                    _ = tokio::time::sleep(poll) => {}
                }
                loop {
                    // Quiet for `debounce`, then scan; again while files move.
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => return,
                            r = tokio::time::timeout(debounce, next_event(&mut rx)) => if r.is_err() { break },
                        }
                    }
                    if let Some(w) = watcher.as_mut() {
                        w.ensure_watched();
                    }
                    if reloader.reconcile(&gateway).await {
                        break;
                    }
                }
            }
        });
        ReloadHandle {
            stop,
            task: Some(task),
        }
    }
}

fn resets_state(rule: &Rule, plugin: &str) -> bool {
    rule.plugin_refs()
        .any(|r| r.plugin == plugin && r.reset_state_on_reload)
}

/// Waits for the next notification; forever when there is no watcher.
async fn next_event(rx: &mut Option<mpsc::Receiver<()>>) {
    match rx {
        Some(r) => {
            if r.recv().await.is_none() {
                *rx = None;
            }
        }
        None => std::future::pending().await,
    }
}

/// notify watches on the folders and their parents. A folder replaced as a
/// whole (a new inode) is watched again on the next scan.
struct FolderWatcher {
    watcher: notify::RecommendedWatcher,
    dirs: Vec<PathBuf>,
    /// The inode each folder had when it was last watched.
    watched: HashMap<PathBuf, u64>,
}

impl FolderWatcher {
    fn new(dirs: Vec<PathBuf>, tx: mpsc::Sender<()>) -> Option<FolderWatcher> {
        use notify::{EventKind, Watcher, event::AccessKind};
        let relevant = dirs.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else {
                // An overflowed queue loses events: rescan.
                let _ = tx.try_send(());
                return;
            };
            if matches!(event.kind, EventKind::Access(a) if !matches!(a, AccessKind::Close(_))) {
                return;
            }
            let ours = event.paths.is_empty()
                || event.paths.iter().any(|p| {
                    relevant
                        .iter()
                        .any(|d| p == d || p.parent() == Some(d.as_path()))
                });
            if ours {
                // One pending signal is enough: every pass rescans.
                let _ = tx.try_send(());
            }
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "file notifications unavailable; rescanning the folders periodically");
                return None;
            }
        };
        let mut w = FolderWatcher {
            watcher,
            dirs,
            watched: HashMap::new(),
        };
        for parent in w.dirs.clone().iter().filter_map(|d| d.parent()) {
            if let Err(e) = w.watcher.watch(parent, notify::RecursiveMode::NonRecursive) {
                tracing::debug!(path = %parent.display(), error = %e, "parent folder not watched");
            }
        }
        w.ensure_watched();
        Some(w)
    }

    fn ensure_watched(&mut self) {
        use notify::Watcher;
        use std::os::unix::fs::MetadataExt;
        for dir in &self.dirs {
            let Ok(inode) = std::fs::metadata(dir).map(|m| m.ino()) else {
                self.watched.remove(dir);
                continue;
            };
            if self.watched.get(dir) == Some(&inode) {
                continue;
            }
            let _ = self.watcher.unwatch(dir);
            match self.watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir.clone(), inode);
                }
                Err(e) => {
                    let e = ReloadError::Watch {
                        path: dir.clone(),
                        reason: e.to_string(),
                    };
                    tracing::warn!("{e}; relying on periodic rescans");
                }
            }
        }
    }
}

/// Publishes every reload event on `topic` (QoS 1), so an operator sees
/// remotely what was taken and what was refused. Runs until `events` closes.
pub async fn publish_events(
    mut events: broadcast::Receiver<ReloadEvent>,
    publisher: Arc<dyn crate::transport::Publisher>,
    topic: String,
) {
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("{n} reload events not published");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let out = crate::types::Outgoing {
            topic: topic.clone(),
            payload: event.to_json(),
            qos: crate::types::Qos::AtLeastOnce,
            retain: false,
        };
        if let Err(e) = publisher.publish(out).await {
            tracing::warn!(error = %e, "reload event not published");
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

/// Stops the watcher when stopped or dropped.
pub struct ReloadHandle {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ReloadHandle {
    /// Stops watching and waits for a change being applied to finish.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ReloadHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
