//! `[serve]`: the local model as an OpenAI-compatible HTTP endpoint, for
//! other tools on the gateway. `ganglion serve-model` always serves it
//! (and nothing else); `ganglion run` serves it beside the rules when
//! `enabled`, sharing the engine's batch with them.
//!
//! ```toml
//! [serve]
//! enabled = false                # ganglion run serves it too
//! listen = "127.0.0.1:8089"      # off loopback only with a token
//! token = "long-random-string"   # when set, every endpoint but /health wants
//!                                # `Authorization: Bearer <token>`
//! max_body_bytes = 1048576       # larger request bodies are refused (413)
//! max_connections = 32           # open connections at once; more are closed at once
//! connection_secs = 600          # the longest one connection is kept open
//! max_tokens = 512               # a request's max_tokens is capped to this, and
//!                                # is this when the request gives none
//! max_inputs = 64                # texts in one /v1/embeddings request
//! max_messages = 64              # chat messages in one request
//! max_stops = 4                  # stop strings in one request
//! max_stop_bytes = 256           # bytes of one stop string
//! ```
//!
//! Requests go into the engine's queue (`[model] queue`) under the name
//! `serve-model`, and the batch admits fairly between that name and the
//! rules, so tools on the endpoint cannot starve the rules of the model.

use serde::Deserialize;

/// `[serve]`: the OpenAI-compatible endpoint (needs the library's `admin`
/// feature, which the `ganglion` command has).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Whether `ganglion run` serves the endpoint too. Default false;
    /// `ganglion serve-model` serves it whatever this says.
    pub enabled: bool,
    /// Address and port to listen on. Default `127.0.0.1:8089`.
    pub listen: String,
    /// Bearer token every endpoint but `/health` requires when set; also
    /// what OpenAI clients send as their API key. Compared in constant
    /// time; an empty string counts as unset.
    pub token: Option<String>,
    /// Largest request body taken, in bytes; larger ones get 413 before
    /// they are read whole. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Connections open at once; one more is closed as soon as it is
    /// accepted. Default 32.
    pub max_connections: usize,
    /// Seconds one connection may stay open, a streamed answer included,
    /// and the limit on sending a request's headers. Default 600.
    pub connection_secs: u64,
    /// The most tokens one completion may ask for, and what it gets when
    /// it names none. Default 512 (the context may cap it lower).
    pub max_tokens: u32,
    /// Texts in one `/v1/embeddings` request. Default 64.
    pub max_inputs: usize,
    /// Messages in one `/v1/chat/completions` request. Default 64.
    pub max_messages: usize,
    /// Stop strings in one request. Default 4 (OpenAI's own limit).
    pub max_stops: usize,
    /// Bytes of one stop string. Default 256: the engine looks for each
    /// stop string's beginnings at every token, so a long one costs every
    /// step of the batch.
    pub max_stop_bytes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            enabled: false,
            listen: "127.0.0.1:8089".into(),
            token: None,
            max_body_bytes: 1 << 20,
            max_connections: 32,
            connection_secs: 600,
            max_tokens: 512,
            max_inputs: 64,
            max_messages: 64,
            max_stops: 4,
            max_stop_bytes: 256,
        }
    }
}

impl ServeConfig {
    /// The token, when one is set and not empty.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty())
    }

    /// The address to listen on; an error that says why it is refused: not
    /// an `ip:port`, off loopback without a token, or a zero limit.
    pub fn check(&self) -> Result<std::net::SocketAddr, String> {
        let addr = super::admin::listen_addr(
            "serve",
            &self.listen,
            self.token(),
            "the endpoint runs the model for whoever asks",
        )?;
        for (key, value) in [
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_connections", self.max_connections as u64),
            ("connection_secs", self.connection_secs),
            ("max_tokens", u64::from(self.max_tokens)),
            ("max_inputs", self.max_inputs as u64),
            ("max_messages", self.max_messages as u64),
            ("max_stop_bytes", self.max_stop_bytes as u64),
        ] {
            if value == 0 {
                return Err(format!("[serve] {key} must be at least 1"));
            }
        }
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_off_loopback_needs_a_token() {
        let mut c = ServeConfig {
            listen: "0.0.0.0:8089".into(),
            ..ServeConfig::default()
        };
        assert!(c.check().unwrap_err().contains("set [serve] token"));
        c.token = Some(String::new());
        assert!(c.check().is_err(), "an empty token is no token");
        c.token = Some("s3cret".into());
        assert!(c.check().is_ok());
        assert!(ServeConfig::default().check().is_ok());
        let zero = ServeConfig {
            max_tokens: 0,
            ..ServeConfig::default()
        };
        assert!(zero.check().unwrap_err().contains("max_tokens"));
        let bad = ServeConfig {
            listen: "localhost".into(),
            ..ServeConfig::default()
        };
        assert!(bad.check().unwrap_err().contains("not an ip:port"));
    }
}
