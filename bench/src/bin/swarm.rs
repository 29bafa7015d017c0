//! The swarm, measured: messages between two VMs through a shared-memory ring (polling and
//! doorbell) next to the same two VMs talking through virtio-vsock and virtio-net (via a host
//! relay, as two VMs on one host do); then requests through 1, 2 and 3 layer VMs driven by
//! `wrk`, next to one VM doing every layer; then what scaling a layer and killing a VM under
//! load lose.
//!
//! `cargo run --release -p bench --bin swarm [SECONDS [ring|pipeline|scale]]` (each wrk run
//! lasts SECONDS, default 5; the second argument prints one table only).
//! Ring rates are the median of three runs; round trips are timed by the guest (20,000 of them).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::{GuestProcess, Table, microguest_file, vmm_binary};
use serde_json::{Value, json};
use swarm_fabric::{FabricServer, RegionSpec, SharedRegion};

const KEY: &str = "bench-key";
const WAIT: Duration = Duration::from_secs(120);

fn vm(vmm: &Path, kernel: &Path, cmdline: &str, extra: &[String]) -> GuestProcess {
    let mut args: Vec<String> =
        ["run", "--kernel", kernel.to_str().unwrap(), "--mem-mib", "32", "--cmdline", cmdline].map(String::from).into();
    args.extend_from_slice(extra);
    GuestProcess::spawn(vmm, &args)
}

/// The number after `key` up to the next space or the end, in a line.
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = text[text.find(key)? + key.len()..].trim_start();
    rest.split(|c: char| c.is_whitespace() || c == ',').next()?.parse().ok()
}

struct Ring {
    rate: f64,
    p50_ns: f64,
    p99_ns: f64,
}

/// Two VMs, one region, `count` messages of `size` bytes streamed, then round trips timed.
fn ring(vmm: &Path, kernel: &Path, dir: &Path, size: usize, mode: &str, count: u64) -> Ring {
    let socket = dir.join(format!("fabric-{size}-{mode}.sock"));
    let server = FabricServer::bind(&socket).unwrap();
    let slot_size = (size as u32 + 8).next_multiple_of(64);
    let spec = RegionSpec { name: "pair".into(), parties: 2, lanes: 2, slots: 1024, slot_size, hugetlb: false };
    server.add(Arc::new(SharedRegion::create(spec).unwrap()));
    let shm = |party: u16| vec!["--shm".to_string(), format!("socket={},region=pair,party={party}", socket.display())];
    let run = |ping: &str| {
        let pong = vm(
            vmm,
            kernel,
            &format!("prog=ring-pair role=pong mode={mode} rtt={}", ping.contains("rtt=1") as u8),
            &shm(1),
        );
        pong.wait_line("ready", WAIT);
        let mut ping = vm(vmm, kernel, &format!("prog=ring-pair role=ping mode={mode} size={size} {ping}"), &shm(0));
        ping.wait_exit();
        ping.transcript()
    };
    // The median of three runs: two busy vCPUs on a two-core host share it with everything else.
    let mut rates: Vec<f64> = (0..3)
        .map(|_| {
            let stream = run(&format!("count={count}"));
            number_after(&stream, "us: ").unwrap_or_else(|| panic!("no rate in {stream}"))
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    let rate = rates[1];
    let rtt = run("count=20000 rtt=1");
    let p50 = number_after(&rtt, "rtt p50 ").unwrap_or(f64::NAN);
    let p99 = number_after(&rtt, "p99 ").unwrap_or(f64::NAN);
    Ring { rate, p50_ns: p50, p99_ns: p99 }
}

/// Relays frames between two VMs' Unix datagram NIC backends, as a host switch would.
fn net_relay(a: &Path, b: &Path) {
    let (sa, sb) = (UnixDatagram::bind(a).unwrap(), UnixDatagram::bind(b).unwrap());
    let (sa2, sb2) = (sa.try_clone().unwrap(), sb.try_clone().unwrap());
    let peer_b = Arc::new(std::sync::Mutex::new(None));
    let peer_a = Arc::new(std::sync::Mutex::new(None));
    let (pa, pb) = (peer_a.clone(), peer_b.clone());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sa.recv_from(&mut buf) {
            *pa.lock().unwrap() = Some(from);
            if let Some(to) = pb.lock().unwrap().as_ref() {
                let _ = sb.send_to_addr(&buf[..n], to);
            }
        }
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sb2.recv_from(&mut buf) {
            *peer_b.lock().unwrap() = Some(from);
            if let Some(to) = peer_a.lock().unwrap().as_ref() {
                let _ = sa2.send_to_addr(&buf[..n], to);
            }
        }
    });
}

/// VM A's virtio-net frames echoed by VM B (`net-reflect`): frames per second.
fn net(vmm: &Path, kernel: &Path, dir: &Path, size: usize, window: u32, frames: u64) -> f64 {
    let (a, b) = (dir.join(format!("net-a-{size}-{window}.sock")), dir.join(format!("net-b-{size}-{window}.sock")));
    net_relay(&a, &b);
    let reflector = vm(vmm, kernel, "prog=net-reflect", &["--net".into(), format!("unix={}", b.display())]);
    reflector.wait_line("ready", WAIT);
    let mut sender = vm(
        vmm,
        kernel,
        &format!("prog=net-echo frames={frames} size={} window={window}", size.max(60)),
        &["--net".into(), format!("unix={}", a.display())],
    );
    sender.wait_exit();
    let out = sender.transcript();
    number_after(&out, "corrupt 0, ").unwrap_or_else(|| panic!("no rate: {out}"))
}

/// VM A's vsock stream echoed by VM B (`vsock-echo serve=1`) through a host relay joining
/// the two hybrid sockets: messages of `size` bytes per second.
fn vsock(vmm: &Path, kernel: &Path, dir: &Path, size: usize, bytes: u64) -> f64 {
    let (a, b) = (dir.join(format!("vsock-a-{size}.sock")), dir.join(format!("vsock-b-{size}.sock")));
    let listener = UnixListener::bind(format!("{}_5000", a.display())).unwrap();
    let echo = vm(
        vmm,
        kernel,
        "prog=vsock-echo serve=1 port=1234",
        &["--vsock".into(), format!("cid=4,socket={}", b.display())],
    );
    echo.wait_line("listening", WAIT);
    let relay_b = b.clone();
    std::thread::spawn(move || {
        let Ok((from_a, _)) = listener.accept() else { return };
        let mut to_b = UnixStream::connect(&relay_b).unwrap();
        to_b.write_all(b"CONNECT 1234\n").unwrap();
        let mut reader = BufReader::new(to_b.try_clone().unwrap());
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        let (mut a_in, mut b_out) = (from_a.try_clone().unwrap(), to_b);
        std::thread::spawn(move || std::io::copy(&mut a_in, &mut b_out));
        let mut a_out = from_a;
        let _ = std::io::copy(&mut reader, &mut a_out);
    });
    let mut client = vm(
        vmm,
        kernel,
        &format!("prog=vsock-echo port=5000 bytes={bytes} chunk={size}"),
        &["--vsock".into(), format!("cid=3,socket={}", a.display())],
    );
    client.wait_exit();
    let out = client.transcript();
    let kib = number_after(&out, "closed cleanly, ").unwrap_or_else(|| panic!("no rate: {out}"));
    kib * 1024.0 / size as f64
}

/// A `vmm swarm` process.
struct SwarmProc {
    child: Child,
    address: String,
    control: PathBuf,
}

impl SwarmProc {
    fn start(vmm: &Path, dir: &Path, name: &str, layers: Value, autoscale: bool) -> Self {
        let control = dir.join(format!("{name}.sock"));
        let config = json!({"listen": "127.0.0.1:0", "control": control, "state_dir": dir.join(name), "key": KEY,
                            "layers": layers, "autoscale": autoscale});
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, config.to_string()).unwrap();
        let mut child =
            Command::new(vmm).args(["swarm", "--config"]).arg(&path).stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = lines.next().unwrap().unwrap();
        let address = line.split("http://").nth(1).and_then(|r| r.split(',').next()).expect("address").to_string();
        std::thread::spawn(move || lines.for_each(drop));
        let swarm = Self { child, address, control };
        swarm.wait_until(|s| s["layers"].as_array().unwrap().iter().all(|l| l["ready"] == l["target"]));
        swarm
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut stream = UnixStream::connect(&self.control).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(stream, "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        serde_json::from_str(answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap_or(Value::Null)
    }

    fn wait_until(&self, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.call("GET", "/swarm", None);
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "swarm never got there: {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SwarmProc {
    fn drop(&mut self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

fn wrk(address: &str, seconds: u64) -> Wrk {
    let tag = format!("{:016x}", swarm_ring::work::auth_tag(KEY.as_bytes(), b"/bench"));
    let out = Command::new("wrk")
        .args(["-t2", "-c16", &format!("-d{seconds}s"), "--latency", "-H", &format!("X-Auth: {tag}")])
        .arg(format!("http://{address}/bench"))
        .output()
        .expect("wrk (apt-get install wrk; scripts/install-deps.sh does)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ms = |key: &str| {
        let v = text.lines().find(|l| l.trim_start().starts_with(key))?.split_whitespace().nth(1)?.to_string();
        let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic())?);
        let num: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => num / 1000.0,
            "ms" => num,
            "s" => num * 1000.0,
            _ => return None,
        })
    };
    let count =
        |key: &str| text.lines().find_map(|l| l.trim().strip_prefix(key)).and_then(|r| r.trim().parse::<u64>().ok());
    let socket_errors: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|r| r.split(',').filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Wrk {
        rps: number_after(&text, "Requests/sec:").unwrap_or(0.0),
        p50_ms: ms("50%").unwrap_or(f64::NAN),
        p99_ms: ms("99%").unwrap_or(f64::NAN),
        requests: text.lines().find_map(|l| l.trim().split(" requests in").next()?.parse().ok()).unwrap_or(0),
        errors: count("Non-2xx or 3xx responses:").unwrap_or(0) + socket_errors,
    }
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    // Which tables: all by default, or one of ring, pipeline, scale.
    let only = std::env::args().nth(2);
    let wanted = |table: &str| only.as_deref().is_none_or(|o| o == table);
    let vmm = vmm_binary();
    let kernel = microguest_file();
    let dir = std::env::temp_dir().join(format!("bench-swarm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let mut t = Table::new(&[
        "VM to VM, messages of",
        "ring, polling",
        "ring, doorbell",
        "virtio-vsock",
        "virtio-net",
        "ring polling / vsock",
        "rtt p50 / p99: ring polling",
        "ring doorbell",
        "vsock, net (1 in flight)",
    ]);
    for size in [64usize, 1024].into_iter().filter(|_| wanted("ring")) {
        eprintln!("ring, {size} B...");
        let poll = ring(&vmm, &kernel, &dir, size, "poll", 4_000_000);
        let bell = ring(&vmm, &kernel, &dir, size, "doorbell", 1_000_000);
        eprintln!("vsock and net, {size} B...");
        let vs = vsock(&vmm, &kernel, &dir, size, (size as u64 * 20_000).min(16 << 20));
        let nt = net(&vmm, &kernel, &dir, size, 16, 20_000);
        let nt1 = net(&vmm, &kernel, &dir, size, 1, 2_000);
        t.row(vec![
            format!("{size} B"),
            format!("{:.2} M/s", poll.rate / 1e6),
            format!("{:.2} M/s", bell.rate / 1e6),
            format!("{:.0} k/s", vs / 1e3),
            format!("{:.0} k/s", nt / 1e3),
            format!("{:.0}x", poll.rate / vs),
            format!("{:.1} / {:.1} us", poll.p50_ns / 1e3, poll.p99_ns / 1e3),
            format!("{:.1} / {:.1} us", bell.p50_ns / 1e3, bell.p99_ns / 1e3),
            format!("net {:.0} us mean", 1e6 / nt1),
        ]);
    }
    if wanted("ring") {
        t.print();
        println!();
    }

    let mut p = Table::new(&["pipeline (wrk -t2 -c16)", "VMs", "requests/s", "p50", "p99", "vs one VM"]);
    let all = json!([{"name": "all", "work": ["http", "auth", "digest", "respond"]}]);
    let two = json!([{"name": "front", "work": ["http", "auth"]}, {"name": "back", "work": ["digest", "respond"]}]);
    let three = json!([{"name": "parse", "work": ["http"]}, {"name": "auth", "work": ["auth"]},
                       {"name": "respond", "work": ["digest", "respond"]}]);
    let three_wide = json!([{"name": "parse", "work": ["http"]}, {"name": "auth", "work": ["auth"], "instances": 2, "max": 2},
                            {"name": "respond", "work": ["digest", "respond"]}]);
    let mut base = None;
    let configs = if wanted("pipeline") {
        vec![
            ("one VM, every layer", all, 1),
            ("2 layers", two, 2),
            ("3 layers", three, 3),
            ("3 layers, auth x2", three_wide, 4),
        ]
    } else {
        Vec::new()
    };
    for (name, layers, vms) in configs {
        eprintln!("pipeline: {name}...");
        let swarm = SwarmProc::start(&vmm, &dir, &format!("p{vms}"), layers, false);
        let w = wrk(&swarm.address, seconds);
        let b = *base.get_or_insert(w.rps);
        p.row(vec![
            name.into(),
            vms.to_string(),
            format!("{:.0}", w.rps),
            format!("{:.2} ms", w.p50_ms),
            format!("{:.2} ms", w.p99_ms),
            format!("{:.2}x", w.rps / b),
        ]);
    }
    if wanted("pipeline") {
        p.print();
        println!();
    }

    if !wanted("scale") {
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&kernel);
        return;
    }
    eprintln!("scaling and a kill under load...");
    let layers = json!([{"name": "parse", "work": ["http"]}, {"name": "auth", "work": ["auth"], "max": 4},
                        {"name": "respond", "work": ["digest", "respond"], "instances": 2, "max": 2}]);
    let swarm = SwarmProc::start(&vmm, &dir, "scale", layers, false);
    let address = swarm.address.clone();
    let load = std::thread::spawn(move || wrk(&address, seconds.max(6) + 2));
    let step = Duration::from_secs(seconds.max(6) / 3);
    std::thread::sleep(step);
    swarm.call("POST", "/layers/auth/scale", Some(json!({"instances": 3})));
    std::thread::sleep(step);
    swarm.call("POST", "/layers/auth/scale", Some(json!({"instances": 1})));
    let status = swarm.call("GET", "/swarm", None);
    let victim = status["vms"].as_array().unwrap().iter().find(|v| v["layer"] == "respond").unwrap()["vm"].clone();
    swarm.call("POST", &format!("/vms/{victim}/kill"), None);
    let w = load.join().unwrap();
    let status = swarm.wait_until(|s| s["requests"]["in_flight"] == 0);
    let r = &status["requests"];
    let mut s = Table::new(&["under wrk: auth scaled 1 -> 3 -> 1, a respond VM killed", "value"]);
    s.row(vec!["requests completed (wrk)".into(), w.requests.to_string()]);
    s.row(vec!["requests answered 200 (router)".into(), r["answered_ok"].to_string()]);
    s.row(vec!["errors seen by wrk (non-2xx, socket errors, timeouts)".into(), w.errors.to_string()]);
    s.row(vec!["requests retried after the kill".into(), r["retried"].to_string()]);
    s.row(vec!["duplicates dropped".into(), r["duplicates_dropped"].to_string()]);
    s.row(vec!["requests/s meanwhile".into(), format!("{:.0}", w.rps)]);
    s.print();
    drop(swarm);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&kernel);
}
