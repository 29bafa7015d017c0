//! The tables as ACPICA's own disassembler (`iasl -d`, Debian package acpica-tools) reads
//! them: a second opinion on the encoding from the tool firmware authors use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::tests::{realistic, table_at, xsdt_entries};
use super::*;

/// A fresh directory, removed when the test passes and kept (and named) when it fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-acpi-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Writes `table` to `dir/name.aml`, disassembles it and returns the DSL, after checking that
/// iasl succeeded and complained about nothing.
fn disassemble(dir: &Path, name: &str, table: &[u8]) -> String {
    let aml = format!("{name}.aml");
    std::fs::write(dir.join(&aml), table).unwrap();
    let out = match Command::new("iasl").arg("-d").arg(&aml).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "iasl not found: install acpica-tools (apt-get install acpica-tools); \
             the ACPI tables are checked with its disassembler"
        ),
        Err(e) => panic!("cannot run iasl: {e}"),
    };
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "iasl -d {aml} failed:\n{log}");
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")))
        .unwrap_or_else(|e| panic!("iasl -d {aml} wrote no {name}.dsl ({e}):\n{log}"));
    for bad in ["Error", "Warning", "Invalid", "Incorrect", "Unknown"] {
        assert!(!log.contains(bad), "iasl -d {aml} reported problems:\n{log}");
        assert!(!dsl.contains(bad), "{name}.dsl has problems:\n{dsl}");
    }
    dsl
}

#[test]
fn iasl_reads_the_dsdt() {
    let dir = TempDir::new("dsdt");
    let t = build(&realistic(), ACPI_TABLES_ADDR).unwrap();
    let dsl = disassemble(&dir.0, "dsdt", &t.dsdt);
    println!("{dsl}");
    assert!(dsl.contains("Device (COM1)"), "{dsl}");
    assert!(dsl.contains("EisaId (\"PNP0501\")"), "{dsl}");
    assert!(dsl.contains("0x03F8"), "{dsl}");
    assert!(dsl.contains("0x00000004,"), "{dsl}");
    // The shared-memory window: matched by `compatible` (PRP0001), register page, region range
    // above 4 GiB, interrupt.
    let shm = dsl.split("Device (").find(|s| s.starts_with("SHM0)")).unwrap_or_else(|| panic!("no SHM0:\n{dsl}"));
    for needle in [
        "\"PRP0001\"",
        "QWordMemory",
        "0x0000000200000000",
        "0x000000023FFFFFFF",
        "0xE0000000",
        "0x00000017,",
        "ToUUID (\"daffd814-6eba-4d8c-8a91-bc9bbf4aa301\")",
        "\"compatible\"",
        "\"vmm,shm-window\"",
    ] {
        assert!(shm.contains(needle), "no {needle} in SHM0:\n{shm}");
    }
    for (i, d) in realistic().virtio_mmio.iter().enumerate() {
        let device = dsl
            .split("Device (")
            .find(|s| s.starts_with(&format!("VR{i:02})")))
            .unwrap_or_else(|| panic!("no device VR{i:02}:\n{dsl}"));
        assert!(device.contains("\"LNRO0005\""), "{device}");
        let uid = ["Zero", "One", "0x02"][i];
        assert!(device.contains(&format!("Name (_UID, {uid})")), "{device}");
        assert!(device.contains(&format!("0x{:08X},", d.base)), "{device}");
        assert!(device.contains(&format!("0x{:08X},", d.size)), "{device}");
        assert!(device.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"), "{device}");
        assert!(device.contains(&format!("0x{:08X},", d.irq)), "{device}");
    }
}

/// The data tables (iasl decodes them field by field). The RSDP is left out: iasl does not
/// recognise a bare RSDP in a binary file; its bytes are checked in `tables`.
#[test]
fn iasl_reads_the_fadt_madt_and_xsdt() {
    let dir = TempDir::new("tables");
    let base = ACPI_TABLES_ADDR;
    let t = build(&realistic(), base).unwrap();
    let entries = xsdt_entries(&t, base);
    let xsdt_addr = u64::from_le_bytes(t.bytes[24..32].try_into().unwrap());

    let fadt = disassemble(&dir.0, "facp", table_at(&t, base, entries[0]));
    assert!(fadt.contains("Fixed ACPI Description Table (FADT)"), "{fadt}");
    assert!(has_field(&fadt, "Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(has_field(&fadt, "8042 Present on ports 60/64 (V2) : 1"), "{fadt}");
    assert!(has_field(&fadt, "FADT Minor Revision : 03"), "{fadt}");
    let dsdt_addr = format!("DSDT Address : {:016X}", base + (t.bytes.len() - t.dsdt.len()) as u64);
    assert!(has_field(&fadt, &dsdt_addr), "{fadt}");

    let madt = disassemble(&dir.0, "apic", table_at(&t, base, entries[1]));
    assert!(madt.contains("Multiple APIC Description Table (MADT)"), "{madt}");
    assert_eq!(madt.matches("[Processor Local APIC]").count(), 4, "{madt}");
    assert!(has_field(&madt, "I/O Apic ID : 04"), "{madt}");
    assert!(has_field(&madt, "Address : FEC00000"), "{madt}");

    let xsdt = disassemble(&dir.0, "xsdt", table_at(&t, base, xsdt_addr));
    assert!(has_field(&xsdt, &format!("ACPI Table Address   1 : {:016X}", entries[1])), "{xsdt}");
}

/// Whether the iasl data-table listing has the line `name : value` (iasl aligns the colons,
/// so whitespace is collapsed before comparing).
fn has_field(dsl: &str, field: &str) -> bool {
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let field = squash(field);
    dsl.lines().any(|l| squash(l).contains(&field))
}
