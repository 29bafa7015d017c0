//! The control API over its Unix socket: every endpoint the OpenAPI document lists is served
//! and answers in the documented shape (checked with a JSON Schema validator against the
//! document itself); malformed requests get a 4xx naming the field while the guest keeps
//! running; `vmm ctl` wraps every call against a real `vmm run --api-sock` process.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::peers::{DatagramEcho, Reaped};
use common::{Capture, TempDir};
use serde_json::{Value, json};
use vmm::api::http::Response;
use vmm::api::{ApiClient, ApiServer, OPENAPI, ROUTES};
use vmm::config::{DiskConfig, NetConfig};
use vmm::{SerialOutput, Vm, VmBuilder, VmConfig, VmExit};

const WAIT: Duration = Duration::from_secs(60);

fn openapi() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON")
}

/// Checks `body` against the schema the document gives for this operation and status.
fn check_against_doc(doc: &Value, template: &str, method: &str, response: &Response) -> Value {
    // A JSON pointer inside a URI fragment: `~` and `/` escaped, then braces percent-encoded.
    let escaped = template.replace('~', "~0").replace('/', "~1").replace('{', "%7B").replace('}', "%7D");
    let op = format!("#/paths/{escaped}/{}", method.to_ascii_lowercase());
    let status = response.status.to_string();
    let unescaped_op = op.replace("%7B", "{").replace("%7D", "}");
    let documented = doc.pointer(&format!("{}/responses/{status}", &unescaped_op[1..]));
    assert!(documented.is_some(), "{method} {template} answered {status}, which the document does not list");
    assert!(status_documented(doc, method, template, response.status));
    let media = response.header("content-type").unwrap_or_default().split(';').next().unwrap().to_string();
    let escaped_media = media.replace('/', "~1");
    let pointer = format!("{op}/responses/{status}/content/{escaped_media}/schema");
    assert!(
        doc.pointer(&format!("{}/responses/{status}/content/{escaped_media}/schema", &unescaped_op[1..])).is_some(),
        "{method} {template} {status}: content type {media} is not documented"
    );
    if media != "application/json" {
        return Value::Null;
    }
    let body: Value = serde_json::from_slice(&response.body).expect("JSON body");
    let mut root = doc.clone();
    root["$ref"] = Value::from(pointer);
    let validator = jsonschema::draft202012::new(&root).expect("the document's schemas compile");
    let errors: Vec<String> = validator.iter_errors(&body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{method} {template} {status} does not match the document: {errors:#?}\nbody: {body:#}");
    body
}

/// Whether the document lists `status` for `method` on the concrete `path` (matched against
/// its path templates), by number or as the operation's `default` error. True when the
/// document has no such operation: a 404 or 405 answer is about exactly that.
fn status_documented(doc: &Value, method: &str, path: &str, status: u16) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').collect();
    let matches = |template: &str| {
        let t: Vec<&str> = template.split('/').collect();
        t.len() == segments.len() && t.iter().zip(&segments).all(|(t, s)| t == s || t.starts_with('{'))
    };
    let paths = doc["paths"].as_object().expect("paths");
    let Some((_, ops)) = paths.iter().find(|(template, _)| matches(template)) else { return true };
    let Some(op) = ops.get(method.to_ascii_lowercase()) else { return true };
    let responses = &op["responses"];
    responses.get(status.to_string()).is_some() || (status >= 400 && responses.get("default").is_some())
}

/// An in-process VM with a disk, a NIC and vsock, serving the API.
struct Rig {
    dir: TempDir,
    vm: Arc<Vm>,
    serial: Capture,
    server: Option<ApiServer>,
    _echo: DatagramEcho,
}

impl Rig {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
        let echo = DatagramEcho::start(&dir.join("net.sock"));
        let mut config = VmConfig::new(common::microguest());
        config.cmdline = "prog=idle".into();
        config.disks = vec![DiskConfig { path: Some(disk), ..Default::default() }];
        config.nets = vec![NetConfig { unix: Some(dir.join("net.sock")), ..Default::default() }];
        config.vsock = Some(format!("cid=3,socket={}", dir.join("vsock.sock").display()).parse().unwrap());
        let serial = Capture::default();
        let vm = VmBuilder::from_config(config)
            .serial_output(SerialOutput::Writer(Box::new(serial.clone())))
            .start()
            .expect("start VM");
        serial.wait_for("idle: ready", WAIT);
        let vm = Arc::new(vm);
        let server = ApiServer::start(&dir.join("api.sock"), vm.clone()).expect("start API server");
        Self { dir, vm, serial, server: Some(server), _echo: echo }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn client(&self) -> ApiClient {
        ApiClient::connect(&self.socket(), WAIT).expect("connect")
    }

    /// The guest is alive: it answers its serial port and exits cleanly.
    fn finish(mut self) {
        let mut client = self.client();
        let vm = client.get("/vm").unwrap();
        assert_eq!(json_body(&vm)["state"], "running", "{}", String::from_utf8_lossy(&vm.body));
        self.server.take();
        assert!(!self.socket().exists(), "the socket file is removed when the server stops");
        self.vm.serial_input().send(b"q");
        assert_eq!(self.vm.wait_timeout(WAIT), Some(VmExit::Guest(0)), "{}", self.serial.text());
    }
}

fn json_body(response: &Response) -> Value {
    serde_json::from_slice(&response.body).unwrap_or(Value::Null)
}

#[test]
fn the_document_and_the_server_list_the_same_endpoints() {
    let doc = openapi();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "put", "post", "patch", "delete"] {
            if item.get(method).is_some() {
                documented.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<_> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, served);
}

#[test]
fn every_endpoint_answers_in_the_documented_shape() {
    let doc = openapi();
    let rig = Rig::new("api-endpoints");
    let mut api = rig.client();
    let mut call = |method: &str, template: &str, path: &str, body: Option<Value>| {
        let response = match body {
            Some(body) => api.send_json(method, path, &body).unwrap(),
            None => api.request(method, path, None).unwrap(),
        };
        let parsed = check_against_doc(&doc, template, method, &response);
        (response, parsed)
    };

    let (_, vm) = call("GET", "/vm", "/vm", None);
    assert_eq!((vm["state"].as_str(), vm["vcpus"].as_u64()), (Some("running"), Some(1)));
    let (_, vm) = call("PATCH", "/vm", "/vm", Some(json!({"state": "paused"})));
    assert_eq!(vm["state"], "paused");
    let (_, vm) = call("PATCH", "/vm", "/vm", Some(json!({"state": "running"})));
    assert_eq!(vm["state"], "running");

    let (_, devices) = call("GET", "/devices", "/devices", None);
    let kinds: Vec<_> = devices.as_array().unwrap().iter().map(|d| d["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["block", "net", "vsock"]);
    let (_, disk) = call("GET", "/devices/{id}", "/devices/disk0", None);
    assert!(disk["backend"].as_str().unwrap().starts_with("sync file"), "{disk}");

    let image = rig.dir.join("disk.img");
    let swap = json!({"backend": {"path": image, "engine": "io_uring"}});
    let (started, record) = call("POST", "/devices/{id}/swap", "/devices/disk0/swap", Some(swap));
    assert_eq!(started.status, 202);
    let location = started.header("location").unwrap().to_string();
    assert_eq!(location, format!("/swaps/{}", record["id"]));
    let (_, done) = call("GET", "/swaps/{id}", &format!("{location}?wait_ms=30000"), None);
    assert_eq!(done["state"], "committed", "{done:#}");
    let phases: Vec<_> = done["timeline"].as_array().unwrap().iter().map(|e| e["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["prepare", "quiesce", "drain", "switch", "resume", "verify", "commit"]);
    let (_, swaps) = call("GET", "/swaps", "/swaps", None);
    assert_eq!(swaps.as_array().unwrap().len(), 1);
    let (_, disk) = call("GET", "/devices/{id}", "/devices/disk0", None);
    assert!(disk["backend"].as_str().unwrap().starts_with("io_uring file"), "{disk}");
    assert_eq!(disk["last_swap"], json!({"id": 1, "state": "committed"}));

    let (_, regions) = call("GET", "/memory/regions", "/memory/regions", None);
    assert_eq!(regions[0]["backing"], json!({"kind": "anonymous"}));
    // A whole number written as a float is an integer, as JSON Schema's `integer` says.
    let memory_swap = json!({"backing": {"kind": "memfd"}, "verify": true, "drain_timeout_ms": 2000.0});
    let (_, report) = call("POST", "/memory/regions/{slot}/swap", "/memory/regions/0/swap", Some(memory_swap));
    assert_eq!((report["to"].clone(), report["verified"].clone()), (json!({"kind": "memfd"}), json!(true)));
    let (_, regions) = call("GET", "/memory/regions", "/memory/regions", None);
    assert_eq!(regions[0]["backing"], json!({"kind": "memfd"}));

    // The memory swap left no base for a diff; a full snapshot starts one (after the disk
    // swap above: the snapshot names the backend serving now).
    let snapshots = rig.dir.join("snapshots");
    let diff = json!({"path": snapshots.join("early"), "kind": "diff"});
    let (refused, _) = call("POST", "/snapshots", "/snapshots", Some(diff));
    assert_eq!(refused.status, 409);
    let (created, report) = call("POST", "/snapshots", "/snapshots", Some(json!({"path": snapshots.join("full")})));
    assert_eq!((created.status, report["kind"].as_str(), report["devices"].as_u64()), (201, Some("full"), Some(3)));
    let diff = json!({"path": snapshots.join("diff"), "kind": "diff"});
    let (created, report) = call("POST", "/snapshots", "/snapshots", Some(diff));
    assert_eq!((created.status, report["kind"].as_str()), (201, Some("diff")));
    assert!(report["memory_written_bytes"].as_u64() < Some(report["memory_bytes"].as_u64().unwrap()), "{report}");

    // No shared-memory windows on this VM: an empty list, and a window that is not there.
    let (_, windows) = call("GET", "/shm", "/shm", None);
    assert_eq!(windows, json!([]));
    let (missing, _) = call("DELETE", "/shm/{window}", "/shm/0", None);
    assert_eq!(missing.status, 404);
    let attach = json!({"socket": rig.dir.join("no-fabric.sock"), "region": "r", "party": 1});
    let (missing, _) = call("PUT", "/shm/{window}", "/shm/0", Some(attach));
    assert_eq!(missing.status, 404);

    let (metrics, _) = call("GET", "/metrics", "/metrics", None);
    let text = String::from_utf8(metrics.body).unwrap();
    check_prometheus(&text);
    for sample in [
        "vmm_vm_running 1",
        "vmm_swaps_total{device=\"disk0\",state=\"committed\"} 1",
        "vmm_swaps_running{device=\"disk0\"} 0",
        "vmm_swap_blackout_seconds_count{device=\"disk0\"} 1",
        "vmm_memory_swaps_total{result=\"completed\"} 1",
        "vmm_device_requests_total{device=\"net0\",kind=\"net\",queue=\"tx\"}",
        "vmm_device_request_duration_seconds_bucket{device=\"disk0\",kind=\"block\",queue=\"io\",le=\"+Inf\"}",
    ] {
        assert!(text.contains(sample), "metrics lack {sample:?}:\n{text}");
    }

    let (_, served) = call("GET", "/openapi.json", "/openapi.json", None);
    assert_eq!(served, doc);

    // Typing at the console ends `idle`: the last call the guest answers.
    let (_, typed) = call("POST", "/serial/input", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(typed["bytes"], 1);
    assert_eq!(rig.vm.wait_timeout(WAIT), Some(VmExit::Guest(0)), "{}", rig.serial.text());
    let (refused, _) = call("POST", "/serial/input", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(refused.status, 409);
}

/// Every line is a comment, blank, or `name{labels} value` with a numeric value, and every
/// sample belongs to a family announced with HELP and TYPE.
fn check_prometheus(text: &str) {
    let mut families = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok(), "non-numeric value: {line}");
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad metric name: {line}");
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(families.contains(name) || families.contains(family), "sample without a TYPE line: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
        }
    }
}

/// Sends raw bytes and reads the answer (the server may close right after).
fn raw(socket: &Path, request: &[u8]) -> (u16, Vec<(String, String)>, Value) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let _ = stream.write_all(request);
    let mut reader = BufReader::new(stream);
    let response = vmm::api::http::read_response(&mut reader).expect("an HTTP answer");
    (response.status, response.headers.clone(), json_body(&response))
}

fn with_body(method: &str, path: &str, body: &str) -> Vec<u8> {
    let head = format!("{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}", body.len());
    format!("{head}\r\n\r\n{body}").into_bytes()
}

fn post(path: &str, body: &str) -> Vec<u8> {
    with_body("POST", path, body)
}

fn patch_vm(body: &str) -> Vec<u8> {
    with_body("PATCH", "/vm", body)
}

#[test]
fn malformed_requests_get_a_4xx_naming_the_field_and_the_guest_keeps_running() {
    let doc = openapi();
    let rig = Rig::new("api-malformed");
    let socket = rig.socket();
    let image = rig.dir.join("disk.img");
    let missing = rig.dir.join("missing.img");
    let good_backend = format!(r#"{{"path": "{}"}}"#, image.display());
    let swap = |body: String| post("/devices/disk0/swap", &body);
    // A tap whose MTU is below the 1500 the guest was told.
    let small_tap = common::peers::Tap::create(&format!("ap{}m", std::process::id() % 1_000_000));
    let ok = Command::new("ip").args(["link", "set", &small_tap.name, "mtu", "1000"]).status();
    assert!(ok.is_ok_and(|s| s.success()), "cannot set the MTU of {}", small_tap.name);
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("unknown state", patch_vm(r#"{"state": "sleeping"}"#), 400, Some("state")),
        ("missing state", patch_vm("{}"), 400, Some("state")),
        ("unknown field", patch_vm(r#"{"state": "paused", "speed": 1}"#), 400, Some("speed")),
        ("not JSON", patch_vm("pause please"), 400, None),
        ("an array", patch_vm("[1]"), 400, None),
        (
            "wrong content type",
            b"PATCH /vm HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            415,
            None,
        ),
        ("path of the wrong type", swap(r#"{"backend": {"path": 5}}"#.into()), 400, Some("backend.path")),
        (
            "unknown engine",
            swap(format!(r#"{{"backend": {{"path": "{}", "engine": "turbo"}}}}"#, image.display())),
            400,
            Some("backend.engine"),
        ),
        // Valid by the document (which cannot tell device kinds apart by id), wrong for a disk.
        ("a NIC backend for a disk", swap(r#"{"backend": {"tap": "x"}}"#.into()), 422, Some("backend.tap")),
        ("a vsock backend for a disk", swap(r#"{"backend": {"socket": "/x"}}"#.into()), 422, Some("backend.socket")),
        (
            "unknown key in a RAM backing",
            post("/memory/regions/0/swap", r#"{"backing": {"kind": "memfd", "x": 42}}"#),
            400,
            Some("backing.x"),
        ),
        (
            "a path for a RAM backing without one",
            post("/memory/regions/0/swap", r#"{"backing": {"kind": "memfd", "path": "/x"}}"#),
            400,
            Some("backing"),
        ),
        ("no backend", swap("{}".into()), 400, Some("backend")),
        ("snapshot without a path", post("/snapshots", "{}"), 400, Some("path")),
        ("relative snapshot directory", post("/snapshots", r#"{"path": "snap"}"#), 400, Some("path")),
        ("relative disk image", swap(r#"{"backend": {"path": "disk.img"}}"#.into()), 400, Some("backend.path")),
        ("relative NBD socket", swap(r#"{"backend": {"nbd": "unix:nbd.sock"}}"#.into()), 400, Some("backend.nbd")),
        (
            "relative RAM backing file",
            post("/memory/regions/0/swap", r#"{"backing": {"kind": "file", "path": "vmm-api-test-ram.img"}}"#),
            400,
            Some("backing.path"),
        ),
        ("serial input without data", post("/serial/input", "{}"), 400, Some("data")),
        ("serial input that is not text", post("/serial/input", r#"{"data": 5}"#), 400, Some("data")),
        ("snapshot to an empty path", post("/snapshots", r#"{"path": ""}"#), 400, Some("path")),
        ("unknown snapshot kind", post("/snapshots", r#"{"path": "/tmp/x", "kind": "partial"}"#), 400, Some("kind")),
        ("unknown snapshot field", post("/snapshots", r#"{"path": "/tmp/x", "zip": true}"#), 400, Some("zip")),
        (
            "bad verify window",
            swap(format!(r#"{{"backend": {good_backend}, "verify": {{"window_ms": "soon"}}}}"#)),
            400,
            Some("verify.window_ms"),
        ),
        (
            "new image not confirmed",
            swap(format!(r#"{{"backend": {good_backend}, "mode": "new_image"}}"#)),
            400,
            Some("allow_new_image"),
        ),
        ("unknown mode", swap(format!(r#"{{"backend": {good_backend}, "mode": "teleport"}}"#)), 400, Some("mode")),
        (
            "no drain at all",
            swap(format!(r#"{{"backend": {good_backend}, "drain_timeout_ms": 0}}"#)),
            400,
            Some("drain_timeout_ms"),
        ),
        (
            "a verify window of days",
            swap(format!(r#"{{"backend": {good_backend}, "verify": {{"window_ms": 900000000}}}}"#)),
            400,
            Some("verify.window_ms"),
        ),
        (
            "an error rate over 1",
            swap(format!(r#"{{"backend": {good_backend}, "verify": {{"max_error_rate": 2.5}}}}"#)),
            400,
            Some("verify.max_error_rate"),
        ),
        (
            "a NIC with a smaller MTU",
            post("/devices/net0/swap", &format!(r#"{{"backend": {{"tap": "{}"}}}}"#, small_tap.name)),
            422,
            Some("backend"),
        ),
        ("missing image", swap(format!(r#"{{"backend": {{"path": "{}"}}}}"#, missing.display())), 422, Some("backend")),
        (
            "same vsock socket",
            {
                let body = format!(r#"{{"backend": {{"socket": "{}"}}}}"#, rig.dir.join("vsock.sock").display());
                post("/devices/vsock0/swap", &body)
            },
            422,
            Some("backend"),
        ),
        (
            "fault on a NIC",
            post("/devices/net0/swap", r#"{"backend": {"unix": "/x"}, "fault": "error"}"#),
            400,
            Some("fault"),
        ),
        (
            "MAC change",
            post("/devices/net0/swap", r#"{"backend": {"unix": "/x", "mac": "02:00:00:00:00:09"}}"#),
            400,
            Some("backend"),
        ),
        ("no such device", post("/devices/disk9/swap", &format!(r#"{{"backend": {good_backend}}}"#)), 404, None),
        ("no such swap", b"GET /swaps/999 HTTP/1.1\r\n\r\n".to_vec(), 404, None),
        ("swap id not a number", b"GET /swaps/abc HTTP/1.1\r\n\r\n".to_vec(), 404, None),
        ("no such region", post("/memory/regions/99/swap", r#"{"backing": {"kind": "memfd"}}"#), 404, None),
        (
            "unknown backing",
            post("/memory/regions/0/swap", r#"{"backing": {"kind": "floppy"}}"#),
            400,
            Some("backing.kind"),
        ),
        ("same backing", post("/memory/regions/0/swap", r#"{"backing": {"kind": "anonymous"}}"#), 409, Some("backing")),
        (
            "a file with data in it",
            post(
                "/memory/regions/0/swap",
                &format!(r#"{{"backing": {{"kind": "file", "path": "{}"}}}}"#, image.display()),
            ),
            409,
            Some("backing"),
        ),
        (
            "memory drain of zero",
            post("/memory/regions/0/swap", r#"{"backing": {"kind": "memfd"}, "drain_timeout_ms": 0}"#),
            400,
            Some("drain_timeout_ms"),
        ),
        (
            "file backing without path",
            post("/memory/regions/0/swap", r#"{"backing": {"kind": "file"}}"#),
            400,
            Some("backing.path"),
        ),
        ("no such endpoint", b"GET /vms HTTP/1.1\r\n\r\n".to_vec(), 404, None),
        ("wrong method", b"DELETE /vm HTTP/1.1\r\n\r\n".to_vec(), 405, None),
        ("no length", b"PATCH /vm HTTP/1.1\r\n\r\n".to_vec(), 411, None),
        ("huge body", b"PATCH /vm HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n".to_vec(), 413, None),
        ("chunked", b"PATCH /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), 501, None),
        ("garbage", b"\x16\x03\x01 hello\r\n\r\n".to_vec(), 400, None),
        ("header without colon", b"GET /vm HTTP/1.1\r\nbogus\r\n\r\n".to_vec(), 400, None),
        ("huge header", format!("GET /vm HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000)).into_bytes(), 431, None),
    ];
    let mut root = doc.clone();
    root["$ref"] = json!("#/components/schemas/Error");
    let error_schema = jsonschema::draft202012::new(&root).unwrap();
    for (what, request, status, field) in &cases {
        let (got, headers, body) = raw(&socket, request);
        assert_eq!(got, *status, "{what}: {body:#}");
        let head = String::from_utf8_lossy(request);
        let mut line = head.split_whitespace();
        if let (Some(method), Some(path)) = (line.next(), line.next()) {
            assert!(status_documented(&doc, method, path, got), "{what}: {method} {path} answered {got}, undocumented");
        }
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: no error message: {body:#}");
        assert_eq!(body["field"].as_str(), *field, "{what}: {body:#}");
        if *status == 405 {
            assert!(headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("allow") && v == "GET, PATCH"), "{headers:?}");
        }
        assert!(error_schema.is_valid(&body), "{what}: error body off the document: {body:#}");
    }
    // A relative path created nothing where the VMM runs.
    assert!(!Path::new("vmm-api-test-ram.img").exists(), "a relative RAM backing file was created");
    // The failed swap requests were recorded as failed, none as running.
    let mut api = rig.client();
    let swaps = json_body(&api.get("/swaps").unwrap());
    assert!(swaps.as_array().unwrap().iter().all(|s| s["state"] == "failed"), "{swaps:#}");
    let wait = api.get("/swaps/1?wait_ms=soon").unwrap();
    assert_eq!((wait.status, json_body(&wait)["field"].as_str()), (400, Some("wait_ms")));
    let disk = json_body(&api.get("/devices/disk0").unwrap());
    assert!(disk["backend"].as_str().unwrap().starts_with("sync file"), "nothing changed: {disk}");
    drop(api);
    rig.finish();
}

#[test]
fn a_connection_serves_many_requests_and_a_second_server_on_the_socket_is_refused() {
    let rig = Rig::new("api-keepalive");
    let mut api = rig.client();
    for _ in 0..50 {
        assert_eq!(api.get("/vm").unwrap().status, 200);
    }
    let Err(e) = ApiServer::start(&rig.socket(), rig.vm.clone()) else { panic!("second server on a live socket") };
    assert!(e.to_string().contains("in use"), "{e}");
    drop(api);
    rig.finish();
}

/// A `vmm run --api-sock` child whose guest is ready.
struct RunningVmm {
    child: Reaped,
    socket: PathBuf,
    stdout: BufReader<std::process::ChildStdout>,
}

impl RunningVmm {
    fn start(dir: &TempDir, extra: &[&str]) -> Self {
        let socket = dir.join("api.sock");
        let mut cmd = Command::new(common::vmm_bin());
        cmd.args(["run", "--kernel", common::microguest(), "--cmdline", "prog=idle", "--api-sock"])
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = Reaped(cmd.spawn().expect("spawn vmm"));
        let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
        let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
        let mut line = String::new();
        while !line.contains("idle: ready") {
            line.clear();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "vmm ended before the guest was ready");
        }
        Self { child, socket, stdout }
    }

    fn ctl(&self, args: &[&str]) -> common::Output {
        let mut all = vec!["ctl", "--api-sock", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        common::vmm(&all)
    }
}

#[test]
fn vmm_ctl_wraps_every_call() {
    let dir = TempDir::new("api-ctl");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let disk = format!("path={}", image.display());
    let mut vmm = RunningVmm::start(&dir, &["--disk", &disk]);
    let json = |out: &common::Output| -> Value {
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };

    let out = vmm.ctl(&["status"]);
    assert_eq!((out.status, json(&out)["state"].as_str()), (Some(0), Some("running")), "{out:?}");
    assert_eq!(json(&vmm.ctl(&["pause"]))["state"], "paused");
    assert_eq!(json(&vmm.ctl(&["resume"]))["state"], "running");
    assert_eq!(json(&vmm.ctl(&["devices"]))[0]["id"], "disk0");
    assert_eq!(json(&vmm.ctl(&["devices", "disk0"]))["kind"], "block");

    let out = vmm.ctl(&["swap", "disk0", &format!("{disk},engine=io_uring"), "--wait"]);
    assert_eq!((out.status, json(&out)["state"].as_str()), (Some(0), Some("committed")), "{out:?}");
    let out = vmm.ctl(&[
        "swap",
        "disk0",
        &format!("{disk},engine=sync"),
        "--fault",
        "error",
        "--verify-window-ms",
        "50",
        "--wait",
    ]);
    // A dead backend fails its probe: refused before anything changes.
    assert_eq!((out.status, json(&out)["state"].as_str()), (Some(1), Some("failed")), "{out:?}");
    assert!(json(&out)["reason"].as_str().unwrap_or_default().contains("probe"), "{out:?}");
    // The idle guest sends no request, so a window that needs one is not met: it rolls back.
    let out = vmm.ctl(&[
        "swap",
        "disk0",
        &format!("{disk},engine=io_uring"),
        "--verify-min-requests",
        "1",
        "--verify-window-ms",
        "50",
        "--wait",
    ]);
    assert_eq!((out.status, json(&out)["state"].as_str()), (Some(1), Some("rolled_back")), "{out:?}");
    let out = vmm.ctl(&["swap", "disk0", r#"{"path": "/nonexistent.img"}"#]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(out.stderr.contains("HTTP 422") && out.stderr.contains("field backend"), "{out:?}");
    assert_eq!(json(&vmm.ctl(&["swaps"])).as_array().unwrap().len(), 4);
    assert_eq!(json(&vmm.ctl(&["swaps", "1", "--wait"]))["state"], "committed");
    assert_eq!(json(&vmm.ctl(&["swaps", "1"]))["id"], 1);

    assert_eq!(json(&vmm.ctl(&["memory"]))[0]["slot"], 0);
    let ram = dir.join("ram");
    let out = vmm.ctl(&["memory-swap", "0", &format!("file={}", ram.display()), "--verify"]);
    assert_eq!(json(&out)["to"]["path"], ram.to_str().unwrap(), "{out:?}");
    assert!(vmm.ctl(&["metrics"]).stdout.contains("vmm_swaps_total{device=\"disk0\",state=\"rolled_back\"} 1"));
    assert_eq!(json(&vmm.ctl(&["openapi"]))["openapi"], "3.1.0");
    assert_eq!(json(&vmm.ctl(&["raw", "get", "/devices/disk0"]))["id"], "disk0");

    // Bad input: one line, status 2 before anything is sent; API refusals: status 1.
    let out = vmm.ctl(&["swap", "disk0", "engine"]);
    assert_eq!(out.status, Some(2), "{out:?}");
    assert!(out.stderr.starts_with("error: ") && out.stderr.contains("try 'vmm ctl swap --help'"), "{out:?}");
    // Flags, not API fields, in what the user reads.
    let out = vmm.ctl(&["swap", "disk0", &format!("{disk},engine=io_uring"), "--mode", "new-image"]);
    assert!(out.status == Some(1) && out.stderr.contains("--allow-new-image"), "{out:?}");
    assert!(!out.stderr.contains("allow_new_image"), "{out:?}");
    let out = vmm.ctl(&["memory-swap", "0", "floppy"]);
    assert_eq!(out.status, Some(2), "{out:?}");
    let out = vmm.ctl(&["raw", "PATCH", "/vm", r#"{"state": "asleep"}"#]);
    assert!(out.status == Some(1) && out.stderr.contains("field state"), "{out:?}");
    let out = common::vmm(&["ctl", "--api-sock", dir.join("nope.sock").to_str().unwrap(), "status"]);
    assert!(out.status == Some(1) && out.stderr.contains("cannot connect"), "{out:?}");

    let out = vmm.ctl(&["stop"]);
    assert_eq!(json(&out)["state"], "exited", "{out:?}");
    let watchdog = common::peers::Watchdog::kill_after(vmm.child.0.id(), WAIT);
    let status = vmm.child.0.wait().unwrap();
    drop(watchdog);
    assert_eq!(status.code(), Some(0));
    let mut rest = String::new();
    let _ = vmm.stdout.read_to_string(&mut rest);
    assert!(!vmm.socket.exists(), "the socket file is removed when vmm exits");
}

#[test]
fn run_refuses_a_socket_path_that_is_in_use() {
    let dir = TempDir::new("api-inuse");
    let _first = RunningVmm::start(&dir, &[]);
    let out = common::run_microguest("prog=hello", &["--api-sock", dir.join("api.sock").to_str().unwrap()]);
    out.expect_status(2).expect_one_line_error("in use");
}
