//! The persistent key–value store scoped to this plugin and rule.
//! Limits: keys up to 1 KiB, values up to 64 KiB, and a per-scope key quota set by the host.

use crate::bindings::ganglion::plugin::state as host;
pub use crate::bindings::ganglion::plugin::state::StateError;

/// The value stored under `key`, or `None` when there is none.
///
/// # Errors
///
/// [`StateError::TooLarge`] for a key over 1 KiB; [`StateError::Io`] when
/// the host's store fails.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, StateError> {
    host::get(key)
}

/// Stores `value` under `key`, replacing what was there. Survives restarts
/// of the gateway.
///
/// # Errors
///
/// [`StateError::TooLarge`] for a key over 1 KiB or a value over 64 KiB;
/// [`StateError::QuotaExceeded`] for a new key when the scope is full;
/// [`StateError::Io`] when the host's store fails.
pub fn set(key: &str, value: &[u8]) -> Result<(), StateError> {
    host::set(key, value)
}

/// Removes `key`, freeing its place in the quota; removing an absent key
/// is not an error.
///
/// # Errors
///
/// [`StateError::TooLarge`] for a key over 1 KiB; [`StateError::Io`] when
/// the host's store fails.
pub fn delete(key: &str) -> Result<(), StateError> {
    host::delete(key)
}

/// A stored `i64` (little-endian), if present and well-formed.
pub fn get_i64(key: &str) -> Result<Option<i64>, StateError> {
    Ok(get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(i64::from_le_bytes))
}

/// Stores an `i64` (little-endian, 8 bytes), such as a counter or a
/// timestamp, to be read back with [`get_i64`]. Errors as for [`set`].
pub fn set_i64(key: &str, value: i64) -> Result<(), StateError> {
    set(key, &value.to_le_bytes())
}

impl From<StateError> for crate::PluginError {
    fn from(e: StateError) -> Self {
        crate::PluginError::Other(format!("state: {e:?}"))
    }
}
