//! What a swap did and when: the record the API reports, with a timestamped timeline.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// A step of a swap transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Opening the new backend and checking it can take over.
    Prepare,
    /// Live migration: copying the disk to the new backend while the guest runs.
    Copy,
    /// The device stops taking new requests.
    Quiesce,
    /// Waiting for requests in flight on the old backend.
    Drain,
    /// Live migration: copying what the guest changed during the copy.
    FinalCopy,
    /// The new backend goes into the slot, queue state untouched.
    Switch,
    /// The device takes requests again.
    Resume,
    /// Health check of the new backend under real traffic.
    Verify,
    /// The old backend is closed; done.
    Commit,
    /// The old backend goes back into the slot.
    Rollback,
}

/// Where a swap stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapState {
    /// Still in progress.
    Running,
    /// The new backend is in place for good.
    Committed,
    /// The new backend failed its health check or the switch; the old one is back.
    RolledBack,
    /// Refused or failed before anything changed.
    Failed,
}

/// In words: `committed`, `rolled back`, ...
impl std::fmt::Display for SwapState {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Committed => "committed",
            Self::RolledBack => "rolled back",
            Self::Failed => "failed",
        })
    }
}

/// One step of a swap's timeline: a phase entered, and when.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineEntry {
    /// The phase entered.
    pub phase: Phase,
    /// Microseconds since the swap was requested.
    pub at_us: u64,
    /// What happened in words, where there is more to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Live-migration statistics.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CopyStats {
    /// The disk's capacity in bytes.
    pub bytes_total: u64,
    /// Bytes copied so far, counting a chunk again each time the guest dirtied it and it was recopied.
    pub bytes_copied: u64,
    /// Microseconds from the start of the copy to the latest update (the end of the final copy).
    pub copy_us: u64,
    /// Copied during the blackout, after the guest stopped writing.
    pub final_copy_bytes: u64,
}

/// Everything known about one swap.
#[derive(Clone, Debug, Serialize)]
pub struct SwapRecord {
    /// The swap's id, unique within the VM (numbered from 1).
    pub id: u64,
    /// Id of the device swapped.
    pub device: String,
    /// The [`SwapMode`](super::SwapMode) as serialized: `switch`, `migrate` or `new_image`.
    pub mode: String,
    /// The old backend, described in words.
    pub from: String,
    /// The new backend, described in words; empty until it has been opened.
    pub to: String,
    /// Where the swap stands.
    pub state: SwapState,
    /// The latest phase entered.
    pub phase: Phase,
    /// Why the swap failed or rolled back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Time the device took no new requests (quiesce to resume), switch and rollback summed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blackout_us: Option<u64>,
    /// Copy statistics of a live migration ([`SwapMode::Migrate`](super::SwapMode::Migrate)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyStats>,
    /// The phases entered, in order, starting with [`Phase::Prepare`] at 0.
    pub timeline: Vec<TimelineEntry>,
    /// Request to end, once ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    #[serde(skip)]
    started: Option<Instant>,
}

/// A record being written by a swap thread and read by the API.
#[derive(Clone)]
pub struct SwapHandle {
    inner: Arc<(Mutex<SwapRecord>, Condvar)>,
    /// Runs when the swap commits, before anyone can see it committed.
    on_commit: Arc<Mutex<Option<CommitHook>>>,
    /// Runs after the swap committed (the VM records its new configuration there).
    after_commit: Option<CommitListener>,
}

type CommitHook = Box<dyn FnOnce() + Send>;

/// Called for every swap of a VM that commits, before the record says so; an error is shown
/// in the record's reason (the swap stands).
pub type CommitListener = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl SwapHandle {
    /// A running swap of `device` from backend `from`, in [`Phase::Prepare`] from now.
    pub fn new(id: u64, device: &str, mode: &str, from: String) -> Self {
        let record = SwapRecord {
            id,
            device: device.to_string(),
            mode: mode.to_string(),
            from,
            to: String::new(),
            state: SwapState::Running,
            phase: Phase::Prepare,
            reason: None,
            blackout_us: None,
            copy: None,
            timeline: vec![TimelineEntry { phase: Phase::Prepare, at_us: 0, detail: None }],
            duration_us: None,
            started: Some(Instant::now()),
        };
        Self { inner: Arc::new((Mutex::new(record), Condvar::new())), on_commit: Arc::default(), after_commit: None }
    }

    /// Has `listener` called once the swap has committed.
    pub(crate) fn with_listener(mut self, listener: Option<CommitListener>) -> Self {
        self.after_commit = listener;
        self
    }

    fn lock(&self) -> MutexGuard<'_, SwapRecord> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the record as it stands now.
    pub fn snapshot(&self) -> SwapRecord {
        self.lock().clone()
    }

    /// The swap's id.
    pub fn id(&self) -> u64 {
        self.lock().id
    }

    /// Id of the device being swapped.
    pub fn device(&self) -> String {
        self.lock().device.clone()
    }

    /// Whether the swap has not ended yet.
    pub fn is_running(&self) -> bool {
        self.lock().state == SwapState::Running
    }

    /// Enters `phase`, timestamped.
    pub fn phase(&self, phase: Phase, detail: Option<String>) {
        let mut r = self.lock();
        let at_us = r.started.map_or(0, |s| s.elapsed().as_micros() as u64);
        r.phase = phase;
        r.timeline.push(TimelineEntry { phase, at_us, detail });
    }

    /// Records the new backend's description, once it is open.
    pub fn set_target(&self, to: String) {
        self.lock().to = to;
    }

    /// Adds `blackout` to the time the device took no new requests.
    pub fn add_blackout(&self, blackout: Duration) {
        let mut r = self.lock();
        r.blackout_us = Some(r.blackout_us.unwrap_or(0) + blackout.as_micros() as u64);
    }

    /// Replaces the live-migration statistics with `stats`.
    pub fn set_copy(&self, stats: CopyStats) {
        self.lock().copy = Some(stats);
    }

    /// Has `hook` run when the swap commits, before the record says so (a device records its
    /// new backend there, so nothing that sees the swap committed sees the old one).
    pub fn on_commit(&self, hook: impl FnOnce() + Send + 'static) {
        *self.on_commit.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(hook));
    }

    /// Ends the swap.
    pub fn finish(&self, state: SwapState, reason: Option<String>) {
        if state == SwapState::Committed
            && let Some(hook) = self.on_commit.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            hook();
        }
        // Before the record says committed: whoever sees the commit sees it recorded on disk.
        let mut reason = reason;
        if state == SwapState::Committed
            && let Some(listener) = &self.after_commit
            && let Err(e) = listener()
        {
            reason = Some(format!("committed, but {e}"));
        }
        {
            let mut r = self.lock();
            r.state = state;
            r.reason = reason;
            r.duration_us = r.started.map(|s| s.elapsed().as_micros() as u64);
        }
        self.inner.1.notify_all();
    }

    /// Waits for the swap to end (or `timeout`) and returns its record.
    pub fn wait(&self, timeout: Duration) -> SwapRecord {
        let guard = self.lock();
        let (guard, _) = self
            .inner
            .1
            .wait_timeout_while(guard, timeout, |r| r.state == SwapState::Running)
            .unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }
}
