//! Runs rule pipelines over deliveries: routing by topic, per-rule bounded
//! lanes, publishing outcomes and acknowledging each message last.
//!
//! Each rule has `lanes` workers, each fed by a bounded queue. A message goes
//! to the lane chosen by a hash of its topic, so messages of one topic (one
//! device, in the usual topic layout) are processed in order while topics run
//! concurrently. When a lane's queue is full, [`Gateway::dispatch`] waits:
//! the caller stops taking deliveries, their acknowledgements stop, and the
//! broker stops sending (backpressure without loss).
//!
//! A message is acknowledged once every rule it matched has published its
//! outputs and dead letters and the broker acknowledged them.

use crate::mqtt::{AckToken, Delivery, Publisher};
use crate::pipeline::{Outcome, RulePipeline};
use crate::rules::Outgoing;
use crate::types::{Message, Qos};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

/// Counters of one rule, for status views and tests.
#[derive(Debug, Default)]
pub struct RuleStats {
    pub messages: AtomicU64,
    pub readings: AtomicU64,
    pub published: AtomicU64,
    pub dead_letters: AtomicU64,
}

/// What the gateway did, for a live view.
#[derive(Debug, Clone)]
pub enum GatewayEvent {
    Prompt {
        rule: String,
        text: String,
    },
    Completion {
        rule: String,
        text: String,
    },
    Published {
        rule: String,
        topic: String,
        payload: String,
    },
    DeadLetter {
        rule: String,
        stage: String,
        kind: String,
        reason: String,
    },
}

struct Pending {
    remaining: AtomicUsize,
    token: AckToken,
}

struct Job {
    message: Arc<Message>,
    pending: Arc<Pending>,
}

struct RuleRuntime {
    pipeline: Arc<RulePipeline>,
    lanes: Vec<mpsc::Sender<Job>>,
    stats: Arc<RuleStats>,
}

#[derive(Debug, Clone, Copy)]
pub struct GatewayConfig {
    /// Workers per rule.
    pub lanes: usize,
    /// Messages queued per lane before dispatch waits.
    pub lane_capacity: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            lanes: 4,
            lane_capacity: 64,
        }
    }
}

pub struct Gateway {
    rules: Vec<RuleRuntime>,
    publisher: Arc<dyn Publisher>,
    workers: Vec<JoinHandle<()>>,
    events: broadcast::Sender<GatewayEvent>,
    stop: watch::Sender<bool>,
}

impl Gateway {
    /// Starts the lane workers and the time-window flushers.
    pub fn start(
        pipelines: Vec<RulePipeline>,
        publisher: Arc<dyn Publisher>,
        config: GatewayConfig,
    ) -> Gateway {
        let (events, _) = broadcast::channel(1024);
        let (stop, stop_rx) = watch::channel(false);
        let mut rules = Vec::new();
        let mut workers = Vec::new();
        for p in pipelines {
            let pipeline = Arc::new(p);
            let stats = Arc::new(RuleStats::default());
            let mut lanes = Vec::new();
            for _ in 0..config.lanes.max(1) {
                let (tx, mut rx) = mpsc::channel::<Job>(config.lane_capacity.max(1));
                lanes.push(tx);
                let (pipeline, publisher, stats, events) = (
                    pipeline.clone(),
                    publisher.clone(),
                    stats.clone(),
                    events.clone(),
                );
                workers.push(tokio::spawn(async move {
                    // Messages whose outputs are queued but not yet acknowledged by
                    // the broker wait here, in order, while processing goes on; a
                    // full queue holds the lane.
                    let (to_confirm, mut confirming) = mpsc::channel::<(Vec<Queued>, Job)>(UNCONFIRMED_PER_LANE);
                    let confirmer = {
                        let (publisher, stats) = (publisher.clone(), stats.clone());
                        tokio::spawn(async move {
                            while let Some((queued, job)) = confirming.recv().await {
                                confirm(queued, &stats).await;
                                if job.pending.remaining.fetch_sub(1, Ordering::AcqRel) == 1
                                    && let Err(e) = publisher.ack(job.pending.token.clone()).await
                                {
                                    tracing::warn!(error = %e, topic = %job.message.topic, "acknowledgement not sent; the broker will deliver the message again");
                                }
                            }
                        })
                    };
                    while let Some(job) = rx.recv().await {
                        stats.messages.fetch_add(1, Ordering::Relaxed);
                        let outcome = pipeline.process(&job.message).await;
                        let queued = deliver(&pipeline, outcome, publisher.as_ref(), &stats, &events).await;
                        if to_confirm.send((queued, job)).await.is_err() {
                            break;
                        }
                    }
                    drop(to_confirm);
                    let _ = confirmer.await;
                }));
            }
            if let Some(secs) = pipeline.window_seconds() {
                let (pipeline, publisher, stats, events) = (
                    pipeline.clone(),
                    publisher.clone(),
                    stats.clone(),
                    events.clone(),
                );
                let mut stop = stop_rx.clone();
                workers.push(tokio::spawn(async move {
                    let period = Duration::from_millis((secs * 1000 / 4).clamp(50, 1000));
                    let mut interval = tokio::time::interval(period);
                    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = interval.tick() => {}
                            _ = stop.changed() => return,
                        }
                        let outcome = pipeline.flush_expired(false).await;
                        let confirms =
                            deliver(&pipeline, outcome, publisher.as_ref(), &stats, &events).await;
                        confirm(confirms, &stats).await;
                    }
                }));
            }
            rules.push(RuleRuntime {
                pipeline,
                lanes,
                stats,
            });
        }
        Gateway {
            rules,
            publisher,
            workers,
            events,
            stop,
        }
    }

    pub fn stats(&self) -> Vec<(String, Arc<RuleStats>)> {
        self.rules
            .iter()
            .map(|r| (r.pipeline.rule.name.clone(), r.stats.clone()))
            .collect()
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<GatewayEvent> {
        self.events.subscribe()
    }

    /// Routes a delivery to every matching rule; waits while their lanes are
    /// full. A message no rule matches is acknowledged at once.
    pub async fn dispatch(&self, delivery: Delivery) {
        let matching: Vec<&RuleRuntime> = self
            .rules
            .iter()
            .filter(|r| r.pipeline.rule.matches(&delivery.message.topic))
            .collect();
        if matching.is_empty() {
            tracing::debug!(topic = %delivery.message.topic, "no rule matches; acknowledged");
            let _ = self.publisher.ack(delivery.token).await;
            return;
        }
        let pending = Arc::new(Pending {
            remaining: AtomicUsize::new(matching.len()),
            token: delivery.token,
        });
        let message = Arc::new(delivery.message);
        let lane = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            message.topic.hash(&mut h);
            h.finish() as usize
        };
        for r in matching {
            let job = Job {
                message: message.clone(),
                pending: pending.clone(),
            };
            if r.lanes[lane % r.lanes.len()].send(job).await.is_err() {
                tracing::error!(rule = %r.pipeline.rule.name, "rule lane closed; message left unacknowledged for redelivery");
            }
        }
    }

    /// Stops taking work, lets every queued and in-flight message finish
    /// (published and acknowledged), runs the windows still open to the end,
    /// then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let pipelines: Vec<(Arc<RulePipeline>, Arc<RuleStats>)> = self
            .rules
            .iter()
            .map(|r| (r.pipeline.clone(), r.stats.clone()))
            .collect();
        drop(self.rules);
        for w in self.workers {
            let _ = w.await;
        }
        for (pipeline, stats) in pipelines {
            let outcome = pipeline.flush_expired(true).await;
            deliver(
                &pipeline,
                outcome,
                self.publisher.as_ref(),
                &stats,
                &self.events,
            )
            .await;
        }
    }
}

/// Dispatches deliveries until `stop` completes or the channel closes, then
/// shuts the gateway down. Deliveries not yet taken stay unacknowledged and
/// come again in the next session (the channel stays open during the drain
/// so the MQTT event loop keeps running).
pub async fn serve(
    gateway: Gateway,
    mut deliveries: mpsc::Receiver<Delivery>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            d = deliveries.recv() => match d {
                Some(d) => gateway.dispatch(d).await,
                None => break,
            },
            _ = &mut stop => break,
        }
    }
    gateway.shutdown().await;
    drop(deliveries);
}

/// Messages per lane whose outputs may await the broker's acknowledgement at once.
const UNCONFIRMED_PER_LANE: usize = 256;

/// A queued publish: its confirmation, and whether it is a dead letter.
type Queued = (crate::mqtt::Confirm, bool);

/// Queues an outcome's publishes, outputs first, then dead letters.
async fn deliver(
    pipeline: &RulePipeline,
    outcome: Outcome,
    publisher: &dyn Publisher,
    stats: &RuleStats,
    events: &broadcast::Sender<GatewayEvent>,
) -> Vec<Queued> {
    let rule = &pipeline.rule;
    stats
        .readings
        .fetch_add(outcome.readings as u64, Ordering::Relaxed);
    let mut queued = Vec::with_capacity(outcome.publish.len() + outcome.dead_letters.len() + 1);
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
    for out in outcome.publish {
        if events.receiver_count() > 0 {
            let payload = String::from_utf8_lossy(&out.payload).into_owned();
            let _ = events.send(GatewayEvent::Published {
                rule: rule.name.clone(),
                topic: out.topic.clone(),
                payload,
            });
        }
        match publisher.publish(out).await {
            Ok(c) => queued.push((c, false)),
            Err(e) => tracing::error!(rule = %rule.name, error = %e, "publish not queued"),
        }
    }
    for dl in outcome.dead_letters {
        tracing::warn!(rule = %dl.rule, stage = %dl.stage, kind = %dl.kind, plugin = ?dl.plugin, version = ?dl.version, topic = %dl.topic, "dead letter: {}", dl.reason);
        if events.receiver_count() > 0 {
            let _ = events.send(GatewayEvent::DeadLetter {
                rule: rule.name.clone(),
                stage: dl.stage.clone(),
                kind: dl.kind.clone(),
                reason: dl.reason.clone(),
            });
        }
        let out = Outgoing {
            topic: rule.dead_letter_topic.clone(),
            payload: dl.to_json(),
            qos: Qos::AtLeastOnce,
            retain: false,
        };
        match publisher.publish(out).await {
            Ok(c) => queued.push((c, true)),
            Err(e) => tracing::error!(rule = %rule.name, error = %e, "dead letter not queued"),
        }
    }
    queued
}

/// Waits for the broker to acknowledge queued publishes, counting them.
async fn confirm(queued: Vec<Queued>, stats: &RuleStats) {
    for (c, dead_letter) in queued {
        match c.await {
            Ok(()) if dead_letter => stats.dead_letters.fetch_add(1, Ordering::Relaxed),
            Ok(()) => stats.published.fetch_add(1, Ordering::Relaxed),
            Err(_) => 0,
        };
    }
}

/// The topic filters of every rule, each once, for subscribing (the MQTT
/// connection is made before the gateway starts, since the gateway
/// publishes through it).
pub fn topic_filters(pipelines: &[RulePipeline]) -> Vec<String> {
    let mut f: Vec<String> = pipelines
        .iter()
        .flat_map(|p| p.rule.topics.clone())
        .collect();
    f.sort();
    f.dedup();
    f
}

/// Loads plugins and rules from folders and binds them; returns the
/// pipelines and every problem found (a bad file never stops the others).
pub async fn load(
    host: &crate::plugin::PluginHost,
    plugins_dir: &std::path::Path,
    rules_dir: &std::path::Path,
    llm: Arc<dyn crate::llm::LlmEngine>,
) -> (Vec<RulePipeline>, Vec<String>) {
    let mut problems = Vec::new();
    let mut plugins = HashMap::new();
    match host.load_dir(plugins_dir).await {
        Ok(report) => {
            problems.extend(report.errors.iter().map(ToString::to_string));
            for p in report.plugins {
                plugins.insert(p.name.clone(), p);
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    let mut pipelines = Vec::new();
    match crate::rules::load_dir(rules_dir) {
        Ok((rules, errors)) => {
            problems.extend(errors.iter().map(ToString::to_string));
            for rule in rules {
                let source = rule.source.clone();
                match RulePipeline::new(host, rule, &plugins, llm.clone()) {
                    Ok(p) => pipelines.push(p),
                    Err(e) => problems.push(match source {
                        Some(s) => format!("{}: {e}", s.display()),
                        None => e.to_string(),
                    }),
                }
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    (pipelines, problems)
}
