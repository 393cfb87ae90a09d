#![no_main]
//! The host's CSV and time parsers (runtime/src/pipeline.rs) on arbitrary
//! payloads, column layouts, delimiters and topics. Proves: no panic; a
//! payload that parses gives one reading per non-blank line.

use ganglion::pipeline::fuzzing::{parse_csv, parse_time};
use ganglion::rules::CsvSpec;
use ganglion::types::Message;
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

const COLUMNS: &[&str] = &["timestamp", "value", "device", "metric", "unit", "_"];
const DELIMITERS: &[char] = &[',', ';', '\t', ' ', '|', '\0', '\u{e9}', '\n'];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let n = u.int_in_range(1..=5u8).unwrap_or(2);
    let columns = (0..n)
        .map(|_| u.choose(COLUMNS).copied().unwrap_or("value").to_owned())
        .collect();
    let spec = CsvSpec {
        columns,
        metric: u.arbitrary().unwrap_or_default(),
        unit: u.arbitrary().unwrap_or_default(),
        device_from_topic: u
            .arbitrary::<Option<u8>>()
            .unwrap_or_default()
            .map(usize::from),
        delimiter: u.choose(DELIMITERS).copied().unwrap_or(','),
    };
    let message = Message {
        topic: u.arbitrary().unwrap_or_default(),
        timestamp: u.arbitrary().unwrap_or_default(),
        payload: u.take_rest().to_vec(),
    };
    let text = std::str::from_utf8(&message.payload).ok();
    for line in text.iter().flat_map(|t| t.lines()) {
        let _ = parse_time(line);
        for field in line.split(spec.delimiter) {
            let _ = parse_time(field.trim());
        }
    }
    if let Ok(batch) = parse_csv(&message, &spec) {
        let lines = text
            .expect("parsed payloads are UTF-8")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        assert_eq!(batch.len(), lines);
    }
});
