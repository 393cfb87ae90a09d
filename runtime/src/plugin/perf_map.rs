//! Plugin function names for Linux `perf` (`[plugins] perf_map_max_bytes`).
//!
//! perf shows JIT-compiled code as bare addresses unless the process keeps
//! `/tmp/perf-<pid>.map`: one line per function, `START SIZE NAME`, the
//! first two in hex. wasmtime writes such a file only when built with its
//! `profiling` feature (a second build of wasmtime); the compiled
//! component's own function table gives the same lines without it.
//!
//! /tmp is shared with other users: the map is opened without following a
//! link, and only a regular file of this process's user is written.
//!
//! Limits: perf reads only that path, so the file outlives the process and
//! grows by a line per plugin function at each load (a Rust plugin has a few
//! hundred functions, a Python one tens of thousands); nothing is written
//! once it would pass the configured bound. After a reload, the old
//! version's addresses may be reused by new code while its lines remain:
//! profile a process whose plugins have stopped changing.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use wasmtime::component::Component;

/// Loads compile on several blocking threads at once; one append at a time
/// keeps each component's lines together.
static APPEND: Mutex<()> = Mutex::new(());

/// Where perf looks for this process's map.
pub fn default_path() -> PathBuf {
    PathBuf::from(format!("/tmp/perf-{}.map", std::process::id()))
}

/// Names `component`'s functions in this process's map ([`default_path`]);
/// a full or unwritable map is a warning, never a load failure.
pub fn record(plugin: &str, component: &Component, max_bytes: u64) {
    let path = default_path();
    match append(&path, plugin, component, max_bytes) {
        Ok(Appended::Lines(_)) => {}
        Ok(Appended::Full) => tracing::warn!(
            plugin,
            "{} is at [plugins] perf_map_max_bytes ({max_bytes}): this plugin's functions are not named there",
            path.display()
        ),
        Err(e) => tracing::warn!(plugin, "cannot write {}: {e}", path.display()),
    }
}

/// What [`append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// This many lines were written.
    Lines(usize),
    /// Nothing was written: the file would pass `max_bytes`.
    Full,
}

/// Appends a line per compiled function of `component`, named
/// `plugin!function` (demangled), to the map at `path`, unless the file
/// would then be larger than `max_bytes`.
pub fn append(
    path: &Path,
    plugin: &str,
    component: &Component,
    max_bytes: u64,
) -> io::Result<Appended> {
    let base = component.text().as_ptr() as usize;
    let mut lines = String::new();
    let mut count = 0;
    for f in component.functions() {
        let name = match &f.name {
            Some(n) => format!("{:#}", rustc_demangle::demangle(n)),
            None => format!("wasm-function[{}]", f.index.as_u32()),
        };
        lines.push_str(&format!(
            "{:x} {:x} {}!{}\n",
            base + f.offset,
            f.len,
            printable(plugin),
            printable(&name)
        ));
        count += 1;
    }
    let _guard = APPEND.lock().unwrap_or_else(|e| e.into_inner());
    let mut file = open_own(path)?;
    let size = file.metadata()?.len();
    if size.saturating_add(lines.len() as u64) > max_bytes {
        return Ok(Appended::Full);
    }
    file.write_all(lines.as_bytes())?;
    Ok(Appended::Lines(count))
}

/// Opens the map for appending, creating it if need be. /tmp is shared: a
/// link planted at the name perf expects would have the host append to
/// whatever file it points at, so a link is not followed; a FIFO would hold
/// the opening thread until someone reads it, so the open does not wait; and
/// what is there already must be a regular file of this process's user.
fn open_own(path: &Path) -> io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        options
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .mode(0o644);
        let file = options.open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{} is a symbolic link; not followed", path.display()),
                )
            } else {
                e
            }
        })?;
        let meta = file.metadata()?;
        // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
        let user = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != user {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a regular file of this process's user",
                    path.display()
                ),
            ));
        }
        Ok(file)
    }
    #[cfg(not(unix))]
    options.open(path)
}

/// A name as one field of one line: a plugin's name section is its own to
/// write, and a line break in it would add lines of its choosing to the map.
fn printable(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::{Config, Engine};

    fn engine() -> Engine {
        let mut cfg = Config::new();
        cfg.wasm_component_model(true);
        Engine::new(&cfg).unwrap()
    }

    /// A component whose one core module has two functions, named by a
    /// hand-written name section: `hot`, and `name` as given (under 100
    /// bytes, so that every length is one byte of LEB128).
    fn component(engine: &Engine, name: &[u8]) -> Component {
        // Function-names subsection: count 2, (0, "hot"), (1, name).
        let mut sub = vec![2u8, 0, 3];
        sub.extend_from_slice(b"hot");
        sub.extend_from_slice(&[1, name.len() as u8]);
        sub.extend_from_slice(name);
        let mut section = vec![1u8, sub.len() as u8];
        section.extend(sub);
        let escaped: String = section.iter().map(|b| format!("\\{b:02x}")).collect();
        let wat = format!(
            r#"(component
                (core module
                    (func (result i32) i32.const 1)
                    (func (result i32) i32.const 2)
                    (@custom "name" "{escaped}")))"#
        );
        Component::new(engine, wat).unwrap()
    }

    /// A fresh map file of the test's own.
    fn map_path(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ganglion-perf-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{test}.map"));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn read(path: &Path) -> Vec<(usize, usize, String)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let mut parts = l.splitn(3, ' ');
                let start = usize::from_str_radix(parts.next().unwrap(), 16).unwrap();
                let len = usize::from_str_radix(parts.next().unwrap(), 16).unwrap();
                (start, len, parts.next().unwrap().to_owned())
            })
            .collect()
    }

    #[test]
    fn each_function_gets_a_line_inside_the_component_code() {
        let engine = engine();
        let c = component(&engine, b"cold");
        let path = map_path("each_function_gets_a");
        assert_eq!(
            append(&path, "tag-a", &c, 1 << 20).unwrap(),
            Appended::Lines(2)
        );
        let lines = read(&path);
        let names: Vec<&str> = lines.iter().map(|l| l.2.as_str()).collect();
        assert_eq!(names, ["tag-a!hot", "tag-a!cold"]);
        let text = c.text().as_ptr_range();
        for (start, len, name) in &lines {
            assert!(*len > 0, "{name}");
            assert!(
                *start >= text.start as usize && start + len <= text.end as usize,
                "{name} lies outside the component's code"
            );
        }
    }

    #[test]
    fn line_injection_through_a_function_name_is_neutralised() {
        let engine = engine();
        // A name section may hold any bytes: this one tries to add a line
        // naming host code.
        let c = component(&engine, b"x\n0 ffffffff host!fake");
        let path = map_path("line_injection_throu");
        append(&path, "tag-a", &c, 1 << 20).unwrap();
        let lines = read(&path);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].2, "tag-a!x?0 ffffffff host!fake");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_planted_at_the_map_path_is_not_followed() {
        let engine = engine();
        let c = component(&engine, b"cold");
        let target = map_path("symlink-target");
        std::fs::write(&target, b"precious\n").unwrap();
        let link = map_path("symlink-planted");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = append(&link, "tag-a", &c, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious\n");
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_planted_at_the_map_path_does_not_hold_the_loader() {
        let path = map_path("fifo-planted");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let engine = engine();
            let c = component(&engine, b"cold");
            let _ = tx.send(append(&path, "tag-a", &c, 1 << 20).map_err(|e| e.to_string()));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("append returned instead of waiting for a reader");
        assert!(result.is_err(), "{result:?}");
    }

    /// Needs root to give the file away; as another user there is no file of
    /// someone else's to try, and the test says so.
    #[cfg(unix)]
    #[test]
    fn a_map_file_of_another_user_is_not_written() {
        // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: cannot make a file of another user; skipped");
            return;
        }
        let engine = engine();
        let c = component(&engine, b"cold");
        let path = map_path("foreign-owner");
        std::fs::write(&path, b"").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let e = append(&path, "tag-a", &c, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("not a regular file of this"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn nothing_is_written_past_the_bound() {
        let engine = engine();
        let c = component(&engine, b"cold");
        let path = map_path("nothing_is_written_p");
        append(&path, "tag-a", &c, 1 << 20).unwrap();
        let one = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            append(&path, "tag-a", &c, 2 * one - 1).unwrap(),
            Appended::Full
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), one);
        assert_eq!(
            append(&path, "tag-a", &c, 2 * one).unwrap(),
            Appended::Lines(2)
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * one);
    }
}
