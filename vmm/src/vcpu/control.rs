//! The rendezvous between the VM controller and its vCPU threads: what every vCPU should be
//! doing, and how many have got there. While paused, a vCPU thread also runs work handed to it
//! (reading its state for a snapshot): the vCPU is owned by its thread, and this keeps it so.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the controller wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Target {
    Run = 0,
    Pause = 1,
    Stop = 2,
}

/// Work for one parked vCPU thread, given its vCPU (`V`: `KvmVcpu` outside tests).
pub type ParkedJob<V> = Box<dyn FnOnce(&mut V) + Send>;

struct Counts<V> {
    /// vCPU threads waiting in `park`.
    parked: usize,
    /// vCPU threads that left their run loop for good.
    exited: usize,
    /// Per vCPU index: work to run the next time its thread is parked.
    jobs: Vec<Option<ParkedJob<V>>>,
}

pub struct RunControl<V> {
    /// Read on every loop iteration without the lock.
    target: AtomicU8,
    counts: Mutex<Counts<V>>,
    changed: Condvar,
    vcpus: usize,
}

/// Why the vCPUs could not be brought to a state or handed work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The vCPUs have been told to stop for good; they cannot run or pause again.
    #[error("the VM has stopped")]
    Stopped,
    /// Work for a vCPU thread was posted while the vCPUs were not paused.
    #[error("the vCPUs must be paused first")]
    NotPaused,
    /// A paused vCPU (index given, the first that had not answered) ran no posted work in time.
    #[error("vCPU {0} did not answer while paused")]
    NoAnswer(u32),
    /// The vCPU threads did not all park (or all leave park) before the timeout.
    #[error("only {arrived} of {total} vCPUs reached the requested state within {timeout:?}")]
    Timeout {
        /// vCPU threads parked or exited when time ran out.
        arrived: usize,
        /// vCPU threads in the VM.
        total: usize,
        /// How long the wait lasted.
        timeout: Duration,
    },
}

impl<V> RunControl<V> {
    pub fn new(vcpus: usize) -> Self {
        let counts = Counts { parked: 0, exited: 0, jobs: (0..vcpus).map(|_| None).collect() };
        Self { target: AtomicU8::new(Target::Run as u8), counts: Mutex::new(counts), changed: Condvar::new(), vcpus }
    }

    pub fn target(&self) -> Target {
        match self.target.load(Ordering::SeqCst) {
            0 => Target::Run,
            1 => Target::Pause,
            _ => Target::Stop,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Counts<V>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the target; refuses to leave `Stop`.
    pub fn set_target(&self, target: Target) -> Result<(), ControlError> {
        let _counts = self.lock();
        if self.target() == Target::Stop && target != Target::Stop {
            return Err(ControlError::Stopped);
        }
        self.target.store(target as u8, Ordering::SeqCst);
        self.changed.notify_all();
        Ok(())
    }

    /// Waits until every vCPU is parked (or gone).
    pub fn wait_all_parked(&self, timeout: Duration) -> Result<(), ControlError> {
        self.wait_until(timeout, |c, n| c.parked + c.exited == n)
    }

    /// Waits until no vCPU is parked.
    pub fn wait_none_parked(&self, timeout: Duration) -> Result<(), ControlError> {
        self.wait_until(timeout, |c, _| c.parked == 0)
    }

    fn wait_until(&self, timeout: Duration, done: impl Fn(&Counts<V>, usize) -> bool) -> Result<(), ControlError> {
        let deadline = Instant::now() + timeout;
        let mut counts = self.lock();
        while !done(&counts, self.vcpus) {
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::Timeout {
                    arrived: counts.parked + counts.exited,
                    total: self.vcpus,
                    timeout,
                });
            }
            counts = self.changed.wait_timeout(counts, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(())
    }

    /// Hands `job` to the thread of vCPU `index`, which runs it while parked. Only while
    /// paused; a job not yet run when the target changes is dropped unrun (its result channel
    /// closes, which the poster sees).
    pub fn post(&self, index: usize, job: ParkedJob<V>) -> Result<(), ControlError> {
        let mut counts = self.lock();
        if self.target() != Target::Pause {
            return Err(ControlError::NotPaused);
        }
        counts.jobs[index] = Some(job);
        self.changed.notify_all();
        Ok(())
    }

    /// Called by the thread of vCPU `index`: waits while the target is `Pause`, running the
    /// jobs posted for it; returns the new target.
    pub fn park(&self, index: usize, vcpu: &mut V) -> Target {
        let mut counts = self.lock();
        counts.parked += 1;
        self.changed.notify_all();
        while self.target() == Target::Pause {
            if let Some(job) = counts.jobs[index].take() {
                drop(counts);
                job(vcpu);
                counts = self.lock();
                continue;
            }
            counts = self.changed.wait(counts).unwrap_or_else(|p| p.into_inner());
        }
        counts.jobs[index] = None;
        counts.parked -= 1;
        self.changed.notify_all();
        self.target()
    }

    /// Called by a vCPU thread as it leaves its run loop.
    pub fn exited(&self) {
        self.lock().exited += 1;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn pause_resume_stop_rendezvous() {
        let control = Arc::new(RunControl::<u32>::new(3));
        let threads: Vec<_> = (0..3)
            .map(|index| {
                let c = control.clone();
                std::thread::spawn(move || {
                    let mut parks = 0;
                    // What the parked jobs see as "the vCPU": its index.
                    let mut vcpu = index as u32;
                    loop {
                        match c.target() {
                            Target::Run => std::thread::yield_now(),
                            Target::Pause => {
                                parks += 1;
                                if c.park(index, &mut vcpu) == Target::Stop {
                                    break;
                                }
                            }
                            Target::Stop => break,
                        }
                    }
                    c.exited();
                    parks
                })
            })
            .collect();
        let t = Duration::from_secs(10);
        assert_eq!(control.post(0, Box::new(|_| {})), Err(ControlError::NotPaused));
        for _ in 0..3 {
            control.set_target(Target::Pause).unwrap();
            control.wait_all_parked(t).unwrap();
            // Each parked thread runs the job posted for it, on its own vCPU.
            let (tx, rx) = std::sync::mpsc::channel();
            for index in 0..3 {
                let tx = tx.clone();
                control.post(index, Box::new(move |vcpu: &mut u32| tx.send(*vcpu).unwrap())).unwrap();
            }
            let mut seen: Vec<u32> = (0..3).map(|_| rx.recv_timeout(t).unwrap()).collect();
            seen.sort();
            assert_eq!(seen, [0, 1, 2]);
            control.set_target(Target::Run).unwrap();
            control.wait_none_parked(t).unwrap();
        }
        control.set_target(Target::Stop).unwrap();
        assert_eq!(control.set_target(Target::Run), Err(ControlError::Stopped));
        for t in threads {
            assert_eq!(t.join().unwrap(), 3);
        }
        control.wait_all_parked(Duration::ZERO).unwrap();
    }

    #[test]
    fn times_out_when_a_vcpu_never_arrives() {
        let control = RunControl::<()>::new(1);
        control.set_target(Target::Pause).unwrap();
        let err = control.wait_all_parked(Duration::from_millis(10)).unwrap_err();
        assert!(matches!(err, ControlError::Timeout { arrived: 0, total: 1, .. }));
    }
}
