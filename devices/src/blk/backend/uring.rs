//! The io_uring engine: requests complete asynchronously and out of order; the ring's eventfd
//! tells the event loop when to reap them.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use io_uring::{IoUring, opcode, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::file::open_image;
use super::{BackendError, BlockBackend, BlockInfo, BlockOp, Completion, ImageId, IoBuf, total_len};

/// Submission queue entries: also the most requests in flight.
const RING_DEPTH: u32 = 128;

struct Pending {
    /// Must stay at a fixed address until the kernel is done with it.
    iovecs: Box<[libc::iovec]>,
    expected: u64,
    /// Where the transfer starts in the image, and how much of it is done (a short read or
    /// write is continued from there).
    offset: u64,
    done: u64,
    /// Bytes of the original buffers before `iovecs` (once a short transfer is continued).
    skipped: u64,
    is_read: bool,
}

// SAFETY: the iovecs point into guest memory (see IoBuf), which may be accessed from any thread.
unsafe impl Send for Pending {}

/// A disk image file or block device served through io_uring, up to 128 requests in flight.
pub struct UringBackend {
    file: File,
    ring: IoUring,
    eventfd: EventFd,
    info: BlockInfo,
    pending: HashMap<u64, Pending>,
}

impl UringBackend {
    /// Opens the image at `path` (read-write unless `read_only`) and sets up a ring for it; the
    /// image's size must be a multiple of 512 bytes.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BackendError> {
        let (file, capacity) = open_image(path, read_only)?;
        let ring = IoUring::new(RING_DEPTH).map_err(BackendError::Uring)?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(BackendError::Uring)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd()).map_err(BackendError::Uring)?;
        let info = BlockInfo {
            capacity,
            read_only,
            discard: true,
            write_zeroes: true,
            description: format!("io_uring file {}", path.display()),
            image: ImageId::of(&file),
        };
        Ok(Self { file, ring, eventfd, info, pending: HashMap::new() })
    }

    fn push(&mut self, token: u64, entry: io_uring::squeue::Entry, pending: Pending) -> io::Result<()> {
        // SAFETY: every buffer the entry references (the boxed iovec array, and the guest
        // memory it points at) stays valid until its completion is reaped: the iovecs live in
        // `self.pending` and the device keeps the guest mapping alive for in-flight requests.
        let pushed = unsafe { self.ring.submission().push(&entry.user_data(token)) };
        if pushed.is_err() {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "io_uring submission queue full"));
        }
        self.pending.insert(token, pending);
        Ok(())
    }

    /// Resubmits what a short read or write left, from where it stopped.
    fn continue_transfer(&mut self, token: u64, mut p: Pending) -> io::Result<()> {
        p.iovecs = remaining(&p.iovecs, p.done - p.skipped);
        p.skipped = p.done;
        let fd = types::Fd(self.file.as_raw_fd());
        let (iov, n, at) = (p.iovecs.as_ptr(), p.iovecs.len() as u32, p.offset + p.done);
        let entry = match p.is_read {
            true => opcode::Readv::new(fd, iov, n).offset(at).build(),
            false => opcode::Writev::new(fd, iov, n).offset(at).build(),
        };
        self.push(token, entry, p)
    }
}

/// The part of `iovecs` after its first `skip` bytes.
fn remaining(iovecs: &[libc::iovec], mut skip: u64) -> Box<[libc::iovec]> {
    let mut rest = Vec::with_capacity(iovecs.len());
    for iov in iovecs {
        let len = iov.iov_len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        // SAFETY: `skip` < the iovec's length, so the pointer stays within its buffer.
        let base = unsafe { iov.iov_base.cast::<u8>().add(skip as usize) };
        rest.push(libc::iovec { iov_base: base.cast(), iov_len: (len - skip) as usize });
        skip = 0;
    }
    rest.into_boxed_slice()
}

impl Drop for UringBackend {
    /// The kernel may still be using guest buffers for requests in flight (a backend dropped
    /// after a rollback abandoned its requests): give them a bounded time to finish before the
    /// ring goes. Closing the ring cancels what is left.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + DROP_GRACE;
        while !self.pending.is_empty() && std::time::Instant::now() < deadline {
            let _ = self.ring.submit();
            let finished: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for token in finished {
                self.pending.remove(&token);
            }
            if !self.pending.is_empty() {
                let mut pfd = libc::pollfd { fd: self.eventfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 10) };
                let _ = self.eventfd.read();
            }
        }
    }
}

/// How long a dropped backend waits for its requests in flight.
const DROP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Zeroes everything after the first `filled` bytes of `iovecs` (a short read hit end of file).
fn zero_tail(iovecs: &[libc::iovec], mut filled: u64) {
    for iov in iovecs {
        let len = iov.iov_len as u64;
        if filled >= len {
            filled -= len;
            continue;
        }
        let buf = IoBuf { addr: iov.iov_base.cast(), len: iov.iov_len };
        // SAFETY: the buffer belongs to a request that just completed and is not reaped yet.
        unsafe { std::ptr::write_bytes(buf.addr.add(filled as usize), 0, buf.len - filled as usize) };
        filled = 0;
    }
}

impl BlockBackend for UringBackend {
    fn info(&self) -> &BlockInfo {
        &self.info
    }

    fn submit(&mut self, token: u64, op: BlockOp) -> io::Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let none = || Pending { iovecs: Box::new([]), expected: 0, offset: 0, done: 0, skipped: 0, is_read: false };
        match op {
            BlockOp::Read { offset, bufs } => {
                let iovecs: Box<[libc::iovec]> = bufs.iter().map(|b| b.to_iovec()).collect();
                let entry = opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32).offset(offset).build();
                let expected = total_len(&bufs);
                self.push(token, entry, Pending { expected, iovecs, offset, done: 0, skipped: 0, is_read: true })
            }
            BlockOp::Write { offset, bufs } => {
                if self.info.read_only {
                    return Err(io::Error::from_raw_os_error(libc::EBADF));
                }
                let iovecs: Box<[libc::iovec]> = bufs.iter().map(|b| b.to_iovec()).collect();
                let entry = opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32).offset(offset).build();
                let expected = total_len(&bufs);
                self.push(token, entry, Pending { expected, iovecs, offset, done: 0, skipped: 0, is_read: false })
            }
            BlockOp::Flush => {
                let entry = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build();
                self.push(token, entry, none())
            }
            BlockOp::Discard { offset, len } => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let entry = opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build();
                self.push(token, entry, none())
            }
            BlockOp::WriteZeroes { offset, len } => {
                let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                let entry = opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build();
                self.push(token, entry, none())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ring.submit().map(|_| ())
    }

    fn can_submit(&self) -> bool {
        self.pending.len() < RING_DEPTH as usize
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) {
        let _ = self.eventfd.read();
        let finished: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut continued = false;
        for (token, res) in finished {
            let Some(mut p) = self.pending.remove(&token) else {
                continue;
            };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                p.done += res as u64;
                if p.done >= p.expected {
                    Ok(p.expected)
                } else if res == 0 && p.is_read {
                    // End of file (an image whose size is not a whole number of sectors).
                    zero_tail(&p.iovecs, p.done - p.skipped);
                    Ok(p.expected)
                } else if res == 0 {
                    Err(io::Error::new(io::ErrorKind::WriteZero, "write made no progress"))
                } else {
                    // A short transfer (a signal, memory pressure): carry on with the rest.
                    match self.continue_transfer(token, p) {
                        Ok(()) => {
                            continued = true;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            out.push((token, result));
        }
        // Continuations are submitted at once: nothing else would.
        if continued {
            let _ = self.ring.submit();
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn wait_all(b: &mut UringBackend, n: usize) -> Vec<Completion> {
        b.flush().unwrap();
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.len() < n {
            assert!(Instant::now() < deadline, "io_uring completions did not arrive");
            let mut pfd = libc::pollfd { fd: b.completion_fd().unwrap(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            b.poll_completions(&mut done);
        }
        done
    }

    #[test]
    fn async_reads_and_writes_complete_with_tokens() {
        let path = std::env::temp_dir().join(format!("blk-uring-{}", std::process::id()));
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let mut b = UringBackend::open(&path, false).unwrap();
        let mut data: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8 + 1; 4096]).collect();
        for (i, d) in data.iter_mut().enumerate() {
            let bufs = vec![IoBuf { addr: d.as_mut_ptr(), len: 4096 }];
            b.submit(i as u64, BlockOp::Write { offset: i as u64 * 4096, bufs }).unwrap();
        }
        assert_eq!(b.in_flight(), 8);
        let done = wait_all(&mut b, 8);
        assert!(done.iter().all(|(_, r)| matches!(r, Ok(4096))));
        b.submit(100, BlockOp::Flush).unwrap();
        let mut back = vec![0u8; 8 * 4096];
        b.submit(101, BlockOp::Read { offset: 0, bufs: vec![IoBuf { addr: back.as_mut_ptr(), len: back.len() }] })
            .unwrap();
        let done = wait_all(&mut b, 2);
        let mut tokens: Vec<u64> = done.iter().map(|(t, _)| *t).collect();
        tokens.sort();
        assert_eq!(tokens, vec![100, 101]);
        for (i, chunk) in back.chunks(4096).enumerate() {
            assert!(chunk.iter().all(|&x| x == i as u8 + 1));
        }
        // A read past the end of the file zero-fills instead of failing.
        let mut tail = vec![0xeeu8; 8192];
        b.submit(
            7,
            BlockOp::Read { offset: (1 << 20) - 4096, bufs: vec![IoBuf { addr: tail.as_mut_ptr(), len: 8192 }] },
        )
        .unwrap();
        let done = wait_all(&mut b, 1);
        assert!(matches!(done[0].1, Ok(8192)));
        assert!(tail.iter().all(|&x| x == 0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_short_transfer_continues_where_it_stopped() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        let iov = |buf: &mut [u8]| libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let iovecs = [iov(&mut a), iov(&mut b)];
        let rest = remaining(&iovecs, 30);
        assert_eq!(rest.len(), 2);
        assert_eq!((rest[0].iov_base as usize - a.as_ptr() as usize, rest[0].iov_len), (30, 70));
        assert_eq!(rest[1].iov_len, 50);
        let rest = remaining(&iovecs, 110);
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].iov_base as usize - b.as_ptr() as usize, rest[0].iov_len), (10, 40));
        assert!(remaining(&iovecs, 150).is_empty());
    }
}
