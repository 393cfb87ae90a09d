//! The embedded MQTT broker (rumqttd) that `ganglion run` starts when no
//! broker is configured, so a gateway works on its own. It listens on
//! loopback only, MQTT 3.1.1, without authentication: other devices need an
//! external broker.

use std::collections::HashMap;
use std::net::SocketAddr;

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
}

/// Starts the broker on `addr` in a thread of its own. The broker lives
/// until the process ends.
pub fn start_embedded(addr: SocketAddr) -> Result<(), BrokerError> {
    // Fail early and clearly when the port is taken (rumqttd would only log it).
    std::net::TcpListener::bind(addr).map_err(|e| BrokerError::Listen {
        addr,
        reason: e.to_string(),
    })?;
    let server = rumqttd::ServerSettings {
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
