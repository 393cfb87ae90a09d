//! Windows per device: readings gathered until a count or a time is
//! reached, kept in the state store while open (when `persist_windows`),
//! shared with a rule's next version on reload, and bounded by
//! `[rules.limits]`.

use super::*;

pub(super) struct Window {
    batch: ReadingBatch,
    opened: Instant,
    /// When the last reading came in, for `window_idle_seconds`.
    last: Instant,
    /// The message that opened the window, named in dead letters of a time
    /// flush; only a bounded prefix of its payload is kept.
    first: Origin,
}

impl RulePipeline {
    /// Adds readings to the device's window; returns the window's readings
    /// when it is complete by count or full (`max_window_readings`). Refuses
    /// a new device's readings (`Err` with their number) when the rule
    /// already has `max_windows` windows open.
    pub(super) fn add_to_window(
        &self,
        device: &str,
        batch: ReadingBatch,
        message: &Message,
        spec: WindowSpec,
    ) -> Result<(Option<ReadingBatch>, Option<u64>), usize> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if !windows.contains_key(device) && windows.len() >= self.limits.max_windows {
            return Err(batch.len());
        }
        let now = Instant::now();
        let w = windows.entry(device.to_owned()).or_insert_with(|| Window {
            batch: ReadingBatch::default(),
            opened: now,
            last: now,
            first: Origin::of(message, self.limits.dead_letter_payload_bytes),
        });
        w.last = now;
        for r in batch.iter() {
            w.batch
                .push(r.device, r.metric, r.value.clone(), r.unit, r.timestamp);
        }
        let full = spec.count.map_or(self.limits.max_window_readings, |n| {
            n.min(self.limits.max_window_readings)
        });
        if w.batch.len() >= full.max(1) {
            let ran = windows.remove(device).map(|w| w.batch);
            return Ok((ran, self.forget_window(device)));
        }
        let commit = if self.limits.persist_windows {
            let bytes = encode_window(w);
            self.store
                .save_window(&self.rule.name, device, &bytes)
                .map_err(|e| {
                    tracing::error!(rule = %self.rule.name, device, error = %e, "window not persisted");
                })
                .ok()
        } else {
            None
        };
        Ok((None, commit))
    }

    /// Removes a window that ran from the store; the commit, if any.
    pub(super) fn forget_window(&self, device: &str) -> Option<u64> {
        if !self.limits.persist_windows {
            return None;
        }
        self.store
            .delete_window(&self.rule.name, device)
            .map_err(|e| {
                tracing::error!(rule = %self.rule.name, device, error = %e, "ran window not removed from the store");
            })
            .ok()
    }

    /// Completes once the state store's commit `persisted` (an outcome's
    /// [`Outcome::persisted`]) is durable.
    pub async fn durable(&self, persisted: Option<u64>) {
        if let Some(commit) = persisted {
            self.store.durable(commit).await;
        }
    }

    /// This pipeline, taking over the open windows of `previous` (an
    /// earlier version of the same rule): readings already accepted wait on
    /// under the new version's window settings.
    pub fn sharing_windows_of(mut self, previous: &RulePipeline) -> Self {
        self.windows = previous.windows.clone();
        self
    }

    /// Runs every window older than the rule's `seconds` to the end; with
    /// `all`, every open window (at shutdown, so no accepted reading is lost).
    /// A rule without a window runs whatever an earlier version of it left
    /// in windows; one with a count-only window leaves them to fill up.
    pub async fn flush_expired(&self, all: bool) -> Outcome {
        let max_age = match self.window_spec() {
            _ if all => Some(Duration::ZERO),
            None => Some(Duration::ZERO),
            Some(WindowSpec {
                seconds: Some(secs),
                ..
            }) => Some(Duration::from_secs(secs)),
            Some(_) => None,
        };
        // A count-only window fed by a device that went quiet would hold its
        // readings (and memory) for ever.
        let max_idle = (self.limits.window_idle_seconds > 0)
            .then(|| Duration::from_secs(self.limits.window_idle_seconds));
        if max_age.is_none() && max_idle.is_none() {
            return Outcome::default();
        }
        let expired: Vec<(String, Window)> = {
            let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<String> = windows
                .iter()
                .filter(|(_, w)| {
                    max_age.is_some_and(|a| w.opened.elapsed() >= a)
                        || max_idle.is_some_and(|i| w.last.elapsed() >= i)
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| windows.remove(&k).map(|w| (k, w)))
                .collect()
        };
        let mut outcome = Outcome::default();
        for (device, w) in expired {
            outcome.persisted = outcome.persisted.max(self.forget_window(&device));
            if !w.batch.is_empty() {
                outcome.merge(self.run_window((&w.first).into(), &device, w.batch).await);
            }
        }
        outcome
    }

    /// How many windows are open (one per device with readings waiting).
    pub fn pending_windows(&self) -> usize {
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The open windows `rule` left in the store (after a crash, or a stop
/// without a drain); an entry that cannot be read is logged and skipped.
pub(super) fn restore_windows(
    store: &crate::state::StateStore,
    rule: &str,
) -> HashMap<String, Window> {
    let stored = match store.windows(rule) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(rule, error = %e, "open windows not read from the state store");
            return HashMap::new();
        }
    };
    let mut windows = HashMap::new();
    for (device, bytes) in stored {
        match decode_window(&bytes) {
            Some(w) => {
                windows.insert(device, w);
            }
            None => tracing::error!(rule, device, "a stored window could not be read; skipped"),
        }
    }
    if !windows.is_empty() {
        tracing::info!(
            rule,
            windows = windows.len(),
            "open windows restored from the state store"
        );
    }
    windows
}

/// A window as stored: JSON, with times as wall-clock milliseconds (an
/// `Instant` does not survive a restart).
pub(super) fn encode_window(w: &Window) -> Vec<u8> {
    use base64::Engine as _;
    let now = now_ms();
    let age = |t: Instant| now - t.elapsed().as_millis() as i64;
    let readings: Vec<serde_json::Value> = w
        .batch
        .iter()
        .map(|r| {
            let value = match r.value {
                Value::Number(n) => serde_json::json!(n),
                Value::Boolean(b) => serde_json::json!(b),
                Value::Text(t) => serde_json::json!({ "text": t }),
            };
            serde_json::json!([r.device, r.metric, r.unit, value, r.timestamp])
        })
        .collect();
    serde_json::json!({
        "v": 1,
        "opened_ms": age(w.opened),
        "last_ms": age(w.last),
        "first": {
            "topic": w.first.topic,
            "timestamp": w.first.timestamp,
            "prefix": base64::engine::general_purpose::STANDARD.encode(&w.first.prefix),
            "bytes": w.first.bytes,
            "blake3": w.first.blake3,
        },
        "readings": readings,
    })
    .to_string()
    .into_bytes()
}

pub(super) fn decode_window(bytes: &[u8]) -> Option<Window> {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v["v"] != 1 {
        return None;
    }
    let now = now_ms();
    let since = |ms: &serde_json::Value| {
        let ago =
            Duration::from_millis(now.saturating_sub(ms.as_i64().unwrap_or(now)).max(0) as u64);
        Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
    };
    let first = &v["first"];
    let mut batch = ReadingBatch::default();
    for r in v["readings"].as_array()? {
        let value = match &r[3] {
            serde_json::Value::Bool(b) => Value::Boolean(*b),
            serde_json::Value::Object(o) => Value::Text(o.get("text")?.as_str()?.to_owned()),
            n => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        };
        batch.push(
            r[0].as_str()?,
            r[1].as_str()?,
            value,
            r[2].as_str()?,
            r[4].as_i64()?,
        );
    }
    Some(Window {
        batch,
        opened: since(&v["opened_ms"]),
        last: since(&v["last_ms"]),
        first: Origin {
            topic: first["topic"].as_str()?.to_owned(),
            timestamp: first["timestamp"].as_i64()?,
            prefix: base64::engine::general_purpose::STANDARD
                .decode(first["prefix"].as_str()?)
                .ok()?,
            bytes: first["bytes"].as_u64()? as usize,
            blake3: first["blake3"].as_str()?.to_owned(),
        },
    })
}

/// The batch's readings grouped by device, in order of first appearance;
/// linear in the readings (a payload may name thousands of devices).
pub(super) fn split_by_device(batch: ReadingBatch) -> Vec<(String, ReadingBatch)> {
    let mut groups: Vec<(String, ReadingBatch)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for r in batch.iter() {
        let i = *index.entry(r.device).or_insert_with(|| {
            groups.push((r.device.to_owned(), ReadingBatch::default()));
            groups.len() - 1
        });
        groups[i]
            .1
            .push(r.device, r.metric, r.value.clone(), r.unit, r.timestamp);
    }
    groups
}
