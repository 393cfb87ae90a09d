//! The rules' own topic checks (`rules::topic`, re-exported by `rules`) against rumqttc's, on
//! generated filters and topics. The rules layer sits below the MQTT
//! adapter and builds without rumqttc, so it keeps its own copy; this test
//! holds the two copies to one meaning. They differ on purpose in one
//! place: rumqttc's `matches` matches no `$` topic at all, while MQTT 3.1.1
//! §4.7.2 only keeps leading wildcards from matching them (`$SYS/x` is
//! matched by `$SYS/#`), and `rules::topic` follows the standard.

use crate::rules::{filter_matches, validate_filter, validate_topic};
use proptest::prelude::*;

/// Topic levels from a small alphabet, so that generated filters and
/// topics share levels often enough to match.
fn levels(wildcards: bool) -> impl Strategy<Value = String> {
    let alphabet = if wildcards {
        vec!["a", "b", "", "+", "#", "a+", "#b", "$x"]
    } else {
        vec!["a", "b", "", "$x", "c#", "+d"]
    };
    prop::collection::vec(prop::sample::select(alphabet), 1..5).prop_map(|l| l.join("/"))
}

/// Valid filters: whole-level `+` anywhere, `#` only last.
fn valid_filters() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "", "+"]), 1..5),
        any::<bool>(),
    )
        .prop_map(|(mut l, hash)| {
            if hash {
                l.push("#");
            }
            l.join("/")
        })
        .prop_filter("not empty", |f| !f.is_empty())
}

/// Valid topics not starting with `$` (see the module docs).
fn valid_topics() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "", "x$"]), 1..5)
        .prop_map(|l| l.join("/"))
        .prop_filter("not empty", |t| !t.is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Where rumqttc calls a filter valid, so does `validate_filter`, and
    /// the other way round (rumqttc accepts control characters, which
    /// `validate_filter` refuses, but none are generated here).
    #[test]
    fn filter_validity_agrees_with_rumqttc(filter in levels(true)) {
        prop_assert_eq!(validate_filter(&filter).is_ok(), rumqttc::valid_filter(&filter), "{}", filter);
    }

    /// Topics to publish on: no wildcard anywhere. rumqttc accepts the
    /// empty topic, which MQTT 3.1.1 §4.7.3 forbids and `validate_topic`
    /// refuses.
    #[test]
    fn topic_validity_agrees_with_rumqttc(topic in levels(false)) {
        prop_assume!(!topic.is_empty());
        prop_assert_eq!(validate_topic(&topic).is_ok(), rumqttc::valid_topic(&topic), "{}", topic);
    }

    /// Matching agrees on every valid filter and topic not starting with `$`.
    #[test]
    fn matching_agrees_with_rumqttc(filter in valid_filters(), topic in valid_topics()) {
        prop_assert!(validate_filter(&filter).is_ok() && rumqttc::valid_filter(&filter));
        prop_assert!(validate_topic(&topic).is_ok() && rumqttc::valid_topic(&topic));
        prop_assert_eq!(filter_matches(&filter, &topic), rumqttc::matches(&topic, &filter), "filter {} topic {}", filter, topic);
    }
}

/// The one deliberate difference, pinned.
#[test]
fn dollar_topics_follow_the_standard_not_rumqttc() {
    assert!(filter_matches("$SYS/#", "$SYS/broker/uptime"));
    assert!(!rumqttc::matches("$SYS/broker/uptime", "$SYS/#"));
    assert!(!filter_matches("#", "$SYS/broker/uptime"));
    assert!(!filter_matches("+/broker/uptime", "$SYS/broker/uptime"));
}
