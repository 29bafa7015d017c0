//! Live storage migration of a disk: the guest keeps running on the source while every chunk
//! is copied to the target (a mirror sits in the disk's backend slot), then a short blackout
//! copies what changed meanwhile and puts the target in charge. Until the swap commits, writes
//! also go to the source, so a rollback loses nothing.

use std::time::{Duration, Instant};

use devices::blk::{BlockBackend, Half, MirrorBackend, MirrorControl, VirtioBlock};
use devices::lifecycle::BackendSlot;
use serde::{Deserialize, Serialize};

use super::record::{CopyStats, Phase, SwapHandle, SwapState};
use super::transaction::{SwapParams, SwapTarget, quiesce_and_drain, roll_back};
use super::urgent::Urgent;

/// When the background copy is close enough to switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrateOptions {
    /// Switch once at most this many 1 MiB chunks are dirty or being copied; they are copied
    /// while the disk takes no requests. Guest writes are mirrored to the target during the
    /// copy, so the default of 0 is reached and the switch copies nothing.
    pub converge_chunks: u64,
    /// Give up (and roll back) if the copy has not converged by then.
    pub timeout_ms: u64,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self { converge_chunks: 0, timeout_ms: 600_000 }
    }
}

/// Runs a migration of `target`'s disk onto `new`.
pub fn run(
    target: &SwapTarget<VirtioBlock>,
    new: Box<dyn BlockBackend>,
    params: &SwapParams,
    options: &MigrateOptions,
    record: &SwapHandle,
) {
    let fail = |state, reason: String| record.finish(state, Some(reason));

    // 1. Put the mirror in the slot: a blackout as short as any switch.
    let info = target.lock().backend().info().clone();
    let (mirror, control) = match MirrorBackend::detached(&info, new) {
        Ok(pair) => pair,
        Err(e) => return fail(SwapState::Failed, format!("cannot set up the mirror: {e}")),
    };
    let urgent = Urgent::enter();
    let (blackout, drained) = quiesce_and_drain(target, params.drain_timeout, record);
    if let Err(pending) = drained {
        record.add_blackout(blackout.elapsed());
        return fail(SwapState::Failed, format!("{pending} request(s) still in flight; nothing changed"));
    }
    record.phase(Phase::Switch, Some("mirror installed".into()));
    let attached = {
        // One critical section: once the source is attached the event loop starts copying,
        // and it must find the device already taking requests again.
        let mut dev = target.lock();
        let source = dev.replace_backend(Box::new(mirror));
        let attached = control.attach_source(source).map_err(|(e, source)| {
            // Back as it was; the mirror (now holding nothing) is dropped.
            drop(dev.replace_backend(source));
            e
        });
        target.resume_locked(&mut dev);
        attached
    };
    target.resync.resync();
    record.add_blackout(blackout.elapsed());
    drop(urgent);
    if let Err(e) = attached {
        return fail(
            SwapState::Failed,
            format!("cannot watch the disk's backend from the mirror: {e}; nothing changed"),
        );
    }

    // 2. Copy while the guest runs, until few dirty chunks remain.
    record.phase(Phase::Copy, Some(format!("{} bytes", info.capacity)));
    let copy_started = Instant::now();
    let deadline = copy_started + Duration::from_millis(options.timeout_ms);
    let abort = |reason: String| {
        roll_back_mirror(target, &control, params, record, &reason);
        record.finish(SwapState::RolledBack, Some(reason));
    };
    loop {
        let p = control.progress();
        record.set_copy(CopyStats {
            bytes_total: info.capacity,
            bytes_copied: p.bytes_copied,
            copy_us: copy_started.elapsed().as_micros() as u64,
            final_copy_bytes: 0,
        });
        if p.failed {
            return abort("copying to the target failed".into());
        }
        if let Err(reason) = target.check_running() {
            return abort(reason);
        }
        if p.dirty_chunks + p.copies_in_flight <= options.converge_chunks {
            break;
        }
        if Instant::now() >= deadline {
            return abort(format!(
                "copy did not converge in {} ms ({} chunks dirty)",
                options.timeout_ms, p.dirty_chunks
            ));
        }
        // Progress is driven by the event loop; this thread only watches it.
        std::thread::sleep(Duration::from_millis(2));
    }

    // 3. Blackout: stop the guest's writes, copy the rest, let the target serve.
    let urgent = Urgent::enter();
    let (blackout, drained) = quiesce_and_drain(target, params.drain_timeout, record);
    if let Err(pending) = drained {
        record.add_blackout(blackout.elapsed());
        return abort(format!("{pending} request(s) still in flight before the final copy"));
    }
    record.phase(Phase::FinalCopy, None);
    let final_bytes = {
        let _dev = target.lock(); // keeps the event loop off the mirror while we drive it
        control.finish_copy(params.drain_timeout)
    };
    let final_bytes = match final_bytes {
        Ok(n) => n,
        Err(e) => {
            target.resume();
            record.add_blackout(blackout.elapsed());
            return abort(format!("final copy failed: {e}"));
        }
    };
    record.set_copy(CopyStats {
        bytes_total: info.capacity,
        bytes_copied: control.progress().bytes_copied,
        copy_us: copy_started.elapsed().as_micros() as u64,
        final_copy_bytes: final_bytes,
    });
    record.phase(Phase::Switch, Some("target serves, writes mirrored to the source".into()));
    target.lock().set_probation(true);
    record.phase(Phase::Resume, None);
    target.resume();
    record.add_blackout(blackout.elapsed());
    drop(urgent);

    // 4. Verify on the target; the source still gets every write.
    record.phase(Phase::Verify, None);
    let verdict = target.verify(&params.verify, || {});
    match verdict {
        Ok(_) => commit(target, &control, params, record).unwrap_or_else(abort),
        Err(reason) => abort(reason),
    }
}

/// How many times the commit tries to catch the disk with nothing in flight.
const COMMIT_ATTEMPTS: u32 = 3;

/// Step 5, commit: the plain target replaces the mirror (one more short blackout). The mirror
/// can only be taken out of the slot with nothing in flight through it; if the disk will not
/// drain, the caller rolls back instead (the source has every write, so nothing is lost).
fn commit(
    target: &SwapTarget<VirtioBlock>,
    control: &MirrorControl,
    params: &SwapParams,
    record: &SwapHandle,
) -> Result<(), String> {
    // The source goes at commit: the target must be durable first (off the blackout; from
    // here on, guest flushes reach both halves anyway).
    control.flush_target(params.drain_timeout).map_err(|e| format!("cannot flush the target: {e}"))?;
    // The mirror comes out of the slot under a last quiesce and drain (their own timeline
    // entries); `Commit` is entered only once the target serves alone.
    let urgent = Urgent::enter();
    let mut attempt = 0;
    let mut source_dropped = false;
    let blackout = loop {
        attempt += 1;
        let (blackout, drained) = quiesce_and_drain(target, params.drain_timeout, record);
        match drained {
            Ok(()) => break blackout,
            Err(pending) => {
                record.add_blackout(blackout.elapsed());
                if source_dropped {
                    // The target itself does not finish its requests, and the source no longer
                    // has every write: the disk stays as it is, on the target through the mirror.
                    let note =
                        format!("{pending} request(s) never finished on the target; it serves through the mirror");
                    // No more holding back failures for a rollback that cannot happen.
                    target.lock().set_probation(false);
                    record.phase(Phase::Commit, Some(note.clone()));
                    record.finish(SwapState::Committed, Some(note));
                    return Ok(());
                }
                if attempt >= COMMIT_ATTEMPTS {
                    // Stuck on the source? It was only kept for a rollback; the target has
                    // everything and passed its health check, so it carries on without it.
                    let dropped = control.drop_source();
                    if dropped == 0 {
                        return Err(format!("{pending} request(s) still in flight at commit, {attempt} tries"));
                    }
                    source_dropped = true;
                    let note =
                        format!("the source did not finish {dropped} request(s): dropped, no rollback from here");
                    record.phase(Phase::Drain, Some(note));
                    continue;
                }
                // Let the disk serve (and the slow half catch up) before the next try.
                std::thread::sleep(params.drain_timeout.min(Duration::from_millis(100)));
            }
        }
    };
    let Some(backend) = control.take(Half::Target) else {
        target.resume();
        record.add_blackout(blackout.elapsed());
        return Err("internal error: the mirror lost its target".into());
    };
    let mirror = {
        let mut dev = target.lock();
        dev.set_probation(false);
        dev.replace_backend(backend)
    };
    target.resume();
    record.add_blackout(blackout.elapsed());
    drop(mirror);
    drop(control.take(Half::Source));
    record.phase(Phase::Commit, Some("mirror removed: the target serves alone, the source is closed".into()));
    // The device runs again: what the commit writes to disk (a state file) runs at normal priority.
    drop(urgent);
    record.finish(SwapState::Committed, None);
    Ok(())
}

/// Puts the source back in the slot in place of the mirror.
fn roll_back_mirror(
    target: &SwapTarget<VirtioBlock>,
    control: &MirrorControl,
    params: &SwapParams,
    record: &SwapHandle,
    reason: &str,
) {
    // The source has every write: while copying it served them, in write-through it got them.
    // Copies in flight read from the source and write to the target: stop them and wait, or
    // the source would go back in the slot still busy. Before the blackout: the guest's own
    // requests keep flowing through the mirror meanwhile.
    if let Err(n) = control.stop_copying(params.drain_timeout) {
        record.phase(Phase::Rollback, Some(format!("{n} chunk copies did not finish; abandoned")));
    }
    roll_back(target, || control.take(Half::Source), params.drain_timeout, record, reason);
    drop(control.take(Half::Target));
}
