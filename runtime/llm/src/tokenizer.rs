//! The tokenizer, built from GGUF metadata (`tokenizer.ggml.*`) or from a
//! `tokenizer.json` beside the model, and the chat template.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`) are built
//! from metadata, with the pre-tokenizer llama.cpp uses for the named
//! `tokenizer.ggml.pre`; an unknown pre-tokenizer or a SentencePiece
//! vocabulary is refused rather than approximated, since a wrong split gives
//! the model token ids it was never trained on.

use crate::gguf::{GgufFile, LoadError};
use crate::types::ChatMessage;
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// Texts of tokens that end a turn in the chat formats of supported models.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<|eom_id|>",
];

const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regexes llama.cpp applies, in order, for a `tokenizer.ggml.pre`
/// value, and whether whole words found in the vocabulary skip the merges.
fn pre_tokenizer(pre: &str) -> Option<(&'static [&'static str], bool)> {
    Some(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            (&[r"\p{N}", GPT2_SPLIT], false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "olmo" | "jais" => {
            (&[GPT2_SPLIT], false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (&[LLAMA3_SPLIT], true),
        "qwen2" | "deepseek-r1-qwen" => (&[QWEN2_SPLIT], false),
        _ => return None,
    })
}

/// GPT-2's reversible map from bytes to printable characters.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    map
}

/// Bytes of a token as the model sees them: byte-level BPE characters mapped
/// back to bytes, SentencePiece `▁` to a space, `<0xNN>` to the byte.
fn token_bytes(token: &str, char_to_byte: &std::collections::HashMap<char, u8>) -> Vec<u8> {
    if let Some(bytes) = token
        .chars()
        .map(|c| char_to_byte.get(&c).copied())
        .collect::<Option<Vec<u8>>>()
    {
        return bytes;
    }
    if token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && let Ok(b) = u8::from_str_radix(&token[3..5], 16)
    {
        return vec![b];
    }
    token.replace('\u{2581}', " ").into_bytes()
}

/// A model's tokenizer: text to token ids and back, which ids end
/// generation, and the chat template. Built once per model and shared
/// (behind an `Arc`) by the engine, the scheduler and the constraint
/// engine.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token (`tokenizer.ggml.bos_token_id`), if the
    /// model has one; put first by [`Tokenizer::encode`] only when the
    /// model asks for it (`add_bos_token`).
    pub bos: Option<u32>,
    /// End-of-sequence token (`tokenizer.ggml.eos_token_id`, required).
    /// One of the [`Tokenizer::end_of_generation`] tokens, not the only
    /// one.
    pub eos: u32,
    add_bos: bool,
    /// Tokens that end generation.
    end_of_generation: Vec<u32>,
    chat: Option<minijinja::Environment<'static>>,
    /// Per token id: its bytes, special tokens prefixed with 0xFF (the
    /// constrained-decoding library's convention).
    pieces: Vec<Vec<u8>>,
    special: Vec<bool>,
    /// Where the tokenizer came from, for messages.
    pub source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab", &self.pieces.len())
            .finish()
    }
}

impl Tokenizer {
    /// From a `tokenizer.json` beside the model if there is one, else from
    /// the GGUF metadata. `vocab_size` is the model's embedding row count.
    pub fn load(gguf: &GgufFile, vocab_size: usize) -> Result<Tokenizer, LoadError> {
        let beside = gguf
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .join("tokenizer.json");
        let tokens = gguf.strings("tokenizer.ggml.tokens")?;
        let types = gguf.ints("tokenizer.ggml.token_type")?;
        let err = |reason: String| LoadError::Tokenizer {
            file: gguf.path.clone(),
            reason,
        };
        let (inner, source) = if beside.is_file() {
            let t = tokenizers::Tokenizer::from_file(&beside)
                .map_err(|e| err(format!("{}: {e}", beside.display())))?;
            (t, beside)
        } else {
            (
                from_metadata(gguf, &tokens, types.as_deref())?,
                gguf.path.clone(),
            )
        };
        let eos = gguf
            .opt_u32("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| err("metadata has no tokenizer.ggml.eos_token_id".into()))?;
        let bos = gguf.opt_u32("tokenizer.ggml.bos_token_id")?;
        let add_bos = gguf
            .opt_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(false);
        if tokens.len() > vocab_size {
            return Err(err(format!(
                "{} tokens but the model has {vocab_size} embedding rows",
                tokens.len()
            )));
        }
        let mut end_of_generation = vec![eos];
        if let Some(eot) = gguf.opt_u32("tokenizer.ggml.eot_token_id")? {
            end_of_generation.push(eot);
        }
        let char_to_byte: std::collections::HashMap<char, u8> = byte_to_char()
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let mut pieces = Vec::with_capacity(vocab_size);
        let mut special = Vec::with_capacity(vocab_size);
        for (id, token) in tokens.iter().enumerate() {
            let kind = types.as_ref().and_then(|t| t.get(id).copied()).unwrap_or(1);
            let is_special = kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED;
            if is_special && END_OF_TURN.contains(&token.as_str()) {
                end_of_generation.push(id as u32);
            }
            if is_special {
                let mut b = vec![0xFF];
                b.extend_from_slice(token.as_bytes());
                pieces.push(b);
            } else {
                pieces.push(token_bytes(token, &char_to_byte));
            }
            special.push(is_special);
        }
        // Rows past the vocabulary (padding) can never be produced.
        while pieces.len() < vocab_size {
            pieces.push(format!("\u{FF}<pad{}>", pieces.len()).into_bytes());
            special.push(true);
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let chat = match gguf.get("tokenizer.chat_template") {
            Some(v) => {
                let source = v
                    .to_string()
                    .map_err(|_| err("tokenizer.chat_template is not a string".into()))?
                    .clone();
                Some(chat_environment(source).map_err(|e| err(format!("chat template: {e}")))?)
            }
            None => None,
        };
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos,
            end_of_generation,
            chat,
            pieces,
            special,
            source,
        })
    }

    /// Size of the model's token-id space: its embedding rows, which may be
    /// more than the tokenizer's tokens (the extra padding rows are never
    /// produced).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Encodes text, recognising special tokens written in it (as the chat
    /// template writes them), with BOS first when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        let encoding = self.inner.encode(text, false).map_err(|e| e.to_string())?;
        let body = encoding.get_ids();
        if body.first() == ids.first() && !ids.is_empty() {
            ids.clear();
        }
        ids.extend_from_slice(body);
        Ok(ids)
    }

    /// Encodes text as plain text, without BOS.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// The bytes of the tokens, special tokens left out.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if let Some(p) = self.pieces.get(id as usize)
                && !self.special[id as usize]
            {
                out.extend_from_slice(p);
            }
        }
        out
    }

    /// The text of the tokens, special tokens left out; bytes that are not
    /// valid UTF-8 (a character cut between tokens) become U+FFFD, so
    /// decode whole sequences rather than token by token.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// Whether sampling `id` ends a completion: see
    /// [`Tokenizer::end_of_generation`].
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// Tokens that end generation, sorted: EOS, EOT when the metadata names
    /// one, and special tokens that close a turn in common chat formats
    /// (such as `<|im_end|>`, `<|eot_id|>`), since chat models end their
    /// answers with those rather than EOS.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// Per token id, its bytes; special tokens are their text prefixed with
    /// 0xFF (llguidance's convention, so they never match plain text).
    /// Indexed by id, [`Tokenizer::vocab_size`] long.
    pub fn pieces(&self) -> &[Vec<u8>] {
        &self.pieces
    }

    /// Renders messages with the model's chat template, ending with the
    /// start of the assistant's turn.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let env = self
            .chat
            .as_ref()
            .ok_or("the model has no chat template (tokenizer.chat_template); send a raw prompt")?;
        let template = env.get_template("chat").map_err(|e| e.to_string())?;
        let messages: Vec<_> = messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content })
            .collect();
        let token = |id: Option<u32>| {
            id.and_then(|id| self.pieces.get(id as usize))
                .map(|p| String::from_utf8_lossy(p.strip_prefix(&[0xFF]).unwrap_or(p)).into_owned())
                .unwrap_or_default()
        };
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => token(self.bos),
                eos_token => token(Some(self.eos)),
            })
            .map_err(|e| format!("chat template: {e}"))
    }
}

fn chat_environment(source: String) -> Result<minijinja::Environment<'static>, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |_fmt: String| String::new());
    env.add_template_owned("chat", source)?;
    Ok(env)
}

fn from_metadata(
    gguf: &GgufFile,
    tokens: &[String],
    types: Option<&[i32]>,
) -> Result<tokenizers::Tokenizer, LoadError> {
    let err = |reason: String| LoadError::Tokenizer {
        file: gguf.path.clone(),
        reason,
    };
    let model = gguf.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer.ggml.model = '{model}' is not supported from GGUF metadata (only byte-level BPE, 'gpt2'); put the model's tokenizer.json beside the GGUF file"
        )));
    }
    let pre = gguf
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "default".into());
    let Some((splits, ignore_merges)) = pre_tokenizer(&pre) else {
        return Err(err(format!(
            "pre-tokenizer tokenizer.ggml.pre = '{pre}' is not known to the engine (known: smollm, gpt2, llama-bpe, qwen2 and their aliases); put the model's tokenizer.json beside the GGUF file"
        )));
    };
    let merges = gguf
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| err(format!("merge '{m}' is not two tokens")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| err(format!("building BPE: {e}")))?;
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for rx in splits {
        let split = Split::new(
            SplitPattern::Regex((*rx).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| err(format!("pre-tokenizer regex: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            types
                .and_then(|t| t.get(*i))
                .is_some_and(|&k| k == TOKEN_CONTROL || k == TOKEN_USER_DEFINED)
        })
        .map(|(_, t)| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| err(format!("special tokens: {e}")))?;
    Ok(tokenizer)
}
