//! The allow-list (`[allow]` in a rule): what a rule may emit, and the check
//! every proposed action passes before it is published.
//!
//! Plugins and the model are untrusted: an action may name any topic, device
//! or value. Patterns are compared level by level ([`pattern_matches`]), every
//! entry that matches an action must allow it (a loose entry cannot widen a
//! tight one), `retain` is opt-in per entry, and the gateway's and the
//! broker's own topics ([`is_reserved`]) are never a `publish` target.

use super::topic::{Fill, check_device, is_reserved, pattern_matches, validate_topic};
use crate::types::{Action, Outgoing, Qos, Value};
use serde::Deserialize;

/// One entry of `[allow] publish`: a topic pattern, or a table.
///
/// ```toml
/// publish = ["plant/{device}/cmd", { topic = "plant/{device}/setpoint", min = 0.0, max = 80.0, retain = true }]
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PublishAllow {
    /// A topic pattern; any payload, never retained.
    Topic(String),
    /// A topic pattern with bounds on the payload's number and whether the
    /// message may be retained.
    Entry(PublishEntry),
}

/// A table entry of `[allow] publish`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishEntry {
    /// The topic pattern.
    pub topic: String,
    /// Lowest allowed value, inclusive; with `max`, the payload must hold a
    /// number (plain, or an object's `value`).
    pub min: Option<f64>,
    /// Highest allowed value, inclusive.
    pub max: Option<f64>,
    /// Whether an action may ask the broker to retain the message. Default
    /// false: a retained message outlives the decision that made it and
    /// reaches every later subscriber.
    #[serde(default)]
    pub retain: bool,
}

impl PublishAllow {
    /// The entry's topic pattern.
    pub fn topic(&self) -> &str {
        match self {
            PublishAllow::Topic(t) | PublishAllow::Entry(PublishEntry { topic: t, .. }) => t,
        }
    }

    fn bounds(&self) -> Option<(Option<f64>, Option<f64>)> {
        match self {
            PublishAllow::Entry(PublishEntry { min, max, .. })
                if min.is_some() || max.is_some() =>
            {
                Some((*min, *max))
            }
            _ => None,
        }
    }

    fn retain(&self) -> bool {
        matches!(self, PublishAllow::Entry(PublishEntry { retain: true, .. }))
    }
}

/// One entry of `[allow] commands`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandAllow {
    /// A device name, `{device}` (the window's device) or `*`.
    pub device: String,
    /// The command name.
    pub name: String,
    /// Lowest allowed numeric value, inclusive.
    pub min: Option<f64>,
    /// Highest allowed numeric value, inclusive.
    pub max: Option<f64>,
    /// Allowed text values, when the value is text.
    pub values: Option<Vec<String>>,
}

/// What a rule may emit (`[allow]`); any other action is dead-lettered.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowList {
    /// Topic patterns; `{device}` and `{rule}` are filled in, `+`/`#` match as in MQTT.
    pub publish: Vec<PublishAllow>,
    /// Whether alerts are allowed. Default true.
    pub alerts: bool,
    /// Whether an alert may name another device than the window's (or, for
    /// a handler rule, the topic's). Default false: a hostile message or
    /// completion cannot raise alarms for other devices.
    pub alert_any_device: bool,
    /// Where alerts are published; `{rule}` and `{device}` are filled in.
    /// Default `ganglion/alert/{rule}/{device}`.
    pub alert_topic: String,
    /// Where commands are published; `{rule}`, `{device}` and `{command}`
    /// are filled in. Default `ganglion/command/{device}/{command}`.
    pub command_topic: String,
    /// Commands allowed. Default none.
    pub commands: Vec<CommandAllow>,
    /// Constrain the model's answers to the actions this list allows (a JSON
    /// schema in json-actions' format, built per device; see
    /// [`AllowList::action_schema`]). It replaces any constraint the prompt
    /// plugin sets. Default false.
    pub constrain_model: bool,
}

impl Default for AllowList {
    fn default() -> Self {
        AllowList {
            publish: Vec::new(),
            alerts: true,
            alert_any_device: false,
            alert_topic: "ganglion/alert/{rule}/{device}".into(),
            command_topic: "ganglion/command/{device}/{command}".into(),
            commands: Vec::new(),
            constrain_model: false,
        }
    }
}

impl AllowList {
    /// A JSON schema of the answers whose actions this list lets out for
    /// `device` in rule `rule`, in json-actions' format
    /// (`{"actions":[...]}`): each allowed command with its device, name and
    /// values or bounds; alerts when allowed; publishes to topics that have
    /// no wildcard once `{rule}` and `{device}` are filled in (a wildcard
    /// topic is left out: the model is not offered it). At most
    /// `max_actions` actions; an empty list is always allowed.
    pub fn action_schema(&self, rule: &str, device: &str, max_actions: usize) -> serde_json::Value {
        use serde_json::json;
        let mut choices = Vec::new();
        for c in &self.commands {
            let target = match c.device.as_str() {
                "*" => json!({"type": "string", "minLength": 1, "maxLength": 64}),
                "{device}" => json!({"const": device}),
                d => json!({"const": d}),
            };
            let value = match (&c.values, c.min, c.max) {
                (Some(values), _, _) => Some(json!({"enum": values})),
                (None, None, None) => None,
                (None, min, max) => {
                    let mut v = json!({"type": "number"});
                    if let Some(min) = min {
                        v["minimum"] = json!(min);
                    }
                    if let Some(max) = max {
                        v["maximum"] = json!(max);
                    }
                    Some(v)
                }
            };
            let mut properties = json!({
                "type": {"const": "command"},
                "device": target,
                "command": {"const": c.name},
            });
            let mut required = vec!["type", "device", "command"];
            if let Some(v) = value {
                properties["value"] = v;
                required.push("value");
            }
            choices.push(json!({
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": false,
            }));
        }
        if self.alerts {
            choices.push(json!({
                "type": "object",
                "properties": {
                    "type": {"const": "alert"},
                    "level": {"enum": ["info", "warning", "critical"]},
                    "text": {"type": "string", "maxLength": 80},
                },
                "required": ["type", "level", "text"],
                "additionalProperties": false,
            }));
        }
        for p in &self.publish {
            let fill = Fill {
                rule,
                device,
                command: "",
            };
            let Some(topic) = fill.topic(p.topic()) else {
                continue;
            };
            if validate_topic(&topic).is_err() || is_reserved(&topic) {
                continue;
            }
            let payload = match p {
                PublishAllow::Topic(_)
                | PublishAllow::Entry(PublishEntry {
                    min: None,
                    max: None,
                    ..
                }) => json!({"type": "string", "maxLength": 256}),
                PublishAllow::Entry(PublishEntry { min, max, .. }) => {
                    let mut v = json!({"type": "number"});
                    if let Some(min) = min {
                        v["minimum"] = json!(min);
                    }
                    if let Some(max) = max {
                        v["maximum"] = json!(max);
                    }
                    v
                }
            };
            choices.push(json!({
                "type": "object",
                "properties": {
                    "type": {"const": "publish"},
                    "topic": {"const": topic},
                    "payload": payload,
                },
                "required": ["type", "topic", "payload"],
                "additionalProperties": false,
            }));
        }
        let items = match choices.len() {
            0 => json!(false),
            1 => choices.remove(0),
            _ => json!({"anyOf": choices}),
        };
        json!({
            "type": "object",
            "properties": {
                "actions": {"type": "array", "items": items, "maxItems": max_actions},
            },
            "required": ["actions"],
            "additionalProperties": false,
        })
    }

    /// Checks an action of rule `rule` against the list and turns it into
    /// what to publish, or says why it is refused. `device` is the window's
    /// device (empty for none: `{device}` then matches nothing); `qos` is the
    /// rule's, an upper bound.
    pub fn authorize(
        &self,
        rule: &str,
        qos: Qos,
        action: &Action,
        device: &str,
    ) -> Result<Outgoing, String> {
        // The pipeline refuses such a device before its window opens; here it
        // is taken as no device, so `{device}` can never fill in `$`, `/` or
        // a wildcard whatever the caller passes.
        let device = if check_device(device, usize::MAX).is_ok() {
            device
        } else {
            ""
        };
        match action {
            Action::Publish {
                topic,
                payload,
                qos: asked,
                retain,
            } => {
                validate_topic(topic).map_err(|m| format!("publish to `{topic}`: {m}"))?;
                if is_reserved(topic) {
                    return Err(format!(
                        "publish to `{topic}`: the gateway's (`ganglion/...`) and the broker's (`$...`) topics are reserved"
                    ));
                }
                let fill = Fill {
                    rule,
                    device,
                    command: "",
                };
                let mut matching = self
                    .publish
                    .iter()
                    .filter(|p| pattern_matches(p.topic(), &fill, topic))
                    .peekable();
                if matching.peek().is_none() {
                    return Err(format!(
                        "publish to `{topic}` is not in the rule's allow-list"
                    ));
                }
                // Every entry that matches must allow it: a broad entry
                // (`plant/#`) cannot lift the bounds of a narrow one.
                for entry in matching {
                    if let Some((min, max)) = entry.bounds() {
                        let v = payload_number(payload).ok_or_else(|| format!("publish to `{topic}`: payload has no numeric value to check against the bounds of `{}`", entry.topic()))?;
                        check_bounds(v, min, max)
                            .map_err(|m| format!("publish to `{topic}`: {m}"))?;
                    }
                    if *retain && !entry.retain() {
                        return Err(format!(
                            "publish to `{topic}`: retain is not allowed by the allow-list entry `{}` (set `retain = true` on it)",
                            entry.topic()
                        ));
                    }
                }
                Ok(Outgoing {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    qos: (*asked).min(qos),
                    retain: *retain,
                })
            }
            Action::Alert {
                level,
                device: alert_device,
                text,
            } => {
                if !self.alerts {
                    return Err("alerts are not allowed by this rule".into());
                }
                let d = if alert_device.is_empty() {
                    device
                } else {
                    alert_device
                };
                if !d.is_empty() {
                    check_device(d, usize::MAX).map_err(|m| format!("alert: {m}"))?;
                }
                if !device.is_empty() && d != device && !self.alert_any_device {
                    return Err(format!(
                        "alert for `{d}` from the window of `{device}`: alerts name their own device unless `alert_any_device = true`"
                    ));
                }
                let fill = Fill {
                    rule,
                    device: d,
                    command: "",
                };
                let topic = fill.topic(&self.alert_topic).ok_or_else(|| {
                    format!(
                        "alert topic `{}` needs a device and the alert names none",
                        self.alert_topic
                    )
                })?;
                validate_topic(&topic).map_err(|m| format!("alert topic `{topic}`: {m}"))?;
                let payload = serde_json::json!({ "rule": rule, "device": d, "level": format!("{level:?}").to_lowercase(), "text": text });
                Ok(Outgoing {
                    topic,
                    payload: payload.to_string().into_bytes(),
                    qos,
                    retain: false,
                })
            }
            Action::Command {
                device: target,
                name,
                value,
            } => {
                check_device(target, usize::MAX).map_err(|m| format!("command `{name}`: {m}"))?;
                check_device(name, usize::MAX)
                    .map_err(|m| format!("command name: {}", m.replace("device id", "name")))?;
                let mut matching = self
                    .commands
                    .iter()
                    .filter(|c| {
                        c.name == *name
                            && match c.device.as_str() {
                                "*" => true,
                                "{device}" => !device.is_empty() && target == device,
                                d => d == target,
                            }
                    })
                    .peekable();
                if matching.peek().is_none() {
                    return Err(format!(
                        "command `{name}` to `{target}` is not in the rule's allow-list"
                    ));
                }
                for entry in matching {
                    check_command_value(entry, name, value.as_ref())?;
                }
                let fill = Fill {
                    rule,
                    device: target,
                    command: name,
                };
                let topic = fill.topic(&self.command_topic).ok_or_else(|| {
                    format!("command topic `{}` cannot be filled", self.command_topic)
                })?;
                validate_topic(&topic).map_err(|m| format!("command topic `{topic}`: {m}"))?;
                let value_json = match value {
                    None => serde_json::Value::Null,
                    Some(Value::Number(n)) => serde_json::json!(n),
                    Some(Value::Boolean(b)) => serde_json::json!(b),
                    Some(Value::Text(t)) => serde_json::json!(t),
                };
                let payload = serde_json::json!({ "rule": rule, "device": target, "command": name, "value": value_json });
                Ok(Outgoing {
                    topic,
                    payload: payload.to_string().into_bytes(),
                    qos,
                    retain: false,
                })
            }
        }
    }
}

/// Whether one matching `[allow] commands` entry lets `value` through.
fn check_command_value(
    entry: &CommandAllow,
    name: &str,
    value: Option<&Value>,
) -> Result<(), String> {
    match value {
        Some(Value::Text(t)) => {
            if let Some(values) = &entry.values
                && !values.contains(t)
            {
                return Err(format!(
                    "command `{name}` value `{t}` is not one of {values:?}"
                ));
            }
            if entry.values.is_none() && (entry.min.is_some() || entry.max.is_some()) {
                return Err(format!("command `{name}` needs a number, got `{t}`"));
            }
        }
        Some(v) => {
            if entry.values.is_some() {
                return Err(format!(
                    "command `{name}` takes one of {:?}, not a number or boolean",
                    entry.values.as_deref().unwrap_or_default()
                ));
            }
            if entry.min.is_some() || entry.max.is_some() {
                let n = v.as_f64().unwrap_or(f64::NAN);
                check_bounds(n, entry.min, entry.max)
                    .map_err(|m| format!("command `{name}`: {m}"))?;
            }
        }
        None => {
            if entry.values.is_some() || entry.min.is_some() || entry.max.is_some() {
                return Err(format!("command `{name}` needs a value"));
            }
        }
    }
    Ok(())
}

fn check_bounds(v: f64, min: Option<f64>, max: Option<f64>) -> Result<(), String> {
    if !v.is_finite() {
        return Err("value is not a finite number".into());
    }
    if let Some(min) = min.filter(|m| v < *m) {
        return Err(format!("value {v} below the allowed minimum {min}"));
    }
    if let Some(max) = max.filter(|m| v > *m) {
        return Err(format!("value {v} above the allowed maximum {max}"));
    }
    Ok(())
}

/// A number payload, or a JSON object's numeric `value`.
fn payload_number(payload: &[u8]) -> Option<f64> {
    match serde_json::from_slice::<serde_json::Value>(payload).ok()? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Object(o) => o.get("value").and_then(serde_json::Value::as_f64),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
