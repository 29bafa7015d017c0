//! A 16550 UART (vm-superio) on the port bus, with output to any writer and input pushed by the
//! VMM.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::Serial;
use vm_superio::serial::SerialState;

use crate::bus::BusDevice;
use crate::interrupt::{InterruptLine, SuperioTrigger};
use crate::ratelimit::LogOnce;

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, written from its current position.
    File(File),
    /// Any writer (embedders capture output this way).
    Writer(Box<dyn Write + Send>),
    /// Output is discarded.
    Sink,
}

impl SerialOutput {
    fn into_writer(self) -> Box<dyn Write + Send> {
        match self {
            SerialOutput::Stdout => Box::new(io::stdout()),
            SerialOutput::File(f) => Box::new(f),
            SerialOutput::Writer(w) => w,
            SerialOutput::Sink => Box::new(io::sink()),
        }
    }
}

/// Collects what the UART transmits during one guest access and writes it with one system
/// call: the UART flushes after every byte, but a `rep outsb` line should cost one `write(2)`.
struct Batched {
    pending: Vec<u8>,
    out: Box<dyn Write + Send>,
}

impl Write for Batched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    /// Deferred to [`Batched::commit`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Batched {
    fn commit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.out.write_all(&self.pending).and_then(|()| self.out.flush());
        self.pending.clear();
        result
    }
}

type Uart = Serial<SuperioTrigger<Box<dyn InterruptLine>>, vm_superio::serial::NoEvents, Batched>;

/// The COM1 UART: guest output goes to a [`SerialOutput`], input is pushed by the VMM.
pub struct SerialConsole {
    uart: Uart,
    errors: LogOnce<&'static str>,
}

/// The UART's whole state: every register and the bytes the guest has yet to read. Bytes the
/// guest wrote are already out (transmission is synchronous), so none are pending.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte (DLL).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub baud_divisor_high: u8,
    /// Interrupt enable register (IER).
    pub interrupt_enable: u8,
    /// Interrupt identification register (IIR).
    pub interrupt_identification: u8,
    /// Line control register (LCR).
    pub line_control: u8,
    /// Line status register (LSR).
    pub line_status: u8,
    /// Modem control register (MCR).
    pub modem_control: u8,
    /// Modem status register (MSR).
    pub modem_status: u8,
    /// Scratch register (SCR).
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialConsole {
    /// A UART in its power-on state, raising `irq` and writing guest output to `output`.
    pub fn new(irq: Box<dyn InterruptLine>, output: SerialOutput) -> Self {
        let out = Batched { pending: Vec::with_capacity(256), out: output.into_writer() };
        Self { uart: Serial::new(SuperioTrigger(irq), out), errors: LogOnce::new(4) }
    }

    /// A UART continuing from `state`. An interrupt the guest had yet to take is not raised
    /// again here: the interrupt controllers' saved state still holds it.
    pub fn restore(irq: Box<dyn InterruptLine>, output: SerialOutput, state: &SerialSnapshot) -> io::Result<Self> {
        let out = Batched { pending: Vec::with_capacity(256), out: output.into_writer() };
        let uart = Serial::from_state(&state.into(), SuperioTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(Self { uart, errors: LogOnce::new(4) })
    }

    /// The UART's current state, for [`restore`](Self::restore).
    pub fn export_state(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    fn transmit(&mut self, offset: u64, byte: u8) {
        if let Err(e) = self.uart.write(offset as u8, byte)
            && self.errors.first("interrupt")
        {
            log::warn!("serial: cannot raise interrupt: {e:?}");
        }
    }

    fn commit(&mut self) {
        // A closed stdout must not stop the guest; say so once.
        if let Err(e) = self.uart.writer_mut().commit()
            && self.errors.first("output")
        {
            log::warn!("serial: output failed, further output may be lost: {e}");
        }
    }

    /// Queues bytes for the guest to read; returns how many fit in the receive FIFO.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                if self.errors.first("input") {
                    log::warn!("serial: cannot queue input: {e:?}");
                }
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data {
            self.transmit(offset, *byte);
            self.commit();
        }
    }

    fn write_units(&mut self, offset: u64, unit: usize, data: &[u8]) {
        if unit == 1 {
            for byte in data {
                self.transmit(offset, *byte);
            }
            self.commit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct CountingIrq(std::sync::atomic::AtomicUsize);

    impl InterruptLine for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_receives_input() {
        let out = Capture::default();
        let irq = Arc::new(CountingIrq::default());
        let mut uart = SerialConsole::new(Box::new(irq.clone()), SerialOutput::Writer(Box::new(out.clone())));
        for b in b"hi\n" {
            uart.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");

        // Enable the received-data interrupt, then push input.
        uart.write(1, &[0x01]);
        assert_eq!(uart.push_input(b"x"), 1);
        assert!(irq.0.load(std::sync::atomic::Ordering::SeqCst) > 0);
        let mut lsr = [0];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0];
        uart.read(0, &mut rbr);
        assert_eq!(rbr, *b"x");
    }

    #[derive(Clone, Default)]
    struct CountingWriter(Arc<Mutex<Vec<usize>>>);

    impl Write for CountingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_string_write_is_one_output_write() {
        let out = CountingWriter::default();
        let mut uart =
            SerialConsole::new(Box::new(Arc::new(CountingIrq::default())), SerialOutput::Writer(Box::new(out.clone())));
        uart.write_units(0, 1, b"hello world\n");
        uart.write(0, b"!");
        assert_eq!(*out.0.lock().unwrap(), vec![12, 1]);
    }

    #[test]
    fn whole_state_moves_to_a_new_uart_and_the_guest_reads_on() {
        let mut old = SerialConsole::new(Box::new(Arc::new(CountingIrq::default())), SerialOutput::Sink);
        old.write(3, &[0x80]); // DLAB on: the divisor latch
        old.write(0, &[0x0c]);
        old.write(3, &[0x03]); // 8N1, DLAB off
        old.write(7, &[0x5a]); // scratch
        old.write(1, &[0x01]); // received-data interrupt on
        assert_eq!(old.push_input(b"ab"), 2);
        let mut first = [0u8];
        old.read(0, &mut first);
        assert_eq!(first, *b"a");

        let state = old.export_state();
        let back: SerialSnapshot = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(back, state);
        let irq = Arc::new(CountingIrq::default());
        let mut new = SerialConsole::restore(Box::new(irq.clone()), SerialOutput::Sink, &back).unwrap();
        assert_eq!(new.export_state(), state);
        // The byte the guest had yet to read.
        let mut next = [0u8];
        new.read(0, &mut next);
        assert_eq!(next, *b"b");
        let mut scratch = [0u8];
        new.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
    }

    #[test]
    fn ignores_wide_accesses() {
        let mut uart = SerialConsole::new(Box::new(Arc::new(CountingIrq::default())), SerialOutput::Sink);
        let mut data = [0u8; 4];
        uart.read(0, &mut data);
        assert_eq!(data, [0xff; 4]);
        uart.write(0, &[1, 2]);
    }
}
