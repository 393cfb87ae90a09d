//! Plugin tooling: scaffolding a plugin project and building it into a
//! WebAssembly component, in Rust, Python, JavaScript or C.
//!
//! Module map:
//! - [`project`]: languages, stages, the project manifest
//!   (`ganglion-plugin.toml`), scaffolding from the embedded templates
//!   ([`project::new_project`]).
//! - [`build`]: building a project into `<name>.wasm` with the language's own
//!   toolchain ([`build::build`]).
//! - [`c`]: C plugins: bindings from the WIT, clang for wasm32-wasip1,
//!   wrapped into a component with the WASI preview1 reactor adapter.

pub mod build;
pub mod c;
pub mod project;

/// The version of the contract new projects are built against: the newest
/// `wit/ganglion-plugin@<version>/` folder of the repository (see build.rs).
pub const WIT_VERSION: &str = env!("GANGLION_WIT_VERSION");

/// That version's package folder, relative to the repository's `wit/`.
pub const WIT_PACKAGE_DIR: &str = concat!("ganglion-plugin@", env!("GANGLION_WIT_VERSION"));

/// The WIT contract of [`WIT_VERSION`], as the host serves it. The package is
/// one file, which a project keeps as `wit/ganglion.wit`.
pub const WIT: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../wit/ganglion-plugin@",
    env!("GANGLION_WIT_VERSION"),
    "/ganglion.wit"
));

/// The repository's package folder of [`WIT_VERSION`], where it was at build
/// time (gone where the binary runs without the checkout).
pub fn repo_wit_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../wit")
        .join(WIT_PACKAGE_DIR)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_wit_is_the_package_of_its_version() {
        let package = format!("package ganglion:plugin@{};", super::WIT_VERSION);
        assert!(super::WIT.lines().any(|l| l == package), "{package}");
        assert_eq!(
            std::fs::read_to_string(super::repo_wit_dir().join("ganglion.wit")).unwrap(),
            super::WIT
        );
    }
}
