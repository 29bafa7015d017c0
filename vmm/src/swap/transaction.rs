//! The swap transaction, written once for every device: check, quiesce, drain, switch,
//! resume, verify, then commit or roll back. Devices contribute only [`BackendSlot`]. Where a
//! device hands requests in flight over ([`BackendSlot::hands_over_in_flight`]), the drain
//! happens after the switch, off the blackout: they finish on the old backend, and the swap
//! commits only once they have (otherwise it rolls back to that backend).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::bus::lock_device;
use devices::lifecycle::{BackendSlot, Lifecycle};
use devices::metrics::RequestMetrics;
use devices::virtio::ResyncHandle;

use super::record::{Phase, SwapHandle, SwapState};
use super::urgent::Urgent;
use super::verify::{Observed, VerifyPolicy, verify};
use crate::quiesce::drain_with;

/// A device being swapped, with what the transaction needs around it. Dropping it releases
/// any quiesce hold it still has, so a swap that ends abnormally (a panic in its thread)
/// cannot leave the device stopped for good.
pub struct SwapTarget<D: Lifecycle> {
    pub device: Arc<Mutex<D>>,
    /// Tells the event loop the device's descriptors changed.
    pub resync: ResyncHandle,
    pub metrics: Vec<Arc<RequestMetrics>>,
    /// Set once the VM is stopping: a swap still copying or verifying gives up (and puts the
    /// old backend back) instead of waiting out its timeouts for traffic that will not come.
    pub vm_stopping: Arc<AtomicBool>,
    /// Quiesce holds this swap has on the device and not yet released.
    holds: AtomicU32,
}

impl<D: Lifecycle> SwapTarget<D> {
    pub fn new(
        device: Arc<Mutex<D>>,
        resync: ResyncHandle,
        metrics: Vec<Arc<RequestMetrics>>,
        vm_stopping: Arc<AtomicBool>,
    ) -> Self {
        Self { device, resync, metrics, vm_stopping, holds: AtomicU32::new(0) }
    }

    pub fn lock(&self) -> MutexGuard<'_, D> {
        lock_device(&self.device)
    }

    /// Fails once the VM is stopping.
    pub fn check_running(&self) -> Result<(), String> {
        match self.vm_stopping.load(Ordering::Acquire) {
            true => Err("the VM is stopping".into()),
            false => Ok(()),
        }
    }

    /// Stops the device at a request boundary. Returns when that took effect, the start of
    /// the blackout, and how long getting hold of the device took (the event loop may be in
    /// the middle of serving it, or waiting for a CPU with the lock held; the device serves
    /// requests meanwhile, so that wait is not blackout).
    pub fn quiesce(&self) -> (Instant, Duration) {
        let asked = Instant::now();
        let mut device = self.lock();
        device.quiesce();
        self.holds.fetch_add(1, Ordering::Relaxed);
        let quiesced = Instant::now();
        (quiesced, quiesced - asked)
    }

    /// Lets the device take requests again, then has the event loop re-read its descriptors.
    /// In that order: what a device wants watched depends on whether it is quiesced (a NIC
    /// reads its backend only while running), so a re-read done while it was still quiesced
    /// would leave the backend unwatched, and nothing else makes the event loop look again
    /// once the guest has stopped kicking (it waits for frames that are never read).
    pub fn resume(&self) {
        self.resume_locked(&mut self.lock());
        self.resync.resync();
    }

    /// Releases this swap's hold on `device` (the target's device, already locked) without
    /// waking the event loop: for a caller that changes more in the same critical section,
    /// and resyncs after.
    pub fn resume_locked(&self, device: &mut D) {
        if self.holds.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
            device.resume();
        }
    }

    /// Quiesce holds this swap still has.
    pub fn holds(&self) -> u32 {
        self.holds.load(Ordering::Relaxed)
    }
}

impl<D: Lifecycle> Drop for SwapTarget<D> {
    fn drop(&mut self) {
        let left = *self.holds.get_mut();
        if left > 0 {
            log::error!("a swap ended with the device still quiesced; resuming it");
            for _ in 0..left {
                self.resume();
            }
        }
    }
}

impl<D: BackendSlot> SwapTarget<D> {
    /// The health check on the backend just switched in (see [`verify`]): its own requests
    /// only, failing early if the VM stops. `tick` runs at every look.
    pub fn verify(&self, policy: &VerifyPolicy, mut tick: impl FnMut()) -> Result<Observed, String> {
        verify(
            policy,
            &self.metrics,
            || self.lock().probation_failures(),
            || on_current(&*self.lock()),
            || {
                tick();
                self.check_running()
            },
        )
    }
}

/// How long a rollback waits for the failed backend's requests before abandoning them to be
/// retried on the old backend: it already failed its health check, so waiting long is pointless.
const ROLLBACK_DRAIN: Duration = Duration::from_millis(200);

/// How patient the transaction is.
#[derive(Clone, Copy, Debug)]
pub struct SwapParams {
    pub drain_timeout: Duration,
    pub verify: VerifyPolicy,
}

/// Waits until the device has nothing in flight, making progress by polling the device's own
/// readiness descriptors (see [`drain_with`]). Returns the number still in
/// flight on timeout.
pub fn drain<D: Lifecycle>(device: &Mutex<D>, timeout: Duration) -> Result<(), usize> {
    drain_until(device, timeout, D::pending_requests)
}

/// [`drain`], counting what `outstanding` says is still to wait for.
fn drain_until<D: Lifecycle>(device: &Mutex<D>, timeout: Duration, outstanding: fn(&D) -> usize) -> Result<(), usize> {
    drain_with(Instant::now() + timeout, || {
        let mut d = lock_device(device);
        d.drive();
        (outstanding(&d), d.progress_fds())
    })
}

/// Stops the device at a request boundary and waits for its in-flight requests. Returns when
/// the blackout began and whether the drain finished; on timeout the device runs again and
/// the number still in flight is returned.
pub fn quiesce_and_drain<D: Lifecycle>(
    target: &SwapTarget<D>,
    timeout: Duration,
    record: &SwapHandle,
) -> (Instant, Result<(), usize>) {
    let (blackout, waited) = target.quiesce();
    record.phase(Phase::Quiesce, Some(format!("device taken after {} us", waited.as_micros())));
    record.phase(Phase::Drain, None);
    (blackout, drain(&target.device, timeout).inspect_err(|_| target.resume()))
}

/// Swaps `new` in, verifies it, and commits or rolls back. Runs on its own thread; the guest
/// keeps running throughout except between quiesce and resume (the blackout).
pub fn run<D>(target: &SwapTarget<D>, new: Box<D::Backend>, params: &SwapParams, record: &SwapHandle)
where
    D: BackendSlot,
{
    let urgent = Urgent::enter();
    let (blackout, waited) = target.quiesce();
    record.phase(Phase::Quiesce, Some(format!("device taken after {} us", waited.as_micros())));
    let handed_over = {
        let dev = target.lock();
        dev.hands_over_in_flight().then(|| dev.pending_requests())
    };
    match handed_over {
        // The requests in flight finish on the old backend while the new one serves: the
        // blackout does not wait for the slower of the two.
        Some(pending) => {
            record.phase(Phase::Drain, Some(format!("{pending} request(s) in flight finish on the old backend")))
        }
        None => {
            record.phase(Phase::Drain, None);
            if let Err(pending) = drain(&target.device, params.drain_timeout) {
                target.resume();
                record.add_blackout(blackout.elapsed());
                let reason = format!(
                    "{pending} request(s) still in flight after {:?}; the old backend keeps serving",
                    params.drain_timeout
                );
                return record.finish(SwapState::Failed, Some(reason));
            }
        }
    }
    record.phase(Phase::Switch, None);
    let mut old = {
        let mut dev = target.lock();
        dev.set_probation(true);
        dev.replace_backend(new)
    };
    record.phase(Phase::Resume, None);
    target.resume();
    record.add_blackout(blackout.elapsed());
    drop(urgent);

    record.phase(Phase::Verify, None);
    let verdict = target.verify(&params.verify, || {
        if target.lock().drain_previous(&mut *old, false) {
            target.resync.resync();
        }
    });
    // Committing closes the old backend: it must be done with what it was handed. A rollback
    // reinstates it, and what it still holds finishes there.
    let verdict = verdict.and_then(|seen| {
        settle_previous(target, &mut *old, params.drain_timeout).map(|()| seen).map_err(|left| {
            format!(
                "{left} request(s) handed over still on the old backend after {:?}; it keeps serving",
                params.drain_timeout
            )
        })
    });
    match verdict {
        Ok(seen) => {
            record.phase(
                Phase::Commit,
                Some(format!("{} requests, {} errors while verifying", seen.requests, seen.errors)),
            );
            {
                let mut dev = target.lock();
                // A last look at the old backend: what reached it since the last one is
                // delivered, not dropped with it.
                if dev.drain_previous(&mut *old, true) {
                    target.resync.resync();
                }
                dev.set_probation(false);
            }
            drop(old);
            record.finish(SwapState::Committed, None);
        }
        Err(mut reason) => {
            if record.snapshot().mode == "new_image" {
                // Two different disks: nothing carries the guest's writes from one to the other.
                reason.push_str("; writes the guest made to the new image while it was checked stay on it");
            }
            roll_back(target, || Some(old), ROLLBACK_DRAIN, record, &reason);
            record.finish(SwapState::RolledBack, Some(reason));
        }
    }
}

/// Requests in flight on the device's current backend (not those handed over).
fn on_current<D: BackendSlot>(device: &D) -> usize {
    device.pending_requests().saturating_sub(device.in_flight_on_previous())
}

/// Waits (up to `timeout`) for the requests left in flight on `old` at the switch to finish
/// there. Returns how many are left on timeout: they are never retried elsewhere while `old`
/// might still carry them out (a late write would land over a newer one).
fn settle_previous<D: BackendSlot>(
    target: &SwapTarget<D>,
    old: &mut D::Backend,
    timeout: Duration,
) -> Result<(), usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = {
            let mut dev = target.lock();
            if dev.drain_previous(old, false) {
                target.resync.resync();
            }
            dev.in_flight_on_previous()
        };
        if left == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(left);
        }
        // Off the blackout: the device serves meanwhile.
        std::thread::sleep(SETTLE_POLL);
    }
}

/// How often the requests handed over to the old backend are looked at while settling.
const SETTLE_POLL: Duration = Duration::from_micros(250);

/// Puts the old backend back in place of the failed one, which is closed. `old` is called
/// once the device is quiesced and drained (a mirror can only give up its source then).
/// Requests the failed backend still holds are abandoned and retried on the old one, so the
/// guest sees no error; requests handed over to the old backend at the switch just carry on
/// there, so the drain does not wait for them.
pub fn roll_back<D>(
    target: &SwapTarget<D>,
    old: impl FnOnce() -> Option<Box<D::Backend>>,
    drain_timeout: Duration,
    record: &SwapHandle,
    reason: &str,
) where
    D: BackendSlot,
{
    record.phase(Phase::Rollback, Some(reason.to_string()));
    let _urgent = Urgent::enter();
    let (blackout, _) = target.quiesce();
    if let Err(left) = drain_until(&target.device, drain_timeout, on_current) {
        record.phase(Phase::Rollback, Some(format!("{left} request(s) abandoned on the failed backend, retried")));
        target.lock().abandon_in_flight();
    }
    if let Some(old) = old() {
        let failed = {
            let mut dev = target.lock();
            let failed = dev.replace_backend(old);
            dev.set_probation(false);
            failed
        };
        // Closed before the disk runs again: what it abandoned is retried on the old backend
        // then, and must be finished or cancelled on the failed one by that time (closing
        // waits a bounded time for its own I/O), or a late write could land over a newer one.
        drop(failed);
    }
    target.resume();
    record.add_blackout(blackout.elapsed());
}
