//! Opening a GGUF file with errors that name the file and say what was
//! expected: a missing file, a file that is not GGUF, a truncated file, an
//! architecture or tensor type the engine does not run.

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Architectures whose forward pass the engine implements.
pub const ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3"];

/// Tensor types the engine accepts for weights.
pub const WEIGHT_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// Why a model could not be loaded. Every variant but `Device` names the
/// file, so the message alone tells an operator what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file (a GGUF model, or a file of the embedding folder) does not
    /// exist.
    #[error("model file {}: not found", .0.display())]
    Missing(PathBuf),
    /// The file exists but could not be read; also a failure to start the
    /// worker thread, reported against the model's path.
    #[error("model file {}: {reason}", file.display())]
    Io {
        /// The file being read.
        file: PathBuf,
        /// The operating system's error.
        reason: std::io::Error,
    },
    /// The header is not GGUF, or not one candle can read.
    #[error("model file {}: not a GGUF file ({reason})", file.display())]
    NotGguf {
        /// The file.
        file: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    #[error(
        "model file {}: truncated: tensor {tensor} ends at byte {needed} but the file has {actual} bytes",
        file.display()
    )]
    /// A tensor's data runs past the end of the file: usually an
    /// interrupted download.
    Truncated {
        /// The file.
        file: PathBuf,
        /// The first tensor found to overrun.
        tensor: String,
        /// The byte offset where that tensor's data ends.
        needed: u64,
        /// The file's size in bytes.
        actual: u64,
    },
    #[error(
        "model file {}: architecture '{found}' is not supported (expected one of: llama, qwen2, qwen3)",
        file.display()
    )]
    /// `general.architecture` is not one of [`ARCHITECTURES`].
    Architecture {
        /// The file.
        file: PathBuf,
        /// The architecture it declares.
        found: String,
    },
    /// The file reads but does not hold a model the engine can run: a
    /// missing or mistyped metadata key or tensor, a tensor type outside
    /// [`WEIGHT_TYPES`], inconsistent shapes.
    #[error("model file {}: {reason}", file.display())]
    Invalid {
        /// The file (for the embedder, the file within its folder).
        file: PathBuf,
        /// What is wrong, naming the key or tensor.
        reason: String,
    },
    /// `[model] device` names no usable device (see
    /// [`crate::EngineConfig::device`]).
    #[error("model device {0}")]
    Device(String),
    /// The tokenizer could not be built from the GGUF metadata or its
    /// `tokenizer.json`, or its chat template does not compile.
    #[error("tokenizer for {}: {reason}", file.display())]
    Tokenizer {
        /// The model file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A GGUF file whose header has been read and checked.
pub struct GgufFile {
    /// Where it was opened from, for error messages.
    pub path: PathBuf,
    /// Metadata and tensor directory, as candle read them.
    pub content: Content,
    /// The open file, positioned anywhere: [`GgufFile::tensor`] seeks.
    pub reader: BufReader<File>,
}

impl GgufFile {
    /// Opens `path` and reads its header, checking that every tensor's
    /// element count is a whole number of its type's blocks and that its
    /// data lies within the file, so a truncated download fails here, not
    /// part-way through loading. Tensor types and the architecture are
    /// checked later, by [`GgufFile::tensor`] and
    /// [`GgufFile::architecture`].
    ///
    /// # Errors
    ///
    /// `Missing`, `Io`, `NotGguf`, `Truncated`, or `Invalid` for dimensions
    /// whose product overflows or is not a multiple of the block size.
    pub fn open(path: &Path) -> Result<GgufFile, LoadError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing(path.to_owned()),
            _ => LoadError::Io {
                file: path.to_owned(),
                reason: e,
            },
        })?;
        let actual = file
            .metadata()
            .map_err(|e| LoadError::Io {
                file: path.to_owned(),
                reason: e,
            })?
            .len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| LoadError::NotGguf {
            file: path.to_owned(),
            reason: e.to_string(),
        })?;
        for (name, info) in &content.tensor_infos {
            // Checked: the dimensions come from the file, and a product or
            // sum that overflows would panic, or wrap past the size check.
            let Some(elems) = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            else {
                return Err(LoadError::Invalid {
                    file: path.to_owned(),
                    reason: format!(
                        "tensor {name} has dimensions {:?}, too many elements",
                        info.shape.dims()
                    ),
                });
            };
            let block = info.ggml_dtype.block_size() as u64;
            if !elems.is_multiple_of(block) {
                return Err(LoadError::Invalid {
                    file: path.to_owned(),
                    reason: format!(
                        "tensor {name} has {elems} elements, not a multiple of its block size {block}"
                    ),
                });
            }
            let needed = (elems / block)
                .checked_mul(info.ggml_dtype.type_size() as u64)
                .and_then(|n| n.checked_add(info.offset))
                .and_then(|n| n.checked_add(content.tensor_data_offset))
                .unwrap_or(u64::MAX);
            if needed > actual {
                return Err(LoadError::Truncated {
                    file: path.to_owned(),
                    tensor: name.clone(),
                    needed,
                    actual,
                });
            }
        }
        Ok(GgufFile {
            path: path.to_owned(),
            content,
            reader,
        })
    }

    /// `general.architecture`, checked against [`ARCHITECTURES`].
    ///
    /// # Errors
    ///
    /// `Invalid` when the key is missing or not a string, `Architecture`
    /// when the engine does not run it.
    pub fn architecture(&self) -> Result<String, LoadError> {
        let arch = self.string("general.architecture")?;
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(LoadError::Architecture {
                file: self.path.clone(),
                found: arch,
            });
        }
        Ok(arch)
    }

    /// A [`LoadError::Invalid`] against this file, for the model's own
    /// checks of what it reads.
    pub fn invalid(&self, reason: impl Into<String>) -> LoadError {
        LoadError::Invalid {
            file: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The raw metadata value under `key` (e.g. `llama.block_count`), if
    /// present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value, LoadError> {
        self.get(key)
            .ok_or_else(|| self.invalid(format!("metadata key {key} is missing")))
    }

    /// A required string metadata value.
    ///
    /// # Errors
    ///
    /// `Invalid` when the key is missing or not a string.
    pub fn string(&self, key: &str) -> Result<String, LoadError> {
        self.require(key)?
            .to_string()
            .cloned()
            .map_err(|_| self.invalid(format!("metadata key {key} is not a string")))
    }

    /// A required integer metadata value; see [`GgufFile::opt_u32`].
    ///
    /// # Errors
    ///
    /// `Invalid` when the key is missing, not an integer, or out of range.
    pub fn u32(&self, key: &str) -> Result<u32, LoadError> {
        self.opt_u32(key)?
            .ok_or_else(|| self.invalid(format!("metadata key {key} is missing")))
    }

    /// Integer metadata of any width; GGUF writers disagree on which they use.
    /// `None` when the key is absent.
    ///
    /// # Errors
    ///
    /// `Invalid` when the value is not an integer or does not fit a `u32`
    /// (a negative signed value counts as out of range).
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, LoadError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(n) => *n as u64,
            Value::I8(n) => *n as u64,
            Value::U16(n) => *n as u64,
            Value::I16(n) => *n as u64,
            Value::U32(n) => *n as u64,
            Value::I32(n) => *n as u64,
            Value::U64(n) => *n,
            Value::I64(n) => *n as u64,
            _ => return Err(self.invalid(format!("metadata key {key} is not an integer"))),
        };
        u32::try_from(n)
            .map(Some)
            .map_err(|_| self.invalid(format!("metadata key {key} is out of range")))
    }

    /// Optional float metadata, `f32` or `f64` (narrowed); `None` when the
    /// key is absent.
    ///
    /// # Errors
    ///
    /// `Invalid` when the value is not a float.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(_) => Err(self.invalid(format!("metadata key {key} is not a number"))),
        }
    }

    /// Optional boolean metadata; a value of another type reads as absent,
    /// since the flags it serves (such as `tokenizer.ggml.add_bos_token`)
    /// have safe defaults.
    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.to_bool().ok())
    }

    /// A required array of strings (such as `tokenizer.ggml.tokens`).
    ///
    /// # Errors
    ///
    /// `Invalid` when the key is missing, not an array, or holds anything
    /// but strings.
    pub fn strings(&self, key: &str) -> Result<Vec<String>, LoadError> {
        let list = self
            .require(key)?
            .to_vec()
            .map_err(|_| self.invalid(format!("metadata key {key} is not an array")))?;
        list.iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| self.invalid(format!("metadata key {key} holds a non-string")))
            })
            .collect()
    }

    /// An optional array of integers (such as `tokenizer.ggml.token_type`);
    /// unsigned values above `i32::MAX` wrap. `None` when the key is absent.
    ///
    /// # Errors
    ///
    /// `Invalid` when the value is not an array or holds a non-integer.
    pub fn ints(&self, key: &str) -> Result<Option<Vec<i32>>, LoadError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = v
            .to_vec()
            .map_err(|_| self.invalid(format!("metadata key {key} is not an array")))?;
        list.iter()
            .map(|v| {
                v.to_i32()
                    .or_else(|_| v.to_u32().map(|n| n as i32))
                    .map_err(|_| self.invalid(format!("metadata key {key} holds a non-integer")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Whether the file holds tensor `name`, for weights that are optional
    /// (a tied output matrix, RoPE frequency factors).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads tensor `name` onto `device`, still quantised.
    ///
    /// # Errors
    ///
    /// `Invalid` when the tensor is missing, its type is not in
    /// [`WEIGHT_TYPES`], or reading it fails.
    pub fn tensor(
        &mut self,
        name: &str,
        device: &candle_core::Device,
    ) -> Result<candle_core::quantized::QTensor, LoadError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LoadError::Invalid {
                file: self.path.clone(),
                reason: format!("tensor {name} is missing"),
            })?;
        if !WEIGHT_TYPES.contains(&info.ggml_dtype) {
            return Err(self.invalid(format!(
                "tensor {name} has type {:?}, which the engine does not run",
                info.ggml_dtype
            )));
        }
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| LoadError::Invalid {
                file: self.path.clone(),
                reason: format!("reading tensor {name}: {e}"),
            })
    }
}
