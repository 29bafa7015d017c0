//! userfaultfd, for guest RAM whose pages are filled on first touch (a lazy restore).
//!
//! Written against the kernel ABI (`linux/userfaultfd.h`) rather than with the `userfaultfd`
//! crate: its -sys crate runs bindgen at build time, which needs libclang on every machine
//! that builds the VMM, for five ioctls and four plain structs.
//!
//! Faults from the kernel count too (KVM reading guest RAM, a device's DMA through the page
//! cache), so the descriptor is opened without `UFFD_USER_MODE_ONLY`: that needs root or
//! `vm.unprivileged_userfaultfd`, or access to `/dev/userfaultfd`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

const UFFD_API: u64 = 0xaa;
const UFFDIO: u32 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
const PAGE: usize = 4096;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);

/// `struct uffd_msg` (32 bytes, packed); only page faults are asked for.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    feat: u64,
}

/// What [`Userfault::next_fault`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// A thread touched the missing page at this address.
    Fault(u64),
    /// Nothing within the timeout.
    Idle,
    /// The stop descriptor became readable.
    Stop,
}

/// An open userfaultfd.
pub struct Userfault {
    fd: OwnedFd,
}

fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

impl Userfault {
    /// A userfaultfd, handshaken (UFFDIO_API). Non-blocking: a fault whose thread was
    /// interrupted (a vCPU kicked by a signal) leaves the queue between our poll and our read,
    /// and a blocking read would then wait for the next fault, or for ever.
    pub fn open() -> std::io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes flags only and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        let fd = if raw >= 0 {
            // SAFETY: a descriptor we just received and own.
            unsafe { OwnedFd::from_raw_fd(raw) }
        } else {
            // Where the syscall is restricted, /dev/userfaultfd hands out the same thing.
            let syscall_error = std::io::Error::last_os_error();
            let dev = File::open("/dev/userfaultfd").map_err(|_| syscall_error)?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument, returns a descriptor.
            let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            check(raw)?;
            // SAFETY: as above.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        let uffd = Self { fd };
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API reads and writes the struct we pass.
        check(unsafe { ioctl_with_mut_ref(&uffd.fd, UFFDIO_API(), &mut api) })?;
        Ok(uffd)
    }

    /// Asks for faults on missing pages in `addr..addr + len` (page aligned).
    pub fn register(&self, addr: u64, len: u64) -> std::io::Result<()> {
        let mut register =
            UffdioRegister { range: UffdioRange { start: addr, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut register) })
    }

    /// Waits up to `timeout_ms` (-1: for ever) for the next page fault or for `stop` to
    /// become readable.
    pub fn next_fault(&self, stop: RawFd, timeout_ms: i32) -> std::io::Result<Wait> {
        loop {
            let mut fds = [
                libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: poll on two descriptors we own.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(Wait::Stop);
            }
            if n == 0 {
                return Ok(Wait::Idle);
            }
            let mut msg = UffdMsg::default();
            let size = std::mem::size_of::<UffdMsg>();
            // SAFETY: reads at most `size` bytes into the message we own.
            let got = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut msg).cast(), size) };
            if got < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                    continue;
                }
                return Err(e);
            }
            if got as usize == size && msg.event == UFFD_EVENT_PAGEFAULT {
                return Ok(Wait::Fault(msg.address));
            }
        }
    }

    /// Fills the missing pages at `dst` with `src` and wakes whoever waits on them. If the
    /// call stops partway (a page present already, a mapping change), the rest is filled page
    /// by page and present pages are left as they are.
    pub fn copy(&self, dst: u64, src: &[u8]) -> std::io::Result<()> {
        let copy_one = |dst: u64, src: &[u8]| {
            let mut copy = UffdioCopy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
            // SAFETY: the kernel reads `len` bytes from `src` (a live slice) into the
            // registered range at `dst`.
            check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut copy) })
        };
        match copy_one(dst, src) {
            Err(e) if partial(&e) => {
                for (i, page) in src.chunks(PAGE).enumerate() {
                    one_page(|| copy_one(dst + (i * PAGE) as u64, page))?;
                }
                Ok(())
            }
            other => other,
        }
    }

    /// Maps zero pages at `dst..dst + len` and wakes whoever waits on them; like
    /// [`copy`](Self::copy) for pages present already.
    pub fn zero(&self, dst: u64, len: u64) -> std::io::Result<()> {
        let zero_one = |start: u64, len: u64| {
            let mut zero = UffdioZeropage { range: UffdioRange { start, len }, mode: 0, zeropage: 0 };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes the struct we pass.
            check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut zero) })
        };
        match zero_one(dst, len) {
            Err(e) if partial(&e) => {
                for at in (dst..dst + len).step_by(PAGE) {
                    one_page(|| zero_one(at, PAGE as u64))?;
                }
                Ok(())
            }
            other => other,
        }
    }
}

/// A multi-page fill that stopped partway: EEXIST (a page present already) or EAGAIN (the
/// kernel filled some pages, then met a present one or a mapping change). Either way the rest
/// is done page by page.
fn partial(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EEXIST | libc::EAGAIN))
}

/// One page's fill: done when the page is present (EEXIST), retried while the mapping changes
/// under it (EAGAIN).
fn one_page(mut fill: impl FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
    loop {
        match fill() {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
            other => return other,
        }
    }
}
