//! The `[mqtt]` table: where the broker is and how to talk to it. The
//! adapter that acts on it is [`crate::mqtt`].

use serde::Deserialize;
use std::path::PathBuf;

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// MQTT 3.1.1 (`"3.1.1"`), the default.
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5 (`"5"`); the session is asked never to expire, so that it
    /// outlives a connection as in 3.1.1.
    #[serde(rename = "5")]
    V5,
}

/// Broker connection settings. In `ganglion.toml`:
///
/// ```toml
/// [mqtt]
/// broker = "mqtt://127.0.0.1:1883"   # mqtts://, ws://, wss:// too; none: the embedded broker
/// client_id = "ganglion"
/// username = "gw"                    # optional
/// password_file = "/etc/ganglion/mqtt-password" # or password = "...", or password_env = "VAR"
/// ca_file = "/etc/ganglion/ca.pem"   # for mqtts:// and wss://; none: the system's roots
/// cert_file = "client.pem"           # client certificate for mTLS, with key_file
/// key_file = "client.key"
/// keep_alive_secs = 30
/// inflight = 100                     # our unacknowledged publishes at once
/// status_topic = "ganglion/status/{client_id}"
/// protocol = "3.1.1"                 # or "5"
/// max_packet_bytes = 16777216        # larger outputs are dead-lettered, never queued
/// intake_buffer = 10000              # deliveries waiting for the rules; QoS 0 beyond it is dropped and counted
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// `mqtt://host[:port]` or, with TLS, `mqtts://host[:port]` (`tcp://`
    /// and `ssl://` also work); the port defaults to 1883, 8883 for
    /// `mqtts://` and `ssl://`. MQTT over WebSockets: `ws://host[:port]/path`
    /// (port 80 by default) or, with TLS, `wss://host[:port]/path` (443);
    /// the path is the broker's (often `/mqtt`). Default none: `ganglion
    /// run` starts its embedded broker.
    pub broker: Option<String>,
    /// The MQTT client id, which the broker keeps our session under; the
    /// output connection uses it with `-out` appended. Default `ganglion`.
    pub client_id: String,
    /// User name; sent only together with `password`. Default none.
    pub username: Option<String>,
    /// Password; sent only together with `username`. At most one of
    /// `password`, `password_file` and `password_env` may be set. Default none.
    pub password: Option<String>,
    /// A file holding the password (one trailing newline is dropped), read
    /// at each connect, so that the password need not sit in this file.
    /// Default none.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password, read at each connect.
    /// Default none.
    pub password_env: Option<String>,
    /// PEM file of the CA(s) that signed the broker's certificate, for
    /// `mqtts://` and `wss://`; unset, the operating system's root
    /// certificates are trusted instead. Default none.
    pub ca_file: Option<String>,
    /// PEM file of our client certificate (chain), for brokers that
    /// require one (mutual TLS); needs `key_file`. Default none.
    pub cert_file: Option<String>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or
    /// SEC1). Default none.
    pub key_file: Option<String>,
    /// MQTT keep-alive interval in seconds, at least 5. Default 30.
    pub keep_alive_secs: u64,
    /// How many of our publishes may await the broker's PUBACK at once, at
    /// least 1. Default 100.
    pub inflight: u16,
    /// Where `online` is published (retained) on each connection, and
    /// `offline` as the last will; `{client_id}` is replaced by the client
    /// id. Default `ganglion/status/{client_id}`.
    pub status_topic: String,
    /// "3.1.1" (default) or "5".
    pub protocol: Protocol,
    /// Largest MQTT packet sent or received, in bytes. A publish that would
    /// be larger is refused before it is queued (the gateway dead-letters
    /// it). Default 16 MiB.
    pub max_packet_bytes: usize,
    /// Deliveries held while the rules' lanes are full. QoS 1 and 2
    /// deliveries are always kept: over MQTT 5 this is also the receive
    /// maximum the broker must respect, over 3.1.1 the broker's own window
    /// bounds them. QoS 0 ones past this many are dropped and counted
    /// (`MqttHandle::dropped_qos0`), as QoS 0 allows. Default 10 000.
    pub intake_buffer: usize,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            broker: None,
            client_id: "ganglion".into(),
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keep_alive_secs: 30,
            inflight: 100,
            status_topic: "ganglion/status/{client_id}".into(),
            protocol: Protocol::V311,
            max_packet_bytes: 16 << 20,
            intake_buffer: 10_000,
        }
    }
}

impl MqttSettings {
    /// The status topic with `{client_id}` filled in.
    pub fn status_topic(&self) -> String {
        self.status_topic.replace("{client_id}", &self.client_id)
    }

    /// The password from whichever of `password`, `password_file` and
    /// `password_env` is set (none: `None`). A file loses one trailing
    /// newline (`\n` or `\r\n`). Errors name the source, never its content.
    pub fn password(&self) -> Result<Option<String>, PasswordError> {
        let sources = [
            self.password.is_some(),
            self.password_file.is_some(),
            self.password_env.is_some(),
        ];
        if sources.iter().filter(|set| **set).count() > 1 {
            return Err(PasswordError::Several);
        }
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(file) = &self.password_file {
            let mut text = std::fs::read_to_string(file).map_err(|e| PasswordError::File {
                file: file.clone(),
                reason: e.to_string(),
            })?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            return Ok(Some(text));
        }
        if let Some(var) = &self.password_env {
            return match std::env::var(var) {
                Ok(p) => Ok(Some(p)),
                Err(e) => Err(PasswordError::Env {
                    var: var.clone(),
                    reason: e.to_string(),
                }),
            };
        }
        Ok(None)
    }
}

/// Why [`MqttSettings::password`] found no password. The messages name
/// where the password was to come from, never the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// More than one of `password`, `password_file`, `password_env` is set.
    #[error("[mqtt]: set one of `password`, `password_file` and `password_env`, not several")]
    Several,
    /// `password_file` could not be read.
    #[error("[mqtt] password_file {}: {reason}", file.display())]
    File {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// `password_env` names a variable that is unset or not Unicode.
    #[error("[mqtt] password_env `{var}`: {reason}")]
    Env {
        /// The variable's name.
        var: String,
        /// Why it could not be read.
        reason: String,
    },
}

/// A user name and password (the password is left out of `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// The user name.
    pub username: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"…")
            .finish()
    }
}
