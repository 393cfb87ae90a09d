//! Compiled components on disk, so that a restart or reload does not compile
//! again. Artefacts are keyed by the component's content hash and by the
//! engine's compatibility hash (wasmtime version, target, settings), so an
//! artefact from another engine configuration is never loaded. A damaged
//! artefact is compiled again and replaced.
//!
//! Artefacts are native code that is run as it is, so on unix the folder is
//! made `0700` and artefacts `0600`, and an artefact is loaded only when it
//! and its folder belong to the user the runtime runs as and neither is
//! writable by group or others; any other is compiled again (with a warning)
//! and replaced.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A folder of compiled components (`<content hash>-<engine key>.cwasm`).
pub struct ArtifactCache {
    dir: PathBuf,
    engine_key: String,
    /// The user artefacts must belong to; `None` where it could not be
    /// found out, and then no artefact is trusted.
    #[cfg(unix)]
    uid: Option<u32>,
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
    /// On unix the folder is created `0700`, and an existing one that
    /// belongs to the runtime's user is set to `0700`.
    pub fn new(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        #[cfg(unix)]
        let uid = unix::prepare_dir(dir)?;
        #[cfg(not(unix))]
        std::fs::create_dir_all(dir)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(ArtifactCache {
            dir: dir.to_owned(),
            engine_key: format!("{:016x}", h.finish()),
            #[cfg(unix)]
            uid,
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
        if let Some(artefact) = self.read_trusted(&path) {
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash; `read_trusted` checked
            // that it and its folder belong to this user and that no one else
            // may write them; wasmtime checks the header and version again.
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

    /// The artefact's bytes, when there is one and it may be trusted (see
    /// the module docs); an untrusted one is reported and left unread.
    fn read_trusted(&self, path: &Path) -> Option<Vec<u8>> {
        use std::io::Read as _;
        let mut file = std::fs::File::open(path).ok()?;
        #[cfg(unix)]
        {
            // The open file's metadata, so that what is checked is what is read.
            let checked = file
                .metadata()
                .map_err(|e| e.to_string())
                .and_then(|m| self.check_owner(&m, "artefact"))
                .and_then(|()| {
                    std::fs::metadata(&self.dir)
                        .map_err(|e| e.to_string())
                        .and_then(|m| self.check_owner(&m, "folder"))
                });
            if let Err(why) = checked {
                tracing::warn!(path = %path.display(), "compiled artefact not trusted ({why}), compiling again");
                return None;
            }
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }

    /// Refuses a file or folder that is not this user's or that group or
    /// others may write.
    #[cfg(unix)]
    fn check_owner(&self, meta: &std::fs::Metadata, what: &str) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        match self.uid {
            None => return Err("the runtime's user is unknown".into()),
            Some(uid) if meta.uid() != uid => {
                return Err(format!(
                    "the {what} belongs to uid {}, not {uid}",
                    meta.uid()
                ));
            }
            Some(_) => {}
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "the {what} is writable by group or others (mode {:o})",
                meta.mode() & 0o7777
            ));
        }
        Ok(())
    }

    fn store(&self, path: &Path, component: &Component) -> wasmtime::Result<()> {
        use std::io::Write as _;
        let bytes = component.serialize()?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        // A leftover from a crashed run would keep its mode; start afresh.
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(&bytes)?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

#[cfg(unix)]
mod unix {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    use std::path::Path;

    /// Creates `dir` (parents as usual) with mode `0700`, sets an existing
    /// one of this user to `0700`, and returns this user's id.
    pub(super) fn prepare_dir(dir: &Path) -> std::io::Result<Option<u32>> {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let created = std::fs::DirBuilder::new().mode(0o700).create(dir);
        if let Err(e) = created
            && !(e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir())
        {
            return Err(e);
        }
        let uid = current_uid(dir);
        let meta = std::fs::metadata(dir)?;
        if uid == Some(meta.uid()) && meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(uid)
    }

    /// The effective user id, without `libc`: the owner of a file this
    /// process creates in `dir`, or else of `/proc/self` (Linux).
    fn current_uid(dir: &Path) -> Option<u32> {
        let probe = dir.join(format!(".uid-probe-{}", std::process::id()));
        let _ = std::fs::remove_file(&probe);
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .and_then(|f| f.metadata());
        let _ = std::fs::remove_file(&probe);
        match created {
            Ok(meta) => Some(meta.uid()),
            Err(_) => std::fs::metadata("/proc/self").ok().map(|m| m.uid()),
        }
    }
}
