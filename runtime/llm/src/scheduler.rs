//! Continuous batching: every `generate` request becomes a sequence in one
//! running batch, and each step runs one forward pass over all of them, so
//! each weight is read once per step for the whole batch.
//!
//! - Sequences join and leave between steps. A newcomer's prompt is fed in
//!   chunks of at most `prefill_chunk` tokens, and one step carries at most
//!   that many prompt tokens in all, so a long prompt delays the running
//!   sequences by one chunk per step rather than by its whole prefill.
//! - Admission is fair across rules: the next sequence comes from the rule
//!   with the fewest sequences running, then the one admitted longest ago,
//!   so one busy rule cannot starve the others. At most `max_batch` run.
//! - KV memory is bounded: a sequence reserves the KV state of its prompt
//!   plus `max-tokens` when it is admitted, and is admitted only while the
//!   reservations fit in `kv_cache_mib`. A request that cannot fit even
//!   alone is refused as invalid input; others wait, oldest rule first, so a
//!   large request is not passed over forever.
//! - Deadlines are checked between steps: a waiting request past its
//!   deadline gets `deadline-exceeded`; a running one ends with what it has
//!   generated and finish reason `deadline` (or `deadline-exceeded` when it
//!   has nothing yet). A request whose caller has gone is dropped.
//! - A sequence's chunks do not depend on what else is in the batch, and
//!   every kernel computes a row of output from that row's input alone, so
//!   a sequence's logits are the same whether it runs alone or with others
//!   (docs/llm.md, "Batch invariance").

use crate::constraint::Constraints;
use crate::model::{KvCache, Model, Step};
use crate::prefix::PrefixCache;
use crate::sampling::Sampler;
pub use crate::stats::EngineStats;
use crate::stats::TTFT_BUCKETS;
use crate::tokenizer::Tokenizer;
use crate::types::{Completion, FinishReason, GenerateRequest, LlmError, LlmInput, Usage};
use llguidance::Matcher;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::oneshot;

pub(crate) type Reply = oneshot::Sender<Result<Completion, LlmError>>;

/// Where a streaming request's text goes as it is generated: pieces of
/// the completion's text, in order, each ending at a character boundary
/// and never inside a possible stop string. The channel is bounded; when
/// it is full the text waits in the sequence's tokens and goes out with
/// the next piece, so the worker never blocks on a slow reader. The
/// [`Completion`] stays the whole answer: a reader appends what its
/// text has beyond the pieces received.
pub type Deltas = tokio::sync::mpsc::Sender<String>;

/// A streaming request's channel and how many bytes of its text are out.
struct Stream {
    tx: Deltas,
    sent: usize,
}

/// Limits of the running batch, from `EngineConfig`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_batch: usize,
    pub kv_bytes: usize,
    pub prefill_chunk: usize,
    pub context: usize,
}

/// Counters the worker publishes for [`crate::Engine::stats`].
#[derive(Default)]
pub(crate) struct SharedStats {
    /// Jobs accepted and not yet running or answered.
    pub pending: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_bytes: AtomicUsize,
    pub kv_peak_bytes: AtomicUsize,
    pub kv_reserved_bytes: AtomicUsize,
    pub steps: AtomicU64,
    pub step_sequences: AtomicU64,
    pub largest_batch: AtomicUsize,
    pub prefill_tokens: AtomicU64,
    pub decode_tokens: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefix_misses: AtomicU64,
    /// Time to first token: requests per bucket of [`TTFT_BUCKETS`] (not
    /// cumulative; the last is beyond them), the sum in microseconds.
    pub ttft: [AtomicU64; TTFT_BUCKETS.len() + 1],
    pub ttft_sum_us: AtomicU64,
}

impl SharedStats {
    pub fn snapshot(&self, kv_bound_bytes: usize) -> EngineStats {
        EngineStats {
            waiting: self.pending.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            kv_bytes: self.kv_bytes.load(Ordering::Relaxed),
            kv_peak_bytes: self.kv_peak_bytes.load(Ordering::Relaxed),
            kv_reserved_bytes: self.kv_reserved_bytes.load(Ordering::Relaxed),
            kv_bound_bytes,
            steps: self.steps.load(Ordering::Relaxed),
            step_sequences: self.step_sequences.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
            prefill_tokens: self.prefill_tokens.load(Ordering::Relaxed),
            decode_tokens: self.decode_tokens.load(Ordering::Relaxed),
            prefix_hits: self.prefix_hits.load(Ordering::Relaxed),
            prefix_misses: self.prefix_misses.load(Ordering::Relaxed),
            ttft: std::array::from_fn(|i| self.ttft[i].load(Ordering::Relaxed)),
            ttft_sum_us: self.ttft_sum_us.load(Ordering::Relaxed),
        }
    }

    /// Counts a request's time from acceptance to its first token.
    fn first_token(&self, after: std::time::Duration) {
        let seconds = after.as_secs_f64();
        let i = TTFT_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(TTFT_BUCKETS.len());
        self.ttft[i].fetch_add(1, Ordering::Relaxed);
        self.ttft_sum_us.fetch_add(
            after.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

/// A request accepted and checked, not yet running.
struct Waiting {
    ids: Vec<u32>,
    max_tokens: usize,
    matcher: Option<Matcher>,
    sampler: Sampler,
    stops: Vec<String>,
    deadline: Instant,
    /// When the engine's worker took it, for the time to first token.
    accepted: Instant,
    reserve: usize,
    reply: Reply,
    stream: Option<Stream>,
}

/// A running sequence.
struct Sequence {
    rule: String,
    w: Waiting,
    cached: usize,
    /// Prompt tokens in `cache`.
    fed: usize,
    cache: KvCache,
    /// The last sampled token, fed at the next step.
    next: Option<u32>,
    history: Vec<u32>,
    generated: Vec<u32>,
}

enum Outcome {
    /// The next token, and the text so far when it was decoded to look
    /// for stop strings (a streaming sequence then need not decode again).
    Continue(u32, Option<String>),
    Done(Result<Completion, LlmError>),
}

pub(crate) struct Scheduler {
    limits: Limits,
    bytes_per_token: usize,
    stats: Arc<SharedStats>,
    /// Waiting requests per rule, oldest first.
    waiting: HashMap<String, VecDeque<Waiting>>,
    /// When each rule last had a sequence admitted (a counter, for order).
    admitted: HashMap<String, u64>,
    tick: u64,
    /// In order of admission.
    running: Vec<Sequence>,
    reserved: usize,
    answers: Vec<(Reply, Result<Completion, LlmError>)>,
    model_id: String,
}

fn internal(e: impl std::fmt::Display) -> LlmError {
    LlmError::Internal(e.to_string())
}

impl Scheduler {
    pub fn new(
        limits: Limits,
        bytes_per_token: usize,
        stats: Arc<SharedStats>,
        model_id: String,
    ) -> Scheduler {
        Scheduler {
            limits,
            bytes_per_token,
            stats,
            waiting: HashMap::new(),
            admitted: HashMap::new(),
            tick: 0,
            running: Vec::new(),
            reserved: 0,
            answers: Vec::new(),
            model_id,
        }
    }

    /// Nothing running and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.values().all(VecDeque::is_empty)
    }

    fn left_waiting(&self, n: usize) {
        self.stats.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// Checks a request and queues it under its rule; answers at once when
    /// it is invalid or already past its deadline.
    pub fn enqueue(
        &mut self,
        tokenizer: &Tokenizer,
        constraints: &Constraints,
        req: GenerateRequest,
        deadline: Instant,
        reply: Reply,
        deltas: Option<Deltas>,
    ) {
        match self.check(tokenizer, constraints, &req, deadline, reply) {
            Ok(mut w) => {
                w.stream = deltas.map(|tx| Stream { tx, sent: 0 });
                self.waiting.entry(req.rule).or_default().push_back(w)
            }
            Err((e, reply)) => {
                self.left_waiting(1);
                let _ = reply.send(Err(e));
            }
        }
    }

    fn check(
        &self,
        tokenizer: &Tokenizer,
        constraints: &Constraints,
        req: &GenerateRequest,
        deadline: Instant,
        reply: Reply,
    ) -> Result<Waiting, (LlmError, Reply)> {
        macro_rules! fail {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Err((e, reply)),
                }
            };
        }
        if Instant::now() >= deadline {
            return Err((LlmError::DeadlineExceeded, reply));
        }
        let p = &req.params;
        let ids = fail!(prompt_ids(tokenizer, &req.input));
        let context = self.limits.context;
        if ids.len() >= context {
            return Err((
                LlmError::InvalidInput(format!(
                    "the prompt has {} tokens; the context holds {context}",
                    ids.len()
                )),
                reply,
            ));
        }
        let max_tokens = (p.max_tokens as usize).min(context - ids.len());
        let reserve = (ids.len() + max_tokens) * self.bytes_per_token;
        if reserve > self.limits.kv_bytes {
            return Err((
                LlmError::InvalidInput(format!(
                    "{} prompt tokens and max-tokens {max_tokens} need {:.1} MiB of KV state; \
                     the engine's bound ([model] kv_cache_mib) is {:.1} MiB",
                    ids.len(),
                    reserve as f64 / 1048576.0,
                    self.limits.kv_bytes as f64 / 1048576.0
                )),
                reply,
            ));
        }
        let matcher = fail!(constraints.matcher(&p.constraint));
        Ok(Waiting {
            ids,
            max_tokens,
            matcher,
            sampler: Sampler::new(p.temperature, p.top_k, p.top_p, p.repeat_penalty, p.seed),
            stops: p.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            deadline,
            accepted: Instant::now(),
            reserve,
            reply,
            stream: None,
        })
    }

    /// Answers expired and abandoned requests, waiting or running.
    fn expire(&mut self, tokenizer: &Tokenizer) {
        let now = Instant::now();
        let mut gone = 0;
        for queue in self.waiting.values_mut() {
            for w in std::mem::take(queue) {
                if w.reply.is_closed() {
                    gone += 1;
                } else if now >= w.deadline {
                    gone += 1;
                    self.answers
                        .push((w.reply, Err(LlmError::DeadlineExceeded)));
                } else {
                    queue.push_back(w);
                }
            }
        }
        self.left_waiting(gone);
        self.waiting.retain(|_, q| !q.is_empty());
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.w.reply.is_closed() {
                let s = self.running.remove(i);
                self.reserved -= s.w.reserve;
            } else if now >= s.w.deadline {
                let s = self.running.remove(i);
                let r = if s.generated.is_empty() {
                    Err(LlmError::DeadlineExceeded)
                } else {
                    Ok(completion(
                        tokenizer,
                        &s,
                        None,
                        FinishReason::Deadline,
                        &self.model_id,
                    ))
                };
                self.finish(s, r);
            } else {
                i += 1;
            }
        }
    }

    /// Takes the sequence's reservation back; its answer goes out after
    /// the stats are published, so a caller that reads them sees its
    /// sequence gone.
    fn finish(&mut self, s: Sequence, r: Result<Completion, LlmError>) {
        self.reserved -= s.w.reserve;
        self.answers.push((s.w.reply, r));
    }

    fn publish_and_answer(&mut self) {
        self.publish();
        for (reply, r) in self.answers.drain(..) {
            let _ = reply.send(r);
        }
    }

    /// Moves waiting requests into the batch while there is room: a slot
    /// and KV memory for the fairest rule's oldest request.
    fn admit(&mut self, prefixes: &mut PrefixCache) {
        while self.running.len() < self.limits.max_batch {
            let running_of = |rule: &str| self.running.iter().filter(|s| s.rule == rule).count();
            let Some(rule) = self
                .waiting
                .keys()
                .min_by_key(|r| {
                    (
                        running_of(r),
                        self.admitted.get(*r).copied().unwrap_or(0),
                        self.waiting[*r].front().map(|w| w.deadline),
                    )
                })
                .cloned()
            else {
                return;
            };
            let queue = self.waiting.get_mut(&rule).expect("rule is waiting");
            let need = queue.front().map_or(0, |w| w.reserve);
            if self.reserved + need > self.limits.kv_bytes {
                return;
            }
            let w = queue.pop_front().expect("queue is not empty");
            if queue.is_empty() {
                self.waiting.remove(&rule);
            }
            self.left_waiting(1);
            self.tick += 1;
            self.admitted.insert(rule.clone(), self.tick);
            self.reserved += w.reserve;
            let (cached, mut cache) = match prefixes.lookup(&w.ids) {
                Ok(hit) => {
                    let counter = if hit.0 > 0 {
                        &self.stats.prefix_hits
                    } else {
                        &self.stats.prefix_misses
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    hit
                }
                Err(e) => {
                    self.reserved -= w.reserve;
                    self.answers.push((w.reply, Err(internal(e))));
                    continue;
                }
            };
            cache.reserve(w.ids.len() + w.max_tokens);
            self.running.push(Sequence {
                rule,
                history: w.ids.clone(),
                w,
                cached,
                fed: cached,
                cache,
                next: None,
                generated: Vec::new(),
            });
        }
    }

    /// One step: expire, admit, one forward pass over the batch, then a
    /// token for each sequence whose prompt is in. False when there was
    /// nothing to run.
    pub fn step(
        &mut self,
        model: &Model,
        tokenizer: &Tokenizer,
        prefixes: &mut PrefixCache,
    ) -> bool {
        self.expire(tokenizer);
        self.admit(prefixes);
        self.publish_and_answer();
        if self.running.is_empty() {
            return false;
        }
        // What each sequence feeds: its sampled token, or its next prompt
        // chunk while the step's prompt budget lasts (the first chunk always
        // goes, so a prompt never waits behind decoding).
        let mut budget = self.limits.prefill_chunk;
        let mut plan: Vec<(usize, usize, usize)> = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter().enumerate() {
            if s.next.is_some() {
                plan.push((i, 0, 1));
            } else if s.fed < s.w.ids.len() {
                let len = (s.w.ids.len() - s.fed).min(self.limits.prefill_chunk);
                if len <= budget || budget == self.limits.prefill_chunk {
                    budget = budget.saturating_sub(len);
                    plan.push((i, s.fed, len));
                }
            }
        }
        let tokens: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(i, from, len)| {
                let s = &self.running[i];
                match s.next {
                    Some(t) => vec![t],
                    None => s.w.ids[from..from + len].to_vec(),
                }
            })
            .collect();
        let result = {
            let mut caches: Vec<Option<&mut KvCache>> = self
                .running
                .iter_mut()
                .map(|s| Some(&mut s.cache))
                .collect();
            let mut steps: Vec<Step<'_>> = plan
                .iter()
                .zip(&tokens)
                .map(|(&(i, _, _), t)| Step {
                    tokens: t,
                    cache: caches[i].take().expect("each sequence once per step"),
                })
                .collect();
            model
                .forward(&mut steps)
                .and_then(|l| l.to_vec2::<f32>())
                .map_err(internal)
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .step_sequences
            .fetch_add(plan.len() as u64, Ordering::Relaxed);
        self.stats
            .largest_batch
            .fetch_max(plan.len(), Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The caches of the stepped sequences are now unknown.
                let mut stepped: Vec<usize> = plan.iter().map(|p| p.0).collect();
                stepped.sort_unstable();
                for &i in stepped.iter().rev() {
                    let s = self.running.remove(i);
                    self.finish(s, Err(e.clone()));
                }
                self.publish_and_answer();
                return true;
            }
        };
        let mut done: Vec<(usize, Result<Completion, LlmError>)> = Vec::new();
        for (&(i, _, len), mut row) in plan.iter().zip(logits) {
            let s = &mut self.running[i];
            if s.next.take().is_none() {
                self.stats
                    .prefill_tokens
                    .fetch_add(len as u64, Ordering::Relaxed);
                s.fed += len;
                if s.fed < s.w.ids.len() {
                    continue;
                }
                prefixes.insert(&s.w.ids, &s.cache);
                self.stats.first_token(s.w.accepted.elapsed());
            } else {
                self.stats.decode_tokens.fetch_add(1, Ordering::Relaxed);
            }
            match advance(s, tokenizer, &mut row, &self.model_id) {
                Outcome::Continue(t, text) => {
                    s.next = Some(t);
                    stream_out(s, tokenizer, text);
                }
                Outcome::Done(r) => done.push((i, r)),
            }
        }
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, r) in done {
            let s = self.running.remove(i);
            self.finish(s, r);
        }
        self.publish_and_answer();
        true
    }

    fn publish(&self) {
        let kv: usize = self.running.iter().map(|s| s.cache.bytes()).sum();
        self.stats.kv_bytes.store(kv, Ordering::Relaxed);
        self.stats.kv_peak_bytes.fetch_max(kv, Ordering::Relaxed);
        self.stats
            .kv_reserved_bytes
            .store(self.reserved, Ordering::Relaxed);
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
    }
}

fn completion(
    tokenizer: &Tokenizer,
    s: &Sequence,
    text: Option<String>,
    finish: FinishReason,
    model: &str,
) -> Completion {
    Completion {
        text: text.unwrap_or_else(|| tokenizer.decode(&s.generated)),
        finish_reason: finish,
        usage: Usage {
            prompt_tokens: s.w.ids.len() as u32,
            completion_tokens: s.generated.len() as u32,
            cached_tokens: s.cached as u32,
        },
        model: model.to_owned(),
    }
}

/// Sends the sequence's new text to its stream, if it has one: up to the
/// end of the text decoded so far, less a trailing U+FFFD (a character
/// whose bytes are not all generated yet) and less any tail that could be
/// the start of a stop string. A full channel is tried again next token.
/// `text` is the text so far when the caller has it decoded already.
fn stream_out(s: &mut Sequence, tokenizer: &Tokenizer, text: Option<String>) {
    let Some(stream) = &mut s.w.stream else {
        return;
    };
    let text = text.unwrap_or_else(|| tokenizer.decode(&s.generated));
    let end = safe_end(&text, &s.w.stops);
    if end <= stream.sent || !text.is_char_boundary(stream.sent) {
        return;
    }
    if stream
        .tx
        .try_send(text[stream.sent..end].to_owned())
        .is_ok()
    {
        stream.sent = end;
    }
}

/// Where streamed text may end: before a trailing U+FFFD and before the
/// longest tail of `text` that is a proper prefix of a stop string.
pub(crate) fn safe_end(text: &str, stops: &[String]) -> usize {
    let end = text.strip_suffix('\u{FFFD}').unwrap_or(text).len();
    let held = stops
        .iter()
        .map(|stop| {
            (1..stop.len().min(end + 1))
                .rev()
                .filter(|&k| stop.is_char_boundary(k))
                .find(|&k| text[..end].ends_with(&stop[..k]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    end - held
}

/// Samples the sequence's next token from `logits` and decides whether the
/// sequence goes on.
fn advance(s: &mut Sequence, tokenizer: &Tokenizer, logits: &mut [f32], model: &str) -> Outcome {
    let done = |s: &Sequence, text: Option<String>, f: FinishReason| {
        Outcome::Done(Ok(completion(tokenizer, s, text, f, model)))
    };
    let unsatisfiable = |e: String| Outcome::Done(Err(LlmError::ConstraintUnsatisfiable(e)));
    if s.generated.len() >= s.w.max_tokens {
        return done(s, None, FinishReason::Length);
    }
    let token = match &mut s.w.matcher {
        Some(m) => {
            if m.is_stopped() {
                return done(s, None, FinishReason::ConstraintComplete);
            }
            let mask = match m.compute_mask() {
                Ok(mask) => mask,
                Err(e) => return unsatisfiable(e.to_string()),
            };
            let allowed = |t: u32| mask.is_allowed(t);
            s.w.sampler.sample(logits, &s.history, Some(&allowed))
        }
        None => s.w.sampler.sample(logits, &s.history, None),
    };
    let Some(token) = token else {
        return unsatisfiable("no token can continue the output".into());
    };
    if tokenizer.is_end_of_generation(token) {
        return done(s, None, FinishReason::Stop);
    }
    if let Some(m) = &mut s.w.matcher
        && let Err(e) = m.consume_token(token)
    {
        return unsatisfiable(e.to_string());
    }
    s.generated.push(token);
    s.history.push(token);
    let mut so_far = None;
    if !s.w.stops.is_empty() {
        let text = tokenizer.decode(&s.generated);
        if let Some(cut) = s.w.stops.iter().filter_map(|x| text.find(x)).min() {
            return done(s, Some(text[..cut].to_owned()), FinishReason::Stop);
        }
        so_far = Some(text);
    }
    if s.w.matcher.as_ref().is_some_and(|m| m.is_stopped()) {
        return done(s, None, FinishReason::ConstraintComplete);
    }
    if s.generated.len() == s.w.max_tokens {
        return done(s, None, FinishReason::Length);
    }
    Outcome::Continue(token, so_far)
}

/// The prompt's token ids: a chat through the model's template, raw text as
/// it is.
pub(crate) fn prompt_ids(tokenizer: &Tokenizer, input: &LlmInput) -> Result<Vec<u32>, LlmError> {
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
