//! The watcher task: notify events and a periodic rescan drive
//! [`Reloader::reconcile`]; [`ReloadHandle`] stops it.

use super::*;

impl Reloader {
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

/// Waits for the next notification; forever when there is no watcher.
pub(super) async fn next_event(rx: &mut Option<mpsc::Receiver<()>>) {
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
pub(super) struct FolderWatcher {
    watcher: notify::RecommendedWatcher,
    dirs: Vec<PathBuf>,
    /// The inode each folder had when it was last watched.
    watched: HashMap<PathBuf, u64>,
}

impl FolderWatcher {
    pub(super) fn new(dirs: Vec<PathBuf>, tx: mpsc::Sender<()>) -> Option<FolderWatcher> {
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

    pub(super) fn ensure_watched(&mut self) {
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
