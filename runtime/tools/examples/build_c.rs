//! Builds a C plugin project into a component, as `ganglion build` does.
//!
//! `cargo run -p ganglion-tools --example build_c -- <project> <world> <out.wasm> [<wit>]`
//!
//! The WIT defaults to `<project>/wit` when that exists, else this
//! repository's newest `wit/ganglion-plugin@<version>/`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (project, world, out) = match args.as_slice() {
        [p, w, o] | [p, w, o, _] => (PathBuf::from(p), w.as_str(), PathBuf::from(o)),
        _ => {
            eprintln!("usage: build_c <project> <world> <out.wasm> [<wit>]");
            return ExitCode::from(2);
        }
    };
    let wit = match args.get(3) {
        Some(w) => PathBuf::from(w),
        None if project.join("wit").is_dir() => project.join("wit"),
        None => ganglion_tools::repo_wit_dir(),
    };
    let started = std::time::Instant::now();
    match ganglion_tools::c::build(&project, &wit, world, &out) {
        Ok(built) => {
            eprint!("{}", built.warnings);
            println!(
                "built {} ({} bytes, {} with {}, {} ms)",
                built.component.display(),
                built.size,
                built.target,
                built.clang.display(),
                started.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
