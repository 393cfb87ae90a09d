//! Property tests of topic filling, matching and the allow-list on hostile
//! input: device ids, topics, command names and payloads drawn from the
//! characters that change a topic's meaning (`/`, `+`, `#`, `$`, NUL, `{`).
//! Cases per property: proptest's default (256), or `PROPTEST_CASES`.

use super::*;
use crate::types::{AlertLevel, Value};
use proptest::prelude::*;

/// Text made mostly of topic syntax, with a few ordinary letters.
fn hostile() -> impl Strategy<Value = String> {
    hostile_of(0)
}

fn hostile_of(min_len: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('/'),
            Just('+'),
            Just('#'),
            Just('$'),
            Just('\0'),
            Just('{'),
            Just('}'),
            Just('a'),
            Just('b'),
            Just('\u{1b}'),
            any::<char>(),
        ],
        min_len..12,
    )
    .prop_map(|c| c.into_iter().collect())
}

/// Topic levels from a small alphabet, so that filters and topics collide.
fn level(wildcards: bool) -> impl Strategy<Value = String> {
    let mut choices = vec!["a", "b", "$x", ""];
    if wildcards {
        choices.push("+");
    }
    proptest::sample::select(choices).prop_map(str::to_owned)
}

/// A valid filter: levels, `+` among them, and maybe a last `#`.
fn filter() -> impl Strategy<Value = String> {
    (proptest::collection::vec(level(true), 1..5), any::<bool>()).prop_map(|(mut l, hash)| {
        if hash {
            l.push("#".into());
        }
        non_empty(l.join("/"))
    })
}

/// An empty filter or topic is invalid in MQTT; `a` stands in for it.
fn non_empty(s: String) -> String {
    if s.is_empty() { "a".into() } else { s }
}

/// A valid topic name: levels without wildcards.
fn topic() -> impl Strategy<Value = String> {
    proptest::collection::vec(level(false), 1..5).prop_map(|l| non_empty(l.join("/")))
}

fn rule() -> Rule {
    Rule::parse(
        r#"
topics = ["plant/+/telemetry"]
[handler]
plugin = "h"
[allow]
publish = ["plant/{device}/cmd", "plant/#", { topic = "plant/boiler/setpoint", min = 0.0, max = 80.0 }]
commands = [{ device = "{device}", name = "fan", values = ["on", "off"] }, { device = "*", name = "setpoint", min = 5.0, max = 30.0 }]
"#,
        "plant",
        None,
    )
    .unwrap()
}

proptest! {
    /// Without placeholders, level-by-level pattern matching is MQTT filter
    /// matching.
    #[test]
    fn pattern_matching_agrees_with_filter_matching(f in filter(), t in topic()) {
        let none = Fill { rule: "", device: "", command: "" };
        prop_assert_eq!(pattern_matches(&f, &none, &t), filter_matches(&f, &t));
    }

    /// A device id, whatever it holds, makes `plant/{device}/cmd` allow
    /// exactly one topic, and only when it is a valid device id.
    #[test]
    fn a_filled_device_allows_only_its_own_topic(device in hostile(), topic in hostile()) {
        let only = Rule::parse(
            "topics = [\"a\"]\n[handler]\nplugin = \"h\"\n[allow]\npublish = [\"plant/{device}/cmd\"]\n",
            "r",
            None,
        )
        .unwrap();
        for topic in [topic.clone(), format!("plant/{topic}/cmd")] {
            let action = Action::Publish { topic: topic.clone(), payload: vec![], qos: Qos::AtLeastOnce, retain: false };
            if only.authorize(&action, &device).is_ok() {
                prop_assert_eq!(&topic, &format!("plant/{device}/cmd"));
                prop_assert!(check_device(&device, usize::MAX).is_ok(), "{:?}", device);
            }
        }
    }

    /// Whatever the device and the entry order, the bounded entry's bounds
    /// hold: the broad `plant/#` cannot lift them.
    #[test]
    fn every_matching_entry_must_allow(device in hostile(), v in -1.0e6f64..1.0e6) {
        let action = Action::Publish {
            topic: "plant/boiler/setpoint".into(),
            payload: v.to_string().into_bytes(),
            qos: Qos::AtLeastOnce,
            retain: false,
        };
        if rule().authorize(&action, &device).is_ok() {
            prop_assert!((0.0..=80.0).contains(&v), "{}", v);
        }
    }

    /// No action, however hostile, is let out to a reserved topic, with a
    /// wildcard or a control character in its topic, or retained.
    #[test]
    fn nothing_hostile_reaches_a_reserved_or_wildcard_topic(
        topic in hostile(),
        device in hostile(),
        target in hostile(),
        name in hostile(),
        text in hostile(),
        retain in any::<bool>(),
        kind in 0..5u8,
    ) {
        let publish = |topic: String| Action::Publish { topic, payload: text.clone().into_bytes(), qos: Qos::ExactlyOnce, retain };
        let action = match kind {
            0 => publish(format!("plant/{topic}")),
            1 => publish(format!("ganglion/{topic}")),
            2 => publish(format!("${topic}")),
            3 => Action::Alert { level: AlertLevel::Critical, device: target, text: text.clone() },
            _ => Action::Command { device: target, name, value: Some(Value::Text(text.clone())) },
        };
        let result = rule().authorize(&action, &device);
        if kind == 1 || kind == 2 {
            prop_assert!(result.is_err(), "{:?}", result);
        }
        if let Ok(out) = result {
            prop_assert!(validate_topic(&out.topic).is_ok(), "{}", out.topic);
            let is_publish = matches!(action, Action::Publish { .. });
            prop_assert!(!is_reserved(&out.topic) || !is_publish, "{}", out.topic);
            prop_assert!(!out.topic.chars().any(char::is_control), "{:?}", out.topic);
            prop_assert!(!out.retain);
            prop_assert!(out.qos <= Qos::AtLeastOnce);
            if let Action::Command { device: target, .. } = &action {
                prop_assert_eq!(out.topic.split('/').count(), 4, "{}", out.topic);
                let prefix = format!("ganglion/command/{target}/");
                prop_assert!(out.topic.starts_with(&prefix), "{}", out.topic);
            }
        }
    }

    /// Filling never lets a value's text be read as another placeholder.
    #[test]
    fn filling_is_one_pass(rule_name in hostile_of(1), device in hostile_of(1), command in hostile_of(1)) {
        let fill = Fill { rule: &rule_name, device: &device, command: &command };
        prop_assert_eq!(
            fill.topic("{rule}|{device}|{command}"),
            Some(format!("{rule_name}|{device}|{command}"))
        );
    }
}
