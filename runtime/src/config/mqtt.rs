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

/// Which connection carries the gateway's outputs (`[mqtt] output_connection`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputConnection {
    /// A connection of its own, whatever the intake window holds.
    #[default]
    Separate,
    /// The intake connection: one socket for everything.
    Shared,
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
/// write_batch = 64                   # requests (PUBACKs, PUBLISHes) written with one flush; 1: each alone
/// output_connection = "separate"     # or "shared": outputs on the intake connection (not with the embedded broker)
/// share_group = "ganglion"           # optional, MQTT 5: N gateways share the rules' messages (docs/scale-out.md)
/// instance = 1                       # with share_group: this gateway's number on its host (GANGLION_INSTANCE)
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
    /// Requests (PUBACKs of deliveries, our PUBLISHes) a connection writes
    /// together with one flush when they are queued while the last write
    /// went out, at most; 1 writes each alone, one system call apiece (as
    /// rumqttc does unpatched). Also bounded by `inflight`. Default 64.
    pub write_batch: usize,
    /// Which connection the gateway publishes its outputs on. `"separate"`
    /// (default): a second connection (client id with `-out` appended).
    /// `"shared"`: the intake connection, which saves the second socket's
    /// system calls and wake-ups (docs/BENCHMARKS.md has the figures). Only
    /// for a broker that acknowledges a client's publishes while that
    /// client's window of unacknowledged deliveries is full (mosquitto
    /// does): the gateway
    /// acknowledges a delivery only after its outputs are acknowledged, so
    /// with a broker that withholds them (rumqttd, the embedded broker) a
    /// full window waits forever. `ganglion run` refuses it with the
    /// embedded broker; docs/operations.md tells how to recognise the stall.
    pub output_connection: OutputConnection,
    /// With a group name, every rule's filters (but those of rules with
    /// `shared = false`) are subscribed as `$share/<group>/<filter>`: the
    /// broker hands each message to one of the gateways of the group, so
    /// that N gateways share the load. MQTT 5 only (refused with 3.1.1);
    /// letters, digits, `-` and `_`, at most 64 bytes. Default none.
    pub share_group: Option<String>,
    /// This gateway's number among those on one host, for its client id
    /// (see [`MqttSettings::effective_client_id`]); it must stay the same
    /// across restarts, so that a restarted gateway takes its session (and
    /// the messages the broker kept for it) back. Default 1.
    pub instance: u32,
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
            write_batch: 64,
            output_connection: OutputConnection::Separate,
            share_group: None,
            instance: 1,
        }
    }
}

impl MqttSettings {
    /// The status topic with `{client_id}` filled in (the effective one).
    pub fn status_topic(&self) -> String {
        self.status_topic
            .replace("{client_id}", &self.effective_client_id())
    }

    /// The client id the broker sees. `{host}` and `{instance}` in
    /// `client_id` are replaced by the host's name and `instance`; with a
    /// `share_group` and neither placeholder, `-<host>-<instance>` is
    /// appended, so that gateways sharing one configuration file never take
    /// each other's session, while a restarted one takes its own back.
    pub fn effective_client_id(&self) -> String {
        let templated = self.client_id.contains("{host}") || self.client_id.contains("{instance}");
        let id = if self.share_group.is_some() && !templated {
            format!("{}-{{host}}-{{instance}}", self.client_id)
        } else {
            self.client_id.clone()
        };
        if !id.contains('{') {
            return id;
        }
        id.replace("{host}", &host_name())
            .replace("{instance}", &self.instance.to_string())
    }

    /// Checks what a connection cannot check for itself: a write batch of
    /// at least 1, the share group's name, and that shared subscriptions
    /// are asked for over MQTT 5.
    pub fn check(&self) -> Result<(), String> {
        if self.write_batch == 0 {
            return Err(
                "[mqtt] write_batch must be at least 1 (1: each request written alone)".into(),
            );
        }
        let Some(group) = &self.share_group else {
            return Ok(());
        };
        if group.is_empty()
            || group.len() > 64
            || !group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "[mqtt] share_group `{}`: use 1 to 64 letters, digits, `-` and `_`",
                group.escape_debug()
            ));
        }
        if self.protocol != Protocol::V5 {
            return Err(format!(
                "[mqtt] share_group `{group}` needs protocol = \"5\": shared subscriptions are MQTT 5 (`--mqtt-version 5`)"
            ));
        }
        Ok(())
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

/// The host's name as a client id may carry it: letters, digits, `-`, `_`
/// and `.`, others replaced by `-`, at most 64 bytes; `host` when unknown.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() { "host".into() } else { name }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> MqttSettings {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn a_write_batch_of_zero_is_refused() {
        let zero = settings("write_batch = 0");
        assert!(zero.check().unwrap_err().contains("write_batch"));
        assert!(settings("write_batch = 1").check().is_ok());
        assert_eq!(MqttSettings::default().write_batch, 64);
    }

    #[test]
    fn outputs_take_a_connection_of_their_own_unless_told_to_share() {
        assert_eq!(
            MqttSettings::default().output_connection,
            OutputConnection::Separate
        );
        assert_eq!(
            settings("output_connection = \"shared\"").output_connection,
            OutputConnection::Shared
        );
        let err = toml::from_str::<MqttSettings>("output_connection = \"both\"").unwrap_err();
        assert!(err.to_string().contains("separate"), "{err}");
    }

    #[test]
    fn gateways_sharing_a_file_get_distinct_client_ids_that_survive_a_restart() {
        let plain = settings("client_id = \"gw\"");
        assert_eq!(plain.effective_client_id(), "gw");
        let one =
            settings("client_id = \"gw\"\nshare_group = \"g\"\nprotocol = \"5\"\ninstance = 1");
        let two = MqttSettings {
            instance: 2,
            ..one.clone()
        };
        let host = host_name();
        assert_eq!(one.effective_client_id(), format!("gw-{host}-1"));
        assert_eq!(two.effective_client_id(), format!("gw-{host}-2"));
        assert_eq!(one.effective_client_id(), one.clone().effective_client_id());
        assert_eq!(one.status_topic(), format!("ganglion/status/gw-{host}-1"));
        let templated =
            settings("client_id = \"edge-{instance}\"\nshare_group = \"g\"\ninstance = 7");
        assert_eq!(templated.effective_client_id(), "edge-7");
        assert!(!host.is_empty() && !host.contains(['/', '+', '#', '$', ' ']));
    }

    #[test]
    fn shared_subscriptions_need_mqtt_5_and_a_plain_group_name() {
        let v311 = settings("share_group = \"g\"");
        let err = v311.check().unwrap_err();
        assert!(err.contains("protocol = \"5\""), "{err}");
        assert!(
            settings("share_group = \"g\"\nprotocol = \"5\"")
                .check()
                .is_ok()
        );
        for bad in ["", "a/b", "#", "+", "g\u{0}", "$share"] {
            let s = MqttSettings {
                share_group: Some(bad.into()),
                protocol: Protocol::V5,
                ..MqttSettings::default()
            };
            assert!(s.check().is_err(), "{bad:?} accepted");
        }
        assert!(settings("").check().is_ok());
    }
}
