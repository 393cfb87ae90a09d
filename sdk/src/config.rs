//! The plugin's settings from the rule file.
//!
//! An instance serves one rule for its whole life, so settings can be parsed
//! once and kept (see [`cached`]).

use crate::PluginError;
use crate::bindings::ganglion::plugin::config as host;
use serde::de::DeserializeOwned;
use std::sync::OnceLock;

/// One top-level setting: strings as they are, other values as JSON.
pub fn get(key: &str) -> Option<String> {
    host::get(key)
}

/// All settings deserialized into `T`; unknown or mistyped fields are a
/// [`PluginError::BadConfig`] naming the field.
pub fn parse<T: DeserializeOwned>() -> Result<T, PluginError> {
    parse_json(&host::get_json())
}

/// Like [`parse`], from JSON text (what a test or a native caller passes).
pub fn parse_json<T: DeserializeOwned>(json: &str) -> Result<T, PluginError> {
    serde_json::from_str(json).map_err(|e| PluginError::BadConfig(e.to_string()))
}

/// Parses the settings on first use and keeps them for the instance's life.
pub fn cached<T: DeserializeOwned + Send + Sync>(
    cell: &'static OnceLock<Result<T, PluginError>>,
) -> Result<&'static T, PluginError> {
    cell.get_or_init(parse::<T>).as_ref().map_err(Clone::clone)
}
