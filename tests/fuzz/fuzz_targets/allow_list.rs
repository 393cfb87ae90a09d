#![no_main]
//! The allow-list (`Rule::authorize`, runtime/src/rules) on arbitrary
//! actions and device ids. Proves: no panic; nothing authorized is published
//! on a reserved, `$` or wildcard topic, with a control character, or
//! retained; the bounded entry's bounds hold whatever broader entry matches.

use ganglion::rules::{Rule, is_reserved, validate_topic};
use ganglion::types::{Action, AlertLevel, Qos, Value};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn rule() -> &'static Rule {
    static RULE: OnceLock<Rule> = OnceLock::new();
    RULE.get_or_init(|| {
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
        .expect("the fuzz rule parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let kind: u8 = u.arbitrary().unwrap_or_default();
    let device: String = u.arbitrary().unwrap_or_default();
    let a: String = u.arbitrary().unwrap_or_default();
    let b: String = u.arbitrary().unwrap_or_default();
    let retain: bool = u.arbitrary().unwrap_or_default();
    let qos = match (kind >> 4) & 3 {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => Qos::ExactlyOnce,
    };
    let payload = u.take_rest().to_vec();
    let value = match kind >> 6 {
        0 => None,
        1 => Some(Value::Text(b.clone())),
        2 => Some(Value::Boolean(retain)),
        _ => std::str::from_utf8(&payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Value::Number),
    };
    let publish = |topic: String| Action::Publish {
        topic,
        payload: payload.clone(),
        qos,
        retain,
    };
    let action = match kind % 6 {
        0 => publish(a),
        1 => publish(format!("plant/{a}")),
        2 => publish("plant/boiler/setpoint".into()),
        3 => Action::Alert {
            level: AlertLevel::Critical,
            device: a,
            text: b,
        },
        _ => Action::Command {
            device: a,
            name: if kind % 6 == 4 { "setpoint".into() } else { b },
            value,
        },
    };
    let Ok(out) = rule().authorize(&action, &device) else {
        return;
    };
    assert!(validate_topic(&out.topic).is_ok(), "{:?}", out.topic);
    assert!(!out.topic.chars().any(char::is_control), "{:?}", out.topic);
    assert!(!out.retain);
    if let Action::Publish { topic, payload, .. } = &action {
        assert!(!is_reserved(&out.topic), "{:?}", out.topic);
        if topic == "plant/boiler/setpoint" {
            let v: f64 = std::str::from_utf8(payload)
                .expect("an allowed setpoint is text")
                .trim()
                .parse()
                .expect("an allowed setpoint is a number");
            assert!((0.0..=80.0).contains(&v), "{v}");
        }
    }
});
