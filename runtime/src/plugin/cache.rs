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
//!
//! The folder is bounded (`[plugins] cache_max_bytes`, `cache_max_age_days`):
//! at start and after each new artefact, artefacts unused for too long go,
//! then the least recently used until the rest fit. "Used" is the file's
//! modification time, set when an artefact is stored and again each time it
//! is loaded. Only `*.cwasm` files are counted and removed; artefacts of
//! other engines (an older wasmtime) count too, which is how they go.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
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
    /// Total bytes of artefacts kept; 0: no bound.
    max_bytes: u64,
    /// Artefacts unused longer than this are removed; none: no bound.
    max_age: Option<Duration>,
}

/// What an eviction pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// Artefacts removed.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
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
            max_bytes: 0,
            max_age: None,
        })
    }

    /// Bounds the folder to `max_bytes` of artefacts (0: no bound) and to
    /// artefacts used within `max_age_days` (0: no bound), and evicts now.
    pub fn bounded(mut self, max_bytes: u64, max_age_days: u64) -> Self {
        self.max_bytes = max_bytes;
        self.max_age =
            (max_age_days > 0).then(|| Duration::from_secs(max_age_days.saturating_mul(86_400)));
        self.evict(None);
        self
    }

    /// One eviction pass over the folder, keeping `keep` (the artefact just
    /// stored) whatever its size; errors are logged, not returned, since a
    /// cache that cannot shrink still works.
    pub fn evict(&self, keep: Option<&Path>) -> Evicted {
        if self.max_bytes == 0 && self.max_age.is_none() {
            return Evicted::default();
        }
        match evict_dir(
            &self.dir,
            self.max_bytes,
            self.max_age,
            SystemTime::now(),
            keep,
        ) {
            Ok(evicted) => {
                if evicted.files > 0 {
                    tracing::info!(
                        dir = %self.dir.display(),
                        files = evicted.files,
                        bytes = evicted.bytes,
                        "evicted compiled artefacts"
                    );
                }
                evicted
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot evict compiled artefacts");
                Evicted::default()
            }
        }
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
                Ok(c) => {
                    // Used now: the eviction's "least recently used" is by
                    // modification time. Failing to mark it only makes it
                    // go sooner.
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(SystemTime::now()));
                    return Ok((c, CompileSource::Cached));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "compiled artefact unusable, compiling again")
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Err(e) = self.store(&path, &component) {
            tracing::warn!(path = %path.display(), error = %e, "cannot store compiled artefact");
        } else {
            self.evict(Some(&path));
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

/// Removes from `dir` the `*.cwasm` files last modified more than
/// `max_age` before `now`, then the least recently modified until the rest
/// total at most `max_bytes` (0: no bound); `keep` is never removed.
fn evict_dir(
    dir: &Path,
    max_bytes: u64,
    max_age: Option<Duration>,
    now: SystemTime,
    keep: Option<&Path>,
) -> std::io::Result<Evicted> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "cwasm") {
            continue;
        }
        // A file gone meanwhile (another process evicting) is skipped.
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        files.push((used, meta.len(), path));
    }
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let mut evicted = Evicted::default();
    for (used, len, path) in files {
        if keep == Some(path.as_path()) {
            continue;
        }
        let too_old = max_age.is_some_and(|age| now.duration_since(used).unwrap_or_default() > age);
        let too_big = max_bytes > 0 && total > max_bytes;
        if !too_old && !too_big {
            // Sorted oldest first: if this one may stay, so may the rest
            // (for age); for size, what is left already fits.
            break;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total -= len;
                evicted.files += 1;
                evicted.bytes += len;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= len,
            Err(e) => return Err(e),
        }
    }
    Ok(evicted)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_removes_the_too_old_then_the_least_recently_used_past_the_size() {
        let dir = std::env::temp_dir().join(format!("ganglion-evict-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let file = |name: &str, days_ago: u32| {
            let path = dir.join(name);
            std::fs::write(&path, [0u8; 100]).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(now - day * days_ago)
                .unwrap();
            path
        };
        file("ancient.cwasm", 40);
        file("old.cwasm", 3);
        file("recent.cwasm", 2);
        let newest = file("newest.cwasm", 1);
        file("notes.txt", 90);
        // 400 bytes of artefacts, at most 250 kept, none older than 30 days.
        let evicted = evict_dir(&dir, 250, Some(day * 30), now, None).unwrap();
        assert_eq!(
            evicted,
            Evicted {
                files: 2,
                bytes: 200
            }
        );
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["newest.cwasm", "notes.txt", "recent.cwasm"]);
        // The artefact just stored stays, even alone over the bound.
        let evicted = evict_dir(&dir, 50, None, now, Some(&newest)).unwrap();
        assert_eq!(evicted.files, 1);
        assert!(newest.exists() && !dir.join("recent.cwasm").exists());
        // No bound: nothing goes.
        assert_eq!(
            evict_dir(&dir, 0, None, now, None).unwrap(),
            Evicted::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
