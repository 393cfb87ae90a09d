//! A lane's outputs on their way out: each publish queued in order, its
//! confirmation awaited (bounded per lane), refused and lost outputs turned
//! into dead letters, and the message acknowledged or released once all of
//! its outputs are settled.

use super::*;

/// Acknowledges a message whose outcome is delivered: to the broker, or to
/// the embedding program that pushed it.
pub(super) async fn acknowledge(
    publisher: &dyn Publisher,
    token: AckToken,
) -> Result<(), TransportError> {
    match token {
        AckToken::Done(signal) => {
            signal.fire();
            Ok(())
        }
        token => publisher.ack(token).await,
    }
}

/// Messages per lane whose outputs may await the broker's acknowledgement at once.
pub(super) const UNCONFIRMED_PER_LANE: usize = 256;

/// What a queued publish was, for counting and for what follows a refusal.
pub(super) enum Sent {
    /// An output; kept, so that a broker's refusal can be dead-lettered.
    Output(Outgoing),
    /// A dead letter, with its kind.
    DeadLetter(String),
}

/// A queued publish: its confirmation, and what it was.
pub(super) type Queued = (Confirm, Sent);

/// An outcome handed to the publisher: what was queued, and whether
/// anything could not be (nor dead-lettered in its place).
pub(super) struct Delivered {
    queued: Vec<Queued>,
    lost: bool,
    /// The state store commit holding windows the outcome added to.
    persisted: Option<u64>,
}

impl Delivered {
    /// Nothing queued and something lost: the message is released.
    pub(super) fn lost() -> Delivered {
        Delivered {
            queued: Vec::new(),
            lost: true,
            persisted: None,
        }
    }
}

/// Acknowledges a message all of whose rules are done, or releases it for
/// redelivery when an output of any of them was lost.
pub(super) async fn settle(publisher: &dyn Publisher, pending: &Pending, topic: &str) {
    if pending.lost.load(Ordering::Acquire) {
        tracing::error!(topic = %topic, "outputs of the message were not all delivered: left unacknowledged, so the broker delivers it again");
        if let Err(e) = publisher.release(pending.token.clone()).await {
            tracing::warn!(error = %e, topic = %topic, "release not taken");
        }
    } else if let Err(e) = acknowledge(publisher, pending.token.clone()).await {
        tracing::warn!(error = %e, topic = %topic, "acknowledgement not sent; the broker will deliver the message again");
    }
}

/// Queues an outcome's publishes, outputs first, then dead letters. An
/// output refused before it is queued for good (too large) is
/// dead-lettered in its place.
pub(super) async fn deliver(
    pipeline: &RulePipeline,
    outcome: Outcome,
    publisher: &dyn Publisher,
    stats: &RuleStats,
    events: &broadcast::Sender<GatewayEvent>,
) -> Delivered {
    let rule = &pipeline.rule;
    stats
        .readings
        .fetch_add(outcome.readings as u64, Ordering::Relaxed);
    for (stage, ms) in &outcome.stage_ms {
        stats.observe(stage, *ms);
    }
    let mut queued = Vec::with_capacity(outcome.publish.len() + outcome.dead_letters.len() + 1);
    let mut lost = false;
    let persisted = outcome.persisted;
    if events.receiver_count() > 0 {
        for text in &outcome.prompts {
            let _ = events.send(GatewayEvent::Prompt {
                rule: rule.name.clone(),
                text: text.clone(),
            });
        }
        for text in &outcome.completions {
            let _ = events.send(GatewayEvent::Completion {
                rule: rule.name.clone(),
                text: text.clone(),
            });
        }
    }
    let mut dead_letters = outcome.dead_letters;
    for out in outcome.publish {
        if events.receiver_count() > 0 {
            let payload = String::from_utf8_lossy(&out.payload).into_owned();
            let _ = events.send(GatewayEvent::Published {
                rule: rule.name.clone(),
                topic: out.topic.clone(),
                payload,
            });
        }
        match publisher.publish(out.clone()).await {
            Ok(c) => queued.push((c, Sent::Output(out))),
            Err(e) if e.is_permanent() => dead_letters.push(pipeline.output_dead_letter(
                &out,
                "oversized-output",
                e.to_string(),
            )),
            Err(e) => {
                lost = true;
                tracing::error!(rule = %rule.name, error = %e, "publish not queued");
            }
        }
    }
    for dl in dead_letters {
        stats.dead_letter_seen(&dl.stage, &dl.kind, &dl.reason);
        lost |= !queue_dead_letter(pipeline, dl, publisher, Some(events), &mut queued).await;
    }
    Delivered {
        queued,
        lost,
        persisted,
    }
}

/// Logs a dead letter and queues it on the rule's dead-letter topic; false
/// when it could not be queued.
pub(super) async fn queue_dead_letter(
    pipeline: &RulePipeline,
    dl: crate::pipeline::DeadLetter,
    publisher: &dyn Publisher,
    events: Option<&broadcast::Sender<GatewayEvent>>,
    queued: &mut Vec<Queued>,
) -> bool {
    let rule = &pipeline.rule;
    tracing::warn!(rule = %dl.rule, stage = %dl.stage, kind = %dl.kind, plugin = ?dl.plugin, version = ?dl.version, topic = %dl.topic, "dead letter: {}", dl.reason);
    if let Some(events) = events.filter(|e| e.receiver_count() > 0) {
        let _ = events.send(GatewayEvent::DeadLetter {
            rule: rule.name.clone(),
            stage: dl.stage.clone(),
            kind: dl.kind.clone(),
            reason: dl.reason.clone(),
        });
    }
    let kind = dl.kind.clone();
    let out = Outgoing {
        topic: rule.dead_letter_topic.clone(),
        payload: dl.to_json(),
        qos: Qos::AtLeastOnce,
        retain: false,
    };
    match publisher.publish(out).await {
        Ok(c) => {
            queued.push((c, Sent::DeadLetter(kind)));
            true
        }
        Err(e) => {
            tracing::error!(rule = %rule.name, error = %e, "dead letter not queued");
            false
        }
    }
}

/// Waits for the broker to acknowledge queued publishes, counting them. An
/// output the broker refuses (MQTT 5 failure reason code) is dead-lettered
/// and that waited for too. False when something was lost: not queued, not
/// confirmed, or a refused dead letter.
pub(super) async fn confirm(
    delivered: Delivered,
    pipeline: &RulePipeline,
    publisher: &dyn Publisher,
    stats: &RuleStats,
) -> bool {
    // A reading a window took is only safe to acknowledge once durable.
    pipeline.durable(delivered.persisted).await;
    let mut ok = !delivered.lost;
    let mut refused = Vec::new();
    for (c, sent) in delivered.queued {
        match (c.await, sent) {
            (Ok(()), Sent::DeadLetter(kind)) => stats.dead_letter_confirmed(&kind),
            (Ok(()), Sent::Output(_)) => {
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
            (Err(e), Sent::Output(out)) if e.is_permanent() => {
                refused.push(pipeline.output_dead_letter(&out, "publish-refused", e.to_string()));
            }
            (Err(e), _) => {
                tracing::error!(rule = %pipeline.rule.name, error = %e, "publish not confirmed");
                ok = false;
            }
        }
    }
    if !refused.is_empty() {
        let mut queued = Vec::new();
        for dl in refused {
            stats.dead_letter_seen(&dl.stage, &dl.kind, &dl.reason);
            ok &= queue_dead_letter(pipeline, dl, publisher, None, &mut queued).await;
        }
        for (c, sent) in queued {
            match c.await {
                Ok(()) => {
                    if let Sent::DeadLetter(kind) = sent {
                        stats.dead_letter_confirmed(&kind);
                    }
                }
                Err(e) => {
                    tracing::error!(rule = %pipeline.rule.name, error = %e, "dead letter of a refused output not confirmed");
                    ok = false;
                }
            }
        }
    }
    ok
}
