//! A steady QoS 1 stream through a real broker while plugins and rules are
//! swapped, edited and broken under it: nothing lost, every change applied
//! or refused.

use super::{bytes, is, tag_rule};
use ganglion::config::ReloadConfig;
use ganglion::llm::NoModel;
use ganglion::reload::{FileKind, ReloadAction, ReloadEvent};
use ganglion_tests::*;
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the stream test does between messages.
#[derive(Debug, Clone, Copy)]
enum Step {
    Swap,
    Edit,
    CorruptPlugin,
    WrongWorldPlugin,
    BrokenRule,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_loses_nothing_while_plugins_and_rules_are_replaced() {
    const RATE: u64 = 2_000;
    const DEVICES: u64 = 8;
    let mut broker = Mosquitto::start("reload-stream");
    let url = broker.url();
    let root = scratch("reload-stream");
    let (plugins, rules) = (root.join("plugins"), root.join("rules"));
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::copy(fixture("tag-a"), plugins.join("tagger.wasm")).unwrap();
    std::fs::write(rules.join("tagged.toml"), tag_rule("v0")).unwrap();
    // A compiled-artefact cache, warmed with both versions, as on a gateway
    // that has run them before.
    let host = {
        let config = ganglion::config::PluginConfig {
            cache_dir: Some(root.join("cache")),
            total_instances: 64,
            ..Default::default()
        };
        let state = ganglion::state::StateStore::in_memory();
        ganglion::plugin::PluginHost::new(config, state, Arc::new(NoModel)).unwrap()
    };
    for v in ["tag-a", "tag-b"] {
        load(&host, &fixture(v)).await;
    }
    let settings = ganglion::mqtt::MqttSettings {
        client_id: "gw-reload".into(),
        ..Default::default()
    };
    let gw = RunningGateway::start_reloading(
        &url,
        settings,
        host,
        &plugins,
        &rules,
        ReloadConfig::default(),
    )
    .await;
    assert!(gw.problems.is_empty(), "{:?}", gw.problems);
    let mut events = gw.reloader.as_ref().unwrap().subscribe();
    let watcher = TestClient::connect(
        &url,
        "reload-watcher",
        &[
            "tagged/+",
            "ganglion/status/gw-reload/reload",
            "ganglion/dead-letter/#",
        ],
    )
    .await;
    let sender = TestClient::connect(&url, "reload-sender", &[]).await;

    // 20 swaps alternating the versions, 5 rule edits, 3 broken files.
    let mut steps = Vec::new();
    for i in 1..=20 {
        steps.push(Step::Swap);
        match i {
            4 | 8 | 12 | 16 | 20 => steps.push(Step::Edit),
            6 => steps.push(Step::CorruptPlugin),
            10 => steps.push(Step::BrokenRule),
            14 => steps.push(Step::WrongWorldPlugin),
            _ => {}
        }
    }
    let started = Instant::now();
    let driver_done = std::sync::Mutex::new(None::<Instant>);
    let stream = async {
        let mut sent = 0u64;
        // Paced in 10 ms ticks, for at least 10.5 s and until half a second
        // after the last reload.
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let go_on = || {
            let done = *driver_done.lock().unwrap();
            started.elapsed() < Duration::from_millis(10_500)
                || done.is_none_or(|t| t.elapsed() < Duration::from_millis(500))
        };
        while go_on() {
            tick.tick().await;
            let due = (started.elapsed().as_millis() as u64 * RATE / 1000).saturating_sub(sent);
            for _ in 0..due {
                sender
                    .publish(&format!("reload/in/d{}", sent % DEVICES), sent.to_string())
                    .await;
                sent += 1;
            }
        }
        sent
    };
    let driver = async {
        let (plugin, rule) = (plugins.join("tagger.wasm"), rules.join("tagged.toml"));
        let mut tag = "a";
        let mut edits = 0;
        let mut taken: Vec<ReloadEvent> = Vec::new();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for step in &steps {
            let expected = match step {
                Step::Swap => {
                    tag = if tag == "a" { "b" } else { "a" };
                    // Atomically, as deployment tools do.
                    let tmp = plugins.join(".tagger.wasm.new");
                    std::fs::copy(fixture(&format!("tag-{tag}")), &tmp).unwrap();
                    std::fs::rename(&tmp, &plugin).unwrap();
                    (FileKind::Plugin, ReloadAction::Replaced)
                }
                Step::Edit => {
                    edits += 1;
                    // In place, as an editor does.
                    std::fs::write(&rule, tag_rule(&format!("v{edits}"))).unwrap();
                    (FileKind::Rule, ReloadAction::Replaced)
                }
                Step::CorruptPlugin => {
                    std::fs::write(&plugin, bytes(&wat_fixture("corrupt.wasm"))).unwrap();
                    (FileKind::Plugin, ReloadAction::Refused)
                }
                Step::WrongWorldPlugin => {
                    std::fs::write(&plugin, bytes(&wat_fixture("wrong-world.wat"))).unwrap();
                    (FileKind::Plugin, ReloadAction::Refused)
                }
                Step::BrokenRule => {
                    std::fs::write(&rule, "topics = [\"reload/in/+\"\n[handler").unwrap();
                    (FileKind::Rule, ReloadAction::Refused)
                }
            };
            let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .unwrap_or_else(|_| panic!("no reload event after {step:?}"))
                .unwrap();
            assert_eq!((e.kind, e.action), expected, "after {step:?}: {e:?}");
            taken.push(e);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        *driver_done.lock().unwrap() = Some(Instant::now());
        taken
    };
    let (sent, taken) = tokio::join!(stream, driver);
    assert!(
        started.elapsed() >= Duration::from_secs(10) && sent >= RATE * 10,
        "{sent} messages in {:?}",
        started.elapsed()
    );
    assert!(
        sender.wait_until(30, |c| c.acked() >= sent).await,
        "the broker took {} of {sent}",
        sender.acked()
    );
    // Every input has an output.
    let outputs = |c: &TestClient| c.on("tagged/+");
    let all_out = watcher
        .wait_until(60, |c| {
            let seen: std::collections::HashSet<String> = outputs(c)
                .iter()
                .filter_map(|v| v["input"].as_str().map(str::to_owned))
                .collect();
            seen.len() as u64 >= sent
        })
        .await;
    let outs = outputs(&watcher);
    let mut first: BTreeMap<u64, &Json> = BTreeMap::new();
    for v in &outs {
        let seq: u64 = v["input"].as_str().unwrap().parse().unwrap();
        first.entry(seq).or_insert(v);
    }
    let lost: Vec<u64> = (0..sent).filter(|s| !first.contains_key(s)).collect();
    assert!(
        all_out && lost.is_empty(),
        "{} of {sent} inputs have no output (first: {:?})",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let duplicates = outs.len() as u64 - sent;
    println!(
        "{sent} messages, {duplicates} duplicates, {} reloads",
        taken.len()
    );

    // Per device, in order: the version switches exactly at each swap and
    // the label at each edit; only the two good versions ever serve.
    let swaps = taken
        .iter()
        .filter(|e| is(e, FileKind::Plugin, ReloadAction::Replaced))
        .count();
    assert_eq!(swaps, 20);
    for d in 0..DEVICES {
        let series: Vec<&&Json> = first
            .iter()
            .filter(|(s, _)| *s % DEVICES == d)
            .map(|(_, v)| v)
            .collect();
        let changes = |field: &str| {
            series
                .windows(2)
                .filter(|w| w[0][field] != w[1][field])
                .count()
        };
        assert!(
            series.iter().all(|v| v["tag"] == "a" || v["tag"] == "b"),
            "device d{d}: an output from something other than the two versions"
        );
        assert_eq!(changes("tag"), swaps, "device d{d}: version switches");
        assert_eq!(changes("label"), 5, "device d{d}: label switches");
        assert_eq!(series.last().unwrap()["label"], "v5");
        // State is kept across versions: the count runs on.
        let max_seen = series
            .iter()
            .filter_map(|v| v["seen"].as_u64())
            .max()
            .unwrap();
        assert!(
            max_seen >= series.len() as u64,
            "device d{d}: state reset on reload"
        );
    }
    // The broken files were reported, remotely too, and nothing was dead-lettered.
    let refused: Vec<&ReloadEvent> = taken
        .iter()
        .filter(|e| e.action == ReloadAction::Refused)
        .collect();
    assert_eq!(refused.len(), 3);
    assert!(
        watcher
            .wait_until(10, |c| {
                c.on("ganglion/status/gw-reload/reload")
                    .iter()
                    .filter(|v| v["action"] == "refused")
                    .count()
                    == 3
            })
            .await,
        "status events: {:?}",
        watcher.on("ganglion/status/gw-reload/reload")
    );
    assert!(watcher.on("ganglion/dead-letter/#").is_empty());
    let reports: HashMap<String, usize> = watcher
        .on("ganglion/status/gw-reload/reload")
        .iter()
        .fold(HashMap::new(), |mut m, v| {
            *m.entry(v["action"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
            m
        });
    assert_eq!(reports.get("replaced"), Some(&25), "{reports:?}");
    gw.stop().await;
    broker.stop();
}
