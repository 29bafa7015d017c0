//! The control API, HTTP/1.1 on a Unix socket, one request per connection:
//!
//! | request | answer |
//! |---|---|
//! | `GET /swarm` | layers, VMs (state, pid, load, served), request counters |
//! | `GET /metrics` | the same as Prometheus text |
//! | `POST /layers/{name}/scale` `{"instances": N}` | starts or drains VMs of the layer |
//! | `POST /vms/{id}/kill` | kills a VM's process (to test what the swarm does then) |

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::time::Duration;

use serde_json::{Value, json};

use crate::front::RouterHandle;
use crate::router::Command;

pub fn serve(listener: UnixListener, router: RouterHandle, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let (code, content_type, body) = match read(&stream) {
            Ok((method, path, body)) => handle(&method, &path, &body, &router),
            Err(why) => (400, "application/json", json!({"error": why}).to_string()),
        };
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            if code < 300 { "OK" } else { "Error" },
            body.len()
        );
    }
}

fn read(stream: &UnixStream) -> Result<(String, String, Vec<u8>), String> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else { return Err("bad request line".into()) };
    let (method, path) = (method.to_string(), path.to_string());
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).map_err(|e| e.to_string())? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().map_err(|_| "bad content-length".to_string())?;
        }
    }
    if length > 64 * 1024 {
        return Err("body too large".into());
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((method, path, body))
}

fn handle(method: &str, path: &str, body: &[u8], router: &RouterHandle) -> (u16, &'static str, String) {
    let error = |code: u16, why: String| (code, "application/json", json!({"error": why}).to_string());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let status = || {
        let (reply, answer) = channel();
        router.send(Command::Status { reply });
        answer.recv_timeout(Duration::from_secs(5)).map_err(|_| error(503, "the router did not answer".into()))
    };
    match (method, segments.as_slice()) {
        ("GET", ["swarm"]) => match status() {
            Ok(status) => (200, "application/json", status.to_string()),
            Err(e) => e,
        },
        ("GET", ["metrics"]) => match status() {
            Ok(status) => (200, "text/plain; version=0.0.4", metrics(&status)),
            Err(e) => e,
        },
        ("POST", ["layers", name, "scale"]) => {
            let instances = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("instances").and_then(Value::as_u64))
                .filter(|&n| n <= 16);
            let Some(instances) = instances else {
                return error(400, "expected {\"instances\": N} with N from 1 to 16".into());
            };
            let (reply, answer) = channel();
            router.send(Command::Scale { layer: name.to_string(), instances: instances as u32, reply });
            match answer.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(status)) => (200, "application/json", status.to_string()),
                Ok(Err(why)) => error(if why.starts_with("no layer") { 404 } else { 400 }, why),
                Err(_) => error(503, "the router did not answer".into()),
            }
        }
        ("POST", ["vms", id, "kill"]) => {
            let Ok(vm) = id.parse::<u16>() else { return error(404, format!("no VM {id:?}")) };
            let (reply, answer) = channel();
            router.send(Command::Kill { vm, reply });
            match answer.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => (200, "application/json", json!({"killed": vm}).to_string()),
                Ok(Err(why)) => error(404, why),
                Err(_) => error(503, "the router did not answer".into()),
            }
        }
        _ => error(404, format!("no endpoint {method} {path}")),
    }
}

/// Prometheus text from a status document.
fn metrics(status: &Value) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    };
    family("swarm_requests_answered_total", "counter", "Requests answered, by result");
    family("swarm_requests_retried_total", "counter", "Requests sent again after the VM holding them was lost");
    family("swarm_duplicates_dropped_total", "counter", "Results dropped: not from the VM holding the request");
    family("swarm_vms_lost_total", "counter", "VMs that died or were cut off for corrupting their rings");
    family("swarm_requests_in_flight", "gauge", "Requests not answered yet");
    family("swarm_layer_vms", "gauge", "VMs ready per layer");
    family("swarm_layer_queued", "gauge", "Requests waiting for a VM of the layer");
    family("swarm_vm_served_total", "counter", "Requests each VM served");
    family("swarm_vm_in_flight", "gauge", "Requests each VM holds");
    let requests = &status["requests"];
    let count = |key: &str| requests[key].as_u64().unwrap_or(0);
    out.push_str(&format!("swarm_requests_answered_total{{result=\"ok\"}} {}\n", count("answered_ok")));
    out.push_str(&format!("swarm_requests_answered_total{{result=\"error\"}} {}\n", count("answered_error")));
    out.push_str(&format!("swarm_requests_retried_total {}\n", count("retried")));
    out.push_str(&format!("swarm_duplicates_dropped_total {}\n", count("duplicates_dropped")));
    out.push_str(&format!("swarm_vms_lost_total {}\n", count("vms_lost")));
    out.push_str(&format!("swarm_requests_in_flight {}\n", count("in_flight")));
    for layer in status["layers"].as_array().into_iter().flatten() {
        let name = layer["name"].as_str().unwrap_or("");
        out.push_str(&format!("swarm_layer_vms{{layer=\"{name}\"}} {}\n", layer["ready"]));
        out.push_str(&format!("swarm_layer_queued{{layer=\"{name}\"}} {}\n", layer["queued"]));
    }
    for vm in status["vms"].as_array().into_iter().flatten() {
        let labels = format!("vm=\"{}\",layer=\"{}\"", vm["vm"], vm["layer"].as_str().unwrap_or(""));
        out.push_str(&format!("swarm_vm_served_total{{{labels}}} {}\n", vm["served"]));
        out.push_str(&format!("swarm_vm_in_flight{{{labels}}} {}\n", vm["in_flight"]));
    }
    out
}
