//! A VM's replications: to one shadow or several at once (each its own thread, link and
//! epochs), and the API's requests routed to the one they name. Each replication reads the
//! dirty log as a consumer of its own: KVM's log is read and cleared once, and what it says
//! is kept for every consumer until that consumer's next epoch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use super::primary::{
    self, Command, ReplicationError, ReplicationRequest, ReplicationState, ReplicationStatus, ShadowSelector,
    ShadowStatus, SwitchoverReport, SwitchoverRequest, ValidateRequest, ValidationRecord,
};
use super::update::{self, VmUpdate};
use super::wire::Endpoint;
use crate::config::json::FieldError;
use crate::vm::Vm;

/// Shadows replicated to at once, at most.
pub const MAX_SHADOWS: usize = 4;
/// Replications listed, ended ones included.
const LISTED: usize = 8;

/// One replication.
struct Entry {
    status: Arc<Mutex<ShadowStatus>>,
    /// Set once connected.
    commands: Option<Sender<Command>>,
}

impl Entry {
    fn status(&self) -> MutexGuard<'_, ShadowStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> ReplicationState {
        self.status().state
    }

    fn running(&self) -> bool {
        !matches!(self.state(), ReplicationState::Stopped | ReplicationState::Failed | ReplicationState::Committed)
    }
}

/// Every replication of one VM.
#[derive(Default)]
pub struct ReplicationManager {
    entries: Mutex<Vec<Entry>>,
    /// Per consumer, the pages dirtied since its last epoch, per RAM region.
    dirty: Mutex<BTreeMap<u64, Vec<Vec<u64>>>>,
    next_consumer: AtomicU64,
}

impl ReplicationManager {
    fn entries(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where each replication stands.
    pub fn status(&self) -> ReplicationStatus {
        ReplicationStatus { shadows: self.entries().iter().map(|e| e.status().clone()).collect() }
    }

    /// Whether replication forbids what would read its dirty log or wake a frozen VM:
    /// snapshots, memory and device swaps.
    pub fn in_use(&self) -> bool {
        self.entries().iter().any(Entry::running)
    }

    /// Whether the VM is frozen for a switchover: nothing may resume it but a rollback.
    pub fn frozen(&self) -> bool {
        self.entries()
            .iter()
            .any(|e| matches!(e.state(), ReplicationState::SwitchingOver | ReplicationState::SwitchedOver))
    }

    /// Connects to the shadow and starts its epochs on their own thread.
    pub(crate) fn start(&self, vm: &Arc<Vm>, request: &ReplicationRequest) -> Result<ShadowStatus, ReplicationError> {
        request.check()?;
        let target = request.target.to_string();
        let status = {
            // Claimed before connecting: a second start to the same shadow, a snapshot or a
            // memory swap arriving meanwhile is refused.
            let mut entries = self.entries();
            if entries
                .iter()
                .any(|e| matches!(e.state(), ReplicationState::SwitchingOver | ReplicationState::SwitchedOver))
            {
                return Err(ReplicationError::Conflict("the VM is switching over".into()));
            }
            if entries.iter().any(|e| e.running() && e.status().target == target) {
                return Err(ReplicationError::Conflict(format!("replication to {target} runs already")));
            }
            if entries.iter().filter(|e| e.running()).count() >= MAX_SHADOWS {
                return Err(ReplicationError::Conflict(format!("{MAX_SHADOWS} shadows replicate already")));
            }
            // An ended replication to the same target makes way, and the oldest ended ones
            // once the list is long.
            entries.retain(|e| e.running() || e.status().target != target);
            while entries.len() >= LISTED {
                let Some(ended) = entries.iter().position(|e| !e.running()) else { break };
                entries.remove(ended);
            }
            let status = ShadowStatus { state: ReplicationState::Starting, target, ..Default::default() };
            let status = Arc::new(Mutex::new(status));
            entries.push(Entry { status: status.clone(), commands: None });
            status
        };
        let consumer = self.next_consumer.fetch_add(1, Ordering::SeqCst);
        // Registered before the first pass reads memory: what the guest writes meanwhile is
        // in the next epoch.
        self.dirty_lock().insert(consumer, Vec::new());
        match primary::spawn(vm, request, status.clone(), consumer) {
            Ok(commands) => {
                let mut entries = self.entries();
                if let Some(entry) = entries.iter_mut().find(|e| Arc::ptr_eq(&e.status, &status)) {
                    entry.commands = Some(commands);
                }
                drop(entries);
                Ok(status.lock().unwrap_or_else(|p| p.into_inner()).clone())
            }
            Err(e) => {
                self.forget_consumer(consumer);
                let mut status = status.lock().unwrap_or_else(|p| p.into_inner());
                status.state = ReplicationState::Failed;
                status.error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// The running replication `target` names, or the only one running.
    fn select<T>(
        &self,
        target: Option<&Endpoint>,
        f: impl FnOnce(&Entry) -> Result<T, ReplicationError>,
    ) -> Result<T, ReplicationError> {
        let entries = self.entries();
        let running: Vec<&Entry> = entries.iter().filter(|e| e.running()).collect();
        let entry = match target.map(ToString::to_string) {
            Some(target) => running.into_iter().find(|e| e.status().target == target).ok_or_else(|| {
                ReplicationError::Invalid(FieldError::new("target", format!("no replication to {target} runs")))
            })?,
            None => match running.as_slice() {
                [one] => one,
                [] => return Err(ReplicationError::Conflict("no replication runs".into())),
                several => {
                    let e = format!("{} shadows replicate: name one as target", several.len());
                    return Err(ReplicationError::Invalid(FieldError::new("target", e)));
                }
            },
        };
        f(entry)
    }

    /// Sends `command` to the replication `target` names if its state is one of `states`
    /// and no switchover holds the VM; with `claim`, marks it switching over at once, so that
    /// no second switchover or validation gets in.
    fn send(
        &self,
        target: Option<&Endpoint>,
        states: &[ReplicationState],
        claim: bool,
        command: Command,
    ) -> Result<(), ReplicationError> {
        if self.frozen() {
            return Err(ReplicationError::Conflict("the VM is switching over".into()));
        }
        self.select(target, |entry| {
            let state = entry.state();
            if !states.contains(&state) {
                let target = entry.status().target.clone();
                return Err(ReplicationError::Conflict(format!("replication to {target} is {state:?}")));
            }
            if claim {
                entry.status().state = ReplicationState::SwitchingOver;
            }
            let sent = entry.commands.as_ref().and_then(|c| c.send(command).ok());
            if sent.is_none() {
                if claim {
                    entry.status().state = state;
                }
                return Err(ReplicationError::Conflict("replication has ended".into()));
            }
            Ok(())
        })
    }

    /// Stops every replication still sending epochs: the VM has left, or may have.
    fn stop_others(&self) {
        for entry in self.entries().iter() {
            if matches!(entry.state(), ReplicationState::Starting | ReplicationState::Replicating)
                && let Some(commands) = &entry.commands
            {
                // A replication that ended meanwhile has nothing to stop.
                let _ = commands.send(Command::Stop);
            }
        }
    }

    /// Freezes the VM, sends the last epoch and the state to the shadow the request names,
    /// and waits for it to run the VM (with the validated update applied) and find it healthy;
    /// the other replications then stop (the VM has left). On failure the VM runs on here.
    pub(crate) fn switchover(&self, request: &SwitchoverRequest) -> Result<SwitchoverReport, ReplicationError> {
        update::check_health_policy("health", &request.health)?;
        let update = self.select(request.target.as_ref(), |entry| {
            let status = entry.status();
            if let Some(running) = status.validations.iter().find(|v| v.report.is_none()) {
                let e = format!("validation {} is still running; switch over once it has ended", running.id);
                return Err(ReplicationError::Conflict(e));
            }
            match request.validation {
                None => Ok(VmUpdate::default()),
                Some(id) => match status.validations.iter().find(|v| v.id == id) {
                    Some(record) if record.passed() => Ok(record.update.clone()),
                    Some(_) => Err(ReplicationError::Conflict(format!("validation {id} did not pass"))),
                    None => {
                        let e = format!("no validation {id} on the shadow at {}", status.target);
                        Err(FieldError::new("validation", e).into())
                    }
                },
            }
        })?;
        let (reply, answer) = std::sync::mpsc::channel();
        let command = Command::Switchover(update, request.health, reply);
        let running = [ReplicationState::Starting, ReplicationState::Replicating];
        self.send(request.target.as_ref(), &running, true, command)?;
        let outcome = answer
            .recv()
            .map_err(|_| ReplicationError::Shadow("replication ended during the switchover".into()))
            .and_then(|answer| answer.map_err(ReplicationError::Shadow));
        // Switched over, or in doubt: either way the VM may run elsewhere now.
        if self.frozen() {
            self.stop_others();
        }
        outcome
    }

    /// Runs a trial of `request.update` on the shadow the request names and waits for its
    /// verdict.
    pub(crate) fn validate(&self, request: &ValidateRequest) -> Result<ValidationRecord, ReplicationError> {
        update::check_health_policy("health", &request.health)?;
        // An empty update is a trial of the shadow's own build.
        request.update.check()?;
        let (reply, answer) = std::sync::mpsc::channel();
        let command = Command::Validate(request.clone(), reply);
        let running = [ReplicationState::Starting, ReplicationState::Replicating];
        self.send(request.target.as_ref(), &running, false, command)?;
        answer
            .recv()
            .map_err(|_| ReplicationError::Shadow("replication ended during the validation".into()))?
            .map_err(ReplicationError::Shadow)
    }

    /// Stops the epochs to the shadow `selector` names (it is told nothing more and gives up).
    pub(crate) fn stop(&self, selector: &ShadowSelector) -> Result<(), ReplicationError> {
        let states = [ReplicationState::Starting, ReplicationState::Replicating];
        self.send(selector.target.as_ref(), &states, false, Command::Stop)
    }

    /// After a switchover, the last word to the shadow that has the VM; returns that shadow's
    /// status.
    fn last_word(
        &self,
        command: impl FnOnce(Sender<Result<(), String>>) -> Command,
        then: ReplicationState,
    ) -> Result<ShadowStatus, ReplicationError> {
        let entries = self.entries();
        let Some(entry) = entries.iter().find(|e| e.state() == ReplicationState::SwitchedOver) else {
            return Err(ReplicationError::Conflict("no switchover to end".into()));
        };
        let (reply, answer) = std::sync::mpsc::channel();
        let sent = entry.commands.as_ref().and_then(|c| c.send(command(reply)).ok());
        sent.ok_or_else(|| ReplicationError::Conflict("replication has ended".into()))?;
        let status = entry.status.clone();
        drop(entries);
        answer
            .recv()
            .map_err(|_| ReplicationError::Shadow("replication ended".into()))?
            .map_err(ReplicationError::Shadow)?;
        let mut status = status.lock().unwrap_or_else(|p| p.into_inner());
        status.state = then;
        Ok(status.clone())
    }

    /// Tells the shadow the VM is its own for good.
    pub(crate) fn commit(&self) -> Result<ShadowStatus, ReplicationError> {
        self.last_word(Command::Commit, ReplicationState::Committed)
    }

    /// Has the shadow stop the VM and undo its disk writes, so that this one can run it
    /// again; returns that shadow's status.
    pub(crate) fn rollback(&self) -> Result<ShadowStatus, ReplicationError> {
        self.last_word(Command::Rollback, ReplicationState::Stopped)
    }

    fn dirty_lock(&self) -> MutexGuard<'_, BTreeMap<u64, Vec<Vec<u64>>>> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the dirty log with `read` (per RAM region), adds what it says to every
    /// consumer's pages, and returns (and clears) `consumer`'s. The read and the merge are one
    /// step: a consumer freezing the VM for its last epoch must not miss pages another has
    /// read and not merged yet.
    pub(crate) fn dirty_for<E>(
        &self,
        consumer: u64,
        read: impl FnOnce() -> Result<Vec<Vec<u64>>, E>,
    ) -> Result<Vec<Vec<u64>>, E> {
        let mut dirty = self.dirty_lock();
        let read = read()?;
        for pending in dirty.values_mut() {
            pending.resize(pending.len().max(read.len()), Vec::new());
            for (into, from) in pending.iter_mut().zip(&read) {
                into.resize(into.len().max(from.len()), 0);
                for (word, bits) in into.iter_mut().zip(from) {
                    *word |= bits;
                }
            }
        }
        Ok(dirty.get_mut(&consumer).map(std::mem::take).unwrap_or(read))
    }

    /// `consumer` reads the dirty log no more.
    pub(crate) fn forget_consumer(&self, consumer: u64) {
        self.dirty_lock().remove(&consumer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_consumer_gets_every_page_dirtied_since_its_last_read() {
        let manager = ReplicationManager::default();
        manager.dirty_lock().insert(1, Vec::new());
        manager.dirty_lock().insert(2, Vec::new());
        // Consumer 1 reads: the log said pages 0 and 65 (two words in one region).
        assert_eq!(manager.dirty_for(1, || Ok::<_, ()>(vec![vec![0b1, 0b10]])), Ok(vec![vec![0b1, 0b10]]));
        // Consumer 2 reads later: what 1 saw, and what the log says now.
        assert_eq!(manager.dirty_for(2, || Ok::<_, ()>(vec![vec![0b100, 0]])), Ok(vec![vec![0b101, 0b10]]));
        // Consumer 1 again: only what came after its last read.
        assert_eq!(manager.dirty_for(1, || Ok::<_, ()>(vec![vec![0, 0]])), Ok(vec![vec![0b100, 0]]));
        manager.forget_consumer(2);
        assert_eq!(manager.dirty_lock().len(), 1);
    }
}
