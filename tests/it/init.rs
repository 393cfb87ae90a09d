//! `ganglion init`: a gateway folder outside the repository that loads from
//! any working directory, and a non-empty folder is refused; the gateway run
//! from such a folder with JSON logs, whose lines about a message carry
//! its rule, topic, device and plugin versions.

use ganglion_tests::*;

#[test]
fn init_scaffolds_a_gateway_folder_that_checks_from_elsewhere_and_refuses_a_non_empty_one() {
    let (plugins, _) = built();
    let scratch = scratch("init");
    let dir = scratch.join("gateway");
    let out = std::process::Command::new(ganglion_binary())
        .current_dir(&scratch)
        .env_remove("GANGLION_CONFIG")
        .args(["init", "gateway", "--plugins"])
        .arg(plugins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ganglion.toml",
        "README.md",
        "rules/machine-overheat.toml",
        "plugins/clean-readings.wasm",
        "plugins/threshold-alert.wasm",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing: {stdout}");
    }
    // Its paths are relative to the file: loaded from elsewhere, they point
    // into the folder.
    let config = ganglion::config::GanglionConfig::load(&dir.join("ganglion.toml")).unwrap();
    assert_eq!(config.rules.dir, dir.join("rules"));
    assert_eq!(config.plugins.dir, dir.join("plugins"));
    // A copied plugin loads under the limits of the folder's config, run
    // from another working directory.
    let check = std::process::Command::new(ganglion_binary())
        .current_dir(std::env::temp_dir())
        .arg("--config")
        .arg(dir.join("ganglion.toml"))
        .arg("check")
        .arg(dir.join("plugins/clean-readings.wasm"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && text.contains(": ok"), "{text}");
    // A second init into the same folder touches nothing.
    let again = std::process::Command::new(ganglion_binary())
        .current_dir(&scratch)
        .args(["init", "gateway"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("not empty"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_rule_topic_device_and_plugin_versions_of_a_message() {
    let (plugins, _) = built();
    let dir = scratch("init-json-logs").join("gateway");
    let made = std::process::Command::new(ganglion_binary())
        .args(["init", "--plugins"])
        .arg(plugins)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(made.status.success());
    let port = free_port();
    let config = dir.join("ganglion.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("127.0.0.1:1883", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let mut child = std::process::Command::new(ganglion_binary())
        .current_dir(std::env::temp_dir())
        .env_remove("RUST_LOG")
        .arg("--config")
        .arg(&config)
        .args(["--log-format", "json", "run", "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    assert!(
        stderr.wait_for("rule ready", std::time::Duration::from_secs(60)),
        "{}",
        stderr.text()
    );
    let sensor = TestClient::connect(&format!("mqtt://127.0.0.1:{port}"), "json-sensor", &[]).await;
    // Not JSON: dead-lettered, and the dead letter is logged (a warning)
    // while the gateway handles the message. The gateway may subscribe
    // just after the sensor connects: publish until it shows.
    let mut seen = false;
    for _ in 0..60 {
        sensor.publish("factory/m1/telemetry", "not json").await;
        if stderr.wait_for("dead letter", std::time::Duration::from_millis(500)) {
            seen = true;
            break;
        }
    }
    // A device id over `max_device_bytes` (128) is dead-lettered after the
    // preprocess stage has named the device: the span has it.
    let long = "m".repeat(200);
    let mut refused = false;
    if seen {
        for _ in 0..20 {
            sensor
                .publish(
                    &format!("factory/{long}/telemetry"),
                    r#"{"metric":"temperature","value":20}"#,
                )
                .await;
            if stderr.wait_for("bad-device", std::time::Duration::from_millis(500)) {
                refused = true;
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = stderr.text();
    assert!(seen && refused, "{text}");
    let json_line = |needle: &str| -> serde_json::Value {
        text.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("no JSON line with {needle}: {text}"))
    };
    let bad_device = json_line("bad-device");
    assert_eq!(bad_device["span"]["device"], long.as_str(), "{bad_device}");
    let line = json_line("bad-payload");
    assert!(line["span"].get("device").is_none(), "{line}");
    let span = &line["span"];
    assert_eq!(span["name"], "message", "{line}");
    assert_eq!(span["rule"], "machine-overheat", "{line}");
    assert_eq!(span["topic"], "factory/m1/telemetry", "{line}");
    let versions = span["plugins"].as_str().unwrap_or_default();
    assert!(
        versions.starts_with("clean-readings@") && versions.contains(",threshold-alert@"),
        "{line}"
    );
    assert_eq!(line["level"], "WARN", "{line}");
}
