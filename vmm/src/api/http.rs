//! The small part of HTTP/1.1 the control API speaks: one request at a time per connection,
//! bodies sized by Content-Length, keep-alive. Both ends (server and `vmm ctl`) use it.
//!
//! Everything read from the socket is bounded: a client cannot make the VMM buffer more than
//! [`MAX_HEAD`] bytes of request line and headers or [`MAX_REQUEST_BODY`] bytes of body.

use std::io::{self, BufRead, Read, Write};

/// Longest request line plus headers.
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body (API requests are small JSON documents).
pub const MAX_REQUEST_BODY: usize = 64 << 10;
/// Largest response body a client accepts.
pub const MAX_RESPONSE_BODY: usize = 64 << 20;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Reading the connection failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The message breaks HTTP syntax, or the connection closed in the middle of it.
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    /// The part named (`headers` or `body`) exceeds its limit: [`MAX_HEAD`], or the reader's body limit.
    #[error("{0} is too large")]
    TooLarge(&'static str),
    /// A POST, PUT or PATCH request came without Content-Length.
    #[error("a request with a body needs a Content-Length header")]
    LengthRequired,
    /// An HTTP version other than 1.0 or 1.1, or a Transfer-Encoding (none is supported).
    #[error("{0} is not supported")]
    Unsupported(String),
}

impl HttpError {
    /// The status a server answers this error with (`None`: the connection is gone).
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Io(_) => None,
            HttpError::Malformed(_) => Some(400),
            HttpError::TooLarge("headers") => Some(431),
            HttpError::TooLarge(_) => Some(413),
            HttpError::LengthRequired => Some(411),
            HttpError::Unsupported(_) => Some(501),
        }
    }
}

/// A parsed request.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// The method, uppercase (`GET`, `PUT`, ...).
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// Query parameters in order, not percent-decoded; a parameter without `=` has an empty value.
    pub query: Vec<(String, String)>,
    /// Headers in order, values trimmed; HTTP/1.0 without a Connection header gains `Connection: close`.
    pub headers: Vec<(String, String)>,
    /// The body, as long as Content-Length said (empty without one).
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The first query parameter called exactly `name`.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Whether the client wants the connection closed after the response.
    pub fn wants_close(&self) -> bool {
        self.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A response to send or one received.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers in order; the server adds Content-Length (and `Connection: close`) itself.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a Content-Type header and `body`.
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        Self { status, headers: vec![("Content-Type".into(), content_type.into())], body }
    }

    /// A response whose body is `value` as pretty-printed JSON, ending in a newline.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        // Serializing our own response types cannot fail; an empty object is the fallback.
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
        body.push(b'\n');
        Self::new(status, "application/json", body)
    }

    /// This response with header `name: value` added.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Reads one CRLF- (or LF-) terminated line, charging it to `budget`.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>, HttpError> {
    let mut line = Vec::new();
    let limit = (*budget as u64).saturating_add(1);
    let n = reader.by_ref().take(limit).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(HttpError::TooLarge("headers"));
    }
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(HttpError::Malformed("connection closed in the middle of the headers".into()));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map(Some).map_err(|_| HttpError::Malformed("headers are not UTF-8".into()))
}

/// A start line and its headers.
type Head = (String, Vec<(String, String)>);

/// Reads a start line and headers. `None`: the peer closed the connection before a message.
fn read_head(reader: &mut impl BufRead) -> Result<Option<Head>, HttpError> {
    let mut budget = MAX_HEAD;
    let start = loop {
        match read_line(reader, &mut budget)? {
            None => return Ok(None),
            // RFC 9112 2.2: ignore empty lines before a request line.
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut budget)?
            .ok_or_else(|| HttpError::Malformed("connection closed in the middle of the headers".into()))?;
        if line.is_empty() {
            return Ok(Some((start, headers)));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Malformed(format!("header line without a colon: {line:?}")))?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(HttpError::Malformed(format!("invalid header name {name:?}")));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
}

fn read_body(
    reader: &mut impl BufRead,
    headers: &[(String, String)],
    limit: usize,
    required: bool,
) -> Result<Vec<u8>, HttpError> {
    if let Some(te) = header(headers, "transfer-encoding") {
        return Err(HttpError::Unsupported(format!("Transfer-Encoding {te}")));
    }
    // Two lengths that disagree make the message's end ambiguous (request smuggling): refused.
    let lengths: Vec<&String> =
        headers.iter().filter(|(name, _)| name.eq_ignore_ascii_case("content-length")).map(|(_, v)| v).collect();
    if lengths.windows(2).any(|pair| pair[0] != pair[1]) {
        return Err(HttpError::Malformed("conflicting Content-Length headers".into()));
    }
    let length = match header(headers, "content-length") {
        Some(v) => v.parse::<usize>().map_err(|_| HttpError::Malformed(format!("invalid Content-Length {v:?}")))?,
        None if required => return Err(HttpError::LengthRequired),
        None => 0,
    };
    if length > limit {
        return Err(HttpError::TooLarge("body"));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => HttpError::Malformed("connection closed in the middle of the body".into()),
        _ => HttpError::Io(e),
    })?;
    Ok(body)
}

/// Reads one request. `Ok(None)`: the client closed the connection between requests.
pub(crate) fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>, HttpError> {
    let Some((start, headers)) = read_head(reader)? else { return Ok(None) };
    let mut parts = start.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(format!("invalid request line {start:?}")));
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) || method.is_empty() {
        return Err(HttpError::Malformed(format!("invalid method {method:?}")));
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Err(HttpError::Unsupported(v.to_string())),
        v => return Err(HttpError::Malformed(format!("invalid HTTP version {v:?}"))),
    }
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(format!("request target must be a path, got {target:?}")));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let needs_body = matches!(method, "POST" | "PUT" | "PATCH");
    let body = read_body(reader, &headers, MAX_REQUEST_BODY, needs_body)?;
    let mut request = Request { method: method.into(), path: path.into(), query, headers, body };
    if version == "HTTP/1.0" && request.header("connection").is_none() {
        request.headers.push(("Connection".into(), "close".into()));
    }
    Ok(Some(request))
}

/// Writes `response`; `close` adds `Connection: close`.
pub(crate) fn write_response(writer: &mut impl Write, response: &Response, close: bool) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", response.status, reason(response.status));
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    writer.write_all(head.as_bytes())?;
    writer.write_all(&response.body)?;
    writer.flush()
}

/// Writes a request (client side).
pub(crate) fn write_request(
    writer: &mut impl Write,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> io::Result<()> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    match body {
        Some(body) => head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len())),
        // A POST with nothing to say still says so (the server wants a length on every body).
        None if method != "GET" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    writer.write_all(head.as_bytes())?;
    if let Some(body) = body {
        writer.write_all(body)?;
    }
    writer.flush()
}

/// Reads a response (client side).
pub fn read_response(reader: &mut impl BufRead) -> Result<Response, HttpError> {
    let (start, headers) =
        read_head(reader)?.ok_or_else(|| HttpError::Malformed("connection closed before a response".into()))?;
    let status = start
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("invalid status line {start:?}")))?;
    let body = read_body(reader, &headers, MAX_RESPONSE_BODY, false)?;
    Ok(Response { status, headers, body })
}

/// The reason phrase for the statuses the API uses; empty for any other.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut &raw[..])
    }

    #[test]
    fn parses_requests_with_bodies_and_queries() {
        let raw = b"\r\nPOST /devices/disk0/swap?wait_ms=10&x HTTP/1.1\r\nContent-Length: 2\r\nX-A:  b \r\n\r\n{}";
        let r = parse(raw).unwrap().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_slice()),
            ("POST", "/devices/disk0/swap", &b"{}"[..])
        );
        assert_eq!((r.query("wait_ms"), r.query("x"), r.header("x-a")), (Some("10"), Some(""), Some("b")));
        assert!(!r.wants_close());
        assert!(parse(b"").unwrap().is_none());
        assert!(parse(b"GET /vm HTTP/1.0\n\n").unwrap().unwrap().wants_close());
    }

    #[test]
    fn forty_thousand_mutated_requests_parse_or_fail_cleanly() {
        let corpus: &[&[u8]] = &[
            b"GET /vm HTTP/1.1\r\n\r\n",
            b"PATCH /vm HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"state\": \"paused\"}",
            b"POST /devices/disk0/swap?wait_ms=10 HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            b"PUT /shm/0 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ];
        let mut m = crate::mutate::Mutator::new(0x5eed);
        for i in 0..40_000 {
            let input = m.mutate(corpus[i % corpus.len()]);
            // Whatever the bytes: a request, the end, or an error with an HTTP status.
            match parse(&input) {
                Ok(Some(r)) => assert!(!r.method.is_empty() && r.path.starts_with('/'), "{input:?}"),
                Ok(None) => {}
                Err(e) => assert!(e.status().is_some_and(|s| (400..600).contains(&s)), "{input:?}: {e}"),
            }
        }
    }

    #[test]
    fn malformed_requests_map_to_statuses() {
        let status = |raw: &[u8]| parse(raw).unwrap_err().status();
        assert_eq!(status(b"GET /vm\r\n\r\n"), Some(400));
        assert_eq!(status(b"get /vm HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET vm HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET /vm HTTP/2.0\r\n\r\n"), Some(501));
        assert_eq!(status(b"GET /vm HTTP/1.1\r\nNoColon\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET /vm HTTP/1.1\r\nHost: x"), Some(400));
        assert_eq!(status(b"POST /vm HTTP/1.1\r\n\r\n"), Some(411));
        assert_eq!(status(b"POST /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), Some(400));
        assert_eq!(status(b"POST /vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"), Some(413));
        assert_eq!(status(b"POST /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"), Some(400));
        let conflicting = b"POST /vm HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 3\r\n\r\n{}x";
        assert_eq!(status(conflicting), Some(400));
        let repeated = b"POST /vm HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}";
        assert!(parse(repeated).is_ok(), "the same length twice is fine");
        assert_eq!(status(b"POST /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(501));
        let huge = format!("GET /vm HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(huge.as_bytes()), Some(431));
        assert_eq!(status(b"GET /vm HTTP/1.1\r\nX: \xff\r\n\r\n"), Some(400));
    }

    #[test]
    fn responses_round_trip() {
        let mut wire = Vec::new();
        let sent = Response::json(202, &serde_json::json!({"id": 1})).with_header("Location", "/swaps/1");
        write_response(&mut wire, &sent, true).unwrap();
        let got = read_response(&mut &wire[..]).unwrap();
        assert_eq!(got.status, 202);
        assert_eq!(got.header("location"), Some("/swaps/1"));
        assert_eq!(got.header("connection"), Some("close"));
        assert_eq!(got.body, sent.body);
        let mut wire = Vec::new();
        write_request(&mut wire, "PATCH", "/vm", Some(b"{}")).unwrap();
        let r = parse(&wire).unwrap().unwrap();
        assert_eq!((r.method.as_str(), r.body.as_slice()), ("PATCH", &b"{}"[..]));
    }
}
