//! The i8042 keyboard controller, modelled only as far as its CPU-reset command: that is how a
//! Linux guest started with `reboot=k` restarts or powers off.

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::exit::{ExitSink, GuestRequest};

struct ResetTrigger(Arc<dyn ExitSink>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(GuestRequest::Reset);
        Ok(())
    }
}

/// The i8042 keyboard controller; its CPU-reset command (0xfe) asks the VM to reset.
pub struct I8042 {
    device: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// Creates the controller, sending reset requests to `sink`.
    pub fn new(sink: Arc<dyn ExitSink>) -> Self {
        Self { device: I8042Device::new(ResetTrigger(sink)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.device.read(offset as u8);
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            let _ = self.device.write(offset as u8, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Requests(Mutex<Vec<GuestRequest>>);

    impl ExitSink for Requests {
        fn request(&self, request: GuestRequest) {
            self.0.lock().unwrap().push(request);
        }
    }

    #[test]
    fn reset_command_requests_reset() {
        let sink = Arc::new(Requests::default());
        let mut dev = I8042::new(sink.clone());
        dev.write(4, &[0xaa]);
        assert!(sink.0.lock().unwrap().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(*sink.0.lock().unwrap(), vec![GuestRequest::Reset]);
    }
}
