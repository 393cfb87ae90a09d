//! Recorded decisions taken again through the current plugins and model
//! (`ganglion replay`), compared field by field with the record. Above the
//! pipeline, which it drives; the records themselves are [`crate::audit`]'s.

use crate::audit::{DecisionRecord, Replayed};
use crate::pipeline::RulePipeline;

/// How a replayed decision compares with the recorded one.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Index of the record in the log.
    pub index: usize,
    /// The rule.
    pub rule: String,
    /// The device.
    pub device: String,
    /// What differs: `prompt`, `completion`, `actions`, `error`, or why the
    /// decision could not be taken again (`rule not loaded`...). Empty when
    /// the decision is unchanged.
    pub changed: Vec<String>,
}

/// Compares a replay with its record.
pub fn compare(index: usize, record: &DecisionRecord, now: &Replayed) -> Comparison {
    let mut changed = Vec::new();
    match &now.prompt {
        Err(e) => changed.push(format!("prompt: {e}")),
        Ok(p) if *p != record.prompt => changed.push("prompt".into()),
        Ok(_) => {}
    }
    if let Some(c) = &now.completion
        && (c.text != record.completion.text || c.error != record.completion.error)
    {
        changed.push("completion".into());
    }
    if now.actions != record.actions {
        changed.push("actions".into());
    }
    if now.error != record.error {
        changed.push("error".into());
    }
    Comparison {
        index,
        rule: record.rule.clone(),
        device: record.device.clone(),
        changed,
    }
}

/// Takes every recorded decision again through the rule of the same name
/// among `pipelines` (the current plugins and model) and compares. With
/// unchanged plugins and greedy or seeded decoding, nothing changes.
pub async fn replay(records: &[DecisionRecord], pipelines: &[RulePipeline]) -> Vec<Comparison> {
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        out.push(match pipelines.iter().find(|p| p.rule.name == r.rule) {
            Some(p) => compare(i, r, &p.replay(r).await),
            None => Comparison {
                index: i,
                rule: r.rule.clone(),
                device: r.device.clone(),
                changed: vec![format!("rule `{}` is not loaded now", r.rule)],
            },
        });
    }
    out
}
