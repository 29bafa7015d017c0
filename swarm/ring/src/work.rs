//! What the swarm's layer VMs do to a request, as pure functions (the microguest's worker runs
//! them; host tests check them). A request enters as raw HTTP/1.1 and leaves as the response:
//!
//! | layer | in | out | refuses with |
//! |---|---|---|---|
//! | [`Work::Http`] | an HTTP/1.1 request | `PATH\nTAG\nBODY` | 400 |
//! | [`Work::Auth`] | `PATH\nTAG\nBODY` | `PATH\nBODY` (tag checked against the key) | 401 |
//! | [`Work::Digest`] | `PATH\nBODY` | `PATH\nDIGEST\nBODY` (FNV-1a 64 of the body, hex) | 400 |
//! | [`Work::Respond`] | `PATH\nDIGEST\nBODY` | an HTTP/1.1 200 response | 400 |
//!
//! A refusal's output is the status code as three ASCII digits, a space and a reason; the
//! front end turns it into an HTTP response.

/// One layer's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Parse the HTTP request.
    Http,
    /// Check its authentication tag.
    Auth,
    /// Hash its body.
    Digest,
    /// Build the response.
    Respond,
}

/// Every layer, in pipeline order.
pub const PIPELINE: [Work; 4] = [Work::Http, Work::Auth, Work::Digest, Work::Respond];

impl Work {
    /// The layer a name (`http`, `auth`, `digest`, `respond`) means.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "http" => Self::Http,
            "auth" => Self::Auth,
            "digest" => Self::Digest,
            "respond" => Self::Respond,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Auth => "auth",
            Self::Digest => "digest",
            Self::Respond => "respond",
        }
    }

    /// Does the work on `input`, writing the result into `out`: `Ok(len)` to pass on,
    /// `Err(len)` for a refusal (its text in `out[..len]`).
    pub fn run(self, key: &[u8], served_by: u16, input: &[u8], out: &mut [u8]) -> Result<usize, usize> {
        match self {
            Self::Http => http(input, out),
            Self::Auth => auth(key, input, out),
            Self::Digest => digest(input, out),
            Self::Respond => respond(served_by, input, out),
        }
    }
}

/// FNV-1a, 64 bits.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &byte in *part {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The tag a client puts in `X-Auth` for `path` under `key`: FNV-1a of both, 16 hex digits.
/// (A stand-in for an HMAC: the point is a per-request computation and a check that can fail.)
pub fn auth_tag(key: &[u8], path: &[u8]) -> u64 {
    fnv1a(&[key, b"\n", path])
}

struct Writer<'a> {
    out: &'a mut [u8],
    len: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Self { out, len: 0, overflow: false }
    }

    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        match self.out.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflow = true,
        }
        self
    }

    fn hex(&mut self, value: u64) -> &mut Self {
        let mut digits = [0u8; 16];
        for (i, d) in digits.iter_mut().enumerate() {
            *d = b"0123456789abcdef"[((value >> (60 - 4 * i)) & 0xf) as usize];
        }
        self.put(&digits)
    }

    fn decimal(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.put(&digits[at..])
    }

    fn done(&self) -> Result<usize, usize> {
        if self.overflow { Err(0) } else { Ok(self.len) }
    }
}

fn refuse(out: &mut [u8], code: &[u8; 3], why: &[u8]) -> Result<usize, usize> {
    let mut w = Writer::new(out);
    w.put(code).put(b" ").put(why);
    Err(w.len)
}

/// Splits off the text before the first `\n`.
fn line(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = input.iter().position(|&b| b == b'\n')?;
    Some((&input[..at], &input[at + 1..]))
}

fn parse_hex(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 16 {
        return None;
    }
    text.iter().try_fold(0u64, |acc, &c| Some(acc << 4 | u64::from((c as char).to_digit(16)?)))
}

fn http(input: &[u8], out: &mut [u8]) -> Result<usize, usize> {
    let Some(head_end) = input.windows(4).position(|w| w == b"\r\n\r\n") else {
        return refuse(out, b"400", b"no end of headers");
    };
    let (head, body) = (&input[..head_end], &input[head_end + 4..]);
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return refuse(out, b"400", b"bad request line");
    };
    if !matches!(method, b"GET" | b"POST" | b"PUT") || !path.starts_with(b"/") || !version.starts_with(b"HTTP/1.") {
        return refuse(out, b"400", b"bad request line");
    }
    if path.contains(&b'\n') {
        return refuse(out, b"400", b"bad path");
    }
    let (mut tag, mut length) = (&b""[..], 0usize);
    for header in lines {
        let Some(colon) = header.iter().position(|&b| b == b':') else {
            return refuse(out, b"400", b"bad header");
        };
        let (name, value) = (&header[..colon], trim(&header[colon + 1..]));
        if name.eq_ignore_ascii_case(b"x-auth") {
            tag = value;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            match core::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                Some(n) => length = n,
                None => return refuse(out, b"400", b"bad content-length"),
            }
        }
    }
    if body.len() != length {
        return refuse(out, b"400", b"body length differs from content-length");
    }
    let mut w = Writer::new(out);
    w.put(path).put(b"\n").put(tag).put(b"\n").put(body);
    w.done().or_else(|_| refuse(out, b"413", b"too large"))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn auth(key: &[u8], input: &[u8], out: &mut [u8]) -> Result<usize, usize> {
    let Some((path, rest)) = line(input) else { return refuse(out, b"400", b"no path") };
    let Some((tag, body)) = line(rest) else { return refuse(out, b"400", b"no tag") };
    if parse_hex(tag) != Some(auth_tag(key, path)) {
        return refuse(out, b"401", b"bad or missing X-Auth tag");
    }
    let mut w = Writer::new(out);
    w.put(path).put(b"\n").put(body);
    w.done().or_else(|_| refuse(out, b"413", b"too large"))
}

fn digest(input: &[u8], out: &mut [u8]) -> Result<usize, usize> {
    let Some((path, body)) = line(input) else { return refuse(out, b"400", b"no path") };
    let mut w = Writer::new(out);
    w.put(path).put(b"\n").hex(fnv1a(&[body])).put(b"\n").put(body);
    w.done().or_else(|_| refuse(out, b"413", b"too large"))
}

fn respond(served_by: u16, input: &[u8], out: &mut [u8]) -> Result<usize, usize> {
    let Some((path, rest)) = line(input) else { return refuse(out, b"400", b"no path") };
    let Some((digest, body)) = line(rest) else { return refuse(out, b"400", b"no digest") };
    // The body: one line a client (or a test) can check.
    let mut text = [0u8; 512];
    let mut t = Writer::new(&mut text);
    t.put(b"path=").put(&path[..path.len().min(256)]).put(b" bytes=").decimal(body.len() as u64);
    t.put(b" fnv=").put(digest).put(b" vm=").decimal(u64::from(served_by)).put(b"\n");
    let Ok(text_len) = t.done() else { return refuse(out, b"413", b"too large") };
    let mut w = Writer::new(out);
    w.put(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ").decimal(text_len as u64);
    w.put(b"\r\n\r\n").put(&text[..text_len]);
    w.done().or_else(|_| refuse(out, b"413", b"too large"))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::format;

    /// Runs every layer; whether it passed them all, and the last output as text.
    fn pipeline(key: &[u8], request: &[u8]) -> (bool, std::string::String) {
        let mut data = request.to_vec();
        for work in PIPELINE {
            let mut out = [0u8; 2048];
            match work.run(key, 7, &data, &mut out) {
                Ok(n) => data = out[..n].to_vec(),
                Err(n) => return (false, std::string::String::from_utf8_lossy(&out[..n]).into_owned()),
            }
        }
        (true, std::string::String::from_utf8_lossy(&data).into_owned())
    }

    #[test]
    fn a_good_request_goes_through_every_layer() {
        let tag = auth_tag(b"k", b"/hello");
        let mut req = [0u8; 256];
        let mut w = Writer::new(&mut req);
        w.put(b"POST /hello HTTP/1.1\r\nHost: x\r\nX-Auth: ").hex(tag).put(b"\r\nContent-Length: 3\r\n\r\nabc");
        let n = w.len;
        let (passed, text) = pipeline(b"k", &req[..n]);
        assert!(passed, "{text}");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        let mut hex = [0u8; 16];
        Writer::new(&mut hex).hex(fnv1a(&[b"abc"]));
        assert!(
            text.ends_with(&format!("path=/hello bytes=3 fnv={} vm=7\n", core::str::from_utf8(&hex).unwrap())),
            "{text}"
        );
    }

    #[test]
    fn bad_requests_are_refused_with_a_status() {
        let refusal = |req: &[u8]| {
            let (passed, text) = pipeline(b"k", req);
            assert!(!passed, "{text}");
            text
        };
        assert!(refusal(b"GET /x HTTP/1.1\r\nX-Auth: 0\r\n\r\n").starts_with("401"));
        assert!(refusal(b"GET /x HTTP/1.1\r\n").starts_with("400"));
        assert!(refusal(b"BREW /x HTTP/1.1\r\n\r\n").starts_with("400"));
        assert!(refusal(b"GET /x HTTP/1.1\r\nContent-Length: 9\r\n\r\nab").starts_with("400"));
        assert!(refusal(b"\xff\xfe\r\n\r\n").starts_with("400"));
    }
}
