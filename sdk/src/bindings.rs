//! All generated guest bindings. One `generate!` produces the shared types and
//! host imports; each stage world then generates only its export glue, mapped
//! onto those shared modules with `with`, so that a plugin can export any
//! subset of stages (a single all-stages world would force every plugin to
//! export all four).
//!
//! `generate!` takes literals only, so the version is written out in the
//! path and names below; a test checks each against [`crate::WIT_VERSION`].

wit_bindgen::generate!({
    path: "wit/ganglion-plugin@0.1.0",
    world: "ganglion:plugin/host@0.1.0",
    generate_all,
    additional_derives: [PartialEq],
});

macro_rules! stage_bindings {
    ($module:ident, $world:literal, $macro_name:literal, $bindings_path:literal) => {
        pub mod $module {
            wit_bindgen::generate!({
                path: "wit/ganglion-plugin@0.1.0",
                world: $world,
                with: {
                    "ganglion:plugin/types@0.1.0": crate::bindings::ganglion::plugin::types,
                    "ganglion:plugin/log@0.1.0": crate::bindings::ganglion::plugin::log,
                    "ganglion:plugin/config@0.1.0": crate::bindings::ganglion::plugin::config,
                    "ganglion:plugin/state@0.1.0": crate::bindings::ganglion::plugin::state,
                    "ganglion:plugin/llm@0.1.0": crate::bindings::ganglion::plugin::llm,
                },
                pub_export_macro: true,
                export_macro_name: $macro_name,
                default_bindings_module: $bindings_path,
            });
        }
    };
}

stage_bindings!(
    preprocessor,
    "ganglion:plugin/preprocessor@0.1.0",
    "export_preprocessor",
    "ganglion_sdk::bindings::preprocessor"
);
stage_bindings!(
    prompt_template,
    "ganglion:plugin/prompt-template@0.1.0",
    "export_prompt_template",
    "ganglion_sdk::bindings::prompt_template"
);
stage_bindings!(
    postprocessor,
    "ganglion:plugin/postprocessor@0.1.0",
    "export_postprocessor",
    "ganglion_sdk::bindings::postprocessor"
);
stage_bindings!(
    rule,
    "ganglion:plugin/rule@0.1.0",
    "export_rule",
    "ganglion_sdk::bindings::rule"
);
