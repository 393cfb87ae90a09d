//! Preprocessor that brings its own model: all-MiniLM-L6-v2 (sentence
//! embeddings, 22 M parameters) on candle compiled into the plugin, run in
//! the sandbox like any plugin code. Each text reading (an utterance, a log
//! line) is embedded and labelled by the nearest label embedding; each
//! label's embedding is the normalised mean of its example phrases.
//!
//! With `keep`, only text readings whose label is listed go on: a cheap
//! pre-filter in front of the language model (a call here is milliseconds;
//! the model's answer is seconds). Other readings pass unchanged. With
//! `label_metric`, each text reading is followed by a text reading of that
//! metric holding its label. `output = "embedding"` replaces each text
//! reading by its vector instead (`embedding` readings, one number per
//! dimension, in order).
//!
//! The weights are read from a directory the rule grants, once per
//! instance, on its first call (which the host runs under
//! `load_timeout_ms`); the instance keeps them while the pool keeps it
//! warm. The model needs a larger memory cap than the default 64 MiB
//! (docs/plugins.md, "Bring your own model"):
//!
//! ```toml
//! [[preprocess]]
//! plugin = "minilm-classify"
//! grants = { dirs = [{ host = "models/all-MiniLM-L6-v2", guest = "/model" }] }
//! limits = { max_memory_mib = 160, call_timeout_ms = 500, load_timeout_ms = 20000 }
//! config.keep = ["command", "alarm"]
//! config.labels.command = ["turn on the light", "switch off the fan"]
//! config.labels.alarm = ["smoke detected", "I smell gas"]
//! config.labels.chatter = ["nice weather today"]
//! ```

pub mod model;

use ganglion_sdk::batch::BatchBuilder;
use ganglion_sdk::{Message, PluginError, Preprocessor, ReadingBatch, Value, config, log};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The plugin's settings in the rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the granted model directory is seen. Default `/model`.
    #[serde(default = "default_model_dir")]
    pub model_dir: String,
    /// Bound on `model.safetensors`, in MiB (all-MiniLM-L6-v2's is 87).
    /// Default 128.
    #[serde(default = "default_max_weights_mib")]
    pub max_weights_mib: u64,
    /// Each label with one example phrase or several.
    #[serde(default)]
    pub labels: BTreeMap<String, Phrases>,
    /// Labels whose text readings go on; empty keeps all.
    #[serde(default)]
    pub keep: Vec<String>,
    /// Metric of a text reading holding the label, added after each
    /// labelled reading. Default none.
    pub label_metric: Option<String>,
    /// What text readings become. Default `label`.
    #[serde(default)]
    pub output: Output,
}

/// One example phrase or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Phrases {
    One(String),
    Many(Vec<String>),
}

impl Phrases {
    fn list(&self) -> Vec<&str> {
        match self {
            Phrases::One(p) => vec![p.as_str()],
            Phrases::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// What text readings become.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Labelled, kept or dropped by `keep`.
    #[default]
    Label,
    /// Their embedding, as number readings of metric `embedding`.
    Embedding,
}

fn default_model_dir() -> String {
    "/model".into()
}

fn default_max_weights_mib() -> u64 {
    128
}

impl Config {
    /// Checks what the types cannot: labels to classify into, and `keep`
    /// naming only those labels.
    pub fn validate(&self) -> Result<(), PluginError> {
        if self.output == Output::Embedding {
            return Ok(());
        }
        if self.labels.is_empty() {
            return Err(PluginError::BadConfig("`labels` is empty".into()));
        }
        if let Some((label, _)) = self.labels.iter().find(|(_, p)| p.list().is_empty()) {
            return Err(PluginError::BadConfig(format!(
                "label `{label}` has no example phrase"
            )));
        }
        if let Some(k) = self.keep.iter().find(|k| !self.labels.contains_key(*k)) {
            return Err(PluginError::BadConfig(format!(
                "`keep` names `{k}`, which is not one of the labels"
            )));
        }
        Ok(())
    }
}

/// The label whose embedding is nearest (largest dot product; all vectors
/// are normalised, so it is the cosine) and its score. `None` without labels.
pub fn nearest<'a>(labels: &'a [(String, Vec<f32>)], v: &[f32]) -> Option<(&'a str, f32)> {
    labels
        .iter()
        .map(|(name, l)| (name.as_str(), dot(l, v)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The normalised mean of unit vectors: the direction they share.
pub fn centroid(vectors: &[Vec<f32>]) -> Vec<f32> {
    let dims = vectors.first().map_or(0, Vec::len);
    let mut sum = vec![0f32; dims];
    for v in vectors {
        for (s, x) in sum.iter_mut().zip(v) {
            *s += x;
        }
    }
    let norm = dot(&sum, &sum).sqrt().max(1e-12);
    sum.iter().map(|s| s / norm).collect()
}

/// The encoder and the label embeddings, made on the instance's first call.
struct Classifier {
    encoder: model::Encoder,
    labels: Vec<(String, Vec<f32>)>,
}

impl Classifier {
    fn load(cfg: &Config) -> Result<Classifier, PluginError> {
        let encoder = model::Encoder::load(&cfg.model_dir, cfg.max_weights_mib << 20)
            .map_err(PluginError::Other)?;
        let mut labels = Vec::with_capacity(cfg.labels.len());
        for (name, phrases) in &cfg.labels {
            let vectors = encoder.embed(&phrases.list()).map_err(PluginError::Other)?;
            labels.push((name.clone(), centroid(&vectors)));
        }
        log::info(&format!(
            "model loaded from {}: {} dimensions, {} labels",
            cfg.model_dir,
            encoder.dimensions,
            labels.len()
        ));
        Ok(Classifier { encoder, labels })
    }
}

static CONFIG: OnceLock<Result<Config, PluginError>> = OnceLock::new();
/// Settings and grants never change during an instance's life, so neither
/// does the outcome of loading: a failure is kept and reported on every
/// call rather than reading 87 MB again per message.
static CLASSIFIER: OnceLock<Result<Classifier, PluginError>> = OnceLock::new();

struct MiniLm;

impl Preprocessor for MiniLm {
    fn preprocess(_message: Message, readings: ReadingBatch) -> Result<ReadingBatch, PluginError> {
        let cfg = config::cached(&CONFIG)?;
        cfg.validate()?;
        let classifier = CLASSIFIER
            .get_or_init(|| Classifier::load(cfg))
            .as_ref()
            .map_err(Clone::clone)?;
        let mut out = BatchBuilder::with_capacity(readings.len());
        for r in readings.iter() {
            let Value::Text(text) = r.value else {
                out.push_ref(r);
                continue;
            };
            let v = classifier
                .encoder
                .embed(&[text.as_str()])
                .map_err(PluginError::Other)?
                .remove(0);
            if cfg.output == Output::Embedding {
                for x in v {
                    out.push(
                        r.device,
                        "embedding",
                        Value::Number(f64::from(x)),
                        "",
                        r.timestamp,
                    );
                }
                continue;
            }
            let Some((label, score)) = nearest(&classifier.labels, &v) else {
                continue;
            };
            log::debug(&format!("{label} ({score:.3}): {text}"));
            if !cfg.keep.is_empty() && !cfg.keep.iter().any(|k| k == label) {
                continue;
            }
            out.push_ref(r);
            if let Some(metric) = &cfg.label_metric {
                out.push(
                    r.device,
                    metric,
                    Value::Text(label.to_owned()),
                    "",
                    r.timestamp,
                );
            }
        }
        Ok(out.finish())
    }
}

ganglion_sdk::export!(MiniLm: preprocess);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> Result<Config, PluginError> {
        let c: Config = config::parse_json(json)?;
        c.validate().map(|()| c)
    }

    #[test]
    fn keep_must_name_labels_and_labels_need_phrases() {
        assert!(cfg(r#"{"labels":{"a":"x","b":["y","z"]},"keep":["a"]}"#).is_ok());
        assert!(cfg(r#"{"labels":{"a":"x"},"keep":["c"]}"#).is_err());
        assert!(cfg(r#"{"labels":{"a":[]}}"#).is_err());
        assert!(cfg(r#"{"labels":{}}"#).is_err());
        assert!(
            cfg(r#"{"output":"embedding"}"#).is_ok(),
            "no labels needed for vectors"
        );
        assert!(cfg(r#"{"labels":{"a":"x"},"bogus":1}"#).is_err());
    }

    #[test]
    fn the_nearest_label_is_the_largest_cosine() {
        let labels = vec![
            ("a".to_string(), vec![1.0, 0.0]),
            ("b".to_string(), centroid(&[vec![0.0, 1.0], vec![0.6, 0.8]])),
        ];
        assert_eq!(nearest(&labels, &[0.9, 0.1]).unwrap().0, "a");
        assert_eq!(nearest(&labels, &[0.3, 0.95]).unwrap().0, "b");
        assert!(nearest(&[], &[1.0]).is_none());
        let c = &labels[1].1;
        assert!((dot(c, c) - 1.0).abs() < 1e-6, "a centroid is normalised");
    }
}
