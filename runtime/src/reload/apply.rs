//! Taking what the scan found: compile and bind, swap only when all of it
//! succeeded, and report each file's outcome as a [`ReloadEvent`].

use super::*;

impl Reloader {
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
    pub(super) fn changed_content(
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
    pub(super) async fn take_plugin(
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
            match self.pipeline(rule.clone(), &registry) {
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

    pub(super) fn remove_plugin(&self, t: &mut Tracked, path: &Path) {
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

    pub(super) async fn take_rule(
        &self,
        t: &mut Tracked,
        gateway: &Gateway,
        path: &Path,
        stat: Stat,
    ) {
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
}

pub(super) fn resets_state(rule: &Rule, plugin: &str) -> bool {
    rule.plugin_refs()
        .any(|r| r.plugin == plugin && r.reset_state_on_reload)
}
