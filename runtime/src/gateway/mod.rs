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
//! outputs and dead letters and the broker acknowledged them. An output the
//! broker refuses for good (MQTT 5 failure reason code, or over the packet
//! size cap) is dead-lettered instead; when an output or dead letter cannot
//! be delivered at all (the connection is lost) the message is released
//! unacknowledged, so the broker delivers it again rather than it being
//! reported as handled.

mod deliver;
mod stats;

use crate::pipeline::{Outcome, RulePipeline};
use crate::transport::{AckToken, Confirm, Delivery, Publisher, TransportError};
use crate::types::{Message, Outgoing, Qos};
use arc_swap::ArcSwap;
use deliver::{Delivered, UNCONFIRMED_PER_LANE, acknowledge, confirm, deliver, settle};
pub use stats::{HistogramSnapshot, LATENCY_BUCKETS, RuleStats, STAGES};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

/// What the gateway did, for a live view.
#[derive(Debug, Clone)]
pub enum GatewayEvent {
    /// A message a rule took (sent only while someone listens).
    Received {
        /// The rule's name.
        rule: String,
        /// The message's topic.
        topic: String,
        /// The payload as text (lossy).
        payload: String,
    },
    /// A prompt a rule sent to the model.
    Prompt {
        /// The rule's name.
        rule: String,
        /// The prompt's user message (the system message is left out).
        text: String,
    },
    /// What the model answered a rule.
    Completion {
        /// The rule's name.
        rule: String,
        /// The completion text.
        text: String,
    },
    /// An output handed to the publisher; sent before the publish is queued,
    /// so also for one that then fails.
    Published {
        /// The rule's name.
        rule: String,
        /// The topic it goes to.
        topic: String,
        /// The payload as UTF-8, invalid bytes replaced.
        payload: String,
    },
    /// A message a rule could not handle, before its dead letter is published.
    DeadLetter {
        /// The rule's name.
        rule: String,
        /// Where it failed (see [`crate::pipeline::DeadLetter::stage`]).
        stage: String,
        /// The machine-readable reason kind (`bad-payload`, `trap`...).
        kind: String,
        /// The cause, for people.
        reason: String,
    },
}

struct Pending {
    remaining: AtomicUsize,
    /// Set when an output of any rule the message matched was lost.
    lost: std::sync::atomic::AtomicBool,
    token: AckToken,
}

struct Job {
    message: Arc<Message>,
    pending: Arc<Pending>,
}

/// Runs `work`, turning a panic into its message. A lane's tasks run every
/// step through this: a panic that ended a lane would stop its queue, and
/// with it the acknowledgements of the whole connection, which go out in
/// order. Nothing a step keeps is left half-changed by a panic but the
/// windows, whose lock recovers from poisoning.
async fn guarded<T>(work: impl std::future::Future<Output = T>) -> Result<T, String> {
    futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work))
        .await
        .map_err(|p| {
            p.downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into())
        })
}

/// One rule at work: its lanes, and the pipeline version they use.
///
/// The lanes and their workers live as long as the rule; a new version of
/// the rule or of its plugins only swaps `pipeline`. A worker takes the
/// current pipeline once per message, so a message runs start to end on the
/// version it started with and the next message uses the new one.
struct RuleRuntime {
    name: String,
    pipeline: Arc<ArcSwap<RulePipeline>>,
    lanes: Vec<mpsc::Sender<Job>>,
    stats: Arc<RuleStats>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    stop_flusher: watch::Sender<bool>,
}

/// How many lanes each rule gets and how much each queues; `ganglion.toml`
/// sets them in `[rules]`. A value of 0 counts as 1.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Workers per rule. Default 4.
    pub lanes: usize,
    /// Messages queued per lane before dispatch waits. Default 64.
    pub lane_capacity: usize,
    /// `[mqtt] share_group`: the rules' filters are subscribed as
    /// `$share/<group>/<filter>` (see [`crate::rules::Rule::subscriptions`]).
    pub share_group: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            lanes: 4,
            lane_capacity: 64,
            share_group: None,
        }
    }
}

/// Why a rule change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// [`Gateway::shutdown`] has begun; no rule change is taken any more.
    #[error("the gateway is shutting down")]
    Closed,
    /// [`Gateway::remove`] named no running rule.
    #[error("no rule named `{0}`")]
    NoSuchRule(String),
    /// The state store could not record a rule's switch; the rule is as
    /// it was.
    #[error("cannot record the switch of rule `{rule}`: {error}")]
    State {
        /// The rule.
        rule: String,
        /// Why.
        error: crate::state::StateError,
    },
}

/// Routes deliveries to rules and runs them. Rules can be added, replaced
/// and removed while messages flow ([`Gateway::install`], [`Gateway::remove`]).
pub struct Gateway {
    rules: ArcSwap<Vec<Arc<RuleRuntime>>>,
    publisher: Arc<dyn Publisher>,
    config: GatewayConfig,
    events: broadcast::Sender<GatewayEvent>,
    /// Serialises rule changes (install, remove, shutdown); `true` once shut down.
    changes: tokio::sync::Mutex<bool>,
    /// Counters of the rules running, kept through shutdown for a summary.
    stats: Mutex<Vec<(String, Arc<RuleStats>)>>,
}

impl Gateway {
    /// Starts the lane workers and the window flushers of `pipelines`. Their
    /// topic filters are expected to be subscribed already (see
    /// [`topic_filters`]); rules installed later subscribe themselves.
    pub fn start(
        pipelines: Vec<RulePipeline>,
        publisher: Arc<dyn Publisher>,
        config: GatewayConfig,
    ) -> Gateway {
        let (events, _) = broadcast::channel(1024);
        let gateway = Gateway {
            rules: ArcSwap::from_pointee(Vec::new()),
            publisher,
            config,
            events,
            changes: tokio::sync::Mutex::new(false),
            stats: Mutex::new(Vec::new()),
        };
        let rules = pipelines
            .into_iter()
            .map(|p| gateway.spawn_rule(Arc::new(p)))
            .collect();
        gateway.rules.store(Arc::new(rules));
        gateway
    }

    fn spawn_rule(&self, pipeline: Arc<RulePipeline>) -> Arc<RuleRuntime> {
        let name = pipeline.rule.name.clone();
        let current = Arc::new(ArcSwap::new(pipeline));
        let stats = Arc::new(RuleStats::default());
        match current.load().state().rule_disabled(&name) {
            Ok(disabled) => stats.disabled.store(disabled, Ordering::Relaxed),
            Err(e) => {
                tracing::error!(rule = %name, error = %e, "cannot read whether the rule was switched off; it starts enabled")
            }
        }
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.clone(), stats.clone()));
        let (stop_flusher, mut stop) = watch::channel(false);
        let mut lanes = Vec::new();
        let mut workers = Vec::new();
        for _ in 0..self.config.lanes.max(1) {
            let (tx, mut rx) = mpsc::channel::<Job>(self.config.lane_capacity.max(1));
            lanes.push(tx);
            let (current, publisher, stats, events) = (
                current.clone(),
                self.publisher.clone(),
                stats.clone(),
                self.events.clone(),
            );
            workers.push(tokio::spawn(async move {
                // Messages whose outputs are queued but not yet acknowledged by
                // the broker wait here, in order, while processing goes on; a
                // full queue holds the lane.
                let (to_confirm, mut confirming) =
                    mpsc::channel::<(Delivered, Arc<RulePipeline>, Job)>(UNCONFIRMED_PER_LANE);
                let confirmer = {
                    let (publisher, stats) = (publisher.clone(), stats.clone());
                    tokio::spawn(async move {
                        while let Some((delivered, pipeline, job)) = confirming.recv().await {
                            let confirmed =
                                guarded(confirm(delivered, &pipeline, publisher.as_ref(), &stats))
                                    .await
                                    .unwrap_or_else(|what| {
                                        tracing::error!(rule = %pipeline.rule.name, "confirming the outputs panicked: {what}");
                                        false
                                    });
                            if !confirmed {
                                job.pending.lost.store(true, Ordering::Release);
                            }
                            if job.pending.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                                let (publisher, pending) = (publisher.as_ref(), &job.pending);
                                if let Err(what) =
                                    guarded(settle(publisher, pending, &job.message.topic)).await
                                {
                                    // Its place in the acknowledgement order
                                    // must still be given up, or every later
                                    // message of the connection waits on it.
                                    tracing::error!(topic = %job.message.topic, "settling a message panicked: {what}; releasing it");
                                    let _ = guarded(publisher.release(pending.token.clone())).await;
                                }
                            }
                        }
                    })
                };
                while let Some(job) = rx.recv().await {
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    stats.busy.fetch_add(1, Ordering::Relaxed);
                    stats.messages.fetch_add(1, Ordering::Relaxed);
                    let pipeline = current.load_full();
                    if events.receiver_count() > 0 {
                        let _ = events.send(GatewayEvent::Received {
                            rule: pipeline.rule.name.clone(),
                            topic: job.message.topic.clone(),
                            payload: String::from_utf8_lossy(&job.message.payload).into_owned(),
                        });
                    }
                    // A panic in a stage (a host or model-backend bug)
                    // becomes a dead letter and the lane goes on.
                    // Every log line of the message's way (stages, model,
                    // publish) carries its rule, topic and plugin versions,
                    // and its device once the pipeline knows it (after
                    // preprocess; none when the message holds several).
                    let span = tracing::info_span!(
                        "message",
                        rule = %pipeline.rule.name,
                        topic = %job.message.topic,
                        device = tracing::field::Empty,
                        plugins = pipeline.plugin_versions(),
                    );
                    let started = std::time::Instant::now();
                    let processing = pipeline.process(&job.message).instrument(span.clone());
                    let outcome = match guarded(processing).await {
                        Ok(outcome) => outcome,
                        Err(what) => {
                            Outcome {
                                dead_letters: vec![pipeline.dead_letter(
                                    &job.message,
                                    "lane",
                                    "panic",
                                    format!("processing panicked: {what}"),
                                )],
                                ..Outcome::default()
                            }
                        }
                    };
                    stats.observe("end-to-end", started.elapsed().as_secs_f64() * 1000.0);
                    // A panic here (a transport bug) leaves unknown which
                    // outputs went out: the message is released, for the
                    // broker to deliver again, rather than acknowledged.
                    let delivered =
                        guarded(
                            deliver(&pipeline, outcome, publisher.as_ref(), &stats, &events)
                                .instrument(span),
                        )
                        .await
                        .unwrap_or_else(|what| {
                            tracing::error!(rule = %pipeline.rule.name, topic = %job.message.topic, "delivering the outputs panicked: {what}; the message is released for the broker to deliver again");
                            Delivered::lost()
                        });
                    stats.busy.fetch_sub(1, Ordering::Relaxed);
                    if to_confirm.send((delivered, pipeline, job)).await.is_err() {
                        break;
                    }
                }
                drop(to_confirm);
                let _ = confirmer.await;
            }));
        }
        // Flushes windows that are due: time windows, and what a previous
        // version of the rule left in windows the current one no longer has.
        let (flushed, publisher, flusher_stats, events) = (
            current.clone(),
            self.publisher.clone(),
            stats.clone(),
            self.events.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let pipeline = flushed.load_full();
                let period = pipeline
                    .window_seconds()
                    .map_or(Duration::from_secs(1), |secs| {
                        Duration::from_millis((secs * 1000 / 4).clamp(50, 1000))
                    });
                drop(pipeline);
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.changed() => return,
                }
                let pipeline = flushed.load_full();
                // A panic must not end the flusher: time windows would
                // never close again.
                let flushing = async {
                    let outcome = pipeline.flush_expired(false).await;
                    let delivered = deliver(
                        &pipeline,
                        outcome,
                        publisher.as_ref(),
                        &flusher_stats,
                        &events,
                    )
                    .await;
                    confirm(delivered, &pipeline, publisher.as_ref(), &flusher_stats).await
                };
                match guarded(flushing).await {
                    Ok(true) => {}
                    Ok(false) => tracing::error!(rule = %pipeline.rule.name, "outputs of a window flushed by time were not delivered"),
                    Err(what) => tracing::error!(rule = %pipeline.rule.name, "flushing windows by time panicked: {what}"),
                }
            }
        }));
        Arc::new(RuleRuntime {
            name,
            pipeline: current,
            lanes,
            stats,
            workers: Mutex::new(workers),
            stop_flusher,
        })
    }

    /// Counters of every rule now running (after shutdown: of those that
    /// ran to the end).
    pub fn stats(&self) -> Vec<(String, Arc<RuleStats>)> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Enables or disables a rule. A disabled rule keeps its lanes, windows
    /// and counters but takes no new message: [`Gateway::dispatch`] passes
    /// it by (counted in [`RuleStats::skipped`]), and a message no enabled
    /// rule matches is acknowledged as handled, so the broker does not keep
    /// it for later. Messages already queued for the rule finish.
    ///
    /// The switch is kept in the state store, durable before this returns
    /// (an fsync: call it off the executor), and a rule of that name starts
    /// as it was left after a restart; with an in-memory store it lasts
    /// until the process ends.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), GatewayError> {
        let rules = self.rules.load();
        let rule = rules
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| GatewayError::NoSuchRule(name.to_owned()))?;
        rule.pipeline
            .load()
            .state()
            .set_rule_disabled(name, !enabled)
            .map_err(|error| GatewayError::State {
                rule: name.to_owned(),
                error,
            })?;
        rule.stats.disabled.store(!enabled, Ordering::Relaxed);
        Ok(())
    }

    /// The current pipeline of every rule now running.
    pub fn pipelines(&self) -> Vec<Arc<RulePipeline>> {
        self.rules
            .load()
            .iter()
            .map(|r| r.pipeline.load_full())
            .collect()
    }

    /// Every [`GatewayEvent`] from now on. Events are only made while
    /// someone listens; a receiver more than 1024 events behind loses the
    /// oldest ([`broadcast::error::RecvError::Lagged`]).
    pub fn subscribe_events(&self) -> broadcast::Receiver<GatewayEvent> {
        self.events.subscribe()
    }

    /// Adds a rule, or replaces the rule of the same name. A replaced rule
    /// keeps its lanes, counters and open windows: messages already in a
    /// stage finish on the old version, the next one uses `pipeline`. Topic
    /// filters the rule gained are subscribed, ones no rule uses any more
    /// are unsubscribed.
    pub async fn install(&self, pipeline: RulePipeline) -> Result<(), GatewayError> {
        let closed = self.changes.lock().await;
        if *closed {
            return Err(GatewayError::Closed);
        }
        let before = self.filters();
        let rules = self.rules.load_full();
        match rules.iter().find(|r| r.name == pipeline.rule.name) {
            Some(existing) => {
                let old = existing.pipeline.load_full();
                existing
                    .pipeline
                    .store(Arc::new(pipeline.sharing_windows_of(&old)));
            }
            None => {
                let runtime = self.spawn_rule(Arc::new(pipeline));
                let mut next: Vec<Arc<RuleRuntime>> = rules.as_ref().clone();
                next.push(runtime);
                self.rules.store(Arc::new(next));
            }
        }
        self.update_subscriptions(&before).await;
        Ok(())
    }

    /// Removes a rule: stops routing to it, lets its queued and in-flight
    /// messages finish (published and acknowledged), runs its open windows
    /// to the end, and unsubscribes filters no other rule uses.
    pub async fn remove(&self, name: &str) -> Result<(), GatewayError> {
        let closed = self.changes.lock().await;
        if *closed {
            return Err(GatewayError::Closed);
        }
        let before = self.filters();
        let rules = self.rules.load_full();
        let Some(removed) = rules.iter().find(|r| r.name == name).cloned() else {
            return Err(GatewayError::NoSuchRule(name.to_owned()));
        };
        let next: Vec<Arc<RuleRuntime>> =
            rules.iter().filter(|r| r.name != name).cloned().collect();
        self.rules.store(Arc::new(next));
        drop(rules);
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(n, _)| n != name);
        self.update_subscriptions(&before).await;
        self.drain(removed).await;
        Ok(())
    }

    fn filters(&self) -> Vec<String> {
        subscriptions(
            self.pipelines().iter().map(|p| p.rule.as_ref()),
            self.config.share_group.as_deref(),
        )
    }

    async fn update_subscriptions(&self, before: &[String]) {
        let after = self.filters();
        for f in after.iter().filter(|f| !before.contains(f)) {
            if let Err(e) = self.publisher.subscribe(f.clone()).await {
                tracing::error!(filter = %f, error = %e, "subscribe failed");
            }
        }
        for f in before.iter().filter(|f| !after.contains(f)) {
            if let Err(e) = self.publisher.unsubscribe(f.clone()).await {
                tracing::error!(filter = %f, error = %e, "unsubscribe failed");
            }
        }
    }

    /// Waits for a rule that is no longer routed to: its lanes close once
    /// the last dispatch holding them is done.
    async fn drain(&self, rule: Arc<RuleRuntime>) {
        let _ = rule.stop_flusher.send(true);
        let workers = std::mem::take(&mut *rule.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let (current, stats) = (rule.pipeline.clone(), rule.stats.clone());
        drop(rule);
        for w in workers {
            let _ = w.await;
        }
        let pipeline = current.load_full();
        let outcome = pipeline.flush_expired(true).await;
        let delivered = deliver(
            &pipeline,
            outcome,
            self.publisher.as_ref(),
            &stats,
            &self.events,
        )
        .await;
        if !confirm(delivered, &pipeline, self.publisher.as_ref(), &stats).await {
            tracing::error!(rule = %pipeline.rule.name, "outputs of windows run at shutdown were not delivered");
        }
    }

    /// Routes a delivery to every matching rule; waits while their lanes are
    /// full. A message no rule matches is acknowledged at once.
    pub async fn dispatch(&self, delivery: Delivery) {
        let rules = self.rules.load_full();
        let matching: Vec<&Arc<RuleRuntime>> = rules
            .iter()
            .filter(|r| r.pipeline.load().rule.matches(&delivery.message.topic))
            .filter(|r| {
                let disabled = r.stats.disabled.load(Ordering::Relaxed);
                if disabled {
                    r.stats.skipped.fetch_add(1, Ordering::Relaxed);
                }
                !disabled
            })
            .collect();
        if matching.is_empty() {
            tracing::debug!(topic = %delivery.message.topic, "no enabled rule matches; acknowledged");
            let _ = acknowledge(self.publisher.as_ref(), delivery.token).await;
            return;
        }
        let pending = Arc::new(Pending {
            remaining: AtomicUsize::new(matching.len()),
            lost: std::sync::atomic::AtomicBool::new(false),
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
            r.stats.queued.fetch_add(1, Ordering::Relaxed);
            if r.lanes[lane % r.lanes.len()].send(job).await.is_err() {
                r.stats.queued.fetch_sub(1, Ordering::Relaxed);
                tracing::error!(rule = %r.name, "rule lane closed; message left unacknowledged for redelivery");
            }
        }
    }

    /// Stops taking work and rule changes, lets every queued and in-flight
    /// message finish (published and acknowledged), runs the windows still
    /// open to the end, then returns.
    pub async fn shutdown(&self) {
        let mut closed = self.changes.lock().await;
        *closed = true;
        let rules: Vec<Arc<RuleRuntime>> = {
            let all = self.rules.swap(Arc::new(Vec::new()));
            all.iter().cloned().collect()
        };
        for r in rules {
            self.drain(r).await;
        }
    }
}

/// Dispatches deliveries until `stop` completes or the channel closes, then
/// shuts the gateway down. Deliveries not yet taken stay unacknowledged and
/// come again in the next session (the channel stays open during the drain
/// so the MQTT event loop keeps running).
pub async fn serve(
    gateway: &Gateway,
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

/// The filters to subscribe to for every rule, each once (the MQTT
/// connection is made before the gateway starts, since the gateway
/// publishes through it). Under a share group, `$share/<group>/...`
/// ([`crate::rules::Rule::subscriptions`]); routing still matches the topics messages
/// arrive on against the rules' own filters.
pub fn topic_filters(pipelines: &[RulePipeline], share_group: Option<&str>) -> Vec<String> {
    subscriptions(pipelines.iter().map(|p| p.rule.as_ref()), share_group)
}

fn subscriptions<'a>(
    rules: impl Iterator<Item = &'a crate::rules::Rule>,
    share_group: Option<&str>,
) -> Vec<String> {
    let mut f: Vec<String> = rules.flat_map(|r| r.subscriptions(share_group)).collect();
    f.sort();
    f.dedup();
    f
}
