//! The synchronous engine: `preadv`/`pwritev` on a file, completed inside `submit`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use super::{BackendError, BlockBackend, BlockInfo, BlockOp, Completion, ImageId, IoBuf, total_len};

/// A disk image file or block device served with synchronous system calls.
pub struct FileBackend {
    file: File,
    info: BlockInfo,
    done: Vec<Completion>,
}

/// Opens a disk image file (or block device) and measures it.
pub(super) fn open_image(path: &Path, read_only: bool) -> Result<(File, u64), BackendError> {
    let open_err = |source| BackendError::Open { path: path.to_path_buf(), source };
    let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
    // Works for regular files and block devices alike.
    let size = io::Seek::seek(&mut &file, io::SeekFrom::End(0)).map_err(open_err)?;
    if size % 512 != 0 {
        return Err(BackendError::Size { path: path.to_path_buf(), size });
    }
    Ok((file, size))
}

impl FileBackend {
    /// Opens the image at `path` (read-write unless `read_only`); its size must be a multiple
    /// of 512 bytes.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BackendError> {
        let (file, capacity) = open_image(path, read_only)?;
        let info = BlockInfo {
            capacity,
            read_only,
            discard: true,
            write_zeroes: true,
            description: format!("sync file {}", path.display()),
            image: ImageId::of(&file),
        };
        Ok(Self { file, info, done: Vec::new() })
    }

    fn execute(&mut self, op: BlockOp) -> io::Result<u64> {
        let fd = self.file.as_raw_fd();
        match op {
            BlockOp::Read { offset, bufs } => read_fully(fd, offset, &bufs),
            BlockOp::Write { offset, bufs } => write_fully(fd, offset, &bufs),
            BlockOp::Flush => self.file.sync_data().map(|()| 0),
            BlockOp::Discard { offset, len } => {
                fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len).map(|()| 0)
            }
            BlockOp::WriteZeroes { offset, len } => zero_range(fd, offset, len).map(|()| 0),
        }
    }
}

pub(super) fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Makes a range read as zeros: FALLOC_FL_ZERO_RANGE where supported, else writes zeros.
pub(super) fn zero_range(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let zeros = vec![0u8; 64 * 1024];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                let buf = IoBuf { addr: zeros.as_ptr() as *mut u8, len: n };
                write_fully(fd, offset + done, &[buf])?;
                done += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Completed operations the sync engine holds before it refuses more (`can_submit`).
const MAX_UNREAPED: usize = 256;

/// Advances an iovec list past `n` bytes: the buffers fully done go in one move (a request
/// may carry hundreds of segments; removing them one at a time would be quadratic).
fn advance(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut done = 0;
    while n > 0 && done < iovecs.len() {
        if n >= iovecs[done].iov_len {
            n -= iovecs[done].iov_len;
            done += 1;
        } else {
            // SAFETY: stays inside the buffer, n < iov_len.
            iovecs[done].iov_base = unsafe { iovecs[done].iov_base.cast::<u8>().add(n).cast() };
            iovecs[done].iov_len -= n;
            n = 0;
        }
    }
    iovecs.drain(..done);
}

/// `preadv` until every buffer is filled; past the end of the file, buffers are zero filled.
pub(super) fn read_fully(fd: RawFd, offset: u64, bufs: &[IoBuf]) -> io::Result<u64> {
    transfer_fully(fd, offset, bufs, libc::preadv, |rest| {
        for iov in rest {
            // SAFETY: the iovecs describe guest memory kept mapped while the request is in flight.
            unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
        }
        Ok(())
    })
}

/// `pwritev` until every buffer is written.
pub(super) fn write_fully(fd: RawFd, offset: u64, bufs: &[IoBuf]) -> io::Result<u64> {
    transfer_fully(fd, offset, bufs, libc::pwritev, |_| Err(io::Error::new(io::ErrorKind::WriteZero, "short write")))
}

/// Calls `vectored` (`preadv` or `pwritev`) until every buffer is done, retrying on EINTR and
/// carrying on after short transfers; `at_end` decides what a zero-length transfer means.
fn transfer_fully(
    fd: RawFd,
    offset: u64,
    bufs: &[IoBuf],
    vectored: unsafe extern "C" fn(libc::c_int, *const libc::iovec, libc::c_int, libc::off_t) -> libc::ssize_t,
    at_end: impl FnOnce(&[libc::iovec]) -> io::Result<()>,
) -> io::Result<u64> {
    let total = total_len(bufs);
    let mut iovecs: Vec<libc::iovec> = bufs.iter().map(|b| b.to_iovec()).collect();
    let mut done = 0u64;
    while !iovecs.is_empty() {
        // SAFETY: the iovecs describe guest memory kept mapped while the request is in flight.
        let n = unsafe { vectored(fd, iovecs.as_ptr(), iovecs.len().min(1024) as i32, (offset + done) as i64) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            at_end(&iovecs)?;
            break;
        }
        done += n as u64;
        advance(&mut iovecs, n as usize);
    }
    Ok(total)
}

impl BlockBackend for FileBackend {
    fn info(&self) -> &BlockInfo {
        &self.info
    }

    fn submit(&mut self, token: u64, op: BlockOp) -> io::Result<()> {
        let result = self.execute(op);
        self.done.push((token, result));
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every operation already ran inside submit.
        Ok(())
    }

    fn can_submit(&self) -> bool {
        // Results wait here until the device reaps them: a queue's worth at most, however
        // fast the guest submits.
        self.done.len() < MAX_UNREAPED
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_image(tag: &str, size: u64) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("blk-{tag}-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    #[test]
    fn read_write_flush_discard_zeroes() {
        let path = temp_image("file", 1 << 20);
        let mut b = FileBackend::open(&path, false).unwrap();
        assert_eq!(b.info().capacity, 1 << 20);
        let mut data = vec![0xabu8; 8192];
        let bufs =
            vec![IoBuf { addr: data.as_mut_ptr(), len: 4096 }, IoBuf { addr: data[4096..].as_mut_ptr(), len: 4096 }];
        b.submit(1, BlockOp::Write { offset: 4096, bufs }).unwrap();
        let mut back = vec![0u8; 8192];
        b.submit(2, BlockOp::Read { offset: 4096, bufs: vec![IoBuf { addr: back.as_mut_ptr(), len: 8192 }] }).unwrap();
        b.submit(3, BlockOp::Flush).unwrap();
        b.submit(4, BlockOp::WriteZeroes { offset: 4096, len: 4096 }).unwrap();
        b.submit(5, BlockOp::Discard { offset: 8192, len: 4096 }).unwrap();
        let mut zeroed = vec![0xffu8; 8192];
        b.submit(6, BlockOp::Read { offset: 4096, bufs: vec![IoBuf { addr: zeroed.as_mut_ptr(), len: 8192 }] })
            .unwrap();
        let mut done = Vec::new();
        b.poll_completions(&mut done);
        let tokens: Vec<u64> = done.iter().map(|(t, _)| *t).collect();
        assert_eq!(tokens, vec![1, 2, 3, 4, 5, 6]);
        assert!(done.iter().all(|(_, r)| r.is_ok()));
        assert_eq!(back, data);
        assert!(zeroed.iter().all(|&b| b == 0), "write-zeroes and discard read back as zeros");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_and_bad_sizes() {
        let path = temp_image("ro", 4096);
        let mut b = FileBackend::open(&path, true).unwrap();
        assert!(b.info().read_only);
        let data = vec![1u8; 512];
        b.submit(1, BlockOp::Write { offset: 0, bufs: vec![IoBuf { addr: data.as_ptr() as *mut u8, len: 512 }] })
            .unwrap();
        let mut done = Vec::new();
        b.poll_completions(&mut done);
        assert!(done[0].1.is_err(), "writes to a read-only image fail");
        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        assert!(matches!(FileBackend::open(&path, false), Err(BackendError::Size { size: 1000, .. })));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(FileBackend::open(&path, false), Err(BackendError::Open { .. })));
    }
}
