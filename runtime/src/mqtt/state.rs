//! The task that owns a connection's state: publishes waiting for their
//! packet id and for their PUBACK, and the acknowledgement order of the
//! deliveries. Handles send it [`Command`]s; the event loop sends it what
//! the broker did ([`LoopEvent`]). Nothing here is shared or locked: the one
//! task is the order (rumqttc's own client / event-loop split, one level up).
//!
//! Limits: commands wait in a channel of [`COMMANDS`] (a full one holds the
//! lanes back, as rumqttc's own full request channel did); loop events are
//! unbounded so that the event loop never waits on this task, and are
//! bounded in practice by what the broker can acknowledge: the publishes in
//! flight, at most rumqttc's request channel plus its in-flight window.

use super::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Commands a connection's state task takes at once before senders wait.
pub(super) const COMMANDS: usize = 1024;

/// Completes a publish: `Ok` on the broker's PUBACK (PUBCOMP for QoS 2, the
/// write for QoS 0), or why not.
pub(super) type Confirmation = oneshot::Sender<Result<(), TransportError>>;

/// What a handle asks of the state task.
pub(super) enum Command {
    /// Queue a publish behind every one queued before it.
    Publish(Outgoing, Confirmation),
    /// Take a delivery's place in the acknowledgement order, with its
    /// PUBACK (`true`) or released for redelivery (`false`).
    Settle(
        Arc<dyn TransportAck>,
        bool,
        oneshot::Sender<Result<(), TransportError>>,
    ),
}

/// What the event loop saw, in the order it saw it.
pub(super) enum LoopEvent {
    /// rumqttc wrote a PUBLISH with this packet id (0 for QoS 0).
    Sent(u16),
    /// The broker acknowledged (or refused) the publish with this packet id.
    Acknowledged(u16, Result<(), TransportError>),
}

/// Publishes waiting for their packet id (in request order), and those
/// waiting for their PUBACK (by packet id).
#[derive(Default)]
struct Pending {
    unnumbered: VecDeque<Confirmation>,
    by_pkid: HashMap<u16, Confirmation>,
}

/// Acknowledgements of the current connection, released in arrival order.
#[derive(Default)]
struct AckOrder {
    connection: u64,
    next: u64,
    done: BTreeMap<u64, Option<Arc<dyn TransportAck>>>,
}

/// The state task's gauges, for the metrics.
#[derive(Clone, Default)]
pub(super) struct Gauges {
    /// Counts the connections (the event loop's ConnAcks).
    pub connection: Arc<AtomicU64>,
    /// Publishes written and waiting for their PUBACK.
    pub in_flight: Arc<AtomicUsize>,
    /// Publishes handed to rumqttc and not yet written (waiting for a
    /// packet id, a free in-flight slot or the connection).
    pub unsent: Arc<AtomicUsize>,
}

/// Runs until every handle is gone, keeping `gauges` current.
pub(super) async fn run(
    client: Client,
    gauges: Gauges,
    mut commands: mpsc::Receiver<Command>,
    mut events: mpsc::UnboundedReceiver<LoopEvent>,
) {
    let mut pending = Pending::default();
    let mut order = AckOrder::default();
    loop {
        tokio::select! {
            // What the broker did first: it frees packet ids and completes
            // publishes, whatever the handles are waiting to ask.
            biased;
            Some(event) = events.recv() => pending.on(event),
            Some(command) = commands.recv() => match command {
                Command::Publish(out, confirmation) => {
                    // Before the request enters rumqttc's channel, so that
                    // its `Sent` event finds it at the front.
                    pending.unnumbered.push_back(confirmation);
                    if let Err(e) = client.publish(out.topic, out.qos, out.retain, out.payload).await
                        && let Some(confirmation) = pending.unnumbered.pop_back()
                    {
                        let _ = confirmation.send(Err(e));
                    }
                }
                Command::Settle(token, ack, reply) => {
                    let current = gauges.connection.load(Ordering::Acquire);
                    let _ = reply.send(order.settle(&client, current, token, ack).await);
                }
            },
            else => return,
        }
        gauges
            .in_flight
            .store(pending.by_pkid.len(), Ordering::Relaxed);
        gauges
            .unsent
            .store(pending.unnumbered.len(), Ordering::Relaxed);
    }
}

impl Pending {
    fn on(&mut self, event: LoopEvent) {
        match event {
            LoopEvent::Sent(0) => {
                if let Some(tx) = self.unnumbered.pop_front() {
                    let _ = tx.send(Ok(()));
                }
            }
            LoopEvent::Sent(pkid) => {
                // A new publish; a retransmission keeps its registered pkid.
                if !self.by_pkid.contains_key(&pkid)
                    && let Some(tx) = self.unnumbered.pop_front()
                {
                    self.by_pkid.insert(pkid, tx);
                }
            }
            LoopEvent::Acknowledged(pkid, result) => {
                if let Some(tx) = self.by_pkid.remove(&pkid) {
                    let _ = tx.send(result);
                }
            }
        }
    }
}

impl AckOrder {
    /// Takes a delivery's place in the order and sends the PUBACKs that
    /// are now in order. A token of an older connection is dropped: after
    /// a reconnection the broker reuses packet ids, and it delivers that
    /// message again anyway.
    async fn settle(
        &mut self,
        client: &Client,
        current: u64,
        token: Arc<dyn TransportAck>,
        ack: bool,
    ) -> Result<(), TransportError> {
        let Some(a) = token.as_any().downcast_ref::<MqttAck>() else {
            return Ok(());
        };
        let (connection, seq) = (a.connection, a.seq);
        if self.connection != connection {
            if connection < current {
                return Ok(());
            }
            *self = AckOrder {
                connection,
                ..AckOrder::default()
            };
        }
        // QoS 0 publishes take a place in the order but need no PUBACK.
        let needs = ack && token.needs_ack();
        self.done.insert(seq, needs.then_some(token));
        while let Some(p) = self.done.remove(&self.next) {
            self.next += 1;
            if let Some(a) = p
                .as_ref()
                .and_then(|t| t.as_any().downcast_ref::<MqttAck>())
            {
                client.ack(&a.publish).await?;
            }
        }
        Ok(())
    }
}
