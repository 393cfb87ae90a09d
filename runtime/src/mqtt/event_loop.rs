//! The task that owns a connection's rumqttc event loop: connection state,
//! incoming publishes to the intake channel (bounded by `intake_buffer`),
//! packet ids matched to PUBACKs, and what to resend after a session loss.

use super::*;

/// What an event loop works with: where deliveries go, the connection
/// flag, and the status topic.
pub(super) type LoopArgs = (mpsc::Sender<Delivery>, watch::Sender<bool>, String, usize);

/// The event loop, the same for both protocols: instantiated per version
/// with that version's types in scope.
macro_rules! event_loop {
    ($version:ident, { $($imports:item)* }, $topic_of:item, $received:item, $refusal:item, $sub_refusals:item) => {
        pub(super) mod $version {
            use super::*;
            $($imports)*
            $topic_of
            $received
            $refusal
            $sub_refusals

            pub(in crate::mqtt) async fn run_loop(mut eventloop: EventLoop, handle: MqttHandle, args: LoopArgs) {
                let (deliveries, connected, status_topic, intake_buffer) = args;
                // Deliveries the gateway has not taken yet. QoS 1 and 2 ones
                // are never dropped and are bounded by the broker's window
                // (see docs/NOTES.md); QoS 0 ones past `intake_buffer` are
                // dropped and counted, so a flood cannot exhaust memory.
                let mut overflow: VecDeque<Delivery> = VecDeque::new();
                let mut backoff = Duration::from_millis(100);
                // What rumqttc would resend after a reconnection: publishes awaiting
                // their PUBACK, then requests still in its channel. rumqttc drops them
                // when the broker has no session for us (say, it restarted without
                // persistence); they are put back so every publish still completes.
                let mut unsent: VecDeque<Request> = VecDeque::new();
                let mut seq = 0u64;
                loop {
                    let event = tokio::select! {
                        permit = deliveries.reserve(), if !overflow.is_empty() => {
                            match permit {
                                Ok(p) => {
                                    p.send(overflow.pop_front().expect("overflow is not empty"));
                                    handle.backlog.store(overflow.len(), std::sync::atomic::Ordering::Relaxed);
                                    continue;
                                }
                                Err(_) => return,
                            }
                        }
                        event = eventloop.poll() => event,
                    };
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            backoff = Duration::from_millis(100);
                            handle
                                .gauges
                                .connection
                                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                            seq = 0;
                            if !ack.session_present && !unsent.is_empty() {
                                tracing::warn!(
                                    publishes = unsent.len(),
                                    "the broker had no session for us: sending unacknowledged publishes again"
                                );
                                eventloop.pending = std::mem::take(&mut unsent);
                            }
                            unsent.clear();
                            tracing::info!(
                                session_present = ack.session_present,
                                "connected to the MQTT broker"
                            );
                            let _ = connected.send(true);
                            let publisher = handle.clone();
                            let (filters, status) = (handle.filters(), status_topic.clone());
                            tokio::spawn(async move {
                                for f in filters {
                                    if let Err(e) = publisher
                                        .client
                                        .subscribe(f.clone())
                                        .await
                                    {
                                        tracing::error!(filter = %f, error = %e, "subscribe failed");
                                    }
                                }
                                // Through `publish`, like every QoS 1 publish, so that its
                                // packet id is matched to its PUBACK in order.
                                let online = Outgoing {
                                    topic: status,
                                    payload: b"online".to_vec(),
                                    qos: Qos::AtLeastOnce,
                                    retain: true,
                                };
                                if let Ok(confirm) = publisher.publish(online).await {
                                    let _ = confirm.await;
                                }
                            });
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let message = Message {
                                topic: topic_of(&p),
                                payload: p.payload.to_vec(),
                                timestamp: crate::types::received_now(),
                            };
                            let publish = received(p);
                            if overflow.len() >= intake_buffer && !publish.needs_ack() {
                                // Before it takes a place in the ack order: a QoS 0
                                // delivery needs no acknowledgement.
                                let n = handle.dropped_qos0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                                if n.is_power_of_two() {
                                    tracing::warn!(dropped = n, buffer = intake_buffer, "intake buffer full: QoS 0 deliveries dropped (`[mqtt] intake_buffer`)");
                                }
                                continue;
                            }
                            let connection = handle.gauges.connection.load(std::sync::atomic::Ordering::Acquire);
                            let d = Delivery {
                                message,
                                token: AckToken::Transport(Arc::new(MqttAck {
                                    publish,
                                    connection,
                                    seq,
                                })),
                            };
                            seq += 1;
                            if !overflow.is_empty() {
                                overflow.push_back(d);
                            } else if let Err(mpsc::error::TrySendError::Full(d)) = deliveries.try_send(d) {
                                overflow.push_back(d);
                            } else if deliveries.is_closed() {
                                return;
                            }
                            handle.backlog.store(overflow.len(), std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(Event::Outgoing(Out::Publish(pkid))) => {
                            handle.loop_event(state::LoopEvent::Sent(pkid));
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            let result = match refusal(&ack) {
                                Some(reason) => Err(TransportError::Refused(reason)),
                                None => Ok(()),
                            };
                            handle.loop_event(state::LoopEvent::Acknowledged(ack.pkid, result));
                        }
                        Ok(Event::Incoming(Packet::PubComp(c))) => {
                            handle.loop_event(state::LoopEvent::Acknowledged(c.pkid, Ok(())));
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            let refused = sub_refusals(&ack);
                            if !refused.is_empty() {
                                handle.refused_subscriptions.fetch_add(refused.len() as u64, std::sync::atomic::Ordering::Relaxed);
                                tracing::error!(pkid = ack.pkid, codes = ?refused, filters = ?handle.filters(), "the broker refused a subscription: its rules receive nothing on it");
                            }
                        }
                        Ok(Event::Outgoing(Out::Disconnect)) => {
                            let _ = connected.send(false);
                            return;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if unsent.is_empty() {
                                unsent = eventloop
                                    .pending
                                    .iter()
                                    .filter(|r| matches!(r, Request::Publish(_)))
                                    .cloned()
                                    .collect();
                            }
                            if *connected.borrow() {
                                tracing::warn!(error = %e, "MQTT connection lost; reconnecting");
                            } else {
                                tracing::debug!(error = %e, ?backoff, "MQTT connection failed; retrying");
                            }
                            let _ = connected.send(false);
                            if deliveries.is_closed() {
                                return;
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        }
    };
}

event_loop!(
    v4,
    {
        use rumqttc::{
            Event, EventLoop, Packet, PubAck, Publish, Request, SubAck, SubscribeReasonCode,
        };
    },
    fn topic_of(p: &Publish) -> String {
        p.topic.clone()
    },
    fn received(p: Publish) -> Received {
        Received::V4(p)
    },
    // MQTT 3.1.1's PUBACK carries no reason: a refused publish looks delivered.
    fn refusal(_ack: &PubAck) -> Option<String> {
        None
    },
    fn sub_refusals(ack: &SubAck) -> Vec<String> {
        ack.return_codes
            .iter()
            .filter(|c| matches!(c, SubscribeReasonCode::Failure))
            .map(|c| format!("{c:?}"))
            .collect()
    }
);

event_loop!(
    v5,
    {
        use rumqttc::v5::mqttbytes::v5::{
            Packet, PubAck, PubAckReason, Publish, SubAck, SubscribeReasonCode,
        };
        use rumqttc::v5::{Event, EventLoop, Request};
    },
    fn topic_of(p: &Publish) -> String {
        String::from_utf8_lossy(&p.topic).into_owned()
    },
    fn received(p: Publish) -> Received {
        Received::V5(p)
    },
    fn refusal(ack: &PubAck) -> Option<String> {
        match ack.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
            other => Some(format!("{other:?}")),
        }
    },
    fn sub_refusals(ack: &SubAck) -> Vec<String> {
        ack.return_codes
            .iter()
            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
            .map(|c| format!("{c:?}"))
            .collect()
    }
);
