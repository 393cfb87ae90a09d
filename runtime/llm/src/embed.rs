//! Sentence embeddings with a BERT-family encoder (all-MiniLM-L6-v2 by
//! default): a folder with `config.json`, `model.safetensors` and
//! `tokenizer.json`; mean pooling over the attention mask, L2-normalised.

use crate::gguf::LoadError;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

/// The encoder's position limit for all-MiniLM-L6-v2 (its sentence
/// transformer config truncates at 256 word pieces).
const MAX_TOKENS: usize = 256;

/// A loaded sentence encoder. Stateless between calls; the engine's
/// worker runs it whole between generation steps.
pub struct Embedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    /// Length of each embedding: the encoder's hidden size (384 for
    /// all-MiniLM-L6-v2).
    pub dimensions: usize,
}

impl Embedder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from
    /// `dir` onto `device`, weights as f32.
    ///
    /// # Errors
    ///
    /// `Missing` or `Io` for a file that cannot be read, `Invalid` (naming
    /// the file) for one that does not parse or does not fit the config.
    pub fn load(dir: &Path, device: &Device) -> Result<Embedder, LoadError> {
        let invalid = |file: &str, reason: String| LoadError::Invalid {
            file: dir.join(file),
            reason,
        };
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => LoadError::Missing(path),
                _ => LoadError::Io {
                    file: path,
                    reason: e,
                },
            })
        };
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| invalid("config.json", e.to_string()))?;
        let weights = read("model.safetensors")?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)
            .map_err(|e| invalid("model.safetensors", e.to_string()))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| invalid("model.safetensors", e.to_string()))?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| invalid("tokenizer.json", e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| invalid("tokenizer.json", e.to_string()))?;
        Ok(Embedder {
            model,
            tokenizer,
            device: device.clone(),
            dimensions: config.hidden_size,
        })
    }

    /// One L2-normalised vector of [`Embedder::dimensions`] per text, in
    /// order, so a dot product is the cosine similarity. All texts run as
    /// one padded batch; each is truncated at 256 word pieces. No texts, no
    /// vectors.
    ///
    /// # Errors
    ///
    /// The tokenizer's or candle's message.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| e.to_string())?;
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let rows = encodings.len();
            let cols = encodings[0].get_ids().len();
            let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| {
                encodings
                    .iter()
                    .flat_map(|e| f(e).iter().copied())
                    .collect::<Vec<u32>>()
            };
            let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (rows, cols), &self.device)?;
            let types = Tensor::from_vec(flat(&|e| e.get_type_ids()), (rows, cols), &self.device)?;
            let mask = Tensor::from_vec(
                flat(&|e| e.get_attention_mask()),
                (rows, cols),
                &self.device,
            )?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?.clamp(1e-9, f32::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
            mean.broadcast_div(&norm)?.to_vec2()
        };
        run().map_err(|e| e.to_string())
    }
}
