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
use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::borrow::Cow;
use std::fmt;

/// Defaults for fields a payload leaves out.
#[derive(Debug, Clone)]
pub struct ParseOptions<'a> {
    /// Device for readings whose payload names none; with none here either,
    /// such a payload is a bad payload.
    pub default_device: Option<&'a str>,
    /// Timestamp for readings whose payload gives none, in milliseconds
    /// since the Unix epoch (usually the message's `timestamp`).
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

/// Parses a JSON telemetry payload into readings.
///
/// Streams the document into the batch: strings without escapes are
/// borrowed from the payload and no JSON tree is built, since parsing is most
/// of a preprocessor's work per message.
pub fn parse_json(payload: &[u8], options: &ParseOptions<'_>) -> Result<ReadingBatch, PluginError> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let doc = Doc::deserialize(&mut de).and_then(|d| de.end().map(|()| d));
    let doc = match doc {
        Ok(d) => d,
        Err(e) if e.is_data() => return Err(PluginError::BadPayload(e.to_string())),
        Err(e) => return Err(PluginError::BadPayload(format!("invalid JSON: {e}"))),
    };
    let mut out = BatchBuilder::with_capacity(8);
    match doc {
        Doc::One(obj) => emit(obj, options, &mut out)?,
        Doc::Many(items) => {
            for obj in items {
                emit(obj, options, &mut out)?;
            }
        }
    }
    Ok(out.finish())
}

/// Text borrowed from the payload when it has no escapes.
#[derive(Debug, Clone)]
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("text")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Any JSON value, reduced to what a reading can hold.
#[derive(Debug, Clone)]
enum Scalar<'a> {
    Null,
    Number(f64),
    Bool(bool),
    Text(Cow<'a, str>),
    /// An array or object: not a reading value.
    Nested(&'static str),
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Number(_) => "a number",
            Scalar::Bool(_) => "a boolean",
            Scalar::Text(_) => "text",
            Scalar::Nested(k) => k,
        }
    }

    fn value(self) -> Option<Value> {
        match self {
            Scalar::Number(n) => Some(Value::Number(n)),
            Scalar::Bool(b) => Some(Value::Boolean(b)),
            Scalar::Text(t) => Some(Value::Text(t.into_owned())),
            Scalar::Null | Scalar::Nested(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Number(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Number(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Scalar<'de>, A::Error> {
                while a.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Nested("an array"))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Scalar<'de>, A::Error> {
                while a.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Nested("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

/// One telemetry object, fields kept until the object ends (the device and
/// time may come after the values they apply to).
#[derive(Debug, Default)]
struct Object<'a> {
    device: Option<Scalar<'a>>,
    metric: Option<Scalar<'a>>,
    time: Option<(&'static str, Scalar<'a>)>,
    unit: Option<Scalar<'a>>,
    value: Option<Scalar<'a>>,
    has_value: bool,
    units: Vec<(Text<'a>, Scalar<'a>)>,
    readings: Option<Result<Vec<Object<'a>>, String>>,
    fields: Vec<(Text<'a>, Scalar<'a>)>,
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a telemetry object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Object<'de>, A::Error> {
                let mut o = Object::default();
                while let Some(key) = a.next_key::<Text<'de>>()? {
                    match key.0.as_ref() {
                        "device" | "id" => set_first(&mut o.device, a.next_value()?),
                        "metric" | "name" => set_first(&mut o.metric, a.next_value()?),
                        k @ ("ts" | "timestamp" | "time") => {
                            let v: Scalar = a.next_value()?;
                            if o.time.is_none() && !matches!(v, Scalar::Null) {
                                o.time = Some((time_key(k), v));
                            }
                        }
                        "unit" => o.unit = Some(a.next_value()?),
                        "value" => {
                            o.has_value = true;
                            o.value = Some(a.next_value()?);
                        }
                        "units" => o.units = a.next_value::<Units>()?.0,
                        "readings" => o.readings = Some(a.next_value::<Readings>()?.0),
                        _ => o.fields.push((key, a.next_value()?)),
                    }
                }
                Ok(o)
            }
        }
        d.deserialize_map(V)
    }
}

fn set_first<'a>(slot: &mut Option<Scalar<'a>>, v: Scalar<'a>) {
    if slot.as_ref().is_none_or(|s| matches!(s, Scalar::Null)) {
        *slot = Some(v);
    }
}

fn time_key(k: &str) -> &'static str {
    match k {
        "ts" => "ts",
        "timestamp" => "timestamp",
        _ => "time",
    }
}

struct Units<'a>(Vec<(Text<'a>, Scalar<'a>)>);

impl<'de> Deserialize<'de> for Units<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Units<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of units")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Units<'de>, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = a.next_entry()? {
                    v.push(entry);
                }
                Ok(Units(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Units<'de>, E> {
                Ok(Units(Vec::new()))
            }
        }
        d.deserialize_any(V)
    }
}

struct Readings<'a>(Result<Vec<Object<'a>>, String>);

impl<'de> Deserialize<'de> for Readings<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Readings<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of readings")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Readings<'de>, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(8));
                while let Some(item) = a.next_element::<Item>()? {
                    match item {
                        Item::Object(o) => v.push(o),
                        Item::Other(kind) => {
                            let i = v.len();
                            while a.next_element::<de::IgnoredAny>()?.is_some() {}
                            return Ok(Readings(Err(format!(
                                "readings[{i}] is {kind}, not an object"
                            ))));
                        }
                    }
                }
                Ok(Readings(Ok(v)))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Readings<'de>, A::Error> {
                while a.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Readings(Err("`readings` is not an array".into())))
            }
        }
        d.deserialize_any(V)
    }
}

/// An array element: a telemetry object, or anything else (an error).
/// Lives only until it is moved into its list, so boxing would only add an
/// allocation per object.
#[allow(clippy::large_enum_variant)]
enum Item<'a> {
    Object(Object<'a>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, a: A) -> Result<Item<'de>, A::Error> {
                Object::deserialize(de::value::MapAccessDeserializer::new(a)).map(Item::Object)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Item<'de>, A::Error> {
                while a.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Item::Other("an array"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Item<'de>, E> {
                Ok(Item::Other("null"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Item<'de>, E> {
                Ok(Item::Other("a boolean"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Item<'de>, E> {
                Ok(Item::Other("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Item<'de>, E> {
                Ok(Item::Other("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Item<'de>, E> {
                Ok(Item::Other("a number"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Item<'de>, E> {
                Ok(Item::Other("text"))
            }
        }
        d.deserialize_any(V)
    }
}

/// The whole payload: one object, or an array of them.
enum Doc<'a> {
    One(Object<'a>),
    Many(Vec<Object<'a>>),
}

impl<'de> Deserialize<'de> for Doc<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Doc<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object or array")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, a: A) -> Result<Doc<'de>, A::Error> {
                Object::deserialize(de::value::MapAccessDeserializer::new(a)).map(Doc::One)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Doc<'de>, A::Error> {
                let mut v = Vec::new();
                let mut i = 0;
                while let Some(item) = a.next_element::<Item>()? {
                    match item {
                        Item::Object(o) => v.push(o),
                        Item::Other(kind) => {
                            return Err(de::Error::custom(format!(
                                "item {i} of the array is {kind}, not an object"
                            )));
                        }
                    }
                    i += 1;
                }
                Ok(Doc::Many(v))
            }
        }
        d.deserialize_any(V)
    }
}

fn text_field<'a, 'b>(
    slot: &'b Option<Scalar<'a>>,
    key: &str,
) -> Result<Option<&'b str>, PluginError> {
    match slot {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Text(t)) => Ok(Some(t.as_ref())),
        Some(other) => Err(PluginError::BadPayload(format!(
            "`{key}` should be a string, found {}",
            other.kind()
        ))),
    }
}

fn time_of(o: &Object<'_>) -> Result<Option<i64>, PluginError> {
    let Some((key, v)) = &o.time else {
        return Ok(None);
    };
    match v {
        Scalar::Number(t) => {
            if !t.is_finite() {
                return Err(PluginError::BadPayload(format!(
                    "`{key}` is not a finite number"
                )));
            }
            Ok(Some(if t.abs() < 1e11 {
                (t * 1000.0) as i64
            } else {
                *t as i64
            }))
        }
        Scalar::Text(s) => parse_time(s)
            .map(Some)
            .ok_or_else(|| PluginError::BadPayload(format!("`{key}`: cannot read time {s:?}"))),
        other => Err(PluginError::BadPayload(format!(
            "`{key}` should be a number or text, found {}",
            other.kind()
        ))),
    }
}

fn emit(
    o: Object<'_>,
    options: &ParseOptions<'_>,
    out: &mut BatchBuilder,
) -> Result<(), PluginError> {
    let device = match text_field(&o.device, "device")? {
        Some(d) => d,
        None => options.default_device.ok_or_else(|| {
            PluginError::BadPayload(
                "no device: payload has no `device` field and the topic gives none".into(),
            )
        })?,
    };
    let ts = time_of(&o)?.unwrap_or(options.default_timestamp);
    if let Some(readings) = &o.readings {
        let list = readings
            .as_ref()
            .map_err(|m| PluginError::BadPayload(m.clone()))?;
        for (i, r) in list.iter().enumerate() {
            single(r, device, ts, out).map_err(|e| match e {
                PluginError::BadPayload(m) => {
                    PluginError::BadPayload(format!("readings[{i}]: {m}"))
                }
                e => e,
            })?;
        }
        return Ok(());
    }
    if o.has_value || o.metric.is_some() {
        return single(&o, device, ts, out);
    }
    for (key, v) in o.fields {
        let Some(value) = v.value() else { continue };
        let unit = o
            .units
            .iter()
            .find(|(k, _)| k.0 == key.0)
            .and_then(|(_, u)| {
                if let Scalar::Text(t) = u {
                    Some(t.as_ref())
                } else {
                    None
                }
            });
        out.push(device, &key.0, value, unit.unwrap_or(""), ts);
    }
    Ok(())
}

fn single(
    o: &Object<'_>,
    device: &str,
    ts: i64,
    out: &mut BatchBuilder,
) -> Result<(), PluginError> {
    let device = text_field(&o.device, "device")?.unwrap_or(device);
    let metric = text_field(&o.metric, "metric")?
        .ok_or_else(|| PluginError::BadPayload("reading has no `metric`".into()))?;
    let ts = time_of(o)?.unwrap_or(ts);
    let unit = text_field(&o.unit, "unit")?.unwrap_or("");
    let raw = o
        .value
        .as_ref()
        .ok_or_else(|| PluginError::BadPayload(format!("reading `{metric}` has no `value`")))?;
    if matches!(raw, Scalar::Null) {
        return Ok(());
    }
    let value = raw.clone().value().ok_or_else(|| {
        PluginError::BadPayload(format!("reading `{metric}`: value is {}", raw.kind()))
    })?;
    out.push(device, metric, value, unit, ts);
    Ok(())
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
mod proptests;

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
    fn fields_apply_in_any_order_and_escapes_are_kept() {
        let b = parse_json(
            br#"{"readings":[{"metric":"a","value":1}],"device":"late","ts":5000000000000}"#,
            &opts(),
        )
        .unwrap();
        let r = b.get(0).unwrap();
        assert_eq!((r.device, r.timestamp), ("late", 5_000_000_000_000));
        let b = parse_json(
            br#"{"value":"a\nb","metric":"m\u00e9","device":"d\"1"}"#,
            &opts(),
        )
        .unwrap();
        let r = b.get(0).unwrap();
        assert_eq!(
            (r.device, r.metric, r.value),
            ("d\"1", "m\u{e9}", &Value::Text("a\nb".into()))
        );
        let flat = parse_json(br#"{"temperature":20,"nested":{"x":1},"list":[1],"units":{"temperature":"C"},"device":"d"}"#, &opts()).unwrap();
        assert_eq!(flat.len(), 1, "objects and arrays are not readings");
        assert_eq!(flat.get(0).unwrap().unit, "C");
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
