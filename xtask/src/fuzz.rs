//! `fuzz`: each cargo-fuzz target of tests/fuzz for a while, then what it
//! found.

use anyhow::{Result, bail};
use std::process::Command;

/// The cargo-fuzz targets of tests/fuzz, one per parser and the allow-list.
const FUZZ_TARGETS: &[&str] = &[
    "pipeline_csv",
    "sdk_telemetry",
    "json_actions",
    "gguf",
    "tokenizer",
    "allow_list",
];

/// What one libFuzzer run reported.
#[derive(Debug, Default)]
struct FuzzRun {
    runs: Option<u64>,
    crashes: u64,
    artifacts: Vec<String>,
}

/// Reads libFuzzer's output: the executed units from `#N DONE` or
/// `stat::number_of_executed_units: N`, a crash from each `Test unit
/// written to PATH`.
fn fuzz_line(line: &str, run: &mut FuzzRun) {
    if let Some(n) = line
        .strip_prefix("stat::number_of_executed_units:")
        .and_then(|n| n.trim().parse().ok())
    {
        run.runs = Some(n);
    } else if let Some(rest) = line.strip_prefix('#')
        && let Some((n, tail)) = rest.split_once(char::is_whitespace)
        && tail.trim_start().starts_with("DONE")
        && let Ok(n) = n.parse()
    {
        run.runs = Some(n);
    } else if let Some(path) = line.split("Test unit written to ").nth(1) {
        run.crashes += 1;
        run.artifacts.push(path.trim().to_owned());
    }
}

/// `cargo run -p xtask -- fuzz [seconds] [target...]`: runs each target for
/// the given time with `cargo +nightly fuzz run`, built into target/fuzz
/// (corpora and crash inputs there too, seeds from tests/fuzz/seeds), and
/// prints the runs and crashes of each.
pub(crate) fn fuzz(rest: &[String]) -> Result<()> {
    use std::io::{BufRead, Write};
    let seconds: u64 = match rest.first() {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("fuzz: seconds per target must be a number, not `{s}`"))?,
        None => 60,
    };
    let targets: Vec<&str> = match rest.get(1..).filter(|t| !t.is_empty()) {
        Some(t) => t.iter().map(String::as_str).collect(),
        None => FUZZ_TARGETS.to_vec(),
    };
    for t in &targets {
        if !FUZZ_TARGETS.contains(t) {
            bail!(
                "fuzz: no target `{t}` (targets: {})",
                FUZZ_TARGETS.join(", ")
            );
        }
    }
    // The rustup proxy, so that `+nightly` works; not the toolchain's own
    // cargo that runs this task.
    let nightly = || {
        let mut c = Command::new("cargo");
        c.env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .current_dir(xtask::root());
        c.arg("+nightly");
        c
    };
    let quiet = |mut c: Command| {
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut probe = nightly();
    probe.arg("--version");
    if !quiet(probe) {
        bail!(
            "fuzz: the nightly toolchain is missing (cargo-fuzz needs it): rustup toolchain install nightly"
        );
    }
    let mut probe = nightly();
    probe.args(["fuzz", "--version"]);
    if !quiet(probe) {
        bail!("fuzz: cargo-fuzz is missing: cargo install cargo-fuzz");
    }
    let root = xtask::root();
    let out = root.join("target/fuzz");
    let tmp = out.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let mut results = Vec::new();
    for target in &targets {
        let corpus = out.join("corpus").join(target);
        let artifacts = out.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds = root.join("tests/fuzz/seeds").join(target);
        let mut c = nightly();
        // Safe Rust parsers: no sanitizer, so the build and the runs are
        // faster; debug assertions and overflow checks stay on.
        c.args([
            "fuzz",
            "run",
            "--fuzz-dir",
            "tests/fuzz",
            "--sanitizer",
            "none",
        ])
        .arg("--target-dir")
        .arg(&out)
        .arg(target)
        .arg(&corpus);
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .env("TMPDIR", &tmp)
            .stderr(std::process::Stdio::piped());
        eprintln!("+ {c:?}");
        let mut child = c.spawn()?;
        let mut run = FuzzRun::default();
        let err = child.stderr.take().expect("piped stderr");
        let mut stderr = std::io::stderr();
        for line in std::io::BufReader::new(err).lines() {
            let line = line?;
            writeln!(stderr, "{line}")?;
            fuzz_line(&line, &mut run);
        }
        let status = child.wait()?;
        if !status.success() && run.crashes == 0 {
            // A build failure, or a crash libFuzzer wrote no input for.
            run.crashes += 1;
            run.artifacts
                .push(format!("(exit {status}, no input written)"));
        }
        results.push((target, run));
    }
    println!("fuzz: {seconds} s per target (cargo-fuzz, libFuzzer)");
    println!(
        "{:<16} {:>8} {:>12} {:>8}",
        "target", "seconds", "runs", "crashes"
    );
    for (target, run) in &results {
        let runs = run.runs.map_or("?".to_owned(), |n| n.to_string());
        println!("{target:<16} {seconds:>8} {runs:>12} {:>8}", run.crashes);
        for a in &run.artifacts {
            println!("  crash input: {a}");
        }
    }
    let crashes: u64 = results.iter().map(|(_, r)| r.crashes).sum();
    if crashes > 0 {
        bail!("fuzz: {crashes} crash(es) found");
    }
    Ok(())
}
