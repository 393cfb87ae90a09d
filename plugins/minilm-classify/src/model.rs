//! all-MiniLM-L6-v2 on candle, inside the sandbox: the same BERT code, the
//! same tokenizer and the same pooling as the host's engine
//! (runtime/llm/src/embed.rs: mean over the attention mask, L2-normalised),
//! so that the two give the same vectors for the same text.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use ganglion_sdk::weights;
use serde::Deserialize;
use std::collections::HashMap;
use std::io::Read;
use tokenizers::{Tokenizer, TruncationParams};

/// Word pieces per text; longer texts are cut, as on the host (the
/// model's sentence-transformer config truncates at 256).
const MAX_TOKENS: usize = 256;
/// `config.json` is well under 1 KiB; anything near this is not a config.
const MAX_CONFIG_BYTES: u64 = 64 << 10;
/// `tokenizer.json` of a BERT vocabulary is ~0.5 MiB.
const MAX_TOKENIZER_BYTES: u64 = 8 << 20;
/// The safetensors header (JSON naming every tensor) of a small encoder is
/// a few KiB.
const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Bytes read from the weights file at a time: the weights go straight
/// into the tensors, never held whole a second time (the instance's memory
/// is the weights once, not twice).
const CHUNK_BYTES: usize = 64 << 10;

/// A loaded sentence encoder, kept for the instance's life.
pub struct Encoder {
    model: BertModel,
    tokenizer: Tokenizer,
    /// Length of each vector (384 for all-MiniLM-L6-v2).
    pub dimensions: usize,
}

impl Encoder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from
    /// `dir`; the weights file may be at most `max_weights_bytes`.
    pub fn load(dir: &str, max_weights_bytes: u64) -> Result<Encoder, String> {
        let config: Config = serde_json::from_slice(
            &weights::read(dir, "config.json", MAX_CONFIG_BYTES).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("config.json: {e}"))?;
        let (file, size) = weights::open(dir, "model.safetensors", max_weights_bytes)
            .map_err(|e| e.to_string())?;
        let tensors =
            read_safetensors(file, size).map_err(|e| format!("model.safetensors: {e}"))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model = BertModel::load(vb, &config).map_err(|e| format!("model.safetensors: {e}"))?;
        let json =
            weights::read(dir, "tokenizer.json", MAX_TOKENIZER_BYTES).map_err(|e| e.to_string())?;
        // There are no threads to spread a batch over in the sandbox.
        tokenizers::utils::parallelism::set_parallelism(false);
        let mut tokenizer =
            Tokenizer::from_bytes(json).map_err(|e| format!("tokenizer.json: {e}"))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| format!("tokenizer.json: {e}"))?;
        Ok(Encoder {
            model,
            tokenizer,
            dimensions: config.hidden_size,
        })
    }

    /// One L2-normalised vector per text, in order. Each text runs alone
    /// (no padding to the longest; the host pads a batch and masks the
    /// padding out, which gives the same vector).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        texts.iter().map(|t| self.embed_one(t)).collect()
    }

    fn embed_one(&self, text: &str) -> Result<Vec<f32>, String> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| e.to_string())?;
        let run = || -> candle_core::Result<Vec<f32>> {
            let cols = encoding.get_ids().len();
            let row = |v: &[u32]| Tensor::from_vec(v.to_vec(), (1, cols), &Device::Cpu);
            let ids = row(encoding.get_ids())?;
            let types = row(encoding.get_type_ids())?;
            let mask = row(encoding.get_attention_mask())?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            // The host's pooling, op for op.
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?.clamp(1e-9, f32::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
            mean.broadcast_div(&norm)?.squeeze(0)?.to_vec1()
        };
        run().map_err(|e| e.to_string())
    }
}

/// One tensor's entry in the safetensors header.
#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Reads a safetensors file of F32 tensors piece by piece into tensors:
/// an 8-byte little-endian header length, the JSON header, then the data.
pub fn read_safetensors(mut file: impl Read, size: u64) -> Result<HashMap<String, Tensor>, String> {
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || header_len + 8 > size {
        return Err(format!("header of {header_len} bytes is not plausible"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let mut entries: Vec<(String, Entry)> =
        serde_json::from_slice::<HashMap<String, serde_json::Value>>(&header)
            .map_err(|e| format!("header: {e}"))?
            .into_iter()
            .filter(|(name, _)| name != "__metadata__")
            .map(|(name, v)| {
                serde_json::from_value(v)
                    .map(|e| (name.clone(), e))
                    .map_err(|e| format!("header entry {name}: {e}"))
            })
            .collect::<Result<_, _>>()?;
    entries.sort_by_key(|(_, e)| e.data_offsets[0]);
    let data_len = size - 8 - header_len;
    let mut at = 0u64;
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut tensors = HashMap::with_capacity(entries.len());
    for (name, e) in entries {
        let [start, end] = e.data_offsets;
        let count: usize = e.shape.iter().product();
        let f32_size = if e.dtype == "F32" {
            count as u64 * 4
        } else {
            end.wrapping_sub(start)
        };
        if start < at || end < start || end > data_len || end - start != f32_size {
            return Err(format!("{name}: data offsets {start}..{end} do not fit"));
        }
        // Gaps between tensors (none in files the safetensors library
        // writes) are skipped.
        skip(&mut file, start - at)?;
        if e.dtype != "F32" {
            // Buffers, not weights: all-MiniLM-L6-v2's one is
            // `embeddings.position_ids` (I64), which candle's BERT
            // computes itself. A weight left out here is reported by
            // `BertModel::load` by name.
            skip(&mut file, end - start)?;
            at = end;
            continue;
        }
        let mut values = Vec::with_capacity(count);
        let mut left = (end - start) as usize;
        while left > 0 {
            let n = left.min(CHUNK_BYTES);
            file.read_exact(&mut chunk[..n])
                .map_err(|e| format!("{name}: {e}"))?;
            values.extend(
                chunk[..n]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            left -= n;
        }
        let tensor = Tensor::from_vec(values, e.shape, &Device::Cpu).map_err(|e| e.to_string())?;
        tensors.insert(name, tensor);
        at = end;
    }
    Ok(tensors)
}

/// Reads and drops `n` bytes.
fn skip(file: &mut impl Read, n: u64) -> Result<(), String> {
    let skipped =
        std::io::copy(&mut file.take(n), &mut std::io::sink()).map_err(|e| e.to_string())?;
    if skipped != n {
        return Err("the file ends inside the data".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file as the safetensors library writes one.
    fn file(tensors: &[(&str, &[usize], &[f32])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let start = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let header = serde_json::Value::Object(header).to_string();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn reads_every_tensor_with_its_shape_and_values() {
        let bytes = file(&[
            ("a", &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
            ("b", &[3], &[-1.5, 0.0, 9.0]),
        ]);
        let t = read_safetensors(&bytes[..], bytes.len() as u64).unwrap();
        assert_eq!(
            t["a"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        assert_eq!(t["b"].to_vec1::<f32>().unwrap(), vec![-1.5, 0.0, 9.0]);
    }

    #[test]
    fn skips_buffers_that_are_not_f32() {
        // `position_ids` (I64, 2 values) before a weight, as in the model.
        let header = r#"{"position_ids":{"dtype":"I64","shape":[1,2],"data_offsets":[0,16]},"w":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 16]);
        bytes.extend([1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()));
        let t = read_safetensors(&bytes[..], bytes.len() as u64).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn refuses_a_tensor_whose_offsets_do_not_fit_its_shape() {
        let mut bytes = file(&[("a", &[2, 2], &[1.0, 2.0, 3.0, 4.0])]);
        let size = bytes.len() as u64;
        // Cut the data: the offsets point past the file.
        bytes.truncate(bytes.len() - 4);
        assert!(read_safetensors(&bytes[..], size - 4).is_err());
        assert!(
            read_safetensors(&bytes[..8], size).is_err(),
            "a truncated header"
        );
    }
}
