//! Plugin projects: what `ganglion new` writes and `ganglion build` reads.
//!
//! A project is a folder with a manifest, `ganglion-plugin.toml`:
//!
//! ```toml
//! name = "pump-flow"        # the component is built as pump-flow.wasm
//! lang = "python"           # rust, python, js or c
//! world = "preprocessor"    # the stage's world: preprocessor, prompt-template, postprocessor or rule
//! ```
//!
//! plus the language's sources and `wit/ganglion.wit`, the contract it is
//! built against: a copy of the package [`crate::WIT_VERSION`], so that the
//! project's `wit/` is that package's folder and keeps building when the
//! host adds a newer version.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The manifest's file name.
pub const MANIFEST: &str = "ganglion-plugin.toml";

/// (path under templates/, contents), embedded by build.rs.
const TEMPLATES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/templates.rs"));

/// A language plugins are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    /// Rust on the Ganglion SDK, built with cargo for wasm32-wasip2.
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with jco componentize (StarlingMonkey, interpreted).
    Js,
    /// C, built with clang for wasm32-wasip1 and wrapped into a component.
    C,
}

impl Lang {
    /// All languages, in the order the docs list them.
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::Js, Lang::C];

    /// The name used on the command line, in manifests and under templates/.
    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::C => "c",
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Lang {
    type Err = ToolError;
    fn from_str(s: &str) -> Result<Self, ToolError> {
        match s {
            "rust" | "rs" => Ok(Lang::Rust),
            "python" | "py" => Ok(Lang::Python),
            "js" | "javascript" => Ok(Lang::Js),
            "c" => Ok(Lang::C),
            other => Err(ToolError::Usage(format!(
                "unknown language {other:?}: use rust, python, js or c"
            ))),
        }
    }
}

/// A WIT world a plugin implements: one stage. `--stage` takes the stage's
/// name (the world's export, [`World::stage`]) or the world's; the manifest
/// names the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    /// Message to readings.
    Preprocessor,
    /// Window to prompt.
    PromptTemplate,
    /// Window and completion to actions.
    Postprocessor,
    /// Message to actions.
    Rule,
}

impl World {
    /// All worlds, in pipeline order.
    pub const ALL: [World; 4] = [
        World::Preprocessor,
        World::PromptTemplate,
        World::Postprocessor,
        World::Rule,
    ];

    /// The world's name in the WIT.
    pub fn name(self) -> &'static str {
        match self {
            World::Preprocessor => "preprocessor",
            World::PromptTemplate => "prompt-template",
            World::Postprocessor => "postprocessor",
            World::Rule => "rule",
        }
    }

    /// The name of the stage, the interface the world exports, as rule
    /// files, `ganglion call` and the SDK's `export!` spell it.
    pub fn stage(self) -> &'static str {
        match self {
            World::Preprocessor => "preprocess",
            World::PromptTemplate => "template",
            World::Postprocessor => "postprocess",
            World::Rule => "handler",
        }
    }
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for World {
    type Err = ToolError;
    fn from_str(s: &str) -> Result<Self, ToolError> {
        World::ALL
            .into_iter()
            .find(|w| w.stage() == s || w.name() == s)
            .ok_or_else(|| {
                ToolError::Usage(format!(
                    "unknown stage {s:?}: use preprocess, template, postprocess or handler (or the world names preprocessor, prompt-template, postprocessor, rule)"
                ))
            })
    }
}

/// A project's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Plugin name: the component's file stem, which rules refer to.
    pub name: String,
    /// Source language.
    pub lang: Lang,
    /// The stage it implements.
    pub world: World,
}

impl Manifest {
    /// Reads `<project>/ganglion-plugin.toml`.
    pub fn load(project: &Path) -> Result<Manifest, ToolError> {
        let path = project.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| ToolError::Io {
            path: path.clone(),
            source: e,
        })?;
        toml::from_str(&text).map_err(|e| ToolError::Manifest {
            path,
            reason: e.to_string(),
        })
    }
}

/// Why a tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is not valid.
    #[error("{path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A toolchain program is missing or failed.
    #[error("{step}: {reason}")]
    Toolchain {
        /// What was being done (`cargo build`, `componentize-py`, ...).
        step: String,
        /// The program's error output or why it could not run.
        reason: String,
    },
    /// Building a C plugin failed.
    #[error(transparent)]
    C(#[from] crate::c::CError),
}

/// What to scaffold.
#[derive(Debug, Clone)]
pub struct NewOptions {
    /// Plugin name: lowercase letters, digits and `-`, starting with a letter.
    pub name: String,
    /// Source language.
    pub lang: Lang,
    /// The stage it implements.
    pub world: World,
    /// The folder to create; must not exist or be empty.
    pub dir: PathBuf,
    /// The Ganglion SDK for Rust projects (a path dependency).
    pub sdk: Option<PathBuf>,
}

/// The SDK next to the sources this binary was built from, if it is still
/// there (a checkout of the repository).
pub fn bundled_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk");
    sdk.join("Cargo.toml")
        .exists()
        .then(|| sdk.canonicalize().unwrap_or(sdk))
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// Writes a buildable project: the template of its language and world, the
/// WIT and the manifest. Returns the files written, relative to the folder.
pub fn new_project(options: &NewOptions) -> Result<Vec<PathBuf>, ToolError> {
    if !valid_name(&options.name) {
        return Err(ToolError::Usage(format!(
            "plugin name {:?}: use lowercase letters, digits and single dashes, starting with a letter",
            options.name
        )));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ToolError::Io { path, source }
    };
    if options.dir.exists()
        && std::fs::read_dir(&options.dir)
            .map_err(io(&options.dir))?
            .next()
            .is_some()
    {
        return Err(ToolError::Usage(format!(
            "{} exists and is not empty",
            options.dir.display()
        )));
    }
    let sdk = match (options.lang, &options.sdk) {
        (Lang::Rust, Some(sdk)) => sdk.canonicalize().map_err(io(sdk))?,
        (Lang::Rust, None) => bundled_sdk().ok_or_else(|| {
            ToolError::Usage(
                "Rust plugins need the Ganglion SDK: pass --sdk <path to the repository's sdk/ folder>"
                    .into(),
            )
        })?,
        _ => PathBuf::new(),
    };
    let module = options.name.replace('-', "_");
    let fill = |text: &str| {
        text.replace("{{name}}", &options.name)
            .replace("{{module}}", &module)
            .replace("{{world}}", options.world.name())
            .replace("{{stage}}", options.world.stage())
            .replace("{{sdk}}", &sdk.display().to_string().replace('\\', "/"))
    };
    let prefix = format!("{}/", options.lang.name());
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for (path, text) in TEMPLATES {
        let Some(rel) = path.strip_prefix(&prefix) else {
            continue;
        };
        let rel = match World::ALL
            .iter()
            .find_map(|w| rel.strip_suffix(&format!(".{}", w.name())).map(|r| (w, r)))
        {
            Some((w, r)) if *w == options.world => r,
            Some(_) => continue,
            None => rel,
        };
        files.push((PathBuf::from(rel), fill(text)));
    }
    if files.is_empty() {
        return Err(ToolError::Usage(format!(
            "no templates for {} in this build",
            options.lang
        )));
    }
    let manifest = Manifest {
        name: options.name.clone(),
        lang: options.lang,
        world: options.world,
    };
    files.push((
        PathBuf::from(MANIFEST),
        toml::to_string(&manifest).map_err(|e| ToolError::Usage(e.to_string()))?,
    ));
    files.push((PathBuf::from("wit/ganglion.wit"), crate::WIT.to_owned()));
    files.push((
        PathBuf::from(".gitignore"),
        format!(
            "/{}.wasm\n/build/\n/target/\n/node_modules/\n__pycache__/\n",
            options.name
        ),
    ));
    for (rel, text) in &files {
        let path = options.dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(files.into_iter().map(|(rel, _)| rel).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_has_a_template_for_every_world() {
        for lang in Lang::ALL {
            let prefix = format!("{lang}/");
            for world in World::ALL {
                let suffix = format!(".{world}");
                assert!(
                    TEMPLATES
                        .iter()
                        .any(|(p, _)| p.starts_with(&prefix) && p.ends_with(&suffix)),
                    "no {world} template for {lang}"
                );
            }
        }
    }

    #[test]
    fn a_world_is_named_by_its_stage_or_by_its_own_name() {
        for world in World::ALL {
            assert_eq!(world.stage().parse::<World>().unwrap(), world);
            assert_eq!(world.name().parse::<World>().unwrap(), world);
        }
        assert!(matches!(
            "prompt".parse::<World>(),
            Err(ToolError::Usage(_))
        ));
    }

    #[test]
    fn names_are_checked_and_placeholders_filled() {
        let dir = std::env::temp_dir().join(format!("ganglion-new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut options = NewOptions {
            name: "Bad Name".into(),
            lang: Lang::Python,
            world: World::Postprocessor,
            dir: dir.clone(),
            sdk: None,
        };
        assert!(matches!(new_project(&options), Err(ToolError::Usage(_))));
        options.name = "pump-flow".into();
        let files = new_project(&options).unwrap();
        assert!(files.contains(&PathBuf::from(MANIFEST)));
        assert_eq!(
            Manifest::load(&dir).unwrap(),
            Manifest {
                name: "pump-flow".into(),
                lang: Lang::Python,
                world: World::Postprocessor
            }
        );
        for rel in &files {
            let text = std::fs::read_to_string(dir.join(rel)).unwrap();
            for placeholder in [
                "{{name}}",
                "{{module}}",
                "{{world}}",
                "{{stage}}",
                "{{sdk}}",
            ] {
                assert!(
                    !text.contains(placeholder),
                    "{} keeps {placeholder}",
                    rel.display()
                );
            }
            assert!(
                World::ALL
                    .iter()
                    .all(|w| !rel.to_string_lossy().ends_with(&format!(".{w}"))),
                "{} kept its world suffix",
                rel.display()
            );
        }
        assert!(matches!(new_project(&options), Err(ToolError::Usage(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
