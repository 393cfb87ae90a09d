#![no_main]
//! json-actions' extraction of actions from a model completion
//! (plugins/json-actions/src/lib.rs) on arbitrary text. Proves: no panic;
//! every failure is a `bad-completion` error; never more actions than the
//! configured cap.

use ganglion_sdk::PluginError;
use json_actions::{Config, extract_json, parse_actions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = extract_json(&text);
    let cfg = Config { max_actions: 4 };
    match parse_actions(&text, "d", &cfg) {
        Ok(actions) => assert!(actions.len() <= cfg.max_actions),
        Err(e) => assert!(matches!(e, PluginError::BadCompletion(_)), "{e:?}"),
    }
});
