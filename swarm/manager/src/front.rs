//! The HTTP/1.1 front end: each connection on its own thread, each request handed to the
//! router as it came (the first layer parses it) and answered with the last layer's response.
//! Keep-alive, so `wrk` can drive it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::router::{Answer, Command};

/// The most bytes of headers read.
const MAX_HEAD: usize = 16 * 1024;
/// The most connections served at once (a thread each).
const MAX_CONNECTIONS: usize = 512;
/// How long a connection may stay silent.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request may take end to end.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends commands to the router, and wakes it when it sleeps.
#[derive(Clone)]
pub struct RouterHandle {
    pub commands: Sender<Command>,
    pub wake: Arc<EventFd>,
    /// Set by the router before it sleeps; a busy router is not woken (a system call saved
    /// per request).
    pub sleeping: Arc<AtomicBool>,
}

impl RouterHandle {
    pub fn send(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        // The router sets its flag, fences, then looks at the channel; this side sends,
        // fences, then looks at the flag: one of the two sees the other.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            let _ = self.wake.write(1);
        }
        sent
    }
}

/// Accepts connections until `stop` is set (then one more connection, from `Swarm`'s drop,
/// wakes it). At most `MAX_CONNECTIONS` are served at once; more are answered 503 and closed.
pub fn serve(listener: TcpListener, router: RouterHandle, stop: Arc<AtomicBool>, max_body: usize) {
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut stream) = stream else {
            // Out of descriptors, say: do not spin on the error.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            let _ = stream.write_all(&refusal(503, "too many connections", true));
            continue;
        }
        let (router, open) = (router.clone(), open.clone());
        let spawned = std::thread::Builder::new().name("swarm-conn".into()).spawn(move || {
            connection(stream, router, max_body);
            open.fetch_sub(1, Ordering::Relaxed);
        });
        if spawned.is_err() {
            log::warn!("swarm: cannot start a connection thread");
        }
    }
}

fn connection(stream: TcpStream, router: RouterHandle, max_body: usize) {
    let _ = stream.set_nodelay(true);
    // A client that sends nothing for this long is dropped (slow clients hold a thread each).
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let request = match read_request(&mut reader, max_body) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err((code, why)) => {
                let _ = writer.write_all(&refusal(code, &why, true));
                return;
            }
        };
        let (reply, answer) = channel();
        let needs = request.needs;
        if !router.send(Command::Submit { payload: request.raw, needs, reply }) {
            let _ = writer.write_all(&refusal(503, "the swarm is stopping", true));
            return;
        }
        let bytes = match answer.recv_timeout(ANSWER_TIMEOUT) {
            Ok(Answer::Done(response)) => response,
            Ok(Answer::Refused(code, why)) => refusal(code, &why, request.close),
            Err(_) => refusal(504, "no answer in time", request.close),
        };
        if writer.write_all(&bytes).is_err() || request.close {
            return;
        }
    }
}

struct HttpRequest {
    raw: Vec<u8>,
    needs: Vec<String>,
    close: bool,
}

/// Reads one request (headers and body) as it came; `None` at a clean end of stream (or a
/// client idle past the timeout between requests). Errors carry the status to answer.
fn read_request(reader: &mut BufReader<TcpStream>, max_body: usize) -> Result<Option<HttpRequest>, (u16, String)> {
    let bad = |why: String| (400, why);
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        // Bounded: a line without end cannot grow past the header limit.
        let left = (MAX_HEAD + 1 - raw.len()) as u64;
        let n = match reader.by_ref().take(left).read_until(b'\n', &mut raw) {
            Ok(n) => n,
            Err(_) if raw.is_empty() => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        if n == 0 {
            return if raw.is_empty() { Ok(None) } else { Err(bad("the connection ended mid-request".into())) };
        }
        if raw.len() > MAX_HEAD {
            return Err((431, "headers too large".into()));
        }
        if &raw[before..] == b"\r\n" || &raw[before..] == b"\n" {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request".into())),
        Err(e) => return Err(bad(format!("malformed request: {e}"))),
    }
    let mut length = 0usize;
    let mut needs = Vec::new();
    let mut close = parsed.version == Some(0);
    for header in parsed.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().map_err(|_| bad("bad content-length".into()))?;
        } else if header.name.eq_ignore_ascii_case("x-needs") {
            needs.extend(value.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()));
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    // The whole request travels in one ring slot.
    if raw.len() + length > max_body {
        return Err((413, format!("a request is at most {max_body} bytes, headers included")));
    }
    let start = raw.len();
    raw.resize(start + length, 0);
    reader.read_exact(&mut raw[start..]).map_err(|e| bad(e.to_string()))?;
    Ok(Some(HttpRequest { raw, needs, close }))
}

fn refusal(code: u16, why: &str, close: bool) -> Vec<u8> {
    let reason = match code {
        400 => "Bad Request",
        401 => "Unauthorized",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("{why}\n");
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\n{connection}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
