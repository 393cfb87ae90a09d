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

#[cfg(feature = "reload")]
pub(super) use super::events::FolderWatcher;

/// Without the `reload` feature there are no file notifications: the
/// rescan every `poll_ms` finds every change, only later.
#[cfg(not(feature = "reload"))]
pub(super) struct FolderWatcher;

#[cfg(not(feature = "reload"))]
impl FolderWatcher {
    pub(super) fn new(_dirs: Vec<PathBuf>, _tx: mpsc::Sender<()>) -> Option<FolderWatcher> {
        None
    }

    pub(super) fn ensure_watched(&mut self) {}
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
