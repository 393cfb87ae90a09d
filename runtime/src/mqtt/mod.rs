//! MQTT transport (rumqttc, MQTT 3.1.1 or 5): a persistent session, QoS 1
//! both ways, manual acknowledgements and publishes that complete on the
//! broker's PUBACK.
//!
//! One task owns the rumqttc event loop ([`connect`]) and one the
//! connection's state (publishes in flight, the acknowledgement order:
//! `state.rs`); everyone else holds an [`MqttHandle`] that sends them
//! commands. Incoming publishes go to a channel as [`Delivery`]s; the
//! gateway acknowledges each one with [`Publisher::ack`] only after its
//! outcome is published. The broker's in-flight window of unacknowledged
//! messages is the runtime's backpressure: nothing is dropped on either side.
//!
//! The event loop is written once (`event_loop!`) and instantiated for each
//! protocol's rumqttc types; docs/NOTES.md lists the rumqttc behaviours it
//! works around.

mod event_loop;
mod options;
mod state;

pub use crate::config::{MqttSettings, OutputConnection, Protocol};
use crate::transport::{
    AckToken, Confirm, Delivery, Publisher, QueueFuture, TransportAck, TransportError,
    TransportFuture,
};
use crate::types::{Message, Outgoing, Qos};
pub use options::{broker_address, client_options, network_options};
use rumqttc::{Outgoing as Out, QoS};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// An incoming publish as the protocol's client needs it for the PUBACK.
#[derive(Debug, Clone)]
pub enum Received {
    /// Received over MQTT 3.1.1.
    V4(rumqttc::Publish),
    /// Received over MQTT 5.
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

impl Received {
    fn needs_ack(&self) -> bool {
        match self {
            Received::V4(p) => p.qos != QoS::AtMostOnce,
            Received::V5(p) => p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        }
    }
}

/// The MQTT adapter's [`TransportAck`]: the publish, the number of the
/// connection it came on and its place in that connection's arrivals. MQTT
/// 3.1.1 (4.6) requires PUBACKs in the order the PUBLISHes arrived, so
/// acknowledgements wait for earlier ones; after a reconnection the broker
/// reuses packet ids, so an acknowledgement from an older connection is not
/// sent (the broker delivers the message again).
#[derive(Debug)]
struct MqttAck {
    /// The publish as received; the PUBACK carries its packet id.
    publish: Received,
    /// The connection it came on, numbered from 1 (one per ConnAck).
    connection: u64,
    /// Its place in that connection's arrivals, from 0.
    seq: u64,
}

impl TransportAck for MqttAck {
    fn needs_ack(&self) -> bool {
        self.publish.needs_ack()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The protocol's client.
#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    async fn publish(
        &self,
        topic: String,
        q: Qos,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), TransportError> {
        let r = match self {
            Client::V4(c) => c
                .publish(topic, qos(q), retain, payload)
                .await
                .map_err(|_| ()),
            Client::V5(c) => c
                .publish(topic, qos5(q), retain, payload)
                .await
                .map_err(|_| ()),
        };
        r.map_err(|()| TransportError::Stopped)
    }

    async fn subscribe(&self, filter: String) -> Result<(), TransportError> {
        let r = match self {
            Client::V4(c) => c.subscribe(filter, QoS::AtLeastOnce).await.map_err(|_| ()),
            Client::V5(c) => c
                .subscribe(filter, qos5(Qos::AtLeastOnce))
                .await
                .map_err(|_| ()),
        };
        r.map_err(|()| TransportError::Stopped)
    }

    async fn unsubscribe(&self, filter: String) -> Result<(), TransportError> {
        let r = match self {
            Client::V4(c) => c.unsubscribe(filter).await.map_err(|_| ()),
            Client::V5(c) => c.unsubscribe(filter).await.map_err(|_| ()),
        };
        r.map_err(|()| TransportError::Stopped)
    }

    async fn ack(&self, p: &Received) -> Result<(), TransportError> {
        let r = match (self, p) {
            (Client::V4(c), Received::V4(p)) => c.ack(p).await.map_err(|_| ()),
            (Client::V5(c), Received::V5(p)) => c.ack(p).await.map_err(|_| ()),
            // A token from the other protocol cannot come from this client.
            _ => Ok(()),
        };
        r.map_err(|()| TransportError::Stopped)
    }

    async fn disconnect(&self) {
        match self {
            Client::V4(c) => drop(c.disconnect().await),
            Client::V5(c) => drop(c.disconnect().await),
        }
    }
}

fn qos5(q: Qos) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    match q {
        Qos::AtMostOnce => Q5::AtMostOnce,
        Qos::AtLeastOnce => Q5::AtLeastOnce,
        Qos::ExactlyOnce => Q5::ExactlyOnce,
    }
}

/// The handle everyone but the event-loop task holds. Publishes and
/// acknowledgements go to the connection's state task (`state.rs`), which
/// owns the packet ids in flight and the acknowledgement order;
/// subscriptions and the disconnect go to rumqttc's client directly.
#[derive(Clone)]
pub struct MqttHandle {
    client: Client,
    commands: mpsc::Sender<state::Command>,
    /// What the event loop reports to the state task.
    loop_events: mpsc::UnboundedSender<state::LoopEvent>,
    connected: watch::Receiver<bool>,
    /// The state task's gauges: connections, publishes in flight, unsent.
    gauges: state::Gauges,
    /// Filters subscribed after every connection; changed at run time when
    /// rules come and go.
    filters: Arc<Mutex<Vec<String>>>,
    /// `[mqtt] max_packet_bytes`.
    max_packet_bytes: usize,
    /// QoS 0 deliveries dropped because the intake buffer was full.
    dropped_qos0: Arc<std::sync::atomic::AtomicU64>,
    /// Subscriptions the broker refused (SUBACK failure codes).
    refused_subscriptions: Arc<std::sync::atomic::AtomicU64>,
    /// Deliveries received and waiting for the gateway (the intake buffer).
    backlog: Arc<std::sync::atomic::AtomicUsize>,
}

fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

impl MqttHandle {
    /// True while connected to the broker.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until connected, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Tells the state task what the event loop saw.
    fn loop_event(&self, event: state::LoopEvent) {
        let _ = self.loop_events.send(event);
    }

    /// QoS 0 deliveries dropped because `[mqtt] intake_buffer` was full.
    pub fn dropped_qos0(&self) -> u64 {
        self.dropped_qos0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Deliveries received and not yet taken by the gateway, now.
    pub fn intake_backlog(&self) -> usize {
        self.backlog.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections the broker accepted since the start (CONNACKs); one
    /// more than the reconnections.
    pub fn connections(&self) -> u64 {
        self.gauges
            .connection
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes written and not yet acknowledged by the broker, now.
    pub fn in_flight(&self) -> usize {
        self.gauges
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes asked for and not yet written, now: those waiting for the
    /// state task (at most its command channel, 1024) and those it handed
    /// to rumqttc that wait for a packet id, a free in-flight slot or the
    /// connection. Grows while the broker is away; bounded by the lanes.
    pub fn outbox(&self) -> usize {
        let waiting = self.commands.max_capacity() - self.commands.capacity();
        waiting
            + self
                .gauges
                .unsent
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Subscriptions the broker refused since the start.
    pub fn refused_subscriptions(&self) -> u64 {
        self.refused_subscriptions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a DISCONNECT; the event loop then ends.
    pub async fn disconnect(&self) {
        self.client.disconnect().await;
    }

    /// The filters currently subscribed (or to subscribe on connection).
    pub fn filters(&self) -> Vec<String> {
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Publisher for MqttHandle {
    fn publish(&self, out: Outgoing) -> QueueFuture<'_> {
        Box::pin(async move {
            // Fixed header (5), topic length (2), packet id (2) and, for
            // MQTT 5, a few bytes of properties: 16 covers them.
            let bytes = out.topic.len() + out.payload.len() + 16;
            if bytes > self.max_packet_bytes {
                return Err(TransportError::TooLarge {
                    bytes,
                    max: self.max_packet_bytes,
                });
            }
            // Queued once the state task has the command: it keeps the
            // order; a failure to hand it to rumqttc shows in the
            // confirmation.
            let (tx, rx) = oneshot::channel();
            self.commands
                .send(state::Command::Publish(out, tx))
                .await
                .map_err(|_| TransportError::Stopped)?;
            let confirm: Confirm =
                Box::pin(async move { rx.await.unwrap_or(Err(TransportError::Stopped)) });
            Ok(confirm)
        })
    }

    fn subscribe(&self, filter: String) -> TransportFuture<'_> {
        Box::pin(async move {
            {
                let mut filters = self.filters.lock().unwrap_or_else(|e| e.into_inner());
                if filters.contains(&filter) {
                    return Ok(());
                }
                filters.push(filter.clone());
            }
            // While disconnected the request waits in rumqttc's channel; the
            // next connection subscribes to every filter anyway.
            self.client.subscribe(filter).await
        })
    }

    fn unsubscribe(&self, filter: String) -> TransportFuture<'_> {
        Box::pin(async move {
            let removed = {
                let mut filters = self.filters.lock().unwrap_or_else(|e| e.into_inner());
                let before = filters.len();
                filters.retain(|f| *f != filter);
                filters.len() != before
            };
            if removed {
                self.client.unsubscribe(filter).await?;
            }
            Ok(())
        })
    }

    fn ack(&self, token: AckToken) -> TransportFuture<'_> {
        self.settle(token, true)
    }

    fn release(&self, token: AckToken) -> TransportFuture<'_> {
        self.settle(token, false)
    }
}

impl MqttHandle {
    /// Takes a delivery's place in the acknowledgement order, with its
    /// PUBACK (`ack`) or without (released for redelivery), and sends the
    /// PUBACKs that are now in order.
    fn settle(&self, token: AckToken, ack: bool) -> TransportFuture<'_> {
        Box::pin(async move {
            match token {
                AckToken::Transport(t) => {
                    let (reply, done) = oneshot::channel();
                    self.commands
                        .send(state::Command::Settle(t, ack, reply))
                        .await
                        .map_err(|_| TransportError::Stopped)?;
                    done.await.unwrap_or(Err(TransportError::Stopped))
                }
                AckToken::Done(_) | AckToken::None => Ok(()),
            }
        })
    }
}

/// Connects (in the background, retrying with backoff), subscribes to
/// `filters` at QoS 1 after every connection, and sends incoming publishes to
/// `deliveries`. Returns the handle and the event-loop task, which ends after
/// [`MqttHandle::disconnect`] or when `deliveries` is closed.
pub fn connect(
    settings: &MqttSettings,
    broker: &str,
    filters: Vec<String>,
    deliveries: mpsc::Sender<Delivery>,
) -> Result<(MqttHandle, tokio::task::JoinHandle<()>), TransportError> {
    let endpoint = options::endpoint(settings, broker)?;
    let (connected_tx, connected) = watch::channel(false);
    let status = settings.status_topic();
    let handle = |client: Client| {
        let (commands, commands_rx) = mpsc::channel(state::COMMANDS);
        let (loop_events, events_rx) = mpsc::unbounded_channel();
        let gauges = state::Gauges::default();
        tokio::spawn(state::run(
            client.clone(),
            gauges.clone(),
            commands_rx,
            events_rx,
        ));
        MqttHandle {
            client,
            commands,
            loop_events,
            connected,
            gauges,
            filters: Arc::new(Mutex::new(filters)),
            max_packet_bytes: settings.max_packet_bytes,
            dropped_qos0: Arc::default(),
            refused_subscriptions: Arc::default(),
            backlog: Arc::default(),
        }
    };
    let args = (
        deliveries,
        connected_tx,
        status,
        settings.intake_buffer.max(1),
    );
    let (handle, event_loop): (MqttHandle, Pin<Box<dyn Future<Output = ()> + Send>>) =
        match settings.protocol {
            Protocol::V311 => {
                let (client, mut eventloop) =
                    rumqttc::AsyncClient::new(options::options_v4(settings, endpoint), 1024);
                eventloop.set_network_options(network_options());
                let handle = handle(Client::V4(client));
                (
                    handle.clone(),
                    Box::pin(event_loop::v4::run_loop(eventloop, handle, args)),
                )
            }
            Protocol::V5 => {
                let (client, eventloop) =
                    rumqttc::v5::AsyncClient::new(options::options_v5(settings, endpoint), 1024);
                let handle = handle(Client::V5(client));
                (
                    handle.clone(),
                    Box::pin(event_loop::v5::run_loop(eventloop, handle, args)),
                )
            }
        };
    let task = tokio::spawn(event_loop);
    Ok((handle, task))
}

/// The gateway's broker connections: `intake` subscribes and receives (and
/// acknowledges what it received, in order), `output` publishes; with
/// `[mqtt] output_connection = "shared"` both are the intake connection.
///
/// Why two by default: a broker may hold back its PUBACKs and PINGRESPs to
/// a client while that client's window of unacknowledged deliveries is
/// full — rumqttd 0.20 does (a client paused as inflight-full is only woken
/// by its own acknowledgements). The gateway acknowledges a message only
/// after its outputs are acknowledged, so on one connection a slow stage
/// (the model) holding the window full would wait forever for the PUBACKs
/// of its outputs. On a connection of their own, outputs are acknowledged
/// whatever the intake window holds.
pub struct GatewayLink {
    /// Subscribes, receives the deliveries and acknowledges them.
    pub intake: MqttHandle,
    /// Publishes what the gateway publishes: outputs, dead letters and
    /// reload events (client id with `-out` appended), or the intake
    /// connection when shared.
    pub output: MqttHandle,
    tasks: tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The output connection's delivery channel, kept open and never read
    /// (it subscribes to nothing); none when the output is the intake.
    output_deliveries: Option<mpsc::Receiver<Delivery>>,
}

impl GatewayLink {
    /// Connects the intake and, unless `output_connection` is `"shared"`,
    /// the output connection (its client id is the configured one with
    /// `-out` appended).
    pub fn connect(
        settings: &MqttSettings,
        broker: &str,
        filters: Vec<String>,
        deliveries: mpsc::Sender<Delivery>,
    ) -> Result<GatewayLink, TransportError> {
        let (intake, intake_task) = connect(settings, broker, filters, deliveries)?;
        settings.check().map_err(TransportError::Config)?;
        if settings.output_connection == OutputConnection::Shared {
            return Ok(GatewayLink {
                output: intake.clone(),
                intake,
                tasks: tokio::sync::Mutex::new(vec![intake_task]),
                output_deliveries: None,
            });
        }
        // The output connection subscribes to nothing: no share group, and
        // the intake's effective id with `-out`.
        let out_settings = MqttSettings {
            client_id: format!("{}-out", settings.effective_client_id()),
            share_group: None,
            ..settings.clone()
        };
        let (tx, rx) = mpsc::channel(1);
        let (output, output_task) = connect(&out_settings, broker, Vec::new(), tx)?;
        Ok(GatewayLink {
            intake,
            output,
            tasks: tokio::sync::Mutex::new(vec![intake_task, output_task]),
            output_deliveries: Some(rx),
        })
    }

    /// The distinct connections: the intake, then the output one unless
    /// shared. Gauges summed over these count each connection once.
    pub fn handles(&self) -> impl Iterator<Item = &MqttHandle> {
        let separate = self.output_deliveries.is_some();
        std::iter::once(&self.intake).chain(separate.then_some(&self.output))
    }

    /// Whether every connection is up within `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        futures_util::future::join_all(self.handles().map(|h| h.wait_connected(timeout)))
            .await
            .into_iter()
            .all(|up| up)
    }

    /// Disconnects every connection and waits (bounded) for their event
    /// loops to end.
    pub async fn disconnect(&self) {
        for handle in self.handles() {
            handle.disconnect().await;
        }
        for t in self.tasks.lock().await.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Publisher for GatewayLink {
    fn publish(&self, out: Outgoing) -> QueueFuture<'_> {
        self.output.publish(out)
    }

    fn ack(&self, token: AckToken) -> TransportFuture<'_> {
        self.intake.ack(token)
    }

    fn release(&self, token: AckToken) -> TransportFuture<'_> {
        self.intake.release(token)
    }

    fn subscribe(&self, filter: String) -> TransportFuture<'_> {
        self.intake.subscribe(filter)
    }

    fn unsubscribe(&self, filter: String) -> TransportFuture<'_> {
        self.intake.unsubscribe(filter)
    }
}

#[cfg(test)]
mod filter_check;

#[cfg(test)]
mod tests {
    use super::*;

    /// While the broker is away, publishes wait in the outbox, written
    /// nowhere and in flight nowhere; the gauge counts them.
    #[tokio::test]
    async fn publishes_wait_in_the_outbox_while_the_broker_is_away() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let (deliveries, _rx) = mpsc::channel(4);
        let (handle, task) = connect(
            &MqttSettings::default(),
            &format!("mqtt://127.0.0.1:{port}"),
            Vec::new(),
            deliveries,
        )
        .unwrap();
        let mut confirms = Vec::new();
        for i in 0..3 {
            let out = Outgoing {
                topic: format!("out/{i}"),
                payload: b"{}".to_vec(),
                qos: Qos::AtLeastOnce,
                retain: false,
            };
            confirms.push(handle.publish(out).await.unwrap());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while handle.outbox() != 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(handle.outbox(), 3);
        assert_eq!(handle.in_flight(), 0);
        assert!(!handle.is_connected());
        task.abort();
    }

    #[test]
    fn broker_addresses_and_default_ports() {
        let s = MqttSettings {
            ca_file: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/src/mqtt/mod.rs").into()),
            ..MqttSettings::default()
        };
        let at = |url: &str| {
            options::endpoint(&s, url).map(|e| {
                let kind = match e.transport {
                    rumqttc::Transport::Tcp => "tcp",
                    rumqttc::Transport::Tls(_) => "tls",
                    rumqttc::Transport::Ws => "ws",
                    rumqttc::Transport::Wss(_) => "wss",
                    _ => "other",
                };
                (e.host, e.port, kind)
            })
        };
        assert_eq!(at("mqtt://gw.local"), Ok(("gw.local".into(), 1883, "tcp")));
        assert_eq!(
            at("tcp://10.0.0.2:1884/"),
            Ok(("10.0.0.2".into(), 1884, "tcp"))
        );
        assert_eq!(at("mqtts://gw.local"), Ok(("gw.local".into(), 8883, "tls")));
        assert_eq!(at("ssl://gw.local"), Ok(("gw.local".into(), 8883, "tls")));
        // For WebSockets rumqttc takes the whole URL as the host.
        assert_eq!(
            at("ws://gw.local/mqtt"),
            Ok(("ws://gw.local:80/mqtt".into(), 80, "ws"))
        );
        assert_eq!(
            at("wss://gw.local:8443"),
            Ok(("wss://gw.local:8443/".into(), 8443, "wss"))
        );
        for bad in [
            "gw.local:1883",
            "mqtt://:1883",
            "mqtt://h:port",
            "mqtt://h/path",
            "http://h",
        ] {
            assert!(matches!(at(bad), Err(TransportError::BadUrl(..))), "{bad}");
        }
        // A client certificate needs its key, and TLS.
        let half = MqttSettings {
            cert_file: s.ca_file.clone(),
            ..s.clone()
        };
        assert!(matches!(
            options::endpoint(&half, "mqtts://h"),
            Err(TransportError::BadUrl(_, m)) if m.contains("key_file")
        ));
        let plain = MqttSettings {
            key_file: s.ca_file.clone(),
            ..half
        };
        assert!(matches!(
            options::endpoint(&plain, "mqtt://h"),
            Err(TransportError::BadUrl(_, m)) if m.contains("needs TLS")
        ));
        let missing = MqttSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..MqttSettings::default()
        };
        assert!(matches!(
            options::endpoint(&missing, "mqtts://h"),
            Err(TransportError::Tls(f, _)) if f == "/nonexistent/ca.pem"
        ));
        // The password's source is named, never the password.
        let pw = MqttSettings {
            username: Some("gw".into()),
            password: Some("hunter2".into()),
            password_env: Some("GANGLION_TEST_UNSET_PASSWORD_VAR".into()),
            ..MqttSettings::default()
        };
        let Err(err) = options::endpoint(&pw, "mqtt://h") else {
            panic!("two password sources were accepted");
        };
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
