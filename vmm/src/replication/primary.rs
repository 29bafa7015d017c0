//! The primary's side: a thread that streams the VM's memory to a shadow, epoch after epoch,
//! and on request freezes the VM, sends the last pages and the machine state, and hands the
//! VM over.
//!
//! An epoch reads (and clears) the dirty log (the guest's writes from KVM, the VMM's own from
//! virtio DMA) and sends the pages it names, encoded; the guest runs meanwhile, and a page it
//! writes during the copy is dirty again for the next epoch. The first epoch sends every
//! populated page. The shadow acknowledges each epoch, which is the lag reported.

use std::io::Write;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::codec::{CodecStats, Encoder, PAGE};
use super::trial::TrialReport;
use super::update::{self, HealthReport, VmUpdate};
use super::wire::{self, Control, Endpoint, Frame, Stream, WireError};
use crate::config::json::FieldError;
use crate::swap::VerifyPolicy;
use crate::vm::Vm;

/// `POST /replication`: start replicating to a shadow.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationRequest {
    /// Where the shadow listens (`vmm shadow --listen`): `unix:PATH` or `tcp:ADDR:PORT`.
    pub target: Endpoint,
    /// Time from one epoch's start to the next's, in milliseconds.
    #[serde(default = "default_epoch_ms")]
    pub epoch_ms: u64,
    /// How long either side waits for the other (an ack, a write taken, the next frame)
    /// before it gives up on the link, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// The longest link timeout a request may ask for.
pub const MAX_TIMEOUT_MS: u64 = 600_000;

fn default_epoch_ms() -> u64 {
    100
}

/// `POST /replication/switchover`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    /// The shadow to switch to; needed only when several replicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Endpoint>,
    /// Apply the update of this validation (it must have passed) on the shadow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<u64>,
    /// The health check the VM must pass on the shadow, or the switchover rolls itself back
    /// (500 ms without a failed device request, by default).
    #[serde(default = "update::default_health")]
    pub health: VerifyPolicy,
}

impl Default for SwitchoverRequest {
    fn default() -> Self {
        Self { target: None, validation: None, health: update::default_health() }
    }
}

/// `POST /replication/validate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateRequest {
    /// The shadow to run the trial; needed only when several replicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Endpoint>,
    /// What to try on the clone.
    pub update: VmUpdate,
    /// The health check the clone must pass (500 ms without a failed device request, by
    /// default).
    #[serde(default = "update::default_health")]
    pub health: VerifyPolicy,
}

/// `POST /replication/stop`: which shadow.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSelector {
    /// The shadow; needed only when several replicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Endpoint>,
}

/// A validation and, once the trial ended, its verdict.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValidationRecord {
    /// Its number, from 1.
    pub id: u64,
    /// What was tried.
    pub update: VmUpdate,
    /// How long this VM was frozen to send the state, in microseconds.
    pub pause_us: u64,
    /// The trial's verdict; absent while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<TrialReport>,
}

impl ValidationRecord {
    pub(crate) fn passed(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.passed)
    }
}

/// Validations `GET /replication` keeps.
const VALIDATIONS_KEPT: usize = 16;

/// The longest epoch a request may ask for.
pub const MAX_EPOCH_MS: u64 = 60_000;
/// Pages the encoder keeps for deltas and dedup (64 MiB).
const CACHE_PAGES: usize = 16 << 10;
/// Pages per batch on the wire (16 MiB raw).
const BATCH_PAGES: usize = 4096;
/// Epochs at most, back to back, before a switchover freezes the VM.
const CATCH_UP_EPOCHS: usize = 4;
/// An epoch this small ends the catch-up: the frozen one will be about as small.
const CONVERGED_PAGES: u64 = 256;

impl ReplicationRequest {
    /// Refuses values no replication can run with.
    pub fn check(&self) -> Result<(), FieldError> {
        crate::swap::check_ms("epoch_ms", self.epoch_ms, MAX_EPOCH_MS)?;
        crate::swap::check_ms("timeout_ms", self.timeout_ms, MAX_TIMEOUT_MS)
    }
}

/// Where replication stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationState {
    /// Never started.
    #[default]
    Idle,
    /// Connecting, or sending the first full pass.
    Starting,
    /// Epochs running: the shadow can take over.
    Replicating,
    /// The primary is frozen while the last epoch and the state go over.
    SwitchingOver,
    /// The VM runs on the shadow; this VM stays frozen until `commit`.
    SwitchedOver,
    /// Handed over for good: this VM has stopped.
    Committed,
    /// Stopped by request.
    Stopped,
    /// The link or the shadow failed; this VM runs on, replication can start again.
    Failed,
}

/// What a switchover cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SwitchoverReport {
    /// From freezing the primary to the shadow's VM running, in microseconds.
    pub downtime_us: u64,
    /// Of which draining the devices (the guest still ran), in microseconds.
    pub devices_quiesce_us: u64,
    /// Pages in the last epoch, sent frozen.
    pub final_pages: u64,
    /// Bytes of the state message.
    pub state_bytes: u64,
    /// The shadow's restore, from the state's arrival to the VM running, in microseconds.
    pub restore_us: u64,
    /// The `vmm` build the VM runs on now (the shadow's).
    pub build: String,
    /// What each step of the validated update did on the shadow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
    /// What the shadow's health check saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// Whether the vCPUs ran when frozen (a rollback resumes them only then).
    #[serde(skip)]
    pub resume_vcpus: bool,
}

/// `GET /replication`: every shadow this VM replicates to, or did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// In the order they were started; one that ended stays listed until a start to the same
    /// target replaces it (or newer ones push it out).
    pub shadows: Vec<ShadowStatus>,
}

/// Replication to one shadow.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShadowStatus {
    /// Where it stands.
    pub state: ReplicationState,
    /// The shadow, as `unix:PATH` or `tcp:ADDR:PORT`.
    pub target: String,
    /// Epochs the shadow has acknowledged (the first full pass included).
    pub epochs: u64,
    /// How long the last epoch took, from reading the dirty log to the shadow's acknowledgement,
    /// in microseconds: how far the shadow lags.
    pub lag_us: u64,
    /// Pages the last epoch sent.
    pub last_epoch_pages: u64,
    /// Totals over every epoch.
    pub totals: CodecStats,
    /// Microseconds spent encoding, over every epoch.
    pub encode_us: u64,
    /// Bytes sent per second over the last epoch.
    pub rate_bytes_per_s: u64,
    /// Why it failed or stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The switchover, once done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover: Option<SwitchoverReport>,
    /// The latest validations, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validations: Vec<ValidationRecord>,
}

/// Why a replication request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// A field is invalid.
    #[error("invalid replication request: {0}")]
    Invalid(#[from] FieldError),
    /// Replication runs already, or the state does not allow the request.
    #[error("{0}")]
    Conflict(String),
    /// The shadow could not be reached.
    #[error("{0}")]
    Unreachable(String),
    /// The shadow failed.
    #[error("{0}")]
    Shadow(String),
}

/// What the API asks of a replication thread.
pub(crate) enum Command {
    Switchover(VmUpdate, VerifyPolicy, Sender<Result<SwitchoverReport, String>>),
    Validate(ValidateRequest, Sender<Result<ValidationRecord, String>>),
    Stop,
    /// After a switchover: the shadow keeps the VM.
    Commit(Sender<Result<(), String>>),
    /// After a switchover: the shadow stops the VM, this one runs it again.
    Rollback(Sender<Result<(), String>>),
}

/// Connects to the shadow `target` names and starts the epochs on their own thread; they
/// read the dirty log as `consumer`. Returns where to send commands.
pub(crate) fn spawn(
    vm: &Arc<Vm>,
    request: &ReplicationRequest,
    status: Arc<Mutex<ShadowStatus>>,
    consumer: u64,
) -> Result<Sender<Command>, ReplicationError> {
    let target = &request.target;
    let stream = target
        .connect(Duration::from_secs(5))
        .map_err(|e| ReplicationError::Unreachable(format!("cannot reach the shadow at {target}: {e}")))?;
    let timing =
        Timing { epoch: Duration::from_millis(request.epoch_ms), timeout: Duration::from_millis(request.timeout_ms) };
    let (send, receive) = std::sync::mpsc::channel();
    let weak = Arc::downgrade(vm);
    std::thread::Builder::new()
        .name("replication".into())
        .spawn(move || {
            let outcome = run(&weak, stream, timing, &status, consumer, &receive);
            if let Some(vm) = weak.upgrade() {
                vm.forget_replication_consumer(consumer);
            }
            let mut status = status.lock().unwrap_or_else(|p| p.into_inner());
            match outcome {
                Ok(state) => status.state = state,
                Err(e) => {
                    log::warn!("replication failed: {e}");
                    status.state = ReplicationState::Failed;
                    status.error = Some(e.to_string());
                }
            }
        })
        .map_err(|e| ReplicationError::Shadow(format!("cannot start the replication thread: {e}")))?;
    Ok(send)
}

/// How long a rollback waits for the shadow to stop the VM and undo its disk writes.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(600);

/// How often epochs start, and how long to wait on the shadow.
#[derive(Clone, Copy)]
struct Timing {
    epoch: Duration,
    timeout: Duration,
}

/// The replication thread: the first pass, then an epoch every `epoch` until told otherwise.
fn run(
    vm: &Weak<Vm>,
    stream: Box<dyn Stream>,
    Timing { epoch, timeout }: Timing,
    status: &Mutex<ShadowStatus>,
    consumer: u64,
    commands: &Receiver<Command>,
) -> Result<ReplicationState, WireError> {
    let Some(memory_bytes) = vm.upgrade().map(|vm| vm.replication_memory_bytes()) else {
        return Ok(ReplicationState::Stopped);
    };
    let mut link = Link { stream, encoder: Encoder::new(CACHE_PAGES), status, consumer, trials: Vec::new(), next: 0 };
    link.stream.set_read_timeout(Some(timeout))?;
    link.stream.set_write_timeout(Some(timeout))?;
    // The shadow hears from us at least once an epoch: silence past this means the link died.
    let idle_ms = (epoch + timeout).as_millis() as u64;
    let hello = Control::Hello { version: wire::PROTOCOL_VERSION, memory_bytes, idle_ms };
    wire::write_frame(&mut link.stream, &Frame::Control(hello))?;
    loop {
        let started = Instant::now();
        let Some(live) = vm.upgrade() else { return Ok(ReplicationState::Stopped) };
        let (stats, encode_us) = link.epoch(&live, link.next == 0)?;
        drop(live);
        let took = started.elapsed();
        link.update(|s| {
            s.state = ReplicationState::Replicating;
            s.epochs += 1;
            s.lag_us = took.as_micros() as u64;
            s.last_epoch_pages = stats.pages;
            s.totals.add(&stats);
            s.encode_us += encode_us;
            s.rate_bytes_per_s = (stats.sent_bytes as f64 / took.as_secs_f64().max(1e-6)) as u64;
        });
        match commands.recv_timeout(epoch.saturating_sub(took)) {
            Err(RecvTimeoutError::Timeout) => {}
            // `send` lets these through only after a switchover.
            Ok(Command::Commit(reply) | Command::Rollback(reply)) => {
                let _ = reply.send(Err("no switchover to end".into()));
            }
            Err(RecvTimeoutError::Disconnected) | Ok(Command::Stop) => {
                link.stream.shutdown();
                return Ok(ReplicationState::Stopped);
            }
            Ok(Command::Validate(request, reply)) => {
                let Some(live) = vm.upgrade() else { return Ok(ReplicationState::Stopped) };
                link.validate(&live, request, reply)?;
            }
            Ok(Command::Switchover(_, _, reply)) if !link.trials.is_empty() => {
                // A verdict would arrive where the switchover expects the shadow's ack.
                let _ = reply.send(Err("a validation is still running; switch over once it has ended".into()));
                link.update(|s| s.state = ReplicationState::Replicating);
            }
            Ok(Command::Switchover(update, health, reply)) => {
                let Some(live) = vm.upgrade() else { return Ok(ReplicationState::Stopped) };
                link.update(|s| s.state = ReplicationState::SwitchingOver);
                link.catch_up(&live)?;
                let number = link.next;
                let outcome =
                    live.switch_over_on(consumer, number, &mut link.encoder, &mut link.stream, &update, &health);
                // The verdict's wait set its own timeout.
                let _ = link.stream.set_read_timeout(Some(timeout));
                let in_doubt = outcome.as_ref().is_err_and(|e| e.starts_with(crate::vm::IN_DOUBT));
                // The state first: a commit may follow the answer at once.
                match &outcome {
                    Ok(report) => link.update(|s| {
                        s.state = ReplicationState::SwitchedOver;
                        s.switchover = Some(report.clone());
                    }),
                    Err(e) if in_doubt => link.update(|s| {
                        s.state = ReplicationState::SwitchedOver;
                        s.error = Some(e.clone());
                    }),
                    Err(_) => {}
                }
                let _ = reply.send(outcome.clone());
                // The thread must not keep the VM alive while it waits for the last word.
                drop(live);
                return match outcome {
                    Ok(_) => after_switchover(&mut link.stream, commands),
                    Err(_) if in_doubt => after_switchover(&mut link.stream, commands),
                    Err(e) => Err(WireError::Ended(format!("the switchover failed and this VM runs on: {e}"))),
                };
            }
        }
    }
}

/// The primary's end of the link, epoch after epoch.
struct Link<'a> {
    stream: Box<dyn Stream>,
    encoder: Encoder,
    status: &'a Mutex<ShadowStatus>,
    /// Which of the dirty log's consumers this link is.
    consumer: u64,
    /// Validations whose trial runs on the shadow, and who waits for each verdict.
    trials: Vec<(u64, Sender<Result<ValidationRecord, String>>)>,
    /// The next epoch's number.
    next: u64,
}

impl Link<'_> {
    fn update(&self, f: impl FnOnce(&mut ShadowStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sends one epoch (every populated page with `everything`) and waits for its ack.
    fn epoch(&mut self, vm: &Vm, everything: bool) -> Result<(CodecStats, u64), WireError> {
        let number = self.next;
        let (stats, encode_us) =
            send_epoch(vm, self.consumer, number, &mut self.encoder, &mut self.stream, everything, false)?;
        wire::write_frame(&mut self.stream, &Frame::Control(Control::EpochEnd { epoch: number, stats }))?;
        self.expect_ack(number)?;
        self.next += 1;
        Ok((stats, encode_us))
    }

    /// Epochs back to back, while the guest runs, so that the frozen one that follows is
    /// small: each sends what the guest dirtied during the one before.
    fn catch_up(&mut self, vm: &Vm) -> Result<(), WireError> {
        for _ in 0..CATCH_UP_EPOCHS {
            let (stats, _) = self.epoch(vm, false)?;
            self.update(|s| s.epochs += 1);
            if stats.pages <= CONVERGED_PAGES {
                break;
            }
        }
        Ok(())
    }

    /// Sends the state for a trial (the VM frozen meanwhile); the verdict arrives later,
    /// before some epoch's ack, and goes to `reply`.
    fn validate(
        &mut self,
        vm: &Vm,
        request: ValidateRequest,
        reply: Sender<Result<ValidationRecord, String>>,
    ) -> Result<(), WireError> {
        self.catch_up(vm)?;
        let number = self.next;
        let id = {
            let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            status.validations.last().map_or(1, |v| v.id + 1)
        };
        let pause_us = match vm.send_for_trial(self.consumer, number, &mut self.encoder, &mut self.stream, id, &request)
        {
            Ok(pause_us) => pause_us,
            Err(e) => {
                // The stream may hold half the state: the link is no longer usable.
                let _ = reply.send(Err(format!("cannot send the state for the trial: {e}")));
                return Err(WireError::Malformed(format!("sending the state for a trial: {e}")));
            }
        };
        self.next += 1;
        let record = ValidationRecord { id, update: request.update, pause_us, report: None };
        self.update(|s| {
            s.validations.push(record);
            let excess = s.validations.len().saturating_sub(VALIDATIONS_KEPT);
            s.validations.drain(..excess);
        });
        self.trials.push((id, reply));
        self.expect_ack(number)?;
        self.update(|s| s.epochs += 1);
        Ok(())
    }

    /// Waits for the ack of `epoch`; trial verdicts may come first.
    fn expect_ack(&mut self, epoch: u64) -> Result<(), WireError> {
        loop {
            match wire::read_frame(&mut self.stream)? {
                Frame::Control(Control::Ack { epoch: acked }) if acked == epoch => return Ok(()),
                Frame::Control(Control::Validated { id, report }) => self.verdict(id, report)?,
                other => {
                    let e = format!("expected the shadow's ack of epoch {epoch}, got {other:?}");
                    return Err(WireError::Malformed(e));
                }
            }
        }
    }

    fn verdict(&mut self, id: u64, report: TrialReport) -> Result<(), WireError> {
        let Some(at) = self.trials.iter().position(|(waiting, _)| *waiting == id) else {
            return Err(WireError::Malformed(format!("a verdict on validation {id}, which is not running")));
        };
        let (_, reply) = self.trials.remove(at);
        let mut record = None;
        self.update(|s| {
            if let Some(kept) = s.validations.iter_mut().find(|v| v.id == id) {
                kept.report = Some(report.clone());
                record = Some(kept.clone());
            }
        });
        let record =
            record.unwrap_or(ValidationRecord { id, update: VmUpdate::default(), pause_us: 0, report: Some(report) });
        let _ = reply.send(Ok(record));
        Ok(())
    }
}

/// After a switchover the link stays up for the last word: commit (the shadow keeps the VM)
/// or rollback (it stops it; the caller thaws this one).
fn after_switchover(stream: &mut Box<dyn Stream>, commands: &Receiver<Command>) -> Result<ReplicationState, WireError> {
    loop {
        match commands.recv() {
            Ok(Command::Commit(reply)) => {
                // The operator's decision: the shadow has the VM. Telling it is a courtesy (it
                // keeps the VM whether or not it hears).
                if let Err(e) = wire::write_frame(stream, &Frame::Control(Control::Commit)) {
                    log::warn!("could not tell the shadow about the commit: {e}");
                }
                let _ = reply.send(Ok(()));
                return Ok(ReplicationState::Committed);
            }
            Ok(Command::Rollback(reply)) => {
                // Undoing the shadow's disk writes takes as long as it takes to write them back.
                let _ = stream.set_read_timeout(Some(ROLLBACK_TIMEOUT));
                let outcome = wire::write_frame(stream, &Frame::Control(Control::Rollback))
                    .map_err(|e| e.to_string())
                    .and_then(|()| match wire::read_frame(stream).map_err(|e| e.to_string())? {
                        Frame::Control(Control::RolledBack) => Ok(()),
                        Frame::Control(Control::UndoFailed { reason }) => Err(format!(
                            "the shadow stopped the VM but could not undo its disk writes, so this VM stays frozen \
                             (its disks hold the shadow's writes): {reason}"
                        )),
                        other => Err(format!("expected the shadow's rollback, got {other:?}")),
                    });
                let done = outcome.is_ok();
                let _ = reply.send(outcome);
                // A rollback that failed leaves the switchover where it was: frozen here.
                if done {
                    return Ok(ReplicationState::Stopped);
                }
            }
            Ok(Command::Switchover(_, _, reply)) => {
                let _ = reply.send(Err("switched over already".into()));
            }
            Ok(Command::Validate(_, reply)) => {
                let _ = reply.send(Err("switched over already".into()));
            }
            // Only commit or rollback ends a switchover.
            Ok(Command::Stop) => {}
            Err(_) => return Ok(ReplicationState::SwitchedOver),
        }
    }
}

/// Sends the pages of one epoch: the dirty ones, or with `everything` every populated page.
/// Returns what it cost and the microseconds spent encoding.
pub(crate) fn send_epoch(
    vm: &Vm,
    consumer: u64,
    epoch: u64,
    encoder: &mut Encoder,
    out: &mut dyn Write,
    everything: bool,
    frozen: bool,
) -> Result<(CodecStats, u64), WireError> {
    let mut total = CodecStats::default();
    let mut encode = Duration::ZERO;
    let mut in_batch = 0;
    let flush = |encoder: &mut Encoder, total: &mut CodecStats, out: &mut dyn Write| -> Result<(), WireError> {
        let (batch, stats) = encoder.finish();
        total.add(&stats);
        wire::write_frame(out, &Frame::Pages { epoch, batch })
    };
    let pages = vm.replication_pages(consumer, everything).map_err(|e| WireError::Malformed(e.to_string()))?;
    for (offset, memory) in pages {
        let started = Instant::now();
        let bytes = if frozen { memory.copy_out(0..PAGE) } else { memory.copy_volatile(0..PAGE) };
        encoder.page(offset, &bytes);
        encode += started.elapsed();
        in_batch += 1;
        if in_batch == BATCH_PAGES {
            flush(encoder, &mut total, out)?;
            in_batch = 0;
        }
    }
    if in_batch > 0 {
        flush(encoder, &mut total, out)?;
    }
    Ok((total, encode.as_micros() as u64))
}

/// Sends the message carrying the machine's state (a switchover's or a trial's); returns
/// its size.
pub(crate) fn send_state(out: &mut dyn Write, message: Control) -> Result<u64, WireError> {
    let mut counter = CountingWriter(0);
    ciborium::into_writer(&message, &mut counter).map_err(|e| WireError::Malformed(e.to_string()))?;
    wire::write_frame(out, &Frame::Control(message))?;
    Ok(counter.0)
}

struct CountingWriter(u64);

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
