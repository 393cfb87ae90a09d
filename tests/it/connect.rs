//! Ways to reach a broker beyond plain TCP and a password: mutual TLS
//! against a mosquitto that requires client certificates (made here with
//! rcgen), the password read from a file, and MQTT over WebSockets (to
//! rumqttd: the installed mosquitto 2.0.11 cannot open a websockets
//! listener; wss:// through a TLS terminator in front of it). Also the
//! command line's configuration file rules.

use ganglion::mqtt::MqttSettings;
use ganglion_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A test CA, a server certificate for localhost and 127.0.0.1, and a
/// client certificate, written as PEM files into `dir`: `ca.pem`,
/// `server.pem`, `server.key`, `client.pem`, `client.key`. Key files are
/// made readable to all: mosquitto drops root for its own user.
fn certificates(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ganglion-test-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(
        Vec::new(),
        "ganglion-gateway",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    for (name, text) in [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server),
        ("server.key", server_key),
        ("client.pem", client),
        ("client.key", client_key),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// Whether a gateway connection with `settings` to `url` comes up within
/// `secs` seconds.
async fn connects(settings: &MqttSettings, url: &str, secs: u64) -> bool {
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let (handle, task) = ganglion::mqtt::connect(settings, url, vec![], tx).unwrap();
    let up = handle.wait_connected(Duration::from_secs(secs)).await;
    task.abort();
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_connects_with_the_client_certificate_and_is_refused_without() {
    let tls_port = free_port();
    let mut dir = PathBuf::new();
    let _broker = Mosquitto::start_with("mosquitto-mtls", |port, d| {
        certificates(d);
        dir = d.to_owned();
        let d = d.display();
        format!(
            "per_listener_settings true\nlistener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\nallow_anonymous true\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        )
    });
    let url = format!("mqtts://localhost:{tls_port}");
    let file = |name: &str| Some(dir.join(name).display().to_string());
    let with_cert = MqttSettings {
        client_id: format!("gw-mtls-{}", free_port()),
        ca_file: file("ca.pem"),
        cert_file: file("client.pem"),
        key_file: file("client.key"),
        ..Default::default()
    };
    assert!(
        connects(&with_cert, &url, 20).await,
        "no connection with the client certificate; mosquitto's log: {}",
        std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
    );
    let without = MqttSettings {
        client_id: format!("gw-mtls-{}", free_port()),
        cert_file: None,
        key_file: None,
        ..with_cert.clone()
    };
    assert!(
        !connects(&without, &url, 3).await,
        "connected without a client certificate"
    );
    // The key file must come with the certificate, and a missing one is an
    // error at start naming the file.
    let missing = MqttSettings {
        key_file: file("absent.key"),
        ..with_cert
    };
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let Err(err) = ganglion::mqtt::connect(&missing, &url, vec![], tx) else {
        panic!("a missing key file was accepted");
    };
    assert!(err.to_string().contains("absent.key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_a_file_and_its_trailing_newline_is_dropped() {
    let (broker, tls_port, ca) = Mosquitto::start_tls_auth("mosquitto-password-file");
    let dir = scratch("password-file");
    let url = format!("mqtts://localhost:{tls_port}");
    let settings = |content: &str, name: &str| {
        let file = dir.join(name);
        std::fs::write(&file, content).unwrap();
        MqttSettings {
            client_id: format!("gw-pwfile-{}", free_port()),
            username: Some("gw".into()),
            password_file: Some(file),
            ca_file: Some(ca.display().to_string()),
            ..Default::default()
        }
    };
    assert!(connects(&settings("secret\n", "right"), &url, 20).await);
    assert!(!connects(&settings("wrong\n", "wrong"), &url, 3).await);
    // Two sources are refused before connecting, naming neither password.
    let both = MqttSettings {
        password: Some("secret".into()),
        ..settings("secret\n", "both")
    };
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let Err(err) = ganglion::mqtt::connect(&both, &url, vec![], tx) else {
        panic!("two password sources were accepted");
    };
    let err = err.to_string();
    assert!(
        err.contains("password_file") && !err.contains("secret"),
        "{err}"
    );
    drop(broker);
}

/// rumqttd with a WebSocket listener and a plain one, on free ports.
fn websocket_broker() -> (u16, u16) {
    let (ws_port, tcp_port) = (free_port(), free_port());
    let server = |name: &str, port: u16| rumqttd::ServerSettings {
        name: name.into(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 10 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some([("tcp".to_owned(), server("tcp", tcp_port))].into()),
        v5: None,
        ws: Some([("ws".to_owned(), server("ws", ws_port))].into()),
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::spawn(move || {
        if let Err(e) = rumqttd::Broker::new(config).start() {
            eprintln!("rumqttd stopped: {e}");
        }
    });
    for port in [ws_port, tcp_port] {
        let up = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "rumqttd did not listen on {port}");
    }
    (ws_port, tcp_port)
}

/// Publishes `payload` to `topic` from a TCP client of the broker on
/// `tcp_port` until a delivery arrives on `rx`: the gateway's subscription
/// may land just after its connection.
async fn relayed(
    tcp_port: u16,
    topic: &str,
    payload: &str,
    rx: &mut tokio::sync::mpsc::Receiver<ganglion::transport::Delivery>,
) -> ganglion::transport::Delivery {
    let sensor = TestClient::connect(
        &format!("mqtt://127.0.0.1:{tcp_port}"),
        &format!("sensor-{}", free_port()),
        &[],
    )
    .await;
    for _ in 0..50 {
        sensor.publish(topic, payload).await;
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            return d;
        }
    }
    panic!("nothing arrived on {topic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websockets_receives_what_a_tcp_client_publishes() {
    let (ws_port, tcp_port) = websocket_broker();
    let settings = MqttSettings {
        client_id: "gw-ws".into(),
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let (handle, task) = ganglion::mqtt::connect(
        &settings,
        &format!("ws://127.0.0.1:{ws_port}/mqtt"),
        vec!["t/#".into()],
        tx,
    )
    .unwrap();
    assert!(handle.wait_connected(Duration::from_secs(20)).await);
    let delivery = relayed(tcp_port, "t/ws/telemetry", "over websockets", &mut rx).await;
    assert_eq!(delivery.message.topic, "t/ws/telemetry");
    assert_eq!(delivery.message.payload, b"over websockets");
    task.abort();
}

/// Terminates TLS with `dir`'s server certificate on a free port and
/// forwards each connection to `to`: wss:// in front of rumqttd's ws://.
async fn tls_terminator(dir: &Path, to: u16) -> u16 {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

/// wss://: MQTT over WebSockets over TLS, the server checked against
/// `ca_file`; a client that trusts another CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_secure_websockets_checks_the_server_and_receives() {
    let dir = scratch("wss");
    certificates(&dir);
    let (ws_port, tcp_port) = websocket_broker();
    let wss_port = tls_terminator(&dir, ws_port).await;
    let url = format!("wss://localhost:{wss_port}/mqtt");
    let settings = MqttSettings {
        client_id: "gw-wss".into(),
        ca_file: Some(dir.join("ca.pem").display().to_string()),
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let (handle, task) = ganglion::mqtt::connect(&settings, &url, vec!["t/#".into()], tx).unwrap();
    assert!(handle.wait_connected(Duration::from_secs(20)).await);
    let delivery = relayed(tcp_port, "t/wss/telemetry", "over tls", &mut rx).await;
    assert_eq!(delivery.message.payload, b"over tls");
    task.abort();

    // Another CA: the server's certificate is not trusted, no connection.
    let other = scratch("wss-other-ca");
    certificates(&other);
    let distrust = MqttSettings {
        client_id: "gw-wss-distrust".into(),
        ca_file: Some(other.join("ca.pem").display().to_string()),
        ..Default::default()
    };
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let (handle, task) = ganglion::mqtt::connect(&distrust, &url, vec![], tx).unwrap();
    assert!(!handle.wait_connected(Duration::from_secs(3)).await);
    task.abort();
}

#[test]
fn an_explicit_config_file_must_exist_and_the_default_may_be_absent() {
    let dir = scratch("config-missing");
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(ganglion_binary());
        cmd.current_dir(&dir)
            .args(args)
            .env_remove("GANGLION_CONFIG");
        if let Some(path) = env {
            cmd.env("GANGLION_CONFIG", path);
        }
        cmd.output().unwrap()
    };
    // `check` of a missing component fails either way; what matters is
    // whether the configuration was the reason.
    let out = run(&["--config", "nope.toml", "check", "x.wasm"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("nope.toml") && stderr.contains("does not exist"),
        "{stderr}"
    );
    let out = run(&["check", "x.wasm"], Some("from-env.toml"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("from-env.toml") && stderr.contains("does not exist"),
        "{stderr}"
    );
    // No ganglion.toml in this folder: the defaults, and on to the check.
    let out = run(&["check", "x.wasm"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("x.wasm: REFUSED"), "{text}");
}

/// `ganglion run` with no `ca_file` trusts the system's roots, which
/// `SSL_CERT_FILE` points at the test CA here; the broker, user name and
/// password come from GANGLION_* variables, and relative paths in the
/// config from its own folder (the working directory is elsewhere).
#[test]
fn ganglion_run_takes_the_broker_and_login_from_the_environment_and_trusts_system_roots() {
    let (_broker, tls_port, ca) = Mosquitto::start_tls_auth("mosquitto-system-roots");
    let dir = scratch("system-roots");
    for d in ["plugins", "rules"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(
        dir.join("ganglion.toml"),
        "[plugins]\ndir = \"plugins\"\ncache_dir = \"compiled\"\n[state]\npath = \"state.redb\"\n[rules]\ndir = \"rules\"\n[mqtt]\nclient_id = \"gw-env\"\n[audit]\nenabled = false\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(ganglion_binary())
        .current_dir(std::env::temp_dir())
        .env("GANGLION_CONFIG", dir.join("ganglion.toml"))
        .env("GANGLION_BROKER", format!("mqtts://localhost:{tls_port}"))
        .env("GANGLION_USERNAME", "gw")
        .env("GANGLION_PASSWORD", "secret")
        .env("SSL_CERT_FILE", &ca)
        .env_remove("SSL_CERT_DIR")
        .args(["run", "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = StderrLines::collect(&mut child);
    let connected = stderr.wait_for("connected to the MQTT broker", Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    let text = stderr.text();
    assert!(connected, "{text}");
    assert!(!text.contains("secret"), "the password was logged: {text}");
    // The state file went beside the config, not into the working directory.
    assert!(dir.join("state.redb").exists(), "{text}");
}
