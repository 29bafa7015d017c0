//! QEMU's `isa-debug-exit` convention: a write to the port ends the VM with the written value.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitSink, GuestRequest};

/// The debug-exit port: a write at offset 0 of 1 to 4 bytes asks the VM to exit with that
/// value (little endian); reads return zeroes.
pub struct DebugExit {
    sink: Arc<dyn ExitSink>,
}

impl DebugExit {
    /// Creates the port, sending exit requests to `sink`.
    pub fn new(sink: Arc<dyn ExitSink>) -> Self {
        Self { sink }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Any access size up to the port width; bytes beyond the port are ignored.
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        self.sink.request(GuestRequest::Exit(u32::from_le_bytes(value)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub struct Requests(pub Mutex<Vec<GuestRequest>>);

    impl ExitSink for Requests {
        fn request(&self, request: GuestRequest) {
            self.0.lock().unwrap().push(request);
        }
    }

    #[test]
    fn any_width_write_requests_exit_with_its_value() {
        let sink = Arc::new(Requests::default());
        let mut dev = DebugExit::new(sink.clone());
        dev.write(0, &[7]);
        dev.write(0, &[0x34, 0x12]);
        dev.write(0, &[1, 0, 0, 0]);
        dev.write(2, &[9]);
        dev.write(0, &[0; 8]);
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![GuestRequest::Exit(7), GuestRequest::Exit(0x1234), GuestRequest::Exit(1)]
        );
    }
}
