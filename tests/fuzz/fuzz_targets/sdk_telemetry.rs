#![no_main]
//! The SDK's JSON telemetry parser (sdk/src/telemetry.rs) on arbitrary
//! bytes. Proves: no panic, and every failure is a `bad-payload` error.

use ganglion_sdk::PluginError;
use ganglion_sdk::telemetry::{ParseOptions, parse_json, parse_time};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    let options = ParseOptions {
        default_device: (mode & 1 == 1).then_some("topic-dev"),
        default_timestamp: i64::from(mode),
    };
    // Readings may name an empty device or metric (`{"device":"","":1}`):
    // the host refuses such device ids at the window, not the parser.
    if let Err(e) = parse_json(payload, &options) {
        assert!(matches!(e, PluginError::BadPayload(_)), "{e:?}");
    }
    if let Ok(text) = std::str::from_utf8(payload) {
        let _ = parse_time(text);
    }
});
