//! Embeds templates/ into the binary, so `ganglion new` works wherever the
//! binary is installed, and sets `GANGLION_WIT_VERSION` to the newest
//! `wit/ganglion-plugin@<version>/` folder, the contract new projects get.

use std::path::Path;

fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("templates folder")
        .map(|e| e.expect("template entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, root, out);
        } else {
            let rel = path.strip_prefix(root).expect("under templates");
            let rel = rel.to_string_lossy().replace('\\', "/");
            out.push((rel, path.display().to_string()));
        }
    }
}

/// The newest version among the repository's `wit/ganglion-plugin@<major>.<minor>.<patch>`
/// folders; pre-release versions are not used for new projects and are skipped.
fn newest_wit_version(wit: &Path) -> String {
    let mut newest: Option<([u64; 3], String)> = None;
    for entry in std::fs::read_dir(wit).expect("wit folder") {
        let name = entry.expect("wit entry").file_name();
        let Some(version) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ganglion-plugin@"))
        else {
            continue;
        };
        let parts: Result<Vec<u64>, _> = version.split('.').map(str::parse).collect();
        if let Ok(parts) = parts
            && let [major, minor, patch] = parts[..]
            && newest
                .as_ref()
                .is_none_or(|(n, _)| [major, minor, patch] > *n)
        {
            newest = Some(([major, minor, patch], version.to_owned()));
        }
    }
    newest.expect("a wit/ganglion-plugin@<version> folder").1
}

fn main() {
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
    println!("cargo::rerun-if-changed={}", wit.display());
    println!(
        "cargo::rustc-env=GANGLION_WIT_VERSION={}",
        newest_wit_version(&wit)
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    println!("cargo::rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    let mut code = String::from("&[\n");
    for (rel, abs) in &files {
        println!("cargo::rerun-if-changed={abs}");
        code.push_str(&format!("    ({rel:?}, include_str!({abs:?})),\n"));
    }
    code.push_str("]\n");
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("templates.rs");
    std::fs::write(out, code).expect("write templates.rs");
}
