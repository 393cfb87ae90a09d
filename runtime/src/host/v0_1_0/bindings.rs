//! The host's one `bindgen!`, for `ganglion:plugin@0.1.0`.

// Generated code: its items carry no docs.
#![allow(missing_docs)]

// The path is a literal because `bindgen!` takes no constants; the test in
// `super` checks that it names the folder of `WIT_VERSION`.
wasmtime::component::bindgen!({
    path: "../wit/ganglion-plugin@0.1.0",
    world: "ganglion:plugin/any-stage",
    imports: {
        "ganglion:plugin/llm": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});
