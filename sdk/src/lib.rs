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
//! ganglion_sdk::export!(Clean: preprocess);
//! ```
//!
//! Modules:
//! - [`bindings`]: the generated WIT bindings (types, host imports, stage exports).
//! - [`batch`]: building and reading [`ReadingBatch`]es.
//! - [`telemetry`]: JSON telemetry payloads to readings.
//! - [`units`]: unit names and conversions.
//! - [`config`], [`log`], [`state`], [`llm`]: the host interfaces, wrapped.
//! - [`weights`]: model weights from a directory the rule grants.

#![warn(missing_docs)]

pub mod batch;
// Hidden, so `missing_docs` passes over the generated code; the generated
// items carry the WIT's own doc comments where it has them.
#[doc(hidden)]
pub mod bindings;
pub mod config;
pub mod llm;
pub mod log;
pub mod state;
pub mod telemetry;
pub mod threshold;
pub mod units;
pub mod weights;

/// The version of the `ganglion:plugin` package the bindings are generated
/// from, `wit/ganglion-plugin@<version>/`.
pub const WIT_VERSION: &str = "0.1.0";

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

/// Exports a type as the implementation of the named stages: `preprocess`,
/// `template`, `postprocess`, `handler` (the WIT interface names, as in rule
/// files and `ganglion call --stage`). The world names `preprocessor`,
/// `prompt_template`, `postprocessor` and `rule` are accepted as well.
///
/// `ganglion_sdk::export!(MyPlugin: preprocess, postprocess);`
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
    (preprocess, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::preprocessor::export_preprocessor!($ty with_types_in $crate::bindings::preprocessor);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = { let _ = <$ty as $crate::Preprocessor>::preprocess; };
    };
    (template, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::prompt_template::export_prompt_template!($ty with_types_in $crate::bindings::prompt_template);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = { let _ = <$ty as $crate::PromptTemplate>::render; };
    };
    (postprocess, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::postprocessor::export_postprocessor!($ty with_types_in $crate::bindings::postprocessor);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = { let _ = <$ty as $crate::Postprocessor>::postprocess; };
    };
    (handler, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::rule::export_rule!($ty with_types_in $crate::bindings::rule);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = { let _ = <$ty as $crate::Rule>::handle; };
    };
    (preprocessor, $ty:ident) => {
        $crate::__export_stage!(preprocess, $ty);
    };
    (prompt_template, $ty:ident) => {
        $crate::__export_stage!(template, $ty);
    };
    (postprocessor, $ty:ident) => {
        $crate::__export_stage!(postprocess, $ty);
    };
    (rule, $ty:ident) => {
        $crate::__export_stage!(handler, $ty);
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
    /// The value as a number: booleans as 1 and 0, for thresholds and
    /// statistics; `None` for text.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            Value::Boolean(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Text(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pre;
    impl Preprocessor for Pre {
        fn preprocess(_: Message, readings: ReadingBatch) -> Result<ReadingBatch, PluginError> {
            Ok(readings)
        }
    }
    struct Template;
    impl PromptTemplate for Template {
        fn render(_: Context, _: ReadingBatch) -> Result<Prompt, PluginError> {
            Err(PluginError::Other("unused".into()))
        }
    }
    struct Post;
    impl Postprocessor for Post {
        fn postprocess(
            _: Context,
            _: ReadingBatch,
            _: Option<Completion>,
        ) -> Result<Vec<Action>, PluginError> {
            Ok(Vec::new())
        }
    }
    struct Handler;
    impl Rule for Handler {
        fn handle(_: String, _: Message) -> Result<Vec<Action>, PluginError> {
            Ok(Vec::new())
        }
    }

    // Each type implements one stage only, so a spelling that exported
    // another stage would not compile.
    crate::export!(Pre: preprocess, preprocessor);
    crate::export!(Template: template, prompt_template);
    crate::export!(Post: postprocess, postprocessor);
    crate::export!(Handler: handler, rule);

    #[test]
    fn the_bindings_name_the_package_of_wit_version() {
        let source = include_str!("bindings.rs");
        let code = source.lines().filter(|l| !l.trim_start().starts_with("//"));
        let versions: Vec<&str> = code
            .flat_map(|l| l.split('@').skip(1))
            .map(|rest| rest.split(['"', '/']).next().unwrap())
            .collect();
        assert_eq!(versions.len(), 12, "{versions:?}");
        assert!(versions.iter().all(|v| *v == WIT_VERSION), "{versions:?}");
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("wit/ganglion-plugin@{WIT_VERSION}/ganglion.wit"));
        let text = std::fs::read_to_string(&wit).unwrap();
        let package = format!("package ganglion:plugin@{WIT_VERSION};");
        assert!(text.lines().any(|l| l == package), "{}", wit.display());
    }
}
