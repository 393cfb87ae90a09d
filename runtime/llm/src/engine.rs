//! The engine: one worker thread owns the model and runs jobs from a
//! bounded queue; callers get futures. A full queue answers `overloaded`
//! at once, so the pipeline can turn it into backpressure.

use crate::constraint::Constraints;
use crate::embed::Embedder;
use crate::gguf::{GgufFile, LoadError};
use crate::model::{KvCache, Model, Step, log_softmax};
use crate::prefix::PrefixCache;
use crate::sampling::Sampler;
use crate::tokenizer::Tokenizer;
use crate::types::{
    ChatMessage, Completion, FinishReason, GenerateRequest, LlmError, LlmInput, Role, Usage,
};
use candle_core::Device;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The input whose label scores `classify` subtracts, so that what the
/// model prefers with no evidence at all does not count as evidence.
const CONTENT_FREE: &str = "N/A";

/// Prompt tokens per forward call during prefill: bounds the attention
/// score matrix (`heads × chunk × context` floats).
const PREFILL_CHUNK: usize = 256;

/// `[model]` in `ganglion.toml`.
///
/// ```toml
/// [model]
/// path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
/// embedding = "models/all-MiniLM-L6-v2"
/// threads = 2
/// queue = 64
/// context = 2048
/// prefix_cache_mib = 64   # KV state of recent prompts, reused by prompts that share their start
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// A GGUF file of the llama family; none means no generation.
    pub path: Option<PathBuf>,
    /// A folder with a BERT-family sentence encoder; none means no `embed`.
    pub embedding: Option<PathBuf>,
    /// Model threads; default: cores − 1 on more than 2 cores, else all.
    /// The compute pool is process-wide, so the first engine sets it.
    pub threads: Option<usize>,
    /// Requests waiting for the model beyond the one running.
    pub queue: usize,
    /// Longest sequence (prompt + completion) in tokens; capped by the model's own.
    pub context: usize,
    /// Deadline for requests that set none, in milliseconds.
    pub default_deadline_ms: u64,
    /// KV state of recent prompts kept for reuse by later prompts that
    /// start the same way, in MiB; 0 turns prefix reuse off.
    pub prefix_cache_mib: usize,
    /// `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    pub device: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            path: None,
            embedding: None,
            threads: None,
            queue: 64,
            context: 2048,
            default_deadline_ms: 60_000,
            prefix_cache_mib: 64,
            device: "cpu".into(),
        }
    }
}

impl EngineConfig {
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

    pub fn thread_count(&self) -> usize {
        self.threads.filter(|&n| n > 0).unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cores > 2 { cores - 1 } else { cores }
        })
    }
}

enum Job {
    Generate(
        GenerateRequest,
        Instant,
        oneshot::Sender<Result<Completion, LlmError>>,
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
    model_id: String,
    context: usize,
    prefixes: PrefixCache,
}

/// A handle to the engine; cheap to clone. The worker stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Engine {
    jobs: SyncSender<Job>,
    tokenizer: Option<Arc<Tokenizer>>,
    model_id: String,
    has_embedder: bool,
    default_deadline: Duration,
}

/// What a load reports about the model.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub id: String,
    pub architecture: String,
    pub layers: usize,
    pub width: usize,
    pub vocab: usize,
    pub context: usize,
}

impl Engine {
    /// Loads the configured models and starts the worker. Blocking (reads
    /// and converts the weights): call it from a blocking thread.
    pub fn load(config: &EngineConfig) -> Result<(Engine, Option<ModelSummary>), LoadError> {
        Self::load_with_progress(config, true)
    }

    pub fn load_with_progress(
        config: &EngineConfig,
        show_progress: bool,
    ) -> Result<(Engine, Option<ModelSummary>), LoadError> {
        let device = config.device()?;
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
        let (jobs, rx) = std::sync::mpsc::sync_channel(config.queue.max(1));
        let engine = Engine {
            jobs,
            tokenizer,
            model_id: model_id.clone(),
            has_embedder: embedder.is_some(),
            default_deadline: Duration::from_millis(config.default_deadline_ms),
        };
        let worker = Worker {
            model,
            embedder,
            model_id,
            context,
            prefixes: PrefixCache::new(config.prefix_cache_mib << 20),
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

    pub fn model_id(&self) -> &str {
        &self.model_id
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
        let sent = if !ready {
            Err(LlmError::ModelNotLoaded)
        } else {
            match self.jobs.try_send(job(tx)) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(_)) => Err(LlmError::Overloaded),
                Err(TrySendError::Disconnected(_)) => Err(stopped()),
            }
        };
        async move {
            sent?;
            rx.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    pub fn generate(
        &self,
        request: GenerateRequest,
    ) -> impl Future<Output = Result<Completion, LlmError>> + Send + 'static {
        let deadline = self.deadline(request.params.deadline_ms);
        self.submit(self.tokenizer.is_some(), move |tx| {
            Job::Generate(request, deadline, tx)
        })
    }

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

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }
}

fn internal(e: impl std::fmt::Display) -> LlmError {
    LlmError::Internal(e.to_string())
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Generate(req, deadline, tx) => {
                    let r = self
                        .expired(deadline)
                        .and_then(|_| self.generate(req, deadline));
                    let _ = tx.send(r);
                }
                Job::Classify(text, labels, deadline, tx) => {
                    let r = self
                        .expired(deadline)
                        .and_then(|_| self.classify(&text, &labels));
                    let _ = tx.send(r);
                }
                Job::Embed(texts, deadline, tx) => {
                    let r = self.expired(deadline).and_then(|_| self.embed(&texts));
                    let _ = tx.send(r);
                }
            }
        }
    }

    fn expired(&self, deadline: Instant) -> Result<(), LlmError> {
        if Instant::now() >= deadline {
            Err(LlmError::DeadlineExceeded)
        } else {
            Ok(())
        }
    }

    fn prompt_ids(tokenizer: &Tokenizer, input: &LlmInput) -> Result<Vec<u32>, LlmError> {
        let text = match input {
            LlmInput::Raw(text) => text.clone(),
            LlmInput::Chat(messages) => {
                if messages.is_empty() {
                    return Err(LlmError::InvalidInput("no chat messages".into()));
                }
                tokenizer
                    .apply_chat_template(messages)
                    .map_err(LlmError::InvalidInput)?
            }
        };
        let ids = tokenizer.encode(&text).map_err(LlmError::InvalidInput)?;
        if ids.is_empty() {
            return Err(LlmError::InvalidInput("the prompt is empty".into()));
        }
        Ok(ids)
    }

    /// Feeds `ids` into `cache` in chunks; the logits after the last token.
    fn prefill(model: &Model, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, LlmError> {
        let mut out = Self::prefill_many(model, &[ids], std::slice::from_mut(cache))?;
        out.pop()
            .ok_or_else(|| LlmError::InvalidInput("the prompt is empty".into()))
    }

    fn generate(
        &mut self,
        req: GenerateRequest,
        deadline: Instant,
    ) -> Result<Completion, LlmError> {
        let (model, tokenizer, constraints) =
            self.model.as_ref().ok_or(LlmError::ModelNotLoaded)?;
        let p = &req.params;
        let ids = Self::prompt_ids(tokenizer, &req.input)?;
        if ids.len() >= self.context {
            return Err(LlmError::InvalidInput(format!(
                "the prompt has {} tokens; the context holds {}",
                ids.len(),
                self.context
            )));
        }
        let max_tokens = (p.max_tokens as usize).min(self.context - ids.len());
        let mut matcher = constraints.matcher(&p.constraint)?;
        let mut sampler = Sampler::new(p.temperature, p.top_k, p.top_p, p.repeat_penalty, p.seed);
        let (cached, mut cache) = self.prefixes.lookup(&ids).map_err(internal)?;
        let mut logits = Self::prefill(model, &ids[cached..], &mut cache)?;
        self.prefixes.insert(&ids, &cache);
        let mut history = ids.clone();
        let mut generated: Vec<u32> = Vec::new();
        let stops: Vec<&str> = p
            .stop
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        // Set when a stop string cut the text; otherwise decoded at the end.
        let mut text: Option<String> = None;
        let mut finish = FinishReason::Length;
        while generated.len() < max_tokens {
            if Instant::now() >= deadline {
                finish = FinishReason::Deadline;
                break;
            }
            let token = match &mut matcher {
                Some(m) => {
                    if m.is_stopped() {
                        finish = FinishReason::ConstraintComplete;
                        break;
                    }
                    let mask = m
                        .compute_mask()
                        .map_err(|e| LlmError::ConstraintUnsatisfiable(e.to_string()))?;
                    let allowed = |t: u32| mask.is_allowed(t);
                    sampler.sample(&mut logits, &history, Some(&allowed))
                }
                None => sampler.sample(&mut logits, &history, None),
            }
            .ok_or_else(|| {
                LlmError::ConstraintUnsatisfiable("no token can continue the output".into())
            })?;
            if tokenizer.is_end_of_generation(token) {
                finish = FinishReason::Stop;
                break;
            }
            if let Some(m) = &mut matcher {
                m.consume_token(token)
                    .map_err(|e| LlmError::ConstraintUnsatisfiable(e.to_string()))?;
            }
            generated.push(token);
            history.push(token);
            if !stops.is_empty() {
                let so_far = tokenizer.decode(&generated);
                if let Some(cut) = stops.iter().filter_map(|s| so_far.find(s)).min() {
                    text = Some(so_far[..cut].to_owned());
                    finish = FinishReason::Stop;
                    break;
                }
            }
            if matcher.as_ref().is_some_and(|m| m.is_stopped()) {
                finish = FinishReason::ConstraintComplete;
                break;
            }
            if generated.len() == max_tokens {
                break;
            }
            logits = model
                .forward(&mut [Step {
                    tokens: &[token],
                    cache: &mut cache,
                }])
                .and_then(|t| t.squeeze(0)?.to_vec1::<f32>())
                .map_err(internal)?;
        }
        Ok(Completion {
            text: text.unwrap_or_else(|| tokenizer.decode(&generated)),
            finish_reason: finish,
            usage: Usage {
                prompt_tokens: ids.len() as u32,
                completion_tokens: generated.len() as u32,
                cached_tokens: cached as u32,
            },
            model: self.model_id.clone(),
        })
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
        let firsts = Self::prefill_many(model, &prompts, &mut caches)?
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

    /// Prefills several prompts together, `PREFILL_CHUNK` tokens of each per
    /// forward call; the logits after each prompt's last token.
    fn prefill_many(
        model: &Model,
        prompts: &[&[u32]],
        caches: &mut [KvCache],
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
                    let end = (offset + PREFILL_CHUNK).min(prompts[i].len());
                    steps.push(Step {
                        tokens: &prompts[i][offset..end],
                        cache,
                    });
                }
            }
            let logits = model.forward(&mut steps).map_err(internal)?;
            for (row, &i) in active.iter().enumerate() {
                if offset + PREFILL_CHUNK >= prompts[i].len() {
                    out[i] = Some(
                        logits
                            .get(row)
                            .and_then(|r| r.to_vec1::<f32>())
                            .map_err(internal)?,
                    );
                }
            }
            offset += PREFILL_CHUNK;
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
