//! A real mosquitto on a free loopback port, and an MQTT client for tests
//! that records what arrives.

use super::*;

fn wait_for_port(port: u16, up: bool) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() == up {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "port {port} did not come {}",
        if up { "up" } else { "down" }
    );
}

/// A real mosquitto broker on a free loopback port, with persistence in a
/// scratch folder so that a restart keeps sessions and queued messages.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Mosquitto {
    pub fn start(name: &str) -> Mosquitto {
        Self::start_with(name, |port, _dir| {
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n")
        })
    }

    /// An anonymous broker that applies `acl` (mosquitto's `acl_file`
    /// syntax) to every client.
    pub fn start_with_acl(name: &str, acl: &str) -> Mosquitto {
        Self::start_with(name, |port, dir| {
            std::fs::write(dir.join("acl"), acl).expect("acl file");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("acl"), std::fs::Permissions::from_mode(0o644))
                .expect("chmod acl");
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {}/acl\n",
                dir.display()
            )
        })
    }

    /// A broker whose `port` is plain and anonymous (for test clients) and
    /// whose `tls_port` takes TLS with a test CA and the user `gw` /
    /// `secret`. Returns the broker, the TLS port and the CA file.
    pub fn start_tls_auth(name: &str) -> (Mosquitto, u16, PathBuf) {
        let tls_port = free_port();
        let mut ca = PathBuf::new();
        let m = Self::start_with(name, |port, dir| {
            let sh = |cmd: &str| {
                let ok = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .current_dir(dir)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                assert!(ok, "test certificate step failed: {cmd}");
            };
            sh(
                "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=ganglion-test-ca 2>/dev/null",
            );
            sh(
                "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null",
            );
            std::fs::write(
                dir.join("san.ext"),
                "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
            )
            .unwrap();
            sh(
                "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null",
            );
            sh("mosquitto_passwd -b -c passwd gw secret && chmod 644 server.key passwd");
            ca = dir.join("ca.pem");
            let d = dir.display();
            format!(
                "per_listener_settings true\nlistener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nallow_anonymous false\npassword_file {d}/passwd\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
            )
        });
        wait_for_port(tls_port, true);
        (m, tls_port, ca)
    }

    /// A broker whose configuration starts with `listeners(port, dir)`: the
    /// listener lines for the plain `port`, and any more (TLS, say).
    pub fn start_with(name: &str, listeners: impl FnOnce(u16, &Path) -> String) -> Mosquitto {
        let dir = scratch(name);
        let port = free_port();
        let conf = format!(
            "{}persistence true\npersistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 100\nautosave_interval 1\n",
            listeners(port, &dir),
            dir.display()
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("mosquitto config");
        // Run as root, mosquitto drops to its own user, which must be able to
        // write the persistence file here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .expect("chmod scratch dir");
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("mosquitto.log")).expect("log file"))
            .spawn()
            .expect("starting mosquitto (install it: apt-get install -y mosquitto)");
        self.child = Some(child);
        wait_for_port(self.port, true);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Stops the broker with SIGTERM (it saves its persistence file) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
            wait_for_port(self.port, false);
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// (topic, payload) of every message a test client received.
type Received = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT client for tests: publishes, and records what arrives on its subscriptions.
pub struct TestClient {
    pub client: rumqttc::AsyncClient,
    received: Received,
    acked: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Connects with a persistent session (so nothing is lost across a broker
    /// restart) and subscribes to `filters` at QoS 1.
    pub async fn connect(url: &str, id: &str, filters: &[&str]) -> TestClient {
        let (host, port) = ganglion::mqtt::broker_address(url)
            .map(|(h, p, _)| (h, p))
            .expect("broker url");
        let mut o = rumqttc::MqttOptions::new(id, host, port);
        o.set_clean_session(false)
            .set_inflight(100)
            .set_keep_alive(std::time::Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 1024);
        eventloop.set_network_options(ganglion::mqtt::network_options());
        let received: Received = Arc::default();
        let acked: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let (r, a, c) = (received.clone(), acked.clone(), client.clone());
        let filters_empty = filters.is_empty();
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        for f in &filters {
                            let _ = c.subscribe(f.clone(), rumqttc::QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        r.lock()
                            .unwrap()
                            .push((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        });
        if !filters_empty {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), ready_rx).await;
        }
        TestClient {
            client,
            received,
            acked,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish request");
    }

    /// Publishes the broker acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().unwrap().clone()
    }

    /// Messages received on topics that match `filter`.
    pub fn on(&self, filter: &str) -> Vec<serde_json::Value> {
        self.received()
            .into_iter()
            .filter(|(t, _)| ganglion::rules::filter_matches(filter, t))
            .map(|(_, p)| {
                serde_json::from_slice(&p).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&p).into_owned())
                })
            })
            .collect()
    }

    /// Waits until `pred` holds for what was received, at most `secs`.
    pub async fn wait_until(&self, secs: u64, pred: impl Fn(&TestClient) -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if pred(self) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        pred(self)
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
