//! An undo log for a disk image: before a block is first overwritten, its old contents are
//! appended to a log file, so that every write since the log started can be taken back.
//!
//! A shadow VMM that takes over a VM runs it on the primary's own image, and the primary
//! stays frozen, ready to run on, until the switchover is committed. A rollback must hand
//! the primary the image exactly as it froze: the guest in its memory knows what it wrote and
//! nothing more. So the shadow's disks log what they overwrite until the commit (which
//! drops the log) or the rollback (which writes every saved block back, with the VM
//! stopped). Only the first write to a block costs a read; the log grows with the blocks the
//! guest touched, not with its writes.
//!
//! The log sits in the device, in front of whichever backend serves the disk, so a backend
//! swapped in meanwhile is covered too, as long as it serves the same image.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Granularity of the log: a block is saved whole the first time any of it is written.
pub const UNDO_BLOCK: u64 = 4096;

/// A shared handle on a disk's undo log.
#[derive(Clone)]
pub struct UndoLog(Arc<Mutex<State>>);

struct State {
    image: File,
    capacity: u64,
    log: File,
    log_path: PathBuf,
    /// Blocks saved so far, and where each sits in the log.
    saved: HashSet<u64>,
    entries: Vec<(u64, u64)>,
    log_len: u64,
    /// False once committed or rolled back: writes pass untouched.
    armed: bool,
}

/// What a rollback wrote back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Undone {
    /// Blocks restored.
    pub blocks: u64,
    /// Bytes restored.
    pub bytes: u64,
}

impl UndoLog {
    /// Starts logging what is overwritten in `image` (opened here, for reading the old
    /// contents and writing them back) into a new file `log`.
    pub fn start(image: &Path, log: &Path) -> io::Result<Self> {
        let with_path = |what: &Path| {
            let what = what.display().to_string();
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let image_file = File::options().read(true).write(true).open(image).map_err(with_path(image))?;
        let capacity = image_file.metadata().map_err(with_path(image))?.len();
        let log_file = File::options().read(true).write(true).create_new(true).open(log).map_err(with_path(log))?;
        Ok(Self(Arc::new(Mutex::new(State {
            image: image_file,
            capacity,
            log: log_file,
            log_path: log.to_path_buf(),
            saved: HashSet::new(),
            entries: Vec::new(),
            log_len: 0,
            armed: true,
        }))))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves the blocks `len` bytes from `offset` cover, those not saved yet; call before the
    /// write starts. An error means the write must not happen: it could not be undone.
    pub fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.lock();
        if !state.armed || len == 0 {
            return Ok(());
        }
        let first = offset / UNDO_BLOCK;
        let last = offset.saturating_add(len - 1).min(state.capacity.saturating_sub(1)) / UNDO_BLOCK;
        let mut block = vec![0u8; UNDO_BLOCK as usize];
        for index in first..=last {
            if state.saved.contains(&index) {
                continue;
            }
            let at = index * UNDO_BLOCK;
            let size = UNDO_BLOCK.min(state.capacity.saturating_sub(at)) as usize;
            if size == 0 {
                break;
            }
            state.image.read_exact_at(&mut block[..size], at)?;
            let log_at = state.log_len;
            state.log.write_all_at(&block[..size], log_at)?;
            state.log_len += size as u64;
            state.entries.push((at, log_at));
            state.saved.insert(index);
        }
        Ok(())
    }

    /// Blocks saved so far.
    pub fn blocks(&self) -> u64 {
        self.lock().entries.len() as u64
    }

    /// Writes every saved block back into the image and makes it durable; the disk must take
    /// no more requests (the VM stopped). Then the log is dropped.
    pub fn roll_back(&self) -> io::Result<Undone> {
        let mut state = self.lock();
        if !state.armed {
            return Ok(Undone::default());
        }
        let mut undone = Undone::default();
        let mut block = vec![0u8; UNDO_BLOCK as usize];
        for &(at, log_at) in &state.entries {
            let size = UNDO_BLOCK.min(state.capacity - at) as usize;
            state.log.read_exact_at(&mut block[..size], log_at)?;
            state.image.write_all_at(&block[..size], at)?;
            undone.blocks += 1;
            undone.bytes += size as u64;
        }
        state.image.sync_data()?;
        state.finish();
        Ok(undone)
    }

    /// Keeps every write: the log is dropped and later writes pass untouched.
    pub fn commit(&self) {
        self.lock().finish();
    }
}

impl State {
    fn finish(&mut self) {
        self.armed = false;
        self.saved = HashSet::new();
        self.entries = Vec::new();
        let _ = self.log.set_len(0);
        let _ = self.log.flush();
        let _ = std::fs::remove_file(&self.log_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("undo-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_rollback_restores_every_block_written_since_the_start() {
        let dir = temp("rollback");
        let image = dir.join("disk.img");
        // Not a multiple of the block: the last block is partial.
        let original: Vec<u8> = (0..3 * UNDO_BLOCK + 1024).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &original).unwrap();
        let log = UndoLog::start(&image, &dir.join("undo")).unwrap();
        let file = File::options().write(true).open(&image).unwrap();
        for (offset, len) in [(100, 10), (UNDO_BLOCK - 1, 2), (3 * UNDO_BLOCK, 1024), (150, 4000)] {
            log.before_write(offset, len).unwrap();
            file.write_all_at(&vec![0xee; len as usize], offset).unwrap();
        }
        assert_eq!(log.blocks(), 3, "blocks 0, 1 and 3, each saved once");
        let undone = log.roll_back().unwrap();
        assert_eq!(undone, Undone { blocks: 3, bytes: 2 * UNDO_BLOCK + 1024 });
        assert_eq!(std::fs::read(&image).unwrap(), original);
        assert!(!dir.join("undo").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn after_a_commit_writes_stay_and_nothing_is_saved() {
        let dir = temp("commit");
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![1u8; 2 * UNDO_BLOCK as usize]).unwrap();
        let log = UndoLog::start(&image, &dir.join("undo")).unwrap();
        log.before_write(0, 1).unwrap();
        log.commit();
        log.before_write(UNDO_BLOCK, 1).unwrap();
        assert_eq!(log.blocks(), 0);
        assert_eq!(log.roll_back().unwrap(), Undone::default());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
