//! Ganglion: an IoT gateway runtime that runs sandboxed WebAssembly plugins
//! and a local language model over MQTT rules.
//!
//! Module map, from the top layer down; a module imports only from layers
//! below its own (docs/ARCHITECTURE.md; `cargo run -p xtask -- layers`
//! checks it):
//! - [`runtime`]: the embedding API ([`runtime::Runtime`]): build from
//!   config, push messages from any transport, take outputs on a channel,
//!   install and remove rules.
//! - Adapters: `simulate` (simulated sensors over MQTT), `broker` (the
//!   embedded rumqttd broker), `mqtt` (the broker connection, rumqttc,
//!   implementing [`transport::Publisher`]); behind the `mqtt` and `broker`
//!   features. `admin` (feature `admin`): the HTTP admin endpoint
//!   (metrics, readiness, rules). [`devtools`]: one stage of a plugin on JSON cases (`ganglion
//!   call`).
//! - [`reload`]: loading the plugins and rules folders and keeping the
//!   gateway in step with them (file notifications with the `reload`
//!   feature); [`replay`]: recorded decisions through the current plugins.
//! - [`gateway`]: routing deliveries to rules, lanes, publishing,
//!   acknowledging; rules added, replaced and removed while messages flow.
//! - [`pipeline`]: one rule at work, message to outcome (publishes, dead
//!   letters), windows per device.
//! - [`plugin`]: loading components and calling their stages under limits
//!   ([`plugin::PluginHost`], [`plugin::InstancePool`]).
//! - [`host`]: the WIT host side: store data, the `log`/`config`/`state`/`llm`
//!   imports, typed export calls, and per WIT version its one `bindgen!`
//!   (`host::v0_1_0`). Generated types stop there.
//! - [`llm`]: the [`llm::LlmEngine`] trait the `llm` interface calls, with
//!   [`llm::NoModel`] and the scripted [`llm::FakeLlm`]; [`state`]: the
//!   per-plugin, per-rule key–value store (redb); [`rules`]: rule files,
//!   topic filters, the allow-list; [`audit`]: the decision audit log.
//! - [`transport`]: the seam to whatever carries messages ([`transport::Publisher`],
//!   [`transport::Delivery`], the opaque [`transport::AckToken`]).
//! - [`config`]: typed configuration; [`types`]: the domain types.

#![warn(missing_docs)]

#[cfg(feature = "admin")]
pub mod admin;
pub mod audit;
#[cfg(feature = "broker")]
pub mod broker;
pub mod config;
pub mod devtools;
pub mod gateway;
pub mod host;
pub mod llm;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod pipeline;
pub mod plugin;
pub mod reload;
pub mod replay;
pub mod rules;
pub mod runtime;
#[cfg(feature = "mqtt")]
pub mod simulate;
pub mod state;
pub mod transport;
pub mod types;
