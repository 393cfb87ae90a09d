//! Loading components: stage detection, refusals with clear errors, the
//! compiled-artefact cache, versions.

use ganglion::config::{Limits, PluginConfig};
use ganglion::llm::NoModel;
use ganglion::plugin::{CallError, CompileSource, LoadError, PluginHost};
use ganglion::state::StateStore;
use ganglion::types::{Message, ReadingBatch, Stage};
use ganglion_tests::*;
use serde_json::json;
use std::sync::Arc;

#[tokio::test]
async fn every_example_plugin_loads_with_its_stages() {
    let host = host();
    let expected = [
        ("clean-readings", Stage::Preprocessor),
        ("prompt-template", Stage::PromptTemplate),
        ("json-actions", Stage::Postprocessor),
        ("threshold-alert", Stage::Postprocessor),
        ("debounce-alarm", Stage::Rule),
    ];
    for (name, stage) in expected {
        let p = load(&host, &example(name)).await;
        assert_eq!(p.name, name);
        assert_eq!(p.stages, vec![stage], "{name}");
        assert!(
            p.imports.iter().any(|i| i.starts_with("ganglion:plugin/")),
            "{name} imports {:?}",
            p.imports
        );
        assert_eq!(
            p.version.hash,
            blake3_hex(&std::fs::read(example(name)).unwrap())
        );
    }
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

async fn refusal(name: &str) -> LoadError {
    host().load_file(&wat_fixture(name)).await.expect_err(name)
}

#[tokio::test]
async fn wrong_world_is_refused_naming_what_it_exports() {
    let e = refusal("wrong-world.wat").await;
    assert!(
        matches!(&e, LoadError::NoStage { exports, .. } if exports == "example:other/greeter@1.0.0"),
        "{e}"
    );
    assert!(e.to_string().contains("wrong-world.wat"), "{e}");
}

#[tokio::test]
async fn corrupt_bytes_are_refused() {
    let e = refusal("corrupt.wasm").await;
    assert!(matches!(e, LoadError::Invalid { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&wat_fixture("corrupt.wasm").display().to_string()),
        "{e}"
    );
}

#[tokio::test]
async fn core_module_is_refused_with_a_hint() {
    let e = refusal("core-module.wat").await;
    assert!(
        matches!(&e, LoadError::Invalid { reason, .. } if reason.contains("core WebAssembly module, not a component")),
        "{e}"
    );
}

#[tokio::test]
async fn mismatched_export_type_is_refused_naming_the_stage() {
    let e = refusal("mismatched-export.wat").await;
    assert!(
        matches!(
            &e,
            LoadError::Instantiate {
                reason: CallError::Incompatible {
                    stage: Stage::Preprocessor,
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn trap_during_instantiation_is_refused() {
    let e = refusal("start-trap.wat").await;
    assert!(
        matches!(
            &e,
            LoadError::Instantiate {
                reason: CallError::Trap(_),
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_folder_loads_the_good_and_reports_the_bad() {
    let dir = scratch("folder");
    std::fs::copy(example("clean-readings"), dir.join("clean-readings.wasm")).unwrap();
    std::fs::copy(wat_fixture("corrupt.wasm"), dir.join("corrupt.wasm")).unwrap();
    std::fs::copy(example("json-actions"), dir.join("Bad Name.wasm")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a plugin").unwrap();
    let host = host();
    let report = host.load_dir(&dir).await.unwrap();
    assert_eq!(
        report
            .plugins
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        vec!["clean-readings"]
    );
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    assert!(
        report
            .errors
            .iter()
            .any(|e| matches!(e, LoadError::BadName { name, .. } if name == "Bad Name"))
    );
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.path().ends_with("corrupt.wasm"))
    );
    // The good plugin serves.
    let pool = host.pool(&report.plugins[0], "r", config(json!({})));
    let m = Message {
        topic: "t".into(),
        payload: br#"{"device":"d","metric":"m","value":1}"#.to_vec(),
        timestamp: 0,
    };
    assert_eq!(
        pool.preprocess(&m, ReadingBatch::default())
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(matches!(
        host.load_dir(&dir.join("missing")).await,
        Err(LoadError::Io { .. })
    ));
}

/// A host whose compiled artefacts go to `cache`.
fn cached_host(cache: &std::path::Path) -> PluginHost {
    let config = PluginConfig {
        cache_dir: Some(cache.to_owned()),
        limits: Limits::default(),
        total_instances: 16,
        ..Default::default()
    };
    PluginHost::new(config, StateStore::in_memory(), Arc::new(NoModel)).unwrap()
}

/// `[plugins] perf_map_max_bytes`: a plugin compiled, and the same plugin
/// from the artefact cache, each get their functions named in this
/// process's perf map, demangled and prefixed with the plugin's name.
#[tokio::test]
async fn perf_map_names_plugin_functions_compiled_or_cached() {
    let cache = scratch("perf-map-cache");
    let map = ganglion::plugin::perf_map::default_path();
    let make = || {
        let config = PluginConfig {
            cache_dir: Some(cache.clone()),
            total_instances: 16,
            perf_map_max_bytes: u64::MAX,
            ..Default::default()
        };
        PluginHost::new(config, StateStore::in_memory(), Arc::new(NoModel)).unwrap()
    };
    let before = std::fs::read(&map).map(|b| b.len()).unwrap_or(0);
    for expected in [CompileSource::Compiled, CompileSource::Cached] {
        let p = make().load_file(&example("threshold-alert")).await.unwrap();
        assert_eq!(p.compiled, expected);
    }
    let text = String::from_utf8(std::fs::read(&map).unwrap()).unwrap();
    let added = &text[before..];
    let checks: Vec<&str> = added
        .lines()
        .filter(|l| l.ends_with(" threshold-alert!threshold_alert::check"))
        .collect();
    assert_eq!(checks.len(), 2, "{added}");
    for line in added.lines() {
        let fields: Vec<&str> = line.splitn(3, ' ').collect();
        assert!(
            u64::from_str_radix(fields[0], 16).is_ok()
                && u64::from_str_radix(fields[1], 16).is_ok()
                && fields[2].starts_with("threshold-alert!"),
            "{line}"
        );
    }
    if before == 0 {
        let _ = std::fs::remove_file(&map);
    }
}

#[tokio::test]
async fn compiled_artefacts_are_reused_across_hosts() {
    let cache = scratch("cache");
    let make = || cached_host(&cache);
    let first = make().load_file(&example("threshold-alert")).await.unwrap();
    assert_eq!(first.compiled, CompileSource::Compiled);
    let second = make().load_file(&example("threshold-alert")).await.unwrap();
    assert_eq!(second.compiled, CompileSource::Cached);
    assert_eq!(first.version.hash, second.version.hash);

    // A damaged artefact is compiled again, and the plugin still works.
    for entry in std::fs::read_dir(&cache).unwrap() {
        std::fs::write(entry.unwrap().path(), b"damaged").unwrap();
    }
    let host = make();
    let third = host.load_file(&example("threshold-alert")).await.unwrap();
    assert_eq!(third.compiled, CompileSource::Compiled);
    let pool = host.pool(
        &third,
        "r",
        config(json!({ "thresholds": [{ "metric": "t", "above": 1.0 }] })),
    );
    let ctx = ganglion::types::Context {
        rule: "r".into(),
        device: "d".into(),
        window_start: 0,
        window_end: 0,
    };
    let mut w = ReadingBatch::default();
    w.push("d", "t", ganglion::types::Value::Number(2.0), "", 0);
    assert_eq!(pool.postprocess(&ctx, w, None).await.unwrap().len(), 1);
    assert_eq!(
        make()
            .load_file(&example("threshold-alert"))
            .await
            .unwrap()
            .compiled,
        CompileSource::Cached
    );
}

#[tokio::test]
async fn different_content_means_a_different_version() {
    let host = host();
    let a = load(&host, &example("clean-readings")).await;
    let b = load(&host, &example("json-actions")).await;
    assert_ne!(a.version.hash, b.version.hash);
    assert_eq!(a.version.to_string().len(), 12);
    let again = load(&host, &example("clean-readings")).await;
    assert_eq!(a.version.hash, again.version.hash);
}

#[cfg(unix)]
#[tokio::test]
async fn a_world_writable_cache_entry_is_not_loaded() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let cache = scratch("cache-perms").join("compiled");
    let make = || cached_host(&cache);
    let load = async || {
        make()
            .load_file(&example("threshold-alert"))
            .await
            .unwrap()
            .compiled
    };
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    let set_mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    assert_eq!(load().await, CompileSource::Compiled);
    let artefact = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("an artefact was stored");
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&artefact), 0o600);
    assert_eq!(load().await, CompileSource::Cached);

    // Anyone could have replaced native code in a world-writable artefact:
    // it is compiled again, and the new artefact is private again.
    set_mode(&artefact, 0o666);
    assert_eq!(load().await, CompileSource::Compiled);
    assert_eq!(mode(&artefact), 0o600);
    assert_eq!(load().await, CompileSource::Cached);

    // The same for a folder others may write to (set after the host opened
    // the cache, which makes its folder private).
    let host = make();
    set_mode(&cache, 0o777);
    let p = host.load_file(&example("threshold-alert")).await.unwrap();
    assert_eq!(p.compiled, CompileSource::Compiled);
    set_mode(&cache, 0o700);

    // And for an artefact of another user (only root can make one).
    let me = std::fs::metadata(&artefact).unwrap().uid();
    if me == 0 {
        std::os::unix::fs::chown(&artefact, Some(65534), None).unwrap();
        assert_eq!(load().await, CompileSource::Compiled);
        assert_eq!(std::fs::metadata(&artefact).unwrap().uid(), 0);
    }
}
