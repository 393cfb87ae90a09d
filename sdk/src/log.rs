//! Logging through the host, which tags each line with the plugin and rule.

use crate::bindings::ganglion::plugin::log::{Level, log};

/// Logs at trace level: detail for following a single message.
pub fn trace(message: &str) {
    log(Level::Trace, message)
}
/// Logs at debug level: detail for finding a fault.
pub fn debug(message: &str) {
    log(Level::Debug, message)
}
/// Logs at info level: events an operator may want to see.
pub fn info(message: &str) {
    log(Level::Info, message)
}
/// Logs at warn level: something is wrong but the plugin carries on.
pub fn warn(message: &str) {
    log(Level::Warn, message)
}
/// Logs at error level: the plugin could not do its work.
pub fn error(message: &str) {
    log(Level::Error, message)
}
