//! The forward pass of llama-family models (llama, qwen2, qwen3) over
//! quantized GGUF weights, written over candle ops.
//!
//! One call runs any number of sequences at once: their new tokens are laid
//! end to end as one `[tokens, width]` activation, so every projection reads
//! each weight once for the whole batch (prefill and decode alike), and only
//! attention is done per sequence, against that sequence's own KV cache with
//! its own positions. The token embedding stays quantized; rows are
//! dequantized on lookup, and a tied output projection shares the same bytes.
//!
//! On the CPU, attention and rotary embedding are the engine's own
//! (`attention`) and the KV cache is plain memory, appended in place; every
//! operation then computes a token's row from that row alone, so a
//! sequence's logits are the same bits alone or batched, whole or chunked,
//! with or without a cached prefix. Other devices use candle's operations.

mod kv;

pub use kv::KvCache;

use crate::attention;
use crate::gguf::{GgufFile, LoadError};
use crate::kernels::{Embedding, Linear};
use candle_core::quantized::QTensor;
use candle_core::{D, DType, Device, Tensor};

/// The architecture family, from `general.architecture`. The layers are
/// the same; what differs is the rotary layout, and which optional tensors
/// (attention biases, per-head Q/K norms) a file carries, which the loader
/// takes whenever present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama and its derivatives (SmolLM, TinyLlama): rotary embedding on
    /// interleaved pairs of each head.
    Llama,
    /// Qwen2 and Qwen2.5: Q/K/V biases; rotary embedding on the two halves
    /// of each head (NeoX layout).
    Qwen2,
    /// Qwen3: per-head RMS norms of queries and keys; NeoX rotary layout.
    Qwen3,
}

/// The model's hyperparameters, from the GGUF metadata
/// (`<architecture>.*` keys) and the token embedding's shape.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The architecture family.
    pub family: Family,
    /// Transformer blocks (`block_count`).
    pub layers: usize,
    /// Hidden size (`embedding_length`).
    pub width: usize,
    /// Query heads (`attention.head_count`); a non-zero multiple of
    /// `kv_heads`.
    pub heads: usize,
    /// Key/value heads (`attention.head_count_kv`, default `heads`); fewer
    /// than `heads` means grouped-query attention.
    pub kv_heads: usize,
    /// Size of one head (`attention.key_length`, default `width / heads`);
    /// even, as rotary embedding pairs its elements.
    pub head_dim: usize,
    /// Inner size of the feed-forward block (`feed_forward_length`).
    pub feed_forward: usize,
    /// Tokens in the vocabulary: rows of `token_embd.weight`.
    pub vocab: usize,
    /// Longest sequence the model was trained for, in tokens
    /// (`context_length`, default 2048); the rotary tables cover this many
    /// positions and no sequence may exceed it.
    pub context: usize,
    /// Epsilon of the RMS norms (default 1e-5).
    pub rms_eps: f32,
    /// Base of the rotary frequencies (`rope.freq_base`, default 10 000).
    pub rope_base: f32,
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    out: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded llama-family model: weights on one device, ready to run
/// batched forward passes. It holds no per-sequence state (that is in each
/// [`KvCache`]), so one model serves any number of sequences.
pub struct Model {
    /// Its hyperparameters.
    pub config: ModelConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    /// The same tables in host memory, `[context][head_dim / 2]`.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    device: Device,
}

/// New tokens of one sequence for a forward call.
pub struct Step<'a> {
    /// Token ids to feed, at the positions after the cache's; at least one,
    /// each below the vocabulary size.
    pub tokens: &'a [u32],
    /// The sequence's state so far; the forward pass appends the tokens'
    /// keys and values to it.
    pub cache: &'a mut KvCache,
}

/// Results of the forward pass: candle's errors, since every failure there
/// is a tensor operation's.
pub type Result<T> = candle_core::Result<T>;

impl Model {
    /// Loads the weights; `progress` is called after each tensor with
    /// (done, total).
    pub fn load(
        gguf: &mut GgufFile,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> std::result::Result<Model, LoadError> {
        let arch = gguf.architecture()?;
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            _ => Family::Qwen3,
        };
        let key = |k: &str| format!("{arch}.{k}");
        let width = gguf.u32(&key("embedding_length"))? as usize;
        let heads = gguf.u32(&key("attention.head_count"))? as usize;
        let kv_heads = gguf
            .opt_u32(&key("attention.head_count_kv"))?
            .map_or(heads, |n| n as usize);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(gguf.invalid(format!(
                "{heads} attention heads cannot be grouped over {kv_heads} key/value heads"
            )));
        }
        let head_dim = gguf
            .opt_u32(&key("attention.key_length"))?
            .map_or(width / heads, |n| n as usize);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(gguf.invalid(format!("head size {head_dim} is not even")));
        }
        let layers_n = gguf.u32(&key("block_count"))? as usize;
        let embd_info = gguf
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| gguf.invalid("tensor token_embd.weight is missing"))?;
        let vocab = embd_info.shape.dims()[0];
        let config = ModelConfig {
            family,
            layers: layers_n,
            width,
            heads,
            kv_heads,
            head_dim,
            feed_forward: gguf.u32(&key("feed_forward_length"))? as usize,
            vocab,
            context: gguf
                .opt_u32(&key("context_length"))?
                .map_or(2048, |n| n as usize),
            rms_eps: gguf
                .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_base: gguf.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        };
        let total = 3 + layers_n * 9;
        let mut done = 0;
        let mut next =
            |gguf: &mut GgufFile, name: &str| -> std::result::Result<QTensor, LoadError> {
                let t = gguf.tensor(name, device)?;
                done += 1;
                progress(done.min(total), total);
                Ok(t)
            };
        let embedding = next(gguf, "token_embd.weight")?;
        if embedding.shape().dims() != [vocab, width] {
            return Err(gguf.invalid(format!(
                "token_embd.weight has shape {:?}, expected [{vocab}, {width}]",
                embedding.shape().dims()
            )));
        }
        let embedding = widen_for_simd(embedding, device)
            .and_then(Embedding::new)
            .map_err(|e| gguf.invalid(format!("token_embd.weight: {e}")))?;
        let dense = |t: QTensor, gguf: &GgufFile, name: &str| {
            t.dequantize(device)
                .map_err(|e| gguf.invalid(format!("{name}: {e}")))
        };
        let mat = |t: QTensor, gguf: &GgufFile, name: &str, rows: usize, cols: usize| {
            if t.shape().dims() != [rows, cols] {
                return Err(gguf.invalid(format!(
                    "{name} has shape {:?}, expected [{rows}, {cols}]",
                    t.shape().dims()
                )));
            }
            let t = widen_for_simd(t, device).map_err(|e| gguf.invalid(format!("{name}: {e}")))?;
            Linear::new(t).map_err(|e| gguf.invalid(format!("{name}: {e}")))
        };
        let q_width = heads * head_dim;
        let kv_width = kv_heads * head_dim;
        let ff = config.feed_forward;
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let n = |s: &str| format!("blk.{i}.{s}");
            let optional =
                |gguf: &mut GgufFile, s: &str| -> std::result::Result<Option<Tensor>, LoadError> {
                    let name = n(s);
                    if gguf.has_tensor(&name) {
                        let t = gguf.tensor(&name, device)?;
                        Ok(Some(dense(t, gguf, &name)?))
                    } else {
                        Ok(None)
                    }
                };
            let (q_bias, k_bias, v_bias) = (
                optional(gguf, "attn_q.bias")?,
                optional(gguf, "attn_k.bias")?,
                optional(gguf, "attn_v.bias")?,
            );
            let (q_norm, k_norm) = (
                optional(gguf, "attn_q_norm.weight")?,
                optional(gguf, "attn_k_norm.weight")?,
            );
            let attn_norm = next(gguf, &n("attn_norm.weight"))?;
            let q = next(gguf, &n("attn_q.weight"))?;
            let k = next(gguf, &n("attn_k.weight"))?;
            let v = next(gguf, &n("attn_v.weight"))?;
            let out = next(gguf, &n("attn_output.weight"))?;
            let ffn_norm = next(gguf, &n("ffn_norm.weight"))?;
            let gate = next(gguf, &n("ffn_gate.weight"))?;
            let up = next(gguf, &n("ffn_up.weight"))?;
            let down = next(gguf, &n("ffn_down.weight"))?;
            layers.push(Layer {
                attn_norm: dense(attn_norm, gguf, &n("attn_norm.weight"))?,
                q: mat(q, gguf, &n("attn_q.weight"), q_width, width)?,
                k: mat(k, gguf, &n("attn_k.weight"), kv_width, width)?,
                v: mat(v, gguf, &n("attn_v.weight"), kv_width, width)?,
                q_bias,
                k_bias,
                v_bias,
                q_norm,
                k_norm,
                out: mat(out, gguf, &n("attn_output.weight"), width, q_width)?,
                ffn_norm: dense(ffn_norm, gguf, &n("ffn_norm.weight"))?,
                gate: mat(gate, gguf, &n("ffn_gate.weight"), ff, width)?,
                up: mat(up, gguf, &n("ffn_up.weight"), ff, width)?,
                down: mat(down, gguf, &n("ffn_down.weight"), width, ff)?,
            });
        }
        let norm_q = next(gguf, "output_norm.weight")?;
        let norm = dense(norm_q, gguf, "output_norm.weight")?;
        let output = if gguf.has_tensor("output.weight") {
            let t = next(gguf, "output.weight")?;
            mat(t, gguf, "output.weight", vocab, width)?
        } else {
            progress(total, total);
            embedding
                .as_output()
                .map_err(|e| gguf.invalid(format!("token_embd.weight as output: {e}")))?
        };
        let freq_factors = if gguf.has_tensor("rope_freqs.weight") {
            let t = gguf.tensor("rope_freqs.weight", device)?;
            Some(
                dense(t, gguf, "rope_freqs.weight")?
                    .to_vec1::<f32>()
                    .map_err(|e| gguf.invalid(format!("rope_freqs.weight: {e}")))?,
            )
        } else {
            None
        };
        let (cos, sin) = rope_tables(&config, freq_factors.as_deref(), device)
            .map_err(|e| gguf.invalid(format!("rotary tables: {e}")))?;
        let host = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| gguf.invalid(format!("rotary tables: {e}")))
        };
        let (cos_host, sin_host) = (host(&cos)?, host(&sin)?);
        Ok(Model {
            config,
            embedding,
            layers,
            norm,
            output,
            cos,
            sin,
            cos_host,
            sin_host,
            device: device.clone(),
        })
    }

    /// Runs the new tokens of every step through the model, appends their
    /// keys and values to each step's cache, and returns the logits of each
    /// step's last token, `[steps, vocab]`.
    ///
    /// # Errors
    ///
    /// When there are no steps, a step has no tokens, a token is outside
    /// the vocabulary, or a sequence would exceed `context`; or when a
    /// tensor operation fails. After an error the caches' contents are
    /// unspecified: drop them.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Tensor> {
        let hidden = self.hidden(steps, false)?;
        self.output.forward(&hidden)
    }

    /// Logits for every new token of every step, `[tokens, vocab]` (used to
    /// score continuations).
    pub fn forward_all(&self, steps: &mut [Step<'_>]) -> Result<Tensor> {
        let hidden = self.hidden(steps, true)?;
        self.output.forward(&hidden)
    }

    fn hidden(&self, steps: &mut [Step<'_>], all: bool) -> Result<Tensor> {
        let c = &self.config;
        if steps.is_empty() || steps.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("every step needs at least one token");
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in steps.iter() {
            if s.cache.len + s.tokens.len() > c.context {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the model's context of {}",
                    s.cache.len + s.tokens.len(),
                    c.context
                );
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                candle_core::bail!("token id {bad} is outside the vocabulary of {}", c.vocab);
            }
            ids.extend_from_slice(s.tokens);
            positions.extend((s.cache.len..s.cache.len + s.tokens.len()).map(|p| p as u32));
        }
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &self.device)?;
        let (cos, sin) = if self.device.is_cpu() {
            (None, None)
        } else {
            let positions = Tensor::from_vec(positions, n, &self.device)?;
            (
                Some(self.cos.index_select(&positions, 0)?),
                Some(self.sin.index_select(&positions, 0)?),
            )
        };
        let mut x = self.embedding.forward(&ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let attn = match (&cos, &sin) {
                (Some(cos), Some(sin)) => self.attention(li, layer, &h, cos, sin, steps)?,
                _ => self.attention_host(li, layer, &h, steps)?,
            };
            let x1 = (residual + attn)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, c.rms_eps)?;
            let [gate, up]: [Tensor; 2] = Linear::forward_each(&[&layer.gate, &layer.up], &h)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("two projections expected".into()))?;
            let gate = candle_nn::ops::silu(&gate)?;
            let mlp = layer.down.forward(&(gate * up)?)?;
            x = (x1 + mlp)?;
        }
        let x = if all {
            x
        } else {
            let mut last = Vec::with_capacity(steps.len());
            let mut end = 0u32;
            for s in steps.iter() {
                end += s.tokens.len() as u32;
                last.push(end - 1);
            }
            let len = last.len();
            x.index_select(&Tensor::from_vec(last, len, &self.device)?, 0)?
        };
        candle_nn::ops::rms_norm(&x, &self.norm, c.rms_eps)
    }

    /// Projections, rotary embedding, the KV append and attention on the
    /// CPU (see the module docs).
    fn attention_host(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        steps: &mut [Step<'_>],
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = h.dim(0)?;
        let d = c.head_dim;
        let [q, k, v]: [Tensor; 3] = Linear::forward_each(&[&layer.q, &layer.k, &layer.v], h)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("three projections expected".into()))?;
        let project = |y: Tensor, bias: &Option<Tensor>, norm: &Option<Tensor>, heads| {
            let y = match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            let y = match norm {
                Some(w) => candle_nn::ops::rms_norm(&y.reshape((n, heads, d))?, w, c.rms_eps)?,
                None => y,
            };
            y.flatten_all()?.to_vec1::<f32>()
        };
        let mut q = project(q, &layer.q_bias, &layer.q_norm, c.heads)?;
        let mut k = project(k, &layer.k_bias, &layer.k_norm, c.kv_heads)?;
        let v = project(v, &layer.v_bias, &None, c.kv_heads)?;
        let (q_row, kv_row) = (c.heads * d, c.kv_heads * d);
        let half = d / 2;
        let interleaved = c.family == Family::Llama;
        let mut t = 0;
        for s in steps.iter_mut() {
            let past = s.cache.len;
            for p in past..past + s.tokens.len() {
                let (cos, sin) = (
                    &self.cos_host[p * half..(p + 1) * half],
                    &self.sin_host[p * half..(p + 1) * half],
                );
                attention::rope(&mut q[t * q_row..(t + 1) * q_row], d, cos, sin, interleaved);
                attention::rope(
                    &mut k[t * kv_row..(t + 1) * kv_row],
                    d,
                    cos,
                    sin,
                    interleaved,
                );
                t += 1;
            }
        }
        let mut t = 0;
        for s in steps.iter_mut() {
            let len = s.tokens.len();
            let cache = &mut *s.cache;
            if cache.host.len() <= li {
                let room = cache.reserve.max(cache.len + len) * kv_row;
                cache
                    .host
                    .push((Vec::with_capacity(room), Vec::with_capacity(room)));
            }
            let (kc, vc) = &mut cache.host[li];
            kc.extend_from_slice(&k[t * kv_row..(t + len) * kv_row]);
            vc.extend_from_slice(&v[t * kv_row..(t + len) * kv_row]);
            t += len;
        }
        let mut queries = Vec::with_capacity(n);
        for s in steps.iter() {
            let (kc, vc) = &s.cache.host[li];
            for p in s.cache.len..s.cache.len + s.tokens.len() {
                queries.push(attention::Query {
                    keys: &kc[..(p + 1) * kv_row],
                    values: &vc[..(p + 1) * kv_row],
                });
            }
        }
        let mut out = vec![0f32; n * q_row];
        attention::attend(
            &q,
            &queries,
            attention::Heads {
                heads: c.heads,
                kv_heads: c.kv_heads,
                head_dim: d,
            },
            &mut out,
        );
        drop(queries);
        if li + 1 == self.layers.len() {
            for s in steps.iter_mut() {
                s.cache.len += s.tokens.len();
            }
        }
        layer
            .out
            .forward(&Tensor::from_vec(out, (n, q_row), &self.device)?)
    }

    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        steps: &mut [Step<'_>],
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = h.dim(0)?;
        let project = |m: &Linear, bias: &Option<Tensor>| -> Result<Tensor> {
            let y = m.forward(h)?;
            match bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        };
        let q = project(&layer.q, &layer.q_bias)?.reshape((n, c.heads, c.head_dim))?;
        let k = project(&layer.k, &layer.k_bias)?.reshape((n, c.kv_heads, c.head_dim))?;
        let v = project(&layer.v, &layer.v_bias)?.reshape((n, c.kv_heads, c.head_dim))?;
        let q = match &layer.q_norm {
            Some(w) => candle_nn::ops::rms_norm(&q.contiguous()?, w, c.rms_eps)?,
            None => q,
        };
        let k = match &layer.k_norm {
            Some(w) => candle_nn::ops::rms_norm(&k.contiguous()?, w, c.rms_eps)?,
            None => k,
        };
        // [1, heads, tokens, head_dim]: each token rotated by its own position.
        let q = q.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
        let k = k.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
        let (q, k) = match c.family {
            Family::Llama => (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            ),
            Family::Qwen2 | Family::Qwen3 => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
        };
        let (q, k) = (q.squeeze(0)?, k.squeeze(0)?);
        let v = v.transpose(0, 1)?;
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut outputs = Vec::with_capacity(steps.len());
        let mut offset = 0;
        for s in steps.iter_mut() {
            let len = s.tokens.len();
            let past = s.cache.len;
            let k_new = k.narrow(1, offset, len)?;
            let v_new = v.narrow(1, offset, len)?;
            let (k_all, v_all) = match s.cache.layers.get(li) {
                Some((kc, vc)) => (
                    Tensor::cat(&[kc, &k_new], 1)?,
                    Tensor::cat(&[vc, &v_new], 1)?,
                ),
                None => (k_new.contiguous()?, v_new.contiguous()?),
            };
            if li < s.cache.layers.len() {
                s.cache.layers[li] = (k_all.clone(), v_all.clone());
            } else {
                s.cache.layers.push((k_all.clone(), v_all.clone()));
            }
            let total = past + len;
            // Queries of one key/value group side by side: [kv_heads, group * len, head_dim].
            let qs = q
                .narrow(1, offset, len)?
                .reshape((c.kv_heads, group * len, c.head_dim))?;
            let scores = (qs.matmul(&k_all.t()?)? * scale)?;
            let scores = if len > 1 {
                let mask: Vec<f32> = (0..group * len)
                    .flat_map(|r| {
                        let pos = past + r % len;
                        (0..total).map(move |t| if t > pos { f32::NEG_INFINITY } else { 0.0 })
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (group * len, total), &self.device)?;
                scores.broadcast_add(&mask)?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs
                .matmul(&v_all)?
                .reshape((c.heads, len, c.head_dim))?
                .transpose(0, 1)?
                .reshape((len, c.heads * c.head_dim))?;
            outputs.push(o);
            offset += len;
        }
        for s in steps.iter_mut() {
            if li + 1 == self.layers.len() {
                s.cache.len += s.tokens.len();
            }
        }
        let o = Tensor::cat(&outputs, 0)?;
        layer.out.forward(&o)
    }

    /// The device its weights live on; tensors passed to or built from its
    /// output must be on it too.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of layer matrices and output projection, in the engine's
    /// layout: what one decode step reads besides the KV state.
    pub fn matrix_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.out, &l.gate, &l.up, &l.down])
            .map(Linear::bytes)
            .sum();
        layers + self.output.bytes()
    }

    /// Bytes of KV state one token of one sequence takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        c.layers * 2 * c.kv_heads * c.head_dim * 4
    }
}

/// candle 0.11 has no SIMD dot product for Q4_1, Q5_0 and Q5_1 (its scalar
/// path is ~10× slower than llama.cpp's). The engine's own kernel takes
/// them as they are on every CPU; where it does not run (a GPU, or a
/// matrix of another shape) they are converted to Q8_0 at load: finer than
/// the source, so the conversion is close to lossless, at 34 bytes per 32
/// weights. The original bytes are dropped.
fn widen_for_simd(t: QTensor, device: &Device) -> Result<QTensor> {
    use candle_core::quantized::GgmlDType;
    match t.dtype() {
        _ if crate::kernels::Matrix::takes(&t) => Ok(t),
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)
        }
        _ => Ok(t),
    }
}

fn rope_tables(
    c: &ModelConfig,
    factors: Option<&[f32]>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = c.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| {
            let f = 1.0 / c.rope_base.powf(2.0 * i as f32 / c.head_dim as f32);
            match factors.and_then(|f| f.get(i)) {
                Some(&d) if d > 0.0 => f / d,
                _ => f,
            }
        })
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, c.context as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((c.context, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?))
}

/// Log-softmax of a `[vocab]` logits row.
pub fn log_softmax(logits: &Tensor) -> Result<Vec<f32>> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?.to_vec1()
}
