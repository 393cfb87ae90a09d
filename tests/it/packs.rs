//! The scenario packs in examples/packs/: each pack's rules over its sample
//! data, through the real plugins, with a scripted model (the real model's
//! results are measured by `cargo bench -p ganglion-tests --bench
//! scenario_packs` and recorded in each pack's README).

use ganglion::llm::{FakeLlm, LlmEngine, LlmInput};
use ganglion::types::Constraint;
use ganglion::types::Outgoing;
use ganglion_tests::packs::{
    machine_rows, occupancy_rows, pack, run_rules as run, say, utterances,
};
use ganglion_tests::*;
use serde_json::Value as Json;
use std::sync::Arc;

/// The answer json-actions reads for an expected action such as `fan on`
/// or `alert critical`.
fn answer(room: &str, expected: &str) -> Json {
    let (what, value) = expected.split_once(' ').unwrap();
    if what == "alert" {
        serde_json::json!({"type": "alert", "level": value, "text": "check the room"})
    } else {
        serde_json::json!({"type": "command", "device": room, "command": what, "value": value})
    }
}

#[tokio::test]
async fn smart_home_commands_come_out_and_the_rest_is_refused() {
    let data = utterances();
    let script: Vec<(String, Json)> = data
        .iter()
        .map(|u| {
            let actions: Vec<Json> = match u.text.as_str() {
                // Outside the allow-list: refused and dead-lettered.
                "unlock the front door" => vec![serde_json::json!(
                    {"type": "command", "device": "front-door", "command": "unlock", "value": "open"}
                )],
                _ => u.expect.iter().take(1).map(|e| answer(&u.room, e)).collect(),
            };
            (u.text.clone(), serde_json::json!({"actions": actions}))
        })
        .collect();
    let llm = FakeLlm::new(move |req| {
        let LlmInput::Chat(m) = &req.input else {
            return Ok(String::new());
        };
        let user = &m.last().unwrap().content;
        Ok(script
            .iter()
            .find(|(text, _)| user.ends_with(text.as_str()))
            .map(|(_, a)| a.to_string())
            .unwrap_or_else(|| r#"{"actions":[]}"#.into()))
    });
    let messages: Vec<(String, String)> = data.iter().map(|u| say(&u.room, &u.text)).collect();
    let out = run(&pack("smart-home").join("rules"), llm.clone(), &messages).await;

    // The model was asked with the allow-list as its constraint, per room.
    let requests = llm.requests();
    assert_eq!(requests.len(), data.len());
    for r in &requests {
        let Constraint::JsonSchema(schema) = &r.params.constraint else {
            panic!("no allow-list constraint: {:?}", r.params.constraint);
        };
        let schema: Json = serde_json::from_str(schema).unwrap();
        let choices = &schema["properties"]["actions"]["items"]["anyOf"];
        assert_eq!(
            choices.as_array().unwrap().len(),
            5,
            "4 commands and alerts"
        );
        assert!(choices[0]["properties"]["device"]["const"].is_string());
    }
    for u in &data {
        let Some(first) = u.expect.first() else {
            continue;
        };
        let (what, value) = first.split_once(' ').unwrap();
        let topic = if what == "alert" {
            format!("ganglion/alert/home-commands/{}", u.room)
        } else {
            format!("ganglion/command/{}/{what}", u.room)
        };
        let o = out
            .iter()
            .find(|o| o.topic == topic)
            .unwrap_or_else(|| panic!("`{}`: no {topic} in {out:?}", u.text));
        assert!(String::from_utf8_lossy(&o.payload).contains(value), "{o:?}");
    }
    let dead: Vec<Json> = out
        .iter()
        .filter(|o| o.topic == "ganglion/dead-letter/home-commands")
        .map(|o| serde_json::from_slice(&o.payload).unwrap())
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["kind"], "refused-action");
    assert!(dead[0]["reason"].as_str().unwrap().contains("unlock"));
    // Nothing else: "nice weather" asked for nothing.
    let expected_outputs = data.iter().filter(|u| !u.expect.is_empty()).count() + 1;
    assert_eq!(out.len(), expected_outputs, "{out:?}");
}

#[tokio::test]
async fn the_allow_list_constraint_holds_a_random_model_to_allowed_actions() {
    let dir = scratch("pack-tiny-model");
    let model = dir.join("tiny.gguf");
    ganglion_llm::testing::write_tiny_model(&model, &Default::default()).unwrap();
    let config = ganglion_llm::EngineConfig {
        path: Some(model),
        ..Default::default()
    };
    let engine: Arc<dyn LlmEngine> = Arc::new(
        ganglion_llm::Engine::load_with_progress(&config, false)
            .unwrap()
            .0,
    );
    // The pack's rule without alerts (free text would make answers long),
    // with room for four commands in byte-sized tokens.
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    // A short system prompt: the tiny model's context is small.
    let text = std::fs::read_to_string(pack("smart-home").join("rules/home-commands.toml"))
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("config.system") {
                "config.system = \"Home.\""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("alerts = true", "alerts = false")
        .replace(
            "config.max_tokens = 160",
            "config.max_tokens = 400\nconfig.temperature = 1.0\nconfig.seed = 7",
        );
    std::fs::write(rules.join("home-commands.toml"), text).unwrap();
    let messages: Vec<(String, String)> = ["bedroom", "kitchen", "office"]
        .iter()
        .flat_map(|room| (0..3).map(move |i| say(room, &format!("request {i}"))))
        .collect();
    let out = run(&rules, engine, &messages).await;
    let refused: Vec<&Outgoing> = out
        .iter()
        .filter(|o| o.topic.starts_with("ganglion/dead-letter/"))
        .collect();
    assert!(
        refused.is_empty(),
        "every answer parses and every action is allowed: {:?}",
        refused
            .iter()
            .map(|o| String::from_utf8_lossy(&o.payload))
            .collect::<Vec<_>>()
    );
    assert!(!out.is_empty(), "the random model proposed commands");
    for o in &out {
        let room = o.topic.split('/').nth(2).unwrap();
        assert!(["bedroom", "kitchen", "office"].contains(&room), "{o:?}");
    }
}

/// A scripted diagnosis: an alert when the day's prompt shows a maximum
/// above 35 C or a minimum below 20 C.
fn diagnosis_model() -> Arc<FakeLlm> {
    FakeLlm::new(|req| {
        let LlmInput::Chat(m) = &req.input else {
            return Ok(String::new());
        };
        let user = &m.last().unwrap().content;
        let number = |key: &str| -> f64 {
            user.split(&format!("{key} "))
                .nth(1)
                .and_then(|r| r.split([',', '.']).next())
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(f64::NAN)
        };
        Ok(if number("max") > 35.0 || number("min") < 20.0 {
            r#"{"actions":[{"type":"alert","level":"critical","text":"temperature out of range"}]}"#
        } else {
            r#"{"actions":[]}"#
        }
        .into())
    })
}

#[tokio::test]
async fn industrial_replay_diagnoses_each_day_and_alerts_maintenance() {
    let rows = machine_rows();
    assert_eq!(rows.len(), 22_695);
    let llm = diagnosis_model();
    let messages: Vec<(String, String)> = rows.into_iter().map(|(_, m)| m).collect();
    let out = run(&pack("industrial").join("rules"), llm.clone(), &messages).await;
    // One decision per day of readings (288), and the partial last day at shutdown.
    let requests = llm.requests();
    assert_eq!(requests.len(), 22_695 / 288 + 1);
    let LlmInput::Chat(m) = &requests[0].input else {
        panic!("a chat request")
    };
    assert!(
        m[1].content
            .starts_with("Machine machine-1, last 288 readings in C: first 23.3"),
        "{}",
        m[1].content
    );
    assert!(matches!(
        requests[0].params.constraint,
        Constraint::JsonSchema(_)
    ));
    let alerts: Vec<Json> = out
        .iter()
        .filter(|o| o.topic == "ganglion/alert/machine-diagnosis/machine-1")
        .map(|o| serde_json::from_slice(&o.payload).unwrap())
        .collect();
    assert!(
        !alerts.is_empty() && alerts.len() < requests.len(),
        "{} alerts",
        alerts.len()
    );
    assert!(alerts.iter().all(|a| a["level"] == "critical"));
    assert_eq!(out.len(), alerts.len(), "nothing but alerts: {out:?}");
}

/// Classifies the advisory plugin's sentence by its mean occupancy: under
/// 6% free flow, under 10% heavy, else a jam (this detector peaks near 14%). Generation is not used.
struct OccupancyJudge {
    texts: std::sync::Mutex<Vec<String>>,
}

impl LlmEngine for OccupancyJudge {
    fn model_id(&self) -> String {
        "occupancy-judge".into()
    }
    fn generate(
        &self,
        _: ganglion::llm::GenerateRequest,
    ) -> ganglion::llm::LlmFuture<'_, ganglion::types::Completion> {
        Box::pin(async { Err(ganglion::types::LlmError::InvalidInput("not used".into())) })
    }
    fn classify(
        &self,
        text: String,
        labels: Vec<String>,
    ) -> ganglion::llm::LlmFuture<'_, Vec<f32>> {
        let occupancy: f64 = text
            .split("occupancy ")
            .nth(1)
            .and_then(|r| r.split('%').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        self.texts.lock().unwrap().push(text);
        let best = if occupancy < 6.0 {
            0
        } else if occupancy < 10.0 {
            1
        } else {
            2
        };
        let scores = (0..labels.len())
            .map(|i| if i == best { 0.8 } else { 0.1 })
            .collect();
        Box::pin(async move { Ok(scores) })
    }
    fn embed(&self, _: Vec<String>) -> ganglion::llm::LlmFuture<'_, Vec<Vec<f32>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn count_tokens(&self, text: String) -> ganglion::llm::LlmFuture<'_, u32> {
        let n = text.split_whitespace().count() as u32;
        Box::pin(async move { Ok(n) })
    }
}

#[tokio::test]
async fn traffic_replay_classifies_each_hour_and_advises_signage() {
    let rows = occupancy_rows();
    assert_eq!(rows.len(), 2_380);
    let judge = Arc::new(OccupancyJudge {
        texts: Default::default(),
    });
    let messages: Vec<(String, String)> = rows.iter().map(|(_, m)| m.clone()).collect();
    let out = run(&pack("traffic").join("rules"), judge.clone(), &messages).await;
    // One classification per hour (12 readings), the partial last hour at shutdown.
    let texts = judge.texts.lock().unwrap().clone();
    assert_eq!(texts.len(), 2_380 / 12 + 1);
    assert!(
        texts[0].starts_with("Road sensor 6005: lane occupancy ")
            && texts[0].contains("over the last 12 readings"),
        "{}",
        texts[0]
    );
    let advisories: Vec<Json> = out
        .iter()
        .filter(|o| o.topic == "signage/6005")
        .map(|o| serde_json::from_slice(&o.payload).unwrap())
        .collect();
    assert_eq!(
        out.len(),
        advisories.len(),
        "nothing but advisories: {out:?}"
    );
    assert!(out.iter().all(|o| o.retain));
    // The advisories are exactly the hours the judge called heavy or jammed.
    let busy = texts
        .iter()
        .filter(|t| {
            let occ: f64 = t
                .split("occupancy ")
                .nth(1)
                .unwrap()
                .split('%')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            occ >= 6.0
        })
        .count();
    assert!(busy > 0 && busy < texts.len(), "{busy} of {}", texts.len());
    assert_eq!(advisories.len(), busy);
    for a in &advisories {
        let occupancy = a["occupancy"].as_f64().unwrap();
        let expected = if occupancy < 10.0 {
            "heavy traffic"
        } else {
            "a traffic jam"
        };
        assert_eq!(a["state"], expected, "{a}");
        assert!(!a["advice"].as_str().unwrap().is_empty());
    }
}
