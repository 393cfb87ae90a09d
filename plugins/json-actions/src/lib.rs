//! Postprocessor: turns a model completion into validated actions.
//!
//! The completion must hold one JSON value: `{"actions": [...]}`, a list of
//! actions, or one action. Prose or a Markdown code fence around the JSON is
//! ignored. Actions:
//! - `{"type":"alert","level":"warning","text":"...","device":"m1"}`
//! - `{"type":"publish","topic":"...","payload":{...},"qos":1,"retain":false}`
//!   (a text payload is sent as it is, any other JSON value as JSON text)
//! - `{"type":"command","device":"lamp-1","command":"set","value":21.5}`
//!
//! A missing `device` is the window's device. Anything else is a
//! `bad-completion` error that says what is wrong; nothing is guessed.
//!
//! ```toml
//! [postprocess]
//! plugin = "json-actions"
//! config = { max_actions = 8 }
//! ```

use ganglion_sdk::{
    Action, Alert, AlertLevel, Command, Completion, Context, PluginError, Postprocessor, Publish,
    Qos, ReadingBatch, Value, config,
};
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use std::sync::OnceLock;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_max_actions")]
    pub max_actions: usize,
}

fn default_max_actions() -> usize {
    16
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_actions: default_max_actions(),
        }
    }
}

fn bad(msg: impl Into<String>) -> PluginError {
    PluginError::BadCompletion(msg.into())
}

/// The first JSON value in `text`, skipping anything before it and ignoring anything after.
pub fn extract_json(text: &str) -> Result<Json, PluginError> {
    let start = text
        .find(['{', '['])
        .ok_or_else(|| bad("no JSON object or array in the completion"))?;
    let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Json>();
    match stream.next() {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(bad(format!("invalid JSON in the completion: {e}"))),
        None => Err(bad("no JSON value in the completion")),
    }
}

pub fn parse_actions(text: &str, device: &str, cfg: &Config) -> Result<Vec<Action>, PluginError> {
    let json = extract_json(text)?;
    let items = match json {
        Json::Array(items) => items,
        Json::Object(mut obj) => match obj.remove("actions") {
            Some(Json::Array(items)) => items,
            Some(_) => return Err(bad("`actions` is not a list")),
            None => vec![Json::Object(obj)],
        },
        _ => return Err(bad("the completion's JSON is neither an object nor a list")),
    };
    if items.len() > cfg.max_actions {
        return Err(bad(format!(
            "{} actions, more than the {} allowed",
            items.len(),
            cfg.max_actions
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let obj = item
                .as_object()
                .ok_or_else(|| bad(format!("action {i} is not an object")))?;
            parse_action(obj, device).map_err(|m| bad(format!("action {i}: {m}")))
        })
        .collect()
}

fn text<'a>(obj: &'a Map<String, Json>, key: &str) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{key}` is not text")),
    }
}

fn required<'a>(obj: &'a Map<String, Json>, key: &str) -> Result<&'a str, String> {
    text(obj, key)?
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| format!("`{key}` is missing"))
}

fn parse_action(obj: &Map<String, Json>, default_device: &str) -> Result<Action, String> {
    let kind = match text(obj, "type")? {
        Some(k) => k,
        None => required(obj, "action")?,
    };
    let device = text(obj, "device")?.unwrap_or(default_device).to_owned();
    match kind.to_ascii_lowercase().as_str() {
        "alert" => {
            let level = match text(obj, "level")?
                .unwrap_or("warning")
                .to_ascii_lowercase()
                .as_str()
            {
                "info" => AlertLevel::Info,
                "warning" | "warn" => AlertLevel::Warning,
                "critical" | "error" => AlertLevel::Critical,
                other => return Err(format!("unknown alert level `{other}`")),
            };
            Ok(Action::Alert(Alert {
                level,
                device,
                text: required(obj, "text")?.to_owned(),
            }))
        }
        "publish" => {
            let payload = match obj.get("payload") {
                None | Some(Json::Null) => Vec::new(),
                Some(Json::String(s)) => s.clone().into_bytes(),
                Some(other) => other.to_string().into_bytes(),
            };
            let qos = match obj.get("qos").map(Json::as_u64) {
                None => Qos::AtLeastOnce,
                Some(Some(0)) => Qos::AtMostOnce,
                Some(Some(1)) => Qos::AtLeastOnce,
                Some(Some(2)) => Qos::ExactlyOnce,
                Some(_) => return Err("`qos` must be 0, 1 or 2".into()),
            };
            let retain = match obj.get("retain") {
                None => false,
                Some(Json::Bool(b)) => *b,
                Some(_) => return Err("`retain` is not a boolean".into()),
            };
            Ok(Action::Publish(Publish {
                topic: required(obj, "topic")?.to_owned(),
                payload,
                qos,
                retain,
            }))
        }
        "command" => {
            let name = match text(obj, "command")? {
                Some(c) => c,
                None => required(obj, "name")?,
            };
            let value = match obj.get("value") {
                None | Some(Json::Null) => None,
                Some(Json::Number(n)) => Some(Value::Number(
                    n.as_f64().ok_or("`value` is not a finite number")?,
                )),
                Some(Json::Bool(b)) => Some(Value::Boolean(*b)),
                Some(Json::String(s)) => Some(Value::Text(s.clone())),
                Some(_) => return Err("`value` must be a number, boolean or text".into()),
            };
            if device.is_empty() {
                return Err("`device` is missing".into());
            }
            Ok(Action::Command(Command {
                device,
                name: name.to_owned(),
                value,
            }))
        }
        other => Err(format!("unknown action type `{other}`")),
    }
}

struct JsonActions;

static CONFIG: OnceLock<Result<Config, PluginError>> = OnceLock::new();

impl Postprocessor for JsonActions {
    fn postprocess(
        context: Context,
        _window: ReadingBatch,
        completion: Option<Completion>,
    ) -> Result<Vec<Action>, PluginError> {
        let cfg = config::cached(&CONFIG)?;
        let completion = completion.ok_or_else(|| {
            PluginError::BadConfig("json-actions needs a completion: give the rule a prompt".into())
        })?;
        parse_actions(&completion.text, &context.device, cfg)
    }
}

ganglion_sdk::export!(JsonActions: postprocess);

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fenced_and_wrapped_json() {
        let text = "Sure! Here you go:\n```json\n{\"actions\":[{\"type\":\"alert\",\"level\":\"critical\",\"text\":\"overheat\"},{\"type\":\"command\",\"device\":\"fan\",\"command\":\"on\",\"value\":true}]}\n```";
        let actions = parse_actions(text, "m1", &Config::default()).unwrap();
        assert_eq!(actions.len(), 2);
        assert!(
            matches!(&actions[0], Action::Alert(a) if a.device == "m1" && a.level == AlertLevel::Critical)
        );
        assert!(
            matches!(&actions[1], Action::Command(c) if c.device == "fan" && c.value == Some(Value::Boolean(true)))
        );
    }

    #[test]
    fn malformed_output_is_a_typed_error() {
        for text in [
            "no json here",
            "{\"type\":\"alert\"",
            "[1]",
            "{\"type\":\"explode\"}",
            "{\"type\":\"publish\",\"qos\":7,\"topic\":\"t\"}",
        ] {
            assert!(
                matches!(
                    parse_actions(text, "d", &Config::default()),
                    Err(PluginError::BadCompletion(_))
                ),
                "{text}"
            );
        }
        let many = format!("[{}]", ["{\"type\":\"alert\",\"text\":\"x\"}"; 3].join(","));
        assert!(parse_actions(&many, "d", &Config { max_actions: 2 }).is_err());
    }
}
