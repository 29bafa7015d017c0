//! The shadow's side: receive a primary's memory epoch by epoch into a snapshot directory,
//! then, at the switchover, its state, and become the VM (restored from that directory with
//! the memory file mapped, so it runs at once).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::codec::{self, DecodeError, PageStore};
use super::trial::{self, TrialReport};
use super::update::{self, VmUpdate};
use super::wire::{self, Control, Endpoint, Frame, Stream, WireError};
use crate::snapshot::{MemoryMode, VmSnapshot, format};
use crate::swap::VerifyPolicy;
use crate::{BuildError, Vm, VmBuilder};

/// Why a shadow gave up.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The stream failed or carried something no primary sends.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A page batch would not apply.
    #[error("replication stream: {0}")]
    Decode(#[from] DecodeError),
    /// The primary speaks another version of the protocol.
    #[error("the primary speaks replication protocol {0}, this shadow {version}", version = wire::PROTOCOL_VERSION)]
    Version(u32),
    /// The primary sent frames out of order.
    #[error("replication stream: {0}")]
    Protocol(String),
    /// The shadow's directory or memory file failed.
    #[error("shadow directory {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The state could not be written.
    #[error(transparent)]
    Format(#[from] format::FormatError),
    /// The VM could not be started from what arrived.
    #[error("cannot start the VM: {0}")]
    Build(#[from] BuildError),
    /// The VM failed its update or its health check; it was stopped and the primary runs it
    /// again.
    #[error("the VM failed on this shadow and was stopped; the primary runs it again: {0}")]
    Unhealthy(String),
}

/// Guest memory as the shadow holds it: the memory file of a snapshot directory.
struct FileStore {
    file: File,
    size: u64,
    path: PathBuf,
    error: Option<std::io::Error>,
}

impl PageStore for FileStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, at: u64, page: &mut [u8]) {
        if let Err(e) = self.file.read_exact_at(page, at) {
            self.error.get_or_insert(e);
        }
    }

    fn write(&mut self, at: u64, page: &[u8]) {
        if let Err(e) = self.file.write_all_at(page, at) {
            self.error.get_or_insert(e);
        }
    }
}

/// Progress while receiving, for a caller that reports it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShadowProgress {
    /// Epochs applied.
    pub epochs: u64,
    /// Pages applied.
    pub pages: u64,
    /// Bytes received.
    pub bytes: u64,
}

/// A shadow with the primary's whole state in its directory, ready to become the VM.
pub struct Received {
    dir: PathBuf,
    stream: Box<dyn Stream>,
    arrived: Instant,
    update: VmUpdate,
    health: VerifyPolicy,
    /// What was received.
    pub progress: ShadowProgress,
}

/// Waits on `endpoint` for a primary and receives its memory into `dir` (created; it must
/// not exist or be empty) until the switchover's state arrives.
pub fn receive(
    endpoint: &Endpoint,
    dir: &Path,
    mut report: impl FnMut(&ShadowProgress),
) -> Result<Received, ShadowError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShadowError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        let source = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "not empty");
        return Err(ShadowError::Io { path: dir.to_path_buf(), source });
    }
    let mut stream =
        endpoint.accept_one().map_err(|source| ShadowError::Io { path: endpoint.to_string().into(), source })?;
    let memory_bytes = match wire::read_frame(&mut stream)? {
        Frame::Control(Control::Hello { version, memory_bytes, idle_ms })
            if version == wire::PROTOCOL_VERSION
                && memory_bytes.is_multiple_of(codec::PAGE as u64)
                && memory_bytes <= MAX_MEMORY =>
        {
            // A primary gone quiet (a cut link sends no reset) must not hold the shadow.
            let idle = Duration::from_millis(idle_ms.clamp(MIN_IDLE_MS, MAX_IDLE_MS));
            stream.set_read_timeout(Some(idle)).map_err(WireError::from)?;
            memory_bytes
        }
        Frame::Control(Control::Hello { version, memory_bytes, .. }) if version == wire::PROTOCOL_VERSION => {
            return Err(ShadowError::Protocol(format!("guest memory of {memory_bytes} bytes")));
        }
        Frame::Control(Control::Hello { version, .. }) => return Err(ShadowError::Version(version)),
        other => return Err(ShadowError::Protocol(format!("expected the primary's hello, got {other:?}"))),
    };
    let path = dir.join(format::MEMORY_FILE);
    let file = File::options().read(true).write(true).create_new(true).open(&path).map_err(io(&path))?;
    file.set_len(memory_bytes).map_err(io(&path))?;
    let mut store = FileStore { file, size: memory_bytes, path, error: None };
    let mut progress = ShadowProgress::default();
    let (verdicts, finished) = std::sync::mpsc::channel::<(u64, TrialReport)>();
    loop {
        match wire::read_frame(&mut stream)? {
            Frame::Pages { batch, .. } => {
                progress.bytes += batch.len() as u64;
                progress.pages += codec::apply(&batch, &mut store)?;
                if let Some(source) = store.error.take() {
                    return Err(ShadowError::Io { path: store.path, source });
                }
            }
            Frame::Control(Control::EpochEnd { epoch, .. }) => {
                progress.epochs = epoch + 1;
                // Trials that ended go back first: the primary reads verdicts while it waits
                // for an ack.
                for (id, report) in finished.try_iter() {
                    wire::write_frame(&mut stream, &Frame::Control(Control::Validated { id, report }))?;
                }
                wire::write_frame(&mut stream, &Frame::Control(Control::Ack { epoch }))?;
                report(&progress);
            }
            Frame::Control(Control::Validate { id, state, update, health }) => {
                check_layout(&state, memory_bytes)?;
                start_trial(dir, id, *state, update, health, verdicts.clone());
            }
            Frame::Control(Control::Switchover { state, update, health }) => {
                let arrived = Instant::now();
                check_layout(&state, memory_bytes)?;
                format::write_state(&dir.join(format::STATE_FILE), &*state)?;
                return Ok(Received { dir: dir.to_path_buf(), stream, arrived, progress, update, health });
            }
            other => return Err(ShadowError::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

/// Clones the memory as it stands (the next epoch would change it) and runs the trial on a
/// thread of its own; its verdict goes to `verdicts`.
fn start_trial(
    dir: &Path,
    id: u64,
    state: VmSnapshot,
    update: VmUpdate,
    health: VerifyPolicy,
    verdicts: std::sync::mpsc::Sender<(u64, TrialReport)>,
) {
    let failed = |reason: String| TrialReport { reason: Some(reason), build: trial::build_id(), ..Default::default() };
    let trial_dir = match trial::clone_memory(dir, id) {
        Ok(trial_dir) => trial_dir,
        Err(e) => {
            let _ = verdicts.send((id, failed(format!("cannot clone the memory: {e}"))));
            return;
        }
    };
    log::info!("shadow: trial {id} of {update:?} starts");
    let spawned = std::thread::Builder::new().name(format!("trial-{id}")).spawn({
        let verdicts = verdicts.clone();
        move || {
            let report = trial::run(trial_dir, state, &update, &health);
            log::info!("shadow: trial {id} ended, passed: {}", report.passed);
            let _ = verdicts.send((id, report));
        }
    });
    if let Err(e) = spawned {
        let _ = verdicts.send((id, failed(format!("cannot start the trial's thread: {e}"))));
    }
}

/// Bounds on how long a shadow waits for its primary's next frame, whatever the primary asks.
const MIN_IDLE_MS: u64 = 1000;
const MAX_IDLE_MS: u64 = 3_600_000;

/// The most guest memory a shadow takes (the VMM's own limit on `mem_mib` is lower).
const MAX_MEMORY: u64 = 1 << 40;

fn check_layout(snapshot: &VmSnapshot, memory_bytes: u64) -> Result<(), ShadowError> {
    // A switchover's state is a full snapshot of what this stream carried, nothing else.
    if snapshot.kind != crate::snapshot::SnapshotKind::Full || snapshot.parent.is_some() {
        return Err(ShadowError::Protocol("the switchover's state is not a full snapshot".into()));
    }
    let ends: Option<Vec<u64>> = snapshot.regions.iter().map(|r| r.file_offset.checked_add(r.size)).collect();
    let end = ends.and_then(|ends| ends.into_iter().max()).unwrap_or(u64::MAX);
    match end == memory_bytes {
        true => Ok(()),
        false => Err(ShadowError::Protocol(format!("the state lays out {end} bytes of RAM, the hello {memory_bytes}"))),
    }
}

/// A shadow that has become the VM.
pub struct Activated {
    /// The VM, running.
    pub vm: Arc<Vm>,
    /// Microseconds from the state's arrival to the VM running.
    pub restore_us: u64,
    /// What each step of the update did.
    pub applied: Vec<String>,
    rolled_back: Arc<AtomicBool>,
    link: Option<std::thread::JoinHandle<()>>,
}

impl Activated {
    /// Whether the primary took the VM back (the VM here was stopped for it). Call once the
    /// VM has ended: on a rollback it waits until the primary has been told.
    pub fn rolled_back(&mut self) -> bool {
        let rolled_back = self.rolled_back.load(Ordering::SeqCst);
        if rolled_back && let Some(link) = self.link.take() {
            let _ = link.join();
        }
        rolled_back
    }
}

impl Received {
    /// Starts the VM from what arrived, tells the primary, applies the update the primary
    /// sent (a validated one, or none) and checks the VM's health; from then on it obeys the
    /// primary's last word: a commit leaves the VM here, a rollback stops it. If the VM cannot
    /// start, or fails the update or the health check (it is stopped then), the primary is
    /// told (it runs on) and the error returned.
    /// `configure` may set the restored VM's serial console ([`VmBuilder::serial`],
    /// [`VmBuilder::serial_output`]); the rest comes from the primary.
    pub fn activate(self, configure: impl FnOnce(VmBuilder) -> VmBuilder) -> Result<Activated, ShadowError> {
        let Received { dir, mut stream, arrived, update, health, .. } = self;
        // Until the commit, what the VM overwrites on its disks is saved: a rollback hands
        // the primary its disks as they were when it froze.
        let builder = VmBuilder::restore(&dir, MemoryMode::Mmap).log_disk_overwrites(&dir);
        let vm = match configure(builder).start() {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                let failed = Control::Failed { reason: e.to_string() };
                let _ = wire::write_frame(&mut stream, &Frame::Control(failed));
                return Err(e.into());
            }
        };
        let restore_us = arrived.elapsed().as_micros() as u64;
        let activated = Control::Activated { restore_us, build: trial::build_id() };
        wire::write_frame(&mut stream, &Frame::Control(activated))?;
        let verdict = update::apply(&vm, &update)
            .and_then(|applied| update::check_health(&vm, &health).map(|health| (applied, health)));
        let (applied, health) = match verdict {
            Ok(verdict) => verdict,
            Err(reason) => {
                // Stopped, and its disk writes undone, before the primary hears: never two
                // copies running, and the primary finds its disks as it left them.
                let answer = match vm.undo_disk_writes() {
                    Ok(undone) => {
                        log::info!("shadow: disk writes undone: {undone:?}");
                        Control::Failed { reason: reason.clone() }
                    }
                    Err(e) => Control::UndoFailed { reason: format!("{reason}; then {e}") },
                };
                wire::write_frame(&mut stream, &Frame::Control(answer))?;
                return Err(ShadowError::Unhealthy(reason));
            }
        };
        let healthy = Control::Healthy { applied: applied.clone(), health };
        wire::write_frame(&mut stream, &Frame::Control(healthy))?;
        let rolled_back = Arc::new(AtomicBool::new(false));
        let (watched, flag) = (Arc::downgrade(&vm), rolled_back.clone());
        let link = std::thread::Builder::new()
            .name("shadow-link".into())
            .spawn(move || {
                // Only the primary's last word matters; a link that goes quiet leaves the VM here.
                let _ = stream.set_read_timeout(None);
                match wire::read_frame(&mut stream) {
                    Ok(Frame::Control(Control::Rollback)) => {
                        flag.store(true, Ordering::SeqCst);
                        let undone = match watched.upgrade() {
                            Some(vm) => vm.undo_disk_writes(),
                            None => Ok(vec![]),
                        };
                        let answer = match undone {
                            Ok(undone) => {
                                log::info!("shadow: rolled back; disk writes undone: {undone:?}");
                                Control::RolledBack
                            }
                            Err(reason) => Control::UndoFailed { reason },
                        };
                        let _ = wire::write_frame(&mut stream, &Frame::Control(answer));
                    }
                    last_word => {
                        match last_word {
                            Ok(Frame::Control(Control::Commit)) => log::info!("the primary committed the switchover"),
                            Ok(other) => log::warn!("after the switchover the primary sent {other:?}"),
                            Err(e) => log::info!("the primary's link ended after the switchover: {e}"),
                        }
                        // The VM stays here: its disk writes are for good, and its images are its
                        // own (the primary lets go of them as it exits).
                        if let Some(vm) = watched.upgrade() {
                            vm.keep_disk_writes();
                            let unlocked = vm.lock_disks(Duration::from_secs(10));
                            if !unlocked.is_empty() {
                                log::warn!("shadow: could not lock {unlocked:?} after the commit");
                            }
                        }
                    }
                }
            })
            .map_err(|source| ShadowError::Io { path: dir.clone(), source })?;
        Ok(Activated { vm, restore_us, applied, rolled_back, link: Some(link) })
    }
}
