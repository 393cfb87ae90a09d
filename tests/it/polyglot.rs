//! Plugins in any WASM language: the same logic written in Rust, Python,
//! JavaScript and C gives the same outputs through the real host, and a
//! project scaffolded by `ganglion new` in each language builds and passes
//! `ganglion check`.
//!
//! The Python, JavaScript and C examples are built from source by
//! `cargo run -p xtask -- test` (`xtask::build_polyglot`), as in CI.

use ganglion::config::Limits;
use ganglion::devtools::harness;
use ganglion::llm::NoModel;
use ganglion::types::Stage;
use ganglion_tests::*;
use serde_json::{Value as Json, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

/// The other-language builds, once per test process.
fn polyglot(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            xtask::build_polyglot().expect("building the Python, JavaScript and C examples")
        })
        .join(format!("{name}.wasm"))
}

/// Call limits loose enough for interpreted guests on a loaded CI machine:
/// the test is about outputs, not speed.
fn limits() -> Limits {
    Limits {
        call_timeout_ms: 10_000,
        ..Limits::default()
    }
}

fn cases(folder: &str) -> Vec<Json> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(folder);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("cases") && name.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Json>>()
        })
        .collect()
}

fn settings(folder: &str) -> serde_json::Map<String, Json> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(folder)
        .join("config.json");
    config(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
}

/// Every case through one plugin, on one instance pool (so plugin state
/// carries from case to case, as it does from message to message).
async fn outcomes(
    path: &Path,
    stage: Stage,
    settings: &serde_json::Map<String, Json>,
    cases: &[Json],
) -> Vec<Json> {
    let host = host_with(limits(), Arc::new(NoModel));
    let plugin = host
        .load_file(path)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let pool = host.pool(&plugin, "polyglot", settings.clone());
    let mut out = Vec::new();
    for case in cases {
        out.push(harness::run_case(&pool, stage, case).await.unwrap());
    }
    out
}

/// What must agree across languages: the whole `ok` value, the error's
/// kind (messages are each language's own words), that a fault happened.
fn comparable(outcome: &Json) -> Json {
    if let Some(kind) = outcome.pointer("/error/kind") {
        json!({ "error": kind })
    } else if outcome.get("fault").is_some() {
        json!({ "fault": true })
    } else {
        outcome.clone()
    }
}

async fn assert_all_agree(
    reference: &Path,
    others: &[PathBuf],
    stage: Stage,
    settings: &serde_json::Map<String, Json>,
    cases: &[Json],
) -> Vec<Json> {
    let expected = outcomes(reference, stage, settings, cases).await;
    assert!(
        expected.iter().all(|o| o.get("fault").is_none()),
        "{expected:?}"
    );
    for other in others {
        let got = outcomes(other, stage, settings, cases).await;
        for (i, case) in cases.iter().enumerate() {
            assert_eq!(
                comparable(&got[i]),
                comparable(&expected[i]),
                "{} differs from {} on case {i}: {case}\n  got      {}\n  expected {}",
                other.display(),
                reference.display(),
                got[i],
                expected[i]
            );
        }
    }
    expected
}

fn preprocessors() -> Vec<PathBuf> {
    ["py-clean-readings", "js-clean-readings", "c-clean-readings"]
        .map(polyglot)
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn preprocessors_in_four_languages_give_identical_readings() {
    let cases = cases("clean-readings");
    let expected = assert_all_agree(
        &example("clean-readings"),
        &preprocessors(),
        Stage::Preprocessor,
        &settings("clean-readings"),
        &cases,
    )
    .await;
    // The cases reach every branch that matters: readings kept, readings
    // dropped (NaN, out of range, bad unit), and payloads refused.
    let ok_with = |n: usize| {
        expected
            .iter()
            .filter(|o| o["ok"].as_array().is_some_and(|r| r.len() == n))
            .count()
    };
    assert!(ok_with(0) >= 8, "{expected:?}");
    assert!(ok_with(1) >= 10, "{expected:?}");
    let refused = expected.iter().filter(|o| o.get("error").is_some()).count();
    assert!(refused >= 8, "{expected:?}");
    let devices: Vec<&str> = expected
        .iter()
        .filter_map(|o| o["ok"].as_array())
        .flatten()
        .filter_map(|r| r["device"].as_str())
        .collect();
    assert!(devices.contains(&"Küche-温度"), "{devices:?}");
    assert!(devices.contains(&"Ωmega 😀"), "{devices:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_readings_are_dropped_alike_using_plugin_state() {
    let settings = config(json!({ "device_from_topic": 1, "drop_stale": true }));
    let reading = |ts: i64| json!({ "topic": "f/m1/t", "payload": format!(r#"{{"metric":"temperature","value":1,"ts":{ts}}}"#) });
    let cases = [2000, 2000, 1000, 3000, 3000].map(reading);
    let expected = assert_all_agree(
        &example("clean-readings"),
        &preprocessors(),
        Stage::Preprocessor,
        &settings,
        &cases,
    )
    .await;
    let kept: Vec<usize> = expected
        .iter()
        .map(|o| o["ok"].as_array().unwrap().len())
        .collect();
    assert_eq!(kept, [1, 0, 0, 1, 0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_settings_are_refused_alike() {
    let settings = config(json!({ "device_from_topic": 1, "unit": { "temperature": "C" } }));
    let case = json!({ "topic": "f/m1/t", "payload": r#"{"metric":"t","value":1}"# });
    let expected = assert_all_agree(
        &example("clean-readings"),
        &preprocessors(),
        Stage::Preprocessor,
        &settings,
        &[case],
    )
    .await;
    assert_eq!(expected[0]["error"]["kind"], "bad-config", "{expected:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postprocessors_in_three_languages_give_identical_actions() {
    let cases = cases("json-actions");
    let expected = assert_all_agree(
        &example("json-actions"),
        &["py-json-actions", "js-json-actions"].map(polyglot),
        Stage::Postprocessor,
        &settings("json-actions"),
        &cases,
    )
    .await;
    for kind in ["publish", "alert", "command"] {
        assert!(
            expected
                .iter()
                .filter_map(|o| o["ok"].as_array())
                .flatten()
                .any(|a| a["type"] == kind),
            "no case yields a {kind} action: {expected:?}"
        );
    }
    assert!(
        expected
            .iter()
            .any(|o| o.pointer("/error/kind") == Some(&json!("bad-completion"))),
        "{expected:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_instance_slot_holds_a_python_component() {
    // One slot: the Python component's 14 core instances must fit in it.
    let config = ganglion::config::PluginConfig {
        cache_dir: None,
        limits: limits(),
        total_instances: 1,
        ..Default::default()
    };
    let host = ganglion::plugin::PluginHost::new(
        config,
        ganglion::state::StateStore::in_memory(),
        Arc::new(NoModel),
    )
    .unwrap();
    let plugin = host
        .load_file(&polyglot("py-clean-readings"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = host.pool(&plugin, "polyglot", settings("clean-readings"));
    let case = json!({ "topic": "f/m1/t", "payload": r#"{"metric":"temperature","value":1}"# });
    let outcome = harness::run_case(&pool, Stage::Preprocessor, &case)
        .await
        .unwrap();
    assert_eq!(outcome["ok"][0]["device"], "m1", "{outcome}");
}

fn ganglion(dir: &Path, args: &[&str]) -> String {
    let bin = xtask::root().join("target/debug/ganglion");
    assert!(
        bin.exists(),
        "{} is missing: `cargo run -p xtask -- test` builds it before the tests",
        bin.display()
    );
    let root = xtask::root();
    let out = Command::new(bin)
        .current_dir(dir)
        .args(args)
        // The toolchains the repository installs under target/, and one
        // cargo target dir for every Rust build.
        .env(
            "GANGLION_COMPONENTIZE_PY",
            root.join("target/py-venv/bin/componentize-py"),
        )
        .env(
            "GANGLION_JCO",
            root.join("plugins/js/node_modules/.bin/jco"),
        )
        .env("CARGO_TARGET_DIR", root.join("target/plugins-build"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ganglion {args:?} failed:\n{text}");
    text
}

#[test]
fn a_scaffolded_plugin_in_each_language_builds_passes_check_and_runs_its_test_input() {
    xtask::build_polyglot().expect("the Python, JavaScript and C toolchains");
    let scratch = scratch("scaffold");
    // The interpreted guests on a loaded CI machine: the test is about
    // building and loading, not speed.
    let config = scratch.join("ganglion.toml");
    std::fs::write(
        &config,
        "[plugins]\ncache_dir = \"compiled\"\n[plugins.limits]\ncall_timeout_ms = 10000\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    // Each language once, and each stage once across them; half by their
    // world names, the older spelling `--stage` still takes.
    for (lang, asked, stage) in [
        ("rust", "rule", "handler"),
        ("python", "postprocess", "postprocess"),
        ("js", "prompt-template", "template"),
        ("c", "preprocess", "preprocess"),
    ] {
        let name = format!("{lang}-{stage}");
        ganglion(&scratch, &["new", &name, "--lang", lang, "--stage", asked]);
        let project = scratch.join(&name);
        let built = ganglion(&project, &["build"]);
        assert!(built.contains(&format!("{name}.wasm")), "{built}");
        let wasm = format!("{name}.wasm");
        let check = ganglion(&project, &["--config", config, "check", &wasm]);
        assert!(check.contains(": ok"), "{check}");
        assert!(check.contains(&format!("stages    {stage}")), "{check}");
        let calls = ganglion(
            &project,
            &[
                "--config",
                config,
                "call",
                &wasm,
                "--cases",
                "test-input.jsonl",
            ],
        );
        let outcomes: Vec<Json> = calls
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(outcomes.len() >= 2, "{lang} {stage}: {calls}");
        assert!(
            outcomes.iter().any(|o| o.get("ok").is_some()),
            "{lang} {stage}: {calls}"
        );
        assert!(
            outcomes.iter().all(|o| o.get("fault").is_none()),
            "{lang} {stage}: {calls}"
        );
    }
}
