//! What the default model (SmolLM2-135M-Instruct Q4_1) does on the scenario
//! packs' sample data: a measurement, not a tuning target. The tables in
//! each pack's README come from this.
//!
//! `cargo bench -p ganglion-tests --bench scenario_packs` (after
//! `cargo run -p xtask -- plugins` and `cargo run -p xtask -- model`).

use ganglion::llm::LlmEngine;
use ganglion_tests::packs::{pack, run_rules, say, utterances};
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
    smart_home(engine).await;
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
