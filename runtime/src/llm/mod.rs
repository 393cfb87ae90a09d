//! The language-model backend that plugins reach through the WIT `llm`
//! interface. The host holds an `Arc<dyn LlmEngine>`; the native engine
//! implements it, [`RemoteEngine`] sends the calls to an OpenAI-compatible
//! server (`[remote.<name>]`), [`NoModel`] stands in when no model is
//! configured, and [`FakeLlm`] scripts answers for tests. [`Engines`] holds
//! the local engine and the remotes, and picks one per rule.
//!
//! Implementations must not block the caller's executor: run the model on
//! threads of its own and return futures that wait for it.

#[cfg(feature = "remote")]
mod breaker;
#[cfg(feature = "remote")]
mod http;
#[cfg(feature = "remote")]
mod remote;
#[cfg(all(test, feature = "remote"))]
mod remote_tests;

#[cfg(feature = "remote")]
pub use breaker::BreakerState;
#[cfg(feature = "remote")]
pub use remote::{RemoteEngine, RemoteStats};

use crate::config::EngineChoice;
use crate::types::{Completion, FinishReason, LlmError, Usage};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

/// What every [`LlmEngine`] call returns: a boxed, sendable future.
pub type LlmFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LlmError>> + Send + 'a>>;

pub use ganglion_llm::types::{GenerateRequest, LlmInput};

/// Where [`LlmEngine::generate_streaming`] sends text as it is generated:
/// pieces of the completion's text in order, each ending at a character
/// boundary and never inside a possible stop string. An engine sends with
/// `try_send` and never waits on a slow reader: text a full channel does
/// not take stays in the completion.
pub type Deltas = tokio::sync::mpsc::Sender<String>;

/// A language model as the `llm` interface uses it; see the module docs for
/// the threading rule.
pub trait LlmEngine: Send + Sync + 'static {
    /// The model's identity, as reported in completions.
    fn model_id(&self) -> String;
    /// Generates a completion for a chat or raw-text request.
    fn generate(&self, request: GenerateRequest) -> LlmFuture<'_, Completion>;
    /// Like [`LlmEngine::generate`], sending the text to `deltas` as it is
    /// generated. The completion is still the whole answer: what its text
    /// has beyond the pieces received is the rest. The default sends
    /// nothing, so the completion carries all of it.
    fn generate_streaming(
        &self,
        request: GenerateRequest,
        deltas: Deltas,
    ) -> LlmFuture<'_, Completion> {
        drop(deltas);
        self.generate(request)
    }
    /// One probability per label.
    fn classify(&self, text: String, labels: Vec<String>) -> LlmFuture<'_, Vec<f32>>;
    /// L2-normalised vectors, one per text.
    fn embed(&self, texts: Vec<String>) -> LlmFuture<'_, Vec<Vec<f32>>>;
    /// Number of tokens `text` encodes to with the model's tokenizer.
    fn count_tokens(&self, text: String) -> LlmFuture<'_, u32>;
    /// The engine's queue, batch and KV cache now, for `/metrics`; none for
    /// an engine that keeps no such counters.
    fn stats(&self) -> Option<ganglion_llm::EngineStats> {
        None
    }
}

/// The configured model, or [`NoModel`] when none is configured or it does
/// not load: a broken model file is reported and the rules that need the
/// model dead-letter their messages with `model-not-loaded`, while the
/// others keep running.
pub async fn load_configured(config: &ganglion_llm::EngineConfig) -> Arc<dyn LlmEngine> {
    if config.path.is_none() && config.embedding.is_none() {
        tracing::info!("no model configured; rules that call the model will dead-letter");
        return Arc::new(NoModel);
    }
    load_engine(config).await
}

#[cfg(feature = "llm")]
async fn load_engine(config: &ganglion_llm::EngineConfig) -> Arc<dyn LlmEngine> {
    let cfg = config.clone();
    match tokio::task::spawn_blocking(move || ganglion_llm::Engine::load(&cfg)).await {
        Ok(Ok((engine, summary))) => {
            if let Some(s) = summary {
                tracing::info!(model = %s.id, arch = %s.architecture, layers = s.layers, width = s.width, context = s.context, threads = config.thread_count(), "model loaded");
            }
            Arc::new(engine)
        }
        Ok(Err(e)) => {
            tracing::error!(
                "{e}; running without a model (fetch the default one with `cargo run -p xtask -- model`)"
            );
            Arc::new(NoModel)
        }
        Err(e) => {
            tracing::error!("model loader failed: {e}; running without a model");
            Arc::new(NoModel)
        }
    }
}

/// A build without the `llm` feature has no engine: a configured model is
/// an error reported once, and the rules that need it dead-letter.
#[cfg(not(feature = "llm"))]
async fn load_engine(config: &ganglion_llm::EngineConfig) -> Arc<dyn LlmEngine> {
    tracing::error!(
        model = ?config.path,
        embedding = ?config.embedding,
        "a model is configured but this build of ganglion has no model engine (cargo feature `llm`); running without a model"
    );
    Arc::new(NoModel)
}

/// The engines a gateway's rules can use: the local one (`[model]`) and
/// one per `[remote.<name>]`. A rule's `engine` key picks one; `[model]
/// engine` picks the default, which plugins also reach. Cheap to clone.
#[derive(Clone)]
pub struct Engines {
    local: Arc<dyn LlmEngine>,
    default: Arc<dyn LlmEngine>,
    #[cfg(feature = "remote")]
    remotes: std::collections::BTreeMap<String, Arc<RemoteEngine>>,
}

impl Engines {
    /// Only `local`, which is also the default.
    pub fn local(local: Arc<dyn LlmEngine>) -> Engines {
        Engines {
            default: local.clone(),
            local,
            #[cfg(feature = "remote")]
            remotes: Default::default(),
        }
    }

    /// `local` and a [`RemoteEngine`] per `[remote.<name>]` (each falling
    /// back on `local`), with `default` (`[model] engine`: `local` or
    /// `remote:<name>`; none: `local`) as the default. An error names the
    /// table or key at fault.
    pub fn build(
        local: Arc<dyn LlmEngine>,
        remotes: &std::collections::BTreeMap<String, crate::config::RemoteConfig>,
        default: Option<&str>,
    ) -> Result<Engines, String> {
        let mut engines = Engines::local(local);
        #[cfg(feature = "remote")]
        for (name, config) in remotes {
            let remote = RemoteEngine::new(name, config.clone(), engines.local.clone())?;
            engines.remotes.insert(name.clone(), Arc::new(remote));
        }
        #[cfg(not(feature = "remote"))]
        if let Some(name) = remotes.keys().next() {
            return Err(format!(
                "[remote.{name}]: this build of ganglion has no remote engine (cargo feature `remote`)"
            ));
        }
        if let Some(choice) = default {
            let choice: EngineChoice = choice.parse().map_err(|e| format!("[model] {e}"))?;
            engines.default = engines
                .select(Some(&choice))
                .map_err(|e| format!("[model] {e}"))?;
        }
        Ok(engines)
    }

    /// The local engine (`[model]`), whatever the default is.
    pub fn local_engine(&self) -> &Arc<dyn LlmEngine> {
        &self.local
    }

    /// The engine rules and plugins use unless a rule picks another.
    pub fn default_engine(&self) -> &Arc<dyn LlmEngine> {
        &self.default
    }

    /// The engine `choice` names (none: the default); an error for a
    /// remote that is not configured.
    pub fn select(&self, choice: Option<&EngineChoice>) -> Result<Arc<dyn LlmEngine>, String> {
        match choice {
            None => Ok(self.default.clone()),
            Some(EngineChoice::Local) => Ok(self.local.clone()),
            #[cfg(feature = "remote")]
            Some(EngineChoice::Remote(name)) => match self.remotes.get(name) {
                Some(r) => Ok(r.clone()),
                None => Err(format!(
                    "engine `remote:{name}`: no [remote.{name}] in ganglion.toml"
                )),
            },
            #[cfg(not(feature = "remote"))]
            Some(EngineChoice::Remote(name)) => Err(format!(
                "engine `remote:{name}`: this build of ganglion has no remote engine (cargo feature `remote`)"
            )),
        }
    }

    /// The remote engines, by name, for `/metrics`.
    #[cfg(feature = "remote")]
    pub fn remotes(&self) -> impl Iterator<Item = &Arc<RemoteEngine>> {
        self.remotes.values()
    }
}

/// The engine when no model is configured: every call is `model-not-loaded`.
pub struct NoModel;

impl LlmEngine for NoModel {
    fn model_id(&self) -> String {
        String::new()
    }
    fn generate(&self, _: GenerateRequest) -> LlmFuture<'_, Completion> {
        Box::pin(async { Err(LlmError::ModelNotLoaded) })
    }
    fn classify(&self, _: String, _: Vec<String>) -> LlmFuture<'_, Vec<f32>> {
        Box::pin(async { Err(LlmError::ModelNotLoaded) })
    }
    fn embed(&self, _: Vec<String>) -> LlmFuture<'_, Vec<Vec<f32>>> {
        Box::pin(async { Err(LlmError::ModelNotLoaded) })
    }
    fn count_tokens(&self, _: String) -> LlmFuture<'_, u32> {
        Box::pin(async { Err(LlmError::ModelNotLoaded) })
    }
}

type Script = dyn Fn(&GenerateRequest) -> Result<String, LlmError> + Send + Sync;

/// A scripted engine for tests: `generate` answers with what the script
/// returns for the request, and every request is recorded. `classify` scores
/// a label by how many of its words occur in the text; `embed` hashes words
/// into a 64-dimensional bag of words; `count_tokens` counts words.
pub struct FakeLlm {
    script: Box<Script>,
    delay: std::time::Duration,
    requests: Mutex<Vec<GenerateRequest>>,
}

impl FakeLlm {
    /// An engine whose `generate` answers with `script`'s text or error.
    pub fn new(
        script: impl Fn(&GenerateRequest) -> Result<String, LlmError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(FakeLlm {
            script: Box::new(script),
            delay: std::time::Duration::ZERO,
            requests: Mutex::new(Vec::new()),
        })
    }

    /// Always answers `text`.
    pub fn fixed(text: &str) -> Arc<Self> {
        let text = text.to_owned();
        Self::new(move |_| Ok(text.clone()))
    }

    /// Answers after `delay`, as a slow model would.
    pub fn with_delay(
        delay: std::time::Duration,
        script: impl Fn(&GenerateRequest) -> Result<String, LlmError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(FakeLlm {
            script: Box::new(script),
            delay,
            requests: Mutex::new(Vec::new()),
        })
    }

    /// The `generate` requests received so far, in order.
    pub fn requests(&self) -> Vec<GenerateRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl FakeLlm {
    fn completion(&self, request: &GenerateRequest, text: String) -> Completion {
        let prompt_tokens = match &request.input {
            LlmInput::Chat(m) => m.iter().map(|m| words(&m.content).count()).sum(),
            LlmInput::Raw(t) => words(t).count(),
        } as u32;
        Completion {
            usage: Usage {
                prompt_tokens,
                completion_tokens: words(&text).count() as u32,
                cached_tokens: 0,
            },
            text,
            finish_reason: FinishReason::Stop,
            model: self.model_id(),
        }
    }
}

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

impl LlmEngine for FakeLlm {
    fn model_id(&self) -> String {
        "fake".into()
    }

    fn generate(&self, request: GenerateRequest) -> LlmFuture<'_, Completion> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(request.clone());
            let text = (self.script)(&request)?;
            Ok(self.completion(&request, text))
        })
    }

    /// Sends the scripted text word by word (each with the spaces after
    /// it), waiting a tenth of the delay before each word.
    fn generate_streaming(
        &self,
        request: GenerateRequest,
        deltas: Deltas,
    ) -> LlmFuture<'_, Completion> {
        Box::pin(async move {
            self.requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(request.clone());
            let text = (self.script)(&request)?;
            for word in text.split_inclusive(' ') {
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay / 10).await;
                }
                let _ = deltas.try_send(word.to_owned());
            }
            Ok(self.completion(&request, text))
        })
    }

    fn classify(&self, text: String, labels: Vec<String>) -> LlmFuture<'_, Vec<f32>> {
        Box::pin(async move {
            if labels.is_empty() {
                return Err(LlmError::InvalidInput("no labels".into()));
            }
            let text: Vec<String> = words(&text).collect();
            let scores: Vec<f32> = labels
                .iter()
                .map(|l| 1.0 + words(l).filter(|w| text.contains(w)).count() as f32)
                .collect();
            let sum: f32 = scores.iter().sum();
            Ok(scores.into_iter().map(|s| s / sum).collect())
        })
    }

    fn embed(&self, texts: Vec<String>) -> LlmFuture<'_, Vec<Vec<f32>>> {
        Box::pin(async move {
            Ok(texts
                .iter()
                .map(|t| {
                    let mut v = vec![0f32; 64];
                    for w in words(t) {
                        let h = blake3::hash(w.as_bytes());
                        v[h.as_bytes()[0] as usize % 64] += 1.0;
                    }
                    l2_normalised(v)
                })
                .collect())
        })
    }

    fn count_tokens(&self, text: String) -> LlmFuture<'_, u32> {
        Box::pin(async move { Ok(words(&text).count() as u32) })
    }
}

/// The native engine (`ganglion-llm`): generation, classification and
/// embedding run on the engine's worker; token counting on a blocking
/// thread.
#[cfg(feature = "llm")]
impl LlmEngine for ganglion_llm::Engine {
    fn model_id(&self) -> String {
        ganglion_llm::Engine::model_id(self).to_owned()
    }
    fn generate(&self, request: GenerateRequest) -> LlmFuture<'_, Completion> {
        Box::pin(ganglion_llm::Engine::generate(self, request))
    }
    fn generate_streaming(
        &self,
        request: GenerateRequest,
        deltas: Deltas,
    ) -> LlmFuture<'_, Completion> {
        Box::pin(ganglion_llm::Engine::generate_streaming(
            self, request, deltas,
        ))
    }
    fn classify(&self, text: String, labels: Vec<String>) -> LlmFuture<'_, Vec<f32>> {
        Box::pin(ganglion_llm::Engine::classify(self, text, labels))
    }
    fn embed(&self, texts: Vec<String>) -> LlmFuture<'_, Vec<Vec<f32>>> {
        Box::pin(ganglion_llm::Engine::embed(self, texts))
    }
    fn count_tokens(&self, text: String) -> LlmFuture<'_, u32> {
        let engine = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || engine.count_tokens(&text))
                .await
                .map_err(|e| LlmError::Internal(e.to_string()))?
        })
    }
    fn stats(&self) -> Option<ganglion_llm::EngineStats> {
        Some(ganglion_llm::Engine::stats(self))
    }
}

/// `v` scaled to unit length (a zero vector stays zero): what
/// [`LlmEngine::embed`] promises, for engines whose vectors are not.
pub fn l2_normalised(v: Vec<f32>) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.into_iter().map(|x| x / norm).collect()
}
