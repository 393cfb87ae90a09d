//! The kernel crate cross-built for aarch64 and tested under qemu-user.

use crate::{apt_install, cargo, root};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// The aarch64 target the kernel crate is cross-tested on.
const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// `cargo run -p xtask -- aarch64`: the kernel crate (`ganglion-kernels`)
/// cross-built for aarch64 Linux, linted with clippy, and its tests run
/// under qemu-user twice: on qemu's default CPU (`max`, which has dotprod:
/// the NEON dotprod path) and on a Cortex-A72 (a Raspberry Pi 4's core,
/// without dotprod: the plain NEON path); the tests fail if the path taken
/// is not the one meant. Installs Debian's qemu-user and
/// gcc-aarch64-linux-gnu (the linker) when missing, and the rustup target.
/// Only that crate: candle and the tokenizers would take about 15 minutes
/// to cross-build cold, the kernels take seconds. qemu gives correctness,
/// not timings.
pub fn aarch64_kernels() -> Result<()> {
    let sysroot = Path::new("/usr/aarch64-linux-gnu");
    let missing: Vec<&str> = [
        ("qemu-aarch64", "qemu-user"),
        ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ]
    .into_iter()
    .filter(|(tool, _)| {
        !Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .map(|(_, package)| package)
    .chain((!sysroot.join("lib/ld-linux-aarch64.so.1").exists()).then_some("libc6-dev-arm64-cross"))
    .collect();
    if !missing.is_empty() {
        apt_install(
            "the aarch64 kernel tests need qemu-user and an aarch64 linker",
            &missing,
        )?;
    }
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == AARCH64)
    {
        let status = Command::new("rustup")
            .args(["target", "add", AARCH64])
            .status()
            .context("running rustup")?;
        if !status.success() {
            bail!("`rustup target add {AARCH64}` failed");
        }
    }
    let cargo = |args: &[&str], env: &[(&str, String)]| -> Result<()> {
        let mut c = Command::new(cargo());
        c.current_dir(root())
            .args(args)
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            )
            .envs(env.iter().map(|(k, v)| (k, v)));
        eprintln!("+ {c:?}");
        let status = c.status()?;
        if !status.success() {
            bail!("{c:?} failed with {status}");
        }
        Ok(())
    };
    let crate_args = [
        "-p",
        "ganglion-kernels",
        "--all-targets",
        "--target",
        AARCH64,
    ];
    cargo(
        &[&["clippy"][..], &crate_args, &["--", "-D", "warnings"]].concat(),
        &[],
    )?;
    for (cpu, path) in [("max", "neon-dotprod"), ("cortex-a72", "neon")] {
        let runner = format!("qemu-aarch64 -cpu {cpu} -L {}", sysroot.display());
        cargo(
            &[&["test"][..], &crate_args].concat(),
            &[
                ("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", runner),
                ("GANGLION_KERNELS_PATH", path.to_owned()),
            ],
        )?;
    }
    Ok(())
}
