//! Named OpenAI-compatible servers a rule or `[model]` can send its model
//! calls to (`[remote.<name>]`):
//!
//! ```toml
//! [remote.big]
//! url = "http://10.0.0.5:8080/v1"   # base URL; /chat/completions, /completions, /embeddings are appended
//! model = "qwen2.5-7b-instruct"     # the `model` field of every request
//! api_key_env = "BIG_KEY"           # `Authorization: Bearer` from this variable; or api_key_file
//! timeout_ms = 60000                # one attempt, connect to last byte
//! connect_timeout_ms = 5000         # TCP connect of one attempt
//! max_concurrent = 4                # requests in flight to this server; more wait
//! retries = 2                       # further attempts after a connect error, 5xx or 429
//! backoff_ms = 200                  # first wait before a retry; doubled each time, with jitter
//! backoff_max_ms = 5000             # longest wait before a retry
//! breaker_failures = 3              # consecutive failed requests that open the circuit
//! breaker_cooldown_ms = 30000       # open this long, then one probe request
//! fallback = "local"                # while open or failing: the local engine, or "none" (llm-error)
//! stream = true                     # generate with server-sent events
//! response_format = "json_schema"  # how a JSON-schema constraint is sent: json_schema | json_object
//! max_response_bytes = 4194304      # a longer response (body or stream) is refused
//! max_line_bytes = 65536            # a longer server-sent-events line is refused
//! ```
//!
//! Only `http://` is spoken: for a server off the machine over an untrusted
//! network, put a TLS-terminating proxy on loopback in front of it.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// What a remote engine does when its server fails or its circuit is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// The local engine (`[model]`) answers instead.
    #[default]
    Local,
    /// The call fails with `llm-error`, and the rule dead-letters the
    /// message.
    None,
}

/// How a JSON-schema constraint is put in `response_format`; servers
/// disagree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaFormat {
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`:
    /// OpenAI, vLLM, llama.cpp's `llama-server`.
    #[default]
    JsonSchema,
    /// `{"type": "json_object", "schema": ...}`: llama-cpp-python's server.
    JsonObject,
}

/// One `[remote.<name>]` table; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Base URL, `http://host:port/path` (usually ending in `/v1`).
    pub url: String,
    /// The model name sent in every request.
    pub model: String,
    /// Environment variable holding the API key. Default none.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the API key (surrounding whitespace trimmed); relative
    /// to the config file. Default none.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// One attempt, from connecting to the last byte, in milliseconds; a
    /// request's own `deadline-ms` cuts it shorter. Default 60 000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Connecting, in milliseconds. Default 5 000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Requests in flight to the server at once; more wait for a slot
    /// within their deadline. 0 counts as 1. Default 4.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Further attempts after a connection error, a timeout, a 5xx or a
    /// 429. Default 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Wait before the first retry, in milliseconds; doubled for each
    /// further one, and a random half of it taken off (jitter) so clients
    /// do not retry in step. Default 200.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Longest wait before a retry, in milliseconds. Default 5 000.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Requests that failed in a row (after their retries) that open the
    /// circuit: while open, no request is sent. 0 counts as 1. Default 3.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long the circuit stays open, in milliseconds; then one request
    /// probes the server, and closes the circuit if it succeeds. Default 30 000.
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    /// Where a call goes when the server fails or the circuit is open.
    /// Default `local`.
    #[serde(default)]
    pub fallback: Fallback,
    /// Generate with `stream = true` (server-sent events). Default true.
    #[serde(default = "yes")]
    pub stream: bool,
    /// How a JSON-schema constraint is sent. Default `json_schema`.
    #[serde(default)]
    pub response_format: SchemaFormat,
    /// Bytes of one response, the whole body or the whole event stream;
    /// more is refused. Default 4 MiB.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Bytes of one server-sent-events line; a longer one is refused.
    /// Default 65 536.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
}

fn default_timeout_ms() -> u64 {
    60_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_max_concurrent() -> usize {
    4
}
fn default_retries() -> u32 {
    2
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    5_000
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_cooldown_ms() -> u64 {
    30_000
}
fn yes() -> bool {
    true
}
fn default_max_response_bytes() -> usize {
    4 << 20
}
fn default_max_line_bytes() -> usize {
    64 * 1024
}

impl RemoteConfig {
    /// A remote at `url` serving `model`, every other setting its default.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        RemoteConfig {
            url: url.into(),
            model: model.into(),
            api_key_env: None,
            api_key_file: None,
            timeout_ms: default_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_concurrent: default_max_concurrent(),
            retries: default_retries(),
            backoff_ms: default_backoff_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown_ms: default_breaker_cooldown_ms(),
            fallback: Fallback::Local,
            stream: true,
            response_format: SchemaFormat::JsonSchema,
            max_response_bytes: default_max_response_bytes(),
            max_line_bytes: default_max_line_bytes(),
        }
    }

    /// [`Self::timeout_ms`] as a [`Duration`].
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// [`Self::connect_timeout_ms`] as a [`Duration`].
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// [`Self::breaker_cooldown_ms`] as a [`Duration`].
    pub fn breaker_cooldown(&self) -> Duration {
        Duration::from_millis(self.breaker_cooldown_ms)
    }

    /// The API key, from `api_key_env` or `api_key_file`; an error names
    /// the variable or file. Both set is an error.
    pub fn api_key(&self) -> Result<Option<String>, String> {
        match (&self.api_key_env, &self.api_key_file) {
            (Some(_), Some(_)) => Err("set api_key_env or api_key_file, not both".into()),
            (Some(var), None) => std::env::var(var)
                .map(Some)
                .map_err(|e| format!("api_key_env `{var}`: {e}")),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|k| Some(k.trim().to_owned()))
                .map_err(|e| format!("api_key_file {}: {e}", file.display())),
            (None, None) => Ok(None),
        }
    }
}

/// Which engine a rule's model calls go to: `local` (the `[model]` engine)
/// or `remote:<name>` (a `[remote.<name>]` server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineChoice {
    /// The local engine.
    Local,
    /// The named remote.
    Remote(String),
}

impl std::str::FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "local" {
            return Ok(EngineChoice::Local);
        }
        match s.strip_prefix("remote:") {
            Some(name)
                if !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                Ok(EngineChoice::Remote(name.to_owned()))
            }
            _ => Err(format!(
                "engine `{s}`: expected `local` or `remote:<name>` (letters, digits, `-`, `_`)"
            )),
        }
    }
}

impl std::fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineChoice::Local => f.write_str("local"),
            EngineChoice::Remote(name) => write!(f, "remote:{name}"),
        }
    }
}

impl<'de> Deserialize<'de> for EngineChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_choices_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("local".parse::<EngineChoice>(), Ok(EngineChoice::Local));
        assert_eq!(
            "remote:big-1".parse::<EngineChoice>(),
            Ok(EngineChoice::Remote("big-1".into()))
        );
        for bad in ["remote:", "remote", "remote:a b", "gpu"] {
            let err = bad.parse::<EngineChoice>().unwrap_err();
            assert!(err.contains("remote:<name>"), "{err}");
        }
    }

    #[test]
    fn remote_tables_take_defaults_and_refuse_unknown_keys() {
        let c = crate::config::GanglionConfig::parse(
            "[model]\nengine = \"remote:big\"\n[remote.big]\nurl = \"http://10.0.0.5:8080/v1\"\nmodel = \"m\"\nfallback = \"none\"\nresponse_format = \"json_object\"\n",
        )
        .unwrap();
        let r = &c.remote["big"];
        assert_eq!(
            (
                r.fallback,
                r.response_format,
                r.retries,
                r.max_response_bytes
            ),
            (Fallback::None, SchemaFormat::JsonObject, 2, 4 << 20)
        );
        assert_eq!(c.model.engine.as_deref(), Some("remote:big"));
        let err = crate::config::GanglionConfig::parse(
            "[remote.big]\nurl = \"http://a\"\nmodel = \"m\"\nretry = 3\n",
        )
        .unwrap_err();
        assert!(err.contains("retry") && err.contains("line 4"), "{err}");
    }

    #[test]
    fn the_api_key_comes_from_a_file_or_the_environment_not_both() {
        let dir = std::env::temp_dir().join(format!("ganglion-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "  s3cret\n").unwrap();
        let mut c = RemoteConfig::new("http://a/v1", "m");
        c.api_key_file = Some(file);
        assert_eq!(c.api_key().unwrap().as_deref(), Some("s3cret"));
        c.api_key_env = Some("GANGLION_TEST_NO_SUCH_KEY".into());
        assert!(c.api_key().unwrap_err().contains("not both"));
        c.api_key_file = None;
        assert!(
            c.api_key()
                .unwrap_err()
                .contains("GANGLION_TEST_NO_SUCH_KEY")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
