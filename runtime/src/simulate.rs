//! Simulated sensors: synthetic telemetry with noise and injected anomalies,
//! or a replay of a `timestamp,value` CSV series, published over MQTT at
//! QoS 1.
//!
//! Synthetic devices: `machine-<i>` publish
//! `{"device","metric":"temperature","value","unit":"F","ts"}` on
//! `factory/machine-<i>/telemetry` (around 75 °F, a spike to about 120 °F on
//! every `anomaly_every`-th reading of a device), and `room-<i>` publish
//! `{"device","smoke":bool,"temperature"}` on `home/room-<i>/events` (smoke on
//! the same schedule).
//!
//! Speech replays JSON lines `{"room":…,"text":…}` (the smart-home pack's
//! `data/utterances.jsonl`) as `{"metric":"speech","value":text}` on
//! `home/<room>/say`, over and over.

use crate::config::MqttSettings;
use rumqttc::{AsyncClient, QoS};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where simulated messages come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Generated telemetry from machines and rooms, endless (see the module docs).
    Synthetic {
        /// Number of devices; every fourth is a room, the rest machines. 0 counts as 1.
        devices: usize,
        /// Every n-th reading of a device is an anomaly; 0 means none.
        anomaly_every: u64,
        /// Seed of the noise generator; same seed, same stream.
        seed: u64,
    },
    /// A replay of a CSV file with a header line and `timestamp,value` lines.
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// Topic every message is published on.
        topic: String,
        /// Device name put in each payload.
        device: String,
        /// Metric name put in each payload.
        metric: String,
        /// Unit put in each payload.
        unit: String,
    },
    /// Free-text requests replayed in a loop: JSON lines with `room` and
    /// `text`, each published as a speech reading on `home/<room>/say`.
    Speech {
        /// The JSON-lines file.
        path: PathBuf,
    },
}

/// What to publish, how fast, and for how long.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The message stream.
    pub source: Source,
    /// Messages per second (0: as fast as the broker takes them).
    pub rate: f64,
    /// Stop after this many messages; none means until the source ends.
    pub count: Option<u64>,
    /// Stop after this long; none means no time limit.
    pub duration: Option<Duration>,
    /// The broker login; none connects anonymously.
    pub login: Option<crate::config::Login>,
}

/// Why a simulation failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The CSV file could not be read, or a line is not `timestamp,value`
    /// with a numeric value (file, message).
    #[error("{0}: {1}")]
    Csv(PathBuf, String),
    /// The MQTT client refused a publish.
    #[error("broker: {0}")]
    Broker(String),
}

/// A small deterministic generator (xorshift64*), so runs are reproducible.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A stream of (topic, payload).
pub type Messages = Box<dyn Iterator<Item = (String, Vec<u8>)> + Send>;

/// The messages of a source, in order, as (topic, payload).
pub fn messages(source: &Source) -> Result<Messages, SimError> {
    match source.clone() {
        Source::Synthetic {
            devices,
            anomaly_every,
            seed,
        } => {
            let devices = devices.max(1);
            let mut rng = Rng(seed | 1);
            let start = crate::types::received_now();
            Ok(Box::new((0u64..).map(move |n| {
                let i = (n % devices as u64) as usize;
                let k = n / devices as u64;
                let anomaly = anomaly_every > 0 && k % anomaly_every == anomaly_every - 1;
                let ts = start + n as i64 * 1000;
                if i % 4 == 3 {
                    let device = format!("room-{i}");
                    let temp = 21.0 + rng.next_f64() * 2.0;
                    let payload = serde_json::json!({ "device": device, "smoke": anomaly, "temperature": (temp * 10.0).round() / 10.0, "ts": ts });
                    (format!("home/{device}/events"), payload.to_string().into_bytes())
                } else {
                    let device = format!("machine-{i}");
                    let base = 75.0 + 5.0 * ((k as f64) / 20.0).sin() + rng.next_f64() * 2.0 - 1.0;
                    let value = if anomaly { base + 45.0 } else { base };
                    let payload = serde_json::json!({ "device": device, "metric": "temperature", "value": (value * 100.0).round() / 100.0, "unit": "F", "ts": ts });
                    (format!("factory/{device}/telemetry"), payload.to_string().into_bytes())
                }
            })))
        }
        Source::Csv {
            path,
            topic,
            device,
            metric,
            unit,
        } => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| SimError::Csv(path.clone(), e.to_string()))?;
            let mut out = Vec::new();
            for (n, line) in text.lines().enumerate().skip(1) {
                let Some((ts, value)) = line.split_once(',') else {
                    return Err(SimError::Csv(
                        path.clone(),
                        format!("line {}: expected timestamp,value", n + 1),
                    ));
                };
                let value: f64 = value
                    .trim()
                    .parse()
                    .map_err(|e| SimError::Csv(path.clone(), format!("line {}: {e}", n + 1)))?;
                let payload = serde_json::json!({ "device": device, "metric": metric, "value": value, "unit": unit, "ts": ts.trim() });
                out.push((topic.clone(), payload.to_string().into_bytes()));
            }
            Ok(Box::new(out.into_iter()))
        }
        Source::Speech { path } => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| SimError::Csv(path.clone(), e.to_string()))?;
            let mut out = Vec::new();
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| SimError::Csv(path.clone(), format!("line {}: {e}", n + 1)))?;
                let (Some(room), Some(said)) = (v["room"].as_str(), v["text"].as_str()) else {
                    return Err(SimError::Csv(
                        path.clone(),
                        format!("line {}: expected {{\"room\":…,\"text\":…}}", n + 1),
                    ));
                };
                let payload = serde_json::json!({"metric": "speech", "value": said});
                out.push((format!("home/{room}/say"), payload.to_string().into_bytes()));
            }
            if out.is_empty() {
                return Err(SimError::Csv(path, "no utterances".into()));
            }
            Ok(Box::new(out.into_iter().cycle()))
        }
    }
}

/// Publishes the configured stream to `broker` with the address, TLS and
/// credentials rules of `settings` (`config.login`, when set, replaces its
/// credentials); returns how many messages the broker acknowledged.
pub async fn run(
    config: &SimConfig,
    settings: &MqttSettings,
    broker: &str,
    client_id: &str,
) -> Result<u64, SimError> {
    let mut options = crate::mqtt::client_options(settings, broker, client_id)
        .map_err(|e| SimError::Broker(e.to_string()))?;
    if let Some(login) = &config.login {
        options.set_credentials(&login.username, &login.password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    eventloop.set_network_options(crate::mqtt::network_options());
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked2 = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acked2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "simulator connection lost; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let started = Instant::now();
    let mut sent = 0u64;
    let period = (config.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / config.rate));
    for (topic, payload) in messages(&config.source)? {
        if config.count.is_some_and(|c| sent >= c)
            || config.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        if let Some(p) = period {
            let due = started + p * sent as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| SimError::Broker(e.to_string()))?;
        sent += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(std::sync::atomic::Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    Ok(acked.load(std::sync::atomic::Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_stream_has_both_kinds_and_anomalies() {
        let source = Source::Synthetic {
            devices: 4,
            anomaly_every: 5,
            seed: 7,
        };
        let msgs: Vec<_> = messages(&source).unwrap().take(40).collect();
        assert!(msgs.iter().any(|(t, _)| t == "home/room-3/events"));
        let spikes = msgs
            .iter()
            .filter(|(t, _)| t.starts_with("factory/"))
            .filter(|(_, p)| {
                serde_json::from_slice::<serde_json::Value>(p).unwrap()["value"]
                    .as_f64()
                    .unwrap()
                    > 100.0
            })
            .count();
        assert_eq!(spikes, 6, "3 machines × 10 readings, every 5th a spike");
    }
}
