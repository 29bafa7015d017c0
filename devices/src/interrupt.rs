//! How a device raises its interrupt without knowing about KVM.

use std::io;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// An edge-triggered interrupt line into the guest.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

impl<T: InterruptLine + ?Sized> InterruptLine for Box<T> {
    fn trigger(&self) -> io::Result<()> {
        (**self).trigger()
    }
}

impl<T: InterruptLine + ?Sized> InterruptLine for std::sync::Arc<T> {
    fn trigger(&self) -> io::Result<()> {
        (**self).trigger()
    }
}

/// An interrupt line backed by an eventfd, which the VMM registers with KVM as an irqfd: a
/// write injects the interrupt in the kernel, with no VM exit and no VMM thread involved.
#[derive(Debug)]
pub struct EventFdInterrupt {
    evt: EventFd,
}

impl EventFdInterrupt {
    /// A line backed by a fresh non-blocking eventfd, not yet registered with the hypervisor.
    pub fn new() -> io::Result<Self> {
        Ok(Self { evt: EventFd::new(EFD_NONBLOCK)? })
    }

    /// The eventfd to register with the hypervisor.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl InterruptLine for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

/// Adapts an [`InterruptLine`] to vm-superio's `Trigger`.
pub struct SuperioTrigger<I>(pub I);

impl<I: InterruptLine> vm_superio::Trigger for SuperioTrigger<I> {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_interrupt_counts_triggers() {
        let irq = EventFdInterrupt::new().unwrap();
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 2);
    }
}
