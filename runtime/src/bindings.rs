//! The one place where host bindings are generated from `wit/`. Everything
//! outside `host/` uses the runtime's own types (`crate::types`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "ganglion:plugin/any-stage",
    imports: {
        "ganglion:plugin/llm": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});
