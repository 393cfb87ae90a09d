//! The engine: one worker thread owns the model; callers get futures.
//! Generation requests join one running batch (`scheduler`); classify and
//! embed jobs run whole between its steps. Requests not yet running are
//! bounded by `queue`: beyond it a request is `overloaded` at once, so the
//! pipeline can turn it into backpressure.

use crate::config::EngineConfig;
use crate::constraint::Constraints;
use crate::embed::Embedder;
use crate::gguf::{GgufFile, LoadError};
use crate::model::{KvCache, Model, Step, log_softmax};
use crate::prefix::PrefixCache;
use crate::scheduler::{EngineStats, Limits, Scheduler, SharedStats};
use crate::tokenizer::Tokenizer;
use crate::types::{ChatMessage, Completion, GenerateRequest, LlmError, Role};
use candle_core::Device;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The input whose label scores `classify` subtracts, so that what the
/// model prefers with no evidence at all does not count as evidence.
const CONTENT_FREE: &str = "N/A";

impl EngineConfig {
    /// The candle device `device` names: `cpu`, `cuda` (ordinal 0) or
    /// `cuda:N`.
    ///
    /// # Errors
    ///
    /// [`LoadError::Device`] for any other name, or when CUDA cannot open
    /// the device (a build without the `cuda` feature, no such GPU).
    pub fn device(&self) -> Result<Device, LoadError> {
        let ordinal = match self.device.as_str() {
            "cpu" => return Ok(Device::Cpu),
            "cuda" => Some(0),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok()),
        };
        let Some(ordinal) = ordinal else {
            return Err(LoadError::Device(format!(
                "device '{}' is not one of cpu, cuda, cuda:N",
                self.device
            )));
        };
        Device::new_cuda(ordinal).map_err(|e| {
            LoadError::Device(format!(
                "{}: {e} (is this a build with `--features cuda`?)",
                self.device
            ))
        })
    }

    /// Threads for the compute pool: `threads` when set and non-zero, else
    /// cores − 1 on more than 2 cores, else all of them.
    pub fn thread_count(&self) -> usize {
        self.threads
            .filter(|&n| n > 0)
            .unwrap_or_else(crate::pool::default_threads)
    }
}

enum Job {
    Generate(
        GenerateRequest,
        Instant,
        oneshot::Sender<Result<Completion, LlmError>>,
        Option<crate::scheduler::Deltas>,
    ),
    Classify(
        String,
        Vec<String>,
        Instant,
        oneshot::Sender<Result<Vec<f32>, LlmError>>,
    ),
    Embed(
        Vec<String>,
        Instant,
        oneshot::Sender<Result<Vec<Vec<f32>>, LlmError>>,
    ),
}

struct Worker {
    model: Option<(Model, Arc<Tokenizer>, Constraints)>,
    embedder: Option<Embedder>,
    context: usize,
    prefill_chunk: usize,
    prefixes: PrefixCache,
    batch: Scheduler,
    stats: Arc<SharedStats>,
}

/// A handle to the engine; cheap to clone. The worker stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Engine {
    jobs: Sender<Job>,
    queue: usize,
    stats: Arc<SharedStats>,
    kv_bound: usize,
    tokenizer: Option<Arc<Tokenizer>>,
    model_id: String,
    has_embedder: bool,
    default_deadline: Duration,
}

/// What a load reports about the model.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    /// The GGUF file's name without its extension, which usually says the
    /// model and its quantisation (`general.name` often does not); reported
    /// as [`crate::Completion::model`].
    pub id: String,
    /// `general.architecture`: one of [`crate::gguf::ARCHITECTURES`].
    pub architecture: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size (embedding length).
    pub width: usize,
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Longest sequence in tokens: the model's own, capped by `[model]
    /// context`.
    pub context: usize,
}

impl Engine {
    /// Loads the configured models and starts the worker. Blocking (reads
    /// and converts the weights): call it from a blocking thread.
    pub fn load(config: &EngineConfig) -> Result<(Engine, Option<ModelSummary>), LoadError> {
        Self::load_with_progress(config, true)
    }

    /// [`Engine::load`], with the progress bar on standard error shown or
    /// not (tests and benchmarks load quietly).
    ///
    /// # Errors
    ///
    /// A [`LoadError`] naming the file: missing or unreadable, not GGUF,
    /// truncated, an unsupported architecture or tensor type, a bad
    /// tokenizer, or a device that cannot be opened.
    pub fn load_with_progress(
        config: &EngineConfig,
        show_progress: bool,
    ) -> Result<(Engine, Option<ModelSummary>), LoadError> {
        let device = config.device()?;
        crate::pool::configure(config.thread_count());
        let mut summary = None;
        let model = match &config.path {
            None => None,
            Some(path) => {
                let mut gguf = GgufFile::open(path)?;
                let bar = if show_progress {
                    indicatif::ProgressBar::new(0)
                } else {
                    indicatif::ProgressBar::hidden()
                };
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "loading {msg} [{bar:30}] {pos}/{len} tensors",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
                let model = Model::load(&mut gguf, &device, |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })?;
                bar.finish_and_clear();
                let tokenizer = Arc::new(Tokenizer::load(&gguf, model.config.vocab)?);
                let constraints =
                    Constraints::new(tokenizer.clone()).map_err(|reason| LoadError::Tokenizer {
                        file: path.clone(),
                        reason: format!("building the constraint token trie: {reason}"),
                    })?;
                // The file's name says the model and its quantisation, which
                // `general.name` often does not.
                let id = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                summary = Some(ModelSummary {
                    id,
                    architecture: gguf.architecture()?,
                    layers: model.config.layers,
                    width: model.config.width,
                    vocab: model.config.vocab,
                    context: model.config.context.min(config.context),
                });
                Some((model, tokenizer, constraints))
            }
        };
        let embedder = match &config.embedding {
            None => None,
            Some(dir) => Some(Embedder::load(dir, &device)?),
        };
        let model_id = summary.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        let tokenizer = model.as_ref().map(|(_, t, _)| t.clone());
        let context = summary.as_ref().map_or(config.context, |s| s.context);
        let (jobs, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(SharedStats::default());
        let kv_bound = config.kv_cache_mib << 20;
        let bytes_per_token = model.as_ref().map_or(0, |(m, _, _)| m.kv_bytes_per_token());
        let prefill_chunk = config.prefill_chunk.max(1);
        let engine = Engine {
            jobs,
            queue: config.queue.max(1),
            stats: stats.clone(),
            kv_bound,
            tokenizer,
            model_id: model_id.clone(),
            has_embedder: embedder.is_some(),
            default_deadline: Duration::from_millis(config.default_deadline_ms),
        };
        let limits = Limits {
            max_batch: config.max_batch.max(1),
            kv_bytes: kv_bound,
            prefill_chunk,
            context,
        };
        let worker = Worker {
            model,
            embedder,
            context,
            prefill_chunk,
            prefixes: PrefixCache::new(config.prefix_cache_mib << 20),
            batch: Scheduler::new(limits, bytes_per_token, stats.clone(), model_id),
            stats,
        };
        std::thread::Builder::new()
            .name("ganglion-llm".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| LoadError::Io {
                file: config.path.clone().unwrap_or_default(),
                reason: e,
            })?;
        Ok((engine, summary))
    }

    /// The generation model's id (its file name without the extension);
    /// empty when none is loaded.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The running batch and its KV memory, as of the last step.
    pub fn stats(&self) -> EngineStats {
        self.stats.snapshot(self.kv_bound)
    }

    fn deadline(&self, ms: Option<u32>) -> Instant {
        Instant::now() + ms.map_or(self.default_deadline, |ms| Duration::from_millis(ms as u64))
    }

    /// Queues a job built around its reply channel: `model-not-loaded` at
    /// once when the model it needs is absent, `overloaded` when the queue
    /// is full.
    fn submit<T: Send + 'static>(
        &self,
        ready: bool,
        job: impl FnOnce(oneshot::Sender<Result<T, LlmError>>) -> Job,
    ) -> impl Future<Output = Result<T, LlmError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let stopped = || LlmError::Internal("the model worker has stopped".into());
        let pending = &self.stats.pending;
        let sent = if !ready {
            Err(LlmError::ModelNotLoaded)
        } else if pending.fetch_add(1, Ordering::Relaxed) >= self.queue {
            pending.fetch_sub(1, Ordering::Relaxed);
            Err(LlmError::Overloaded)
        } else {
            self.jobs.send(job(tx)).map_err(|_| {
                pending.fetch_sub(1, Ordering::Relaxed);
                stopped()
            })
        };
        async move {
            sent?;
            rx.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    /// Generates a completion. The future resolves when the request
    /// finishes in the running batch; it need not be polled for the request
    /// to run, and dropping it abandons the request at the next step.
    ///
    /// # Errors
    ///
    /// `ModelNotLoaded` and `Overloaded` at once, without queueing; the
    /// others ([`LlmError`]) when the request is checked or runs.
    pub fn generate(
        &self,
        request: GenerateRequest,
    ) -> impl Future<Output = Result<Completion, LlmError>> + Send + 'static {
        let deadline = self.deadline(request.params.deadline_ms);
        self.submit(self.tokenizer.is_some(), move |tx| {
            Job::Generate(request, deadline, tx, None)
        })
    }

    /// Like [`Engine::generate`], and sends the text to `deltas` as it is
    /// generated ([`crate::scheduler::Deltas`] says how it is cut). The
    /// completion is still the whole answer: what its text has beyond the
    /// pieces received (the last piece, and any a full channel held back)
    /// is the rest. Dropping the future abandons the request, as for
    /// `generate`; dropping the receiver alone does not.
    ///
    /// # Errors
    ///
    /// As for [`Engine::generate`].
    pub fn generate_streaming(
        &self,
        request: GenerateRequest,
        deltas: crate::scheduler::Deltas,
    ) -> impl Future<Output = Result<Completion, LlmError>> + Send + 'static {
        let deadline = self.deadline(request.params.deadline_ms);
        self.submit(self.tokenizer.is_some(), move |tx| {
            Job::Generate(request, deadline, tx, Some(deltas))
        })
    }

    /// Scores `labels` as the category of `text`: one probability per
    /// label, in the given order, summing to 1. Each label is scored as the
    /// model's answer in both label orders, less its score for a
    /// content-free input, so neither a label's place in the list nor the
    /// model's prior counts as evidence. Runs whole between generation
    /// steps, under the engine's default deadline.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for no labels, a blank label, or a text that does not
    /// fit the context; `ModelNotLoaded`, `Overloaded`, `DeadlineExceeded`
    /// as for [`Engine::generate`].
    pub fn classify(
        &self,
        text: String,
        labels: Vec<String>,
    ) -> impl Future<Output = Result<Vec<f32>, LlmError>> + Send + 'static {
        let deadline = self.deadline(None);
        self.submit(self.tokenizer.is_some(), move |tx| {
            Job::Classify(text, labels, deadline, tx)
        })
    }

    /// Sentence embeddings of `texts`, one L2-normalised vector of
    /// [`crate::embed::Embedder::dimensions`] per text, in order. Texts
    /// beyond the encoder's 256 word pieces are truncated.
    ///
    /// # Errors
    ///
    /// `ModelNotLoaded` when no `[model] embedding` is configured;
    /// `Overloaded` and `DeadlineExceeded` as for [`Engine::generate`];
    /// `Internal` when the encoder fails.
    pub fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, LlmError>> + Send + 'static {
        let deadline = self.deadline(None);
        self.submit(self.has_embedder, move |tx| Job::Embed(texts, deadline, tx))
    }

    /// Tokens of `text` as the model would see it (BOS included when the
    /// model adds one).
    pub fn count_tokens(&self, text: &str) -> Result<u32, LlmError> {
        let t = self.tokenizer.as_ref().ok_or(LlmError::ModelNotLoaded)?;
        t.encode(text)
            .map(|ids| ids.len() as u32)
            .map_err(LlmError::InvalidInput)
    }

    /// The generation model's tokenizer, for callers that count or split
    /// text the way the model does; none without a model.
    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }
}

fn internal(e: impl std::fmt::Display) -> LlmError {
    LlmError::Internal(e.to_string())
}

fn expired(deadline: Instant) -> Result<(), LlmError> {
    if Instant::now() >= deadline {
        Err(LlmError::DeadlineExceeded)
    } else {
        Ok(())
    }
}

impl Worker {
    /// Takes in jobs between steps of the running batch; blocks only when
    /// there is nothing to run. Stops when every handle is gone and the
    /// batch has finished.
    fn run(mut self, rx: Receiver<Job>) {
        let mut open = true;
        loop {
            if self.batch.is_idle() {
                match rx.recv() {
                    Ok(job) => self.take(job),
                    Err(_) => return,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(job) => self.take(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if let Some((model, tokenizer, _)) = &self.model {
                self.batch.step(model, tokenizer, &mut self.prefixes);
            }
            if !open && self.batch.is_idle() {
                return;
            }
        }
    }

    /// A generation request joins the batch's queue; classify and embed run
    /// now, between steps.
    fn take(&mut self, job: Job) {
        match job {
            Job::Generate(req, deadline, tx, deltas) => match &self.model {
                Some((_, tokenizer, constraints)) => {
                    self.batch
                        .enqueue(tokenizer, constraints, req, deadline, tx, deltas)
                }
                None => {
                    self.stats.pending.fetch_sub(1, Ordering::Relaxed);
                    let _ = tx.send(Err(LlmError::ModelNotLoaded));
                }
            },
            Job::Classify(text, labels, deadline, tx) => {
                self.stats.pending.fetch_sub(1, Ordering::Relaxed);
                let r = expired(deadline).and_then(|_| self.classify(&text, &labels));
                let _ = tx.send(r);
            }
            Job::Embed(texts, deadline, tx) => {
                self.stats.pending.fetch_sub(1, Ordering::Relaxed);
                let r = expired(deadline).and_then(|_| self.embed(&texts));
                let _ = tx.send(r);
            }
        }
    }

    /// Scores each label as the assistant's answer after `Category:`, the
    /// sum of its tokens' log-probabilities. Small models favour whichever
    /// label the instruction lists first, so the prompt is run twice in one
    /// batched pass, with the labels in the given and the reversed order,
    /// and the two scores are added. The labels' later tokens run as one more
    /// batched pass, each on its own copy of a prompt's cache.
    fn classify(&mut self, text: &str, labels: &[String]) -> Result<Vec<f32>, LlmError> {
        let (model, tokenizer, _) = self.model.as_ref().ok_or(LlmError::ModelNotLoaded)?;
        if labels.is_empty() || labels.iter().any(|l| l.trim().is_empty()) {
            return Err(LlmError::InvalidInput(
                "labels must be non-empty strings".into(),
            ));
        }
        let listing = |order: &[&String]| match order {
            [one] => one.to_string(),
            [init @ .., last] => format!(
                "{} or {last}",
                init.iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            [] => String::new(),
        };
        let forward: Vec<&String> = labels.iter().collect();
        let reversed: Vec<&String> = labels.iter().rev().collect();
        let mut prompts = Vec::with_capacity(4);
        for (order, text) in [
            (&forward, text),
            (&reversed, text),
            (&forward, CONTENT_FREE),
            (&reversed, CONTENT_FREE),
        ] {
            let messages = vec![
                ChatMessage {
                    role: Role::System,
                    content: format!("Classify IoT gateway messages as {}.", listing(order)),
                },
                ChatMessage {
                    role: Role::User,
                    content: text.to_string(),
                },
            ];
            let rendered = tokenizer
                .apply_chat_template(&messages)
                .map_err(LlmError::InvalidInput)?;
            let ids = tokenizer
                .encode(&format!("{rendered}Category:"))
                .map_err(LlmError::InvalidInput)?;
            if ids.len() >= self.context {
                return Err(LlmError::InvalidInput(
                    "the text does not fit the context".into(),
                ));
            }
            prompts.push(ids);
        }
        let mut caches = vec![KvCache::default(); 4];
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let firsts = Self::prefill_many(model, &prompts, &mut caches, self.prefill_chunk)?
            .into_iter()
            .map(|l| {
                candle_core::Tensor::new(l, model.device())
                    .and_then(|t| log_softmax(&t))
                    .map_err(internal)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let label_ids: Vec<Vec<u32>> = labels
            .iter()
            .map(|l| {
                tokenizer
                    .encode_plain(&format!(" {}", l.trim()))
                    .map_err(LlmError::InvalidInput)
            })
            .collect::<Result<_, _>>()?;
        // Prompts 0 and 1 hold the text, 2 and 3 the content-free input,
        // whose scores are subtracted.
        let sign = [1.0f32, 1.0, -1.0, -1.0];
        let mut scores: Vec<f32> = label_ids
            .iter()
            .map(|l| {
                firsts
                    .iter()
                    .zip(sign)
                    .map(|(lp, s)| s * lp[l[0] as usize])
                    .sum()
            })
            .collect();
        let longer: Vec<(usize, usize)> = (0..labels.len())
            .filter(|&i| label_ids[i].len() > 1)
            .flat_map(|i| (0..4).map(move |c| (i, c)))
            .collect();
        if !longer.is_empty() {
            let mut copies: Vec<KvCache> = longer.iter().map(|&(_, c)| caches[c].clone()).collect();
            let mut steps: Vec<Step<'_>> = longer
                .iter()
                .zip(copies.iter_mut())
                .map(|(&(i, _), c)| Step {
                    tokens: &label_ids[i][..label_ids[i].len() - 1],
                    cache: c,
                })
                .collect();
            let logits = model.forward_all(&mut steps).map_err(internal)?;
            let mut row = 0;
            for &(i, c) in &longer {
                for &next in &label_ids[i][1..] {
                    let lp = logits
                        .get(row)
                        .and_then(|r| log_softmax(&r))
                        .map_err(internal)?;
                    scores[i] += sign[c] * lp[next as usize];
                    row += 1;
                }
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = scores.iter().map(|s| ((s - max) / 2.0).exp()).collect();
        let sum: f32 = exp.iter().sum();
        Ok(exp.into_iter().map(|e| e / sum).collect())
    }

    /// Prefills several prompts together, `chunk` tokens of each per
    /// forward call; the logits after each prompt's last token.
    fn prefill_many(
        model: &Model,
        prompts: &[&[u32]],
        caches: &mut [KvCache],
        chunk: usize,
    ) -> Result<Vec<Vec<f32>>, LlmError> {
        let mut out: Vec<Option<Vec<f32>>> = vec![None; prompts.len()];
        let mut offset = 0;
        loop {
            let active: Vec<usize> = (0..prompts.len())
                .filter(|&i| prompts[i].len() > offset)
                .collect();
            if active.is_empty() {
                break;
            }
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(active.len());
            for (i, cache) in caches.iter_mut().enumerate() {
                if active.contains(&i) {
                    let end = (offset + chunk).min(prompts[i].len());
                    steps.push(Step {
                        tokens: &prompts[i][offset..end],
                        cache,
                    });
                }
            }
            let logits = model.forward(&mut steps).map_err(internal)?;
            for (row, &i) in active.iter().enumerate() {
                if offset + chunk >= prompts[i].len() {
                    out[i] = Some(
                        logits
                            .get(row)
                            .and_then(|r| r.to_vec1::<f32>())
                            .map_err(internal)?,
                    );
                }
            }
            offset += chunk;
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| LlmError::InvalidInput("the prompt is empty".into())))
            .collect()
    }

    fn embed(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>, LlmError> {
        let embedder = self.embedder.as_ref().ok_or(LlmError::ModelNotLoaded)?;
        embedder.embed(texts).map_err(internal)
    }
}
