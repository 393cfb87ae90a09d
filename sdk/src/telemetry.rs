//! JSON telemetry payloads to readings.
//!
//! Accepted shapes (and a top-level array of any of them):
//! - one reading: `{"device":"m1","metric":"temperature","value":21.5,"unit":"C","ts":1700000000000}`
//! - a list: `{"device":"m1","ts":1700000000000,"readings":[{"metric":"temperature","value":21.5,"unit":"C"}]}`
//! - flat fields: `{"device":"m1","ts":1700000000000,"temperature":21.5,"door_open":false,"units":{"temperature":"C"}}`
//!
//! `device` may also be spelled `id`; `metric` may be `name`; the timestamp may
//! be `ts`, `timestamp` or `time`, as epoch seconds or milliseconds (values
//! below 10^11 are seconds) or as RFC 3339 / `YYYY-MM-DD HH:MM:SS` text (UTC
//! unless an offset is given). A reading whose value is `null` is skipped.

use crate::batch::BatchBuilder;
use crate::{Message, PluginError, ReadingBatch, Value};
use serde_json::{Map, Value as Json};

/// Defaults for fields a payload leaves out.
#[derive(Debug, Clone)]
pub struct ParseOptions<'a> {
    pub default_device: Option<&'a str>,
    pub default_timestamp: i64,
}

impl<'a> ParseOptions<'a> {
    /// Device defaults to topic level `device_level` (0-based) when given,
    /// timestamp to when the host received the message.
    pub fn from_topic(
        message: &'a Message,
        device_level: Option<usize>,
        default_timestamp: i64,
    ) -> Self {
        ParseOptions {
            default_device: device_level
                .and_then(|i| message.topic.split('/').nth(i))
                .filter(|s| !s.is_empty()),
            default_timestamp,
        }
    }
}

const DEVICE_KEYS: [&str; 2] = ["device", "id"];
const METRIC_KEYS: [&str; 2] = ["metric", "name"];
const TIME_KEYS: [&str; 3] = ["ts", "timestamp", "time"];
const RESERVED: [&str; 10] = [
    "device",
    "id",
    "metric",
    "name",
    "ts",
    "timestamp",
    "time",
    "unit",
    "units",
    "readings",
];

/// Parses a JSON telemetry payload into readings.
pub fn parse_json(payload: &[u8], options: &ParseOptions<'_>) -> Result<ReadingBatch, PluginError> {
    let json: Json = serde_json::from_slice(payload)
        .map_err(|e| PluginError::BadPayload(format!("invalid JSON: {e}")))?;
    let mut out = BatchBuilder::with_capacity(8);
    match &json {
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let obj = item.as_object().ok_or_else(|| {
                    PluginError::BadPayload(format!("item {i} of the array is not an object"))
                })?;
                parse_object(obj, options, &mut out)?;
            }
        }
        Json::Object(obj) => parse_object(obj, options, &mut out)?,
        other => {
            return Err(PluginError::BadPayload(format!(
                "expected a JSON object or array, found {}",
                kind(other)
            )));
        }
    }
    Ok(out.finish())
}

fn parse_object(
    obj: &Map<String, Json>,
    options: &ParseOptions<'_>,
    out: &mut BatchBuilder,
) -> Result<(), PluginError> {
    let device = match str_field(obj, &DEVICE_KEYS)? {
        Some(d) => d,
        None => options.default_device.ok_or_else(|| {
            PluginError::BadPayload(
                "no device: payload has no `device` field and the topic gives none".into(),
            )
        })?,
    };
    let ts = match time_field(obj)? {
        Some(t) => t,
        None => options.default_timestamp,
    };
    if let Some(readings) = obj.get("readings") {
        let list = readings
            .as_array()
            .ok_or_else(|| PluginError::BadPayload("`readings` is not an array".into()))?;
        for (i, r) in list.iter().enumerate() {
            let r = r.as_object().ok_or_else(|| {
                PluginError::BadPayload(format!("readings[{i}] is not an object"))
            })?;
            let nested = ParseOptions {
                default_device: Some(device),
                default_timestamp: ts,
            };
            single(r, &nested, out).map_err(|e| match e {
                PluginError::BadPayload(m) => {
                    PluginError::BadPayload(format!("readings[{i}]: {m}"))
                }
                e => e,
            })?;
        }
        return Ok(());
    }
    if obj.contains_key("value") || obj.contains_key("metric") {
        let nested = ParseOptions {
            default_device: Some(device),
            default_timestamp: ts,
        };
        return single(obj, &nested, out);
    }
    let units = obj.get("units").and_then(Json::as_object);
    for (key, v) in obj {
        if RESERVED.contains(&key.as_str()) {
            continue;
        }
        let Some(value) = to_value(v) else { continue };
        let unit = units
            .and_then(|u| u.get(key))
            .and_then(Json::as_str)
            .unwrap_or("");
        out.push(device, key, value, unit, ts);
    }
    Ok(())
}

fn single(
    obj: &Map<String, Json>,
    options: &ParseOptions<'_>,
    out: &mut BatchBuilder,
) -> Result<(), PluginError> {
    let device = str_field(obj, &DEVICE_KEYS)?
        .or(options.default_device)
        .unwrap_or_default();
    let metric = str_field(obj, &METRIC_KEYS)?
        .ok_or_else(|| PluginError::BadPayload("reading has no `metric`".into()))?;
    let ts = time_field(obj)?.unwrap_or(options.default_timestamp);
    let unit = str_field(obj, &["unit"])?.unwrap_or("");
    let raw = obj
        .get("value")
        .ok_or_else(|| PluginError::BadPayload(format!("reading `{metric}` has no `value`")))?;
    if raw.is_null() {
        return Ok(());
    }
    let value = to_value(raw).ok_or_else(|| {
        PluginError::BadPayload(format!("reading `{metric}`: value is {}", kind(raw)))
    })?;
    out.push(device, metric, value, unit, ts);
    Ok(())
}

fn to_value(v: &Json) -> Option<Value> {
    match v {
        Json::Number(n) => n.as_f64().map(Value::Number),
        Json::Bool(b) => Some(Value::Boolean(*b)),
        Json::String(s) => Some(Value::Text(s.clone())),
        _ => None,
    }
}

fn str_field<'a>(
    obj: &'a Map<String, Json>,
    keys: &[&str],
) -> Result<Option<&'a str>, PluginError> {
    for key in keys {
        match obj.get(*key) {
            None | Some(Json::Null) => continue,
            Some(Json::String(s)) => return Ok(Some(s)),
            Some(other) => {
                return Err(PluginError::BadPayload(format!(
                    "`{key}` should be a string, found {}",
                    kind(other)
                )));
            }
        }
    }
    Ok(None)
}

fn time_field(obj: &Map<String, Json>) -> Result<Option<i64>, PluginError> {
    for key in TIME_KEYS {
        match obj.get(key) {
            None | Some(Json::Null) => continue,
            Some(Json::Number(n)) => {
                let t = n.as_f64().unwrap_or(f64::NAN);
                if !t.is_finite() {
                    return Err(PluginError::BadPayload(format!(
                        "`{key}` is not a finite number"
                    )));
                }
                return Ok(Some(if t.abs() < 1e11 {
                    (t * 1000.0) as i64
                } else {
                    t as i64
                }));
            }
            Some(Json::String(s)) => {
                return parse_time(s).map(Some).ok_or_else(|| {
                    PluginError::BadPayload(format!("`{key}`: cannot read time {s:?}"))
                });
            }
            Some(other) => {
                return Err(PluginError::BadPayload(format!(
                    "`{key}` should be a number or text, found {}",
                    kind(other)
                )));
            }
        }
    }
    Ok(None)
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "text",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Milliseconds since the Unix epoch for `YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|±HH:MM]`
/// (UTC when no offset is given), or `None` when the text is not such a time.
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 16
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ' || b[10] == b't')
        || b[13] != b':'
    {
        return None;
    }
    let (year, month, day, hour, minute) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
    );
    let mut i = 16;
    let mut second = 0;
    let mut millis = 0;
    if b.get(i) == Some(&b':') {
        second = num(i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            if end == start {
                return None;
            }
            let digits = &s.trim()[start..end.min(start + 3)];
            millis = digits.parse::<i64>().ok()? * 10_i64.pow(3 - digits.len() as u32);
            i = end;
        }
    }
    let offset_minutes = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if b.len() == i + 6 && b[i + 3] == b':' => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' { m } else { -m }
        }
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60) * 1000 + millis)
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ParseOptions<'static> {
        ParseOptions {
            default_device: Some("topic-dev"),
            default_timestamp: 7,
        }
    }

    #[test]
    fn parses_the_three_shapes() {
        let one = parse_json(
            br#"{"device":"m1","metric":"t","value":21.5,"unit":"C","ts":1700000000}"#,
            &opts(),
        )
        .unwrap();
        let r = one.get(0).unwrap();
        assert_eq!(
            (r.device, r.metric, r.unit, r.timestamp),
            ("m1", "t", "C", 1_700_000_000_000)
        );
        assert_eq!(r.value, &Value::Number(21.5));

        let list = parse_json(br#"{"ts":5000000000000,"readings":[{"metric":"a","value":true},{"metric":"b","value":"on","device":"x"},{"metric":"c","value":null}]}"#, &opts()).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.get(0).unwrap().device, "topic-dev");
        assert_eq!(list.get(1).unwrap().device, "x");
        assert_eq!(list.get(1).unwrap().timestamp, 5_000_000_000_000);

        let flat = parse_json(
            br#"[{"device":"d","temperature":20,"door":false,"units":{"temperature":"F"}}]"#,
            &opts(),
        )
        .unwrap();
        assert_eq!(flat.len(), 2);
        let t = flat.iter().find(|r| r.metric == "temperature").unwrap();
        assert_eq!((t.unit, t.timestamp), ("F", 7));
    }

    #[test]
    fn bad_payloads_are_typed_errors() {
        for bad in [
            &b"{"[..],
            b"42",
            b"\xff\xfe",
            br#"{"device":3,"value":1,"metric":"m"}"#,
            br#"{"metric":"m"}"#,
            br#"[1]"#,
        ] {
            assert!(
                matches!(parse_json(bad, &opts()), Err(PluginError::BadPayload(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let no_device = ParseOptions {
            default_device: None,
            default_timestamp: 0,
        };
        assert!(
            matches!(parse_json(br#"{"t":1}"#, &no_device), Err(PluginError::BadPayload(m)) if m.contains("no device"))
        );
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_time("2013-12-02 21:15:00"), Some(1_386_018_900_000));
        assert_eq!(
            parse_time("2013-12-02T22:15:00.5+01:00"),
            Some(1_386_018_900_500)
        );
        assert_eq!(parse_time("2013-12-02T21:15Z"), Some(1_386_018_900_000));
        assert_eq!(parse_time("2013-13-02 21:15:00"), None);
        assert_eq!(parse_time("yesterday"), None);
    }
}
