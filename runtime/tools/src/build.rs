//! Building a plugin project into `<project>/<name>.wasm` with its
//! language's toolchain:
//!
//! | lang   | runs                                                                 | found as |
//! |--------|----------------------------------------------------------------------|----------|
//! | rust   | `cargo build --release --target wasm32-wasip2`                       | `cargo` on PATH |
//! | python | `componentize-py -d wit -w <world> componentize app -o <name>.wasm`  | `$GANGLION_COMPONENTIZE_PY`, else on PATH |
//! | js     | `jco componentize app.js --wit wit --world-name <world> --disable http fetch-event -o <name>.wasm` | `node_modules/.bin/jco` in the project, else `$GANGLION_JCO`, else on PATH |
//! | c      | [`crate::c::build`] (wit-bindgen-c, clang, wit-component)            | `$GANGLION_CLANG`, else clang on PATH |
//!
//! The tools' own output is passed through on failure, so the error says
//! what the compiler said.

use crate::project::{Lang, MANIFEST, Manifest, ToolError};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A built component.
#[derive(Debug, Clone)]
pub struct Built {
    /// The project's manifest.
    pub manifest: Manifest,
    /// `<project>/<name>.wasm`.
    pub component: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// How long the build took.
    pub time: Duration,
}

/// Builds the project in `project` (the folder holding `ganglion-plugin.toml`).
pub fn build(project: &Path) -> Result<Built, ToolError> {
    let started = Instant::now();
    if !project.join(MANIFEST).exists() {
        return Err(ToolError::Usage(format!(
            "{} has no {MANIFEST}: run `ganglion build` in a folder made by `ganglion new`, or add the manifest",
            project.display()
        )));
    }
    let manifest = Manifest::load(project)?;
    let out = project.join(format!("{}.wasm", manifest.name));
    let world = manifest.world.name();
    match manifest.lang {
        Lang::Rust => build_rust(project, &out)?,
        Lang::Python => {
            let tool = find_tool("GANGLION_COMPONENTIZE_PY", "componentize-py", None)?;
            let mut cmd = Command::new(tool);
            cmd.current_dir(project).args([
                "-d",
                "wit",
                "-w",
                world,
                "componentize",
                "app",
                "-p",
                ".",
                "-o",
            ]);
            cmd.arg(&out);
            // componentize-py bundles the site-packages of $VIRTUAL_ENV, else
            // of the Python it runs on (the whole installation, megabytes of
            // it); without a virtualenv, point it at an empty folder.
            if std::env::var_os("VIRTUAL_ENV").is_none() {
                let empty = project.join("build/no-site-packages");
                let site = empty.join("lib/python/site-packages");
                std::fs::create_dir_all(&site).map_err(|source| ToolError::Io {
                    path: site.clone(),
                    source,
                })?;
                cmd.env("VIRTUAL_ENV", &empty);
            }
            run("componentize-py", &mut cmd)?;
        }
        Lang::Js => {
            let local = project.join("node_modules/.bin/jco");
            let tool = find_tool("GANGLION_JCO", "jco", Some(&local))?;
            let mut cmd = Command::new(tool);
            cmd.current_dir(project)
                .args([
                    "componentize",
                    "app.js",
                    "--wit",
                    "wit",
                    "--world-name",
                    world,
                ])
                .args(["--disable", "http", "fetch-event", "-o"])
                .arg(&out);
            run("jco componentize", &mut cmd)?;
        }
        Lang::C => {
            crate::c::build(project, &project.join("wit"), world, &out)?;
        }
    }
    let size = std::fs::metadata(&out)
        .map_err(|source| ToolError::Io {
            path: out.clone(),
            source,
        })?
        .len();
    Ok(Built {
        manifest,
        component: out,
        size,
        time: started.elapsed(),
    })
}

fn build_rust(project: &Path, out: &Path) -> Result<(), ToolError> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project).args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--message-format=json-render-diagnostics",
    ]);
    let stdout = run("cargo build", &mut cmd)?;
    // The artefact's path comes from cargo itself: CARGO_TARGET_DIR or a
    // workspace may put it anywhere.
    let artefact = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
        })
        .rfind(|f| f.extension().is_some_and(|e| e == "wasm"))
        .ok_or_else(|| ToolError::Toolchain {
            step: "cargo build".into(),
            reason: "cargo built no .wasm (is the crate a cdylib?)".into(),
        })?;
    std::fs::copy(&artefact, out).map_err(|source| ToolError::Io {
        path: artefact,
        source,
    })?;
    Ok(())
}

/// `$env_var`, else `local` when it exists, else `name` on PATH.
fn find_tool(env_var: &str, name: &str, local: Option<&Path>) -> Result<OsString, ToolError> {
    if let Some(v) = std::env::var_os(env_var) {
        return Ok(v);
    }
    if let Some(local) = local.filter(|p| p.exists()) {
        return Ok(local.as_os_str().to_owned());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if on_path {
        Ok(name.into())
    } else {
        Err(ToolError::Toolchain {
            step: name.into(),
            reason: format!("{name} not found: install it or set {env_var} to its path"),
        })
    }
}

/// Runs `cmd`, returning its stdout; on failure the error holds its stderr.
fn run(step: &str, cmd: &mut Command) -> Result<String, ToolError> {
    let output = cmd.output().map_err(|e| ToolError::Toolchain {
        step: step.into(),
        reason: format!("could not start {:?}: {e}", cmd.get_program()),
    })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let detail = if stderr.trim().is_empty() {
        stdout.trim()
    } else {
        stderr.trim()
    };
    Err(ToolError::Toolchain {
        step: step.into(),
        reason: format!("{}\n{detail}", output.status),
    })
}
