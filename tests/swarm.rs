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
    // The measurement is not blind: the polling guest keeps its vCPU busy.
    assert!(polling > 0.5, "a polling guest should use most of a CPU, used {polling:.2}");
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
    let rings = regions[1].rings();
    let mut lane = swarm_ring::Consumer::attach(rings.lane(1).unwrap()).unwrap();
    let mut greeting = [0u8; 128];
    let len = lane.pop(&mut greeting).unwrap().expect("a greeting in lane 1");
    assert_eq!(&greeting[..len], b"hello from party 1");
    assert!(regions[1].doorbell(0).unwrap().read().unwrap() > 0, "the guest rang party 0's doorbell");
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
