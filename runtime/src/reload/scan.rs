//! Reading the folders: which files count, and which are settled (the same
//! size, time and inode in two scans `debounce_ms` apart).

use super::*;

/// What identifies a file's state between scans without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stat {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

/// The candidate files of a folder: `None` when it cannot be read (gone, or
/// being replaced).
pub(super) fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(super) fn scan(dir: &Path, extension: &str) -> Option<HashMap<PathBuf, Stat>> {
    use std::os::unix::fs::MetadataExt;
    let entries = std::fs::read_dir(dir).ok()?;
    let mut found = HashMap::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || path.extension().is_none_or(|x| x != extension) {
            continue;
        }
        // Follows symbolic links: a link to a component counts as the component.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        found.insert(
            path,
            Stat {
                len: meta.len(),
                modified: meta.modified().ok(),
                inode: meta.ino(),
            },
        );
    }
    Some(found)
}

/// Every candidate file of a folder, sorted, with its content and hash,
/// recorded as seen; what cannot be read goes to `problems`.
pub(super) fn read_folder(
    t: &mut Tracked,
    dir: &Path,
    extension: &str,
    what: &str,
    problems: &mut Vec<String>,
) -> Vec<(PathBuf, Stat, Vec<u8>, blake3::Hash)> {
    let Some(files) = scan(dir, extension) else {
        problems.push(format!("{}: cannot read the {what} folder", dir.display()));
        return Vec::new();
    };
    let mut files: Vec<(PathBuf, Stat)> = files.into_iter().collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (path, stat) in files {
        t.seen.insert(path.clone(), stat);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let hash = blake3::hash(&bytes);
                out.push((path, stat, bytes, hash));
            }
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    out
}

/// Files of one folder that are ready: unchanged since the last scan, and
/// those confirmed gone. Sets `settled` to false when something is still
/// moving.
pub(super) struct Ready {
    pub(super) present: Vec<(PathBuf, Stat)>,
    pub(super) gone: Vec<PathBuf>,
}

impl Tracked {
    pub(super) fn settle(
        &mut self,
        dir: &Path,
        scan: Option<HashMap<PathBuf, Stat>>,
        known: &[PathBuf],
        settled: &mut bool,
    ) -> Ready {
        let mut ready = Ready {
            present: Vec::new(),
            gone: Vec::new(),
        };
        let Some(scan) = scan else {
            return ready;
        };
        let mut paths: Vec<&PathBuf> = scan.keys().collect();
        paths.sort();
        for path in paths {
            let stat = scan[path];
            if self.seen.insert(path.clone(), stat) == Some(stat) {
                ready.present.push((path.clone(), stat));
            } else {
                *settled = false;
            }
        }
        for path in known {
            if !scan.contains_key(path) {
                // Gone twice in a row (a file replaced by rename never is).
                if self.seen.remove(path).is_some() {
                    *settled = false;
                } else {
                    ready.gone.push(path.clone());
                }
            }
        }
        // Forget files of this folder that came and went between scans.
        self.seen
            .retain(|p, _| !p.starts_with(dir) || scan.contains_key(p) || known.contains(p));
        ready
    }
}
