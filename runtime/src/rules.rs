//! Rule files: one TOML file per rule in the rules folder.
//!
//! ```toml
//! name = "machine-overheat"          # default: the file stem
//! topics = ["factory/+/telemetry"]   # MQTT filters, `+` and `#` allowed
//! format = "json"                    # json | csv | raw
//! max_payload_bytes = 65536
//! qos = 1                            # of everything the rule publishes
//! dead_letter_topic = "ganglion/dead-letter/{rule}"
//!
//! [[preprocess]]                     # a chain, run in order
//! plugin = "clean-readings"
//! config = { units = { temperature = "C" } }
//!
//! [window]                           # per device; count, seconds, or both (whichever first)
//! count = 12
//! seconds = 3600
//!
//! [prompt]                           # optional: without it the rule does not use the model
//! plugin = "prompt-template"
//! config = { user = "..." }
//!
//! [postprocess]                      # or [handler] for a rule-world plugin instead of all the above
//! plugin = "json-actions"
//!
//! [allow]                            # what the rule may emit; anything else is dead-lettered
//! publish = ["plant/{device}/cmd", { topic = "plant/{device}/setpoint", min = 0.0, max = 80.0 }]
//! alert_topic = "ganglion/alert/{rule}/{device}"
//! command_topic = "ganglion/command/{device}/{command}"
//! commands = [{ device = "{device}", name = "fan", values = ["on", "off"] }, { device = "*", name = "setpoint", min = 5.0, max = 30.0 }]
//! ```
//!
//! For `format = "csv"` a `[csv]` table names the columns of a line
//! (`columns = ["timestamp", "value"]`, with `device`, `metric`, `unit`,
//! `value`, `timestamp` or `_` to skip) and defaults for what the line lacks
//! (`metric`, `unit`, `device_from_topic`); the host parses the line into
//! readings for the preprocess chain, which may then be empty.

use crate::types::{Action, Qos, Value};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Why a rule file, or the rules folder, could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// Includes the line, column and field from the TOML parser.
    #[error("{path}: {message}")]
    Parse {
        /// The rule file (`<rule>` when parsed from text without one).
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The file parses but the rule is inconsistent (bad name, topic filter,
    /// stage combination, or a name another file already uses).
    #[error("{path}: {message}")]
    Invalid {
        /// The rule file (`<rule>` when parsed from text without one).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// How the host checks and reads a message payload before the plugins see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// Must be valid JSON, else dead-lettered; the default.
    #[default]
    Json,
    /// Lines parsed by the host into readings per the rule's [`CsvSpec`].
    Csv,
    /// Passed on unchecked.
    Raw,
}

/// A plugin used by a rule, with its settings and grants.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    /// The plugin's name.
    pub plugin: String,
    /// Settings the plugin reads through the `config` interface. Default empty.
    #[serde(default)]
    pub config: toml::Table,
    /// WASI capabilities for this plugin in this rule (none by default).
    #[serde(default)]
    pub grants: crate::config::Grants,
    /// Clear the plugin's `state` in this rule when a new version of the
    /// plugin is loaded. By default state survives reloads: it is keyed by
    /// plugin name and rule, not by version.
    #[serde(default)]
    pub reset_state_on_reload: bool,
}

impl PluginRef {
    /// The settings as the JSON object plugins see through `config`.
    pub fn config_json(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(&self.config) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }
}

/// A per-device window of readings (`[window]`); it closes at whichever limit
/// is reached first. At least one is set, and neither is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Readings that complete the window.
    pub count: Option<usize>,
    /// Age at which the window is run, in seconds since its first message.
    pub seconds: Option<u64>,
}

/// How a `format = "csv"` payload is read (`[csv]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvSpec {
    /// One name per field: `device`, `metric`, `unit`, `value`, `timestamp`,
    /// or `_` to skip; must include `value`.
    pub columns: Vec<String>,
    /// Metric name when there is no `metric` column.
    pub metric: Option<String>,
    /// Unit when there is no `unit` column. Default empty.
    #[serde(default)]
    pub unit: String,
    /// Index of the topic level (0-based, split on `/`) that names the device
    /// when there is no `device` column.
    pub device_from_topic: Option<usize>,
    /// Field separator. Default `,`.
    #[serde(default = "comma")]
    pub delimiter: char,
}

fn comma() -> char {
    ','
}

/// One entry of `[allow] publish`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PublishAllow {
    /// A topic pattern; any payload.
    Topic(String),
    /// A topic pattern whose payload must hold a number (plain, or an
    /// object's `value`) within the bounds.
    Bounded {
        /// The topic pattern.
        topic: String,
        /// Lowest allowed value, inclusive.
        min: Option<f64>,
        /// Highest allowed value, inclusive.
        max: Option<f64>,
    },
}

impl PublishAllow {
    fn topic(&self) -> &str {
        match self {
            PublishAllow::Topic(t) | PublishAllow::Bounded { topic: t, .. } => t,
        }
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
            let topic = fill(p.topic(), rule, device, "");
            if topic.contains(['+', '#']) {
                continue;
            }
            let payload = match p {
                PublishAllow::Topic(_) => json!({"type": "string", "maxLength": 256}),
                PublishAllow::Bounded { min, max, .. } => {
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
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: Option<String>,
    topics: Vec<String>,
    #[serde(default)]
    format: PayloadFormat,
    csv: Option<CsvSpec>,
    #[serde(default = "default_max_payload")]
    max_payload_bytes: usize,
    #[serde(default = "default_qos")]
    qos: u8,
    dead_letter_topic: Option<String>,
    #[serde(default)]
    preprocess: Vec<PluginRef>,
    window: Option<WindowSpec>,
    prompt: Option<PluginRef>,
    postprocess: Option<PluginRef>,
    handler: Option<PluginRef>,
    #[serde(default)]
    allow: AllowList,
}

fn default_max_payload() -> usize {
    64 * 1024
}

fn default_qos() -> u8 {
    1
}

/// How a rule turns messages into actions.
#[derive(Debug, Clone, PartialEq)]
pub enum Stages {
    /// preprocess chain → window → (prompt → llm) → postprocess.
    Chain {
        /// Preprocessors, run in order; may be empty for `format = "csv"`.
        preprocess: Vec<PluginRef>,
        /// The per-device window; none runs each message's readings at once, per device.
        window: Option<WindowSpec>,
        /// The prompt template; none means the rule does not use the model.
        prompt: Option<PluginRef>,
        /// The postprocessor that turns the window (and completion) into actions.
        postprocess: PluginRef,
    },
    /// One rule-world plugin: message → actions.
    Handler(PluginRef),
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Letters, digits, `-` and `_`; defaults to the file stem.
    pub name: String,
    /// The file it was loaded from; none when parsed from text.
    pub source: Option<PathBuf>,
    /// MQTT topic filters the rule subscribes to; at least one.
    pub topics: Vec<String>,
    /// How payloads are checked and read. Default JSON.
    pub format: PayloadFormat,
    /// Present exactly when `format` is CSV.
    pub csv: Option<CsvSpec>,
    /// Larger payloads are dead-lettered, in bytes. Default 65 536.
    pub max_payload_bytes: usize,
    /// QoS of everything the rule publishes (an upper bound for plugin
    /// publishes). Default at-least-once.
    pub qos: Qos,
    /// Where refused messages and actions go, `{rule}` filled in.
    /// Default `ganglion/dead-letter/<name>`.
    pub dead_letter_topic: String,
    /// The plugins that process messages.
    pub stages: Stages,
    /// What the rule may emit.
    pub allow: AllowList,
}

impl Rule {
    /// Reads and validates a rule file.
    pub fn load(path: &Path) -> Result<Rule, RuleError> {
        let text = std::fs::read_to_string(path).map_err(|source| RuleError::Io {
            path: path.to_owned(),
            source,
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::parse(&text, &stem, Some(path))
    }

    /// Parses rule text; `default_name` applies when the file sets no name.
    pub fn parse(text: &str, default_name: &str, path: Option<&Path>) -> Result<Rule, RuleError> {
        let p = path
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("<rule>"));
        let file: RuleFile = toml::from_str(text).map_err(|e| RuleError::Parse {
            path: p.clone(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| RuleError::Invalid {
            path: p.clone(),
            message,
        };
        let name = file.name.unwrap_or_else(|| default_name.to_owned());
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(format!(
                "rule name `{name}`: use letters, digits, `-` and `_`"
            )));
        }
        if file.topics.is_empty() {
            return Err(invalid("`topics` is empty".into()));
        }
        for t in &file.topics {
            validate_filter(t).map_err(|m| invalid(format!("topic filter `{t}`: {m}")))?;
        }
        let qos = match file.qos {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => Qos::ExactlyOnce,
            n => return Err(invalid(format!("`qos` must be 0, 1 or 2, not {n}"))),
        };
        if file.format == PayloadFormat::Csv {
            let csv = file
                .csv
                .as_ref()
                .ok_or_else(|| invalid("format = \"csv\" needs a [csv] table".into()))?;
            for c in &csv.columns {
                if !["device", "metric", "unit", "value", "timestamp", "_"].contains(&c.as_str()) {
                    return Err(invalid(format!(
                        "[csv] column `{c}`: use device, metric, unit, value, timestamp or _"
                    )));
                }
            }
            if !csv.columns.iter().any(|c| c == "value") {
                return Err(invalid("[csv] columns have no `value`".into()));
            }
            if csv.metric.is_none() && !csv.columns.iter().any(|c| c == "metric") {
                return Err(invalid(
                    "[csv] needs a `metric` column or a `metric` default".into(),
                ));
            }
        } else if file.csv.is_some() {
            return Err(invalid("[csv] is only for format = \"csv\"".into()));
        }
        if let Some(w) = &file.window {
            if w.count.is_none() && w.seconds.is_none() {
                return Err(invalid("[window] needs `count`, `seconds` or both".into()));
            }
            if w.count == Some(0) || w.seconds == Some(0) {
                return Err(invalid(
                    "[window] `count` and `seconds` must be positive".into(),
                ));
            }
        }
        let stages = match (file.handler, file.postprocess) {
            (Some(h), None) => {
                if !file.preprocess.is_empty() || file.window.is_some() || file.prompt.is_some() {
                    return Err(invalid("[handler] takes the whole message: drop [[preprocess]], [window] and [prompt]".into()));
                }
                Stages::Handler(h)
            }
            (None, Some(post)) => {
                if file.preprocess.is_empty() && file.format != PayloadFormat::Csv {
                    return Err(invalid("no [[preprocess]] plugin to turn messages into readings (only format = \"csv\" can go without)".into()));
                }
                Stages::Chain {
                    preprocess: file.preprocess,
                    window: file.window,
                    prompt: file.prompt,
                    postprocess: post,
                }
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give either [postprocess] or [handler], not both".into(),
                ));
            }
            (None, None) => return Err(invalid("no [postprocess] or [handler] plugin".into())),
        };
        for p in &file.allow.publish {
            validate_filter(&fill(p.topic(), &name, "x", "x"))
                .map_err(|m| invalid(format!("[allow] publish `{}`: {m}", p.topic())))?;
        }
        let dead_letter_topic = file
            .dead_letter_topic
            .unwrap_or_else(|| format!("ganglion/dead-letter/{name}"))
            .replace("{rule}", &name);
        validate_topic(&dead_letter_topic)
            .map_err(|m| invalid(format!("dead_letter_topic: {m}")))?;
        Ok(Rule {
            name,
            source: path.map(Path::to_owned),
            topics: file.topics,
            format: file.format,
            csv: file.csv,
            max_payload_bytes: file.max_payload_bytes,
            qos,
            dead_letter_topic,
            stages,
            allow: file.allow,
        })
    }

    /// Plugin names the rule uses, in pipeline order.
    pub fn plugins(&self) -> Vec<&str> {
        self.plugin_refs().map(|p| p.plugin.as_str()).collect()
    }

    /// The rule's plugin references (name, settings, grants), in pipeline order.
    pub fn plugin_refs(&self) -> Box<dyn Iterator<Item = &PluginRef> + '_> {
        match &self.stages {
            Stages::Handler(h) => Box::new(std::iter::once(h)),
            Stages::Chain {
                preprocess,
                prompt,
                postprocess,
                ..
            } => Box::new(
                preprocess
                    .iter()
                    .chain(prompt.iter())
                    .chain(std::iter::once(postprocess)),
            ),
        }
    }

    /// True when one of the rule's topic filters matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.topics.iter().any(|f| filter_matches(f, topic))
    }

    /// Checks an action against the allow-list and turns it into what to
    /// publish, or says why it is refused.
    pub fn authorize(&self, action: &Action, device: &str) -> Result<Outgoing, String> {
        let allow = &self.allow;
        match action {
            Action::Publish {
                topic,
                payload,
                qos,
                retain,
            } => {
                validate_topic(topic).map_err(|m| format!("publish to `{topic}`: {m}"))?;
                let entry = allow
                    .publish
                    .iter()
                    .find(|p| filter_matches(&fill(p.topic(), &self.name, device, ""), topic))
                    .ok_or_else(|| {
                        format!("publish to `{topic}` is not in the rule's allow-list")
                    })?;
                if let PublishAllow::Bounded { min, max, .. } = entry {
                    let v = payload_number(payload).ok_or_else(|| format!("publish to `{topic}`: payload has no numeric value to check against its bounds"))?;
                    check_bounds(v, *min, *max)
                        .map_err(|m| format!("publish to `{topic}`: {m}"))?;
                }
                Ok(Outgoing {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    qos: (*qos).min(self.qos),
                    retain: *retain,
                })
            }
            Action::Alert {
                level,
                device: alert_device,
                text,
            } => {
                if !allow.alerts {
                    return Err("alerts are not allowed by this rule".into());
                }
                let d = if alert_device.is_empty() {
                    device
                } else {
                    alert_device
                };
                let topic = fill(&allow.alert_topic, &self.name, d, "");
                validate_topic(&topic).map_err(|m| format!("alert topic `{topic}`: {m}"))?;
                let payload = serde_json::json!({ "rule": self.name, "device": d, "level": format!("{level:?}").to_lowercase(), "text": text });
                Ok(Outgoing {
                    topic,
                    payload: payload.to_string().into_bytes(),
                    qos: self.qos,
                    retain: false,
                })
            }
            Action::Command {
                device: target,
                name,
                value,
            } => {
                let entry = allow
                    .commands
                    .iter()
                    .find(|c| {
                        c.name == *name
                            && (c.device == "*"
                                || c.device == *target
                                || (c.device == "{device}" && target == device))
                    })
                    .ok_or_else(|| {
                        format!("command `{name}` to `{target}` is not in the rule's allow-list")
                    })?;
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
                        let n = v.as_f64().unwrap_or(f64::NAN);
                        check_bounds(n, entry.min, entry.max)
                            .map_err(|m| format!("command `{name}`: {m}"))?;
                    }
                    None => {}
                }
                let topic = fill(&allow.command_topic, &self.name, target, name);
                validate_topic(&topic).map_err(|m| format!("command topic `{topic}`: {m}"))?;
                let value_json = match value {
                    None => serde_json::Value::Null,
                    Some(Value::Number(n)) => serde_json::json!(n),
                    Some(Value::Boolean(b)) => serde_json::json!(b),
                    Some(Value::Text(t)) => serde_json::json!(t),
                };
                let payload = serde_json::json!({ "rule": self.name, "device": target, "command": name, "value": value_json });
                Ok(Outgoing {
                    topic,
                    payload: payload.to_string().into_bytes(),
                    qos: self.qos,
                    retain: false,
                })
            }
        }
    }
}

/// A message to publish, after the allow-list check.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The topic, with patterns filled in.
    pub topic: String,
    /// The message body (JSON for alerts and commands).
    pub payload: Vec<u8>,
    /// The QoS, at most the rule's.
    pub qos: Qos,
    /// Whether the broker retains the message.
    pub retain: bool,
}

fn fill(pattern: &str, rule: &str, device: &str, command: &str) -> String {
    pattern
        .replace("{rule}", rule)
        .replace("{device}", device)
        .replace("{command}", command)
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

/// Checks an MQTT topic filter: levels split by `/`, `+` alone in a level,
/// `#` alone and last.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty".into());
    }
    if filter.len() > 65_535 || filter.contains('\0') {
        return Err("too long or contains NUL".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err("`#` must be a whole level and the last one".into());
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level".into());
        }
    }
    Ok(())
}

/// Checks a topic to publish on: a filter without wildcards.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    validate_filter(topic)?;
    if topic.contains(['+', '#']) {
        return Err("wildcards are not allowed in a topic to publish on".into());
    }
    Ok(())
}

/// MQTT filter matching (`$`-topics are not matched by leading wildcards).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Loads every `*.toml` rule in `dir` (sorted); a bad file is reported and
/// does not stop the others. Two files with the same rule name: the second is refused.
pub fn load_dir(dir: &Path) -> Result<(Vec<Rule>, Vec<RuleError>), RuleError> {
    let io = |source| RuleError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    paths.sort();
    let (mut rules, mut errors) = (Vec::<Rule>::new(), Vec::new());
    for p in paths {
        match Rule::load(&p) {
            Ok(r) if rules.iter().any(|o| o.name == r.name) => errors.push(RuleError::Invalid {
                path: p,
                message: format!("another file already defines rule `{}`", r.name),
            }),
            Ok(r) => rules.push(r),
            Err(e) => errors.push(e),
        }
    }
    Ok((rules, errors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::AlertLevel;

    const RULE: &str = r#"
topics = ["factory/+/telemetry"]
[[preprocess]]
plugin = "clean-readings"
[postprocess]
plugin = "json-actions"
[allow]
publish = ["plant/{device}/cmd", { topic = "plant/{device}/setpoint", min = 0.0, max = 80.0 }]
commands = [{ device = "{device}", name = "fan", values = ["on", "off"] }, { device = "*", name = "setpoint", min = 5.0, max = 30.0 }]
"#;

    #[test]
    fn the_allow_list_as_a_model_constraint() {
        let rule = Rule::parse(RULE, "plant", None).unwrap();
        let schema = rule.allow.action_schema("plant", "m1", 3);
        let actions = &schema["properties"]["actions"];
        assert_eq!(actions["maxItems"], 3);
        let choices = actions["items"]["anyOf"].as_array().unwrap();
        // fan (this device, on/off), setpoint (any device, 5..30), alerts, and
        // the two publish topics once `{device}` is filled in.
        assert_eq!(choices.len(), 5, "{schema:#}");
        assert_eq!(choices[0]["properties"]["device"]["const"], "m1");
        assert_eq!(choices[0]["properties"]["value"]["enum"][1], "off");
        assert_eq!(choices[1]["properties"]["device"]["type"], "string");
        assert_eq!(choices[1]["properties"]["value"]["maximum"], 30.0);
        assert_eq!(choices[2]["properties"]["type"]["const"], "alert");
        assert_eq!(choices[3]["properties"]["topic"]["const"], "plant/m1/cmd");
        assert_eq!(choices[4]["properties"]["payload"]["maximum"], 80.0);
        // Wildcard topics are not offered; no allowed action: only `[]`.
        let mut allow = rule.allow.clone();
        allow.publish = vec![PublishAllow::Topic("plant/+/cmd".into())];
        allow.commands.clear();
        allow.alerts = false;
        let none = allow.action_schema("plant", "m1", 3);
        assert_eq!(none["properties"]["actions"]["items"], false);
    }

    #[test]
    fn filters() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(validate_filter("a/#/b").is_err());
        assert!(validate_filter("a/b+").is_err());
        assert!(validate_topic("a/+").is_err());
    }

    #[test]
    fn parse_errors_name_line_and_field() {
        let err = Rule::parse(
            "topics = [\"a\"]\nwindoww = 3\n",
            "r",
            Some(Path::new("rules/r.toml")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("rules/r.toml:") && err.contains("line 2") && err.contains("windoww"),
            "{err}"
        );
        let err = Rule::parse(
            "topics = [\"a/#/b\"]\n[handler]\nplugin = \"x\"\n",
            "r",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`#` must be"), "{err}");
        assert!(
            Rule::parse(
                "topics = [\"a\"]\n[handler]\nplugin = \"x\"\n[postprocess]\nplugin = \"y\"\n",
                "r",
                None
            )
            .is_err()
        );
        assert!(
            Rule::parse(
                "topics = [\"a\"]\n[postprocess]\nplugin = \"y\"\n",
                "r",
                None
            )
            .is_err(),
            "no preprocess for json"
        );
    }

    #[test]
    fn allow_list() {
        let rule = Rule::parse(RULE, "overheat", None).unwrap();
        assert_eq!(rule.name, "overheat");
        assert_eq!(rule.dead_letter_topic, "ganglion/dead-letter/overheat");
        let publish = |topic: &str, payload: &str| Action::Publish {
            topic: topic.into(),
            payload: payload.as_bytes().to_vec(),
            qos: Qos::AtLeastOnce,
            retain: false,
        };
        assert!(rule.authorize(&publish("plant/m1/cmd", "x"), "m1").is_ok());
        assert!(
            rule.authorize(&publish("plant/m2/cmd", "x"), "m1").is_err(),
            "another device's topic"
        );
        assert!(
            rule.authorize(&publish("plant/m1/setpoint", "{\"value\": 50}"), "m1")
                .is_ok()
        );
        assert!(
            rule.authorize(&publish("plant/m1/setpoint", "90"), "m1")
                .unwrap_err()
                .contains("above the allowed maximum")
        );
        assert!(
            rule.authorize(&publish("plant/m1/setpoint", "hot"), "m1")
                .is_err()
        );
        let alert = rule
            .authorize(
                &Action::Alert {
                    level: AlertLevel::Critical,
                    device: String::new(),
                    text: "t".into(),
                },
                "m1",
            )
            .unwrap();
        assert_eq!(alert.topic, "ganglion/alert/overheat/m1");
        let cmd = |device: &str, name: &str, value: Option<Value>| Action::Command {
            device: device.into(),
            name: name.into(),
            value,
        };
        assert_eq!(
            rule.authorize(&cmd("m1", "fan", Some(Value::Text("on".into()))), "m1")
                .unwrap()
                .topic,
            "ganglion/command/m1/fan"
        );
        assert!(
            rule.authorize(&cmd("m2", "fan", Some(Value::Text("on".into()))), "m1")
                .is_err(),
            "{{device}} is the window's device"
        );
        assert!(
            rule.authorize(&cmd("m1", "fan", Some(Value::Text("max".into()))), "m1")
                .is_err()
        );
        assert!(
            rule.authorize(&cmd("x9", "setpoint", Some(Value::Number(21.0))), "m1")
                .is_ok()
        );
        assert!(
            rule.authorize(&cmd("x9", "setpoint", Some(Value::Number(31.0))), "m1")
                .is_err()
        );
        assert!(rule.authorize(&cmd("x9", "unlock", None), "m1").is_err());
    }
}
