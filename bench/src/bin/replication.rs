//! Replication to a shadow VMM and switchover, ours next to QEMU 10's live migration between
//! two QEMU processes on the same host (over a Unix socket, its bandwidth cap lifted), on the
//! same microguest dirtying memory at about 50 MiB/s (`memdirty pages_per_ms=13`).
//!
//! Rows, for a 128 MiB and a 1 GiB guest (half of its RAM being rewritten):
//! - switchover downtime: ours from freezing the primary to the VM running on the shadow;
//!   QEMU's `downtime` from `query-migrate`;
//! - time to replicate from scratch: ours, the first full pass (every populated page, encoded)
//!   acknowledged by the shadow; QEMU, the migration's `total-time`;
//! - epochs per second with `epoch_ms` 10, and the lag (one epoch's send-to-ack);
//! - bytes on the wire per dirtied page in the steady state; QEMU's with XBZRLE on (a 64 MiB
//!   cache, as ours) and a downtime limit it cannot meet, so that it keeps iterating;
//! - the guest's slowdown while replicating: `memdirty` rounds per second, replicated vs not.
//!
//! Then the page codec alone, in process, on three workloads (sparse writes into pages sent
//! before, pages rewritten whole, zero pages): encode throughput per core and bytes sent.
//!
//! `cargo run --release -p bench --bin replication [RUNS]` (default 5); `... replication codec`
//! prints the codec's table alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bench::qmp::Qmp;
use bench::{GuestProcess, Samples, Table, microguest_file, qemu_args, qemu_binary, vmm_binary};
use serde_json::{Value, json};
use vmm::api::ApiClient;
use vmm::replication::codec::{Encoder, PAGE};

const SIZES_MIB: [u64; 2] = [128, 1024];
const WAIT: Duration = Duration::from_secs(180);
/// About 50 MiB/s of rewritten pages.
const PAGES_PER_MS: u64 = 13;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("codec") {
        return codec_table();
    }
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let vmm = vmm_binary();
    let guest = microguest_file();
    let qemu = qemu_binary();
    if qemu.is_none() {
        eprintln!("QEMU could not be installed: its rows show n/a");
    }
    let work = std::env::temp_dir().join(format!("bench-replication-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");

    let mut table = Table::new(&["guest", "metric", "vmm (ours)", "QEMU 10 (migrate, cap lifted)", "QEMU / ours"]);
    for mem in SIZES_MIB {
        eprintln!("replication: {mem} MiB guest, {runs} runs...");
        let ours = Ours { vmm: &vmm, guest: &guest, work: &work, mem }.run(runs);
        let peer = qemu.as_deref().map(|q| Peer { qemu: q, guest: &guest, work: &work, mem }.run(runs));
        let label = format!("{mem} MiB");
        let downtime = |s: &Samples| format!("{:.2} / {:.2} ms", s.median(), s.pct(99.0));
        table.row(vec![
            label.clone(),
            "switchover downtime p50 / p99 (50 MiB/s dirtied)".into(),
            downtime(&ours.downtime_ms),
            peer.as_ref().map_or("n/a".into(), |p| downtime(&p.downtime_ms)),
            peer.as_ref().map_or("n/a".into(), |p| ratio(p.downtime_ms.pct(99.0), ours.downtime_ms.pct(99.0))),
        ]);
        table.row(vec![
            label.clone(),
            format!("replicate from scratch ({:.0} MiB populated)", ours.populated_mib),
            format!("{:.1} ms", ours.first_pass_ms.median()),
            peer.as_ref().map_or("n/a".into(), |p| format!("{:.1} ms", p.total_ms.median())),
            peer.as_ref().map_or("n/a".into(), |p| ratio(p.total_ms.median(), ours.first_pass_ms.median())),
        ]);
        table.row(vec![
            label.clone(),
            "epochs/s sustained (epoch_ms 10), lag p50".into(),
            format!("{:.0}/s, {:.2} ms", ours.epochs_per_s.median(), ours.lag_ms.median()),
            "no continuous replication".into(),
            "".into(),
        ]);
        table.row(vec![
            label.clone(),
            "bytes sent per dirtied page, 16 B written per page (QEMU: XBZRLE)".into(),
            format!("{:.0} B", ours.bytes_per_page.median()),
            peer.as_ref()
                .filter(|p| !p.xbzrle_bytes_per_page.is_empty())
                .map_or("n/a (128 MiB only)".into(), |p| format!("{:.0} B", p.xbzrle_bytes_per_page.median())),
            peer.as_ref()
                .filter(|p| !p.xbzrle_bytes_per_page.is_empty())
                .map_or("".into(), |p| ratio(p.xbzrle_bytes_per_page.median(), ours.bytes_per_page.median())),
        ]);
        table.row(vec![
            label.clone(),
            "slowdown of a guest dirtying 16 MiB flat out, epoch_ms 10".into(),
            format!("{:.1}%", ours.slowdown_pct.median()),
            "n/a".into(),
            "".into(),
        ]);
    }
    table.print();
    println!();
    codec_table();
    println!(
        "\nMedians of {runs} runs (p99 over the same runs). Guests run `memdirty` over half their RAM at \
         {PAGES_PER_MS} pages/ms. Ours: primary and shadow are two `vmm` processes on this host, the shadow \
         restores with its memory file mapped. QEMU: source and destination QEMU processes, `migrate` over a \
         Unix socket with max-bandwidth lifted, default downtime-limit. Bytes per dirtied page: the \
         guest writes 16 bytes into each page it dirties (memdirty words=2); ours over 2 s of epochs, QEMU \
         with XBZRLE on (64 MiB cache, as ours), capped at 16 MiB/s so that it keeps iterating, over 2 s once \
         its cache is warm."
    );
    let _ = std::fs::remove_dir_all(&work);
}

fn ratio(peer: f64, ours: f64) -> String {
    format!("{:.1}x", peer / ours)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `memdirty`'s setting for small writes: 2 words (16 bytes) of each page it dirties.
const SPARSE: &str = "words=2";

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn cmdline(mem: u64) -> String {
    format!("prog=memdirty mib={} pages_per_ms={PAGES_PER_MS}", mem / 2)
}

struct OurResults {
    downtime_ms: Samples,
    first_pass_ms: Samples,
    epochs_per_s: Samples,
    lag_ms: Samples,
    slowdown_pct: Samples,
    populated_mib: f64,
    /// Bytes on the wire per dirtied page, in the steady state.
    bytes_per_page: Samples,
}

struct Ours<'a> {
    vmm: &'a Path,
    guest: &'a Path,
    work: &'a Path,
    mem: u64,
}

fn call(socket: &Path, method: &str, path: &str, body: Option<Value>) -> Value {
    let mut api = ApiClient::connect(socket, WAIT).expect("connect");
    let response = match body {
        Some(body) => api.send_json(method, path, &body),
        None => api.request(method, path, None),
    }
    .expect("an answer");
    assert!(response.status < 300, "{method} {path}: {}", String::from_utf8_lossy(&response.body));
    serde_json::from_slice(&response.body).unwrap_or(Value::Null)
}

fn wait_epochs(socket: &Path, epochs: u64) -> Value {
    loop {
        let status = call(socket, "GET", "/replication", None)["shadows"][0].clone();
        assert!(status["state"] != "failed", "{status}");
        if status["epochs"].as_u64().unwrap_or(0) >= epochs {
            return status;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Rounds `memdirty` completes per second over `window`, read from its console lines.
fn rounds_per_s(process: &GuestProcess, window: Duration) -> f64 {
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < window {
        if process.find_line("ok (", window.saturating_sub(started.elapsed())).is_some() {
            rounds += 1;
        }
    }
    rounds as f64 / started.elapsed().as_secs_f64()
}

impl Ours<'_> {
    /// How much slower a guest that dirties memory as fast as it can (`memdirty`, 16 MiB,
    /// unthrottled) runs while replicated with `epoch_ms` 10, in percent of its rounds/s.
    fn slowdown(&self) -> f64 {
        let dir = self.work.join(format!("slowdown-{}", self.mem));
        std::fs::create_dir_all(&dir).unwrap();
        let (socket, listen) = (dir.join("primary.sock"), dir.join("shadow-repl.sock"));
        let args: Vec<String> = [
            "run",
            "--kernel",
            &self.guest.display().to_string(),
            "--cmdline",
            "prog=memdirty mib=16 pages_per_ms=0",
            "--mem-mib",
            &self.mem.to_string(),
            "--api-sock",
            &socket.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut primary = GuestProcess::spawn(self.vmm, &args);
        primary.wait_line("round 1 ok", WAIT);
        let alone = rounds_per_s(&primary, Duration::from_secs(3));
        let shadow_args: Vec<String> = [
            "shadow",
            "--listen",
            &format!("unix:{}", listen.display()),
            "--dir",
            &dir.join("state").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut shadow = GuestProcess::spawn(self.vmm, &shadow_args);
        while !listen.exists() {
            std::thread::sleep(Duration::from_millis(1));
        }
        call(
            &socket,
            "POST",
            "/replication",
            Some(json!({"target": format!("unix:{}", listen.display()), "epoch_ms": 10})),
        );
        wait_epochs(&socket, 2);
        let replicated = rounds_per_s(&primary, Duration::from_secs(3));
        call(&socket, "POST", "/replication/stop", None);
        let _ = primary.child.kill();
        primary.wait_exit();
        let _ = shadow.child.kill();
        shadow.wait_exit();
        let _ = std::fs::remove_dir_all(&dir);
        100.0 * (1.0 - replicated / alone)
    }

    /// Bytes on the wire per dirtied page while `memdirty` writes 16 bytes into each page it
    /// dirties ([`SPARSE`]), over two seconds of epochs (`epoch_ms` 10) past the first pass.
    fn sparse_bytes_per_page(&self, run: usize) -> f64 {
        let dir = self.work.join(format!("sparse-{}-{run}", self.mem));
        std::fs::create_dir_all(&dir).unwrap();
        let (socket, listen) = (dir.join("primary.sock"), dir.join("shadow-repl.sock"));
        let cmdline = format!("{} {SPARSE}", cmdline(self.mem));
        let args = strings(&[
            "run",
            "--kernel",
            &self.guest.display().to_string(),
            "--cmdline",
            &cmdline,
            "--mem-mib",
            &self.mem.to_string(),
            "--api-sock",
            &socket.display().to_string(),
        ]);
        let mut primary = GuestProcess::spawn(self.vmm, &args);
        primary.wait_line("round 1 ok", WAIT);
        let shadow_args = strings(&[
            "shadow",
            "--listen",
            &format!("unix:{}", listen.display()),
            "--dir",
            &dir.join("state").display().to_string(),
        ]);
        let mut shadow = GuestProcess::spawn(self.vmm, &shadow_args);
        while !listen.exists() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let body = json!({"target": format!("unix:{}", listen.display()), "epoch_ms": 10});
        call(&socket, "POST", "/replication", Some(body));
        let before = wait_epochs(&socket, 2);
        std::thread::sleep(Duration::from_secs(2));
        let after = call(&socket, "GET", "/replication", None)["shadows"][0].clone();
        call(&socket, "POST", "/replication/stop", None);
        let _ = primary.child.kill();
        primary.wait_exit();
        let _ = shadow.child.kill();
        shadow.wait_exit();
        let _ = std::fs::remove_dir_all(&dir);
        let total = |v: &Value, k: &str| v["totals"][k].as_f64().unwrap_or(0.0);
        let pages = total(&after, "pages") - total(&before, "pages");
        (total(&after, "sent_bytes") - total(&before, "sent_bytes")) / pages.max(1.0)
    }

    fn run(&self, runs: usize) -> OurResults {
        let (mut downtime, mut first, mut eps, mut lag, mut slowdown, mut populated) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0.0);
        let bytes_per_page = (0..runs).map(|run| self.sparse_bytes_per_page(run)).collect();
        for run in 0..runs {
            let dir = self.work.join(format!("ours-{}-{run}", self.mem));
            std::fs::create_dir_all(&dir).unwrap();
            let (primary_sock, listen) = (dir.join("primary.sock"), dir.join("shadow-repl.sock"));
            let args: Vec<String> = [
                "run",
                "--kernel",
                &self.guest.display().to_string(),
                "--cmdline",
                &cmdline(self.mem),
                "--mem-mib",
                &self.mem.to_string(),
                "--api-sock",
                &primary_sock.display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let primary = GuestProcess::spawn(self.vmm, &args);
            primary.wait_line("round 1 ok", WAIT);
            let shadow_args: Vec<String> = [
                "shadow",
                "--listen",
                &format!("unix:{}", listen.display()),
                "--dir",
                &dir.join("state").display().to_string(),
                "--serial",
                "none",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut shadow = GuestProcess::spawn(self.vmm, &shadow_args);
            while !listen.exists() {
                if let Ok(Some(status)) = shadow.child.try_wait() {
                    panic!("vmm shadow exited ({status}): {}", shadow.stderr.try_recv().unwrap_or_default());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let started = Instant::now();
            call(
                &primary_sock,
                "POST",
                "/replication",
                Some(json!({"target": format!("unix:{}", listen.display()), "epoch_ms": 10})),
            );
            let status = wait_epochs(&primary_sock, 1);
            first.push(ms(started.elapsed()));
            populated = status["totals"]["raw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20);
            let before = wait_epochs(&primary_sock, 2);
            std::thread::sleep(Duration::from_secs(2));
            let after = call(&primary_sock, "GET", "/replication", None)["shadows"][0].clone();
            let (e0, e1) = (before["epochs"].as_f64().unwrap_or(0.0), after["epochs"].as_f64().unwrap_or(0.0));
            eps.push((e1 - e0) / 2.0);
            lag.push(after["lag_us"].as_f64().unwrap_or(f64::NAN) / 1e3);
            let report = call(&primary_sock, "POST", "/replication/switchover", None);
            downtime.push(report["downtime_us"].as_f64().unwrap_or(f64::NAN) / 1e3);
            call(&primary_sock, "POST", "/replication/commit", None);
            let mut primary = primary;
            primary.wait_exit();
            let _ = shadow.child.kill();
            shadow.wait_exit();
            let _ = std::fs::remove_dir_all(&dir);
        }
        slowdown.push(self.slowdown());
        OurResults {
            downtime_ms: Samples::new(downtime),
            first_pass_ms: Samples::new(first),
            epochs_per_s: Samples::new(eps),
            lag_ms: Samples::new(lag),
            slowdown_pct: Samples::new(slowdown),
            populated_mib: populated,
            bytes_per_page: Samples::new(bytes_per_page),
        }
    }
}

struct PeerResults {
    downtime_ms: Samples,
    total_ms: Samples,
    /// With XBZRLE on: bytes on the wire per page sent, once past the first pass.
    xbzrle_bytes_per_page: Samples,
}

struct Peer<'a> {
    qemu: &'a Path,
    guest: &'a Path,
    work: &'a Path,
    mem: u64,
}

impl Peer<'_> {
    fn start(&self, tag: &str, incoming: bool) -> (GuestProcess, Qmp) {
        self.start_with(tag, incoming, &cmdline(self.mem))
    }

    fn start_with(&self, tag: &str, incoming: bool, cmdline: &str) -> (GuestProcess, Qmp) {
        let sock = self.work.join(format!("qemu-{tag}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut args = qemu_args(self.guest, cmdline, self.mem, 1);
        args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", sock.display())]);
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        let process = GuestProcess::spawn(self.qemu, &args);
        let qmp = Qmp::connect(&sock, WAIT).expect("connect QMP");
        (process, qmp)
    }

    fn run(&self, runs: usize) -> PeerResults {
        let (mut downtime, mut total) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let (mut source, mut src) = self.start("source", false);
            source.wait_line("round 1 ok", WAIT);
            let (mut dest, mut dst) = self.start("dest", true);
            let channel: PathBuf = self.work.join(format!("qemu-migrate-{run}.sock"));
            let uri = format!("unix:{}", channel.display());
            dst.execute("migrate-incoming", json!({ "uri": uri }), WAIT).expect("migrate-incoming");
            // The default cap is 128 MiB/s; lifted, as our replication has none.
            src.execute("migrate-set-parameters", json!({ "max-bandwidth": 100u64 << 30 }), WAIT)
                .expect("max-bandwidth");
            src.execute("migrate", json!({ "uri": uri }), WAIT).expect("migrate");
            let info = loop {
                let info = src.execute("query-migrate", json!({}), WAIT).expect("query-migrate");
                match info["status"].as_str() {
                    Some("completed") => break info,
                    Some("failed") | Some("cancelled") => panic!("QEMU's migration failed: {info}"),
                    _ => std::thread::sleep(Duration::from_micros(500)),
                }
            };
            downtime.push(info["downtime"].as_f64().unwrap_or(f64::NAN));
            total.push(info["total-time"].as_f64().unwrap_or(f64::NAN));
            let _ = source.child.kill();
            source.wait_exit();
            let _ = dest.child.kill();
            dest.wait_exit();
            let _ = std::fs::remove_file(&channel);
        }
        // At 16 MiB/s the first pass of a 1 GiB guest takes half a minute: 128 MiB only.
        let xbzrle = match self.mem <= 128 {
            true => (0..runs).map(|run| self.xbzrle_bytes_per_page(run)).collect(),
            false => vec![],
        };
        PeerResults {
            downtime_ms: Samples::new(downtime),
            total_ms: Samples::new(total),
            xbzrle_bytes_per_page: Samples::new(xbzrle),
        }
    }

    /// Migrates the guest writing 16 bytes into each page it dirties with XBZRLE on (a 64 MiB
    /// cache, as our encoder's), so that it keeps sending dirtied pages; returns the bytes
    /// sent per page once its cache is warm (over two seconds, or until QEMU converges), then
    /// cancels.
    fn xbzrle_bytes_per_page(&self, run: usize) -> f64 {
        let sparse = format!("{} {SPARSE}", cmdline(self.mem));
        let (mut source, mut src) = self.start_with("xbzrle-source", false, &sparse);
        source.wait_line("round 1 ok", WAIT);
        let (mut dest, mut dst) = self.start_with("xbzrle-dest", true, &sparse);
        let channel: PathBuf = self.work.join(format!("qemu-xbzrle-{run}.sock"));
        let uri = format!("unix:{}", channel.display());
        dst.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{"capability": "xbzrle", "state": true}] }),
            WAIT,
        )
        .expect("xbzrle on the destination");
        dst.execute("migrate-incoming", json!({ "uri": uri }), WAIT).expect("migrate-incoming");
        src.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{"capability": "xbzrle", "state": true}] }),
            WAIT,
        )
        .expect("xbzrle");
        // QEMU completes as soon as what is left fits its downtime limit at the bandwidth it
        // measured; capped at 16 MiB/s with a 1 ms limit, it cannot, and keeps iterating.
        let parameters = json!({ "max-bandwidth": 16u64 << 20, "xbzrle-cache-size": 64u64 << 20, "downtime-limit": 1 });
        src.execute("migrate-set-parameters", parameters, WAIT).expect("parameters");
        src.execute("migrate", json!({ "uri": uri }), WAIT).expect("migrate");
        let sample = |src: &mut Qmp| {
            let info = src.execute("query-migrate", json!({}), WAIT).expect("query-migrate");
            let ram = &info["ram"];
            let n = |v: &Value| v.as_f64().unwrap_or(0.0);
            let pages = n(&ram["normal"]) + n(&ram["duplicate"]) + n(&info["xbzrle-cache"]["pages"]);
            (n(&ram["transferred"]), pages, n(&ram["dirty-sync-count"]), info["status"].as_str().map(String::from))
        };
        // From the end of the first pass (the second dirty sync) to two seconds later, or to
        // the end if QEMU converges sooner.
        let deadline = Instant::now() + WAIT;
        let before = loop {
            let now = sample(&mut src);
            assert!(now.3.as_deref() != Some("failed"), "QEMU's XBZRLE migration failed");
            if now.2 >= 2.0 || now.3.as_deref() == Some("completed") {
                break now;
            }
            assert!(Instant::now() < deadline, "QEMU's migration never got past its first pass");
            std::thread::sleep(Duration::from_millis(2));
        };
        // XBZRLE caches a page when it first sends it after the first pass, and encodes it from
        // the next time on: by then every page of the guest's has gone round once (1.3 s).
        let warm = Instant::now() + Duration::from_secs(3);
        let mut before = before;
        while Instant::now() < warm && before.3.as_deref() != Some("completed") {
            std::thread::sleep(Duration::from_millis(20));
            before = sample(&mut src);
        }
        let until = Instant::now() + Duration::from_secs(2);
        let mut after = sample(&mut src);
        while Instant::now() < until && after.3.as_deref() != Some("completed") {
            std::thread::sleep(Duration::from_millis(20));
            after = sample(&mut src);
        }
        let _ = src.execute("migrate_cancel", json!({}), WAIT);
        let _ = source.child.kill();
        source.wait_exit();
        let _ = dest.child.kill();
        dest.wait_exit();
        let _ = std::fs::remove_file(&channel);
        match after.1 > before.1 {
            true => (after.0 - before.0) / (after.1 - before.1),
            false => f64::NAN,
        }
    }
}

/// The codec alone: encode throughput and bytes for three kinds of page changes.
fn codec_table() {
    const PAGES: usize = 64 << 8; // 64 MiB
    const BATCH_PAGES: usize = 4096;
    let mut table = Table::new(&["workload (64 MiB of pages)", "encode GB/s per core", "bytes sent / raw", "how sent"]);
    let noise = |seed: u64, len: usize| {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    let base = noise(1, PAGES * PAGE);
    let mut sparse = base.clone();
    for page in 0..PAGES {
        sparse[page * PAGE + 64..page * PAGE + 80].copy_from_slice(b"sixteen bytes!!!");
    }
    let full = noise(2, PAGES * PAGE);
    let zero = vec![0u8; PAGES * PAGE];
    for (name, previous, now) in [
        ("sparse writes (16 bytes per page) into pages sent before", Some(&base), &sparse),
        ("pages rewritten whole (random bytes)", Some(&base), &full),
        ("zero pages written over pages sent before", Some(&base), &zero),
        ("zero pages never sent", None, &zero),
    ] {
        // Batches of the size the replication sends (4096 pages), as it sends them.
        let encode = |encoder: &mut Encoder, pages: &[u8]| {
            let mut sent = 0;
            let mut stats = vmm::replication::codec::CodecStats::default();
            for (n, page) in pages.chunks(PAGE).enumerate() {
                encoder.page((n * PAGE) as u64, page);
                if (n + 1) % BATCH_PAGES == 0 || (n + 1) * PAGE == pages.len() {
                    let (batch, batch_stats) = encoder.finish();
                    sent += batch.len();
                    stats.add(&batch_stats);
                }
            }
            (sent, stats)
        };
        let mut encoder = Encoder::new(PAGES);
        if let Some(previous) = previous {
            encode(&mut encoder, previous);
        }
        let started = Instant::now();
        let (sent, stats) = encode(&mut encoder, now);
        let seconds = started.elapsed().as_secs_f64();
        table.row(vec![
            name.into(),
            format!("{:.2}", now.len() as f64 / seconds / 1e9),
            format!("{:.4} ({} of {} MiB)", sent as f64 / now.len() as f64, sent >> 20, now.len() >> 20),
            format!("{} zero, {} same, {} delta, {} full", stats.zero, stats.same, stats.delta, stats.full),
        ]);
    }
    table.print();
}
