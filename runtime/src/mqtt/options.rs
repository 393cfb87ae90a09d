//! From `[mqtt]` settings to rumqttc's options, for each protocol.

use crate::config::MqttSettings;
use crate::transport::TransportError;
use rumqttc::{QoS, Transport};
use std::time::Duration;

/// A broker address: host, port and whether it asks for TLS. The one parser
/// of `mqtt://`, `mqtts://`, `tcp://`, `ssl://`, `ws://` and `wss://`
/// addresses (the gateway, the simulator and the tests use it); the port
/// defaults to 1883, 8883 with TLS, 80 for `ws://` and 443 for `wss://`.
pub fn broker_address(broker: &str) -> Result<(String, u16, bool), TransportError> {
    parse(broker).map(|a| (a.host, a.port, a.tls))
}

/// A parsed broker address.
struct Address {
    host: String,
    port: u16,
    tls: bool,
    /// `Some(path)` for MQTT over WebSockets (`/` when none is given).
    ws_path: Option<String>,
}

fn parse(broker: &str) -> Result<Address, TransportError> {
    let bad = |m: String| TransportError::BadUrl(broker.to_owned(), m);
    let (scheme, rest) = broker.split_once("://").ok_or_else(|| {
        bad("expected mqtt://, mqtts://, ws:// or wss:// followed by host[:port]".into())
    })?;
    let (tls, ws, default_port) = match scheme {
        "mqtt" | "tcp" => (false, false, 1883),
        "mqtts" | "ssl" => (true, false, 8883),
        "ws" => (false, true, 80),
        "wss" => (true, true, 443),
        other => return Err(bad(format!("unknown scheme `{other}`"))),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !ws && !path.trim_end_matches('/').is_empty() {
        return Err(bad(format!(
            "a path (`{path}`) is only for ws:// and wss://"
        )));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            p.parse::<u16>().map_err(|e| bad(format!("port: {e}")))?,
        ),
        None => (authority.to_owned(), default_port),
    };
    if host.is_empty() {
        return Err(bad("no host".into()));
    }
    let ws_path = ws.then(|| {
        if path.is_empty() {
            "/".to_owned()
        } else {
            path.to_owned()
        }
    });
    Ok(Address {
        host,
        port,
        tls,
        ws_path,
    })
}

/// Where and how to connect: what rumqttc's options need besides the
/// session settings.
pub(super) struct Endpoint {
    /// The host, or for WebSockets the whole URL (rumqttc reads the host
    /// and port from it).
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) transport: Transport,
    /// User name and password, when both are set.
    pub(super) login: Option<(String, String)>,
}

fn read_tls_file(f: &str) -> Result<Vec<u8>, TransportError> {
    std::fs::read(f).map_err(|e| TransportError::Tls(f.to_owned(), e.to_string()))
}

/// The operating system's root certificates as one PEM bundle, the form
/// rumqttc takes a CA in. Unreadable entries are skipped (as rustls' own
/// loader does); none at all is an error.
fn system_roots(broker: &str) -> Result<Vec<u8>, TransportError> {
    use base64::Engine as _;
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(TransportError::BadUrl(
            broker.to_owned(),
            format!("no `ca_file` and no system root certificates ({why})"),
        ));
    }
    let mut pem = Vec::new();
    for cert in &found.certs {
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    Ok(pem)
}

/// Host, port, transport (TCP, TLS, WebSockets with or without TLS, with
/// the CA or the system's roots and the client certificate) and login.
/// Files are read here, so a missing one is an error at start, not a
/// connection that keeps failing.
pub(super) fn endpoint(s: &MqttSettings, broker: &str) -> Result<Endpoint, TransportError> {
    let a = parse(broker)?;
    let client_auth = match (&s.cert_file, &s.key_file) {
        (Some(c), Some(k)) => Some((read_tls_file(c)?, read_tls_file(k)?)),
        (None, None) => None,
        _ => {
            return Err(TransportError::BadUrl(
                broker.to_owned(),
                "`cert_file` and `key_file` go together".into(),
            ));
        }
    };
    if client_auth.is_some() && !a.tls {
        return Err(TransportError::BadUrl(
            broker.to_owned(),
            "a client certificate needs TLS (mqtts:// or wss://)".into(),
        ));
    }
    let tls = if a.tls {
        let ca = match &s.ca_file {
            Some(f) => read_tls_file(f)?,
            None => system_roots(broker)?,
        };
        Some(rumqttc::TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        })
    } else {
        None
    };
    let (host, transport) = match (a.ws_path, tls) {
        (None, None) => (a.host, Transport::Tcp),
        (None, Some(t)) => (a.host, Transport::tls_with_config(t)),
        (Some(path), None) => (format!("ws://{}:{}{path}", a.host, a.port), Transport::Ws),
        (Some(path), Some(t)) => (
            format!("wss://{}:{}{path}", a.host, a.port),
            Transport::wss_with_config(t),
        ),
    };
    let password = s
        .password()
        .map_err(|e| TransportError::Credentials(e.to_string()))?;
    Ok(Endpoint {
        host,
        port: a.port,
        transport,
        login: s.username.clone().zip(password),
    })
}

/// Options for a plain client of the gateway's broker (the simulator): the
/// address, TLS and credentials of `s`, a clean session, automatic acks.
pub fn client_options(
    s: &MqttSettings,
    broker: &str,
    client_id: &str,
) -> Result<rumqttc::MqttOptions, TransportError> {
    Ok(plain_v4(s, client_id, endpoint(s, broker)?))
}

/// What every MQTT 3.1.1 client of ours shares: keep-alive, window and
/// packet cap, credentials and TLS from `s`.
fn plain_v4(s: &MqttSettings, client_id: &str, e: Endpoint) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, e.host, e.port);
    o.set_keep_alive(Duration::from_secs(s.keep_alive_secs.max(5)))
        .set_inflight(s.inflight.max(1))
        .set_max_packet_size(s.max_packet_bytes, s.max_packet_bytes);
    if let Some((u, p)) = e.login {
        o.set_credentials(u, p);
    }
    o.set_transport(e.transport);
    o
}

/// The gateway's own 3.1.1 connection: a persistent session, manual
/// acknowledgements and the status topic's last will.
pub(super) fn options_v4(s: &MqttSettings, e: Endpoint) -> rumqttc::MqttOptions {
    let mut o = plain_v4(s, &s.effective_client_id(), e);
    o.set_max_request_batch(s.write_batch.max(1))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_last_will(rumqttc::LastWill::new(
            s.status_topic(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    o
}

pub(super) fn options_v5(s: &MqttSettings, e: Endpoint) -> rumqttc::v5::MqttOptions {
    use rumqttc::v5::mqttbytes::{QoS as Q5, v5::LastWill};
    let mut o = rumqttc::v5::MqttOptions::new(s.effective_client_id(), e.host, e.port);
    o.set_max_request_batch(s.write_batch.max(1))
        .set_clean_start(false)
        // MQTT 5 ends a session when the connection closes unless it has an expiry.
        .set_session_expiry_interval(Some(u32::MAX))
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(s.keep_alive_secs.max(5)))
        .set_outgoing_inflight_upper_limit(s.inflight.max(1))
        .set_max_packet_size(Some(u32::try_from(s.max_packet_bytes).unwrap_or(u32::MAX)))
        // MQTT 5 lets us bound the QoS 1 and 2 deliveries the broker
        // sends before we acknowledge them: with it, the intake buffer
        // is bounded for every QoS (MQTT 3.1.1 has no such limit).
        .set_receive_maximum(Some(
            u16::try_from(s.intake_buffer.clamp(1, 65_535)).unwrap_or(u16::MAX),
        ))
        .set_last_will(LastWill::new(
            s.status_topic(),
            "offline",
            Q5::AtLeastOnce,
            true,
            None,
        ))
        .set_network_options(network_options());
    if let Some((u, p)) = e.login {
        o.set_credentials(u, p);
    }
    o.set_transport(e.transport);
    o
}

/// TCP without Nagle's algorithm: MQTT packets are small and each publish
/// waits for its PUBACK, so Nagle plus delayed ACKs would add ~40 ms per
/// round trip (measured: 84 msg/s instead of thousands).
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}
