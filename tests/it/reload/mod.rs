//! Hot reload: plugins and rules replaced, edited, removed and broken while
//! the gateway runs, arriving the ways files really arrive, and a steady
//! QoS 1 stream through a real broker that loses nothing meanwhile.
//!
//! The `tag-a` and `tag-b` fixtures are two versions of one rule plugin that
//! name themselves in their output; tests copy them to `tagger.wasm`.

use ganglion::config::ReloadConfig;
use ganglion::gateway::{Gateway, GatewayConfig};
use ganglion::llm::NoModel;
use ganglion::reload::{FileKind, ReloadAction, ReloadEvent, ReloadHandle, Reloader};
use ganglion::transport::{AckToken, Delivery, RecordingPublisher};
use ganglion::types::Message;
use ganglion_tests::*;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

mod stream;

fn tag_rule(label: &str) -> String {
    tagger_rule("reload/in/+", label)
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// How long a test waits for something that should happen within
/// milliseconds: generous, because the suite runs on two busy cores and a
/// swap may include a compile.
const PATIENCE: Duration = Duration::from_secs(30);

/// A gateway over a recording publisher whose folders are watched.
struct Harness {
    plugins: PathBuf,
    rules: PathBuf,
    publisher: Arc<RecordingPublisher>,
    gateway: Arc<Gateway>,
    events: broadcast::Receiver<ReloadEvent>,
    _watch: ReloadHandle,
    seq: AtomicU64,
}

impl Harness {
    /// `tagger.wasm` is `tag-a`; `tagged.toml` is [`tag_rule`] with label `v0`.
    async fn start() -> Harness {
        Self::with(
            &[("tagger", fixture("tag-a"))],
            &[("tagged", tag_rule("v0"))],
        )
        .await
    }

    /// Plugins (name, component) and rules (name, text).
    async fn with(plugin_files: &[(&str, PathBuf)], rule_files: &[(&str, String)]) -> Harness {
        let root = scratch("reload");
        let (plugins, rules) = (root.join("plugins"), root.join("rules"));
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(&rules).unwrap();
        for (name, from) in plugin_files {
            std::fs::copy(from, plugins.join(format!("{name}.wasm"))).unwrap();
        }
        for (name, text) in rule_files {
            std::fs::write(rules.join(format!("{name}.toml")), text).unwrap();
        }
        let reloader = Arc::new(Reloader::new(host(), &plugins, &rules, Arc::new(NoModel)));
        let (pipelines, problems) = reloader.load_all().await;
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(pipelines.len(), rule_files.len());
        let publisher = Arc::new(RecordingPublisher::default());
        let gateway = Arc::new(Gateway::start(
            pipelines,
            publisher.clone(),
            GatewayConfig::default(),
        ));
        let events = reloader.subscribe();
        let watch = reloader.watch(gateway.clone(), &ReloadConfig::default());
        Harness {
            plugins,
            rules,
            publisher,
            gateway,
            events,
            _watch: watch,
            seq: AtomicU64::new(0),
        }
    }

    /// Sends one message for `device` and returns the output it produced,
    /// or `None` when none came within `PATIENCE`.
    async fn send(&self, device: &str) -> Option<Json> {
        self.send_within(device, PATIENCE).await
    }

    async fn send_within(&self, device: &str, wait: Duration) -> Option<Json> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed).to_string();
        self.gateway
            .dispatch(Delivery {
                message: Message {
                    topic: format!("reload/in/{device}"),
                    payload: seq.clone().into_bytes(),
                    timestamp: 1,
                },
                token: AckToken::None,
            })
            .await;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let found = self.publisher.published().into_iter().find_map(|o| {
                let v: Json = serde_json::from_slice(&o.payload).ok()?;
                (v["input"] == seq.as_str()).then_some(v)
            });
            if found.is_some() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// The tag and label of the version serving now.
    async fn serving(&self) -> (String, String) {
        let v = self.send("probe").await.expect("an output");
        (
            v["tag"].as_str().unwrap().to_owned(),
            v["label"].as_str().unwrap().to_owned(),
        )
    }

    /// Waits for the next reload event (`PATIENCE` at most).
    async fn next(&mut self) -> ReloadEvent {
        tokio::time::timeout(PATIENCE, self.events.recv())
            .await
            .expect("a reload event in time")
            .expect("event channel open")
    }

    /// Copies version `tag` of the tagger in and checks that it replaced
    /// the old one and serves.
    async fn swap_in(&mut self, tag: &str) {
        std::fs::copy(fixture(&format!("tag-{tag}")), self.plugin()).unwrap();
        self.expect(FileKind::Plugin, ReloadAction::Replaced).await;
        assert_eq!(self.serving().await.0, tag);
    }

    /// The next reload event, which must be `kind` / `action`.
    async fn expect(&mut self, kind: FileKind, action: ReloadAction) -> ReloadEvent {
        let e = self.next().await;
        assert!(
            is(&e, kind, action),
            "expected {kind:?} {action:?}, got {e:?}"
        );
        e
    }

    /// Writes `content` to `path` and checks that it is refused with an
    /// error naming the file and `cause`.
    async fn refused(
        &mut self,
        case: &str,
        path: &Path,
        content: &[u8],
        kind: FileKind,
        cause: &str,
    ) {
        std::fs::write(path, content).unwrap();
        let e = self.next().await;
        assert!(is(&e, kind, ReloadAction::Refused), "{case}: {e:?}");
        let error = e.error.unwrap();
        let file = path.file_name().unwrap().to_string_lossy();
        assert!(
            error.contains(file.as_ref()),
            "{case}: names the file: {error}"
        );
        assert!(error.contains(cause), "{case}: names the cause: {error}");
    }

    /// Waits for the next reload event, `secs` at most.
    async fn next_within(&mut self, secs: u64) -> ReloadEvent {
        tokio::time::timeout(Duration::from_secs(secs), self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("a reload event within {secs} s"))
            .expect("event channel open")
    }

    /// Asserts that no reload event comes within `ms`.
    async fn quiet(&mut self, ms: u64) {
        if let Ok(e) = tokio::time::timeout(Duration::from_millis(ms), self.events.recv()).await {
            panic!("unexpected reload event: {e:?}");
        }
    }

    fn plugin(&self) -> PathBuf {
        self.plugins.join("tagger.wasm")
    }

    fn rule(&self) -> PathBuf {
        self.rules.join("tagged.toml")
    }
}

fn is(e: &ReloadEvent, kind: FileKind, action: ReloadAction) -> bool {
    e.kind == kind && e.action == action
}

#[tokio::test]
async fn a_plugin_written_in_chunks_is_loaded_once_complete() {
    let mut h = Harness::start().await;
    assert_eq!(h.serving().await.0, "a");
    let new = bytes(&fixture("tag-b"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(h.plugin()).unwrap();
        for chunk in new.chunks(new.len() / 8 + 1) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let e = h.expect(FileKind::Plugin, ReloadAction::Replaced).await;
    assert_eq!(e.rules, ["tagged"]);
    assert_eq!(h.serving().await.0, "b");
    h.quiet(200).await;
}

#[tokio::test]
async fn a_slow_writer_never_gets_a_half_written_plugin_served() {
    let mut h = Harness::start().await;
    let new = bytes(&fixture("tag-b"));
    let path = h.plugin();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(path).unwrap();
        // Pauses far longer than the debounce time: the reloader sees
        // stable, incomplete files.
        for chunk in new.chunks(new.len() / 4 + 1) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    loop {
        let e = h.next().await;
        assert_eq!(e.kind, FileKind::Plugin);
        match e.action {
            ReloadAction::Refused => {
                // Meanwhile the complete old version serves.
                assert_eq!(h.serving().await.0, "a");
            }
            ReloadAction::Replaced => break,
            other => panic!("unexpected {other:?}: {e:?}"),
        }
    }
    writer.join().unwrap();
    assert_eq!(h.serving().await.0, "b");
}

#[tokio::test]
async fn a_plugin_copied_in_replaces_the_old_one() {
    let mut h = Harness::start().await;
    h.swap_in("b").await;
    // The same content again is no change.
    std::fs::copy(fixture("tag-b"), h.plugin()).unwrap();
    h.quiet(300).await;
}

#[tokio::test]
async fn a_plugin_moved_in_by_rename_replaces_the_old_one() {
    let mut h = Harness::start().await;
    // Written under a hidden name first, as tools that write atomically do.
    let hidden = h.plugins.join(".tagger.wasm.part");
    std::fs::copy(fixture("tag-b"), &hidden).unwrap();
    h.quiet(200).await;
    std::fs::rename(&hidden, h.plugin()).unwrap();
    h.expect(FileKind::Plugin, ReloadAction::Replaced).await;
    assert_eq!(h.serving().await.0, "b");
    // And from another folder.
    let outside = h.plugins.parent().unwrap().join("tag-a.wasm");
    std::fs::copy(fixture("tag-a"), &outside).unwrap();
    std::fs::rename(&outside, h.plugin()).unwrap();
    h.expect(FileKind::Plugin, ReloadAction::Replaced).await;
    assert_eq!(h.serving().await.0, "a");
}

#[tokio::test]
async fn a_new_rule_subscribes_and_a_deleted_rule_drains_and_unsubscribes() {
    let mut h = Harness::start().await;
    let extra = h.rules.join("extra.toml");
    std::fs::write(
        &extra,
        tag_rule("extra").replace("reload/in/+", "reload/extra/+"),
    )
    .unwrap();
    let e = h.expect(FileKind::Rule, ReloadAction::Loaded).await;
    assert_eq!(e.name, "extra");
    assert_eq!(h.publisher.filters(), ["reload/extra/+"]);
    assert!(h.gateway.stats().iter().any(|(r, _)| r == "extra"));
    std::fs::remove_file(&extra).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Removed).await;
    assert!(h.publisher.filters().is_empty());
    assert!(!h.gateway.stats().iter().any(|(r, _)| r == "extra"));
    // The other rule is untouched.
    assert_eq!(h.serving().await, ("a".into(), "v0".into()));
    // Deleting the last rule: its messages are acknowledged with no output.
    std::fs::remove_file(h.rule()).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Removed).await;
    let acks = h.publisher.acks();
    assert!(
        h.send_within("d", Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(h.publisher.acks(), acks + 1);
}

#[tokio::test]
async fn renaming_a_rule_file_with_an_explicit_name_keeps_the_rule() {
    let mut h = Harness::with(
        &[("tagger", fixture("tag-a"))],
        &[("tagged", format!("name = \"kept\"\n{}", tag_rule("v0")))],
    )
    .await;
    assert_eq!(h.serving().await, ("a".into(), "v0".into()));
    std::fs::rename(h.rule(), h.rules.join("renamed.toml")).unwrap();
    let e = h.next().await;
    assert!(is(&e, FileKind::Rule, ReloadAction::Loaded), "{e:?}");
    assert_eq!(e.name, "kept");
    h.quiet(1000).await;
    assert!(h.gateway.stats().iter().any(|(r, _)| r == "kept"));
    assert_eq!(h.serving().await, ("a".into(), "v0".into()));
}

#[tokio::test]
async fn a_deleted_plugin_keeps_serving_the_rules_that_use_it() {
    let mut h = Harness::start().await;
    std::fs::remove_file(h.plugin()).unwrap();
    let e = h.expect(FileKind::Plugin, ReloadAction::Removed).await;
    assert_eq!(
        e.rules,
        ["tagged"],
        "the event names the rules still using it"
    );
    assert_eq!(h.serving().await.0, "a");
    // A rule edit now cannot bind it, and the old rule version runs on.
    std::fs::write(h.rule(), tag_rule("v1")).unwrap();
    let e = h.expect(FileKind::Rule, ReloadAction::Refused).await;
    assert!(
        e.error
            .as_deref()
            .unwrap()
            .contains("`tagger` is not loaded"),
        "{e:?}"
    );
    assert_eq!(h.serving().await, ("a".into(), "v0".into()));
    // The plugin coming back brings the waiting rule edit with it.
    std::fs::copy(fixture("tag-b"), h.plugin()).unwrap();
    h.expect(FileKind::Plugin, ReloadAction::Loaded).await;
    h.expect(FileKind::Rule, ReloadAction::Replaced).await;
    assert_eq!(h.serving().await, ("b".into(), "v1".into()));
}

#[tokio::test]
async fn a_whole_folder_replaced_is_loaded_and_watched_again() {
    let mut h = Harness::start().await;
    let staged = h.rules.with_file_name("rules.new");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(staged.join("tagged.toml"), tag_rule("v1")).unwrap();
    std::fs::rename(&h.rules, h.rules.with_file_name("rules.old")).unwrap();
    std::fs::rename(&staged, &h.rules).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Replaced).await;
    assert_eq!(h.serving().await.1, "v1");
    // The new folder is watched: an edit in it is taken.
    std::fs::write(h.rule(), tag_rule("v2")).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Replaced).await;
    assert_eq!(h.serving().await.1, "v2");
    // The same for the plugins folder.
    let staged = h.plugins.with_file_name("plugins.new");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::copy(fixture("tag-b"), staged.join("tagger.wasm")).unwrap();
    std::fs::rename(&h.plugins, h.plugins.with_file_name("plugins.old")).unwrap();
    std::fs::rename(&staged, &h.plugins).unwrap();
    h.expect(FileKind::Plugin, ReloadAction::Replaced).await;
    assert_eq!(h.serving().await.0, "b");
    h.swap_in("a").await;
}

#[tokio::test]
async fn editors_temporary_and_swap_files_are_ignored() {
    let mut h = Harness::start().await;
    let junk = [
        ".tagged.toml.swp",
        ".tagged.toml.swx",
        "tagged.toml~",
        "4913",
        ".#tagged.toml",
        "tagged.toml.tmp",
        "#tagged.toml#",
    ];
    for name in junk {
        std::fs::write(h.rules.join(name), "not a rule [").unwrap();
    }
    std::fs::write(h.plugins.join(".tagger.wasm.swp"), "junk").unwrap();
    std::fs::write(h.plugins.join("tagger.wasm~"), "junk").unwrap();
    h.quiet(400).await;
    // A vim-style save: the original renamed to a backup, the new text
    // written under the original name.
    std::fs::rename(h.rule(), h.rules.join("tagged.toml~")).unwrap();
    std::fs::write(h.rule(), tag_rule("v1")).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Replaced).await;
    assert_eq!(h.serving().await.1, "v1");
    h.quiet(300).await;
}

#[tokio::test]
async fn broken_plugins_leave_the_old_version_serving() {
    let mut h = Harness::start().await;
    let wat = |name: &str| bytes(&wat_fixture(name));
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "corrupt",
            bytes(&wat_fixture("corrupt.wasm")),
            "not a valid WebAssembly component",
        ),
        (
            "wrong world",
            wat("wrong-world.wat"),
            "exports none of the stage interfaces",
        ),
        (
            "core module",
            wat("core-module.wat"),
            "core WebAssembly module, not a component",
        ),
        ("traps on start", wat("start-trap.wat"), "trap"),
        (
            "wrong stage",
            bytes(&example("clean-readings")),
            "cannot serve rule `tagged`",
        ),
    ];
    for (case, content, cause) in cases {
        let path = h.plugin();
        h.refused(case, &path, &content, FileKind::Plugin, cause)
            .await;
        assert_eq!(h.serving().await.0, "a", "{case}: the old version serves");
    }
    h.swap_in("b").await;
}

#[tokio::test]
async fn broken_rules_leave_the_old_version_serving() {
    let mut h = Harness::start().await;
    let cases = [
        (
            "parse error",
            "topics = [\"reload/in/+\"\n[handler\n".to_owned(),
            "line 2",
        ),
        (
            "unknown field",
            tag_rule("v1").replace("format = \"raw\"", "fromat = \"raw\""),
            "unknown field `fromat`",
        ),
        (
            "unknown plugin",
            tag_rule("v1").replace("\"tagger\"", "\"no-such-plugin\""),
            "`no-such-plugin` is not loaded",
        ),
        (
            "bad topic filter",
            tag_rule("v1").replace("reload/in/+", "reload/#/in"),
            "topic filter `reload/#/in`",
        ),
    ];
    for (case, text, cause) in cases {
        let path = h.rule();
        h.refused(case, &path, text.as_bytes(), FileKind::Rule, cause)
            .await;
        assert_eq!(h.serving().await, ("a".into(), "v0".into()), "{case}");
    }
    std::fs::write(h.rule(), tag_rule("v1")).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Replaced).await;
    assert_eq!(h.serving().await, ("a".into(), "v1".into()));
}

#[tokio::test]
async fn plugin_state_survives_a_reload_unless_the_rule_resets_it() {
    let mut h = Harness::start().await;
    for n in 1..=3 {
        assert_eq!(h.send("d").await.unwrap()["seen"], n);
    }
    std::fs::copy(fixture("tag-b"), h.plugin()).unwrap();
    h.expect(FileKind::Plugin, ReloadAction::Replaced).await;
    let v = h.send("d").await.unwrap();
    assert_eq!(
        (v["tag"].as_str(), v["seen"].as_i64()),
        (Some("b"), Some(4))
    );
    let reset = tag_rule("v1").replace(
        "plugin = \"tagger\"",
        "plugin = \"tagger\"\nreset_state_on_reload = true",
    );
    std::fs::write(h.rule(), reset).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Replaced).await;
    // A rule edit is not a new plugin version: state stays.
    assert_eq!(h.send("d").await.unwrap()["seen"], 5);
    std::fs::copy(fixture("tag-a"), h.plugin()).unwrap();
    h.expect(FileKind::Plugin, ReloadAction::Replaced).await;
    let v = h.send("d").await.unwrap();
    assert_eq!(
        (v["tag"].as_str(), v["seen"].as_i64()),
        (Some("a"), Some(1))
    );
}

#[tokio::test]
async fn a_python_plugin_swaps_in_for_a_rust_one_and_back() {
    let py = python_fixture();
    let mut h = Harness::start().await;
    let rust = h.send("d").await.unwrap();
    assert_eq!(rust["seen"], 1);
    std::fs::copy(py, h.plugin()).unwrap();
    // Compiled without a cache: an 18 MB component takes seconds.
    let e = h.next_within(120).await;
    assert!(is(&e, FileKind::Plugin, ReloadAction::Replaced), "{e:?}");
    let python = h.send("d").await.unwrap();
    assert_eq!(python["tag"], "py");
    // The same output as the Rust version's, and the same state.
    assert_eq!(python["seen"], 2);
    assert_eq!(python["label"], rust["label"]);
    let keys = |v: &Json| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&python), keys(&rust));
    std::fs::copy(fixture("tag-a"), h.plugin()).unwrap();
    h.expect(FileKind::Plugin, ReloadAction::Replaced).await;
    let back = h.send("d").await.unwrap();
    assert_eq!(
        (back["tag"].as_str(), back["seen"].as_i64()),
        (Some("a"), Some(3))
    );
}

fn window_rule(count: usize, post: &str) -> String {
    format!(
        r#"
topics = ["w/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
config = {{ device_from_topic = 1 }}
[window]
count = {count}
{post}
"#
    )
}

const ALERT_POST: &str = r#"[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 50.0, level = "critical" }] }"#;

#[tokio::test]
async fn readings_waiting_in_a_window_carry_over_to_the_new_rule_version() {
    let mut h = Harness::with(
        &[
            ("clean-readings", example("clean-readings")),
            ("threshold-alert", example("threshold-alert")),
            ("tagger", fixture("tag-a")),
        ],
        &[("win", window_rule(3, ALERT_POST))],
    )
    .await;
    let reading = |v: f64| Delivery {
        message: Message {
            topic: "w/m1/telemetry".into(),
            payload: format!(r#"{{"metric":"temperature","value":{v}}}"#).into_bytes(),
            timestamp: 1,
        },
        token: AckToken::None,
    };
    h.gateway.dispatch(reading(60.0)).await;
    h.gateway.dispatch(reading(61.0)).await;
    // A new version of the rule (window of 4) while two readings wait.
    std::fs::write(h.rules.join("win.toml"), window_rule(4, ALERT_POST)).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Replaced).await;
    h.gateway.dispatch(reading(62.0)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h.publisher.published().is_empty(),
        "3 of 4 readings: no alert yet"
    );
    h.gateway.dispatch(reading(63.0)).await;
    let alert = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(o) = h.publisher.published().pop() {
                return String::from_utf8_lossy(&o.payload).into_owned();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("an alert");
    assert!(alert.contains("(4 readings)"), "{alert}");

    // A change to a handler rule: what waits is dead-lettered, not dropped.
    h.gateway.dispatch(reading(64.0)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let handler = tag_rule("h").replace("reload/in/+", "w/+/telemetry");
    std::fs::write(h.rules.join("win.toml"), handler).unwrap();
    h.expect(FileKind::Rule, ReloadAction::Replaced).await;
    let dead = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(o) = h
                .publisher
                .published()
                .into_iter()
                .find(|o| o.topic == "ganglion/dead-letter/win")
            {
                return serde_json::from_slice::<Json>(&o.payload).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a dead letter for the waiting reading");
    assert_eq!(dead["kind"], "rule-changed");
    assert_eq!(dead["stage"], "window");
}

#[tokio::test]
async fn extra_rule_folders_are_loaded_and_watched_with_unique_names() {
    let root = scratch("reload-extra");
    let (plugins, rules, pack) = (root.join("plugins"), root.join("rules"), root.join("pack"));
    for d in [&plugins, &rules, &pack] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::copy(fixture("tag-a"), plugins.join("tagger.wasm")).unwrap();
    std::fs::write(rules.join("tagged.toml"), tag_rule("v0")).unwrap();
    std::fs::write(
        pack.join("packed.toml"),
        tag_rule("p").replace("reload/in/+", "reload/pack/+"),
    )
    .unwrap();
    let reloader = Arc::new(
        Reloader::new(host(), &plugins, &rules, Arc::new(NoModel))
            .with_extra_rule_dirs(std::slice::from_ref(&pack)),
    );
    let (pipelines, problems) = reloader.load_all().await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(pipelines.len(), 2);
    let gateway = Arc::new(Gateway::start(
        pipelines,
        Arc::new(RecordingPublisher::default()),
        GatewayConfig::default(),
    ));
    let mut events = reloader.subscribe();
    let _watch = reloader.watch(gateway.clone(), &ReloadConfig::default());
    let next = async |events: &mut broadcast::Receiver<ReloadEvent>| {
        tokio::time::timeout(PATIENCE, events.recv())
            .await
            .unwrap()
            .unwrap()
    };
    // A rule added to the extra folder is taken.
    std::fs::write(
        pack.join("more.toml"),
        tag_rule("m").replace("reload/in/+", "reload/more/+"),
    )
    .unwrap();
    let e = next(&mut events).await;
    assert!(is(&e, FileKind::Rule, ReloadAction::Loaded), "{e:?}");
    assert_eq!(e.name, "more");
    // A name another folder already uses is refused.
    std::fs::write(pack.join("tagged.toml"), tag_rule("dup")).unwrap();
    let e = next(&mut events).await;
    assert!(is(&e, FileKind::Rule, ReloadAction::Refused), "{e:?}");
    assert!(e.error.unwrap().contains("already defines rule `tagged`"));
    let mut names: Vec<String> = gateway.stats().into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, ["more", "packed", "tagged"]);
}
