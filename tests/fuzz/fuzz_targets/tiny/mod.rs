//! The tiny random-weight model of `ganglion_llm::testing`, written once per
//! process: the valid GGUF that the `gguf` target mutates and the tokenizer
//! that the `tokenizer` target encodes with.

// Each target uses part of it.
#![allow(dead_code)]

use ganglion_llm::gguf::GgufFile;
use ganglion_llm::testing::{TinySpec, write_tiny_model};
use ganglion_llm::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::sync::OnceLock;

pub struct Tiny {
    /// The whole file.
    pub bytes: Vec<u8>,
    /// Where the tensor data starts: everything before is header and metadata.
    pub header_len: usize,
    /// Where the last tensor ends: a file cut anywhere before is truncated.
    pub data_end: u64,
    pub tokenizer: Tokenizer,
}

/// A folder of this process under the temporary folder (xtask points
/// TMPDIR into target/fuzz).
pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ganglion-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

pub fn tiny() -> &'static Tiny {
    static TINY: OnceLock<Tiny> = OnceLock::new();
    TINY.get_or_init(|| {
        // Its own folder: a tokenizer.json beside the model would be used
        // instead of the metadata.
        let dir = scratch().join("tiny");
        std::fs::create_dir_all(&dir).expect("tiny folder");
        let path = dir.join("tiny.gguf");
        write_tiny_model(&path, &TinySpec::default()).expect("write tiny model");
        let bytes = std::fs::read(&path).expect("read tiny model");
        let gguf = GgufFile::open(&path).expect("open tiny model");
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
            .unwrap_or(0);
        let vocab = gguf.strings("tokenizer.ggml.tokens").expect("tokens").len();
        let tokenizer = Tokenizer::load(&gguf, vocab).expect("tiny tokenizer");
        Tiny {
            header_len: c.tensor_data_offset as usize,
            data_end,
            bytes,
            tokenizer,
        }
    })
}
