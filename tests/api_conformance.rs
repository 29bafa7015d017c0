//! The control API does what its OpenAPI document says: Schemathesis generates requests from
//! the document a real `vmm run` serves (valid and invalid, boundary values, then sequences that
//! reuse the ids and locations earlier answers returned) and checks every answer against it:
//! documented status codes, response schemas, content types and headers, no server errors,
//! invalid requests refused. Afterwards the guest must still be alive and answer its console.
//!
//! Schemathesis comes from PyPI (`scripts/install-deps.sh` installs it into
//! `/opt/vmm-test-tools`; `VMM_SCHEMATHESIS` names another `st`). It speaks TCP, the API a
//! Unix socket: the test bridges the two. Requests stay inside the test: the hooks in
//! `tests/api_conformance/hooks.py` move every path the generator makes up into a sandbox
//! directory, and keep `PATCH /vm` from stopping the VM (the test stops it last).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Reaped, TempDir, peers::DatagramEcho};
use serde_json::{Value, json};
use vmm::api::{ApiClient, ROUTES};

const WAIT: Duration = Duration::from_secs(60);
/// The word that ends the guest (`prog=idle until=`): nothing a generator types by chance.
const QUIT_WORD: &str = "conformance-done-7f3a";
/// Schemathesis's time budget, in seconds (`VMM_CONFORMANCE_SECONDS` changes it).
const DEFAULT_SECONDS: u64 = 150;
/// A fixed seed, so a run can be replayed (`VMM_CONFORMANCE_SEED` changes it).
const DEFAULT_SEED: u64 = 20261203;

fn schemathesis() -> PathBuf {
    let st =
        std::env::var_os("VMM_SCHEMATHESIS").map_or_else(|| PathBuf::from("/opt/vmm-test-tools/bin/st"), PathBuf::from);
    assert!(
        st.exists(),
        "Schemathesis is not installed at {}: run `bash scripts/install-deps.sh` (or set VMM_SCHEMATHESIS)",
        st.display()
    );
    st
}

/// Forwards every TCP connection on 127.0.0.1 to the API's Unix socket; returns the port.
fn bridge_to(socket: &Path) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    let port = listener.local_addr().unwrap().port();
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let Ok(unix) = UnixStream::connect(&socket) else { continue };
            let pipe = |mut from: Box<dyn Read + Send>, mut to: Box<dyn Write + Send>| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                });
            };
            let (tcp_in, unix_in) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
            pipe(Box::new(tcp_in), Box::new(unix));
            pipe(Box::new(unix_in), Box::new(TcpWriter(tcp)));
        }
    });
    port
}

/// The TCP side's writer, which shuts the connection down when the socket side ends.
struct TcpWriter(TcpStream);

impl Write for TcpWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Drop for TcpWriter {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn generated_requests_get_the_documented_answers_and_the_guest_runs_on() {
    let st = schemathesis();
    let dir = TempDir::new("conformance");
    let sandbox = dir.join("sandbox");
    std::fs::create_dir(&sandbox).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let _echo = DatagramEcho::start(&dir.join("net.sock"));
    let socket = dir.join("api.sock");
    let console = dir.join("console.log");

    // A VM with one device of each kind, so that every device route has something to act on.
    let mut vmm = Command::new(common::vmm_bin());
    vmm.args(["run", "--kernel", common::microguest(), "--cmdline", &format!("prog=idle until={QUIT_WORD}")])
        .args(["--disk", &format!("path={}", disk.display())])
        .args(["--net", &format!("unix={}", dir.join("net.sock").display())])
        .args(["--vsock", &format!("cid=3,socket={}", dir.join("vsock.sock").display())])
        .args(["--api-sock", socket.to_str().unwrap(), "--serial", &format!("file:{}", console.display())])
        .stdin(Stdio::null());
    let mut vmm = Reaped(vmm.spawn().expect("spawn vmm"));
    let mut api = ApiClient::connect_within(&socket, WAIT, WAIT).expect("the API answers");
    assert_eq!(api.get("/vm").unwrap().status, 200);
    drop(api);

    let port = bridge_to(&socket);
    let seconds = env_u64("VMM_CONFORMANCE_SECONDS", DEFAULT_SECONDS);
    let seed = env_u64("VMM_CONFORMANCE_SEED", DEFAULT_SEED);
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/api_conformance");
    let report = dir.join("report");
    let mut run = Command::new(&st);
    // The document from the source tree (the server serves this very text, which
    // tests/control_api.rs checks): loaded from the server's URL, Schemathesis would leave out
    // the operation that serves it.
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/openapi.json");
    run.arg("run")
        .arg(&document)
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        // Every check but those that do not apply: positive_data_acceptance would want a 2xx for
        // every valid request, but a valid swap of a disk to an image that does not exist is
        // rightly refused (422); the auth checks need an API with authentication.
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance,ignored_auth,object_level_authorization",
        ])
        .args(["--max-time", &seconds.to_string(), "--seed", &seed.to_string(), "--workers", "1"])
        .args(["--request-timeout", "90", "--no-color"])
        .args(["--report", "junit", "--report-dir"])
        .arg(&report)
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", &hooks)
        .env("VMM_CONFORMANCE_SANDBOX", &sandbox)
        .current_dir(dir.path());
    eprintln!("running {run:?}");
    let out = run.output().expect("run schemathesis");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // The summary, and the failures before it, say everything; the rest is progress.
    let summary = text.find("=== FAILURES").or_else(|| text.find("=== SUMMARY")).map_or(&text[..], |at| &text[at..]);
    eprintln!("{summary}");
    assert!(out.status.success(), "Schemathesis found disagreements between the API and its document");

    // Every operation was exercised, the stateful phase ran scenarios through the links.
    let routes = ROUTES.len();
    assert!(text.contains(&format!("Selected: {routes}/{routes}")), "not every operation selected");
    assert!(text.contains(&format!("Tested: {routes}\n")), "not every operation tested");
    let scenarios = text
        .split("Scenarios:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(scenarios > 0, "the stateful phase ran no scenario");
    // ... following the document's links (`API Links: N covered / M selected / M total`):
    // how many it reaches depends on the time budget, so at least one, and the count is shown.
    let links = text.lines().find(|l| l.contains("API Links:")).unwrap_or_default();
    let numbers: Vec<u64> = links.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    eprintln!("stateful phase: {scenarios} scenarios; {}", links.trim());
    assert!(numbers.first().is_some_and(|&covered| covered > 0), "no link of the document was followed: {links:?}");

    // The guest ran on through all of it: running again if a request left it paused, it reads
    // its console and ends when told. (A new connection: the server closes idle ones.)
    let mut api = ApiClient::connect(&socket, WAIT).expect("the API still answers");
    let status: Value = serde_json::from_slice(&api.get("/vm").unwrap().body).unwrap();
    assert!(matches!(status["state"].as_str(), Some("running" | "paused")), "{status}");
    let resume = api.send_json("PATCH", "/vm", &json!({"state": "running"})).unwrap();
    assert_eq!(resume.status, 200, "{}", String::from_utf8_lossy(&resume.body));
    let typed = api.send_json("POST", "/serial/input", &json!({"data": QUIT_WORD})).unwrap();
    assert_eq!(typed.status, 200);
    let _watchdog = common::peers::Watchdog::kill_after(vmm.0.id(), WAIT);
    let exit = vmm.0.wait().unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(exit.code(), Some(0), "the guest did not end cleanly:\n{log}");
    assert!(log.contains("idle: input received"), "{log}");
}
