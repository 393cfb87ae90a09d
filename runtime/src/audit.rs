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

use crate::config::AuditConfig;
use crate::types::{
    Completion, Constraint, Context, GenerationParams, LlmError, Prompt, ReadingBatch, Value,
};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A reading as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedReading {
    /// Device name.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// A number, a boolean or a text.
    pub value: serde_json::Value,
    /// Unit, empty when none.
    pub unit: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
}

/// A plugin version as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedPlugin {
    /// Plugin name (the component's file stem).
    pub name: String,
    /// Content hash, 12 hex digits.
    pub version: String,
}

/// The model as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedModel {
    /// The model id the engine reports (the GGUF file stem).
    pub id: String,
    /// blake3 of the model file, hex, when known.
    pub hash: Option<String>,
}

/// The prompt as recorded, with every generation parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedPrompt {
    /// The system message.
    pub system: String,
    /// The user message.
    pub user: String,
    /// Generation limit in tokens.
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 is no top-k cut.
    pub top_k: u32,
    /// 1.0 is no nucleus cut.
    pub top_p: f32,
    /// 1.0 is no penalty.
    pub repeat_penalty: f32,
    /// Sampling seed, when set.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Deadline in ms from the call, when set.
    pub deadline_ms: Option<u32>,
    /// `none`, `json-schema`, `choice` or `regex`.
    pub constraint: String,
    /// The schema, the choices (a JSON array) or the regex.
    pub constraint_value: Option<String>,
}

/// The model's answer as recorded, or its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedCompletion {
    /// The completion text; empty on error.
    pub text: String,
    /// Why generation stopped (`stop`, `length`, ...), or `error`.
    pub finish: String,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// The model's error, when generation failed.
    pub error: Option<String>,
}

/// One action the postprocessor proposed, and what the allow-list said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedAction {
    /// Let out (published) or refused (dead-lettered).
    pub allowed: bool,
    /// Where it was published (allowed only).
    pub topic: Option<String>,
    /// What was published, as text (allowed only).
    pub payload: Option<String>,
    /// Why it was refused (refused only).
    pub reason: Option<String>,
}

/// Milliseconds spent per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordedTimings {
    /// Rendering the prompt.
    pub prompt_ms: f64,
    /// Waiting for the model (queue and generation).
    pub llm_ms: f64,
    /// Parsing the completion into actions.
    pub postprocess_ms: f64,
}

/// One decision; a line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Record format version: 1.
    pub v: u32,
    /// When the decision was taken, ms since the Unix epoch.
    pub timestamp: i64,
    /// The rule's name.
    pub rule: String,
    /// The device whose window was decided on.
    pub device: String,
    /// Earliest reading of the window, ms since the Unix epoch.
    pub window_start: i64,
    /// Latest reading of the window, ms since the Unix epoch.
    pub window_end: i64,
    /// The window's readings.
    pub window: Vec<RecordedReading>,
    /// The prompt-template plugin.
    pub prompt_plugin: RecordedPlugin,
    /// The postprocess plugin.
    pub postprocess_plugin: RecordedPlugin,
    /// The model.
    pub model: RecordedModel,
    /// The rendered prompt and its parameters.
    pub prompt: RecordedPrompt,
    /// The completion, or the model's error.
    pub completion: RecordedCompletion,
    /// Every action proposed, with the allow-list's answer; empty when the
    /// postprocessor failed (see `error`).
    pub actions: Vec<RecordedAction>,
    /// The postprocessor's failure, when it failed.
    pub error: Option<String>,
    /// Time per stage.
    pub timings: RecordedTimings,
}

impl DecisionRecord {
    /// The recorded window as a batch for the plugins.
    pub fn window_batch(&self) -> ReadingBatch {
        recorded_batch(&self.window)
    }

    /// The recorded context for the plugins.
    pub fn context(&self) -> Context {
        Context {
            rule: self.rule.clone(),
            device: self.device.clone(),
            window_start: self.window_start,
            window_end: self.window_end,
        }
    }
}

/// Recorded readings as a batch for the plugins, names interned in order of
/// appearance (the inverse of [`record_window`]).
pub fn recorded_batch(readings: &[RecordedReading]) -> ReadingBatch {
    let mut b = ReadingBatch::default();
    for r in readings {
        let value = match &r.value {
            serde_json::Value::Bool(v) => Value::Boolean(*v),
            serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        };
        b.push(&r.device, &r.metric, value, &r.unit, r.timestamp);
    }
    b
}

/// The window as recorded.
pub fn record_window(window: &ReadingBatch) -> Vec<RecordedReading> {
    window
        .iter()
        .map(|r| RecordedReading {
            device: r.device.to_owned(),
            metric: r.metric.to_owned(),
            value: match r.value {
                Value::Number(n) => serde_json::Number::from_f64(*n)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number),
                Value::Boolean(b) => serde_json::Value::Bool(*b),
                Value::Text(t) => serde_json::Value::String(t.clone()),
            },
            unit: r.unit.to_owned(),
            timestamp: r.timestamp,
        })
        .collect()
}

/// The prompt as recorded.
pub fn record_prompt(prompt: &Prompt) -> RecordedPrompt {
    let p: &GenerationParams = &prompt.params;
    let (constraint, constraint_value) = match &p.constraint {
        Constraint::None => ("none", None),
        Constraint::JsonSchema(s) => ("json-schema", Some(s.clone())),
        Constraint::Choice(c) => ("choice", Some(serde_json::to_string(c).unwrap_or_default())),
        Constraint::Regex(r) => ("regex", Some(r.clone())),
    };
    RecordedPrompt {
        system: prompt.system.clone(),
        user: prompt.user.clone(),
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        repeat_penalty: p.repeat_penalty,
        seed: p.seed,
        stop: p.stop.clone(),
        deadline_ms: p.deadline_ms,
        constraint: constraint.into(),
        constraint_value,
    }
}

/// The completion (or error) as recorded.
pub fn record_completion(completion: &Result<Completion, LlmError>) -> RecordedCompletion {
    match completion {
        Ok(c) => RecordedCompletion {
            text: c.text.clone(),
            finish: format!("{:?}", c.finish_reason).to_lowercase(),
            prompt_tokens: c.usage.prompt_tokens,
            completion_tokens: c.usage.completion_tokens,
            error: None,
        },
        Err(e) => RecordedCompletion {
            text: String::new(),
            finish: "error".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            error: Some(e.to_string()),
        },
    }
}

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

/// What taking a recorded decision again gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    /// The prompt rendered now, or why rendering failed.
    pub prompt: Result<RecordedPrompt, String>,
    /// The completion now.
    pub completion: Option<RecordedCompletion>,
    /// The actions now, with the allow-list's answers.
    pub actions: Vec<RecordedAction>,
    /// The postprocessor's failure now.
    pub error: Option<String>,
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
