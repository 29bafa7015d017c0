//! Runs a virtio device on the event loop: queue notifications and backend readiness become
//! calls on the device, off the vCPU threads.
//!
//! The device's own descriptors (backend completions, sockets, connections) come and go as
//! backends are swapped and connections open and close, sometimes closed before the worker
//! hears of it, and their numbers get reused. They therefore live in a private epoll set
//! owned by the worker, which tolerates a descriptor closed under it, rather than in the
//! shared event manager, which would keep a stale registration for a closed descriptor and
//! refuse the next one with the same number.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{EventSource, VirtioDevice};
use crate::bus::lock_device;

/// Token of the resync eventfd; queue notifications use their queue index as token, and
/// devices use tokens from [`DEVICE_TOKEN_BASE`](super::DEVICE_TOKEN_BASE) up.
const RESYNC_TOKEN: u32 = u32::MAX;
/// Token of the private epoll set holding the device's own descriptors.
const SOURCES_TOKEN: u32 = u32::MAX - 1;
/// Ready device descriptors handled per wakeup (more stay ready for the next one).
const MAX_READY: usize = 32;

/// Wakes the worker so it re-reads the device's event sources, after something outside the
/// event loop changed them (a backend swap).
#[derive(Clone)]
pub struct ResyncHandle(Arc<EventFd>);

impl ResyncHandle {
    /// Asks the worker to re-read the device's event sources; never blocks.
    pub fn resync(&self) {
        let _ = self.0.write(1);
    }
}

/// The event-loop subscriber for one device.
pub struct DeviceWorker<D: ?Sized> {
    device: Arc<Mutex<D>>,
    resync: Arc<EventFd>,
    /// The device's own descriptors (see the module comment).
    sources: Epoll,
    /// What `sources` holds: fd -> (token, events).
    registered: HashMap<RawFd, (u32, EventSet)>,
    queue_fds: Vec<RawFd>,
}

impl<D: VirtioDevice + ?Sized> DeviceWorker<D> {
    /// Creates the worker for `device`; it starts watching once added to an event manager.
    pub fn new(device: Arc<Mutex<D>>) -> std::io::Result<Self> {
        Ok(Self {
            device,
            resync: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            sources: Epoll::new()?,
            registered: HashMap::new(),
            queue_fds: Vec::new(),
        })
    }

    /// A handle that wakes this worker to re-read the device's event sources.
    pub fn resync_handle(&self) -> ResyncHandle {
        ResyncHandle(self.resync.clone())
    }

    fn watch(&mut self, source: &EventSource) {
        let event = EpollEvent::new(source.events, u64::from(source.token));
        match self.sources.ctl(ControlOperation::Add, source.fd, event) {
            Ok(()) => {
                self.registered.insert(source.fd, (source.token, source.events));
            }
            Err(e) => log::error!("virtio worker: cannot watch fd {}: {e}", source.fd),
        }
    }

    /// Makes the private epoll set match the device's current event sources. After a resync
    /// request everything is registered afresh: a descriptor kept under the same number may
    /// be a new one whose predecessor the kernel already dropped from the set when it closed.
    fn sync(&mut self, fresh: bool) {
        let wanted: Vec<EventSource> = lock_device(&self.device).event_sources();
        let wanted_map: HashMap<RawFd, (u32, EventSet)> = wanted.iter().map(|s| (s.fd, (s.token, s.events))).collect();
        let sources = &self.sources;
        self.registered.retain(|fd, entry| {
            if !fresh && wanted_map.get(fd) == Some(entry) {
                return true;
            }
            // Fails harmlessly if the descriptor is already closed (and so out of the set).
            let _ = sources.ctl(ControlOperation::Delete, *fd, EpollEvent::default());
            false
        });
        for source in wanted {
            if !self.registered.contains_key(&source.fd) {
                self.watch(&source);
            }
        }
    }

    /// Hands every ready device descriptor to the device.
    fn dispatch_sources(&mut self) {
        let mut ready = [EpollEvent::default(); MAX_READY];
        let n = self.sources.wait(0, &mut ready).unwrap_or(0);
        if n == 0 {
            return;
        }
        let mut device = lock_device(&self.device);
        for event in &ready[..n] {
            device.handle_event(event.data() as u32, event.event_set());
        }
    }
}

impl<D: VirtioDevice + ?Sized> MutEventSubscriber for DeviceWorker<D> {
    fn init(&mut self, ops: &mut EventOps) {
        let queue_fds: Vec<RawFd> =
            lock_device(&self.device).core().queue_events.iter().map(|e| e.as_raw_fd()).collect();
        for (index, fd) in queue_fds.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data_raw(*fd, index as u32, EventSet::IN)) {
                log::error!("virtio worker: cannot watch queue {index}: {e:?}");
            }
        }
        self.queue_fds = queue_fds;
        if let Err(e) = ops.add(Events::with_data(&*self.resync, RESYNC_TOKEN, EventSet::IN)) {
            log::error!("virtio worker: cannot watch the resync eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::with_data(&self.sources, SOURCES_TOKEN, EventSet::IN)) {
            log::error!("virtio worker: cannot watch the device's descriptors: {e:?}");
        }
        self.sync(true);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let token = events.data();
        let mut fresh = false;
        if token == RESYNC_TOKEN {
            let _ = self.resync.read();
            fresh = true;
        } else if token == SOURCES_TOKEN {
            self.dispatch_sources();
        } else if (token as usize) < self.queue_fds.len() && events.fd() == self.queue_fds[token as usize] {
            let mut device = lock_device(&self.device);
            // Reading clears the eventfd; several kicks coalesce into one pass over the queue.
            let _ = device.core().queue_events[token as usize].read();
            device.queue_notified(token as usize);
        }
        self.sync(fresh);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::virtio::testing::{irq, memory};
    use crate::virtio::{ActivateError, DEVICE_TOKEN_BASE, DeviceType, VirtioCore};

    /// A device whose only event source is an eventfd the test replaces at will.
    struct OneSource {
        core: VirtioCore,
        source: Option<EventFd>,
        handled: Arc<AtomicU32>,
    }

    impl VirtioDevice for OneSource {
        fn core(&self) -> &VirtioCore {
            &self.core
        }
        fn core_mut(&mut self) -> &mut VirtioCore {
            &mut self.core
        }
        fn config_space(&self) -> Vec<u8> {
            Vec::new()
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn queue_notified(&mut self, _: usize) {}
        fn event_sources(&self) -> Vec<EventSource> {
            let fd = self.source.as_ref().map(|e| e.as_raw_fd());
            fd.map(|fd| EventSource { fd, token: DEVICE_TOKEN_BASE, events: EventSet::IN }).into_iter().collect()
        }
        fn handle_event(&mut self, token: u32, _: EventSet) {
            assert_eq!(token, DEVICE_TOKEN_BASE);
            if let Some(e) = &self.source {
                let _ = e.read();
            }
            self.handled.fetch_add(1, Ordering::SeqCst);
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn poll_backend(&mut self) {}
    }

    #[test]
    fn a_source_closed_and_reopened_under_the_same_number_is_still_served() {
        let handled = Arc::new(AtomicU32::new(0));
        let core = VirtioCore::new(DeviceType::Block, 0, &[8], irq().1, memory()).unwrap();
        let device = Arc::new(Mutex::new(OneSource {
            core,
            source: Some(EventFd::new(EFD_NONBLOCK).unwrap()),
            handled: handled.clone(),
        }));
        let worker = DeviceWorker::new(device.clone()).unwrap();
        let resync = worker.resync_handle();
        let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
        manager.add_subscriber(Box::new(worker));
        let mut fire_and_run = |expected: u32| {
            device.lock().unwrap().source.as_ref().unwrap().write(1).unwrap();
            for _ in 0..100 {
                if handled.load(Ordering::SeqCst) >= expected {
                    return;
                }
                manager.run_with_timeout(100).unwrap();
            }
            panic!("the device's descriptor was not served (round {expected})");
        };
        fire_and_run(1);
        for round in 2..6 {
            // The old descriptor closes before the worker hears of the change, and the new
            // one takes its number: what a swap that drops the old backend at once does.
            // dup2 closes the old eventfd and puts a new one under its number atomically, so
            // no other test thread can take the number in between.
            let old = device.lock().unwrap().source.take().unwrap();
            let number = old.as_raw_fd();
            std::mem::forget(old);
            let new = EventFd::new(EFD_NONBLOCK).unwrap();
            // SAFETY: `number` is ours (the forgotten eventfd); dup2 replaces it.
            assert_eq!(unsafe { libc::dup2(new.as_raw_fd(), number) }, number);
            // SAFETY: `number` now holds a new eventfd that nothing else owns.
            let new = unsafe { <EventFd as std::os::fd::FromRawFd>::from_raw_fd(number) };
            device.lock().unwrap().source = Some(new);
            resync.resync();
            fire_and_run(round);
        }
    }
}
