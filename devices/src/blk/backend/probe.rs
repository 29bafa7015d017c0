//! A health probe for a backend before it is put in charge of a disk: read its first and
//! last sectors through the engine itself. A backend that is dead (every request fails) or
//! hung is refused this way before the disk stops for a swap, instead of rolled back after.

use std::io;
use std::time::{Duration, Instant};

use super::{BlockBackend, BlockOp, Completion, IoBuf};

const SECTOR: u64 = 512;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A probe read completed with an error.
    #[error("probe read at byte {offset} failed: {source}")]
    Failed {
        /// Byte offset of the read that failed.
        offset: u64,
        /// The error it completed with.
        source: io::Error,
    },
    /// The reads did not all complete within the timeout (the value).
    #[error("probe reads did not complete within {0:?}")]
    TimedOut(Duration),
    /// The backend refused to take or start the reads.
    #[error("probe reads could not be submitted: {0}")]
    Submit(#[source] io::Error),
}

/// Reads the first and the last sector of `backend` (which must have nothing in flight, and
/// tokens of its own: it is not serving a disk yet), waiting up to `timeout`.
pub fn probe(backend: &mut dyn BlockBackend, timeout: Duration) -> Result<(), ProbeError> {
    let capacity = backend.info().capacity;
    let mut offsets = vec![0];
    if capacity >= 2 * SECTOR {
        offsets.push((capacity / SECTOR - 1) * SECTOR);
    }
    let mut buffers: Vec<Vec<u8>> = offsets.iter().map(|_| vec![0u8; SECTOR as usize]).collect();
    // On a failure with reads submitted, the buffers must outlive what the engine may still
    // carry out (two sectors, only on that failure path).
    let abandon = |buffers: Vec<Vec<u8>>, e| {
        buffers.into_iter().for_each(std::mem::forget);
        e
    };
    for (token, offset) in offsets.iter().enumerate() {
        let buf = &mut buffers[token];
        let bufs = vec![IoBuf { addr: buf.as_mut_ptr(), len: buf.len() }];
        if let Err(e) = backend.submit(token as u64, BlockOp::Read { offset: *offset, bufs }) {
            return Err(abandon(buffers, ProbeError::Submit(e)));
        }
    }
    if let Err(e) = backend.flush() {
        return Err(abandon(buffers, ProbeError::Submit(e)));
    }
    let deadline = Instant::now() + timeout;
    let mut done: Vec<Completion> = Vec::new();
    while done.len() < offsets.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(abandon(buffers, ProbeError::TimedOut(timeout)));
        }
        match backend.completion_fd() {
            Some(fd) => {
                let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                let ms = left.as_millis().clamp(1, 10) as libc::c_int;
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            None => std::thread::sleep(Duration::from_micros(100).min(left)),
        }
        backend.poll_completions(&mut done);
    }
    for (token, result) in done {
        if let Err(source) = result {
            let offset = offsets.get(token as usize).copied().unwrap_or_default();
            return Err(ProbeError::Failed { offset, source });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::{Fault, FaultyBackend, FileBackend, UringBackend};

    #[test]
    fn healthy_backends_pass_and_failing_ones_do_not() {
        let path = std::env::temp_dir().join(format!("blk-probe-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let file = || Box::new(FileBackend::open(&path, false).unwrap());
        probe(&mut *file(), Duration::from_secs(10)).unwrap();
        probe(&mut UringBackend::open(&path, true).unwrap(), Duration::from_secs(10)).unwrap();
        let mut dead = FaultyBackend::new(file(), Fault::Error).unwrap();
        assert!(matches!(probe(&mut dead, Duration::from_secs(10)), Err(ProbeError::Failed { offset: 0, .. })));
        let mut hung = FaultyBackend::new(file(), Fault::Stall).unwrap();
        let e = probe(&mut hung, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e, ProbeError::TimedOut(_)), "{e}");
        // Serving the probe counts toward a fault's good requests.
        probe(&mut FaultyBackend::new(file(), Fault::ErrorAfter(2)).unwrap(), Duration::from_secs(10)).unwrap();
        std::fs::remove_file(path).unwrap();
    }
}
