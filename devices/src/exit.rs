//! How a device asks the VM to end.

/// A request from the guest, through a device, to end the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// The guest wrote to the debug-exit port; carries the value written (the exit status).
    Exit(u32),
    /// The guest asked for a CPU reset (keyboard controller command 0xfe).
    Reset,
}

/// Receives guest requests; implemented by the VMM's VM controller.
pub trait ExitSink: Send + Sync {
    /// Records `request`. Called from the device's I/O handler on a vCPU thread, so it should
    /// return promptly.
    fn request(&self, request: GuestRequest);
}
