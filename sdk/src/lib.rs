//! Write Ganglion plugins in Rust.
//!
//! A plugin is a `cdylib` crate built for `wasm32-wasip2`: implement one or
//! more stage traits on a type and name the stages in [`export!`]:
//!
//! ```ignore
//! use ganglion_sdk::*;
//! struct Clean;
//! impl Preprocessor for Clean {
//!     fn preprocess(message: Message, _readings: ReadingBatch) -> Result<ReadingBatch, PluginError> {
//!         telemetry::parse_json(&message.payload, &telemetry::ParseOptions::from_topic(&message, None, message.timestamp))
//!     }
//! }
//! ganglion_sdk::export!(Clean: preprocessor);
//! ```
//!
//! Modules:
//! - [`bindings`]: the generated WIT bindings (types, host imports, stage exports).
//! - [`batch`]: building and reading [`ReadingBatch`]es.
//! - [`telemetry`]: JSON telemetry payloads to readings.
//! - [`units`]: unit names and conversions.
//! - [`config`], [`log`], [`state`], [`llm`]: the host interfaces, wrapped.

pub mod batch;
#[doc(hidden)]
pub mod bindings;
pub mod config;
pub mod llm;
pub mod log;
pub mod state;
pub mod telemetry;
pub mod threshold;
pub mod units;

pub use bindings::ganglion::plugin::types::{
    Action, Alert, AlertLevel, ChatMessage, Command, Completion, Constraint, Context, FinishReason,
    GenerationParams, LlmError, Message, PluginError, Prompt, Publish, Qos, Reading, ReadingBatch,
    Role, Usage, Value,
};

/// The postprocessor stage: window and completion to actions.
pub use bindings::postprocessor::exports::ganglion::plugin::postprocess::Guest as Postprocessor;
/// The preprocessor stage: message (and the previous preprocessor's readings) to readings.
pub use bindings::preprocessor::exports::ganglion::plugin::preprocess::Guest as Preprocessor;
/// The prompt-template stage: window to prompt.
pub use bindings::prompt_template::exports::ganglion::plugin::template::Guest as PromptTemplate;
/// The rule stage: message to actions, with full control.
pub use bindings::rule::exports::ganglion::plugin::handler::Guest as Rule;

/// Exports a type as the implementation of the named stages
/// (`preprocessor`, `prompt_template`, `postprocessor`, `rule`).
///
/// `ganglion_sdk::export!(MyPlugin: preprocessor, postprocessor);`
#[macro_export]
macro_rules! export {
    ($ty:ident : $($stage:ident),+ $(,)?) => {
        $( $crate::__export_stage!($stage, $ty); )+
    };
}

/// Exports on wasm32 only: elsewhere (native tests and benchmarks of a
/// plugin's logic) the export names, which contain `:`, cannot be linked, so
/// the macro only marks the implementation as used.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_stage {
    (preprocessor, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::preprocessor::export_preprocessor!($ty with_types_in $crate::bindings::preprocessor);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = { let _ = <$ty as $crate::Preprocessor>::preprocess; };
    };
    (prompt_template, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::prompt_template::export_prompt_template!($ty with_types_in $crate::bindings::prompt_template);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = { let _ = <$ty as $crate::PromptTemplate>::render; };
    };
    (postprocessor, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::postprocessor::export_postprocessor!($ty with_types_in $crate::bindings::postprocessor);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = { let _ = <$ty as $crate::Postprocessor>::postprocess; };
    };
    (rule, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::rule::export_rule!($ty with_types_in $crate::bindings::rule);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = { let _ = <$ty as $crate::Rule>::handle; };
    };
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            deadline_ms: None,
            constraint: Constraint::None,
        }
    }
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            Value::Boolean(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Text(_) => None,
        }
    }
}
