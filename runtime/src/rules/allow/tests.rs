use super::*;
use crate::rules::Rule;
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

fn publish(topic: &str, payload: &str, retain: bool) -> Action {
    Action::Publish {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        qos: Qos::AtLeastOnce,
        retain,
    }
}

fn rule_allowing(allow: &str) -> Rule {
    let text = format!(
        "topics = [\"plant/+/telemetry\"]\n[[preprocess]]\nplugin = \"p\"\n[postprocess]\nplugin = \"q\"\n[allow]\n{allow}\n"
    );
    Rule::parse(&text, "plant", None).unwrap()
}

#[test]
fn device_hash_cannot_reach_another_devices_setpoint() {
    let rule = rule_allowing(
        r#"publish = ["plant/{device}/cmd", { topic = "plant/boiler/setpoint", min = 0.0, max = 80.0 }]"#,
    );
    for device in ["#", "+", "boiler/setpoint", "boiler/#"] {
        assert!(
            rule.authorize(&publish("plant/boiler/setpoint", "500", false), device)
                .is_err(),
            "{device}"
        );
        assert!(
            rule.authorize(&publish("plant/boiler/cmd", "x", false), device)
                .is_err(),
            "{device}"
        );
    }
    assert!(
        rule.authorize(&publish("plant/m1/cmd", "x", false), "m1")
            .is_ok()
    );
}

#[test]
fn a_broad_entry_cannot_lift_a_narrow_entrys_bounds() {
    let rule = rule_allowing(
        r#"publish = ["plant/#", { topic = "plant/boiler/setpoint", min = 0.0, max = 80.0 }]"#,
    );
    let err = rule
        .authorize(&publish("plant/boiler/setpoint", "500", false), "m1")
        .unwrap_err();
    assert!(err.contains("above the allowed maximum"), "{err}");
    assert!(
        rule.authorize(&publish("plant/boiler/setpoint", "50", false), "m1")
            .is_ok()
    );
    assert!(
        rule.authorize(&publish("plant/other", "anything", false), "m1")
            .is_ok()
    );
}

#[test]
fn retain_from_a_plugin_needs_an_entry_that_allows_it() {
    let rule = rule_allowing(
        r#"publish = ["plant/{device}/cmd", { topic = "plant/{device}/state", retain = true }]"#,
    );
    let err = rule
        .authorize(&publish("plant/m1/cmd", "on", true), "m1")
        .unwrap_err();
    assert!(err.contains("retain is not allowed"), "{err}");
    let ok = rule
        .authorize(&publish("plant/m1/state", "on", true), "m1")
        .unwrap();
    assert!(ok.retain);
    assert!(
        rule.authorize(&publish("plant/m1/cmd", "on", false), "m1")
            .is_ok()
    );
}

#[test]
fn publishing_to_the_gateways_and_brokers_own_topics_is_refused() {
    let rule = rule_allowing(r##"publish = ["#", "+/#"]"##);
    for topic in [
        "ganglion/command/boiler/setpoint",
        "ganglion/status/ganglion-demo",
        "$SYS/broker/clients",
    ] {
        let err = rule
            .authorize(&publish(topic, "1", false), "m1")
            .unwrap_err();
        assert!(err.contains("reserved"), "{topic}: {err}");
    }
    let text = "topics = [\"a\"]\n[handler]\nplugin = \"h\"\n[allow]\npublish = [\"ganglion/command/{device}/x\"]\n";
    let err = Rule::parse(text, "r", None).unwrap_err().to_string();
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn command_device_with_topic_syntax_is_refused() {
    let rule = rule_allowing(
        r#"commands = [{ device = "*", name = "fan", values = ["on", "off"] }, { device = "{device}", name = "heat", values = ["on", "off"] }]"#,
    );
    let cmd = |device: &str, name: &str| Action::Command {
        device: device.into(),
        name: name.into(),
        value: Some(Value::Text("on".into())),
    };
    for target in ["boiler/setpoint", "#", "+", "$SYS", "a\0b"] {
        assert!(
            rule.authorize(&cmd(target, "fan"), "m1").is_err(),
            "{target:?}"
        );
    }
    assert!(rule.authorize(&cmd("m2", "fan/../x"), "m1").is_err());
    // `{device}` written out by the model is not the window's device.
    assert!(rule.authorize(&cmd("{device}", "heat"), "m1").is_err());
    assert!(rule.authorize(&cmd("m1", "heat"), "m1").is_ok());
    assert!(
        rule.authorize(&cmd("m1", "heat"), "").is_err(),
        "no window device"
    );
    // A text command given a number is refused.
    let number = Action::Command {
        device: "m1".into(),
        name: "fan".into(),
        value: Some(Value::Number(3.0)),
    };
    assert!(rule.authorize(&number, "m1").is_err());
}

#[test]
fn an_alert_cannot_name_another_device_or_topic_syntax() {
    let rule = rule_allowing("alerts = true");
    let alert = |device: &str| Action::Alert {
        level: AlertLevel::Warning,
        device: device.into(),
        text: "t".into(),
    };
    for d in ["a/b", "#", "+", "$SYS", "m2"] {
        assert!(rule.authorize(&alert(d), "m1").is_err(), "{d}");
    }
    assert!(rule.authorize(&alert("m1"), "m1").is_ok());
    assert!(rule.authorize(&alert("m2"), "").is_ok(), "no window device");
    let any = rule_allowing("alert_any_device = true");
    assert!(any.authorize(&alert("m2"), "m1").is_ok());
    assert!(rule.authorize(&alert(""), "").is_err(), "no device at all");
    assert_eq!(
        rule.authorize(&alert(""), "m1").unwrap().topic,
        "ganglion/alert/plant/m1"
    );
}
