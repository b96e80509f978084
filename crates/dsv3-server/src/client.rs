//! A minimal blocking HTTP/1.1 client for the server's own tests and its load generator
//! (`examples/load.rs`): one request per connection, `Content-Length` or chunked bodies, and
//! server-sent events read as they arrive. Not a general client: no TLS, no redirects.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// `(lowercased name, value)`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends raw bytes (a whole request, possibly malformed on purpose) and reads the response.
pub fn raw(addr: SocketAddr, request: &[u8], timeout: Duration) -> std::io::Result<Response> {
    let mut s = connect(addr, timeout)?;
    s.write_all(request)?;
    read_response(&mut BufReader::new(s), |_| true)
}

fn request_bytes(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n").into_bytes();
    if method == "POST" {
        r.extend_from_slice(format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<Response> {
    raw(addr, &request_bytes("GET", path, b""), timeout)
}

/// `POST path` with a JSON body.
pub fn post(addr: SocketAddr, path: &str, body: &serde_json::Value, timeout: Duration) -> std::io::Result<Response> {
    raw(addr, &request_bytes("POST", path, body.to_string().as_bytes()), timeout)
}

/// `POST path` and reads the answer as server-sent events: `on_event` gets each `data:`
/// payload as it arrives and returns `false` to hang up early (the connection is dropped).
/// The returned response's body is empty for an event stream.
pub fn post_stream(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
    mut on_event: impl FnMut(&str) -> bool,
) -> std::io::Result<Response> {
    let mut s = connect(addr, timeout)?;
    s.write_all(&request_bytes("POST", path, body.to_string().as_bytes()))?;
    let mut pending = String::new();
    read_response(&mut BufReader::new(s), |bytes| {
        pending.push_str(&String::from_utf8_lossy(bytes));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:"))
                    && !on_event(data)
                {
                    return false;
                }
            }
        }
        true
    })
}

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// Reads status, headers and body; an event-stream body goes to `sink` piece by piece (it
/// returns `false` to stop reading) instead of into the response.
fn read_response(r: &mut impl BufRead, mut sink: impl FnMut(&[u8]) -> bool) -> std::io::Result<Response> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let resp = Response { status, headers, body: Vec::new() };
    let streaming = resp.header("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
    let mut body = Vec::new();
    let mut deliver = |bytes: &[u8]| -> bool {
        if streaming {
            sink(bytes)
        } else {
            body.extend_from_slice(bytes);
            true
        }
    };
    if resp.header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0u8; size];
            r.read_exact(&mut chunk)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
            if !deliver(&chunk) {
                break;
            }
        }
    } else if let Some(n) = resp.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut b = vec![0u8; n];
        r.read_exact(&mut b)?;
        deliver(&b);
    } else {
        let mut b = Vec::new();
        r.read_to_end(&mut b)?;
        deliver(&b);
    }
    Ok(Response { body, ..resp })
}
