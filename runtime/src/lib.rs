//! Ganglion: an IoT gateway runtime that runs sandboxed WebAssembly plugins
//! and a local language model over MQTT rules.
//!
//! Module map:
//! - [`types`]: the runtime's domain types (readings, messages, prompts, actions).
//! - [`plugin`]: loading components and calling their stages under limits
//!   ([`plugin::PluginHost`], [`plugin::InstancePool`]).
//! - [`host`]: the WIT host side: store data, the `log`/`config`/`state`/`llm`
//!   imports, typed export calls, and per WIT version its one `bindgen!`.
//!   Generated types stop there.
//! - [`llm`]: the [`llm::LlmEngine`] trait the `llm` interface calls, with
//!   [`llm::NoModel`] and the scripted [`llm::FakeLlm`].
//! - [`state`]: the persistent per-plugin, per-rule key–value store (redb).
//! - [`config`]: typed configuration.
//! - [`rules`]: rule files, topic filters, the allow-list.
//! - [`pipeline`]: one rule at work, message to outcome (publishes, dead letters).
//! - [`audit`]: the decision audit log (JSON lines, rotated), replay and
//!   fine-tuning export.
//! - [`gateway`]: routing deliveries to rules, lanes, publishing, acknowledging;
//!   rules added, replaced and removed while messages flow.
//! - [`reload`]: watching the plugins and rules folders and applying changes
//!   (hot reload; a bad file leaves the previous version running).
//! - [`mqtt`]: the broker connection (rumqttc) behind the [`mqtt::Publisher`] trait.
//! - [`broker`]: the embedded broker (rumqttd).
//! - [`runtime`]: the embedding API ([`runtime::Runtime`]): build from
//!   config, push messages from any transport, take outputs on a channel,
//!   install and remove rules.
//! - [`harness`]: calling one stage of a plugin on JSON cases (`ganglion
//!   call`), for testing plugins alone and comparing them across languages.
//! - [`simulate`]: simulated sensors (synthetic or CSV replay) over MQTT.

#![warn(missing_docs)]

pub mod audit;
pub mod broker;
pub mod config;
pub mod devtools;
pub mod gateway;
pub mod host;
pub mod llm;
pub mod mqtt;
pub mod pipeline;
pub mod plugin;
pub mod reload;
pub mod replay;
pub mod rules;
pub mod runtime;
pub mod simulate;
pub mod state;
pub mod transport;
pub mod types;
