//! The device event loop: one thread that runs every device's request processing, so no
//! device work ever happens on a vCPU thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberOps};

/// Anything the loop can drive.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Subscribers collected while the VM is being built, before the loop starts.
pub struct EventLoopBuilder {
    manager: EventManager<Subscriber>,
}

impl EventLoopBuilder {
    pub fn new() -> std::io::Result<Self> {
        let manager = EventManager::new().map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
        Ok(Self { manager })
    }

    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Starts the loop thread.
    pub fn start(self) -> std::io::Result<EventLoop> {
        let mut manager = self.manager;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let (sandboxed, entered) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new().name("devices".into()).spawn(move || {
            // The loop runs what the guest puts in the queues: narrowed to what devices need.
            let entered = vmm_sandbox::seccomp::enter(vmm_sandbox::Role::Devices);
            let failed = entered.is_err();
            let _ = sandboxed.send(entered);
            if failed {
                return;
            }
            while !stop_flag.load(Ordering::Acquire) {
                if let Err(e) = manager.run() {
                    log::error!("device event loop: {e:?}");
                    break;
                }
            }
        })?;
        match entered.recv() {
            Ok(Ok(())) => Ok(EventLoop { endpoint, stop, thread: Some(thread) }),
            Ok(Err(e)) => Err(std::io::Error::other(format!("the device thread's sandbox: {e}"))),
            Err(_) => Err(std::io::Error::other("the device thread ended at its start")),
        }
    }
}

/// The running device event loop.
pub struct EventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.endpoint.kick();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the device event loop panicked");
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
