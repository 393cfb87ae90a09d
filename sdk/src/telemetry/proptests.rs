//! Property tests of the JSON telemetry parser and the time parser on
//! hostile input: arbitrary bytes, JSON-ish token soup (deep nesting, huge
//! numbers, escapes, lone surrogates, NUL), and generated readings that
//! must come back as they were written. Cases per property: proptest's
//! default (256), or `PROPTEST_CASES`.

use super::*;
use proptest::prelude::*;
use serde_json::json;

fn opts() -> ParseOptions<'static> {
    ParseOptions {
        default_device: Some("topic-dev"),
        default_timestamp: 7,
    }
}

fn no_device() -> ParseOptions<'static> {
    ParseOptions {
        default_device: None,
        default_timestamp: 0,
    }
}

/// Every failure of `parse_json` is a `BadPayload`.
fn bad_payload_or_readings(payload: &[u8]) -> Result<(), TestCaseError> {
    for o in [opts(), no_device()] {
        if let Err(e) = parse_json(payload, &o) {
            prop_assert!(matches!(e, PluginError::BadPayload(_)), "{:?}", e);
        }
    }
    Ok(())
}

/// Pieces of JSON and of telemetry, joined at random.
fn jsonish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        proptest::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            " ",
            "\"",
            "null",
            "true",
            "false",
            "\"device\"",
            "\"id\"",
            "\"metric\"",
            "\"name\"",
            "\"value\"",
            "\"unit\"",
            "\"units\"",
            "\"readings\"",
            "\"ts\"",
            "\"timestamp\"",
            "\"time\"",
            "0",
            "-0",
            "1e999",
            "-1e999",
            "1.7976931348623157e309",
            "123456789012345678901234567890",
            "1e-400",
            "0.5e",
            "\"\\u0000\"",
            "\"\\ud800\"",
            "\"\\udc00\\ud800\"",
            "\"\\u\"",
            "\"\\\"",
            "\"\\n\\t\"",
            "\"2013-12-02T21:15:00Z\"",
            "\"2013-13-02 21:15\"",
            "\0",
            "\u{feff}",
            "\u{1F525}",
        ])
        .prop_map(str::to_owned),
        "\"[^\"\\\\]{0,6}\"",
        any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(token, 0..48).prop_map(|t| t.concat())
}

/// A reading value as it is sent: a finite number, a boolean or text.
fn value() -> impl Strategy<Value = (serde_json::Value, Value)> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| (json!(v), Value::Number(v))),
        any::<i32>().prop_map(|v| (json!(v), Value::Number(v.into()))),
        any::<bool>().prop_map(|v| (json!(v), Value::Boolean(v))),
        any::<String>().prop_map(|v| (json!(v), Value::Text(v))),
    ]
}

/// A timestamp as it is sent and the milliseconds it means: epoch seconds
/// (below 10^11) or milliseconds (up to 2^53, exact in a JSON number).
fn timestamp() -> impl Strategy<Value = (serde_json::Value, i64)> {
    prop_oneof![
        (-99_999_999_999i64..99_999_999_999).prop_map(|s| (json!(s), s * 1000)),
        (100_000_000_000i64..(1 << 53)).prop_map(|ms| (json!(ms), ms)),
    ]
}

fn leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn month_days(y: i64, m: i64) -> i64 {
    match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Milliseconds since the epoch by counting days year by year, an
/// independent reference for `parse_time`.
fn reference_ms(y: i64, m: i64, d: i64, hh: i64, mm: i64, ss: i64) -> i64 {
    let year = |y: i64| if leap(y) { 366 } else { 365 };
    let mut days: i64 = if y >= 1970 {
        (1970..y).map(year).sum()
    } else {
        -(y..1970).map(year).sum::<i64>()
    };
    days += (1..m).map(|m| month_days(y, m)).sum::<i64>() + d - 1;
    (days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000
}

/// Equal, numbers within a few units in the last place: serde_json
/// without its `float_roundtrip` feature may read a 17-digit number with
/// a large exponent a few ulps off (seen: 2).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || (x.signum() == y.signum() && x.to_bits().abs_diff(y.to_bits()) <= 8)
        }
        _ => a == b,
    }
}

proptest! {
    /// Arbitrary bytes: readings or a `BadPayload` error, never a panic.
    #[test]
    fn parse_json_never_panics_on_arbitrary_bytes(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        bad_payload_or_readings(&payload)?;
    }

    /// JSON-ish token soup (telemetry keys, huge and malformed numbers,
    /// escapes, lone surrogates, NUL, BOM): never a panic.
    #[test]
    fn parse_json_never_panics_on_jsonish_text(text in jsonish()) {
        bad_payload_or_readings(text.as_bytes())?;
        bad_payload_or_readings(format!("{{\"device\":\"d\",{text}").as_bytes())?;
        bad_payload_or_readings(format!("{{\"readings\":[{text}").as_bytes())?;
    }

    /// Nesting thousands deep, in a value, in `readings` or at the top, is
    /// an error or a reading, never a stack overflow.
    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow(
        depth in 1usize..5000,
        (open, close) in proptest::sample::select(vec![
            ("[", "]"),
            ("{\"a\":", "}"),
            ("{\"readings\":[", "]}"),
            ("[{\"value\":", "}]"),
        ]),
        closed in any::<bool>(),
    ) {
        let nested = if closed {
            format!("{}1{}", open.repeat(depth), close.repeat(depth))
        } else {
            open.repeat(depth)
        };
        let text = format!("{{\"device\":\"d\",\"metric\":\"m\",\"value\":{nested}}}");
        bad_payload_or_readings(text.as_bytes())?;
        bad_payload_or_readings(nested.as_bytes())?;
    }

    /// One generated reading object, written as JSON with its keys in any
    /// spelling, parses back to exactly that reading.
    #[test]
    fn a_generated_reading_object_round_trips(
        device in any::<String>(),
        metric in any::<String>(),
        unit in any::<String>(),
        (raw, value) in value(),
        (ts, ms) in timestamp(),
        spelling in 0usize..3,
    ) {
        let (d, m, t) = [("device", "metric", "ts"), ("id", "name", "timestamp"), ("device", "name", "time")][spelling];
        let payload = json!({ d: device, m: metric, "value": raw, "unit": unit, t: ts }).to_string();
        let batch = parse_json(payload.as_bytes(), &no_device()).unwrap();
        prop_assert_eq!(batch.len(), 1);
        let r = batch.get(0).unwrap();
        prop_assert_eq!((r.device, r.metric, r.unit, r.timestamp), (device.as_str(), metric.as_str(), unit.as_str(), ms));
        prop_assert!(same(r.value, &value), "{:?} != {:?}", r.value, value);
    }

    /// A `readings` list of generated readings parses back to them, in
    /// order, the device and time of the object applying to each.
    #[test]
    fn a_generated_readings_list_round_trips(
        device in any::<String>(),
        (ts, ms) in timestamp(),
        readings in proptest::collection::vec((any::<String>(), value(), any::<String>()), 0..12),
    ) {
        let list: Vec<_> = readings.iter().map(|(m, (raw, _), u)| json!({"metric": m, "value": raw, "unit": u})).collect();
        let payload = json!({"device": device, "ts": ts, "readings": list}).to_string();
        let batch = parse_json(payload.as_bytes(), &no_device()).unwrap();
        let got: Vec<_> = batch.iter().map(|r| (r.device.to_owned(), r.metric.to_owned(), r.value.clone(), r.unit.to_owned(), r.timestamp)).collect();
        let want: Vec<_> = readings.iter().map(|(m, (_, v), u)| (device.clone(), m.clone(), v.clone(), u.clone(), ms)).collect();
        prop_assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!((&g.0, &g.1, &g.3, g.4), (&w.0, &w.1, &w.3, w.4));
            prop_assert!(same(&g.2, &w.2), "{:?} != {:?}", g.2, w.2);
        }
    }

    /// `parse_time` on arbitrary text: `None` or a time, never a panic.
    #[test]
    fn sdk_time_parsing_never_panics(s in any::<String>(), t in "[0-9T:.+Zz -]{0,40}") {
        let _ = parse_time(&s);
        let _ = parse_time(&t);
    }

    /// Every RFC 3339 time from year 0 to 9999, with fractions and offsets,
    /// is the instant counting days from the epoch gives.
    #[test]
    fn documented_times_are_read_exactly(
        (y, m) in (0i64..=9999, 1i64..=12),
        day in 0i64..31,
        (hh, mm, ss) in (0i64..24, 0i64..60, 0i64..60),
        millis in 0i64..1000,
        offset in -(23 * 60 + 59)..=(23i64 * 60 + 59),
    ) {
        let d = day % month_days(y, m) + 1;
        let sign = if offset < 0 { '-' } else { '+' };
        let text = format!(
            "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{millis:03}{sign}{:02}:{:02}",
            offset.abs() / 60,
            offset.abs() % 60
        );
        let want = reference_ms(y, m, d, hh, mm, ss) + millis - offset * 60_000;
        prop_assert_eq!(parse_time(&text), Some(want), "{}", text);
    }
}
