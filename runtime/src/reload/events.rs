//! File notifications (notify) for the folders and their parents, behind the
//! `reload` feature; they only make a change seen sooner than the periodic
//! rescan would.

use super::ReloadError;
use std::collections::HashMap;
use std::path::PathBuf;
use tokio::sync::mpsc;

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
