//! The swarm's shared-memory fabric between real `vmm` processes: a region served by a fabric
//! server in the test, mapped into two VMs as guest RAM, their doorbells wired through KVM
//! (ioeventfd in one VM, irqfd in the other). The guests verify what crosses.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Reaped, TempDir};
use serde_json::{Value, json};
use swarm_fabric::{FabricServer, RegionSpec, SharedRegion};
use vmm::api::ApiClient;

const WAIT: Duration = Duration::from_secs(180);

/// A `vmm run` child with its serial console in a file and its API on a socket.
struct Guest {
    child: Reaped,
    socket: PathBuf,
    console: PathBuf,
}

impl Guest {
    fn start(dir: &TempDir, name: &str, cmdline: &str, extra: &[&str]) -> Self {
        let (socket, console) = (dir.join(&format!("{name}.sock")), dir.join(&format!("{name}.log")));
        let mut cmd = Command::new(common::vmm_bin());
        cmd.args(["run", "--kernel", common::microguest(), "--mem-mib", "32", "--cmdline", cmdline, "--api-sock"])
            .arg(&socket)
            .args(["--serial", &format!("file:{}", console.display())])
            .args(extra)
            .stdin(Stdio::null());
        let child = Reaped(cmd.spawn().expect("spawn vmm"));
        ApiClient::connect_within(&socket, WAIT, WAIT).expect("the VM's API answers");
        Self { child, socket, console }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for the guest to print `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.console();
            if text.contains(needle) {
                return text;
            }
            if let Some(status) = self.child.0.try_wait().unwrap() {
                panic!("the VM exited ({status}) before printing {needle:?}:\n{text}");
            }
            assert!(Instant::now() < deadline, "no {needle:?} after {WAIT:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VM to end; its exit status.
    fn wait(mut self) -> (i32, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), self.console());
            }
            assert!(Instant::now() < deadline, "the VM did not end:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut api = ApiClient::connect(&self.socket, WAIT).expect("connect");
        let response = match body {
            Some(body) => api.send_json(method, path, &body),
            None => api.request(method, path, None),
        }
        .expect("an answer");
        (response.status, serde_json::from_slice(&response.body).unwrap_or(Value::Null))
    }
}

fn fabric(dir: &TempDir, regions: &[(&str, u32)]) -> (FabricServer, Vec<Arc<SharedRegion>>) {
    let server = FabricServer::bind(dir.join("fabric.sock")).unwrap();
    let mut made = Vec::new();
    for &(name, slot_size) in regions {
        let spec = RegionSpec { name: name.into(), parties: 2, lanes: 2, slots: 256, slot_size, hugetlb: false };
        let region = Arc::new(SharedRegion::create(spec).unwrap());
        server.add(region.clone());
        made.push(region);
    }
    (server, made)
}

fn shm_arg(socket: &Path, region: &str, party: u16) -> String {
    format!("socket={},region={region},party={party}", socket.display())
}

#[test]
fn two_vms_exchange_a_million_verified_messages_through_a_ring() {
    let dir = TempDir::new("swarm-pair");
    let (server, _regions) = fabric(&dir, &[("pair", 128)]);
    let socket = server.path().to_path_buf();
    let mut pong =
        Guest::start(&dir, "pong", "prog=ring-pair role=pong mode=doorbell", &["--shm", &shm_arg(&socket, "pair", 1)]);
    pong.wait_for("ready");
    let ping = Guest::start(
        &dir,
        "ping",
        "prog=ring-pair role=ping count=1000000 size=64 mode=doorbell",
        &["--shm", &shm_arg(&socket, "pair", 0)],
    );
    let (status, text) = ping.wait();
    assert_eq!(status, 0, "ping:\n{text}");
    eprintln!("{text}");
    assert!(text.contains("sent 1000000 messages of 64 bytes"), "{text}");
    assert!(text.contains("peer received 1000000, 0 bad"), "{text}");
    let (status, text) = pong.wait();
    assert_eq!(status, 0, "pong:\n{text}");
    assert!(text.contains("received 1000000 messages, 0 out of order or corrupt"), "{text}");
}

/// CPU time (user + system) process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The share of one CPU process `pid` uses over `span`.
fn cpu_share(pid: u32, span: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(pid);
    std::thread::sleep(span);
    (cpu_ticks(pid) - before) as f64 / hz / span.as_secs_f64()
}

#[test]
fn an_idle_vm_sleeps_on_its_doorbell_and_a_polling_one_does_not() {
    let dir = TempDir::new("swarm-idle");
    let (server, _regions) = fabric(&dir, &[("sleepy", 128), ("busy", 128)]);
    let socket = server.path().to_path_buf();
    let mut sleepy = Guest::start(
        &dir,
        "sleepy",
        "prog=ring-pair role=pong mode=doorbell",
        &["--shm", &shm_arg(&socket, "sleepy", 1)],
    );
    let mut busy =
        Guest::start(&dir, "busy", "prog=ring-pair role=pong mode=poll", &["--shm", &shm_arg(&socket, "busy", 1)]);
    sleepy.wait_for("ready");
    busy.wait_for("ready");
    let sleeping = cpu_share(sleepy.child.0.id(), Duration::from_secs(1));
    let polling = cpu_share(busy.child.0.id(), Duration::from_secs(1));
    eprintln!("CPU while idle: doorbell mode {:.0}%, poll mode {:.0}%", sleeping * 100.0, polling * 100.0);
    // The measurement is not blind: the polling guest keeps its vCPU busy (a third of a CPU
    // at least: on this two-core host the rest of the suite competes for it).
    assert!(polling > 0.3, "a polling guest should keep a CPU busy, used {polling:.2}");
    assert!(sleeping < 0.2, "a guest asleep on its doorbell used {sleeping:.2} of a CPU");
    // Doorbells wake it: a thousand messages arrive, each burst waking it.
    let ping = Guest::start(
        &dir,
        "ping",
        "prog=ring-pair role=ping count=1000 size=64 mode=doorbell",
        &["--shm", &shm_arg(&socket, "sleepy", 0)],
    );
    let (status, text) = ping.wait();
    assert_eq!(status, 0, "ping:\n{text}");
    let (status, text) = sleepy.wait();
    assert_eq!(status, 0, "{text}");
    let wakeups: u64 = text
        .lines()
        .find_map(|l| l.strip_suffix(" wake-ups")?.rsplit_once(", ")?.1.parse().ok())
        .expect("a wake-up count");
    assert!(wakeups > 0, "the sleeping guest was never woken:\n{text}");
}

#[test]
fn a_region_attaches_and_detaches_while_traffic_runs() {
    let dir = TempDir::new("swarm-attach");
    let (server, regions) = fabric(&dir, &[("pair", 128), ("extra", 128)]);
    let socket = server.path().to_path_buf();
    let mut pong = Guest::start(
        &dir,
        "pong",
        "prog=ring-pair role=pong mode=doorbell",
        &["--shm", &shm_arg(&socket, "pair", 1), "--shm-windows", "2"],
    );
    pong.wait_for("ready");
    let ping = Guest::start(
        &dir,
        "ping",
        "prog=ring-pair role=ping count=3000000 size=64 mode=doorbell",
        &["--shm", &shm_arg(&socket, "pair", 0)],
    );
    // While the pair exchanges messages: attach a second region to pong...
    let (status, body) = pong.call("GET", "/shm", None);
    assert_eq!((status, body[1]["state"].as_str()), (200, Some("empty")), "{body}");
    let extra = json!({"socket": socket, "region": "extra", "party": 1});
    let (status, body) = pong.call("PUT", "/shm/1", Some(extra.clone()));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "attached");
    assert!(body["guest_addr"].as_u64().unwrap() >= 8 << 30, "{body}");
    // ... which the guest finds and greets through it: the bytes cross the new memory slot.
    pong.wait_for("window 1 attached, greeted as party 1");
    // SAFETY: used while `regions` lives.
    let rings = unsafe { regions[1].rings() };
    let mut lane = swarm_ring::Consumer::attach(rings.lane(1).unwrap()).unwrap();
    let mut greeting = [0u8; 128];
    let len = lane.pop(&mut greeting).unwrap().expect("a greeting in lane 1");
    assert_eq!(&greeting[..len], b"hello from party 1");
    // The guest prints its greeting, then rings: wait for the ring.
    let doorbell = regions[1].doorbell(0).unwrap();
    let mut fd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(doorbell), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for a descriptor that outlives the call.
    let ready = unsafe { libc::poll(&mut fd, 1, WAIT.as_millis() as i32) };
    assert_eq!(ready, 1, "the guest never rang party 0's doorbell");
    assert!(doorbell.read().unwrap() > 0);
    // A window in use is not attached twice; one that does not exist is named.
    let (status, body) = pong.call("PUT", "/shm/1", Some(extra));
    assert_eq!(status, 409, "{body}");
    let (status, _) = pong.call("PUT", "/shm/7", Some(json!({"socket": socket, "region": "extra", "party": 1})));
    assert_eq!(status, 404);
    let (status, body) = pong.call("PUT", "/shm/1", Some(json!({"socket": socket, "region": "nope", "party": 1})));
    assert_eq!(status, 409, "window 1 is still busy: {body}");
    // Detach: the guest lets go when asked.
    let (status, body) = pong.call("DELETE", "/shm/1", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "empty");
    assert!(body.get("forced").is_none(), "the guest acknowledged: {body}");
    pong.wait_for("window 1 detached");
    let (status, body) = pong.call("DELETE", "/shm/1", None);
    assert_eq!(status, 409, "{body}");
    // The pair never noticed.
    let (status, text) = ping.wait();
    assert_eq!(status, 0, "ping:\n{text}");
    assert!(text.contains("peer received 3000000, 0 bad"), "{text}");
    let (status, text) = pong.wait();
    assert_eq!(status, 0, "{text}");
}

#[test]
fn a_guest_scribbling_garbage_over_the_ring_crashes_nothing_and_hangs_nothing() {
    let dir = TempDir::new("swarm-garbage");
    let (server, _regions) = fabric(&dir, &[("pair", 128)]);
    let socket = server.path().to_path_buf();
    let mut pong =
        Guest::start(&dir, "pong", "prog=ring-pair role=pong mode=doorbell", &["--shm", &shm_arg(&socket, "pair", 1)]);
    pong.wait_for("ready");
    let hostile =
        Guest::start(&dir, "hostile", "prog=ring-garbage seconds=3", &["--shm", &shm_arg(&socket, "pair", 0)]);
    // The peer notices the corruption and says so: it ends, with a failure, not a crash.
    let (status, text) = pong.wait();
    assert_eq!(status, 1, "the peer should report the corrupt ring:\n{text}");
    assert!(text.contains("ring-pair: FAILED"), "{text}");
    assert!(!text.contains("panic") && !text.contains("exception"), "{text}");
    let (status, text) = hostile.wait();
    assert_eq!(status, 0, "{text}");
    assert!(text.contains("rounds of garbage written"), "{text}");
}

// --- The swarm manager: `vmm swarm` with real layer VMs, driven over HTTP ---------------------

const KEY: &str = "test-key";

/// A `vmm swarm` process: its front end's address and its control socket.
struct SwarmProc {
    child: Reaped,
    address: String,
    control: PathBuf,
    state: PathBuf,
}

impl SwarmProc {
    fn start(dir: &TempDir, layers: Value) -> Self {
        let control = dir.join("swarm.sock");
        let state = dir.join("swarm-state");
        let config = json!({
            "listen": "127.0.0.1:0", "control": control, "state_dir": state, "key": KEY, "layers": layers,
        });
        let path = dir.join("swarm.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let mut cmd = Command::new(common::vmm_bin());
        cmd.args(["swarm", "--config"]).arg(&path).stdin(Stdio::null()).stderr(Stdio::piped());
        let mut child = Reaped(cmd.spawn().expect("spawn vmm swarm"));
        let stderr = child.0.stderr.take().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
        let line = lines.next().expect("a first line").unwrap();
        let address = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| panic!("no front end address in {line:?}"))
            .to_string();
        // The rest of stderr is drained, so the swarm never blocks writing its log.
        std::thread::spawn(move || lines.for_each(|_| {}));
        let swarm = Self { child, address, control, state };
        swarm.wait_until("every VM ready", |s| {
            s["layers"].as_array().unwrap().iter().all(|l| l["ready"] == l["target"])
        });
        swarm
    }

    fn control(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(stream, "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer[9..12].parse().unwrap();
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::String(body.into())))
    }

    fn status(&self) -> Value {
        let (code, status) = self.control("GET", "/swarm", None);
        assert_eq!(code, 200, "{status}");
        status
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "no {what} after {WAIT:?}: {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn vms_of(status: &Value, layer: &str) -> Vec<Value> {
        status["vms"].as_array().unwrap().iter().filter(|v| v["layer"] == layer).cloned().collect()
    }
}

impl Drop for SwarmProc {
    /// SIGTERM first, so the swarm stops its VMs (they would die with it anyway: they get
    /// SIGKILL when their parent does).
    fn drop(&mut self) {
        // SAFETY: signals our own child, not reaped yet.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `X-Auth` tag for `path` (FNV-1a 64 of the key, a newline and the path).
fn tag(path: &str) -> String {
    format!("{:016x}", swarm_ring::work::auth_tag(KEY.as_bytes(), path.as_bytes()))
}

/// A keep-alive HTTP/1.1 client connection.
struct Client {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl Client {
    fn connect(address: &str) -> Self {
        let stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Self { reader: std::io::BufReader::new(stream.try_clone().unwrap()), writer: stream }
    }

    /// Sends one request; the status and the body.
    fn request(&mut self, raw: &str) -> (u16, String) {
        use std::io::{BufRead, Read, Write};
        self.writer.write_all(raw.as_bytes()).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status = line.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
        let mut length = 0;
        loop {
            let mut header = String::new();
            self.reader.read_line(&mut header).unwrap();
            if header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    fn post(&mut self, path: &str, body: &str, extra: &str) -> (u16, String) {
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: swarm\r\nX-Auth: {}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            tag(path),
            body.len()
        );
        self.request(&raw)
    }
}

fn three_layers(auth_instances: u32, autoscale_max: u32) -> Value {
    json!([
        {"name": "parse", "work": ["http"]},
        {"name": "auth", "work": ["auth"], "instances": auth_instances, "min": 1, "max": autoscale_max.max(auth_instances),
         "labels": ["crypto"], "labeled": 1, "scale_up_load": 1000.0, "scale_down_load": 0.0},
        {"name": "respond", "work": ["digest", "respond"], "scale_up_load": 1000.0, "scale_down_load": 0.0}
    ])
}

/// What a correct answer to `POST path` with `body` says.
fn expected_line(path: &str, body: &str) -> String {
    let fnv = swarm_ring::work::fnv1a(&[body.as_bytes()]);
    format!("path={path} bytes={} fnv={fnv:016x} vm=", body.len())
}

#[test]
fn a_three_layer_pipeline_answers_real_http() {
    let dir = TempDir::new("swarm-http");
    let swarm = SwarmProc::start(&dir, three_layers(2, 2));
    let mut client = Client::connect(&swarm.address);
    let (status, body) = client.post("/orders/17", "hello, swarm", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with(&expected_line("/orders/17", "hello, swarm")), "{body}");
    // A wrong tag is refused by the auth layer, a request it does not serve by the parse layer
    // (both in their VMs); the connection stays usable.
    let (status, body) = client.request("GET /x HTTP/1.1\r\nX-Auth: 0123\r\n\r\n");
    assert_eq!((status, body.trim()), (401, "bad or missing X-Auth tag"));
    let (status, body) = client.request("BREW /x HTTP/1.1\r\n\r\n");
    assert_eq!((status, body.trim()), (400, "bad request line"));
    // Bytes that are not HTTP at all are refused by the front end, which closes the connection:
    // it cannot tell where the next request would start.
    let (status, _) = Client::connect(&swarm.address).request("GET /x HTTP/1.1\r\nX-Auth\r\n\r\n");
    assert_eq!(status, 400);
    // A request larger than a ring slot is refused at the front end, before any VM sees it.
    let big = "x".repeat(8192);
    let (status, _) = Client::connect(&swarm.address).post("/big", &big, "");
    assert_eq!(status, 413);
    // A label some layer knows but no VM of it has... here every label is `crypto`, which one
    // auth VM has; a label no layer knows constrains nothing.
    let (status, body) = client.post("/any", "x", "X-Needs: gpu\r\n");
    assert_eq!(status, 200, "{body}");
    // Affinity: a request needing `crypto` is authenticated by the one auth VM that has it;
    // others prefer the VM without it.
    for i in 0..20 {
        let (status, body) = client.post(&format!("/c/{i}"), "x", "X-Needs: crypto\r\n");
        assert_eq!(status, 200, "{body}");
    }
    let status = swarm.status();
    let auth = SwarmProc::vms_of(&status, "auth");
    let crypto = auth.iter().find(|v| v["labels"][0] == "crypto").expect("a crypto VM");
    let plain = auth.iter().find(|v| v["labels"].as_array().unwrap().is_empty()).expect("a plain VM");
    assert_eq!(crypto["served"], 20, "{status}");
    // The plain VM took the requests that needed nothing (the first, the refused one, /any).
    assert_eq!(plain["served"], 3, "{status}");
    assert_eq!(crypto["reported"]["affinity"], 1, "the VM reports the affinity it was given: {status}");
    // Metrics name every layer and VM.
    let (code, metrics) = swarm.control("GET", "/metrics", None);
    assert_eq!(code, 200);
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("swarm_layer_vms{layer=\"auth\"} 2"), "{metrics}");
    assert!(metrics.contains("swarm_vm_served_total{vm="), "{metrics}");
    drop(client);
    drop(swarm);
    assert!(!dir.join("swarm.sock").exists());
}

/// Answers the clients got: correct ones, refusals (any status but 200), and 200s whose body
/// does not match the request.
#[derive(Debug, Default)]
struct Answered {
    ok: usize,
    refused: usize,
    wrong: usize,
}

/// Client threads sending requests until `stop`, every 200 answer checked against its
/// request. With `tampering_tolerated` (a hostile VM in the pipeline), refusals and wrong
/// answers are counted instead of failing the test.
fn load(
    address: &str,
    threads: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tampering_tolerated: bool,
) -> Answered {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (address, stop) = (address.to_string(), stop.clone());
            std::thread::spawn(move || {
                let mut client = Client::connect(&address);
                let mut answered = Answered::default();
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) && i > 0 {
                        break;
                    }
                    let (path, body) = (format!("/load/{t}/{i}"), format!("request {t}-{i}"));
                    let (status, answer) = client.post(&path, &body, "");
                    if status != 200 && tampering_tolerated {
                        answered.refused += 1;
                        continue;
                    }
                    if !answer.starts_with(&expected_line(&path, &body)) && tampering_tolerated {
                        answered.wrong += 1;
                        continue;
                    }
                    assert_eq!(status, 200, "{path}: {answer}");
                    assert!(answer.starts_with(&expected_line(&path, &body)), "{path}: {answer}");
                    answered.ok += 1;
                }
                answered
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).fold(Answered::default(), |a, b| Answered {
        ok: a.ok + b.ok,
        refused: a.refused + b.refused,
        wrong: a.wrong + b.wrong,
    })
}

/// Four clients loading the swarm on a thread until the flag returned is set.
fn start_load(
    swarm: &SwarmProc,
    tampering_tolerated: bool,
) -> (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<Answered>) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (address, flag) = (swarm.address.clone(), stop.clone());
    (stop, std::thread::spawn(move || load(&address, 4, flag, tampering_tolerated)))
}

fn counters(swarm: &SwarmProc) -> Value {
    swarm.wait_until("no request in flight", |s| s["requests"]["in_flight"] == 0)["requests"].clone()
}

#[test]
fn scaling_a_layer_up_and_down_under_load_answers_every_request_once() {
    let dir = TempDir::new("swarm-scale");
    let swarm = SwarmProc::start(&dir, three_layers(1, 4));
    let (stop, clients) = start_load(&swarm, false);
    let (code, body) = swarm.control("POST", "/layers/auth/scale", Some(json!({"instances": 3})));
    assert_eq!(code, 200, "{body}");
    let grown = swarm.wait_until("three auth VMs ready", |s| {
        SwarmProc::vms_of(s, "auth").iter().filter(|v| v["state"] == "ready").count() == 3
    });
    let before: u64 = SwarmProc::vms_of(&grown, "auth").iter().map(|v| v["served"].as_u64().unwrap()).sum();
    // The new VMs take a share of the load.
    swarm.wait_until("every auth VM serving", |s| {
        SwarmProc::vms_of(s, "auth").iter().all(|v| v["served"].as_u64().unwrap() > 0)
    });
    let (code, body) = swarm.control("POST", "/layers/auth/scale", Some(json!({"instances": 1})));
    assert_eq!(code, 200, "{body}");
    swarm.wait_until("the auth layer back to one VM", |s| SwarmProc::vms_of(s, "auth").len() == 1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = clients.join().unwrap().ok;
    let requests = counters(&swarm);
    eprintln!("scaling under load: {answered} requests, {before} through auth before scaling down; {requests}");
    assert!(answered > 0);
    // Every request answered once: the clients checked each answer against its request, and
    // the router answered exactly as many, dropping no result as a duplicate.
    assert_eq!(requests["answered_ok"].as_u64().unwrap(), answered as u64, "{requests}");
    assert_eq!(requests["answered_error"], 0, "{requests}");
    assert_eq!(requests["duplicates_dropped"], 0, "{requests}");
}

#[test]
fn a_layer_vm_killed_mid_load_loses_no_request() {
    let dir = TempDir::new("swarm-kill");
    let swarm = SwarmProc::start(&dir, three_layers(2, 2));
    let (stop, clients) = start_load(&swarm, false);
    let busy = swarm.wait_until("both auth VMs serving", |s| {
        SwarmProc::vms_of(s, "auth").iter().all(|v| v["served"].as_u64().unwrap() > 50)
    });
    let victim = SwarmProc::vms_of(&busy, "auth")[0].clone();
    // SIGKILL, as an OOM killer would: the VM's process is gone mid-request.
    // SAFETY: sends a signal to the swarm's own child, which is alive (listed as ready).
    unsafe { libc::kill(victim["pid"].as_i64().unwrap() as i32, libc::SIGKILL) };
    let vm = victim["vm"].as_u64().unwrap();
    let healed = swarm.wait_until("a replacement auth VM", |s| {
        let auth = SwarmProc::vms_of(s, "auth");
        auth.len() == 2 && auth.iter().all(|v| v["vm"].as_u64() != Some(vm) && v["state"] == "ready")
    });
    swarm.wait_until("the replacement serving", |s| {
        SwarmProc::vms_of(s, "auth").iter().all(|v| v["served"].as_u64().unwrap() > 0)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = clients.join().unwrap().ok;
    let requests = counters(&swarm);
    eprintln!("kill under load: {answered} requests answered; {requests}; {}", healed["vms"]);
    assert_eq!(requests["vms_lost"], 1, "{requests}");
    assert_eq!(requests["answered_ok"].as_u64().unwrap(), answered as u64, "{requests}");
    assert_eq!(requests["answered_error"], 0, "{requests}");
    assert_eq!(requests["duplicates_dropped"], 0, "{requests}");
}

#[test]
fn a_hostile_guest_on_a_layer_vm_ring_is_cut_off_and_its_requests_retried() {
    let dir = TempDir::new("swarm-hostile");
    let swarm = SwarmProc::start(&dir, three_layers(2, 2));
    let (stop, clients) = start_load(&swarm, true);
    let busy = swarm.wait_until("both auth VMs serving", |s| {
        SwarmProc::vms_of(s, "auth").iter().all(|v| v["served"].as_u64().unwrap() > 50)
    });
    let victim = SwarmProc::vms_of(&busy, "auth")[0]["vm"].as_u64().unwrap();
    // A second VM maps the victim's region (the fabric hands it to anyone on its socket, as it
    // does to a restarted VM) and scribbles over all of it: the lanes both ways, the header.
    // It attaches as party 0, the router's: party 1's doorbell is wired into the victim, and
    // KVM gives an eventfd to one VM's interrupt only.
    let fabric = swarm.state.join("fabric.sock");
    let hostile = Guest::start(
        &dir,
        "hostile",
        "prog=ring-garbage seconds=2",
        &["--shm", &shm_arg(&fabric, &format!("vm{victim}"), 0)],
    );
    let (status, text) = hostile.wait();
    assert_eq!(status, 0, "{text}");
    swarm.wait_until("the scribbled VM removed and replaced", |s| {
        let auth = SwarmProc::vms_of(s, "auth");
        auth.len() == 2 && auth.iter().all(|v| v["vm"].as_u64() != Some(victim) && v["state"] == "ready")
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = clients.join().unwrap();
    let requests = counters(&swarm);
    eprintln!("hostile guest: {answered:?}; {requests}");
    // Every request answered once. The requests in the scribbled VM's lanes are at the hostile
    // writer's mercy, as they are at a compromised layer's (it does their work): they may be
    // refused or come back wrong. No more than its two lanes hold: every other request was
    // served correctly.
    assert_eq!(requests["answered_ok"].as_u64().unwrap(), (answered.ok + answered.wrong) as u64, "{requests}");
    assert_eq!(requests["answered_error"].as_u64().unwrap(), answered.refused as u64, "{requests}");
    assert!(answered.refused + answered.wrong <= 2 * 64, "{answered:?}");
    assert!(answered.ok > 0, "{answered:?}");
    assert_eq!(requests["vms_lost"], 1, "{requests}");
    // The swarm still answers.
    let (status, body) = Client::connect(&swarm.address).post("/after", "still here", "");
    assert_eq!(status, 200, "{body}");
}
