//! `ganglion:plugin@0.1.0`, from `wit/ganglion-plugin@0.1.0/`: its generated
//! bindings and the conversions between their types and `crate::types`.
//!
//! Released versions are frozen, so a new version gets a sibling module
//! (`v0_2_0`) with its own `bindgen!` and conversions rather than edits here.

pub mod bindings;
pub(crate) mod convert;

use crate::types::Stage;

/// Expands to the version as a literal, so that `concat!` can build names
/// from it.
macro_rules! version {
    () => {
        "0.1.0"
    };
}

/// The package version: the folder `wit/ganglion-plugin@<version>/` and the
/// WIT's `package` line say the same (tested).
pub const WIT_VERSION: &str = version!();

/// The package, `ganglion:plugin@<version>`.
pub const PACKAGE: &str = concat!("ganglion:plugin@", version!());

/// The WIT interface a component exports for `stage`, named as the stage is
/// ([`Stage::name`]).
pub fn interface(stage: Stage) -> &'static str {
    match stage {
        Stage::Preprocessor => concat!("ganglion:plugin/preprocess@", version!()),
        Stage::PromptTemplate => concat!("ganglion:plugin/template@", version!()),
        Stage::Postprocessor => concat!("ganglion:plugin/postprocess@", version!()),
        Stage::Rule => concat!("ganglion:plugin/handler@", version!()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Exports, HostState};
    use std::path::Path;
    use wasmtime::Engine;
    use wasmtime::component::{Component, Linker};

    #[test]
    fn the_folder_the_package_line_and_the_bindgen_path_name_the_constant() {
        let folder = format!("ganglion-plugin@{WIT_VERSION}");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../wit")
            .join(&folder);
        let mut packages = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "wit") {
                let text = std::fs::read_to_string(&path).unwrap();
                packages.extend(
                    text.lines()
                        .filter(|l| l.starts_with("package "))
                        .map(str::to_owned),
                );
            }
        }
        assert!(
            !packages.is_empty(),
            "no package line under {}",
            dir.display()
        );
        for line in packages {
            assert_eq!(line, format!("package {PACKAGE};"));
        }
        assert!(
            include_str!("bindings.rs").contains(&format!("path: \"../wit/{folder}\"")),
            "bindgen! reads another folder than {folder}"
        );
    }

    /// The generated export lookups find each stage under the name built
    /// from the constant.
    #[test]
    fn the_bindings_look_stages_up_under_the_constants_names() {
        let engine = Engine::default();
        for (stage, func) in [
            (Stage::Preprocessor, "preprocess"),
            (Stage::PromptTemplate, "render"),
            (Stage::Postprocessor, "postprocess"),
            (Stage::Rule, "handle"),
        ] {
            let wat = format!(
                r#"(component
                    (core module $m (func (export "f") (result i32) i32.const 0))
                    (core instance $i (instantiate $m))
                    (func $f (result u32) (canon lift (core func $i "f")))
                    (instance $api (export "{func}" (func $f)))
                    (export "{}" (instance $api)))"#,
                interface(stage)
            );
            let component = Component::new(&engine, wat).unwrap();
            let pre = Linker::<HostState>::new(&engine)
                .instantiate_pre(&component)
                .unwrap();
            assert_eq!(Exports::new(pre).stages(), [stage]);
            assert!(interface(stage).contains(&format!("/{}@", stage.name())));
        }
    }
}
