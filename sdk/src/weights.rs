//! Model weights and other large read-only files from a directory the rule
//! grants the plugin (`grants = { dirs = [{ host = "models/all-MiniLM-L6-v2",
//! guest = "/model" }] }`). Read them once per instance and keep what they
//! become: an instance serves many calls, and a pooled instance stays warm.
//!
//! Every read names a size bound: a file larger than the plugin expects
//! (the wrong file granted, or one still being written) is refused before
//! it fills the instance's memory cap, with an error that says so.

use crate::PluginError;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Why a weights file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsError {
    /// The name is not a plain relative path inside the directory (it is
    /// absolute, or has `..`).
    BadName(String),
    /// No such file: the rule does not grant the directory, or it lacks
    /// the file.
    NotFound(PathBuf),
    /// The file is larger than the caller's bound.
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The bound in bytes.
        max: u64,
    },
    /// Any other I/O error.
    Io {
        /// The file.
        path: PathBuf,
        /// The error's message.
        reason: String,
    },
}

impl fmt::Display for WeightsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsError::BadName(name) => write!(
                f,
                "weights file name `{name}` must be relative, without `..`"
            ),
            WeightsError::NotFound(path) => write!(
                f,
                "{} not found: does the rule grant its directory (grants.dirs)?",
                path.display()
            ),
            WeightsError::TooLarge { path, size, max } => write!(
                f,
                "{} is {size} bytes, over the bound of {max}",
                path.display()
            ),
            WeightsError::Io { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for WeightsError {}

impl From<WeightsError> for PluginError {
    /// A missing or oversized file is the rule's doing (what it grants),
    /// so it reads as a configuration error; other I/O errors as `other`.
    fn from(e: WeightsError) -> Self {
        match e {
            WeightsError::Io { .. } => PluginError::Other(e.to_string()),
            _ => PluginError::BadConfig(e.to_string()),
        }
    }
}

/// `dir` joined with `name`, once `name` is known to stay inside `dir`.
pub fn path(dir: &str, name: &str) -> Result<PathBuf, WeightsError> {
    let relative = Path::new(name);
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if name.is_empty() || !plain {
        return Err(WeightsError::BadName(name.to_owned()));
    }
    Ok(Path::new(dir).join(relative))
}

/// Opens `dir/name` for reading in pieces (a file too large to hold twice),
/// after checking its size against `max_bytes`; returns the file and its
/// size.
pub fn open(dir: &str, name: &str, max_bytes: u64) -> Result<(File, u64), WeightsError> {
    let path = path(dir, name)?;
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => WeightsError::NotFound(path.clone()),
        _ => WeightsError::Io {
            path: path.clone(),
            reason: e.to_string(),
        },
    };
    let file = File::open(&path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > max_bytes {
        return Err(WeightsError::TooLarge {
            path,
            size,
            max: max_bytes,
        });
    }
    Ok((file, size))
}

/// Reads all of `dir/name`, refusing a file over `max_bytes` before reading
/// any of it.
pub fn read(dir: &str, name: &str, max_bytes: u64) -> Result<Vec<u8>, WeightsError> {
    let (mut file, size) = open(dir, name, max_bytes)?;
    let mut bytes = Vec::with_capacity(size as usize);
    // `take`: a file that grows after the size check is still read only
    // up to the bound.
    let read = (&mut file)
        .take(max_bytes)
        .read_to_end(&mut bytes)
        .map_err(|e| WeightsError::Io {
            path: Path::new(dir).join(name),
            reason: e.to_string(),
        })?;
    debug_assert_eq!(read, bytes.len());
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ganglion-sdk-weights-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_a_file_within_its_bound_and_refuses_a_larger_one() {
        let dir = scratch("bound");
        std::fs::write(dir.join("w.bin"), [7u8; 100]).unwrap();
        let d = dir.to_str().unwrap();
        assert_eq!(read(d, "w.bin", 100).unwrap(), vec![7u8; 100]);
        let err = read(d, "w.bin", 99).unwrap_err();
        assert!(
            matches!(
                err,
                WeightsError::TooLarge {
                    size: 100,
                    max: 99,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            read(d, "missing.bin", 10),
            Err(WeightsError::NotFound(_))
        ));
    }

    #[test]
    fn names_must_stay_inside_the_directory() {
        for bad in ["", "/etc/passwd", "../secret", "a/../../b"] {
            assert!(
                matches!(path("/model", bad), Err(WeightsError::BadName(_))),
                "{bad}"
            );
        }
        assert_eq!(
            path("/model", "sub/w.bin").unwrap(),
            PathBuf::from("/model/sub/w.bin")
        );
    }
}
