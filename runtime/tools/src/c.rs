//! C plugins: bindings from the WIT, clang for wasm32-wasip1, wrapped into a
//! component with the WASI preview1 reactor adapter.
//!
//! A C project is a folder with `*.c` files at its top level and/or in
//! `src/`. [`build`] writes everything it generates under `<project>/build/`:
//! the bindings (`build/bindings/<world>.h`, `<world>.c` and
//! `<world>_component_type.o`) and the core module, then the component to
//! `out`. Sources include the bindings as `#include "<world>.h"`.
//!
//! clang comes from `$GANGLION_CLANG`, else `clang` on `PATH`, else the
//! newest `clang-<N>` on `PATH`. It needs the WASI libc and the wasm32
//! compiler-rt builtins; on Debian/Ubuntu:
//! `apt-get install clang lld wasi-libc libclang-rt-dev-wasm32`.
//! `$GANGLION_WASI_SYSROOT`, when set, is passed as `--sysroot` (for a
//! wasi-sdk or another sysroot that clang does not find by itself).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};
use wit_bindgen_core::Files;
use wit_parser::Resolve;

/// Target triples to try, in order. clang looks for the WASI libc under the
/// triple's spelling, and older distributions (Debian 12) install it under
/// `wasm32-wasi`, the former name of the same target.
const TARGETS: [&str; 2] = ["wasm32-wasip1", "wasm32-wasi"];

/// Linker flags, as Rust's wasm targets use: a 1 MiB stack (wasm-ld gives
/// 64 KiB) placed below the data, so that an overflow traps instead of
/// overwriting static data; and no DWARF, which the WASI libc's archives
/// carry and which would double the component's size.
const LINK_FLAGS: [&str; 3] = [
    "-Wl,-z,stack-size=1048576",
    "-Wl,--stack-first",
    "-Wl,--strip-debug",
];

/// What [`build`] produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// The component, at the `out` path given to [`build`].
    pub component: PathBuf,
    /// Size of the component in bytes.
    pub size: u64,
    /// The core module clang linked, before it became a component.
    pub core_module: PathBuf,
    /// Folder of the generated bindings.
    pub bindings: PathBuf,
    /// The project's sources that were compiled, in compile order.
    pub sources: Vec<PathBuf>,
    pub clang: PathBuf,
    /// The target triple clang compiled for.
    pub target: &'static str,
    /// What clang printed on success (warnings), possibly empty.
    pub warnings: String,
}

/// A failed step of [`build`]; the message names the step.
#[derive(Debug, thiserror::Error)]
pub enum CError {
    #[error("reading the WIT at {}: {message}", path.display())]
    Wit { path: PathBuf, message: String },
    #[error("generating C bindings for world `{world}`: {message}")]
    Bindings { world: String, message: String },
    #[error("{step} {}: {source}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("finding C sources: no *.c file in {} or in its src/ folder", .0.display())]
    NoSources(PathBuf),
    #[error("finding clang: {0}")]
    NoClang(String),
    #[error(
        "finding the WASI libc: {clang} has no libc for {targets} (install wasi-libc, lld and the \
         wasm32 compiler-rt builtins, or set GANGLION_WASI_SYSROOT)",
        clang = .0.display(),
        targets = TARGETS.join(" or ")
    )]
    NoWasiLibc(PathBuf),
    #[error("compiling with clang failed ({status}): {command}\n{stderr}")]
    Compile {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("making a component of {}: {message}", module.display())]
    Component { module: PathBuf, message: String },
}

/// Builds the C project in `project` into a component at `out` that targets
/// `world` of the WIT at `wit` (a `.wit` file or a folder of them).
pub fn build(project: &Path, wit: &Path, world: &str, out: &Path) -> Result<Built, CError> {
    let build_dir = project.join("build");
    let bindings = build_dir.join("bindings");
    let generated = generate_bindings(wit, world, &bindings)?;
    let sources = find_sources(project)?;
    let clang = find_clang()?;
    let sysroot = std::env::var_os("GANGLION_WASI_SYSROOT").filter(|s| !s.is_empty());
    let target = find_target(&clang, sysroot.as_ref())?;

    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| world.to_owned());
    let core_module = build_dir.join(format!("{stem}.core.wasm"));
    let mut cmd = Command::new(&clang);
    cmd.arg(format!("--target={target}"))
        .args(["-mexec-model=reactor", "-O2"])
        .args(LINK_FLAGS);
    if let Some(sysroot) = &sysroot {
        let mut arg = OsString::from("--sysroot=");
        arg.push(sysroot);
        cmd.arg(arg);
    }
    for dir in [&bindings, &project.to_path_buf(), &project.join("src")] {
        cmd.arg("-I").arg(dir);
    }
    cmd.args(&sources)
        .args(&generated)
        .arg("-o")
        .arg(&core_module);
    let command = format!("{cmd:?}");
    let output = cmd.output().map_err(|source| CError::Io {
        step: "running",
        path: clang.clone(),
        source,
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(CError::Compile {
            command,
            status: output.status.to_string(),
            stderr,
        });
    }

    let module = std::fs::read(&core_module).map_err(|source| CError::Io {
        step: "reading the core module",
        path: core_module.clone(),
        source,
    })?;
    let component = componentize(&module).map_err(|message| CError::Component {
        module: core_module.clone(),
        message,
    })?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir(parent)?;
    }
    std::fs::write(out, &component).map_err(|source| CError::Io {
        step: "writing the component",
        path: out.to_path_buf(),
        source,
    })?;
    Ok(Built {
        component: out.to_path_buf(),
        size: component.len() as u64,
        core_module,
        bindings,
        sources,
        clang,
        target,
        warnings: stderr,
    })
}

/// Writes the C bindings of `world` into `dir` (emptied first, so that files
/// of another world do not linger) and returns the files to compile with the
/// project: the `.c` and the component-type object.
pub fn generate_bindings(wit: &Path, world: &str, dir: &Path) -> Result<Vec<PathBuf>, CError> {
    let wit_error = |message: String| CError::Wit {
        path: wit.to_path_buf(),
        message,
    };
    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_path(wit)
        .map_err(|e| wit_error(format!("{e:#}")))?;
    let world_id = resolve
        .select_world(&[package], Some(world))
        .map_err(|e| wit_error(format!("{e:#}")))?;
    let mut files = Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world_id, &mut files)
        .map_err(|e| CError::Bindings {
            world: world.to_owned(),
            message: format!("{e:#}"),
        })?;

    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(CError::Io {
                step: "emptying the bindings folder",
                path: dir.to_path_buf(),
                source: e,
            });
        }
        _ => {}
    }
    create_dir(dir)?;
    let mut to_compile = Vec::new();
    for (name, contents) in files.iter() {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|source| CError::Io {
            step: "writing the bindings",
            path: path.clone(),
            source,
        })?;
        if name.ends_with(".c") || name.ends_with(".o") {
            to_compile.push(path);
        }
    }
    Ok(to_compile)
}

/// The `*.c` files at the top of `project` and of `project/src`, sorted.
pub fn find_sources(project: &Path) -> Result<Vec<PathBuf>, CError> {
    let mut sources = Vec::new();
    for dir in [project.to_path_buf(), project.join("src")] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != project => continue,
            Err(source) => {
                return Err(CError::Io {
                    step: "listing sources in",
                    path: dir,
                    source,
                });
            }
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "c") && p.is_file())
            .collect();
        found.sort();
        sources.extend(found);
    }
    if sources.is_empty() {
        return Err(CError::NoSources(project.to_path_buf()));
    }
    Ok(sources)
}

/// `$GANGLION_CLANG`, else `clang` on `PATH`, else the newest `clang-<N>` on `PATH`.
pub fn find_clang() -> Result<PathBuf, CError> {
    if let Some(clang) = std::env::var_os("GANGLION_CLANG").filter(|s| !s.is_empty()) {
        let clang = PathBuf::from(clang);
        if clang.components().count() > 1 && !clang.is_file() {
            return Err(CError::NoClang(format!(
                "GANGLION_CLANG is {}, which does not exist",
                clang.display()
            )));
        }
        return Ok(clang);
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(clang) = dirs.iter().map(|d| d.join("clang")).find(|p| p.is_file()) {
        return Ok(clang);
    }
    let mut versioned = Vec::new();
    for dir in &dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Some(version) = entry.file_name().to_str().and_then(clang_version) {
                versioned.push((version, entry.path()));
            }
        }
    }
    versioned
        .into_iter()
        .filter(|(_, p)| p.is_file())
        .max_by_key(|(v, _)| *v)
        .map(|(_, p)| p)
        .ok_or_else(|| {
            CError::NoClang(
                "no clang or clang-<N> on PATH; install clang or set GANGLION_CLANG".into(),
            )
        })
}

/// `N` of a file named `clang-N`.
fn clang_version(file_name: &str) -> Option<u32> {
    let digits = file_name.strip_prefix("clang-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The first of [`TARGETS`] for which clang finds a libc.
fn find_target(clang: &Path, sysroot: Option<&OsString>) -> Result<&'static str, CError> {
    for target in TARGETS {
        let mut cmd = Command::new(clang);
        cmd.arg(format!("--target={target}"));
        if let Some(sysroot) = sysroot {
            let mut arg = OsString::from("--sysroot=");
            arg.push(sysroot);
            cmd.arg(arg);
        }
        let output = cmd
            .arg("-print-file-name=libc.a")
            .output()
            .map_err(|source| CError::Io {
                step: "running",
                path: clang.to_path_buf(),
                source,
            })?;
        // clang echoes the bare name back when it finds no such file.
        let found = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && found.is_absolute() && found.is_file() {
            return Ok(target);
        }
    }
    Err(CError::NoWasiLibc(clang.to_path_buf()))
}

/// The core module as a component, its WASI preview1 imports served by the
/// reactor adapter (the module has no `main`).
fn componentize(module: &[u8]) -> Result<Vec<u8>, String> {
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(module)
        .and_then(|e| {
            e.adapter(
                WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
            )
        })
        .and_then(|e| e.encode())
        .map_err(|e| format!("{e:#}"))
}

fn create_dir(dir: &Path) -> Result<(), CError> {
    std::fs::create_dir_all(dir).map_err(|source| CError::Io {
        step: "creating",
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ganglion-tools-c-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bindings_for_every_world() {
        let dir = scratch("bindings");
        for (world, stem) in [
            ("preprocessor", "preprocessor"),
            ("prompt-template", "prompt_template"),
            ("postprocessor", "postprocessor"),
            ("rule", "rule"),
        ] {
            let files = generate_bindings(&crate::repo_wit_dir(), world, &dir).unwrap();
            let names: Vec<_> = files
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                names,
                [format!("{stem}.c"), format!("{stem}_component_type.o")]
            );
            assert!(dir.join(format!("{stem}.h")).is_file());
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3, "{world}");
        }
        let err = generate_bindings(&crate::repo_wit_dir(), "no-such-world", &dir).unwrap_err();
        assert!(matches!(err, CError::Wit { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sources_from_the_project_and_src() {
        let dir = scratch("sources");
        assert!(matches!(find_sources(&dir), Err(CError::NoSources(_))));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        for f in ["b.c", "a.c", "a.h", "src/z.c", "src/notes.txt"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let found: Vec<_> = find_sources(&dir)
            .unwrap()
            .into_iter()
            .map(|p| p.strip_prefix(&dir).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            found,
            [PathBuf::from("a.c"), "b.c".into(), "src/z.c".into()]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn versioned_clang_names() {
        assert_eq!(clang_version("clang-14"), Some(14));
        assert_eq!(clang_version("clang-19"), Some(19));
        for name in [
            "clang",
            "clang-",
            "clang-format",
            "clang-cpp-14",
            "clang++-14",
        ] {
            assert_eq!(clang_version(name), None, "{name}");
        }
    }
}
