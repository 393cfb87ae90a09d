//! MQTT topic names and filters, device ids, and allow-list patterns.
//!
//! Everything here treats its input as hostile: a device id or a topic level
//! comes from a sensor, a plugin or the model and may carry `#`, `+`, `/`,
//! `$` or NUL. A device id is therefore checked before it names a window or
//! fills a pattern, and a pattern is compared level by level, so a filled-in
//! value is only ever compared as text, never read as a wildcard.

/// Checks an MQTT topic filter: levels split by `/`, `+` alone in a level,
/// `#` alone and last.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty".into());
    }
    if filter.len() > 65_535 {
        return Err("too long".into());
    }
    // MQTT forbids NUL and advises against the other control characters;
    // here they would reach logs and terminals as escape sequences.
    if filter.chars().any(char::is_control) {
        return Err("contains a control character".into());
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

/// The first topic level of the gateway's own topics (alerts, commands,
/// dead letters, status). A plugin's or the model's `publish` action may not
/// go there, nor to a `$` topic: those are the gateway's and the broker's.
pub const RESERVED_PREFIX: &str = "ganglion";

/// True for a topic a `publish` action may never name: the gateway's own
/// (`ganglion/...`) and the broker's (`$SYS/...`, `$share/...`).
pub fn is_reserved(topic: &str) -> bool {
    topic.starts_with('$') || topic.split('/').next() == Some(RESERVED_PREFIX)
}

/// Checks a device id from a payload, a plugin or the model before it names a
/// window or fills a topic: not empty, at most `max_bytes`, and none of `/`,
/// `+`, `#`, `$` or control characters (NUL included), which would change a
/// topic's levels, act as wildcards, reach the broker's `$` topics or the
/// terminal.
pub fn check_device(device: &str, max_bytes: usize) -> Result<(), String> {
    if device.is_empty() {
        return Err("empty device id".into());
    }
    if device.len() > max_bytes {
        return Err(format!(
            "device id of {} bytes over the cap of {max_bytes}",
            device.len()
        ));
    }
    if let Some(c) = device
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '$') || c.is_control())
    {
        return Err(format!(
            "device id `{}` contains {c:?}: `/`, `+`, `#`, `$` and control characters are refused",
            device.escape_debug()
        ));
    }
    Ok(())
}

/// What `{rule}`, `{device}` and `{command}` stand for in a pattern. An
/// empty device or command fills nothing: a level that names it matches no
/// topic level.
#[derive(Debug, Clone, Copy)]
pub struct Fill<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// The window's device; empty for none.
    pub device: &'a str,
    /// The command's name; empty for none.
    pub command: &'a str,
}

impl Fill<'_> {
    /// One pattern level with its placeholders filled in; `None` when it
    /// names a value that is empty.
    fn level(&self, level: &str) -> Option<String> {
        // One pass, so that a value holding `{command}` or `{device}` is
        // never itself filled in.
        let mut out = String::with_capacity(level.len());
        let mut rest = level;
        while let Some(at) = rest.find('{') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            let hit = [
                ("{rule}", self.rule),
                ("{device}", self.device),
                ("{command}", self.command),
            ]
            .into_iter()
            .find(|(name, _)| tail.starts_with(name));
            match hit {
                Some((_, "")) => return None,
                Some((name, value)) => {
                    out.push_str(value);
                    rest = &tail[name.len()..];
                }
                None => {
                    out.push('{');
                    rest = &tail[1..];
                }
            }
        }
        out.push_str(rest);
        Some(out)
    }

    /// The pattern with its placeholders filled in, for a topic to publish
    /// on; `None` when it names an empty value. Callers check the result
    /// with [`validate_topic`]: a value may hold `/` or wildcards.
    pub fn topic(&self, pattern: &str) -> Option<String> {
        let levels: Option<Vec<String>> = pattern.split('/').map(|l| self.level(l)).collect();
        levels.map(|l| l.join("/"))
    }
}

/// Whether an allow-list pattern matches `topic`, level by level: a level
/// that is exactly `+` or `#` in the pattern is a wildcard as in MQTT; any
/// other level, placeholders filled in, must equal the topic's level as
/// text. A filled-in value that holds `+`, `#` or `/` therefore matches only
/// itself, never as a wildcard or as several levels.
pub fn pattern_matches(pattern: &str, fill: &Fill<'_>, topic: &str) -> bool {
    if topic.starts_with('$') && (pattern.starts_with('+') || pattern.starts_with('#')) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut t = topic.split('/');
    loop {
        match (p.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(level), Some(actual)) => {
                if fill.level(level).as_deref() != Some(actual) {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(validate_topic("a/\u{1b}[2J").is_err());
        assert!(validate_topic("a/\0").is_err());
    }

    #[test]
    fn device_ids_with_topic_syntax_are_refused() {
        for bad in [
            "#",
            "+",
            "a/b",
            "$SYS",
            "a\0b",
            "",
            "\u{1b}[2J",
            "tab\there",
        ] {
            assert!(check_device(bad, 64).is_err(), "{bad:?}");
        }
        assert!(check_device(&"x".repeat(65), 64).is_err());
        for good in ["m1", "kitchen-2", "Küche", "boiler_3.a"] {
            assert!(check_device(good, 64).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn a_filled_device_is_compared_as_text_not_as_a_wildcard() {
        let fill = |device| Fill {
            rule: "r",
            device,
            command: "",
        };
        assert!(pattern_matches(
            "plant/{device}/cmd",
            &fill("m1"),
            "plant/m1/cmd"
        ));
        assert!(!pattern_matches(
            "plant/{device}/cmd",
            &fill("#"),
            "plant/boiler/cmd"
        ));
        assert!(!pattern_matches(
            "plant/{device}/cmd",
            &fill("+"),
            "plant/boiler/cmd"
        ));
        assert!(!pattern_matches(
            "plant/{device}/cmd",
            &fill("#"),
            "plant/boiler/setpoint"
        ));
        assert!(!pattern_matches(
            "plant/{device}",
            &fill("a/b"),
            "plant/a/b"
        ));
        assert!(!pattern_matches(
            "plant/{device}/cmd",
            &fill(""),
            "plant//cmd"
        ));
        assert!(pattern_matches("plant/+/cmd", &fill(""), "plant/x/cmd"));
        assert!(pattern_matches("plant/{rule}/#", &fill(""), "plant/r/a/b"));
        assert!(!pattern_matches("#", &fill(""), "$SYS/broker"));
        assert_eq!(fill("m1").topic("a/{device}/{rule}").unwrap(), "a/m1/r");
        assert_eq!(fill("").topic("a/{device}"), None);
        let tricky = Fill {
            rule: "r",
            device: "{command}",
            command: "unlock",
        };
        assert_eq!(
            tricky.topic("c/{device}/{command}").unwrap(),
            "c/{command}/unlock"
        );
    }

    #[test]
    fn the_gateways_and_the_brokers_topics_are_reserved() {
        assert!(is_reserved("ganglion/command/boiler/setpoint"));
        assert!(is_reserved("ganglion"));
        assert!(is_reserved("$SYS/broker/clients"));
        assert!(!is_reserved("plant/ganglion/x"));
        assert!(!is_reserved("ganglion2/x"));
    }
}
