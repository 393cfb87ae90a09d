//! Scale-out through the broker: three `ganglion run` processes with one
//! configuration share the rules' messages over MQTT 5 shared subscriptions
//! on a real mosquitto; one is killed with SIGKILL halfway and started
//! again. Prints the figures for docs/scale-out.md.

use ganglion_tests::gateways::*;
use ganglion_tests::*;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// The tagger names the gateway that handled a message through its label.
fn shared_rule(label: &str) -> String {
    tagger_rule("scale/in/+", label)
}

/// One gateway folder of the group: its own state and compiled plugins,
/// the shared client id `scale` and group `scale`, instance `n`. The third
/// gets its group and number from the command line instead of the file.
fn member(broker: &str, n: usize) -> std::path::PathBuf {
    let sharing = if n == 3 {
        "protocol = \"5\"".to_owned()
    } else {
        format!("protocol = \"5\"\nshare_group = \"scale\"\ninstance = {n}")
    };
    gateway_dir_as(
        &format!("scale-gw-{n}"),
        "scale",
        broker,
        &[("tagger", fixture("tag-a"))],
        &[("share", &shared_rule(&format!("gw{n}")))],
        &sharing,
        "",
    )
}

/// Starts member `n` in `dir` (see [`member`]).
fn start_member(dir: &std::path::Path, n: usize) -> (std::process::Child, StderrLines) {
    if n == 3 {
        start_gateway_with(dir, &["--share-group", "scale", "--instance", "3"])
    } else {
        start_gateway(dir)
    }
}

/// Per input (the payload), how often it was handled, and per gateway
/// label how many outputs it published.
fn handled(r: &TestClient) -> (HashMap<String, usize>, BTreeMap<String, usize>) {
    let (mut inputs, mut by_gateway) = (HashMap::new(), BTreeMap::new());
    for v in r.on("tagged/#") {
        if let (Some(i), Some(l)) = (v["input"].as_str(), v["label"].as_str()) {
            *inputs.entry(i.to_owned()).or_insert(0) += 1;
            *by_gateway.entry(l.to_owned()).or_insert(0) += 1;
        }
    }
    (inputs, by_gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_the_stream_and_a_killed_one_loses_nothing() {
    const N: usize = 30_000;
    let broker = Mosquitto::start("scale-broker");
    let url = broker.url();
    let receiver = TestClient::connect(
        &url,
        "scale-receiver",
        &["tagged/#", "ganglion/dead-letter/#", "ganglion/status/#"],
    )
    .await;
    let dirs: Vec<_> = (1..=3).map(|n| member(&url, n)).collect();
    let mut gateways: Vec<_> = dirs
        .iter()
        .zip(1..)
        .map(|(d, n)| start_member(d, n))
        .collect();
    // Each publishes `online` on its own status topic after subscribing,
    // under the client id derived from the shared one.
    let host = ganglion::config::host_name();
    let statuses: Vec<String> = (1..=3)
        .map(|n| format!("ganglion/status/scale-{host}-{n}"))
        .collect();
    let online = |r: &TestClient, topic: &str| {
        r.received()
            .iter()
            .any(|(t, p)| t == topic && p.as_slice() == b"online")
    };
    assert!(
        receiver
            .wait_until(60, |r| statuses.iter().all(|s| online(r, s)))
            .await,
        "each gateway reports online under its own client id {statuses:?}: {:?}",
        receiver
            .received()
            .iter()
            .map(|(t, _)| t.clone())
            .collect::<Vec<_>>()
    );

    let sensor = TestClient::connect(&url, "scale-sensor", &[]).await;
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            sensor
                .publish(&format!("scale/in/d{}", i % 50), i.to_string())
                .await;
        }
        sensor
    });
    assert!(
        receiver
            .wait_until(180, |r| handled(r).0.len() >= N / 2)
            .await,
        "half the stream came through before the kill"
    );
    let (mut victim, _) = gateways.remove(1);
    victim.kill().unwrap();
    victim.wait().unwrap();
    let (at_kill, by_gateway_at_kill) = handled(&receiver);
    let restarted = start_member(&dirs[1], 2);
    gateways.insert(1, restarted);
    let complete = receiver.wait_until(240, |r| handled(r).0.len() >= N).await;
    let elapsed = started.elapsed();
    let sensor = publisher.await.unwrap();
    let (inputs, by_gateway) = handled(&receiver);
    let lost: Vec<usize> = (0..N)
        .filter(|i| !inputs.contains_key(&i.to_string()))
        .collect();
    let duplicates: usize = inputs.values().map(|c| c - 1).sum();
    let dead_letters = receiver.on("ganglion/dead-letter/#").len();
    println!(
        "three gateways, one share group: sent {N} QoS 1 ({} acknowledged by the broker), {} handled at the kill of gw2 (per gateway {by_gateway_at_kill:?}), lost {}, duplicates {duplicates}, dead letters {dead_letters}, outputs per gateway {by_gateway:?}, {:.1} s",
        sensor.acked(),
        at_kill.len(),
        lost.len(),
        elapsed.as_secs_f64()
    );
    let logs: Vec<String> = gateways.iter().map(|(_, l)| l.text()).collect();
    for (mut g, _) in gateways {
        let _ = g.kill();
        let _ = g.wait();
    }
    assert!(
        complete && lost.is_empty(),
        "lost {} messages, first {:?}: {logs:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(dead_letters, 0, "{logs:?}");
    assert!(
        at_kill.len() < N,
        "the kill came before the end of the stream"
    );
    // The broker spread the stream: every gateway handled a share of it
    // before the kill (a plain subscription would have each handle all).
    for n in 1..=3 {
        let share = by_gateway_at_kill
            .get(&format!("gw{n}"))
            .copied()
            .unwrap_or(0);
        assert!(
            share > 0 && share < at_kill.len(),
            "gw{n} handled {share} of {} before the kill",
            at_kill.len()
        );
    }
}

/// Runs `ganglion run` in `dir`, which must exit with an error; its stderr.
fn refused_run(dir: &std::path::Path) -> String {
    let out = std::process::Command::new(ganglion_binary())
        .arg("--config")
        .arg(dir.join("ganglion.toml"))
        .args(["run", "--quiet", "--duration", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    err
}

/// The configuration mistakes of a share group are refused before anything
/// runs, each with a message that says what to change.
#[tokio::test]
async fn a_share_group_over_mqtt_3_or_without_a_broker_is_refused_clearly() {
    let broker = Mosquitto::start("scale-refusals");
    let v3 = gateway_dir_as(
        "scale-v3",
        "scale-v3",
        &broker.url(),
        &[("tagger", fixture("tag-a"))],
        &[("share", &shared_rule("x"))],
        "share_group = \"scale\"",
        "",
    );
    let err = refused_run(&v3);
    assert!(
        err.contains("share_group") && err.contains("protocol = \"5\""),
        "{err}"
    );

    let windowed = r#"
topics = ["scale/w/+"]
[[preprocess]]
plugin = "clean-readings"
[window]
count = 5
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temp", above = 50.0 }] }
[allow]
publish = ["alerts/{device}"]
"#;
    // A gateway refuses the windowed rule when loading it, naming the fix.
    let split = gateway_dir_as(
        "scale-windowed",
        "scale-windowed",
        &broker.url(),
        &[
            ("clean-readings", example("clean-readings")),
            ("threshold-alert", example("threshold-alert")),
        ],
        &[("windowed", windowed)],
        "protocol = \"5\"\nshare_group = \"scale\"",
        "",
    );
    let err = refused_run(&split);
    assert!(
        err.contains("shared = false") && err.contains("no rule is ready"),
        "{err}"
    );

    let rule = ganglion::rules::Rule::parse(windowed, "windowed", None).unwrap();
    let err = rule.check_sharing(Some("scale")).unwrap_err();
    assert!(
        err.contains("shared = false") && err.contains("windowed"),
        "{err}"
    );
    let opted_out =
        ganglion::rules::Rule::parse(&format!("shared = false\n{windowed}"), "windowed", None)
            .unwrap();
    assert!(opted_out.check_sharing(Some("scale")).is_ok());
    assert_eq!(opted_out.subscriptions(Some("scale")), ["scale/w/+"]);
    assert_eq!(
        rule.subscriptions(Some("scale")),
        ["$share/scale/scale/w/+"]
    );
    assert_eq!(rule.subscriptions(None), ["scale/w/+"]);
    let prefixed = ganglion::rules::Rule::parse(
        "topics = [\"$share/g/scale/+\"]\n[handler]\nplugin = \"tagger\"\n",
        "prefixed",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(prefixed.contains("share_group"), "{prefixed}");
}
