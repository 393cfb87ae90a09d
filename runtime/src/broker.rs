//! The embedded MQTT broker (rumqttd) that `ganglion run` starts when no
//! broker is configured, so a gateway works on its own. MQTT 3.1.1.
//!
//! Without accounts (`[broker] users`, `users_file`) any client may connect,
//! so the broker then listens on a loopback address only. With accounts,
//! every client logs in with one, and the gateway's own client ids are
//! reserved to the account the gateway uses: a sensor's account cannot take
//! over the gateway's session (see [`crate::config::BrokerConfig`]).

use crate::config::BrokerConfig;
pub use crate::config::Login;
use crate::config::MqttSettings;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The address could not be bound (e.g. the port is taken), or the
    /// broker thread could not start.
    #[error("embedded broker: cannot listen on {addr}: {reason}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
    /// `listen` is not a loopback address and no account is configured:
    /// anyone who reaches the address could publish commands.
    #[error(
        "embedded broker: refusing to listen on {addr} without accounts: anyone who reaches it could publish on the gateway's topics or take over its client id; set [broker] users or users_file, or listen on a loopback address such as 127.0.0.1"
    )]
    Unauthenticated {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The accounts are unusable: `users_file` unreadable or malformed, an
    /// empty name or password, a reserved name, or an `[mqtt]` login that is
    /// not one of them. Never contains a password.
    #[error("embedded broker: {0}")]
    Accounts(String),
}

/// The embedded broker, started.
#[derive(Debug)]
pub struct Embedded {
    /// The address it listens on.
    pub listen: SocketAddr,
    /// The login the gateway's own clients (and its simulators) must use;
    /// none when the broker has no accounts (anonymous, loopback only).
    pub login: Option<Login>,
}

/// The account made at each start for the gateway when the broker has
/// accounts and `[mqtt] username` is unset; a configured account may not
/// take this name.
pub const INTERNAL_USER: &str = "ganglion-internal";

/// The configured accounts: `users`, then `users_file` (read now). A name
/// in both is an error, so that which password counts is never a guess.
pub fn accounts(config: &BrokerConfig) -> Result<HashMap<String, String>, BrokerError> {
    let mut accounts: HashMap<String, String> = HashMap::new();
    for (name, password) in &config.users {
        check_account(name, password, "[broker] users")?;
        accounts.insert(name.clone(), password.clone());
    }
    if let Some(path) = &config.users_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BrokerError::Accounts(format!("users_file {}: {e}", path.display())))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let place = format!("users_file {} line {}", path.display(), n + 1);
            // The line is never echoed: it holds a password.
            let (name, password) = line
                .split_once(':')
                .ok_or_else(|| BrokerError::Accounts(format!("{place}: expected name:password")))?;
            check_account(name, password, &place)?;
            if accounts
                .insert(name.to_owned(), password.to_owned())
                .is_some()
            {
                return Err(BrokerError::Accounts(format!(
                    "{place}: account `{name}` is defined twice"
                )));
            }
        }
    }
    Ok(accounts)
}

fn check_account(name: &str, password: &str, place: &str) -> Result<(), BrokerError> {
    if name.is_empty() || password.is_empty() {
        return Err(BrokerError::Accounts(format!(
            "{place}: empty user name or password"
        )));
    }
    if name == INTERNAL_USER {
        return Err(BrokerError::Accounts(format!(
            "{place}: the name `{INTERNAL_USER}` is reserved for the gateway"
        )));
    }
    Ok(())
}

/// Starts the broker as `config` says, for a gateway that connects with
/// `gateway` (its client id, and `[mqtt] username`/`password` if set), in a
/// thread of its own; the broker lives until the process ends.
///
/// Refuses a `listen` off loopback when there is no account. With
/// accounts, the gateway logs in with `[mqtt] username` (which must be one
/// of them, with the same password) or else with [`INTERNAL_USER`] and a
/// random password made now; [`Embedded::login`] tells which.
pub fn start(config: &BrokerConfig, gateway: &MqttSettings) -> Result<Embedded, BrokerError> {
    let addr = config.listen;
    let mut accounts = accounts(config)?;
    if accounts.is_empty() {
        if !addr.ip().to_canonical().is_loopback() {
            return Err(BrokerError::Unauthenticated { addr });
        }
        listen(addr, None)?;
        return Ok(Embedded {
            listen: addr,
            login: None,
        });
    }
    let password = gateway
        .password()
        .map_err(|e| BrokerError::Accounts(e.to_string()))?;
    let login = match (&gateway.username, &password) {
        (Some(username), Some(password)) => {
            if accounts.get(username) != Some(password) {
                return Err(BrokerError::Accounts(format!(
                    "[mqtt] username `{username}` is not a [broker] account, or its password differs"
                )));
            }
            Login {
                username: username.clone(),
                password: password.clone(),
            }
        }
        _ => {
            let login = Login {
                username: INTERNAL_USER.into(),
                password: random_secret(),
            };
            accounts.insert(login.username.clone(), login.password.clone());
            login
        }
    };
    let id = gateway.effective_client_id();
    let reserved = [format!("{id}-out"), id];
    let auth = Auth {
        accounts: accounts
            .into_iter()
            .map(|(name, password)| (name, blake3::hash(password.as_bytes())))
            .collect(),
        reserved,
        gateway_user: login.username.clone(),
    };
    listen(addr, Some(Arc::new(auth)))?;
    Ok(Embedded {
        listen: addr,
        login: Some(login),
    })
}

/// The broker's login check.
struct Auth {
    /// Password hashes by user name: comparing `blake3::Hash`es takes the
    /// same time wherever they differ, so timing tells nothing of a password.
    accounts: HashMap<String, blake3::Hash>,
    /// Client ids only `gateway_user` may connect as.
    reserved: [String; 2],
    gateway_user: String,
}

impl Auth {
    fn allows(&self, client_id: &str, username: &str, password: &str) -> bool {
        let known = self
            .accounts
            .get(username)
            .is_some_and(|h| *h == blake3::hash(password.as_bytes()));
        if !known {
            tracing::warn!(
                client_id,
                username,
                "embedded broker: login refused (unknown user or wrong password)"
            );
            return false;
        }
        if self.reserved.iter().any(|r| r == client_id) && username != self.gateway_user {
            tracing::warn!(
                client_id,
                username,
                "embedded broker: login refused (client id reserved for the gateway)"
            );
            return false;
        }
        true
    }
}

/// 128 bits for the internal account's password: two SipHash outputs keyed
/// by `RandomState`, whose keys std draws from the operating system's
/// random source once per thread (and then varies per use), so they cannot
/// be guessed from outside the process. The password never leaves it.
fn random_secret() -> String {
    use std::hash::{BuildHasher, Hasher};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (0u8..2)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u8(i);
            h.write_u128(now);
            format!("{:016x}", h.finish())
        })
        .collect()
}

/// Starts an anonymous broker on `addr`, which must be a loopback address
/// (see [`start`]).
pub fn start_embedded(addr: SocketAddr) -> Result<(), BrokerError> {
    let config = BrokerConfig {
        listen: addr,
        ..BrokerConfig::default()
    };
    start(&config, &MqttSettings::default()).map(|_| ())
}

/// Starts rumqttd on `addr` in a thread of its own, checking logins with
/// `auth` (none: anonymous).
fn listen(addr: SocketAddr, auth: Option<Arc<Auth>>) -> Result<(), BrokerError> {
    // Fail early and clearly when the port is taken (rumqttd would only log it).
    std::net::TcpListener::bind(addr).map_err(|e| BrokerError::Listen {
        addr,
        reason: e.to_string(),
    })?;
    let mut server = rumqttd::ServerSettings {
        name: "v4-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 16 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    if let Some(auth) = auth {
        server.set_auth_handler(
            move |client_id: String, username: String, password: String| {
                let allowed = auth.allows(&client_id, &username, &password);
                async move { allowed }
            },
        );
    }
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("embedded".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("ganglion-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| BrokerError::Listen {
            addr,
            reason: e.to_string(),
        })?;
    // rumqttd binds within milliseconds; clients retry until it does.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn free_loopback() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    }

    fn with_users(addr: SocketAddr, users: &[(&str, &str)]) -> BrokerConfig {
        BrokerConfig {
            listen: addr,
            users: users
                .iter()
                .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
                .collect(),
            users_file: None,
        }
    }

    /// Whether the broker answers a CONNECT as `client_id` with `login` by
    /// accepting it (true) or by closing the connection (false).
    async fn connects(addr: SocketAddr, client_id: &str, login: Option<(&str, &str)>) -> bool {
        // rumqttd binds in its own thread: wait for the port, so that a
        // refused TCP connection is never taken for a refused login.
        let up = async {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), up)
            .await
            .expect("the broker listens");
        let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        if let Some((u, p)) = login {
            options.set_credentials(u, p);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .expect("the broker answers within 5 s");
        drop(client);
        outcome
    }

    #[tokio::test]
    async fn an_anonymous_client_cannot_publish_to_the_embedded_broker_with_users() {
        let addr = free_loopback();
        let broker = start(
            &with_users(addr, &[("sensor", "s3cret")]),
            &MqttSettings::default(),
        )
        .unwrap();
        assert!(!connects(addr, "intruder", None).await, "no login: refused");
        assert!(
            !connects(addr, "intruder", Some(("sensor", "guess"))).await,
            "wrong password: refused"
        );
        assert!(
            !connects(addr, "intruder", Some(("nobody", "s3cret"))).await,
            "unknown user: refused"
        );
        assert!(connects(addr, "sensor-1", Some(("sensor", "s3cret"))).await);
        // The gateway's client ids are its account's alone.
        assert!(
            !connects(addr, "ganglion", Some(("sensor", "s3cret"))).await,
            "a sensor cannot take over the gateway's client id"
        );
        assert!(!connects(addr, "ganglion-out", Some(("sensor", "s3cret"))).await);
        let login = broker.login.expect("the gateway's login");
        assert_eq!(login.username, INTERNAL_USER);
        assert!(login.password.len() >= 32, "a 128-bit password");
        assert!(!format!("{login:?}").contains(&login.password));
        assert!(connects(addr, "ganglion", Some((&login.username, &login.password))).await);
    }

    #[test]
    fn listening_off_loopback_without_credentials_is_refused() {
        let port = free_loopback().port();
        let open = SocketAddr::from(([0, 0, 0, 0], port));
        let err = start_embedded(open).unwrap_err();
        assert!(matches!(err, BrokerError::Unauthenticated { .. }), "{err}");
        assert!(err.to_string().contains("[broker] users"), "{err}");
        let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        assert!(matches!(
            start_embedded(v6),
            Err(BrokerError::Unauthenticated { .. })
        ));
    }

    #[test]
    fn the_gateway_logs_in_with_its_configured_account() {
        let addr = free_loopback();
        let config = with_users(addr, &[("gw", "pw"), ("sensor", "s")]);
        let mut gateway = MqttSettings {
            username: Some("gw".into()),
            password: Some("wrong".into()),
            ..MqttSettings::default()
        };
        let err = start(&config, &gateway).unwrap_err();
        assert!(!err.to_string().contains("wrong"), "{err}");
        gateway.password = Some("pw".into());
        let login = start(&config, &gateway).unwrap().login.unwrap();
        assert_eq!(login.username, "gw");
        let reserved = with_users(addr, &[(INTERNAL_USER, "x")]);
        assert!(matches!(
            start(&reserved, &MqttSettings::default()),
            Err(BrokerError::Accounts(_))
        ));
    }

    #[test]
    fn users_file_adds_accounts_and_never_echoes_a_password() {
        let dir =
            std::env::temp_dir().join(format!("ganglion-broker-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("users");
        std::fs::write(&file, "# accounts\n\nsensor:p:with:colons\r\nhub:h\n").unwrap();
        let mut config = with_users(free_loopback(), &[("admin", "a")]);
        config.users_file = Some(file.clone());
        let accounts = accounts(&config).unwrap();
        assert_eq!(accounts.len(), 3);
        assert_eq!(accounts["sensor"], "p:with:colons");
        assert_eq!(accounts["hub"], "h");
        std::fs::write(&file, "sensor:p\ntopsecretwithoutcolon\n").unwrap();
        let err = accounts_error(&config);
        assert!(
            err.contains("line 2") && !err.contains("topsecret"),
            "{err}"
        );
        std::fs::write(&file, "admin:other\n").unwrap();
        assert!(accounts_error(&config).contains("twice"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn accounts_error(config: &BrokerConfig) -> String {
        accounts(config).unwrap_err().to_string()
    }
}
