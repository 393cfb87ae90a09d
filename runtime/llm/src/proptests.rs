//! Property tests of the GGUF reader and of the tokenizer built from GGUF
//! metadata on hostile input: arbitrary bytes, the tiny test model with
//! bytes flipped and cut off, arbitrary text and token ids. Cases per
//! property: proptest's default (256), or `PROPTEST_CASES`.

use crate::gguf::GgufFile;
use crate::testing::{TinySpec, write_tiny_model};
use crate::tokenizer::Tokenizer;
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The tiny model's special tokens: recognised in text, left out by decode.
const SPECIAL: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

struct Tiny {
    bytes: Vec<u8>,
    /// Where the tensor data starts: before it, header and metadata.
    header_len: usize,
    /// Where the last tensor ends: a file cut before is truncated.
    data_end: u64,
    tokenizer: Tokenizer,
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ganglion-llm-prop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny() -> &'static Tiny {
    static TINY: OnceLock<Tiny> = OnceLock::new();
    TINY.get_or_init(|| {
        let dir = scratch().join("tiny");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        write_tiny_model(&path, &TinySpec::default()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        let c = &gguf.content;
        let data_end = c
            .tensor_infos
            .values()
            .map(|i| {
                let elems = i.shape.elem_count() as u64;
                c.tensor_data_offset
                    + i.offset
                    + elems / i.ggml_dtype.block_size() as u64 * i.ggml_dtype.type_size() as u64
            })
            .max()
            .unwrap();
        let vocab = gguf.strings("tokenizer.ggml.tokens").unwrap().len();
        let tokenizer = Tokenizer::load(&gguf, vocab).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Tiny {
            header_len: c.tensor_data_offset as usize,
            data_end,
            bytes,
            tokenizer,
        }
    })
}

/// Opens `bytes` as a GGUF file, and whatever opens is asked for its
/// architecture, a tensor and its tokenizer, which encodes and decodes.
/// Returns whether it opened.
fn open_and_use(bytes: &[u8]) -> bool {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = scratch().join(format!("case-{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let opened = GgufFile::open(&path);
    let ok = opened.is_ok();
    if let Ok(mut gguf) = opened {
        let _ = gguf.architecture();
        let _ = gguf.tensor("token_embd.weight", &candle_core::Device::Cpu);
        if let Ok(tokens) = gguf.strings("tokenizer.ggml.tokens")
            && let Ok(t) = Tokenizer::load(&gguf, tokens.len())
        {
            if let Ok(ids) = t.encode("the temperature is 23.5 °C <|im_end|>") {
                let _ = t.decode(&ids);
            }
            let _ = t.decode(&[0, 1, 2, u32::MAX]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

/// Text that exercises the pre-tokenizer: words the merges know, digits,
/// whitespace runs, punctuation, JSON, unicode, control characters.
fn texty() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        proptest::sample::select(vec![
            " the", "the", " temp", " alarm", "{\"", "\":", "\"}", "in", "er", "123", "23.5", " ",
            "  ", "\t", "\n", "\r\n", "'s", "'LL", "°C", "温度", "🔥", "\u{0}", "\u{7f}",
            "\u{feff}", "\u{202e}", "<|", "|>", "<im_end>",
        ])
        .prop_map(str::to_owned),
        any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..32).prop_map(|p| p.concat())
}

fn no_special(s: &str) -> bool {
    !SPECIAL.iter().any(|t| s.contains(t))
}

proptest! {
    /// Arbitrary bytes are not a GGUF file: an error, never a panic.
    #[test]
    fn gguf_reader_refuses_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let opened = open_and_use(&bytes);
        prop_assert!(!opened || bytes.starts_with(b"GGUF"));
    }

    /// Arbitrary bytes after a valid magic and version (counts, lengths,
    /// types, dimensions at random): an error or a file, never a panic.
    #[test]
    fn gguf_reader_never_panics_after_the_magic(
        version in 1u32..=3,
        rest in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let bytes = [&b"GGUF"[..], &version.to_le_bytes(), &rest].concat();
        open_and_use(&bytes);
    }

    /// The tiny model cut anywhere before its last tensor ends is an
    /// error.
    #[test]
    fn a_truncated_tiny_model_is_an_error(at in any::<proptest::sample::Index>()) {
        let t = tiny();
        let cut = at.index(t.data_end as usize);
        prop_assert!(!open_and_use(&t.bytes[..cut]), "cut at {} of {}", cut, t.bytes.len());
    }

    /// The tiny model with bytes flipped, mostly in its header and
    /// metadata, and maybe cut off: an error or a model whose tokenizer
    /// works, never a panic.
    #[test]
    fn a_mutated_tiny_model_never_panics(
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<bool>(), 1u8..=255), 1..8),
        cut in proptest::option::of(any::<proptest::sample::Index>()),
    ) {
        let t = tiny();
        let mut b = t.bytes.clone();
        for (at, header, xor) in flips {
            let i = at.index(if header { t.header_len } else { b.len() });
            b[i] ^= xor;
        }
        if let Some(cut) = cut {
            b.truncate(cut.index(b.len()));
        }
        open_and_use(&b);
    }

    /// Encoding arbitrary text never panics and gives ids of the
    /// vocabulary; decoding arbitrary ids never panics.
    #[test]
    fn tokenizer_never_panics_and_ids_are_in_the_vocabulary(
        s in any::<String>(),
        t in texty(),
        ids in proptest::collection::vec(any::<u32>(), 0..64),
    ) {
        let tok = &tiny().tokenizer;
        for text in [&s, &t] {
            let encoded = tok.encode(text).unwrap();
            prop_assert!(encoded.iter().all(|&id| (id as usize) < tok.vocab_size()));
        }
        let _ = tok.decode(&ids);
        let _ = tok.decode_bytes(&ids);
    }

    /// Byte-level BPE loses nothing: text without special-token markers
    /// decodes to itself.
    #[test]
    fn text_without_special_tokens_round_trips(
        s in any::<String>().prop_filter("no special token", |s| no_special(s)),
        t in texty().prop_filter("no special token", |s| no_special(s)),
    ) {
        let tok = &tiny().tokenizer;
        for text in [s, t] {
            let ids = tok.encode(&text).unwrap();
            prop_assert_eq!(tok.decode(&ids), text);
        }
    }

    /// A special token written in text is one id, and decode leaves it
    /// out: what is around it round-trips.
    #[test]
    fn special_tokens_in_text_are_one_id_and_decode_drops_them(
        before in texty().prop_filter("no special token", |s| no_special(s)),
        special in 0usize..3,
        after in texty().prop_filter("no special token", |s| no_special(s)),
    ) {
        let tok = &tiny().tokenizer;
        let text = format!("{before}{}{after}", SPECIAL[special]);
        // A marker made by the text around it (`<|` + `im_end|>`) counts too.
        prop_assume!(text.matches(SPECIAL[special]).count() == 1 && SPECIAL.iter().filter(|s| text.contains(*s)).count() == 1);
        let ids = tok.encode(&text).unwrap();
        prop_assert_eq!(ids.iter().filter(|&&id| id == special as u32).count(), 1);
        prop_assert_eq!(tok.decode(&ids), format!("{before}{after}"));
    }
}

/// A GGUF v3 file with one F32 tensor of the given dimensions at `offset`.
fn one_tensor(dims: &[u64], offset: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata entries
    b.extend(1u64.to_le_bytes());
    b.push(b't');
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes()); // F32
    b.extend(offset.to_le_bytes());
    b.resize(b.len() + 64, 0);
    b
}

/// Found by `a_mutated_tiny_model_never_panics`: a flipped dimension byte
/// made the element count overflow (a panic in debug builds, a wrapped
/// size that passed the truncation check in release).
#[test]
fn a_tensor_of_2_40_by_2_40_elements_is_invalid_not_a_panic() {
    assert!(!open_and_use(&one_tensor(&[1 << 40, 1 << 40], 0)));
    // An offset near the end of the range: the sum overflowed the same way.
    assert!(!open_and_use(&one_tensor(&[4], u64::MAX - 8)));
    // The same file with a small tensor that fits opens.
    assert!(open_and_use(&one_tensor(&[4], 0)));
}
