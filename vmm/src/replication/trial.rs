//! A trial, run by a shadow: the VM as it stood at one moment, cloned and run apart from
//! everything the primary uses, with an update applied and its health checked for a window.
//! Only an update that passed may be applied by a switchover; a trial that fails is
//! discarded, and the primary never notices either way.
//!
//! Apart means: its memory is a copy; each writable disk is a qcow2 copy-on-write overlay of
//! the disk's image (made with `qemu-img`, served by `qemu-nbd`), so its writes never reach
//! the image; each NIC's frames go to a socket nobody reads; the vsock device listens in the
//! trial's own directory. A disk the update moves to another image gets an overlay of that
//! image. The overlays read the images as the primary keeps writing them, so a guest that
//! rereads a block the primary rewrote after the clone sees the newer block: a trial checks
//! that the update works, not that the clone is a perfect fork.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::update::{self, HealthReport, VmUpdate};
use crate::VmBuilder;
use crate::config::{DiskConfig, NbdAddress, SerialConfig, VmConfig};
use crate::memory::RamBacking;
use crate::snapshot::{MemoryMode, VmSnapshot, format};
use crate::swap::VerifyPolicy;

/// What a trial found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrialReport {
    /// Whether the update may be applied: it applied and the VM stayed healthy.
    pub passed: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What each step of the update did.
    pub applied: Vec<String>,
    /// What the health check saw, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// From the clone's arrival to the trial's end, in milliseconds.
    pub took_ms: u64,
    /// The `vmm` build that ran the trial (the shadow's, which a switchover runs too).
    pub build: String,
    /// The last lines the clone wrote to its serial console.
    pub serial_tail: String,
}

/// The `vmm` build running here, as a report names it.
pub fn build_id() -> String {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
    format!("vmm {} ({profile}) {exe}", env!("CARGO_PKG_VERSION"))
}

/// Copies the shadow's memory file into a new trial directory under `shadow_dir`: the clone
/// must not see the epochs that follow.
pub(crate) fn clone_memory(shadow_dir: &Path, id: u64) -> std::io::Result<PathBuf> {
    let dir = shadow_dir.join(format!("trial-{id}"));
    std::fs::create_dir(&dir)?;
    if let Err(e) = std::fs::copy(shadow_dir.join(format::MEMORY_FILE), dir.join(format::MEMORY_FILE)) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// Runs the trial in `dir` (made by [`clone_memory`]) and removes the directory.
pub(crate) fn run(dir: PathBuf, state: VmSnapshot, update: &VmUpdate, health: &VerifyPolicy) -> TrialReport {
    let started = Instant::now();
    let mut apart = Apart { dir, nbd_pids: Vec::new(), sinks: Vec::new() };
    let mut report = TrialReport { build: build_id(), ..TrialReport::default() };
    let outcome = apart.trial(state, update, health, &mut report);
    report.serial_tail = apart.serial_tail();
    report.took_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(()) => report.passed = true,
        Err(reason) => report.reason = Some(reason),
    }
    report
}

/// What keeps a trial apart, undone when it ends.
struct Apart {
    dir: PathBuf,
    nbd_pids: Vec<libc::pid_t>,
    sinks: Vec<UnixDatagram>,
}

impl Drop for Apart {
    fn drop(&mut self) {
        for &pid in &self.nbd_pids {
            // SAFETY: plain syscall; the pid is the qemu-nbd daemon this trial started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Apart {
    fn trial(
        &mut self,
        mut state: VmSnapshot,
        update: &VmUpdate,
        health: &VerifyPolicy,
        report: &mut TrialReport,
    ) -> Result<(), String> {
        self.isolate(&mut state.config)?;
        let update = self.isolate_update(&state.config, update)?;
        format::write_state(&self.dir.join(format::STATE_FILE), &state).map_err(|e| e.to_string())?;
        let vm = VmBuilder::restore(&self.dir, MemoryMode::Mmap)
            .serial(SerialConfig::File(self.dir.join("serial.log")))
            .start()
            .map_err(|e| format!("the clone would not start: {e}"))?;
        let outcome = update::apply(&vm, &update).and_then(|applied| {
            report.applied = applied;
            update::check_health(&vm, health)
        });
        vm.stop();
        report.health = outcome.as_ref().ok().copied();
        outcome.map(|_| ())
    }

    /// Points the clone's devices at things of its own.
    fn isolate(&mut self, config: &mut VmConfig) -> Result<(), String> {
        for (index, disk) in config.disks.iter_mut().enumerate() {
            if !disk.readonly {
                let name = disk.id.clone().unwrap_or_else(|| format!("disk{index}"));
                *disk = DiskConfig { id: disk.id.clone(), ..self.overlay(&name, disk)? };
            }
        }
        for (index, net) in config.nets.iter_mut().enumerate() {
            let name = net.id.clone().unwrap_or_else(|| format!("net{index}"));
            net.tap = None;
            net.unix = Some(self.sink(&name)?);
        }
        if let Some(vsock) = &mut config.vsock {
            vsock.socket = self.dir.join("vsock.sock");
        }
        Ok(())
    }

    /// The update as the clone takes it: the new backends kept apart like the old ones.
    fn isolate_update(&mut self, config: &VmConfig, update: &VmUpdate) -> Result<VmUpdate, String> {
        let mut isolated = update.clone();
        // A RAM backing file of the clone's own, beside its memory.
        if let Some(RamBacking::File { path }) = &mut isolated.ram_backing {
            *path = self.dir.join("ram");
        }
        for (id, body) in &mut isolated.devices {
            let Some(backend) = body.get_mut("backend") else { continue };
            let kind = config_kind(config, id);
            *backend = match kind {
                Some("disk") => {
                    let disk: DiskConfig = serde_json::from_value(backend.clone())
                        .map_err(|e| format!("update.devices.{id}.backend: {e}"))?;
                    let overlay = self.overlay(&format!("{id}-new"), &disk)?;
                    serde_json::to_value(overlay).map_err(|e| e.to_string())?
                }
                Some("net") => serde_json::json!({ "unix": self.sink(&format!("{id}-new"))? }),
                Some("vsock") => serde_json::json!({ "socket": self.dir.join(format!("{id}-new.sock")) }),
                _ => continue,
            };
        }
        Ok(isolated)
    }

    /// A datagram socket that takes a NIC's frames and never answers.
    fn sink(&mut self, name: &str) -> Result<PathBuf, String> {
        let path = self.dir.join(format!("{name}.frames"));
        let sink = UnixDatagram::bind(&path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        self.sinks.push(sink);
        Ok(path)
    }

    /// A copy-on-write overlay of `disk`'s image, served over NBD on a socket in the trial.
    fn overlay(&mut self, name: &str, disk: &DiskConfig) -> Result<DiskConfig, String> {
        let backing = match (&disk.path, &disk.nbd) {
            (Some(path), _) => std::fs::canonicalize(path)
                .map_err(|e| format!("disk {name}: {}: {e}", path.display()))?
                .display()
                .to_string(),
            (None, Some(NbdAddress::Unix { path })) => {
                format!("nbd+unix:///{}?socket={}", disk.export.as_deref().unwrap_or(""), path.display())
            }
            (None, Some(NbdAddress::Tcp { host, port })) => {
                format!("nbd://{host}:{port}/{}", disk.export.as_deref().unwrap_or(""))
            }
            (None, None) => return Err(format!("disk {name} has no image")),
        };
        let image = self.dir.join(format!("{name}.qcow2"));
        let socket = self.dir.join(format!("{name}.nbd"));
        let pid_file = self.dir.join(format!("{name}.pid"));
        let mut create = Command::new("qemu-img");
        create.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&backing).arg(&image);
        run_tool(&mut create, &self.dir.join(format!("{name}.qemu-img.log")))?;
        let mut serve = Command::new("qemu-nbd");
        // --fork returns once the socket accepts; the daemon's pid is in the pid file.
        serve
            // Not persistent: it exits with its last client, so a shadow that dies mid-trial
            // leaves no server behind.
            .args(["--fork", "--shared=8", "--format=qcow2", "--cache=writeback", "--socket"])
            .arg(&socket)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&image);
        run_tool(&mut serve, &self.dir.join(format!("{name}.qemu-nbd.log")))?;
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("qemu-nbd left no pid in {}", pid_file.display()))?;
        self.nbd_pids.push(pid);
        Ok(DiskConfig { nbd: Some(NbdAddress::Unix { path: socket }), readonly: false, ..DiskConfig::default() })
    }

    fn serial_tail(&self) -> String {
        let text = std::fs::read(self.dir.join("serial.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(SERIAL_TAIL_LINES)..].join("\n");
        tail.chars().rev().take(SERIAL_TAIL_CHARS).collect::<Vec<_>>().into_iter().rev().collect()
    }
}

const SERIAL_TAIL_LINES: usize = 10;
const SERIAL_TAIL_CHARS: usize = 2000;

/// "disk", "net" or "vsock": which list of the configuration holds device `id`.
fn config_kind(config: &VmConfig, id: &str) -> Option<&'static str> {
    let ids = config.device_ids();
    let index = ids.iter().position(|d| d == id)?;
    let (disks, nets) = (config.disks.len(), config.nets.len());
    Some(match index {
        i if i < disks => "disk",
        i if i < disks + nets => "net",
        _ => "vsock",
    })
}

/// Runs qemu-img or qemu-nbd, its output to a log in the trial (a forked qemu-nbd keeps
/// whatever it inherited open: a pipe would never reach its end).
fn run_tool(command: &mut Command, log: &Path) -> Result<(), String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = std::fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let status = command.stdin(Stdio::null()).stdout(out).stderr(err).status().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("a trial needs {program} (package qemu-utils) for its copy-on-write disks: not found")
        }
        _ => format!("cannot run {program}: {e}"),
    })?;
    match status.success() {
        true => Ok(()),
        false => {
            let said = std::fs::read_to_string(log).unwrap_or_default();
            Err(format!("{program} failed ({status}): {}", said.trim()))
        }
    }
}
