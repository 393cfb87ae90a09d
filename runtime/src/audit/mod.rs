//! The decision audit log: one JSON line per decision a rule took with the
//! model (prompt plugin → model → postprocess plugin → allow-list), appended
//! by a writer thread and rotated by size.
//!
//! ```toml
//! [audit]
//! enabled = true
//! path = ".ganglion/audit.jsonl"
//! max_mib = 16        # rotate when the file would grow past this
//! keep = 4            # rotated files kept: audit.jsonl.1 (newest) .. audit.jsonl.4
//! queue = 1024        # records waiting for the writer; beyond, records are dropped and counted
//! ```
//!
//! Files are created readable by their owner only (`0600` on unix): records
//! hold prompts, completions and readings.
//!
//! A record holds what is needed to judge the decision and to take it again:
//! the rule, the device and its window of readings, the versions of the
//! plugins, the model's id and file hash, the prompt with its parameters,
//! seed and constraint, the completion (or the model's error), every action
//! with whether the allow-list let it out (and why not), and timings. The
//! format is versioned (`"v": 1`).
//!
//! `crate::replay` takes recorded decisions again through the current
//! plugins and model (`ganglion replay`), and [`export_finetune`] writes prompt and
//! completion pairs as chat-format JSON lines.

mod record;

pub use record::*;

use crate::config::AuditConfig;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Appends records from any task; cheap to clone. Writing happens on a
/// thread of its own, so a slow disk never holds a rule; up to `queue`
/// records wait in memory meanwhile, and records beyond are dropped and
/// counted. A write error is logged and the record is lost to the log,
/// never to the pipeline.
#[derive(Clone)]
pub struct AuditLog {
    tx: std::sync::mpsc::SyncSender<Write>,
    model_hash: Option<String>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// What the writer thread is asked to do.
enum Write {
    Line(Vec<u8>),
    /// Answer once everything before is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

impl AuditLog {
    /// Opens (creating folders as needed) and starts the writer thread.
    /// `model_hash` is recorded with every decision.
    pub fn open(config: &AuditConfig, model_hash: Option<String>) -> Result<AuditLog, AuditError> {
        let err = |source| AuditError {
            path: config.path.clone(),
            source,
        };
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = open_private(&config.path).map_err(err)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Write>(config.queue.max(1));
        let (path, max, keep) = (
            config.path.clone(),
            config.max_mib.max(1) * (1 << 20),
            config.keep,
        );
        std::thread::Builder::new()
            .name("ganglion-audit".into())
            .spawn(move || write_loop(file, rx, &path, max, keep))
            .map_err(err)?;
        Ok(AuditLog {
            tx,
            model_hash,
            dropped: Default::default(),
        })
    }

    /// Records dropped so far because `queue` records were already waiting.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The model file's hash recorded with decisions.
    pub fn model_hash(&self) -> Option<String> {
        self.model_hash.clone()
    }

    /// Queues a record for writing, or drops and counts it when the queue
    /// is full; never waits.
    pub fn append(&self, record: &DecisionRecord) {
        match serde_json::to_vec(record) {
            Ok(mut line) => {
                line.push(b'\n');
                match self.tx.try_send(Write::Line(line)) {
                    Ok(()) => {}
                    Err(std::sync::mpsc::TrySendError::Full(_)) => {
                        let n = self
                            .dropped
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                            + 1;
                        // Warn at 1, 2, 4, 8... drops: seen, without a flood.
                        if n.is_power_of_two() {
                            tracing::warn!(dropped = n, "audit queue full; decision not recorded");
                        }
                    }
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                        tracing::error!("audit writer stopped; decision not recorded");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "decision not recorded"),
        }
    }

    /// Waits (blocking, briefly) until every record appended so far (and
    /// not dropped) is written to the file.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Write::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn write_loop(
    mut file: std::fs::File,
    rx: std::sync::mpsc::Receiver<Write>,
    path: &Path,
    max: u64,
    keep: u32,
) {
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    while let Ok(w) = rx.recv() {
        let line = match w {
            Write::Line(l) => l,
            Write::Flush(done) => {
                let _ = file.flush();
                let _ = done.send(());
                continue;
            }
        };
        if size > 0 && size + line.len() as u64 > max {
            match rotate(path, keep) {
                Ok(f) => {
                    file = f;
                    size = 0;
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "audit log not rotated")
                }
            }
        }
        match file.write_all(&line) {
            Ok(()) => size += line.len() as u64,
            Err(e) => tracing::error!(path = %path.display(), error = %e, "decision not recorded"),
        }
    }
    let _ = file.flush();
}

/// Shifts `path.N` to `path.N+1` (dropping the oldest), `path` to `path.1`,
/// and opens a fresh `path`.
fn rotate(path: &Path, keep: u32) -> std::io::Result<std::fs::File> {
    let numbered = |n: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    };
    if keep == 0 {
        std::fs::remove_file(path)?;
    } else {
        let _ = std::fs::remove_file(numbered(keep));
        for n in (1..keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        std::fs::rename(path, numbered(1))?;
    }
    open_private(path)
}

/// Opens `path` for appending, created `0600` on unix; an existing file is
/// set to `0600` too (rotated files keep the mode of the file they were).
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(0o600);
        let file = options.open(path)?;
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), error = %e, "audit log's mode not set to 0600");
        }
        Ok(file)
    }
    #[cfg(not(unix))]
    options.open(path)
}

/// blake3 of a file, hex (read on a blocking thread); `None` when it
/// cannot be read.
pub async fn file_hash(path: &Path) -> Option<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(&path).ok()?).ok()?;
        Some(h.finalize().to_hex().to_string())
    })
    .await
    .ok()
    .flatten()
}

/// Reads an audit log; a line that is not a record is an error naming its
/// line number.
pub fn read(path: &Path) -> Result<Vec<DecisionRecord>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Writes each record's prompt and completion as a chat-format training
/// example (`{"messages":[system, user, assistant]}`, one per line), skipping
/// records whose model call failed. Returns how many were written.
pub fn export_finetune(records: &[DecisionRecord], out: &Path) -> std::io::Result<usize> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut n = 0;
    for r in records.iter().filter(|r| r.completion.error.is_none()) {
        let line = serde_json::json!({
            "messages": [
                {"role": "system", "content": r.prompt.system},
                {"role": "user", "content": r.prompt.user},
                {"role": "assistant", "content": r.completion.text},
            ],
            "rule": r.rule,
            "model": r.model.id,
        });
        serde_json::to_writer(&mut w, &line)?;
        w.write_all(b"\n")?;
        n += 1;
    }
    w.flush()?;
    Ok(n)
}
