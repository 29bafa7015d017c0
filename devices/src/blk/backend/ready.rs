//! One pollable descriptor standing for several: a composite backend (mirror, fault injector)
//! reports readiness when any backend inside it, or the composite itself, has work.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// An epoll set of the inner backends' descriptors plus an eventfd of the composite's own.
pub struct ReadySet {
    epoll: Epoll,
    own: EventFd,
}

impl ReadySet {
    /// A set that watches nothing but the composite's own eventfd.
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let own = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, own.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))?;
        Ok(Self { epoll, own })
    }

    /// Also report readiness when `fd` is readable (level triggered, so nothing is consumed).
    pub fn watch(&self, fd: Option<RawFd>) -> io::Result<()> {
        match fd {
            Some(fd) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64)),
            None => Ok(()),
        }
    }

    /// Stops watching `fd` (a backend taken out of the composite).
    pub fn unwatch(&self, fd: Option<RawFd>) {
        if let Some(fd) = fd {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Makes the set readable until [`clear`](Self::clear): the composite has work of its own.
    pub fn signal(&self) {
        let _ = self.own.write(1);
    }

    /// Withdraws a [`signal`](Self::signal); readiness of the watched descriptors is unaffected.
    pub fn clear(&self) {
        let _ = self.own.read();
    }

    /// The descriptor to poll: readable while any watched descriptor is, or after a signal.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Waits up to `ms` for readiness (for callers driving the composite themselves).
    pub fn wait(&self, ms: i32) {
        let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}
