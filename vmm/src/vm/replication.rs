//! The VM's side of replication to a shadow (see [`crate::replication`]): which pages an
//! epoch sends, and the switchover, which freezes the VM and hands it over.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Vm;
use crate::device_manager::DeviceManager;
use crate::quiesce::{Quiesced, thaw};
use crate::replication::codec::{Encoder, PAGE};
use crate::replication::primary::{
    self, ReplicationError, ReplicationRequest, ReplicationStatus, ShadowSelector, ShadowStatus, SwitchoverReport,
    SwitchoverRequest, ValidateRequest, ValidationRecord,
};
use crate::replication::update::{self, VmUpdate};
use crate::replication::wire::{self, Control, Frame, Stream};
use crate::snapshot::format::LiveMemory;
use crate::snapshot::{DirtyError, RegionSnapshot, SnapshotKind, VmSnapshot, dirty_ranges};
use crate::swap::VerifyPolicy;
use crate::vcpu::Vcpus;

/// How long a switchover waits for the devices to drain before giving up (the VM runs on).
const SWITCHOVER_DRAIN: Duration = Duration::from_secs(2);

impl Vm {
    /// Starts replicating this VM to the shadow `request.target` names (`vmm shadow`): a full
    /// first pass, then an epoch of changed pages every `request.epoch_ms`. Up to
    /// [`MAX_SHADOWS`](crate::replication::manager::MAX_SHADOWS) shadows may replicate at once.
    pub fn start_replication(self: &Arc<Self>, request: &ReplicationRequest) -> Result<ShadowStatus, ReplicationError> {
        if let Some(exit) = self.exit.get() {
            return Err(ReplicationError::Conflict(format!("the VM has exited ({exit})")));
        }
        // A swap in progress would resume its device behind the switchover's back.
        if let Some(device) = self.swaps.tallies().1.into_keys().next() {
            return Err(ReplicationError::Conflict(format!(
                "device {device} is swapping its backend; replicate once the swap has ended"
            )));
        }
        if self.shm_attached() {
            let why = "a shared-memory region is attached; its memory is not the VM's to replicate: detach it first";
            return Err(ReplicationError::Conflict(why.into()));
        }
        self.replication.start(self, request)
    }

    /// Where replication stands.
    pub fn replication(&self) -> ReplicationStatus {
        self.replication.status()
    }

    /// Stops replicating to the shadow `selector` names (or the only one); the shadow
    /// discards what it has.
    pub fn stop_replication(&self, selector: &ShadowSelector) -> Result<(), ReplicationError> {
        self.replication.stop(selector)
    }

    /// Freezes this VM, sends the shadow the last changed pages and the machine's state, and
    /// returns once the VM runs there. This VM then stays frozen (nothing reaches its disks)
    /// until [`commit_switchover`](Self::commit_switchover). If the shadow cannot start the
    /// VM, this one runs on as before.
    ///
    /// The shadow first applies the update of the passed validation `request.validation`
    /// names, if any, then watches the VM for `request.health`: a VM that fails there is
    /// stopped and this one thaws (the switchover rolls itself back).
    pub fn switch_over(self: &Arc<Self>, request: &SwitchoverRequest) -> Result<SwitchoverReport, ReplicationError> {
        self.replication.switchover(request)
    }

    /// Tries `request.update` on a clone of the shadow's copy of this VM, apart from
    /// everything this VM uses (see [`crate::replication::trial`]), and returns the verdict.
    /// This VM pauses only while the last changed pages and its state are sent.
    pub fn validate_update(&self, request: &ValidateRequest) -> Result<ValidationRecord, ReplicationError> {
        self.replication.validate(request)
    }

    /// Ends this VM for good after a switchover: the shadow has it.
    pub fn commit_switchover(&self) -> Result<ShadowStatus, ReplicationError> {
        let status = self.replication.commit()?;
        log::info!("switchover committed: the VM runs on the shadow; this one stops");
        self.stop();
        Ok(status)
    }

    /// Undoes a switchover: the shadow stops the VM and takes back what the guest wrote to
    /// its disks there, and this one runs again from where it froze.
    pub fn rollback_switchover(&self) -> Result<ShadowStatus, ReplicationError> {
        let status = self.replication.rollback()?;
        let vcpus = self.vcpus();
        let devices = self.devices();
        // vCPUs the user had paused before the switchover stay paused.
        let resume_vcpus = status.switchover.as_ref().is_some_and(|s| s.resume_vcpus);
        thaw(&vcpus, &devices, resume_vcpus);
        log::info!("switchover rolled back: the VM runs here again");
        Ok(status)
    }

    /// A replication ended: it reads the dirty log no more.
    pub(crate) fn forget_replication_consumer(&self, consumer: u64) {
        self.replication.forget_consumer(consumer);
    }

    /// Guest memory, its regions laid end to end.
    pub(crate) fn replication_memory_bytes(&self) -> u64 {
        self.ram.regions().iter().map(|r| r.size).sum()
    }

    /// The pages an epoch sends, each with its offset in memory laid end to end: those changed
    /// since the last epoch, or every populated one for the first. Reading the dirty log
    /// breaks the chain of diff snapshots.
    pub(crate) fn replication_pages(
        &self,
        consumer: u64,
        everything: bool,
    ) -> Result<Vec<(u64, LiveMemory)>, DirtyError> {
        // Other replications need what the log said too.
        let dirty = self.replication.dirty_for(consumer, || {
            let read = self.dirty.take(&self.ram, &self.kvm)?;
            self.dirty.forget(true);
            Ok::<_, DirtyError>(read)
        })?;
        let mut pages = Vec::new();
        let mut offset = 0;
        for (region, dirty) in self.ram.regions().iter().zip(dirty) {
            let ranges = match everything {
                true => self.ram.populated_ranges(region.slot).unwrap_or_else(|_| vec![(0, region.size)]),
                false => dirty_ranges(&dirty, PAGE as u64, region.size),
            };
            for (start, len) in ranges {
                for page in (start..start + len).step_by(PAGE) {
                    // SAFETY: GuestRam keeps the mapping for the VM's life, and memory swaps
                    // (which replace it) are refused while replication runs.
                    let memory = unsafe { LiveMemory::new((region.host_addr + page) as *const u8, PAGE) };
                    pages.push((offset + page, memory));
                }
            }
            offset += region.size;
        }
        Ok(pages)
    }

    /// Freezes the VM, sends the last epoch and the state inside the message `wrap` makes of
    /// it; the caller thaws the VM (drops the [`Quiesced`]) or keeps it frozen.
    #[allow(clippy::too_many_arguments)]
    fn freeze_and_send<'a>(
        &self,
        vcpus: &'a Vcpus,
        devices: &'a DeviceManager,
        consumer: u64,
        epoch: u64,
        encoder: &mut Encoder,
        stream: &mut Box<dyn Stream>,
        wrap: impl FnOnce(Box<VmSnapshot>) -> Control,
    ) -> Result<Frozen<'a>, String> {
        let source = self.snapshot_source(vcpus, devices);
        let resume_vcpus = source.resume_vcpus;
        let quiesced = Quiesced::new(vcpus, devices, SWITCHOVER_DRAIN, resume_vcpus).map_err(|e| e.to_string())?;
        let frozen_at = Instant::now();
        let wire_err = |e: wire::WireError| e.to_string();
        let (stats, _) = primary::send_epoch(self, consumer, epoch, encoder, stream, false, true).map_err(wire_err)?;
        wire::write_frame(stream, &Frame::Control(Control::EpochEnd { epoch, stats })).map_err(wire_err)?;
        let machine = source.capture(&quiesced).map_err(|e| e.to_string())?;
        let mut file_offset = 0;
        let regions = self
            .ram
            .regions()
            .iter()
            .map(|r| {
                let region =
                    RegionSnapshot { slot: r.slot, guest_addr: r.guest_addr, size: r.size, file_offset, dirty: None };
                file_offset += r.size;
                region
            })
            .collect();
        let snapshot = source.describe(SnapshotKind::Full, None, regions, machine);
        let state_bytes = primary::send_state(stream, wrap(Box::new(snapshot))).map_err(wire_err)?;
        stream.flush().map_err(|e| e.to_string())?;
        Ok(Frozen {
            devices_quiesce_us: quiesced.devices_quiesce.as_micros() as u64,
            quiesced,
            frozen_at,
            final_pages: stats.pages,
            state_bytes,
            resume_vcpus,
        })
    }

    /// A validation, on the replication thread: freezes the VM just long enough to send the
    /// last epoch and the state for the shadow's trial; returns how long it was frozen, in
    /// microseconds. The caller then waits for the epoch's ack as usual.
    pub(crate) fn send_for_trial(
        &self,
        consumer: u64,
        epoch: u64,
        encoder: &mut Encoder,
        stream: &mut Box<dyn Stream>,
        id: u64,
        request: &ValidateRequest,
    ) -> Result<u64, String> {
        let (update, health) = (request.update.clone(), request.health);
        let (vcpus, devices) = (self.vcpus(), self.devices());
        let frozen = self.freeze_and_send(&vcpus, &devices, consumer, epoch, encoder, stream, |state| {
            Control::Validate { id, state, update, health }
        })?;
        Ok(frozen.frozen_at.elapsed().as_micros() as u64)
    }

    /// The switchover, on the replication thread: freeze, last epoch, state, wait for the
    /// shadow's word. On success the VM stays frozen; if the shadow could not start the VM or
    /// it failed its health check there, this one thaws and runs on.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn switch_over_on(
        &self,
        consumer: u64,
        epoch: u64,
        encoder: &mut Encoder,
        stream: &mut Box<dyn Stream>,
        update: &VmUpdate,
        health: &VerifyPolicy,
    ) -> Result<SwitchoverReport, String> {
        let started = Instant::now();
        let (message_update, message_health) = (update.clone(), *health);
        // The vCPUs and devices are held until the VM runs on the shadow; then this one stays
        // frozen but lets go of them: the API and the other replications must not wait for
        // the verdict.
        let (downtime_us, restore_us, build, frozen) = {
            let (vcpus, devices) = (self.vcpus(), self.devices());
            let frozen = self.freeze_and_send(&vcpus, &devices, consumer, epoch, encoder, stream, |state| {
                Control::Switchover { state, update: message_update, health: message_health }
            })?;
            // From here the shadow may be running the VM: an answer that does not come, or makes
            // no sense, leaves this VM frozen (two running copies would share its disks).
            // The shadow acknowledges the last epoch, then says how the restore went.
            match wire::read_frame(stream) {
                Ok(Frame::Control(Control::Ack { epoch: acked })) if acked == epoch => {}
                Ok(Frame::Control(Control::Failed { reason })) => {
                    return Err(format!("the shadow could not start the VM: {reason}"));
                }
                Ok(other) => {
                    return in_doubt(
                        frozen.quiesced,
                        format!("expected the shadow's ack of the last epoch, got {other:?}"),
                    );
                }
                Err(e) => return in_doubt(frozen.quiesced, e.to_string()),
            }
            let (restore_us, build) = match wire::read_frame(stream) {
                Ok(Frame::Control(Control::Activated { restore_us, build })) => (restore_us, build),
                Ok(Frame::Control(Control::Failed { reason })) => {
                    return Err(format!("the shadow could not start the VM: {reason}"));
                }
                Ok(other) => {
                    return in_doubt(frozen.quiesced, format!("expected the shadow's activation, got {other:?}"));
                }
                Err(e) => return in_doubt(frozen.quiesced, e.to_string()),
            };
            let downtime_us = frozen.frozen_at.elapsed().as_micros() as u64;
            let Frozen { quiesced, devices_quiesce_us, final_pages, state_bytes, resume_vcpus, .. } = frozen;
            quiesced.keep();
            (downtime_us, restore_us, build, (devices_quiesce_us, final_pages, state_bytes, resume_vcpus))
        };
        let (devices_quiesce_us, final_pages, state_bytes, resume_vcpus) = frozen;
        // Its verdict on the update and the VM's health decides whether it stays there; the
        // update's swaps may take a while on top of the window.
        let steps = update.devices.len() + usize::from(update.ram_backing.is_some()) * self.ram.regions().len();
        let patience = Duration::from_millis(health.window_ms) + VERDICT_SLACK + update::STEP_TIMEOUT * steps as u32;
        if let Err(e) = stream.set_read_timeout(Some(patience)) {
            return Err(format!("{IN_DOUBT}: {e}"));
        }
        let (applied, health) = match wire::read_frame(stream) {
            Ok(Frame::Control(Control::Healthy { applied, health })) => (applied, health),
            // The shadow stopped the VM and undid its disk writes: it runs here again, from
            // where it froze.
            Ok(Frame::Control(Control::Failed { reason })) => {
                log::warn!("the switchover rolled back by itself: {reason}");
                thaw(&self.vcpus(), &self.devices(), resume_vcpus);
                return Err(format!("the VM failed on the shadow, which stopped it; it runs here again: {reason}"));
            }
            Ok(Frame::Control(Control::UndoFailed { reason })) => {
                return Err(format!(
                    "{IN_DOUBT}: the VM failed on the shadow, which stopped it but could not undo its disk writes \
                     (this VM would find its disks changed): {reason}"
                ));
            }
            Ok(other) => return Err(format!("{IN_DOUBT}: expected the shadow's verdict, got {other:?}")),
            Err(e) => return Err(format!("{IN_DOUBT}: {e}")),
        };
        let report = SwitchoverReport {
            downtime_us,
            devices_quiesce_us,
            final_pages,
            state_bytes,
            restore_us,
            build,
            applied,
            health: Some(health),
            resume_vcpus,
        };
        log::info!("switched over in {:?} ({} us frozen)", started.elapsed(), report.downtime_us);
        // Frozen until commit: the shadow runs the VM and owns its disks now.
        Ok(report)
    }
}

/// Leaves the VM frozen: the shadow may be running it.
fn in_doubt(quiesced: Quiesced<'_>, why: String) -> Result<SwitchoverReport, String> {
    quiesced.keep();
    Err(format!("{IN_DOUBT}: {why}"))
}

/// A VM frozen for a switchover or a validation, its last epoch and state sent.
struct Frozen<'a> {
    quiesced: Quiesced<'a>,
    frozen_at: Instant,
    devices_quiesce_us: u64,
    final_pages: u64,
    state_bytes: u64,
    resume_vcpus: bool,
}

/// How long past its health window a shadow may take to give its verdict (the update's swaps
/// drain, probe and verify devices first).
const VERDICT_SLACK: Duration = Duration::from_secs(300);

/// How a switchover error begins when the shadow may be running the VM: this one then stays
/// frozen, and only commit (the shadow has it) or rollback ends the switchover.
pub(crate) const IN_DOUBT: &str = "the switchover is in doubt (the shadow may be running the VM; this one stays frozen \
                                   until commit or rollback)";
