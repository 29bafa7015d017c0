//! A fault injector around a real backend: the test double for swap rollback. It can fail
//! every request, fail after a number of good ones, or stall (accept requests and never
//! complete them), so a swap's health check has something real to catch.

use std::io;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use super::ready::ReadySet;
use super::{BlockBackend, BlockInfo, BlockOp, Completion};

/// What goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Every request fails with EIO.
    Error,
    /// The first `n` requests are served, later ones fail with EIO.
    ErrorAfter(u64),
    /// Requests are accepted and never completed.
    Stall,
    /// The first `n` requests are served, later ones are accepted and never completed.
    StallAfter(u64),
}

/// A backend that serves requests through another one until its [`Fault`] strikes.
pub struct FaultyBackend {
    inner: Box<dyn BlockBackend>,
    fault: Fault,
    info: BlockInfo,
    submitted: u64,
    stalled: usize,
    failed: Vec<Completion>,
    ready: ReadySet,
}

impl FaultyBackend {
    /// Wraps `inner`, injecting `fault`; requests are counted from this backend's creation.
    pub fn new(inner: Box<dyn BlockBackend>, fault: Fault) -> io::Result<Self> {
        let ready = ReadySet::new()?;
        ready.watch(inner.completion_fd())?;
        let mut info = inner.info().clone();
        info.description = format!("{} (fault injected: {fault:?})", info.description);
        Ok(Self { inner, fault, info, submitted: 0, stalled: 0, failed: Vec::new(), ready })
    }
}

impl BlockBackend for FaultyBackend {
    fn info(&self) -> &BlockInfo {
        &self.info
    }

    fn submit(&mut self, token: u64, op: BlockOp) -> io::Result<()> {
        self.submitted += 1;
        let fail = match self.fault {
            Fault::Error => true,
            Fault::ErrorAfter(n) => self.submitted > n,
            Fault::Stall => true,
            Fault::StallAfter(n) => self.submitted > n,
        };
        if fail && matches!(self.fault, Fault::Stall | Fault::StallAfter(_)) {
            self.stalled += 1;
            return Ok(());
        }
        if fail {
            self.failed.push((token, Err(io::Error::from_raw_os_error(libc::EIO))));
            self.ready.signal();
            return Ok(());
        }
        self.inner.submit(token, op)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    fn can_submit(&self) -> bool {
        self.inner.can_submit()
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) {
        self.ready.clear();
        out.append(&mut self.failed);
        self.inner.poll_completions(out);
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.ready.fd())
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.failed.len() + self.stalled
    }
}
