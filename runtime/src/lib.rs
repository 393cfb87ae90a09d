//! Ganglion: an IoT gateway runtime that runs sandboxed WebAssembly plugins
//! and a local language model over MQTT rules.
//!
//! Module map:
//! - [`types`]: the runtime's domain types (readings, messages, prompts, actions).
//! - [`plugin`]: loading components and calling their stages under limits
//!   ([`plugin::PluginHost`], [`plugin::InstancePool`]).
//! - [`host`]: the WIT host side: store data, the `log`/`config`/`state`/`llm`
//!   imports, typed export calls. Generated types stop there.
//! - [`bindings`]: the one `bindgen!` of the host.
//! - [`llm`]: the [`llm::LlmEngine`] trait the `llm` interface calls, with
//!   [`llm::NoModel`] and the scripted [`llm::FakeLlm`].
//! - [`state`]: the persistent per-plugin, per-rule key–value store (redb).
//! - [`config`]: typed configuration.

pub mod bindings;
pub mod config;
pub mod host;
pub mod llm;
pub mod plugin;
pub mod state;
pub mod types;
