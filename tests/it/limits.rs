//! Misbehaving plugins are stopped by the host's limits, each with its own
//! error, while a healthy plugin keeps serving in the same test.

use ganglion::config::Limits;
use ganglion::llm::NoModel;
use ganglion::plugin::{CallError, InstancePool, LoadError};
use ganglion::types::*;
use ganglion_tests::*;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn msg(payload: &str) -> Message {
    Message {
        topic: "t".into(),
        payload: payload.as_bytes().to_vec(),
        timestamp: 1,
    }
}

/// Runs `bad` while the healthy clean-readings pool serves 20 calls; returns
/// the bad call's result after checking every healthy call succeeded.
async fn beside_healthy(
    healthy: &InstancePool,
    bad: impl std::future::Future<Output = Result<ReadingBatch, CallError>>,
) -> Result<ReadingBatch, CallError> {
    let serve = async {
        for i in 0..20 {
            let m = msg(&format!(r#"{{"device":"ok","metric":"m","value":{i}}}"#));
            let out = healthy
                .preprocess(&m, ReadingBatch::default())
                .await
                .expect("healthy plugin keeps serving");
            assert_eq!(out.len(), 1);
            tokio::task::yield_now().await;
        }
    };
    let (bad, ()) = tokio::join!(bad, serve);
    let after = healthy
        .preprocess(
            &msg(r#"{"device":"ok","metric":"m","value":1}"#),
            ReadingBatch::default(),
        )
        .await;
    assert!(after.is_ok(), "healthy plugin after the fault: {after:?}");
    bad
}

async fn setup(limits: Limits) -> (InstancePool, InstancePool) {
    let host = host_with(limits, Arc::new(NoModel));
    let bad = pool(&host, &fixture("misbehave"), "r", json!({})).await;
    let healthy = pool(&host, &example("clean-readings"), "r", json!({})).await;
    (bad, healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_stopped_by_its_deadline() {
    let (bad, healthy) = setup(Limits {
        call_timeout_ms: 100,
        ..Limits::default()
    })
    .await;
    let started = Instant::now();
    let r = beside_healthy(
        &healthy,
        bad.preprocess(&msg("mode=loop"), ReadingBatch::default()),
    )
    .await;
    assert_eq!(
        r,
        Err(CallError::Deadline {
            limit: Duration::from_millis(100)
        })
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped, not left running"
    );
    assert_eq!(bad.stats().discarded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_stopped_by_its_cap() {
    let (bad, healthy) = setup(Limits {
        max_memory_mib: 16,
        ..Limits::default()
    })
    .await;
    let r = beside_healthy(
        &healthy,
        bad.preprocess(&msg("mode=oom"), ReadingBatch::default()),
    )
    .await;
    match r {
        Err(CallError::MemoryLimit { limit, requested }) => {
            assert_eq!(limit, 16 << 20);
            assert!(requested > limit);
        }
        other => panic!("expected the memory cap, got {other:?}"),
    }
}

#[tokio::test]
async fn many_memories_cannot_exceed_the_instance_cap() {
    let load = async |max_memory_mib| {
        let host = host_with(
            Limits {
                max_memory_mib,
                ..Limits::default()
            },
            Arc::new(NoModel),
        );
        host.load_file(&wat_fixture("many-memories.wat"))
            .await
            .expect_err("the fixture's stage export is a stub")
    };
    // Four memories of 10 MiB each, every one under a 16 MiB cap.
    match load(16).await {
        LoadError::Instantiate {
            reason: CallError::MemoryLimit { limit, requested },
            ..
        } => {
            assert_eq!(limit, 16 << 20);
            assert!(requested > limit && requested < 21 << 20, "{requested}");
        }
        other => panic!("expected the instance's memory cap, got {other}"),
    }
    // Under a cap that holds all four, they are allowed (and the stub
    // export is what is refused).
    let e = load(41).await;
    assert!(
        matches!(
            e,
            LoadError::Instantiate {
                reason: CallError::Incompatible { .. },
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_memory_keeps_growing_is_retired_before_it_faults() {
    let (bad, _healthy) = setup(Limits {
        max_memory_mib: 16,
        ..Limits::default()
    })
    .await;
    // Each call keeps 1 MiB: one instance would hit the 16 MiB cap within
    // 16 calls.
    for i in 0..48 {
        let r = bad
            .preprocess(&msg("mode=leak"), ReadingBatch::default())
            .await;
        assert!(r.is_ok(), "call {i}: {r:?}");
    }
    let stats = bad.stats();
    assert_eq!(stats.discarded, 0, "{stats:?}");
    assert!(stats.retired >= 3, "{stats:?}");
    assert_eq!(
        stats.created,
        stats.retired + stats.idle as u64,
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_instance_is_replaced() {
    let (bad, healthy) = setup(Limits::default()).await;
    let r = beside_healthy(
        &healthy,
        bad.preprocess(&msg("mode=trap"), ReadingBatch::default()),
    )
    .await;
    assert!(
        matches!(&r, Err(CallError::Trap(m)) if m.contains("unreachable")),
        "{r:?}"
    );
    assert_eq!(bad.stats().discarded, 1);
    // The same pool serves again, on a fresh instance.
    let ok = bad
        .preprocess(&msg("hello"), ReadingBatch::default())
        .await
        .unwrap();
    assert_eq!(ok.iter().next().unwrap().value, &Value::Number(5.0));
    let s = bad.stats();
    assert_eq!((s.created, s.discarded, s.idle), (2, 1, 1));
}

#[tokio::test]
async fn oversized_output_is_refused() {
    let (bad, healthy) = setup(Limits {
        max_output_bytes: 1 << 20,
        ..Limits::default()
    })
    .await;
    let r = beside_healthy(
        &healthy,
        bad.preprocess(&msg("mode=oversize"), ReadingBatch::default()),
    )
    .await;
    assert!(
        matches!(r, Err(CallError::OutputTooLarge { cap: 1048576, size }) if size > 4 << 20),
        "{r:?}"
    );
    assert_eq!(bad.stats().discarded, 0, "the instance itself is healthy");
}

#[tokio::test]
async fn out_of_range_name_index_is_invalid_output() {
    let (bad, healthy) = setup(Limits::default()).await;
    let r = beside_healthy(
        &healthy,
        bad.preprocess(&msg("mode=bad-index"), ReadingBatch::default()),
    )
    .await;
    assert_eq!(
        r,
        Err(CallError::InvalidOutput(
            "reading 0: metric index 7 out of range of 1 names".into()
        ))
    );
}

#[tokio::test]
async fn fuel_limit_stops_long_computations() {
    let (bad, healthy) = setup(Limits {
        fuel: 5_000_000,
        call_timeout_ms: 60_000,
        ..Limits::default()
    })
    .await;
    let r = beside_healthy(
        &healthy,
        bad.preprocess(&msg("mode=loop"), ReadingBatch::default()),
    )
    .await;
    assert_eq!(r, Err(CallError::FuelExhausted { fuel: 5_000_000 }));
    // The metrics count what each pool burnt: the loop all of its fuel, the
    // healthy plugin a little per call.
    assert!(bad.stats().fuel >= 5_000_000, "{:?}", bad.stats());
    let healthy = healthy.stats();
    assert!(
        healthy.fuel > 0 && healthy.fuel < 21 * 5_000_000,
        "{healthy:?}"
    );
    assert!(healthy.memory_bytes > 0, "{healthy:?}");
    assert!(healthy.peak_memory_bytes >= 64 * 1024, "{healthy:?}");
}

#[tokio::test]
async fn log_floods_are_capped_per_call() {
    let (bad, _healthy) = setup(Limits {
        max_log_lines_per_call: 100,
        ..Limits::default()
    })
    .await;
    bad.preprocess(&msg("mode=log-flood"), ReadingBatch::default())
        .await
        .unwrap();
    assert_eq!(bad.stats().suppressed_logs, 9_900);
}

#[tokio::test]
async fn plugins_get_no_files_env_or_sockets() {
    let (bad, _healthy) = setup(Limits::default()).await;
    let get = probe_capabilities(&bad).await;
    assert!(
        matches!(get("file"), Value::Text(t) if t.starts_with("denied")),
        "{:?}",
        get("file")
    );
    assert_eq!(get("env"), Value::Number(0.0));
    assert!(
        matches!(get("socket"), Value::Text(t) if t.starts_with("denied")),
        "{:?}",
        get("socket")
    );
}

#[tokio::test]
async fn rules_can_grant_env_and_read_only_directories() {
    let host = host_with(Limits::default(), Arc::new(NoModel));
    let plugin = load(&host, &fixture("misbehave")).await;
    let dir = scratch("grant");
    std::fs::write(dir.join("probe.txt"), "table v1").unwrap();
    let grants: ganglion::config::Grants = toml_grants(&format!(
        "env = {{ SITE = \"plant-3\" }}\ndirs = [{{ host = \"{}\", guest = \"/data\" }}]",
        dir.display()
    ));
    let pool = host
        .pool_with_grants(&plugin, "r", config(json!({})), grants)
        .unwrap();
    let get = probe_capabilities(&pool).await;
    assert_eq!(get("granted-file"), Value::Text("table v1".into()));
    assert_eq!(get("env"), Value::Number(1.0));
    assert!(
        matches!(get("granted-write"), Value::Text(t) if t.starts_with("denied")),
        "read-only by default"
    );
    assert!(
        matches!(get("file"), Value::Text(t) if t.starts_with("denied")),
        "nothing else"
    );
    assert!(!dir.join("written.txt").exists());

    let missing = toml_grants("dirs = [{ host = \"/no/such/dir\", guest = \"/data\" }]");
    let refused = host
        .pool_with_grants(&plugin, "r", config(json!({})), missing)
        .err()
        .expect("a missing directory is refused");
    assert!(refused.contains("/no/such/dir"), "{refused}");
}

#[cfg(unix)]
#[tokio::test]
async fn a_granted_symlink_swapped_after_binding_does_not_redirect_the_plugin() {
    let host = host_with(Limits::default(), Arc::new(NoModel));
    let plugin = load(&host, &fixture("misbehave")).await;
    let dir = scratch("grant-link");
    let (tables, secrets, link) = (dir.join("tables"), dir.join("secrets"), dir.join("link"));
    for (d, text) in [(&tables, "table v1"), (&secrets, "secret")] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("probe.txt"), text).unwrap();
    }
    std::os::unix::fs::symlink(&tables, &link).unwrap();
    let grants = toml_grants(&format!(
        "dirs = [{{ host = \"{}\", guest = \"/data\" }}]",
        link.display()
    ));
    // Instances are made on the first call, after the link is pointed
    // elsewhere; the grant stays on the directory it named when bound.
    let pool = host
        .pool_with_grants(&plugin, "r", config(json!({})), grants)
        .unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&secrets, &link).unwrap();
    let get = probe_capabilities(&pool).await;
    assert_eq!(get("granted-file"), Value::Text("table v1".into()));

    // A link to a file is refused.
    let file_link = dir.join("file-link");
    std::os::unix::fs::symlink(tables.join("probe.txt"), &file_link).unwrap();
    let to_file = toml_grants(&format!(
        "dirs = [{{ host = \"{}\", guest = \"/data\" }}]",
        file_link.display()
    ));
    let refused = host
        .pool_with_grants(&plugin, "r", config(json!({})), to_file)
        .err()
        .expect("a link to a file is refused");
    assert!(refused.contains("not a directory"), "{refused}");
}

/// What the fixture could reach, by probe name.
async fn probe_capabilities(pool: &InstancePool) -> impl Fn(&str) -> Value {
    let out = pool
        .preprocess(&msg("mode=capabilities"), ReadingBatch::default())
        .await
        .unwrap();
    move |metric: &str| {
        out.iter()
            .find(|r| r.metric == metric)
            .map(|r| r.value.clone())
            .unwrap()
    }
}

fn toml_grants(text: &str) -> ganglion::config::Grants {
    ganglion::config::GanglionConfig::parse_grants(text).unwrap()
}

#[tokio::test]
async fn calls_beyond_pool_size_wait_for_an_instance() {
    let host = host_with(
        Limits {
            max_instances: 2,
            ..Limits::default()
        },
        Arc::new(NoModel),
    );
    let healthy = Arc::new(pool(&host, &example("clean-readings"), "r", json!({})).await);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let p = healthy.clone();
        tasks.push(tokio::spawn(async move {
            p.preprocess(
                &msg(&format!(r#"{{"device":"d","metric":"m","value":{i}}}"#)),
                ReadingBatch::default(),
            )
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().len(), 1);
    }
    assert!(healthy.stats().created <= 2, "{:?}", healthy.stats());
}
