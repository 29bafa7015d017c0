//! How a device asks the VM to end.

/// A request from the guest, through a device, to end the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// The guest wrote `status` to the debug-exit port.
    Exit(u32),
    /// The guest asked for a CPU reset (keyboard controller command 0xfe).
    Reset,
}

/// Receives guest requests; implemented by the VMM's VM controller.
pub trait ExitSink: Send + Sync {
    fn request(&self, request: GuestRequest);
}
