#![no_main]
//! The GGUF reader (runtime/llm/src/gguf.rs) and the tokenizer built from
//! its metadata, on arbitrary bytes and on the tiny model with bytes flipped
//! and cut off. The first byte picks the mode. Proves: no panic; a file cut
//! before its last tensor ends is an error; whatever opens can be asked for
//! its architecture, a tensor and its tokenizer without a panic.

mod tiny;

use ganglion_llm::gguf::GgufFile;
use ganglion_llm::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let t = tiny::tiny();
    let mut cut = None;
    let bytes = match mode % 4 {
        // Arbitrary bytes, and arbitrary bytes after a GGUF v3 magic.
        0 => rest.to_vec(),
        1 => [&b"GGUF\x03\0\0\0"[..], rest].concat(),
        // The tiny model with bytes flipped, in the header or anywhere;
        // then cut off (mode 3).
        _ => {
            let mut b = t.bytes.clone();
            let (len, edits) = if mode % 4 == 3 && rest.len() >= 3 {
                let (len, edits) = rest.split_at(3);
                let n = u32::from_le_bytes([len[0], len[1], len[2], 0]) as usize;
                (Some(n % b.len()), edits)
            } else {
                (None, rest)
            };
            for e in edits.chunks_exact(3) {
                let at = u16::from_le_bytes([e[0], e[1]]) as usize;
                let limit = if at % 2 == 0 { t.header_len } else { b.len() };
                b[at % limit] ^= e[2].max(1);
            }
            if let Some(n) = len {
                b.truncate(n);
                if edits.len() < 3 {
                    cut = Some(n);
                }
            }
            b
        }
    };
    let path = tiny::scratch().join("input.gguf");
    std::fs::write(&path, &bytes).expect("write input");
    let opened = GgufFile::open(&path);
    if let Some(n) = cut
        && (n as u64) < t.data_end
    {
        assert!(
            opened.is_err(),
            "a file cut at {n} of {} opened",
            t.bytes.len()
        );
    }
    let Ok(mut gguf) = opened else {
        return;
    };
    let _ = gguf.architecture();
    let _ = gguf.tensor("token_embd.weight", &candle_core::Device::Cpu);
    let Ok(tokens) = gguf.strings("tokenizer.ggml.tokens") else {
        return;
    };
    if let Ok(tokenizer) = Tokenizer::load(&gguf, tokens.len()) {
        if let Ok(ids) = tokenizer.encode("the temperature is 23.5 °C <|im_end|>") {
            let _ = tokenizer.decode(&ids);
        }
        let _ = tokenizer.decode(&[0, 1, 2, 3, u32::MAX]);
    }
});
