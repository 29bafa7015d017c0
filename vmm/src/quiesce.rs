//! "Stop every device at a request boundary, drain what is in flight, then pause every vCPU",
//! written once: the memory swap, snapshots and (next) the switchover to a shadow all need the
//! whole VM still. [`Quiesced`] is a guard; dropping it lets the VM run again, on every path.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::device_manager::{DeviceEntry, DeviceManager};

use crate::vcpu::{ControlError, Vcpus};

/// Why the VM could not be brought to a standstill; everything runs again as it did.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    /// A device still had requests in flight when the drain timeout ran out.
    #[error("device {device} still has {pending} request(s) in flight after {timeout_ms} ms")]
    Drain {
        /// The busy device's id.
        device: String,
        /// Requests it still had in flight.
        pending: usize,
        /// The drain timeout, in milliseconds.
        timeout_ms: u64,
    },
    /// The vCPUs could not be paused.
    #[error(transparent)]
    Pause(#[from] ControlError),
}

/// A VM whose devices are drained and whose vCPUs are parked, until dropped.
pub struct Quiesced<'a> {
    vcpus: &'a Vcpus,
    devices: &'a DeviceManager,
    /// False when the guest was paused by its user before, and must stay paused after.
    resume_vcpus: bool,
    paused_at: Instant,
    /// How long draining the devices took (the guest ran meanwhile).
    pub devices_quiesce: Duration,
}

impl<'a> Quiesced<'a> {
    /// Quiesces and drains every device (waiting at most `drain_timeout` for in-flight
    /// requests: a device writing guest memory must be done with it), then pauses the vCPUs.
    /// On error everything runs again as it did.
    pub fn new(
        vcpus: &'a Vcpus,
        devices: &'a DeviceManager,
        drain_timeout: Duration,
        resume_vcpus: bool,
    ) -> Result<Self, QuiesceError> {
        let started = Instant::now();
        drain_devices(devices.devices(), drain_timeout)?;
        let devices_quiesce = started.elapsed();
        if let Err(e) = vcpus.pause() {
            // Some vCPUs may have parked: let them all run again, as they were.
            if resume_vcpus {
                let _ = vcpus.resume();
            }
            devices.devices().iter().for_each(resume);
            return Err(e.into());
        }
        Ok(Self { vcpus, devices, resume_vcpus, paused_at: Instant::now(), devices_quiesce })
    }

    /// How long the vCPUs have been paused.
    pub fn paused_for(&self) -> Duration {
        self.paused_at.elapsed()
    }

    /// Leaves the VM as it is now, devices quiesced and vCPUs paused, past this guard's end:
    /// a switchover keeps the primary frozen until it commits or rolls back
    /// ([`thaw`] undoes it).
    pub fn keep(self) {
        std::mem::forget(self);
    }

    pub fn vcpus(&self) -> &Vcpus {
        self.vcpus
    }

    pub fn devices(&self) -> &DeviceManager {
        self.devices
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        if self.resume_vcpus {
            let _ = self.vcpus.resume();
        }
        self.devices.devices().iter().for_each(resume);
    }
}

/// Lets a VM that [`Quiesced::keep`] left frozen run again (its vCPUs only if `resume_vcpus`).
pub fn thaw(vcpus: &Vcpus, devices: &DeviceManager, resume_vcpus: bool) {
    if resume_vcpus {
        let _ = vcpus.resume();
    }
    devices.devices().iter().for_each(resume);
}

/// Quiesces every device, then waits until none has a request in flight; on timeout resumes
/// them all and names the one still busy.
pub(crate) fn drain_devices(entries: &[DeviceEntry], timeout: Duration) -> Result<(), QuiesceError> {
    for entry in entries {
        entry.handle.lifecycle(|d| d.quiesce());
    }
    let deadline = Instant::now() + timeout;
    for entry in entries {
        let drained = drain_with(deadline, || {
            entry.handle.lifecycle(|d| {
                d.drive();
                (d.pending_requests(), d.progress_fds())
            })
        });
        if let Err(pending) = drained {
            entries.iter().for_each(resume);
            return Err(QuiesceError::Drain {
                device: entry.id.clone(),
                pending,
                timeout_ms: timeout.as_millis() as u64,
            });
        }
    }
    Ok(())
}

/// Longest a drain waits on a device's descriptors before looking at the device again. The
/// event loop reaps completions from the same descriptors: when it takes the last ones just
/// before the drain polls, nothing is left to wake the drain, which would then sleep its whole
/// timeout with the device quiesced. This bounds what that race adds to a blackout; it is also
/// how often a device waiting to write (a NIC with a frame stuck) is retried.
pub const DRAIN_POLL: Duration = Duration::from_micros(100);

/// The drain loop, written once for every holder (a swap drains one device, the quiesce guard
/// all of them): `step` makes progress on the device and says how many requests are still in
/// flight and which descriptors become ready when that may have changed; the loop waits on
/// those (at most [`DRAIN_POLL`] at a time) until none is in flight or `deadline` passes,
/// when it returns the number left.
pub fn drain_with(deadline: Instant, mut step: impl FnMut() -> (usize, Vec<RawFd>)) -> Result<(), usize> {
    loop {
        let (pending, fds) = step();
        if pending == 0 {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(pending);
        }
        wait_readable(&fds, left.min(DRAIN_POLL));
    }
}

/// Waits until one of `fds` is readable, or `timeout` (to the microsecond: `poll` would round
/// a sub-millisecond timeout up to a whole millisecond). Readable only: completion eventfds are
/// always writable, so waiting for POLLOUT as well would return at once and turn every drain
/// into a busy loop that competes for the CPU with the very I/O it waits for.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let timeout = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos().into() };
    // SAFETY: a valid array of pollfds and a valid timespec; no signal mask.
    unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, &timeout, std::ptr::null()) };
}

/// Lets a device take requests again, then has the event loop re-read its descriptors (see
/// [`SwapTarget::resume`](crate::swap::transaction::SwapTarget::resume) for why in that order).
fn resume(entry: &DeviceEntry) {
    entry.handle.lifecycle(|d| d.resume());
    entry.resync.resync();
}
