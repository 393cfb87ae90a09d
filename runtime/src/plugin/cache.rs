//! Compiled components on disk, so that a restart or reload does not compile
//! again. Artefacts are keyed by the component's content hash and by the
//! engine's compatibility hash (wasmtime version, target, settings), so an
//! artefact from another engine configuration is never loaded. A damaged
//! artefact is compiled again and replaced.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A folder of compiled components (`<content hash>-<engine key>.cwasm`).
pub struct ArtifactCache {
    dir: PathBuf,
    engine_key: String,
}

/// How the component was obtained, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    /// Loaded from the artefact cache.
    Cached,
    /// Compiled now.
    Compiled,
}

impl ArtifactCache {
    /// Opens the cache in `dir` (created if missing) for artefacts of `engine`.
    pub fn new(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(ArtifactCache {
            dir: dir.to_owned(),
            engine_key: format!("{:016x}", h.finish()),
        })
    }

    fn path(&self, content_hash: &str) -> PathBuf {
        self.dir
            .join(format!("{content_hash}-{}.cwasm", self.engine_key))
    }

    /// Loads the artefact for `content_hash`, or compiles `bytes` and stores
    /// it. Blocking: call from a blocking thread.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        content_hash: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, CompileSource)> {
        let path = self.path(content_hash);
        // Read into memory rather than `deserialize_file`: a mapped file that
        // something else truncates would fault the whole process (SIGBUS).
        if let Ok(artefact) = std::fs::read(&path) {
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash into a directory the
            // runtime owns; wasmtime checks the header and version again.
            match unsafe { Component::deserialize(engine, &artefact) } {
                Ok(c) => return Ok((c, CompileSource::Cached)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "compiled artefact unusable, compiling again")
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Err(e) = self.store(&path, &component) {
            tracing::warn!(path = %path.display(), error = %e, "cannot store compiled artefact");
        }
        Ok((component, CompileSource::Compiled))
    }

    fn store(&self, path: &Path, component: &Component) -> wasmtime::Result<()> {
        let bytes = component.serialize()?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}
