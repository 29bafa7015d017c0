//! The VM's configuration kept on disk as it stands: written at start and after every
//! committed swap, atomically, so that a VMM killed at any moment is restarted
//! (`vmm run --resume-state FILE`) on the images its devices use now, not the ones it
//! started with.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::Vm;
use crate::config::VmConfig;

impl Vm {
    /// The configuration that rebuilds this VM as it is now: each device with the backend it
    /// uses after the swaps committed so far.
    pub fn current_config(&self) -> VmConfig {
        self.config.clone().with_devices(self.devices().devices().iter().map(|e| e.handle.current_config()))
    }

    /// Writes [`current_config`](Self::current_config) to `path` now and after every swap that
    /// commits; a failed write is logged (the swap itself stands).
    pub fn keep_config_in(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        write_atomically(path, &self.current_config())?;
        let (vm, path): (Weak<Vm>, PathBuf) = (Arc::downgrade(self), path.to_path_buf());
        // Swaps of two devices may commit at once: each reads and writes the whole
        // configuration under this lock, so the last write holds both.
        let writing = Mutex::new(());
        self.swaps.on_every_commit(Arc::new(move || {
            let _one_at_a_time = writing.lock().unwrap_or_else(|p| p.into_inner());
            let Some(vm) = vm.upgrade() else { return Ok(()) };
            write_atomically(&path, &vm.current_config()).map_err(|e| {
                log::error!("cannot record the VM's configuration in {}: {e}", path.display());
                format!("recording the configuration in {} failed: {e}", path.display())
            })
        }));
        Ok(())
    }
}

/// Replaces `path` with `config`, durably: a new file beside it, synced, renamed over it, and
/// the directory synced, so a crash leaves the old file or the new one, never a mix.
fn write_atomically(path: &Path, config: &VmConfig) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| std::io::Error::other("a state file needs a file name"))?;
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let staging = dir.join(format!(".{}.{}.{n}.new", name.to_string_lossy(), std::process::id()));
    let text = serde_json::to_vec_pretty(config).map_err(std::io::Error::other)?;
    let result = (|| {
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&staging)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&staging, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    result
}
