//! The shadow's side: receive a primary's memory epoch by epoch into a snapshot directory,
//! then, at the switchover, its state, and become the VM (restored from that directory with
//! the memory file mapped, so it runs at once).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::codec::{self, DecodeError, PageStore};
use super::wire::{self, Control, Endpoint, Frame, Stream, WireError};
use crate::snapshot::{MemoryMode, VmSnapshot, format};
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
        Frame::Control(Control::Hello { version, memory_bytes })
            if version == wire::PROTOCOL_VERSION
                && memory_bytes.is_multiple_of(codec::PAGE as u64)
                && memory_bytes <= MAX_MEMORY =>
        {
            memory_bytes
        }
        Frame::Control(Control::Hello { version, memory_bytes }) if version == wire::PROTOCOL_VERSION => {
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
                wire::write_frame(&mut stream, &Frame::Control(Control::Ack { epoch }))?;
                report(&progress);
            }
            Frame::Control(Control::Switchover(snapshot)) => {
                let arrived = Instant::now();
                check_layout(&snapshot, memory_bytes)?;
                format::write_state(&dir.join(format::STATE_FILE), &*snapshot)?;
                return Ok(Received { dir: dir.to_path_buf(), stream, arrived, progress });
            }
            other => return Err(ShadowError::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

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
    /// Starts the VM from what arrived, tells the primary, and from then on obeys its last
    /// word: a commit leaves the VM here, a rollback stops it. If the VM cannot start, the
    /// primary is told (it runs on) and the error returned.
    /// `configure` may set the restored VM's serial console ([`VmBuilder::serial`],
    /// [`VmBuilder::serial_output`]); the rest comes from the primary.
    pub fn activate(self, configure: impl FnOnce(VmBuilder) -> VmBuilder) -> Result<Activated, ShadowError> {
        let Received { dir, mut stream, arrived, .. } = self;
        let vm = match configure(VmBuilder::restore(&dir, MemoryMode::Mmap)).start() {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                let failed = Control::Failed { reason: e.to_string() };
                let _ = wire::write_frame(&mut stream, &Frame::Control(failed));
                return Err(e.into());
            }
        };
        let restore_us = arrived.elapsed().as_micros() as u64;
        wire::write_frame(&mut stream, &Frame::Control(Control::Activated { restore_us }))?;
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
                        if let Some(vm) = watched.upgrade() {
                            vm.stop();
                        }
                        let _ = wire::write_frame(&mut stream, &Frame::Control(Control::RolledBack));
                    }
                    Ok(Frame::Control(Control::Commit)) => log::info!("the primary committed the switchover"),
                    Ok(other) => log::warn!("after the switchover the primary sent {other:?}"),
                    Err(e) => log::info!("the primary's link ended after the switchover: {e}"),
                }
            })
            .map_err(|source| ShadowError::Io { path: dir.clone(), source })?;
        Ok(Activated { vm, restore_us, rolled_back, link: Some(link) })
    }
}
