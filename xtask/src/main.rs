//! Project tasks: `cargo run -p xtask -- <task>`.
//!
//! - `plugins`: build the example plugins and fixtures into target/plugins and target/fixtures.
//! - `test`: plugins, then every test suite (workspace, SDK, plugins' own unit tests).
//! - `lint`: rustfmt check and clippy with warnings denied, host and wasm sides.
//! - `demo`: plugins, then the demo run of the `ganglion` binary.

use anyhow::{Result, bail};
use std::process::Command;

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(xtask::root());
    c
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let rest = &args[args.len().min(1)..];
    match task {
        "plugins" => xtask::build_plugins(),
        "test" => {
            xtask::build_plugins()?;
            run(cargo().args(["test", "--workspace"]).args(rest))?;
            run(cargo().args(["test", "--manifest-path", "sdk/Cargo.toml", "--target-dir", "target/plugins-native"]))?;
            run(cargo().args([
                "test",
                "--manifest-path",
                "plugins/Cargo.toml",
                "--target-dir",
                "target/plugins-native",
            ]))
        }
        "lint" => {
            xtask::ensure_wasm_target()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo().args([
                "fmt",
                "--all",
                "--check",
                "--manifest-path",
                "plugins/Cargo.toml",
            ]))?;
            run(cargo().args(["fmt", "--check", "--manifest-path", "sdk/Cargo.toml"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(cargo().args([
                "clippy",
                "--manifest-path",
                "plugins/Cargo.toml",
                "--target",
                "wasm32-wasip2",
                "--target-dir",
                "target/plugins-build",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(cargo().args([
                "clippy",
                "--manifest-path",
                "sdk/Cargo.toml",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }
        "demo" => {
            xtask::build_plugins()?;
            run(cargo()
                .args(["run", "--release", "-p", "ganglion", "--", "demo"])
                .args(rest))
        }
        _ => {
            eprintln!("usage: cargo run -p xtask -- plugins | test | lint | demo");
            if task == "help" {
                Ok(())
            } else {
                bail!("unknown task `{task}`")
            }
        }
    }
}
