//! Keeps the swap thread on a CPU during a blackout.
//!
//! While a device takes no requests, every microsecond the thread driving the swap waits for a
//! CPU is blackout. On a busy host (a vCPU thread spinning on each core) a woken thread can
//! wait a whole scheduler tick (4 ms at HZ=250) before it runs: the bench showed 4-6 ms
//! blackout tails made of exactly that. For the few hundred microseconds of a blackout the
//! thread runs under SCHED_FIFO, which preempts ordinary threads at once. Without the
//! privilege for it (CAP_SYS_NICE) the swap just runs at normal priority.

/// While alive, the current thread runs at real-time priority (when allowed).
pub struct Urgent {
    previous: Option<(libc::c_int, libc::sched_param)>,
}

impl Urgent {
    pub fn enter() -> Self {
        // SAFETY: querying and setting the calling thread's (pid 0) policy with valid structs.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            let mut old = std::mem::zeroed::<libc::sched_param>();
            if policy < 0 || libc::sched_getparam(0, &mut old) != 0 {
                return Self { previous: None };
            }
            let fifo = libc::sched_param { sched_priority: 1 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) != 0 {
                return Self { previous: None };
            }
            Self { previous: Some((policy, old)) }
        }
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.previous {
            // SAFETY: restoring the calling thread's own policy and parameters.
            unsafe { libc::sched_setscheduler(0, policy, &param) };
        }
    }
}
