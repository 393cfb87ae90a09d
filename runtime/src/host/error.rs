//! How one stage call can fail. Made where the call runs (the instance),
//! reported by the plugin layer above.

use crate::types::{PluginError, Stage};
use std::time::Duration;

/// Epoch tick: the granularity of call deadlines.
pub(crate) const TICK: Duration = Duration::from_millis(2);

/// A fault or error of one stage call. Every variant leaves the host serving.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The plugin returned an error; the instance stays usable.
    #[error("plugin error: {0}")]
    Plugin(PluginError),
    /// The guest ran past `call_timeout_ms` (host waits excluded); the instance is discarded.
    #[error("deadline of {limit:?} exceeded")]
    Deadline {
        /// The call's time budget.
        limit: Duration,
    },
    /// The guest tried to grow a memory past `max_memory_mib`; the instance is discarded.
    #[error("memory cap of {limit} bytes hit (asked for {requested})")]
    MemoryLimit {
        /// The cap, in bytes.
        limit: usize,
        /// The memory size the guest asked for, in bytes.
        requested: usize,
    },
    /// The call used up its `fuel`; the instance is discarded.
    #[error("fuel of {fuel} instructions used up")]
    FuelExhausted {
        /// The fuel each call gets.
        fuel: u64,
    },
    /// Any other trap (or host error) during the call or instantiation; the
    /// instance is discarded.
    #[error("trap: {0}")]
    Trap(String),
    /// The returned data is over `max_output_bytes`.
    #[error("output of {size} bytes over the cap of {cap}")]
    OutputTooLarge {
        /// Size of the output, as counted by `data_size`, in bytes.
        size: usize,
        /// The cap, in bytes.
        cap: usize,
    },
    /// The output breaks the contract (a reading's name index out of range).
    #[error("invalid output: {0}")]
    InvalidOutput(String),
    /// The stage called is not exported by the component.
    #[error("the plugin does not implement the {0} stage")]
    NotExported(Stage),
    /// The stage export exists but its types do not match the WIT contract;
    /// found when an instance is made.
    #[error("the {stage} export does not match {package}: {reason}", package = super::PACKAGE)]
    Incompatible {
        /// The mismatching stage.
        stage: Stage,
        /// wasmtime's description of the mismatch.
        reason: String,
    },
}

impl CallError {
    /// A short machine-readable kind, for dead letters and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Plugin(_) => "plugin-error",
            CallError::Deadline { .. } => "deadline",
            CallError::MemoryLimit { .. } => "memory-limit",
            CallError::FuelExhausted { .. } => "fuel",
            CallError::Trap(_) => "trap",
            CallError::OutputTooLarge { .. } => "output-too-large",
            CallError::InvalidOutput(_) => "invalid-output",
            CallError::NotExported(_) => "not-exported",
            CallError::Incompatible { .. } => "incompatible",
        }
    }
}
