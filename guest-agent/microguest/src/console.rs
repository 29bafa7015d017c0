//! Serial console output. Each `println!` formats into a line buffer and sends it with one
//! `rep outsb`, which KVM on a VMX/SVM host delivers as one VM exit per line (the PVM host
//! still exits per byte). A spin lock keeps lines from several CPUs whole.
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use microguest_protocol::SERIAL_PORT;

use crate::arch;

static LOCK: AtomicBool = AtomicBool::new(false);

const LINE_CAPACITY: usize = 512;

struct LineBuffer {
    bytes: [u8; LINE_CAPACITY],
    len: usize,
}

impl LineBuffer {
    const fn new() -> Self {
        Self { bytes: [0; LINE_CAPACITY], len: 0 }
    }

    fn flush(&mut self) {
        arch::outsb(SERIAL_PORT, &self.bytes[..self.len]);
        self.len = 0;
    }
}

impl Write for LineBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == LINE_CAPACITY {
                self.flush();
            }
            self.bytes[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

fn lock() {
    while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        arch::pause();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

#[doc(hidden)]
pub fn print_line(args: fmt::Arguments, newline: bool) {
    let mut line = LineBuffer::new();
    let _ = line.write_fmt(args);
    if newline {
        let _ = line.write_str("\n");
    }
    lock();
    line.flush();
    unlock();
}

/// Prints without taking the lock: used by the panic handler, which may run while this CPU
/// already holds it.
pub fn emergency_println(args: fmt::Arguments) {
    let mut line = LineBuffer::new();
    let _ = line.write_fmt(args);
    let _ = line.write_str("\n");
    line.flush();
}

/// Returns the next byte received on the serial port, if any.
pub fn try_read_byte() -> Option<u8> {
    const LINE_STATUS: u16 = SERIAL_PORT + 5;
    const DATA_READY: u8 = 0x01;
    (arch::inb(LINE_STATUS) & DATA_READY != 0).then(|| arch::inb(SERIAL_PORT))
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*), false) };
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*), true) };
}
