//! Rule files: one TOML file per rule in the rules folder.
//!
//! ```toml
//! name = "machine-overheat"          # default: the file stem
//! topics = ["factory/+/telemetry"]   # MQTT filters, `+` and `#` allowed
//! format = "json"                    # json | csv | raw
//! max_payload_bytes = 65536
//! device_level = 1                   # the topic level naming the device; readings of another device are refused
//! qos = 1                            # of everything the rule publishes
//! dead_letter_topic = "ganglion/dead-letter/{rule}"
//! engine = "remote:big"              # the rule's model calls: "local" or a [remote.<name>] of ganglion.toml; default [model] engine
//!
//! [[preprocess]]                     # a chain, run in order
//! plugin = "clean-readings"
//! config = { units = { temperature = "C" } }
//! limits = { max_memory_mib = 96 }   # optional, within [plugins.limits]' bounds
//!
//! [window]                           # per device; count, seconds, or both (whichever first)
//! count = 12
//! seconds = 3600
//!
//! [template]                         # optional: without it the rule does not use the model; `[prompt]` is its old name
//! plugin = "prompt-template"
//! config = { user = "..." }
//!
//! [postprocess]                      # or [handler] for a rule-world plugin instead of all the above
//! plugin = "json-actions"
//!
//! [allow]                            # what the rule may emit; anything else is dead-lettered
//! publish = ["plant/{device}/cmd", { topic = "plant/{device}/setpoint", min = 0.0, max = 80.0 }]
//! alert_any_device = false          # alerts only for the window's device
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

mod allow;
#[cfg(test)]
mod proptests;
mod topic;

pub use allow::{AllowList, CommandAllow, PublishAllow, PublishEntry};
pub use topic::{
    Fill, RESERVED_PREFIX, check_device, filter_matches, is_reserved, pattern_matches,
    validate_filter, validate_topic,
};

use crate::types::Outgoing;
use crate::types::{Action, Qos};
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
    /// Limits for this plugin in this rule, over `[plugins.limits]` and
    /// within its bounds (a model-carrying plugin needs more memory and a
    /// longer first call). Default none. Boxed: most rules set none, and
    /// every rule holds several references.
    #[serde(default)]
    pub limits: Box<crate::config::PluginLimits>,
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
    device_level: Option<usize>,
    #[serde(default = "default_qos")]
    qos: u8,
    dead_letter_topic: Option<String>,
    #[serde(default)]
    preprocess: Vec<PluginRef>,
    window: Option<WindowSpec>,
    #[serde(rename = "template", alias = "prompt")]
    prompt: Option<PluginRef>,
    postprocess: Option<PluginRef>,
    handler: Option<PluginRef>,
    #[serde(default)]
    allow: AllowList,
    #[serde(default = "default_shared")]
    shared: bool,
    engine: Option<crate::config::EngineChoice>,
}

fn default_shared() -> bool {
    true
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
        /// The prompt template (`[template]`); none means the rule does not
        /// use the model.
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
    /// The topic level (0-based) that names the device a message is from.
    /// When set, readings that name another device are dead-lettered
    /// (`device-mismatch`): a sensor can then only speak for the device its
    /// topic (and the broker's ACL on it) names, whatever its payload says.
    pub device_level: Option<usize>,
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
    /// Whether, under `[mqtt] share_group`, the rule's filters are shared
    /// with the other gateways of the group (each message reaches one of
    /// them). `shared = false` subscribes them plainly: every gateway that
    /// runs the rule gets every message, so such a rule belongs to one
    /// gateway of the group (or to device-disjoint filters per gateway).
    /// Default true.
    pub shared: bool,
    /// Where the rule's model calls go, its template's and its plugins'
    /// alike: the local engine or a named remote. None: `[model] engine`.
    pub engine: Option<crate::config::EngineChoice>,
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
            if t.starts_with("$share/") {
                return Err(invalid(format!(
                    "topic filter `{t}`: write the filter without `$share/<group>/` and set `[mqtt] share_group` in ganglion.toml (rules match the topics messages arrive on)"
                )));
            }
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
                    return Err(invalid("[handler] takes the whole message: drop [[preprocess]], [window] and [template]".into()));
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
        let sample = Fill {
            rule: &name,
            device: "x",
            command: "x",
        };
        for p in &file.allow.publish {
            let filled = sample.topic(p.topic()).unwrap_or_default();
            validate_filter(&filled)
                .map_err(|m| invalid(format!("[allow] publish `{}`: {m}", p.topic())))?;
            if is_reserved(&filled) {
                return Err(invalid(format!(
                    "[allow] publish `{}`: the gateway's (`{RESERVED_PREFIX}/...`) and the broker's (`$...`) topics are reserved",
                    p.topic()
                )));
            }
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
            device_level: file.device_level,
            qos,
            dead_letter_topic,
            stages,
            allow: file.allow,
            shared: file.shared,
            engine: file.engine,
        })
    }

    /// The rule's per-device window, if it has one.
    pub fn window(&self) -> Option<&WindowSpec> {
        match &self.stages {
            Stages::Chain { window, .. } => window.as_ref(),
            Stages::Handler(_) => None,
        }
    }

    /// The filters to subscribe to: under a share group (and unless the
    /// rule says `shared = false`), `$share/<group>/<filter>`.
    pub fn subscriptions(&self, share_group: Option<&str>) -> Vec<String> {
        match share_group {
            Some(g) if self.shared => self
                .topics
                .iter()
                .map(|t| format!("$share/{g}/{t}"))
                .collect(),
            _ => self.topics.clone(),
        }
    }

    /// Refuses a windowed rule whose filters a share group spreads over
    /// several gateways: each would see some of a device's readings, and its
    /// windows (and what the model says about them) would be silently wrong.
    pub fn check_sharing(&self, share_group: Option<&str>) -> Result<(), String> {
        match (share_group, self.window()) {
            (Some(g), Some(_)) if self.shared => Err(format!(
                "rule `{}` has a [window], and `[mqtt] share_group = \"{g}\"` would spread each device's messages over the gateways of the group, splitting its windows: set `shared = false` in the rule and run it on one gateway of the group (or give each gateway filters for its own devices)",
                self.name
            )),
            _ => Ok(()),
        }
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

    /// The device a handler rule's message is for: the topic level that the
    /// first `+` of the first matching filter stands for
    /// (`home/+/events` and `home/kitchen/events` give `kitchen`), when it
    /// is a valid device id of at most `max_bytes`. A handler rule has no
    /// window; without such a level `{device}` in its allow-list matches
    /// nothing, rather than any device.
    pub fn topic_device<'t>(&self, topic: &'t str, max_bytes: usize) -> Option<&'t str> {
        let filter = self.topics.iter().find(|f| filter_matches(f, topic))?;
        let at = filter.split('/').position(|l| l == "+")?;
        let level = topic.split('/').nth(at)?;
        check_device(level, max_bytes).ok().map(|()| level)
    }

    /// Checks an action against the allow-list and turns it into what to
    /// publish, or says why it is refused; `device` is the window's device,
    /// empty for none.
    pub fn authorize(&self, action: &Action, device: &str) -> Result<Outgoing, String> {
        self.allow.authorize(&self.name, self.qos, action, device)
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
    fn the_template_table_is_also_read_under_its_old_name_prompt() {
        let rule = |table: &str| {
            Rule::parse(
                &format!(
                    "topics = [\"a\"]\n[[preprocess]]\nplugin = \"p\"\n[{table}]\nplugin = \"t\"\n[postprocess]\nplugin = \"q\"\n"
                ),
                "r",
                None,
            )
        };
        let template = rule("template").unwrap();
        assert!(
            matches!(&template.stages, Stages::Chain { prompt: Some(p), .. } if p.plugin == "t"),
            "{:?}",
            template.stages
        );
        assert_eq!(rule("prompt").unwrap(), template);
        let both = Rule::parse(
            "topics = [\"a\"]\n[[preprocess]]\nplugin = \"p\"\n[template]\nplugin = \"t\"\n[prompt]\nplugin = \"t\"\n[postprocess]\nplugin = \"q\"\n",
            "r",
            None,
        );
        assert!(both.is_err());
    }

    #[test]
    fn a_handler_rules_device_comes_from_the_topic_not_a_wildcard() {
        let rule = Rule::parse(
            "topics = [\"home/+/events\", \"bridge/all\"]\n[handler]\nplugin = \"h\"\n[allow]\npublish = [\"tagged/{device}\"]\n",
            "h",
            None,
        )
        .unwrap();
        assert_eq!(
            rule.topic_device("home/kitchen/events", 64),
            Some("kitchen")
        );
        assert_eq!(rule.topic_device("bridge/all", 64), None);
        assert_eq!(rule.topic_device("home/$x/events", 64), None);
        let publish = |topic: &str| Action::Publish {
            topic: topic.into(),
            payload: b"x".to_vec(),
            qos: Qos::AtLeastOnce,
            retain: false,
        };
        assert!(
            rule.authorize(&publish("tagged/kitchen"), "kitchen")
                .is_ok()
        );
        assert!(rule.authorize(&publish("tagged/hall"), "kitchen").is_err());
        assert!(rule.authorize(&publish("tagged/hall"), "").is_err());
    }

    #[test]
    fn a_rule_names_its_engine_and_a_bad_name_is_refused_with_its_line() {
        let text = |engine: &str| {
            format!("topics = [\"a/b\"]\nengine = \"{engine}\"\n[handler]\nplugin = \"h\"\n")
        };
        let rule = Rule::parse(&text("remote:big"), "r", None).unwrap();
        assert_eq!(
            rule.engine,
            Some(crate::config::EngineChoice::Remote("big".into()))
        );
        let rule = Rule::parse(&text("local"), "r", None).unwrap();
        assert_eq!(rule.engine, Some(crate::config::EngineChoice::Local));
        let err = Rule::parse(&text("remote:"), "r", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("remote:<name>") && err.contains("line 2"),
            "{err}"
        );
    }
}
