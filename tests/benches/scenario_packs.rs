//! What the default model (SmolLM2-135M-Instruct Q4_1) does on the scenario
//! packs' sample data: a measurement, not a tuning target. The tables in
//! each pack's README come from this.
//!
//! `cargo bench -p ganglion-tests --bench scenario_packs` (after
//! `cargo run -p xtask -- plugins` and `cargo run -p xtask -- model`).

use ganglion::llm::LlmEngine;
use ganglion_tests::packs::{
    failure_windows, labelled_windows, machine_rows, occupancy_rows, pack, run_rules, say, start,
    utterances,
};
use std::sync::Arc;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let config = ganglion_llm::EngineConfig {
        path: Some(xtask::model_path()),
        ..Default::default()
    };
    let engine: Arc<dyn LlmEngine> = Arc::new(
        ganglion_llm::Engine::load_with_progress(&config, false)
            .expect("the default model (cargo run -p xtask -- model)")
            .0,
    );
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("industrial") {
        industrial(engine.clone()).await;
    }
    if run("traffic") {
        traffic(engine.clone()).await;
    }
    if run("smart-home") {
        smart_home(engine).await;
    }
}

/// The occupancy replay, an hour (12 readings) per classification: which
/// hours got an advisory, by state, against the labelled anomaly window.
async fn traffic(engine: Arc<dyn LlmEngine>) {
    let (rt, mut out) = start(&pack("traffic").join("rules"), engine).await;
    let labels = labelled_windows("traffic", "anomaly-windows.json", "anomaly_windows");
    let rows = occupancy_rows();
    let mut table: std::collections::BTreeMap<(String, &str), (u32, u32)> = Default::default();
    let (mut hours, mut anomalous_hours) = (0, 0);
    for hour in rows.chunks(12) {
        for (_, (topic, payload)) in hour {
            rt.push(topic.clone(), payload.clone().into_bytes())
                .await
                .unwrap();
        }
        if hour.len() < 12 {
            break;
        }
        hours += 1;
        let (first, last) = (&hour[0].0, &hour[hour.len() - 1].0);
        let anomalous = labels
            .iter()
            .any(|(s, e)| first.as_str() <= e.as_str() && last.as_str() >= s.as_str());
        anomalous_hours += u32::from(anomalous);
        let mean: f64 = hour
            .iter()
            .filter_map(|(_, (_, p))| serde_json::from_str::<serde_json::Value>(p).ok())
            .filter_map(|v| v["value"].as_f64())
            .sum::<f64>()
            / hour.len() as f64;
        let band = if mean < 6.0 {
            "under 6%"
        } else if mean < 10.0 {
            "6-10%"
        } else {
            "10% and over"
        };
        let mut state = "free flowing traffic (no advisory)".to_owned();
        while let Ok(o) = out.try_recv() {
            if o.topic.starts_with("signage/") {
                let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap_or_default();
                state = v["state"].as_str().unwrap_or("?").to_owned();
            } else {
                state = format!("dead letter on {}", o.topic);
            }
        }
        let e = table.entry((state, band)).or_default();
        e.0 += 1;
        e.1 += u32::from(anomalous);
    }
    rt.shutdown().await;
    println!("## traffic\n");
    println!(
        "{hours} hours classified, {anomalous_hours} of them overlapping the labelled anomaly window.\n"
    );
    println!(
        "| the model's state | hour's mean occupancy | hours | of which in the anomaly window |"
    );
    println!("|---|---|---:|---:|");
    for ((state, band), (n, a)) in &table {
        println!("| {state} | {band} | {n} | {a} |");
    }
    println!();
}

/// The machine temperature replay, a day (288 readings) per decision: which
/// days got a maintenance alert, against the labelled failure windows.
async fn industrial(engine: Arc<dyn LlmEngine>) {
    let (rt, mut out) = start(&pack("industrial").join("rules"), engine).await;
    let labels = failure_windows();
    let rows = machine_rows();
    let (mut days, mut failure_days, mut true_alerts, mut false_alerts, mut invalid) =
        (0, 0, 0, 0, 0);
    let mut windows_hit = vec![false; labels.len()];
    let mut alerted_days = Vec::new();
    for day in rows.chunks(288) {
        for (_, (topic, payload)) in day {
            rt.push(topic.clone(), payload.clone().into_bytes())
                .await
                .unwrap();
        }
        if day.len() < 288 {
            break;
        }
        days += 1;
        let (first, last) = (&day[0].0, &day[day.len() - 1].0);
        let overlaps: Vec<usize> = labels
            .iter()
            .enumerate()
            .filter(|(_, (s, e))| first.as_str() <= e.as_str() && last.as_str() >= s.as_str())
            .map(|(i, _)| i)
            .collect();
        if !overlaps.is_empty() {
            failure_days += 1;
        }
        let mut alert = None;
        while let Ok(o) = out.try_recv() {
            if o.topic.starts_with("ganglion/alert/") {
                let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap_or_default();
                alert = Some(format!(
                    "{}: {}",
                    v["level"].as_str().unwrap_or("?"),
                    v["text"].as_str().unwrap_or("")
                ));
            } else if o.topic.starts_with("ganglion/dead-letter/") {
                invalid += 1;
            }
        }
        if let Some(a) = alert {
            if overlaps.is_empty() {
                false_alerts += 1;
            } else {
                true_alerts += 1;
                for i in overlaps {
                    windows_hit[i] = true;
                }
            }
            alerted_days.push(format!("{first} .. {last}: {a}"));
        }
    }
    rt.shutdown().await;
    println!("## industrial\n");
    println!(
        "| days decided | days overlapping a labelled failure window | alerts on those days | alerts on other days | labelled failure windows with an alert | dead letters |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {days} | {failure_days} | {true_alerts} | {false_alerts} | {} of {} | {invalid} |\n",
        windows_hit.iter().filter(|h| **h).count(),
        labels.len()
    );
    for a in alerted_days.iter().take(12) {
        println!("- {a}");
    }
    println!();
}

/// Each utterance alone through the pack's rule: which actions came out,
/// against the acceptable ones.
async fn smart_home(engine: Arc<dyn LlmEngine>) {
    let rules = pack("smart-home").join("rules");
    println!("## smart-home\n");
    println!("| room | said | acceptable | the model's actions | verdict |");
    println!("|---|---|---|---|---|");
    let (mut right, mut wrong, mut none, mut refused) = (0, 0, 0, 0);
    let data = utterances();
    for u in &data {
        let out = run_rules(&rules, engine.clone(), &[say(&u.room, &u.text)]).await;
        let mut got = Vec::new();
        for o in &out {
            let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap_or_default();
            if o.topic.starts_with("ganglion/command/") {
                got.push(format!(
                    "{} {}",
                    v["command"].as_str().unwrap_or("?"),
                    v["value"]
                        .as_str()
                        .map_or_else(|| v["value"].to_string(), str::to_owned)
                ));
            } else if o.topic.starts_with("ganglion/alert/") {
                got.push(format!("alert {}", v["level"].as_str().unwrap_or("?")));
            } else if o.topic.starts_with("ganglion/dead-letter/") {
                refused += 1;
                got.push(format!(
                    "(dead letter: {})",
                    v["kind"].as_str().unwrap_or("?")
                ));
            }
        }
        let verdict = if got.is_empty() && u.expect.is_empty() {
            right += 1;
            "right (nothing)"
        } else if got.is_empty() {
            none += 1;
            "nothing done"
        } else if got.iter().all(|g| u.expect.contains(g)) {
            right += 1;
            "right"
        } else if got.iter().any(|g| u.expect.contains(g)) {
            wrong += 1;
            "partly (extra actions)"
        } else {
            wrong += 1;
            "wrong"
        };
        println!(
            "| {} | {} | {} | {} | {verdict} |",
            u.room,
            u.text,
            if u.expect.is_empty() {
                "none".into()
            } else {
                u.expect.join(", ")
            },
            if got.is_empty() {
                "none".into()
            } else {
                got.join(", ")
            }
        );
    }
    println!(
        "\n{} utterances: {right} right, {wrong} wrong or with extra actions, {none} with nothing done where something was asked; {refused} dead letters\n",
        data.len()
    );
}
