//! Disk image locks: a read-write image is locked exclusively, a read-only one shared, so a
//! second `vmm` (or anything else that takes `flock` locks) cannot open an image this one
//! writes. The locks are `flock` locks on a descriptor of their own, held in a per-process
//! registry: the same image opened again by this process (a swap to another engine on the same
//! file) shares the lock instead of conflicting with itself, and the lock goes when the last
//! backend using the image does.
//!
//! A shadow VMM (`vmm shadow`) turns locking off for its whole process ([`set_enabled`]): the
//! primary holds the images until the switchover commits, and the replication protocol is what
//! keeps the two from writing at once.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::{BackendError, BlockBackend, BlockInfo, BlockOp, Completion};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns image locking on or off for this process (on by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

struct Held {
    file: File,
    exclusive: Mutex<bool>,
}

type Registry = Mutex<HashMap<(u64, u64), Weak<Held>>>;

fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// A lock on one image, released when the last holder drops it.
#[derive(Clone)]
pub struct ImageLock {
    held: Option<Arc<Held>>,
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        // The last holder closes the lock's descriptor under the registry's mutex: a new
        // holder (a swap to another engine on the same image) either shares the lock or takes
        // it after it is gone, never while it is being let go.
        let _registry = registry().lock().unwrap_or_else(|p| p.into_inner());
        drop(self.held.take());
    }
}

/// Locks the image at `path`: exclusively unless `read_only`. Fails at once (never waits)
/// when another process holds a conflicting lock.
pub fn lock_image(path: &Path, read_only: bool) -> Result<ImageLock, BackendError> {
    if !ENABLED.load(Ordering::Relaxed) {
        return Ok(ImageLock { held: None });
    }
    let open_err = |source| BackendError::Open { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(open_err)?;
    let key = (meta.dev(), meta.ino());
    let mut held = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = held.get(&key).and_then(Weak::upgrade) {
        let mut exclusive = existing.exclusive.lock().unwrap_or_else(|p| p.into_inner());
        if !read_only && !*exclusive {
            // Upgraded in place: flock converts the lock of this open file description, but a
            // conversion that fails has dropped the old lock; it is taken again.
            if let Err(e) = flock(&existing.file, true) {
                if let Err(again) = flock(&existing.file, false) {
                    log::error!("disk image {}: its shared lock could not be taken again: {again}", path.display());
                }
                return Err(locked(path, e));
            }
            *exclusive = true;
        }
        drop(exclusive);
        return Ok(ImageLock { held: Some(existing) });
    }
    let file = File::open(path).map_err(open_err)?;
    flock(&file, !read_only).map_err(|e| locked(path, e))?;
    let entry = Arc::new(Held { file, exclusive: Mutex::new(!read_only) });
    held.retain(|_, weak| weak.strong_count() > 0);
    held.insert(key, Arc::downgrade(&entry));
    Ok(ImageLock { held: Some(entry) })
}

fn flock(file: &File, exclusive: bool) -> io::Result<()> {
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn locked(path: &Path, e: io::Error) -> BackendError {
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => BackendError::Locked { path: PathBuf::from(path) },
        _ => BackendError::Open { path: path.to_path_buf(), source: e },
    }
}

/// A backend that holds its image's lock for as long as it lives.
pub struct LockedBackend {
    backend: Box<dyn BlockBackend>,
    _lock: ImageLock,
}

impl LockedBackend {
    /// `backend`, keeping `lock` until dropped.
    pub fn new(backend: Box<dyn BlockBackend>, lock: ImageLock) -> Self {
        Self { backend, _lock: lock }
    }
}

impl BlockBackend for LockedBackend {
    fn info(&self) -> &BlockInfo {
        self.backend.info()
    }
    fn submit(&mut self, token: u64, op: BlockOp) -> io::Result<()> {
        self.backend.submit(token, op)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.backend.flush()
    }
    fn can_submit(&self) -> bool {
        self.backend.can_submit()
    }
    fn poll_completions(&mut self, out: &mut Vec<Completion>) {
        self.backend.poll_completions(out)
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.backend.completion_fd()
    }
    fn in_flight(&self) -> usize {
        self.backend.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(tag: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("lock-{tag}-{}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        path
    }

    /// Whether another open file description (another process, as far as flock is concerned)
    /// can take the lock.
    fn others_can_lock(path: &Path, exclusive: bool) -> bool {
        flock(&File::open(path).unwrap(), exclusive).is_ok()
    }

    #[test]
    fn a_writer_excludes_everyone_else_and_shares_with_itself() {
        let path = image("writer");
        let first = lock_image(&path, false).unwrap();
        assert!(!others_can_lock(&path, false), "another reader is refused");
        // The same process opening the image again (a swap to another engine) shares it.
        let second = lock_image(&path, false).unwrap();
        drop(first);
        assert!(!others_can_lock(&path, true), "held while one holder remains");
        drop(second);
        assert!(others_can_lock(&path, true), "released with the last holder");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn readers_share_and_a_locked_image_is_named() {
        let path = image("reader");
        let reader = lock_image(&path, true).unwrap();
        assert!(others_can_lock(&path, false), "readers share");
        assert!(!others_can_lock(&path, true), "a writer elsewhere is refused");
        drop(reader);
        // Held elsewhere: this process is refused by name.
        let elsewhere = File::open(&path).unwrap();
        flock(&elsewhere, true).unwrap();
        let err = lock_image(&path, false).err().expect("refused").to_string();
        assert!(err.contains("in use"), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
