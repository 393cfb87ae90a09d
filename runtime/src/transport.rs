//! The seam between the gateway and whatever carries its messages: the
//! [`Publisher`] trait (publish, acknowledge, subscribe), the [`Delivery`]
//! it hands the gateway and the opaque [`AckToken`] that comes back. The
//! MQTT adapter implements it over a broker; the embedding API over
//! channels; [`RecordingPublisher`] records for tests.

use crate::types::{Message, Outgoing};
use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Why a connection could not be set up, or a request not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The client's event loop has ended (or, for a channel publisher, the
    /// receiver is gone): the request was not queued, or a queued publish
    /// will never be confirmed.
    #[error("MQTT client stopped")]
    Stopped,
    /// The broker address (first field) is unusable, for the reason in the
    /// second: no `scheme://`, an unknown scheme, no host, a bad port, a
    /// client certificate without its key or without TLS, or TLS without
    /// `ca_file` on a system without root certificates.
    #[error("invalid broker address `{0}`: {1}")]
    BadUrl(String, String),
    /// A TLS file (`ca_file`, `cert_file`, `key_file`: the first field)
    /// could not be read, with the I/O error.
    #[error("cannot read TLS file {0}: {1}")]
    Tls(String, String),
    /// The password could not be had from its source (`[mqtt]
    /// password_file`, `password_env`); the message names the source,
    /// never the password.
    #[error("MQTT credentials: {0}")]
    Credentials(String),
    /// The broker answered a publish with a failure reason code (MQTT 5
    /// PUBACK: not authorized, quota exceeded, topic invalid...). Sending it
    /// again would be refused again.
    #[error("the broker refused the publish: {0}")]
    Refused(String),
    /// The packet would be larger than `[mqtt] max_packet_bytes`; it was not
    /// queued (the client would fail the write, reconnect and send it again
    /// for ever).
    #[error("packet of {bytes} bytes over the cap of {max} (`[mqtt] max_packet_bytes`)")]
    TooLarge {
        /// The packet's size, about.
        bytes: usize,
        /// The cap.
        max: usize,
    },
    /// `[mqtt]` asks for something the connection cannot do (a share group
    /// over MQTT 3.1.1, a share group name that is not one topic level).
    #[error("{0}")]
    Config(String),
}

impl TransportError {
    /// True when trying again cannot help: the broker refused the publish,
    /// or it is too large to send. The gateway dead-letters such an output
    /// instead of leaving its message for redelivery.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            TransportError::Refused(_) | TransportError::TooLarge { .. }
        )
    }
}

/// Completes when the client has taken a request (an acknowledgement, a
/// subscription change); the broker's answer is not awaited.
pub type TransportFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send + 'a>>;

/// Completes when the broker acknowledged a queued publish.
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send + 'static>>;

/// Completes when a publish is queued, with its [`Confirm`].
pub type QueueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Confirm, TransportError>> + Send + 'a>>;

/// What acknowledging a delivery needs. Opaque outside the transport that
/// made it: the gateway only hands it back to the same [`Publisher`].
#[derive(Debug, Clone)]
pub enum AckToken {
    /// A transport's own acknowledgement (over MQTT: the PUBACK, sent in
    /// arrival order). Only the transport that made it can act on it;
    /// another drops it.
    Transport(Arc<dyn TransportAck>),
    /// A message pushed by an embedding program, which learns through the
    /// signal when the message is done (see `Runtime::push`). The gateway
    /// completes it itself; publishers never see it.
    Done(DoneSignal),
    /// A delivery that needs no acknowledgement (QoS 0, or a test).
    None,
}

/// A transport's acknowledgement state for one delivery.
pub trait TransportAck: Any + Send + Sync + std::fmt::Debug {
    /// Whether the sender waits for an acknowledgement (an MQTT QoS 0
    /// delivery does not).
    fn needs_ack(&self) -> bool;
    /// For the transport to recover its own type.
    fn as_any(&self) -> &dyn Any;
}

/// Completes once, when the message it belongs to has been handled.
#[derive(Clone, Default)]
pub struct DoneSignal(Arc<Mutex<Option<oneshot::Sender<()>>>>);

impl DoneSignal {
    /// A signal and what completes when it fires.
    pub fn new() -> (DoneSignal, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (DoneSignal(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Completes the receiver. Only the first call, on any clone, does
    /// anything; a receiver already dropped is ignored.
    pub fn fire(&self) {
        if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

impl std::fmt::Debug for DoneSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DoneSignal")
    }
}

/// An incoming message and what acknowledges it once it is handled.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message, stamped with the time it was received.
    pub message: Message,
    /// Acknowledged once every rule the message matched has published its
    /// outcome; dropped unacknowledged, the message comes again.
    pub token: AckToken,
}

/// Publishing and acknowledging, behind a trait so that pipelines can be
/// tested without a broker ([`RecordingPublisher`]).
pub trait Publisher: Send + Sync + 'static {
    /// Queues a publish behind every publish queued before it, and returns
    /// what completes when the broker acknowledged it (QoS ≥ 1) or it was
    /// written (QoS 0). While disconnected the confirmation waits for the
    /// reconnection.
    fn publish(&self, out: Outgoing) -> QueueFuture<'_>;
    /// Acknowledges a delivery whose outcome is published. Over MQTT that
    /// is the PUBACK, sent in arrival order, and not sent at all for a
    /// delivery of an earlier connection (the broker delivers it again);
    /// tokens that need nothing complete at once.
    fn ack(&self, token: AckToken) -> TransportFuture<'_>;
    /// Gives up a delivery whose outputs were not all delivered: over MQTT
    /// its place in the acknowledgement order is released without a PUBACK,
    /// so later deliveries are still acknowledged and the broker delivers
    /// this one again on the next session. Transports without
    /// acknowledgements drop the token.
    fn release(&self, token: AckToken) -> TransportFuture<'_> {
        drop(token);
        Box::pin(async { Ok(()) })
    }
    /// Adds a topic filter to the subscriptions (kept across reconnections).
    /// Transports without subscriptions accept it and do nothing.
    fn subscribe(&self, filter: String) -> TransportFuture<'_> {
        let _ = filter;
        Box::pin(async { Ok(()) })
    }
    /// Removes a topic filter from the subscriptions.
    fn unsubscribe(&self, filter: String) -> TransportFuture<'_> {
        let _ = filter;
        Box::pin(async { Ok(()) })
    }
}

/// A [`Publisher`] that records what would be published, for tests.
#[derive(Default)]
pub struct RecordingPublisher {
    published: Mutex<Vec<Outgoing>>,
    acks: std::sync::atomic::AtomicUsize,
    filters: Mutex<Vec<String>>,
}

impl RecordingPublisher {
    /// Everything published so far, in order.
    pub fn published(&self) -> Vec<Outgoing> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times [`Publisher::ack`] was called, whatever the token.
    pub fn acks(&self) -> usize {
        self.acks.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Filters subscribed through [`Publisher::subscribe`] and not unsubscribed.
    pub fn filters(&self) -> Vec<String> {
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Publisher for RecordingPublisher {
    fn publish(&self, out: Outgoing) -> QueueFuture<'_> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(out);
        Box::pin(async {
            let confirm: Confirm = Box::pin(async { Ok(()) });
            Ok(confirm)
        })
    }

    fn ack(&self, _token: AckToken) -> TransportFuture<'_> {
        self.acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn subscribe(&self, filter: String) -> TransportFuture<'_> {
        let mut f = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        if !f.contains(&filter) {
            f.push(filter);
        }
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, filter: String) -> TransportFuture<'_> {
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|f| *f != filter);
        Box::pin(async { Ok(()) })
    }
}
