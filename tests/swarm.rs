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
    let mut pong = Guest::start(
        &dir,
        "pong",
        "prog=ring-pair role=pong mode=doorbell",
        &["--shm", &shm_arg(&socket, "pair", 1)],
    );
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
