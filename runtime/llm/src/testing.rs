//! Tiny random-weight models written as real GGUF files, so tests exercise
//! the same loader, tokenizer and forward pass as a downloaded model.
//!
//! The vocabulary is byte-level BPE: three ChatML special tokens, the 256
//! byte tokens and a few dozen English merges, with SmolLM2's pre-tokenizer
//! name and chat template.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// SmolLM2's ChatML chat template (Jinja), as the tiny models carry it in
/// `tokenizer.chat_template`: a default system message when the chat has
/// none, each turn between `<|im_start|>` and `<|im_end|>`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("r", "e"),
    ("Ġ", "s"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "c"),
    ("o", "r"),
    ("Ġ", "w"),
    ("i", "s"),
    ("Ġ", "in"),
    ("e", "d"),
    ("Ġ", "o"),
    ("a", "l"),
    ("Ġ", "d"),
    ("Ġ", "f"),
    ("a", "r"),
    ("Ġ", "p"),
    ("o", "u"),
    ("l", "e"),
    ("t", "e"),
    ("Ġt", "e"),
    ("Ġte", "m"),
    ("Ġtem", "p"),
    ("Ġa", "l"),
    ("Ġal", "a"),
    ("Ġala", "r"),
    ("Ġalar", "m"),
    ("{", "\""),
    ("\"", ":"),
    ("\"", "}"),
];

/// The shape of a tiny test model. The default is a 2-layer llama of width
/// 64, Q8_0 matrices, tied embedding, 512 tokens of context: small enough
/// to load and run in milliseconds.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// `llama`, `qwen2` or `qwen3`.
    pub arch: &'static str,
    /// Format of the matrices under [`Mix::Uniform`]; norms are always
    /// F32.
    pub dtype: GgmlDType,
    /// Hidden size; a multiple of `heads`, and of the format's block size
    /// (32, or 256 for the K formats).
    pub width: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads; head size is `width / heads`, which must be even.
    pub heads: usize,
    /// Key/value heads; must divide `heads`.
    pub kv_heads: usize,
    /// Inner size of the feed-forward block, with the same block-size
    /// limit as `width`.
    pub feed_forward: usize,
    /// `context_length`, in tokens.
    pub context: usize,
    /// Without an `output.weight`, the embedding is the output projection.
    pub tied: bool,
    /// Seed of the random weights: the same spec writes the same file.
    pub seed: u64,
    /// `tokenizer.ggml.pre`.
    pub pre: &'static str,
    /// Vocabulary size: the test vocabulary, padded with plain tokens
    /// `<tN>` up to this size when larger (a real model's output head).
    pub vocab: usize,
    /// Which format each matrix gets.
    pub mix: Mix,
    /// `rope.freq_base`.
    pub rope_base: f32,
}

/// How the matrices of a model are quantised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Every matrix in the spec's `dtype`.
    Uniform,
    /// The main rules of llama.cpp's Q4_K_M recipe (`llama_tensor_get_type`):
    /// Q4_K; Q6_K for the output projection (the embedding when tied), and
    /// for `attn_v` and `ffn_down` in the layers llama.cpp gives more bits.
    /// A matrix whose rows are not a multiple of 256 falls back as llama.cpp
    /// does: Q4_K to Q5_0, Q6_K to Q8_0.
    Q4KM,
}

impl TinySpec {
    /// The format of matrix `name` (`None` layer: embedding or output),
    /// whose rows are `cols` long.
    pub fn dtype_for(&self, name: &str, layer: Option<usize>, cols: usize) -> GgmlDType {
        if self.mix == Mix::Uniform {
            return self.dtype;
        }
        let n = self.layers;
        let more_bits = |i: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        let wanted = match (name, layer) {
            ("output.weight", _) => GgmlDType::Q6K,
            ("token_embd.weight", _) if self.tied => GgmlDType::Q6K,
            ("attn_v.weight" | "ffn_down.weight", Some(i)) if more_bits(i) => GgmlDType::Q6K,
            _ => GgmlDType::Q4K,
        };
        if cols.is_multiple_of(256) {
            wanted
        } else if wanted == GgmlDType::Q6K {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q5_0
        }
    }
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            arch: "llama",
            dtype: GgmlDType::Q8_0,
            width: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            feed_forward: 128,
            context: 512,
            tied: true,
            seed: 42,
            pre: "smollm",
            vocab: 0,
            mix: Mix::Uniform,
            rope_base: 10_000.0,
        }
    }
}

fn byte_tokens() -> Vec<String> {
    crate::tokenizer::byte_to_char()
        .iter()
        .map(|c| c.to_string())
        .collect()
}

/// The vocabulary: ids 0–2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.
pub fn vocabulary() -> Vec<String> {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(byte_tokens());
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
    }
    tokens
}

fn random(rng: &mut StdRng, dims: &[usize], scale: f32) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// Writes a model with random weights to `path`.
///
/// # Errors
///
/// When a tensor cannot be quantised to its format (a row length that is
/// not a multiple of the block size) or the file cannot be written.
pub fn write_tiny_model(path: &Path, spec: &TinySpec) -> candle_core::Result<()> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut tokens = vocabulary();
    let base = tokens.len();
    tokens.extend((base..spec.vocab).map(|i| format!("<t{i}>")));
    let vocab = tokens.len();
    let hd = spec.width / spec.heads;
    let arch = spec.arch;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let quant = |name: &str, layer: Option<usize>, t: Tensor| {
        let cols = t.dims().last().copied().unwrap_or(0);
        QTensor::quantize(&t, spec.dtype_for(name, layer, cols))
    };
    let dense = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32);
    tensors.push((
        "token_embd.weight".into(),
        quant(
            "token_embd.weight",
            None,
            random(&mut rng, &[vocab, spec.width], 1.0)?,
        )?,
    ));
    let scale = 1.0 / (spec.width as f32).sqrt() * 1.7;
    for i in 0..spec.layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        let ones = |d: usize| Tensor::ones(d, candle_core::DType::F32, &Device::Cpu);
        tensors.push((n("attn_norm.weight"), dense(ones(spec.width)?)?));
        tensors.push((n("ffn_norm.weight"), dense(ones(spec.width)?)?));
        tensors.push((
            n("attn_q.weight"),
            quant(
                "attn_q.weight",
                Some(i),
                random(&mut rng, &[spec.heads * hd, spec.width], scale)?,
            )?,
        ));
        tensors.push((
            n("attn_k.weight"),
            quant(
                "attn_k.weight",
                Some(i),
                random(&mut rng, &[spec.kv_heads * hd, spec.width], scale)?,
            )?,
        ));
        tensors.push((
            n("attn_v.weight"),
            quant(
                "attn_v.weight",
                Some(i),
                random(&mut rng, &[spec.kv_heads * hd, spec.width], scale)?,
            )?,
        ));
        tensors.push((
            n("attn_output.weight"),
            quant(
                "attn_output.weight",
                Some(i),
                random(&mut rng, &[spec.width, spec.heads * hd], scale)?,
            )?,
        ));
        tensors.push((
            n("ffn_gate.weight"),
            quant(
                "ffn_gate.weight",
                Some(i),
                random(&mut rng, &[spec.feed_forward, spec.width], scale)?,
            )?,
        ));
        tensors.push((
            n("ffn_up.weight"),
            quant(
                "ffn_up.weight",
                Some(i),
                random(&mut rng, &[spec.feed_forward, spec.width], scale)?,
            )?,
        ));
        tensors.push((
            n("ffn_down.weight"),
            quant(
                "ffn_down.weight",
                Some(i),
                random(&mut rng, &[spec.width, spec.feed_forward], scale)?,
            )?,
        ));
        if arch == "qwen2" {
            tensors.push((
                n("attn_q.bias"),
                dense(random(&mut rng, &[spec.heads * hd], 0.1)?)?,
            ));
            tensors.push((
                n("attn_k.bias"),
                dense(random(&mut rng, &[spec.kv_heads * hd], 0.1)?)?,
            ));
            tensors.push((
                n("attn_v.bias"),
                dense(random(&mut rng, &[spec.kv_heads * hd], 0.1)?)?,
            ));
        }
        if arch == "qwen3" {
            tensors.push((n("attn_q_norm.weight"), dense(ones(hd)?)?));
            tensors.push((n("attn_k_norm.weight"), dense(ones(hd)?)?));
        }
    }
    tensors.push((
        "output_norm.weight".into(),
        dense(Tensor::ones(
            spec.width,
            candle_core::DType::F32,
            &Device::Cpu,
        )?)?,
    ));
    if !spec.tied {
        tensors.push((
            "output.weight".into(),
            quant(
                "output.weight",
                None,
                random(&mut rng, &[vocab, spec.width], scale)?,
            )?,
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |n: usize| Value::U32(n as u32);
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("tiny-random".into())),
        (key("block_count"), u32v(spec.layers)),
        (key("context_length"), u32v(spec.context)),
        (key("embedding_length"), u32v(spec.width)),
        (key("feed_forward_length"), u32v(spec.feed_forward)),
        (key("attention.head_count"), u32v(spec.heads)),
        (key("attention.head_count_kv"), u32v(spec.kv_heads)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (key("rope.freq_base"), Value::F32(spec.rope_base)),
        (key("rope.dimension_count"), u32v(spec.width / spec.heads)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(spec.pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().cloned().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..vocab)
                    .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                MERGES
                    .iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u32v(1)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML_TEMPLATE.into()),
        ),
    ];
    if arch == "qwen3" {
        metadata.push((key("attention.key_length"), u32v(hd)));
    }
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    candle_core::quantized::gguf_file::write(&mut file, &meta, &refs)?;
    use std::io::Write;
    file.flush()?;
    Ok(())
}

/// Writes a `tokenizer.json` for the tiny vocabulary (GPT-2 byte-level
/// pre-tokenizer, the same merges), as a model shipped with one would have.
pub fn write_tokenizer_json(path: &Path) -> Result<(), String> {
    use tokenizers::models::bpe::{BPE, Vocab};
    let vocab: Vocab = vocabulary()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let merges = MERGES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true),
    ));
    t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let specials: Vec<tokenizers::AddedToken> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| tokenizers::AddedToken::from(*s, true))
        .collect();
    t.add_special_tokens(specials).map_err(|e| e.to_string())?;
    t.save(path, false).map_err(|e| e.to_string())
}
