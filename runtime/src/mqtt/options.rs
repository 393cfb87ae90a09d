//! From `[mqtt]` settings to rumqttc's options, for each protocol.

use crate::config::MqttSettings;
use crate::transport::TransportError;
use rumqttc::{QoS, Transport};
use std::time::Duration;

/// A broker address: host, port and whether it asks for TLS. The one parser
/// of `mqtt://`, `mqtts://`, `tcp://` and `ssl://` addresses (the gateway,
/// the simulator and the tests use it); the port defaults to 1883, 8883
/// with TLS.
pub fn broker_address(broker: &str) -> Result<(String, u16, bool), TransportError> {
    let bad = |m: String| TransportError::BadUrl(broker.to_owned(), m);
    let (scheme, rest) = broker
        .split_once("://")
        .ok_or_else(|| bad("expected mqtt://host:port or mqtts://host:port".into()))?;
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => return Err(bad(format!("unknown scheme `{other}`"))),
    };
    let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            p.parse::<u16>().map_err(|e| bad(format!("port: {e}")))?,
        ),
        None => (
            rest.trim_end_matches('/').to_owned(),
            if tls { 8883 } else { 1883 },
        ),
    };
    if host.is_empty() {
        return Err(bad("no host".into()));
    }
    Ok((host, port, tls))
}

/// Host, port and, for mqtts://, the CA certificate.
pub(super) fn endpoint(
    s: &MqttSettings,
    broker: &str,
) -> Result<(String, u16, Option<Vec<u8>>), TransportError> {
    let (host, port, tls) = broker_address(broker)?;
    let ca = match (tls, &s.ca_file) {
        (false, _) => None,
        (true, Some(f)) => {
            Some(std::fs::read(f).map_err(|e| TransportError::Tls(f.clone(), e.to_string()))?)
        }
        (true, None) => {
            return Err(TransportError::BadUrl(
                broker.to_owned(),
                "mqtts needs `ca_file`".into(),
            ));
        }
    };
    Ok((host, port, ca))
}

/// Options for a plain client of the gateway's broker (the simulator): the
/// address, TLS and credentials of `s`, a clean session, automatic acks.
pub fn client_options(
    s: &MqttSettings,
    broker: &str,
    client_id: &str,
) -> Result<rumqttc::MqttOptions, TransportError> {
    let (host, port, ca) = endpoint(s, broker)?;
    Ok(plain_v4(s, client_id, host, port, ca))
}

/// What every MQTT 3.1.1 client of ours shares: keep-alive, window and
/// packet cap, credentials and TLS from `s`.
fn plain_v4(
    s: &MqttSettings,
    client_id: &str,
    host: String,
    port: u16,
    ca: Option<Vec<u8>>,
) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(s.keep_alive_secs.max(5)))
        .set_inflight(s.inflight.max(1))
        .set_max_packet_size(s.max_packet_bytes, s.max_packet_bytes);
    if let (Some(u), Some(p)) = (&s.username, &s.password) {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(ca) = ca {
        o.set_transport(Transport::tls(ca, None, None));
    }
    o
}

/// The gateway's own 3.1.1 connection: a persistent session, manual
/// acknowledgements and the status topic's last will.
pub(super) fn options_v4(
    s: &MqttSettings,
    host: String,
    port: u16,
    ca: Option<Vec<u8>>,
) -> rumqttc::MqttOptions {
    let mut o = plain_v4(s, &s.client_id, host, port, ca);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_last_will(rumqttc::LastWill::new(
            s.status_topic(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    o
}

pub(super) fn options_v5(
    s: &MqttSettings,
    host: String,
    port: u16,
    ca: Option<Vec<u8>>,
) -> rumqttc::v5::MqttOptions {
    use rumqttc::v5::mqttbytes::{QoS as Q5, v5::LastWill};
    let mut o = rumqttc::v5::MqttOptions::new(s.client_id.clone(), host, port);
    o.set_clean_start(false)
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
    if let (Some(u), Some(p)) = (&s.username, &s.password) {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(ca) = ca {
        o.set_transport(Transport::tls(ca, None, None));
    }
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
