//! A tiny QMP client: JSON lines over QEMU's control socket. Commands wait for their
//! `return` (or `error`); events that arrive meanwhile are queued with their arrival time.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<(Instant, Value)>,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket), reads the greeting and enters command
    /// mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("connect {}: {e}", path.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Self { reader: BufReader::new(stream), writer, events: VecDeque::new() };
        let greeting = qmp.read(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}), timeout)?;
        Ok(qmp)
    }

    /// Reads one message before `deadline`.
    fn read(&mut self, deadline: Instant) -> Result<Value, String> {
        let mut line = String::new();
        loop {
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err("QMP connection closed".into()),
                Ok(_) if line.ends_with('\n') => {
                    return serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}"));
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(format!("QMP read: {e}")),
            }
            if Instant::now() >= deadline {
                return Err("QMP: no answer in time".into());
            }
        }
    }

    /// Runs a command; its `return` value, or its error as text.
    pub fn execute(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value, String> {
        let message = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{message}").map_err(|e| format!("QMP write: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let reply = self.read(deadline)?;
            if reply.get("event").is_some() {
                self.events.push_back((Instant::now(), reply));
            } else if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            } else if let Some(error) = reply.get("error") {
                return Err(format!("{command}: {}", error["desc"].as_str().unwrap_or("error")));
            }
        }
    }

    /// Waits for event `name` (queued or new); its arrival time and `data`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<(Instant, Value), String> {
        if let Some(i) = self.events.iter().position(|(_, e)| e["event"] == name)
            && let Some((at, event)) = self.events.remove(i)
        {
            return Ok((at, event["data"].clone()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let message = self.read(deadline).map_err(|e| format!("waiting for {name}: {e}"))?;
            let at = Instant::now();
            if message["event"] == name {
                return Ok((at, message["data"].clone()));
            }
            if message.get("event").is_some() {
                self.events.push_back((at, message));
            }
        }
    }
}
