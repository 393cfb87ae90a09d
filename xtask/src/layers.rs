//! The layer check behind `cargo run -p xtask -- layers` (and `lint`):
//! every module of `runtime/src` may import only from the layers below its
//! own, and the MQTT crates only where the adapters are. The layers are
//! those of docs/ARCHITECTURE.md; a module missing from [`LAYERS`] is an
//! error too, so a new module has to be placed.
//!
//! Limits: imports are read from the text (`crate::name`, including
//! `use crate::{a::X, b}` groups), after comments are removed; a path built
//! by a macro from pieces would not be seen. None does today.

use std::collections::BTreeSet;
use std::path::Path;

/// The library's modules from the top layer down. A module may use any
/// module of a later entry, none of its own entry or an earlier one.
pub const LAYERS: &[&[&str]] = &[
    &["runtime"],
    &["simulate", "devtools", "admin"],
    &["broker"],
    &["mqtt"],
    &["reload", "replay"],
    &["gateway"],
    &["pipeline"],
    &["plugin"],
    &["host"],
    &["llm", "state", "rules", "audit"],
    &["transport"],
    &["config", "types"],
];

/// External crates only some modules may name: the broker connection is
/// the adapters' business, so the gateway and below stay transport-free.
pub const CONFINED: &[(&str, &[&str])] = &[
    ("rumqttc", &["mqtt", "simulate", "broker"]),
    ("rumqttd", &["broker"]),
    ("notify", &["reload"]),
    ("axum", &["admin"]),
];

/// One import that breaks the layering.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    /// The file, relative to the source folder.
    pub file: String,
    /// What is wrong.
    pub reason: String,
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Source text without `//` comments (line and doc) and `/* */` blocks;
/// string literals are kept as they are, which at worst over-reports.
pub fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            let c = rest.chars().next().expect("not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a source text names through `crate::`.
pub fn crate_refs(src: &str) -> BTreeSet<String> {
    let text = strip_comments(src);
    let mut out = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("crate::") {
        // `ganglion_crate::` or `xcrate::` are other paths.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let r = rest.trim_start();
        if let Some(group) = r.strip_prefix('{') {
            // Top-level names of a `{...}` group: those at depth 1 that
            // start an item.
            let mut depth = 1;
            let mut start = true;
            let mut chars = group.char_indices();
            while let Some((j, c)) = chars.next() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => start = true,
                    c if depth == 1 && start && (c.is_alphanumeric() || c == '_') => {
                        let name = ident(&group[j..]);
                        out.insert(name.to_owned());
                        start = false;
                        for _ in 1..name.chars().count() {
                            chars.next();
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(r);
            if !name.is_empty() {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// Whether a source text names the external crate `name` as a path root.
fn names_crate(src: &str, name: &str) -> bool {
    let text = strip_comments(src);
    let needle = format!("{name}::");
    text.match_indices(&needle).any(|(i, _)| {
        !text[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    })
}

/// Checks every `.rs` file under `src` (a crate's source folder; `lib.rs`
/// and `main.rs` are the roots and exempt).
pub fn check(src: &Path) -> std::io::Result<Vec<Violation>> {
    let mut files = Vec::new();
    collect(src, &mut files)?;
    let mut out = Vec::new();
    for path in files {
        let rel = path
            .strip_prefix(src)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        let first = rel.split('/').next().unwrap_or_default();
        let module = first.strip_suffix(".rs").unwrap_or(first);
        if matches!(module, "lib" | "main") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let Some(own) = layer_of(module) else {
            out.push(Violation {
                file: rel.clone(),
                reason: format!("module `{module}` has no layer in xtask/src/layers.rs"),
            });
            continue;
        };
        for r in crate_refs(&text) {
            if r == module {
                continue;
            }
            match layer_of(&r) {
                Some(l) if l > own => {}
                Some(_) => out.push(Violation {
                    file: rel.clone(),
                    reason: format!("`{module}` imports `{r}`, which is not in a layer below it"),
                }),
                None => {}
            }
        }
        for (krate, allowed) in CONFINED {
            if !allowed.contains(&module) && names_crate(&text, krate) {
                out.push(Violation {
                    file: rel.clone(),
                    reason: format!("`{module}` names `{krate}`, which only {allowed:?} may"),
                });
            }
        }
    }
    out.sort();
    Ok(out)
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_paths_are_read_and_comments_ignored() {
        let src = "use crate::{audit::X, pipeline::{A, B}, types};\n\
                   // use crate::gateway::Y;\n\
                   /* crate::reload */ fn f() -> crate::state::S { todo!() }\n\
                   use ganglion_crate::z;";
        let refs: Vec<String> = crate_refs(src).into_iter().collect();
        assert_eq!(refs, ["audit", "pipeline", "state", "types"]);
    }

    #[test]
    fn an_upward_import_and_a_confined_crate_are_reported() {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("host")).unwrap();
        std::fs::write(dir.join("host/mod.rs"), "use crate::plugin::CallError;").unwrap();
        std::fs::write(dir.join("gateway.rs"), "fn f(_: rumqttc::QoS) {}").unwrap();
        std::fs::write(dir.join("pipeline.rs"), "use crate::{host, types::X};").unwrap();
        std::fs::write(dir.join("novel.rs"), "").unwrap();
        let v = check(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let reasons: Vec<&str> = v.iter().map(|v| v.reason.as_str()).collect();
        assert_eq!(v.len(), 3, "{reasons:?}");
        assert!(
            reasons[0].contains("`gateway` names `rumqttc`"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].contains("`host` imports `plugin`"),
            "{reasons:?}"
        );
        assert!(reasons[2].contains("`novel` has no layer"), "{reasons:?}");
    }

    /// The real tree: this is the check CI runs (also through `xtask lint`).
    #[test]
    fn the_runtime_library_imports_only_downward() {
        let v = check(&crate::root().join("runtime/src")).unwrap();
        assert!(v.is_empty(), "{v:#?}");
    }
}
