//! The HTTP admin endpoint of `ganglion run` (`[admin]`):
//!
//! ```toml
//! [admin]
//! enabled = true                 # serve /metrics, /health, /ready, /rules and /
//! listen = "127.0.0.1:9464"      # off loopback only with a token
//! token = "long-random-string"   # when set, every endpoint but /health wants
//!                                # `Authorization: Bearer <token>`
//! max_body_bytes = 65536         # larger request bodies are refused (413)
//! sparkline_samples = 60         # rate samples kept per rule for the page
//! sample_ms = 5000               # one sample every this many ms
//! audit_tail_bytes = 65536       # how much of the audit log's end the page reads
//! max_connections = 16           # open connections at once; more are closed at once
//! connection_secs = 30           # the longest one connection is kept open
//! ```
//!
//! The endpoint can enable and disable rules, so it is kept to the machine
//! unless a token guards it: [`AdminConfig::check`] refuses an address off
//! loopback without one.

use serde::Deserialize;

/// `[admin]`: the HTTP admin endpoint (needs the library's `admin` feature,
/// which the `ganglion` command has).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Whether `ganglion run` serves the endpoint. Default true.
    pub enabled: bool,
    /// Address and port to listen on. Default `127.0.0.1:9464` (9464 is the
    /// port Prometheus exporters of OpenTelemetry use; the gateway has no
    /// other HTTP server to clash with).
    pub listen: String,
    /// Bearer token every endpoint but `/health` requires when set. Compared
    /// in constant time; an empty string counts as unset.
    pub token: Option<String>,
    /// Largest request body taken, in bytes (`POST /rules/{name}/...`);
    /// larger ones get 413 before they are read whole. Default 65 536.
    pub max_body_bytes: usize,
    /// Rate samples kept per rule for the page's sparklines (a ring). Default 60.
    pub sparkline_samples: usize,
    /// Milliseconds between two rate samples. Default 5 000 (60 samples: 5 minutes).
    pub sample_ms: u64,
    /// Bytes of the audit log's end read for the page's recent decisions;
    /// only whole lines within them are shown. Default 65 536.
    pub audit_tail_bytes: usize,
    /// Connections open at once; one more is closed as soon as it is
    /// accepted. Default 16 (a scraper, a browser, a few `curl`s).
    pub max_connections: usize,
    /// Seconds one connection may stay open, requests and keep-alive
    /// together, and the limit on sending a request's headers: a client
    /// that trickles bytes cannot hold a connection slot. Default 30.
    pub connection_secs: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            token: None,
            max_body_bytes: 64 * 1024,
            sparkline_samples: 60,
            sample_ms: 5_000,
            audit_tail_bytes: 64 * 1024,
            max_connections: 16,
            connection_secs: 30,
        }
    }
}

impl AdminConfig {
    /// The token, when one is set and not empty.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty())
    }

    /// The address to listen on; an error that says why it is refused: not
    /// an `ip:port`, or off loopback without a token.
    pub fn check(&self) -> Result<std::net::SocketAddr, String> {
        let addr = listen_addr(
            "admin",
            &self.listen,
            self.token(),
            "the admin endpoint can disable rules",
        )?;
        if self.sample_ms == 0 {
            return Err("[admin] sample_ms must be at least 1".into());
        }
        Ok(addr)
    }
}

/// `listen` of `[table]` as an address; refused when it is not `ip:port`,
/// or is off loopback without a token (`danger` says why that matters).
pub(super) fn listen_addr(
    table: &str,
    listen: &str,
    token: Option<&str>,
    danger: &str,
) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| format!("[{table}] listen = {listen:?}: not an ip:port address ({e})"))?;
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(format!(
            "[{table}] listen = {listen:?} is reachable from other machines, and {danger}: set [{table}] token, or listen on 127.0.0.1"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_loopback_needs_a_token() {
        let mut c = AdminConfig {
            listen: "0.0.0.0:9464".into(),
            ..AdminConfig::default()
        };
        assert!(c.check().unwrap_err().contains("set [admin] token"));
        c.token = Some(String::new());
        assert!(c.check().is_err(), "an empty token is no token");
        c.token = Some("s3cret".into());
        assert!(c.check().is_ok());
        assert!(AdminConfig::default().check().is_ok());
        let bad = AdminConfig {
            listen: "localhost".into(),
            ..AdminConfig::default()
        };
        assert!(bad.check().unwrap_err().contains("not an ip:port"));
    }
}
