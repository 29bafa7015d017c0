//! Runs a virtio device on the event loop: queue notifications and backend readiness become
//! calls on the device, off the vCPU threads.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{EventSource, VirtioDevice};
use crate::bus::lock_device;

/// Token of the resync eventfd; queue notifications use their queue index as token, and
/// devices use tokens from [`DEVICE_TOKEN_BASE`](super::DEVICE_TOKEN_BASE) up.
const RESYNC_TOKEN: u32 = u32::MAX;

/// Wakes the worker so it re-reads the device's event sources, after something outside the
/// event loop changed them (a backend swap).
#[derive(Clone)]
pub struct ResyncHandle(Arc<EventFd>);

impl ResyncHandle {
    pub fn resync(&self) {
        let _ = self.0.write(1);
    }
}

/// The event-loop subscriber for one device.
pub struct DeviceWorker<D: ?Sized> {
    device: Arc<Mutex<D>>,
    resync: Arc<EventFd>,
    /// Backend fds currently registered with epoll, with their token and events.
    registered: HashMap<RawFd, (u32, EventSet)>,
    queue_fds: Vec<RawFd>,
}

impl<D: VirtioDevice + ?Sized> DeviceWorker<D> {
    pub fn new(device: Arc<Mutex<D>>) -> std::io::Result<Self> {
        Ok(Self {
            device,
            resync: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            registered: HashMap::new(),
            queue_fds: Vec::new(),
        })
    }

    pub fn resync_handle(&self) -> ResyncHandle {
        ResyncHandle(self.resync.clone())
    }

    /// Makes the epoll interest match the device's current event sources.
    fn sync(&mut self, ops: &mut EventOps) {
        let wanted: Vec<EventSource> = lock_device(&self.device).event_sources();
        let wanted_map: HashMap<RawFd, (u32, EventSet)> = wanted.iter().map(|s| (s.fd, (s.token, s.events))).collect();
        self.registered.retain(|fd, (token, events)| {
            if wanted_map.get(fd) == Some(&(*token, *events)) {
                return true;
            }
            let _ = ops.remove(event_manager::Events::with_data_raw(*fd, *token, *events));
            false
        });
        for source in wanted {
            if self.registered.contains_key(&source.fd) {
                continue;
            }
            match ops.add(Events::with_data_raw(source.fd, source.token, source.events)) {
                Ok(()) => {
                    self.registered.insert(source.fd, (source.token, source.events));
                }
                Err(e) => log::error!("virtio worker: cannot watch fd {}: {e:?}", source.fd),
            }
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
        self.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == RESYNC_TOKEN {
            let _ = self.resync.read();
        } else if (token as usize) < self.queue_fds.len() && events.fd() == self.queue_fds[token as usize] {
            let mut device = lock_device(&self.device);
            // Reading clears the eventfd; several kicks coalesce into one pass over the queue.
            let _ = device.core().queue_events[token as usize].read();
            device.queue_notified(token as usize);
        } else {
            lock_device(&self.device).handle_event(token, events.event_set());
        }
        self.sync(ops);
    }
}
