//! The persistent key–value store scoped to this plugin and rule.
//! Limits: keys up to 1 KiB, values up to 64 KiB, and a per-scope key quota set by the host.

use crate::bindings::ganglion::plugin::state as host;
pub use crate::bindings::ganglion::plugin::state::StateError;

pub fn get(key: &str) -> Result<Option<Vec<u8>>, StateError> {
    host::get(key)
}

pub fn set(key: &str, value: &[u8]) -> Result<(), StateError> {
    host::set(key, value)
}

pub fn delete(key: &str) -> Result<(), StateError> {
    host::delete(key)
}

/// A stored `i64` (little-endian), if present and well-formed.
pub fn get_i64(key: &str) -> Result<Option<i64>, StateError> {
    Ok(get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(i64::from_le_bytes))
}

pub fn set_i64(key: &str, value: i64) -> Result<(), StateError> {
    set(key, &value.to_le_bytes())
}

impl From<StateError> for crate::PluginError {
    fn from(e: StateError) -> Self {
        crate::PluginError::Other(format!("state: {e:?}"))
    }
}
