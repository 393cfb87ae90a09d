//! Payloads that are not JSON readings: CSV lines (`format = "csv"`) and
//! their timestamps. Hostile input gets an error, never a panic (property
//! tests below, fuzz targets in tests/fuzz).

use super::*;

/// Parses a CSV payload (one or more lines) into readings.
pub(super) fn parse_csv(message: &Message, spec: &CsvSpec) -> Result<ReadingBatch, String> {
    let text = std::str::from_utf8(&message.payload)
        .map_err(|e| format!("CSV payload is not UTF-8: {e}"))?;
    let topic_device = spec
        .device_from_topic
        .and_then(|i| message.topic.split('/').nth(i))
        .unwrap_or("");
    let mut batch = ReadingBatch::default();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let fields: Vec<&str> = line.split(spec.delimiter).map(str::trim).collect();
        if fields.len() != spec.columns.len() {
            return Err(format!(
                "line {}: {} fields, expected {} ({})",
                n + 1,
                fields.len(),
                spec.columns.len(),
                spec.columns.join(",")
            ));
        }
        let get = |name: &str| {
            spec.columns
                .iter()
                .position(|c| c == name)
                .map(|i| fields[i])
        };
        let value_text = get("value").unwrap_or_default();
        let value = match value_text {
            "true" => Value::Boolean(true),
            "false" => Value::Boolean(false),
            v => v
                .parse::<f64>()
                .map(Value::Number)
                .unwrap_or_else(|_| Value::Text(v.to_owned())),
        };
        let timestamp = match get("timestamp") {
            None => message.timestamp,
            Some(t) => match t.parse::<f64>() {
                // `inf`, `NaN`, `1e400`: not a time (was i64::MAX or 0).
                Ok(x) if !x.is_finite() => {
                    return Err(format!("line {}: time {t:?} is not a finite number", n + 1));
                }
                Ok(n) if n.abs() < 1e11 => (n * 1000.0) as i64,
                Ok(n) => n as i64,
                Err(_) => parse_time(t)
                    .ok_or_else(|| format!("line {}: cannot read time {t:?}", n + 1))?,
            },
        };
        let device = get("device").unwrap_or(topic_device);
        let metric = get("metric").or(spec.metric.as_deref()).unwrap_or_default();
        let unit = get("unit").unwrap_or(&spec.unit);
        batch.push(device, metric, value, unit, timestamp);
    }
    Ok(batch)
}

/// `YYYY-MM-DD[T ]HH:MM:SS`, UTC, to ms since the epoch. Fields must be
/// digits and in range (second 60 for a leap second); what follows the
/// seconds is ignored.
pub(super) fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    // Digits only: `parse` alone takes `+1` and `-1`.
    let n = |r: std::ops::Range<usize>| {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse::<i64>().ok()
    };
    let (y, m, d, hh, mm, ss) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000)
}

/// The private CSV and time parsers, for the cargo-fuzz targets in
/// tests/fuzz (a fuzz target sees only the public API). Not for other use.
#[doc(hidden)]
pub mod fuzzing {
    use crate::rules::CsvSpec;
    use crate::types::{Message, ReadingBatch};

    /// The pipeline's CSV parser.
    pub fn parse_csv(message: &Message, spec: &CsvSpec) -> Result<ReadingBatch, String> {
        super::parse_csv(message, spec)
    }

    /// The pipeline's time parser.
    pub fn parse_time(s: &str) -> Option<i64> {
        super::parse_time(s)
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_become_readings() {
        let spec = CsvSpec {
            columns: vec!["timestamp".into(), "value".into()],
            metric: Some("occupancy".into()),
            unit: "%".into(),
            device_from_topic: Some(1),
            delimiter: ',',
        };
        let m = Message {
            topic: "traffic/6005/occupancy".into(),
            payload: b"2015-09-01 13:45:00,3.06\n2015-09-01 13:50:00,6.44\n".to_vec(),
            timestamp: 0,
        };
        let b = parse_csv(&m, &spec).unwrap();
        let r: Vec<_> = b
            .iter()
            .map(|r| {
                (
                    r.device.to_owned(),
                    r.metric.to_owned(),
                    r.value.clone(),
                    r.timestamp,
                )
            })
            .collect();
        assert_eq!(
            r[0],
            (
                "6005".into(),
                "occupancy".into(),
                Value::Number(3.06),
                1_441_115_100_000
            )
        );
        assert_eq!(r.len(), 2);
        let bad = Message {
            payload: b"1,2,3".to_vec(),
            ..m
        };
        assert!(
            parse_csv(&bad, &spec)
                .unwrap_err()
                .contains("3 fields, expected 2")
        );
    }

    /// Found by `malformed_times_are_refused`: month 13 was read as January
    /// of the next year, `+1` and `-1` as numbers, any byte as the `T`.
    #[test]
    fn time_0000_13_01_is_refused() {
        for bad in [
            "0000-13-01 00:00:00",
            "2015-00-01 00:00:00",
            "2015-09-32 00:00:00",
            "2015-09-01 24:00:00",
            "2015-09-01 13:60:00",
            "2015-09-01 13:45:61",
            "2015-+9-01 13:45:00",
            "2015-09-01x13:45:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(parse_time("2015-09-01T13:45:00"), Some(1_441_115_100_000));
        assert_eq!(parse_time("2016-12-31 23:59:60"), Some(1_483_228_800_000));
    }

    /// Found by `non_finite_timestamps_are_refused`: `inf` was read as
    /// i64::MAX ms and `NaN` as the epoch.
    #[test]
    fn csv_timestamp_inf_is_refused() {
        let spec = CsvSpec {
            columns: vec!["timestamp".into(), "value".into()],
            metric: Some("m".into()),
            unit: String::new(),
            device_from_topic: Some(0),
            delimiter: ',',
        };
        for t in ["inf", "-inf", "NaN", "1e400"] {
            let m = Message {
                topic: "d".into(),
                payload: format!("{t},1").into_bytes(),
                timestamp: 0,
            };
            let e = parse_csv(&m, &spec).unwrap_err();
            assert!(e.contains("not a finite number"), "{t}: {e}");
        }
    }

    /// Property tests of the CSV and time parsers on hostile input. Cases
    /// per property: proptest's default (256), or `PROPTEST_CASES`.
    mod proptests {
        use super::*;
        use proptest::prelude::*;

        const COLUMNS: &[&str] = &["timestamp", "value", "device", "metric", "unit", "_"];

        fn spec(columns: Vec<&str>, delimiter: char) -> CsvSpec {
            CsvSpec {
                columns: columns.into_iter().map(str::to_owned).collect(),
                metric: Some("m".into()),
                unit: "u".into(),
                device_from_topic: Some(1),
                delimiter,
            }
        }

        fn message(topic: String, payload: Vec<u8>) -> Message {
            Message {
                topic,
                payload,
                timestamp: 7,
            }
        }

        /// Text made of CSV and time syntax, digits and a few others.
        fn csvish() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    proptest::sample::select(vec![
                        ',', ';', '\n', '\r', ' ', '\t', '-', ':', 'T', '.', '+', 'e', '\0',
                        '\u{e9}'
                    ]),
                    proptest::char::range('0', '9'),
                    any::<char>(),
                ],
                0..64,
            )
            .prop_map(|c| c.into_iter().collect())
        }

        /// A name that survives a CSV field as it is: no delimiter, no
        /// whitespace to trim, not read as a number or a boolean.
        fn name() -> impl Strategy<Value = String> {
            "[a-z][a-z0-9_.-]{0,8}".prop_filter("a name, not a number or boolean", |s| {
                s.parse::<f64>().is_err() && s != "true" && s != "false"
            })
        }

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<f64>()
                    .prop_filter("finite", |v| v.is_finite())
                    .prop_map(Value::Number),
                any::<bool>().prop_map(Value::Boolean),
                name().prop_map(Value::Text),
            ]
        }

        fn field(v: &Value) -> String {
            match v {
                Value::Number(n) => n.to_string(),
                Value::Boolean(b) => b.to_string(),
                Value::Text(t) => t.clone(),
            }
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

        /// Milliseconds since the epoch by counting days, year by year: an
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

        /// A valid date and time: (y, m, d, hh, mm, ss).
        fn civil() -> impl Strategy<Value = (i64, i64, i64, i64, i64, i64)> {
            (0i64..=9999, 1i64..=12).prop_flat_map(|(y, m)| {
                (
                    Just(y),
                    Just(m),
                    1..=month_days(y, m),
                    0i64..24,
                    0i64..60,
                    0i64..60,
                )
            })
        }

        proptest! {
            /// Arbitrary bytes, topics, column layouts and delimiters: an
            /// error or readings, never a panic.
            #[test]
            fn csv_parsing_never_panics_on_arbitrary_bytes(
                payload in proptest::collection::vec(any::<u8>(), 0..256),
                topic in any::<String>(),
                columns in proptest::collection::vec(proptest::sample::select(COLUMNS), 1..6),
                delimiter in any::<char>(),
            ) {
                let _ = parse_csv(&message(topic, payload), &spec(columns, delimiter));
            }

            /// CSV-like text (separators, digits, times, signs, NUL):
            /// never a panic; what parses has one reading per non-blank line.
            #[test]
            fn csv_parsing_never_panics_on_csvish_text(
                text in csvish(),
                columns in proptest::collection::vec(proptest::sample::select(COLUMNS), 1..6),
                delimiter in proptest::sample::select(vec![',', ';', '\t', ' ', ':', '-']),
            ) {
                let m = message("a/b/c".into(), text.clone().into_bytes());
                if let Ok(batch) = parse_csv(&m, &spec(columns, delimiter)) {
                    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
                    prop_assert_eq!(batch.len(), lines);
                }
            }

            /// Lines formatted from generated (epoch seconds, value) pairs
            /// parse back to the same readings, the device from the topic.
            #[test]
            fn formatted_timestamp_value_lines_round_trip(
                device in name(),
                rows in proptest::collection::vec((-99_999_999_999i64..99_999_999_999, value()), 1..16),
            ) {
                let text: String = rows.iter().map(|(t, v)| format!("{t},{}\n", field(v))).collect();
                let m = message(format!("site/{device}/x"), text.into_bytes());
                let batch = parse_csv(&m, &spec(vec!["timestamp", "value"], ',')).unwrap();
                let got: Vec<_> = batch.iter().map(|r| (r.device, r.metric, r.unit, r.value.clone(), r.timestamp)).collect();
                let want: Vec<_> = rows.iter().map(|(t, v)| (device.as_str(), "m", "u", v.clone(), t * 1000)).collect();
                prop_assert_eq!(got, want);
            }

            /// Every column, a text time and another delimiter: lines built
            /// from generated readings parse back to them.
            #[test]
            fn formatted_full_lines_round_trip(
                rows in proptest::collection::vec((name(), name(), value(), name(), civil()), 1..8),
                t in any::<bool>(),
            ) {
                let sep = if t { 'T' } else { ' ' };
                let text: String = rows
                    .iter()
                    .map(|(d, m, v, u, (y, mo, da, hh, mi, ss))| {
                        format!("{d};{m};{};{u};{y:04}-{mo:02}-{da:02}{sep}{hh:02}:{mi:02}:{ss:02}\r\n", field(v))
                    })
                    .collect();
                let columns = vec!["device", "metric", "value", "unit", "timestamp"];
                let batch = parse_csv(&message("t".into(), text.into_bytes()), &spec(columns, ';')).unwrap();
                let got: Vec<_> = batch.iter().map(|r| (r.device.to_owned(), r.metric.to_owned(), r.value.clone(), r.unit.to_owned(), r.timestamp)).collect();
                let want: Vec<_> = rows
                    .iter()
                    .map(|(d, m, v, u, (y, mo, da, hh, mi, ss))| {
                        (d.clone(), m.clone(), v.clone(), u.clone(), reference_ms(*y, *mo, *da, *hh, *mi, *ss))
                    })
                    .collect();
                prop_assert_eq!(got, want);
            }

            /// A timestamp that is not a finite number is refused, not read
            /// as a time at the end of the range or at the epoch.
            #[test]
            fn non_finite_timestamps_are_refused(
                t in proptest::sample::select(vec!["inf", "-inf", "NaN", "infinity", "1e400", "-1e999"]),
            ) {
                let m = message("a/b".into(), format!("{t},1").into_bytes());
                let r = parse_csv(&m, &spec(vec!["timestamp", "value"], ','));
                prop_assert!(r.is_err(), "{:?}", r);
            }

            /// `parse_time` on arbitrary text and on time-like text: `None`
            /// or a time, never a panic.
            #[test]
            fn time_parsing_never_panics(s in any::<String>(), t in csvish()) {
                let _ = parse_time(&s);
                let _ = parse_time(&t);
            }

            /// Every `YYYY-MM-DD[T ]HH:MM:SS` from year 0 to 9999 is read as
            /// the same instant as counting days from the epoch gives.
            #[test]
            fn documented_times_are_read_exactly((y, m, d, hh, mm, ss) in civil(), t in any::<bool>()) {
                let sep = if t { 'T' } else { ' ' };
                let text = format!("{y:04}-{m:02}-{d:02}{sep}{hh:02}:{mm:02}:{ss:02}");
                prop_assert_eq!(parse_time(&text), Some(reference_ms(y, m, d, hh, mm, ss)), "{}", text);
            }

            /// A time whose fields are out of range or not digits, or whose
            /// date and time are not separated by `T` or a space, is refused.
            #[test]
            fn malformed_times_are_refused(
                (y, m, d, hh, mm, ss) in civil(),
                field in 0usize..7,
                bad in prop_oneof![
                    Just("99".to_owned()),
                    Just("+1".to_owned()),
                    Just("-1".to_owned()),
                    Just(" 1".to_owned()),
                    "[!-/:-~]{2}",
                ],
            ) {
                let mut parts = [
                    format!("{y:04}"), format!("{m:02}"), format!("{d:02}"), " ".to_owned(),
                    format!("{hh:02}"), format!("{mm:02}"), format!("{ss:02}"),
                ];
                // Out of range: month 13, day 32, hour 24, minute 60,
                // second 61 (60 is a leap second).
                let bad = match (field, bad == "99") {
                    (0, true) => "19x0".to_owned(),
                    (0, false) => format!("{bad}{bad}"),
                    (1, true) => "13".to_owned(),
                    (2, true) => "32".to_owned(),
                    (3, _) => bad.chars().next().filter(|c| *c != 'T' && *c != ' ').unwrap_or('x').to_string(),
                    (4, true) => "24".to_owned(),
                    (5, true) => "60".to_owned(),
                    (6, true) => "61".to_owned(),
                    _ => bad,
                };
                parts[field] = bad;
                let [y, m, d, sep, hh, mm, ss] = parts;
                let text = format!("{y}-{m}-{d}{sep}{hh}:{mm}:{ss}");
                prop_assert_eq!(parse_time(&text), None, "{:?}", text);
            }
        }
    }
}
