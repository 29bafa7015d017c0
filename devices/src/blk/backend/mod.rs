//! Block backends: where a virtio-blk device's sectors live and which I/O engine moves them.
//!
//! Every backend has the same asynchronous shape, so the device never cares which one it has:
//! [`BlockBackend::submit`] hands over a request with a token, completions come back from
//! [`BlockBackend::poll_completions`] (in any order), and [`BlockBackend::completion_fd`]
//! says when to look. A synchronous engine completes inside `submit` and just reports it on the
//! next poll.

mod fault;
mod file;
pub mod lock;
mod mirror;
mod nbd;
mod probe;
mod ready;
mod uring;

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

pub use fault::{Fault, FaultyBackend};
pub use file::FileBackend;
pub use lock::{ImageLock, LockedBackend, lock_image};
pub use mirror::{Half, MirrorBackend, MirrorControl, MirrorProgress};
pub use nbd::{NbdBackend, NbdTarget, NbdTimeouts};
pub use probe::{ProbeError, probe};
pub use uring::UringBackend;

/// A piece of guest memory a request reads from or writes into, as a host address.
///
/// Valid while the request is in flight: the device keeps the guest memory mapping it came
/// from alive until the completion is reaped.
#[derive(Clone, Copy, Debug)]
pub struct IoBuf {
    /// Host virtual address of the first byte.
    pub addr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: an IoBuf is a plain address range into guest memory, which is shared with the guest
// and designed for concurrent access; whoever dereferences it upholds the validity contract.
unsafe impl Send for IoBuf {}

impl IoBuf {
    /// The same range as a `struct iovec`, for vectored system calls.
    pub fn to_iovec(self) -> libc::iovec {
        libc::iovec { iov_base: self.addr.cast(), iov_len: self.len }
    }

    /// Zeroes the buffer.
    ///
    /// # Safety
    /// The buffer must be valid for writes (see the type's documentation).
    pub unsafe fn zero(self) {
        // SAFETY: guaranteed by the caller.
        unsafe { std::ptr::write_bytes(self.addr, 0, self.len) }
    }
}

/// Total bytes in a list of buffers.
pub fn total_len(bufs: &[IoBuf]) -> u64 {
    bufs.iter().map(|b| b.len as u64).sum()
}

/// One operation, with byte offsets.
#[derive(Debug)]
pub enum BlockOp {
    /// Fills `bufs`, in order, from the disk starting at `offset`.
    Read {
        /// Byte offset into the disk.
        offset: u64,
        /// Where the data goes, in order.
        bufs: Vec<IoBuf>,
    },
    /// Writes `bufs`, in order, to the disk starting at `offset`.
    Write {
        /// Byte offset into the disk.
        offset: u64,
        /// Where the data comes from, in order.
        bufs: Vec<IoBuf>,
    },
    /// Makes every write that completed before it durable.
    Flush,
    /// The range may be deallocated; reads of it return zeros or old data.
    Discard {
        /// Byte offset into the disk.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// The range must read as zeros afterwards.
    WriteZeroes {
        /// Byte offset into the disk.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
    },
}

impl BlockOp {
    /// A short lowercase name for logs ("read", "write-zeroes", ...).
    pub fn name(&self) -> &'static str {
        match self {
            BlockOp::Read { .. } => "read",
            BlockOp::Write { .. } => "write",
            BlockOp::Flush => "flush",
            BlockOp::Discard { .. } => "discard",
            BlockOp::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

/// A finished operation: its token and the bytes it transferred, or the error.
pub type Completion = (u64, io::Result<u64>);

/// What a backend offers; the device derives its config space and features from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// Size in bytes (a multiple of 512).
    pub capacity: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// [`BlockOp::Discard`] is supported.
    pub discard: bool,
    /// [`BlockOp::WriteZeroes`] is supported.
    pub write_zeroes: bool,
    /// Human-readable: engine and target, e.g. "io_uring file /var/disk.img".
    pub description: String,
    /// Which local file or block device holds the data, where the backend knows: two backends
    /// with different images do not serve the same disk, however equal their sizes.
    pub image: Option<ImageId>,
}

/// A file's identity: its device and inode numbers, the same under any path that reaches it
/// (for a block device: dev 0 and the device number it stands for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageId {
    /// Device number of the filesystem holding the file (`st_dev`); 0 for a block device.
    pub dev: u64,
    /// Inode number (`st_ino`); for a block device, the device number it stands for (`st_rdev`).
    pub ino: u64,
}

impl ImageId {
    /// The identity of an open file; `None` if its metadata cannot be read.
    pub fn of(file: &std::fs::File) -> Option<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = file.metadata().ok()?;
        // Device nodes for one disk (/dev/dm-0, /dev/mapper/x) differ in inode, not in the
        // device they stand for.
        if meta.file_type().is_block_device() {
            return Some(Self { dev: 0, ino: meta.rdev() });
        }
        Some(Self { dev: meta.dev(), ino: meta.ino() })
    }
}

/// Why a backend cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The image file or block device cannot be opened or measured.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image's path.
        path: PathBuf,
        /// What the system call reported.
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting lock on the image (it writes it, or reads it while
    /// this one would write).
    #[error("disk image {path} is in use by another process (it is locked); two VMs must not write one image")]
    Locked {
        /// The image's path.
        path: PathBuf,
    },
    /// The image's size is not a whole number of 512-byte sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    Size {
        /// The image's path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The NBD export's size is not a whole number of 512-byte sectors.
    #[error("NBD export at {target} is {size} bytes, not a multiple of 512")]
    NbdSize {
        /// The server, as [`NbdTarget`] displays it.
        target: String,
        /// The export's size in bytes.
        size: u64,
    },
    /// Connecting to the NBD server, the handshake, or setting up the I/O thread failed.
    #[error("NBD server {target}: {reason}")]
    Nbd {
        /// The server, as [`NbdTarget`] displays it.
        target: String,
        /// What went wrong, in words.
        reason: String,
    },
    /// The io_uring instance or its eventfd cannot be created or registered.
    #[error("cannot set up io_uring: {0}")]
    Uring(#[source] io::Error),
    /// Any other failure, in words.
    #[error("{0}")]
    Other(String),
}

/// Where a block device's data lives and how it is moved.
pub trait BlockBackend: Send {
    /// What the backend offers; fixed for its lifetime.
    fn info(&self) -> &BlockInfo;
    /// Queues `op`; its completion carries `token`. Errors here mean the request failed
    /// without starting. Queued operations start at the latest on [`flush`](Self::flush).
    fn submit(&mut self, token: u64, op: BlockOp) -> io::Result<()>;
    /// Starts everything queued: the device calls it once per batch of requests, so an engine
    /// can hand a whole batch to the kernel in one system call.
    fn flush(&mut self) -> io::Result<()>;
    /// Whether another request can be submitted now (engines have bounded queues).
    fn can_submit(&self) -> bool;
    /// Moves finished operations into `out`.
    fn poll_completions(&mut self, out: &mut Vec<Completion>);
    /// Readable when completions are waiting; `None` for engines that complete in `submit`.
    fn completion_fd(&self) -> Option<RawFd>;
    /// Submitted and not yet returned by `poll_completions`.
    fn in_flight(&self) -> usize;
}
