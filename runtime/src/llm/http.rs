//! The HTTP/1.1 client side of the remote engine: one connection per
//! attempt (hyper's connection API over a tokio `TcpStream`), bounded
//! reads of a JSON body, and a bounded reader of server-sent events.
//!
//! The server is not trusted: a body or event stream longer than
//! `max_response_bytes`, or an event line longer than `max_line_bytes`, is
//! refused as soon as the bound is passed, before more is read.

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, StatusCode, header};
use std::time::Duration;

/// Why one attempt failed; [`Failure::retryable`] says whether another
/// attempt may help.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Failure {
    /// No connection, or the HTTP exchange broke before the response head.
    Connect(String),
    /// The connection broke while the body or stream was read.
    Broken(String),
    /// The attempt ran past its time.
    Timeout,
    /// The server answered with an error status; the message is the start
    /// of its body.
    Status {
        /// The HTTP status.
        code: u16,
        /// Seconds from `Retry-After`, when sent.
        retry_after: Option<u64>,
        /// What the server said, cut short.
        message: String,
    },
    /// The response is malformed or past a bound; sending the request
    /// again would get the same.
    Protocol(String),
}

impl Failure {
    /// Connection errors, timeouts, 5xx and 429: the next attempt may go
    /// through.
    pub(super) fn retryable(&self) -> bool {
        match self {
            Failure::Connect(_) | Failure::Broken(_) | Failure::Timeout => true,
            Failure::Status { code, .. } => *code >= 500 || *code == 429 || *code == 408,
            Failure::Protocol(_) => false,
        }
    }

    /// 400 and 422: the request itself is refused; the server is up, and
    /// another engine would refuse it too or answer something else.
    pub(super) fn is_bad_request(&self) -> bool {
        matches!(
            self,
            Failure::Status {
                code: 400 | 422,
                ..
            }
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Broken(e) => write!(f, "connection broken: {e}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Status { code, message, .. } => write!(f, "HTTP {code}: {message}"),
            Failure::Protocol(e) => write!(f, "bad response: {e}"),
        }
    }
}

/// Bytes of an error body kept for the message.
const ERROR_BODY_BYTES: usize = 512;

/// Where a remote listens: `http://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    /// Host to connect to (IPv6 without brackets).
    host: String,
    port: u16,
    /// `Host` header: the authority as written.
    authority: String,
    /// Path prefix without a trailing `/` (`/v1`, or empty).
    base: String,
}

impl Endpoint {
    /// Parses a base URL; only `http://` without user info, query or
    /// fragment is taken.
    pub(super) fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            if url.starts_with("https://") {
                format!("url `{url}`: https is not spoken; put a TLS-terminating proxy on loopback in front of the server")
            } else {
                format!("url `{url}`: must start with http://")
            }
        })?;
        if rest.contains(['?', '#', '@']) || rest.chars().any(|c| c.is_whitespace()) {
            return Err(format!(
                "url `{url}`: no user info, query, fragment or whitespace"
            ));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("url `{url}`: unclosed `[`"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("url `{url}`: no host"));
        }
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| format!("url `{url}`: bad port `{p}`"))?,
            None => 80,
        };
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            base: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// Aborts the connection's task when the response is dropped, so that a
/// cancelled call leaves nothing running.
struct ConnTask(tokio::task::JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response head with its body still to read.
pub(super) struct Response {
    pub(super) status: StatusCode,
    headers: header::HeaderMap,
    body: Incoming,
    _conn: ConnTask,
}

/// POSTs `body` (JSON) to the endpoint's base path + `path`.
pub(super) async fn post(
    endpoint: &Endpoint,
    path: &str,
    body: Vec<u8>,
    api_key: Option<&str>,
    stream: bool,
    connect_timeout: Duration,
) -> Result<Response, Failure> {
    let tcp = tokio::time::timeout(
        connect_timeout,
        tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
    )
    .await
    .map_err(|_| Failure::Connect(format!("no connection within {connect_timeout:?}")))?
    .map_err(|e| Failure::Connect(e.to_string()))?;
    // Requests are small and answers come token by token.
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
    let conn = ConnTask(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut request = Request::post(format!("{}{path}", endpoint.base))
        .header(header::HOST, &endpoint.authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::ACCEPT,
            if stream {
                "text/event-stream"
            } else {
                "application/json"
            },
        );
    if let Some(key) = api_key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Failure::Connect(format!("request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Connect(e.to_string()))?;
    let (head, body) = response.into_parts();
    Ok(Response {
        status: head.status,
        headers: head.headers,
        body,
        _conn: conn,
    })
}

impl Response {
    /// An error status as a [`Failure`], with the start of the body.
    pub(super) async fn error(mut self) -> Failure {
        let retry_after = self
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let mut text = Vec::new();
        while text.len() < ERROR_BODY_BYTES {
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        text.extend_from_slice(&data);
                    }
                }
                _ => break,
            }
        }
        text.truncate(ERROR_BODY_BYTES);
        let message = String::from_utf8_lossy(&text)
            .chars()
            .filter(|c| !c.is_control())
            .collect::<String>();
        Failure::Status {
            code: self.status.as_u16(),
            retry_after,
            message,
        }
    }

    /// The whole body as JSON, refused past `max` bytes.
    pub(super) async fn json(mut self, max: usize) -> Result<serde_json::Value, Failure> {
        let declared = self
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(too_large(max));
        }
        let mut out = Vec::new();
        while let Some(frame) = self.body.frame().await {
            let frame = frame.map_err(|e| Failure::Broken(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > max {
                    return Err(too_large(max));
                }
                out.extend_from_slice(&data);
            }
        }
        serde_json::from_slice(&out).map_err(|e| Failure::Protocol(format!("not JSON: {e}")))
    }

    /// The body as server-sent events.
    pub(super) fn events(self, max_total: usize, max_line: usize) -> Events {
        Events {
            response: self,
            buf: Vec::new(),
            scanned: 0,
            total: 0,
            max_total,
            max_line,
            done: false,
        }
    }
}

fn too_large(max: usize) -> Failure {
    Failure::Protocol(format!("response longer than max_response_bytes ({max})"))
}

/// A bounded reader of server-sent events: [`Events::next`] gives each
/// event's data (its `data:` lines joined by `\n`); comments, `event:`,
/// `id:` and `retry:` lines are skipped.
pub(super) struct Events {
    response: Response,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a line end.
    scanned: usize,
    total: usize,
    max_total: usize,
    max_line: usize,
    done: bool,
}

impl Events {
    /// The next event's data; none at the end of the stream.
    pub(super) async fn next(&mut self) -> Result<Option<String>, Failure> {
        let mut data: Option<String> = None;
        loop {
            let Some(line) = self.line().await? else {
                return Ok(data);
            };
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if data.is_some() {
                    return Ok(data);
                }
                continue;
            }
            if let Some(value) = line.strip_prefix("data:") {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                }
            }
        }
    }

    fn line_too_long(&self) -> Failure {
        Failure::Protocol(format!(
            "event line longer than max_line_bytes ({})",
            self.max_line
        ))
    }

    /// The next line without its `\n`; none at the end of the stream.
    async fn line(&mut self) -> Result<Option<String>, Failure> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + i;
                if end > self.max_line {
                    return Err(self.line_too_long());
                }
                let line = String::from_utf8(self.buf[..end].to_vec())
                    .map_err(|_| Failure::Protocol("event stream is not UTF-8".into()))?;
                self.buf.drain(..=end);
                self.scanned = 0;
                return Ok(Some(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_line {
                return Err(self.line_too_long());
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                self.scanned = 0;
                return String::from_utf8(rest)
                    .map(Some)
                    .map_err(|_| Failure::Protocol("event stream is not UTF-8".into()));
            }
            match self.response.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => return Err(Failure::Broken(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.total += data.len();
                        if self.total > self.max_total {
                            return Err(too_large(self.max_total));
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_unsupported_ones_say_why() {
        let e = Endpoint::parse("http://10.0.0.5:8080/v1/").unwrap();
        assert_eq!(
            (
                e.host.as_str(),
                e.port,
                e.authority.as_str(),
                e.base.as_str()
            ),
            ("10.0.0.5", 8080, "10.0.0.5:8080", "/v1")
        );
        let e = Endpoint::parse("http://[::1]:9/x").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.base.as_str()), ("::1", 9, "/x"));
        let e = Endpoint::parse("http://gpu-box").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.base.as_str()),
            ("gpu-box", 80, "")
        );
        assert!(Endpoint::parse("https://a/v1").unwrap_err().contains("TLS"));
        assert!(Endpoint::parse("ftp://a").unwrap_err().contains("http://"));
        assert!(
            Endpoint::parse("http://u:p@a/v1")
                .unwrap_err()
                .contains("user info")
        );
        assert!(
            Endpoint::parse("http://a:x/v1")
                .unwrap_err()
                .contains("port")
        );
        assert!(
            Endpoint::parse("http:///v1")
                .unwrap_err()
                .contains("no host")
        );
    }
}
