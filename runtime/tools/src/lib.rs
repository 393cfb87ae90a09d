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

/// The WIT contract every plugin is built against, as the host serves it.
pub const WIT: &str = include_str!("../../../wit/ganglion.wit");
