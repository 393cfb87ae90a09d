//! The HTTP admin endpoint of `ganglion run`: the real binary against a
//! real mosquitto, scraped over HTTP while messages flow: counters and
//! dead letters by kind in `/metrics`, `/rules`, a rule test that
//! answers what the live message then does, disabling a rule,
//! readiness following the broker, the bearer token, and the page's
//! escaping.

use ganglion_tests::*;
use serde_json::Value as Json;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HOT_RULE: &str = r#"
topics = ["t/+/telemetry", "t/<script>alert(1)</script>/x"]
[[preprocess]]
plugin = "clean-readings"
config = { device_from_topic = 1 }
[postprocess]
plugin = "threshold-alert"
config = { thresholds = [{ metric = "temperature", above = 50.0, level = "critical" }] }
"#;

/// One HTTP/1.1 request without a body on its own connection: (status, body).
fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    request(port, method, path, token, "")
}

/// One HTTP/1.1 request with a JSON body on its own connection: (status, body).
fn request(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("admin port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // axum sends small bodies whole, larger ones chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// The value of the sample `series` (name with labels, as written) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The value of `family` for the hot rule's preprocessor (any version).
fn preprocessor_sample(text: &str, family: &str) -> Option<f64> {
    let series = format!(r#"{family}{{rule="hot",plugin="clean-readings",stage="preprocess""#);
    text.lines()
        .find(|l| l.starts_with(&series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> Option<String>) {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while Instant::now() < until {
        match f() {
            None => return,
            Some(why) => last = Some(why),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not happen in {secs} s: {last:?}");
}

struct Gateway {
    child: Child,
    stderr: StderrLines,
    port: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, admin: &str) -> PathBuf {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("hot.toml"), HOT_RULE).unwrap();
    let config = dir.join("ganglion.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[plugins]
dir = "{plugins}"
cache_dir = "{dir}/compiled"

[state]
path = "{dir}/state.redb"

[rules]
dir = "{dir}/rules"

[mqtt]
client_id = "ganglion-admin-{id}"

[audit]
enabled = false

[runtime]
drain_timeout_ms = 60000

[admin]
sample_ms = 200
{admin}
"#,
            plugins = built().0.display(),
            dir = dir.display(),
            id = free_port(),
        ),
    )
    .unwrap();
    config
}

fn start(dir: &Path, broker: &str, admin: &str) -> Gateway {
    let port = free_port();
    let config = write_config(dir, &format!("listen = \"127.0.0.1:{port}\"\n{admin}"));
    let mut child = Command::new(ganglion_binary())
        .current_dir(dir)
        .arg("--config")
        .arg(&config)
        .args(["run", "--broker", broker, "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    assert!(
        stderr.wait_for("admin endpoint serving", Duration::from_secs(120)),
        "the admin endpoint did not start: {}",
        stderr.text()
    );
    Gateway {
        child,
        stderr,
        port,
    }
}

/// Counters move as messages flow, a bad payload shows as a dead letter of
/// its kind, `/rules` tells the rule's plugins and counters, a disabled
/// rule takes no message (counted as skipped) until enabled, and `/ready`
/// turns 503 when the broker goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_rules_disable_and_readiness_over_a_real_broker() {
    built();
    let mut broker = Mosquitto::start("admin-broker");
    let dir = scratch("admin-metrics");
    let gw = start(&dir, &broker.url(), "");
    let port = gw.port;
    wait_for("/ready 200", 30, || {
        let (status, body) = http(port, "GET", "/ready", None);
        (status != 200).then(|| format!("{status} {body}"))
    });
    let sensor =
        TestClient::connect(&broker.url(), &format!("admin-sensor-{}", free_port()), &[]).await;
    sensor
        .publish("t/m1/telemetry", r#"{"metric":"temperature","value":20}"#)
        .await;
    sensor
        .publish("t/m1/telemetry", r#"{"metric":"temperature","value":75.5}"#)
        .await;
    sensor
        .publish("t/m2/telemetry", "{\"metric\": \"temp")
        .await;

    let mut scrape = String::new();
    wait_for("counters in /metrics", 30, || {
        scrape = http(port, "GET", "/metrics", None).1;
        let messages = sample(&scrape, r#"ganglion_rule_messages_total{rule="hot"}"#);
        let published = sample(&scrape, r#"ganglion_rule_published_total{rule="hot"}"#);
        let bad = sample(
            &scrape,
            r#"ganglion_rule_dead_letters_by_kind_total{rule="hot",kind="bad-payload"}"#,
        );
        (messages < Some(3.0) || published < Some(1.0) || bad != Some(1.0))
            .then(|| format!("{messages:?} {published:?} {bad:?}"))
    });
    assert!(
        scrape.contains("# TYPE ganglion_rule_messages_total counter"),
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            r#"ganglion_stage_duration_seconds_count{rule="hot",stage="end-to-end"}"#
        ),
        Some(3.0),
        "{scrape}"
    );
    assert!(
        sample(
            &scrape,
            r#"ganglion_stage_duration_seconds_count{rule="hot",stage="preprocess"}"#
        ) >= Some(2.0),
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "ganglion_mqtt_connected"),
        Some(1.0),
        "{scrape}"
    );
    // Every alert was acknowledged before its message: nothing waits.
    assert_eq!(
        sample(&scrape, "ganglion_mqtt_outbox"),
        Some(0.0),
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "ganglion_mqtt_in_flight"),
        Some(0.0),
        "{scrape}"
    );
    assert!(
        preprocessor_sample(&scrape, "ganglion_plugin_memory_bytes") > Some(0.0),
        "an idle instance holds its memory: {scrape}"
    );
    assert_eq!(
        sample(&scrape, r#"ganglion_rule_enabled{rule="hot"}"#),
        Some(1.0)
    );
    assert!(
        scrape.contains(r#"ganglion_plugin_instances_created_total{rule="hot",plugin="clean-readings",stage="preprocess""#),
        "{scrape}"
    );

    assert_eq!(
        preprocessor_sample(&scrape, "ganglion_plugin_calls_total"),
        Some(2.0),
        "one preprocess call per good message: {scrape}"
    );
    let (status, body) = http(port, "GET", "/rules", None);
    assert_eq!(status, 200, "{body}");
    let rules: Json = serde_json::from_str(&body).unwrap();
    let hot = &rules["rules"][0];
    assert_eq!(hot["name"], "hot", "{body}");
    assert_eq!(hot["enabled"], true);
    assert_eq!(hot["plugins"][0]["name"], "clean-readings", "{body}");
    assert_eq!(hot["plugins"][1]["name"], "threshold-alert", "{body}");
    assert_eq!(hot["plugins"][0]["blake3"].as_str().map(str::len), Some(64));
    assert_eq!(hot["counters"]["dead_letters"], 1, "{body}");
    assert!(
        hot["last_error"]
            .as_str()
            .unwrap()
            .starts_with("intake/bad-payload"),
        "{body}"
    );

    // A trial publishes nothing and answers what the live message then does.
    let watcher = TestClient::connect(
        &broker.url(),
        &format!("admin-watch-{}", free_port()),
        &["ganglion/#"],
    )
    .await;
    let hot_reading = r#"{"metric":"temperature","value":88}"#;
    let body = serde_json::json!({"topic": "t/m9/telemetry", "payload": hot_reading}).to_string();
    let (status, answer) = request(port, "POST", "/rules/hot/test", None, &body);
    assert_eq!(status, 200, "{answer}");
    let trial: Json = serde_json::from_str(&answer).unwrap();
    let stages: Vec<&str> = trial["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["preprocess", "postprocess"], "{answer}");
    assert_eq!(trial["stages"][0]["output"][0]["device"], "m9", "{answer}");
    assert_eq!(
        trial["actions"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        watcher.on("ganglion/alert/hot/m9").is_empty(),
        "a trial publishes nothing"
    );
    let s = http(port, "GET", "/metrics", None).1;
    assert_eq!(
        sample(&s, r#"ganglion_rule_messages_total{rule="hot"}"#),
        Some(3.0),
        "a trial is not a message"
    );
    sensor.publish("t/m9/telemetry", hot_reading).await;
    assert!(
        watcher
            .wait_until(20, |w| !w.on("ganglion/alert/hot/m9").is_empty())
            .await,
        "the live alert"
    );
    let live: Vec<_> = watcher
        .received()
        .into_iter()
        .filter(|(t, _)| t == "ganglion/alert/hot/m9")
        .collect();
    assert_eq!(trial["actions"][0]["topic"], live[0].0.as_str());
    assert_eq!(
        trial["actions"][0]["payload"],
        String::from_utf8_lossy(&live[0].1).as_ref()
    );
    wait_for("the live message counted", 20, || {
        let s = http(port, "GET", "/metrics", None).1;
        (sample(&s, r#"ganglion_rule_messages_total{rule="hot"}"#) != Some(4.0)).then_some(s)
    });
    // Hostile bodies: too large, not JSON, a topic the rule does not take.
    let big =
        serde_json::json!({"topic": "t/m9/telemetry", "payload": "x".repeat(70_000)}).to_string();
    assert_eq!(request(port, "POST", "/rules/hot/test", None, &big).0, 413);
    assert_eq!(
        request(port, "POST", "/rules/hot/test", None, "{nope").0,
        400
    );
    let elsewhere = serde_json::json!({"topic": "other/topic", "payload": "{}"}).to_string();
    assert_eq!(
        request(port, "POST", "/rules/hot/test", None, &elsewhere).0,
        400
    );
    assert_eq!(
        request(port, "POST", "/rules/nope/test", None, &body).0,
        404
    );

    // Disabled: the message is passed by and acknowledged, not processed.
    let (status, body) = http(port, "POST", "/rules/hot/disable", None);
    assert_eq!(status, 200, "{body}");
    sensor
        .publish("t/m3/telemetry", r#"{"metric":"temperature","value":99}"#)
        .await;
    wait_for("a skipped message", 20, || {
        let s = http(port, "GET", "/metrics", None).1;
        (sample(&s, r#"ganglion_rule_skipped_total{rule="hot"}"#) != Some(1.0)).then(|| {
            s.lines()
                .filter(|l| l.contains("rule=\"hot\"}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
    });
    let s = http(port, "GET", "/metrics", None).1;
    assert_eq!(
        sample(&s, r#"ganglion_rule_messages_total{rule="hot"}"#),
        Some(4.0)
    );
    assert_eq!(
        sample(&s, r#"ganglion_rule_enabled{rule="hot"}"#),
        Some(0.0)
    );
    let rules: Json = serde_json::from_str(&http(port, "GET", "/rules", None).1).unwrap();
    assert_eq!(rules["rules"][0]["enabled"], false);
    assert_eq!(http(port, "POST", "/rules/nope/disable", None).0, 404);

    let (status, _) = http(port, "POST", "/rules/hot/enable", None);
    assert_eq!(status, 200);
    sensor
        .publish("t/m4/telemetry", r#"{"metric":"temperature","value":21}"#)
        .await;
    wait_for("messages again after enable", 20, || {
        let s = http(port, "GET", "/metrics", None).1;
        (sample(&s, r#"ganglion_rule_messages_total{rule="hot"}"#) != Some(5.0)).then_some(s)
    });

    // The switch outlives the process: disabled, killed, started again over
    // the same state file, the rule is still off.
    assert_eq!(http(port, "POST", "/rules/hot/disable", None).0, 200);
    drop(gw);
    let gw = start(&dir, &broker.url(), "");
    let port = gw.port;
    let rules: Json = serde_json::from_str(&http(port, "GET", "/rules", None).1).unwrap();
    assert_eq!(rules["rules"][0]["enabled"], false, "{rules}");
    assert_eq!(http(port, "POST", "/rules/hot/enable", None).0, 200);
    let rules: Json = serde_json::from_str(&http(port, "GET", "/rules", None).1).unwrap();
    assert_eq!(rules["rules"][0]["enabled"], true, "{rules}");

    drop(sensor);
    drop(watcher);
    broker.stop();
    wait_for("/ready 503 without the broker", 30, || {
        let (status, body) = http(port, "GET", "/ready", None);
        (status != 503 || !body.contains("broker is not connected"))
            .then(|| format!("{status} {body}"))
    });
    assert_eq!(http(port, "GET", "/health", None).0, 200);
    assert!(
        !gw.stderr.text().contains("panicked"),
        "{}",
        gw.stderr.text()
    );
}

/// With `[admin] token`, every endpoint but `/health` wants the bearer
/// token; the page escapes what rules put on it (a topic with markup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_the_endpoint_and_the_page_escapes_markup() {
    built();
    let broker = Mosquitto::start("admin-token-broker");
    let dir = scratch("admin-token");
    let gw = start(&dir, &broker.url(), "token = \"s3cret-token\"\n");
    let port = gw.port;
    assert_eq!(http(port, "GET", "/health", None).0, 200);
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/ready"),
        ("GET", "/rules"),
        ("GET", "/"),
        ("POST", "/rules/hot/disable"),
        ("POST", "/rules/hot/test"),
    ] {
        assert_eq!(http(port, method, path, None).0, 401, "{method} {path}");
        assert_eq!(
            http(port, method, path, Some("s3cret-tokeN")).0,
            401,
            "{method} {path} with a wrong token"
        );
    }
    let rules: Json =
        serde_json::from_str(&http(port, "GET", "/rules", Some("s3cret-token")).1).unwrap();
    assert_eq!(
        rules["rules"][0]["enabled"], true,
        "the refused disable did nothing"
    );
    let (status, page) = http(port, "GET", "/", Some("s3cret-token"));
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h1>Ganglion</h1>"), "{page}");
    assert!(page.contains("<svg"), "a sparkline per rule: {page}");
    assert!(
        page.contains("t/&lt;script&gt;alert(1)&lt;/script&gt;/x"),
        "the topic is escaped: {page}"
    );
    assert!(!page.contains("<script>"), "{page}");
}

/// An address off loopback without a token is refused before anything
/// loads, with the reason.
#[test]
fn listening_off_loopback_needs_a_token() {
    built();
    let dir = scratch("admin-open");
    let config = write_config(&dir, "listen = \"0.0.0.0:9464\"\n");
    let out = Command::new(ganglion_binary())
        .current_dir(&dir)
        .arg("--config")
        .arg(&config)
        .args([
            "run",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("set [admin] token"), "{stderr}");
}

/// Attack: a client opens connections and trickles bytes (slowloris) to
/// hold every slot of the endpoint. Past `max_connections` a connection is
/// closed at once; a trickling one is closed after `connection_secs`; the
/// endpoint answers again once the slots are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_capped_and_closed_in_time() {
    built();
    let broker = Mosquitto::start("admin-slowloris-broker");
    let dir = scratch("admin-slowloris");
    let gw = start(
        &dir,
        &broker.url(),
        "max_connections = 2\nconnection_secs = 5\n",
    );
    let port = gw.port;
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    };
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut s = connect();
            s.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let mut third = connect();
    let _ = third.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = third.read_to_end(&mut answer);
    assert!(
        answer.is_empty(),
        "a connection past the cap was served: {}",
        String::from_utf8_lossy(&answer)
    );

    let started = Instant::now();
    for mut s in held {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "the trickling connection was kept open: {e}"
            ),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed after {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http(port, "GET", "/health", None).0, 200);
}

/// The page in a real browser (Debian's `chromium`, headless; `.ci/run`
/// installs it): the DOM the browser builds has the rule's sparkline, and
/// the markup a rule's topic carries stays text, no element.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_in_a_headless_browser_and_topics_stay_text() {
    let browser =
        xtask::browser().expect("a headless browser: `apt-get install chromium` (.ci/run does)");
    built();
    let broker = Mosquitto::start("admin-browser-broker");
    let dir = scratch("admin-browser");
    let gw = start(&dir, &broker.url(), "");
    let profile = dir.join("browser-profile");
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--timeout=20000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("http://127.0.0.1:{}/", gw.port))
        .output()
        .expect("the browser runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<h1>Ganglion</h1>"),
        "no page in the browser ({}): {dom}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains("<svg"), "a sparkline per rule: {dom}");
    assert!(
        dom.contains("t/&lt;script&gt;alert(1)&lt;/script&gt;/x"),
        "the topic is text: {dom}"
    );
    assert!(!dom.contains("<script"), "no script element: {dom}");
}
