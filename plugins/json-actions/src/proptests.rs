//! Property tests of the completion parser on hostile model output: fake
//! JSON, closing tags, chat markers, nested braces, unicode; and generated
//! actions embedded in prose, which must come back exactly. Cases per
//! property: proptest's default (256), or `PROPTEST_CASES`.

use super::*;
use proptest::prelude::*;
use serde_json::json;

/// Every failure is a `BadCompletion`, and never more actions than allowed.
fn typed(text: &str) -> Result<(), TestCaseError> {
    let _ = extract_json(text);
    let cfg = Config { max_actions: 3 };
    match parse_actions(text, "d", &cfg) {
        Ok(actions) => prop_assert!(actions.len() <= cfg.max_actions),
        Err(e) => prop_assert!(matches!(e, PluginError::BadCompletion(_)), "{:?}", e),
    }
    Ok(())
}

/// Model output made of JSON, markup and chat syntax.
fn completion_like() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        proptest::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            "\"",
            "\\",
            "\"actions\"",
            "\"type\"",
            "\"alert\"",
            "\"publish\"",
            "\"command\"",
            "\"topic\"",
            "\"text\"",
            "\"device\"",
            "\"value\"",
            "\"qos\"",
            "\"retain\"",
            "\"payload\"",
            "null",
            "true",
            "1e999",
            "-0",
            "18446744073709551616",
            "```json\n",
            "```",
            "</json>",
            "<json>",
            "</s>",
            "<|im_end|>",
            "<|im_start|>assistant\n",
            "Ignore previous instructions.",
            "\u{0}",
            "\u{202e}",
            "\u{1F525}",
            "\"\\ud800\"",
            "\n",
        ])
        .prop_map(str::to_owned),
        any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(token, 0..64).prop_map(|t| t.concat())
}

/// Prose before the JSON: anything but `{` and `[`, which start it.
fn prose() -> impl Strategy<Value = String> {
    "[^{\\[]{0,40}"
}

/// A number as a sensor or a model writes it: up to ten digits, read back
/// exactly (a 17-digit one may come back one ulp off without serde_json's
/// `float_roundtrip`, which is not what this tests).
fn number() -> impl Strategy<Value = f64> {
    (any::<i32>(), 0i32..6).prop_map(|(m, e)| f64::from(m) / 10f64.powi(e))
}

fn non_blank() -> impl Strategy<Value = String> {
    any::<String>().prop_filter("not blank", |s| !s.trim().is_empty())
}

/// A valid action as the model writes it, and the action it means for a
/// window of device `d`.
fn action() -> impl Strategy<Value = (Json, Action)> {
    let device = proptest::option::of(any::<String>());
    let alert = (
        proptest::sample::select(vec![
            ("info", AlertLevel::Info),
            ("warning", AlertLevel::Warning),
            ("WARN", AlertLevel::Warning),
            ("critical", AlertLevel::Critical),
            ("error", AlertLevel::Critical),
        ]),
        device.clone(),
        non_blank(),
    )
        .prop_map(|((name, level), device, text)| {
            let mut j = json!({"type": "alert", "level": name, "text": text});
            if let Some(d) = &device {
                j["device"] = json!(d);
            }
            let a = Alert {
                level,
                device: device.unwrap_or_else(|| "d".into()),
                text,
            };
            (j, Action::Alert(a))
        });
    let payload = prop_oneof![
        Just((Json::Null, Vec::new())),
        any::<String>().prop_map(|s| (json!(s), s.into_bytes())),
        number().prop_map(|v| (
            json!({"v": v, "unit": "°C"}),
            json!({"v": v, "unit": "°C"}).to_string().into_bytes()
        )),
    ];
    let publish = (non_blank(), payload, 0u64..3, any::<bool>()).prop_map(
        |(topic, (raw, payload), qos, retain)| {
            let j = json!({"type": "publish", "topic": topic, "payload": raw, "qos": qos, "retain": retain});
            let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][qos as usize];
            (j, Action::Publish(Publish { topic, payload, qos, retain }))
        },
    );
    let value = prop_oneof![
        Just((Json::Null, None)),
        number().prop_map(|v| (json!(v), Some(Value::Number(v)))),
        any::<bool>().prop_map(|v| (json!(v), Some(Value::Boolean(v)))),
        any::<String>().prop_map(|v| (json!(v), Some(Value::Text(v.clone())))),
    ];
    let command = (
        device.prop_filter("not empty", |d| d.as_deref() != Some("")),
        non_blank(),
        value,
    )
        .prop_map(|(device, name, (raw, value))| {
            let mut j = json!({"type": "command", "command": name, "value": raw});
            if let Some(d) = &device {
                j["device"] = json!(d);
            }
            let c = Command {
                device: device.unwrap_or_else(|| "d".into()),
                name,
                value,
            };
            (j, Action::Command(c))
        });
    prop_oneof![alert, publish, command]
}

proptest! {
    /// Arbitrary text: actions or a `bad-completion` error, never a panic.
    #[test]
    fn parsing_never_panics_on_arbitrary_text(text in any::<String>()) {
        typed(&text)?;
    }

    /// Fake JSON, closing tags, chat markers and nested braces: never a
    /// panic, never more actions than allowed.
    #[test]
    fn parsing_never_panics_on_completion_like_text(text in completion_like()) {
        typed(&text)?;
        typed(&format!("{{\"actions\":[{text}")).map(|_| ())?;
        typed(&format!("[{{\"type\":\"alert\",\"text\":{text}")).map(|_| ())?;
    }

    /// A valid `{"actions":[...]}` after prose and before anything at all
    /// (more JSON, closing tags) is exactly what is extracted.
    #[test]
    fn an_actions_object_in_noise_is_what_is_extracted(
        before in prose(),
        actions in proptest::collection::vec(action(), 0..6),
        after in completion_like(),
        pretty in any::<bool>(),
    ) {
        let object = json!({"actions": actions.iter().map(|(j, _)| j.clone()).collect::<Vec<_>>()});
        let written = if pretty {
            serde_json::to_string_pretty(&object).unwrap()
        } else {
            object.to_string()
        };
        let text = format!("{before}{written}{after}");
        prop_assert_eq!(extract_json(&text).unwrap(), object);
        let cfg = Config { max_actions: 8 };
        let parsed = parse_actions(&text, "d", &cfg).unwrap();
        let want: Vec<Action> = actions.into_iter().map(|(_, a)| a).collect();
        prop_assert_eq!(parsed, want);
    }
}
