//! The VM configuration: what the `vmm` CLI flags and the JSON config file describe, and what
//! [`VmBuilder`](crate::VmBuilder) assembles. Validation happens here, before any resource is
//! taken, so bad input costs nothing.

mod devices;
pub mod json;

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use devices::{BlockEngine, DiskConfig, NbdAddress, NetConfig, ShmConfig, VsockConfig, parse_mac};

use crate::boot::BootProtocol;
use crate::memory::RamBacking;

/// Smallest guest RAM accepted.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest RAM accepted (a guard against typos; RAM is mapped lazily).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Most vCPUs per VM (8-bit xAPIC ids, 0xff reserved); KVM's own limit may be lower.
pub const MAX_VCPUS: u32 = 254;

/// Guest RAM in MiB when the configuration does not say.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// vCPU count when the configuration does not say.
pub const DEFAULT_VCPUS: u32 = 1;
/// A serial console, reboots through the keyboard controller (which ends the VMM cleanly), a
/// reboot one second after a panic, and no probing of the keyboard controller beyond its reset
/// line (the only part of an i8042 we model).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialConfig {
    /// The VMM's standard output (the default); written as `stdout`.
    #[default]
    Stdout,
    /// A file, created if missing and appended to; written as `file:PATH`.
    File(PathBuf),
    /// Discard output.
    None,
}

impl FromStr for SerialConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(SerialConfig::Stdout),
            "none" => Ok(SerialConfig::None),
            _ => match s.strip_prefix("file:") {
                Some("") => Err("serial \"file:\" needs a path, as in file:/tmp/console.log".into()),
                Some(path) => Ok(SerialConfig::File(path.into())),
                None => Err(format!("invalid serial {s:?}: expected stdout, none or file:PATH")),
            },
        }
    }
}

impl TryFrom<String> for SerialConfig {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            SerialConfig::Stdout => f.write_str("stdout"),
            SerialConfig::None => f.write_str("none"),
            SerialConfig::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl From<SerialConfig> for String {
    fn from(s: SerialConfig) -> String {
        s.to_string()
    }
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_mem_mib() -> u64 {
    DEFAULT_MEM_MIB
}
fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}

/// One device's configuration, whatever its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    /// A virtio-blk disk.
    Disk(DiskConfig),
    /// A virtio-net NIC.
    Net(NetConfig),
    /// The virtio-vsock device.
    Vsock(VsockConfig),
}

/// A complete VM description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: a 64-bit ELF (vmlinux, the microguest) or a bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk loaded alongside the kernel, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; defaults to [`DEFAULT_CMDLINE`].
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest RAM in MiB, between [`MIN_MEM_MIB`] and [`MAX_MEM_MIB`].
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Number of vCPUs, from 1 to [`MAX_VCPUS`] (or the host's lower limit).
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Where the guest's serial console goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// How the kernel is booted.
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    /// What guest RAM's pages live in.
    #[serde(default)]
    pub ram_backing: RamBacking,
    /// virtio-blk disks, in device order (default ids `disk0`, `disk1`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, in device order after the disks (default ids `net0`, `net1`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// The virtio-vsock device, if any (default id `vsock0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Shared-memory regions attached at start, to windows 0, 1, ... in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shm: Vec<ShmConfig>,
    /// Shared-memory windows, for regions attached now or later (at most
    /// [`MAX_SHM_WINDOWS`]); defaults to one per region in `shm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_windows: Option<u32>,
}

/// The most shared-memory windows a VM may have.
pub const MAX_SHM_WINDOWS: u32 = 4;

/// A configuration that cannot work; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `mem_mib` (the value given) is below [`MIN_MEM_MIB`].
    #[error("mem_mib (--mem-mib) is {0}: a guest needs at least {MIN_MEM_MIB} MiB")]
    TooLittleMemory(u64),
    /// `mem_mib` (the value given) is above [`MAX_MEM_MIB`].
    #[error("mem_mib (--mem-mib) is {0}: at most {MAX_MEM_MIB} MiB is accepted")]
    TooMuchMemory(u64),
    /// `vcpus` is zero or above the limit.
    #[error("vcpus (--vcpus) is {got}: must be between 1 and {max}")]
    VcpuCount {
        /// The vCPU count requested.
        got: u32,
        /// The most allowed: [`MAX_VCPUS`] or the host's lower limit.
        max: u32,
    },
    /// A file the configuration names does not exist.
    #[error("{what} {path} does not exist")]
    Missing {
        /// What the file is for, such as `kernel` or `disk image`.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// The kernel or initrd path exists but is not a regular file.
    #[error("{what} {path} is not a regular file")]
    NotAFile {
        /// What the file is for: `kernel` or `initrd`.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A disk, NIC or vsock setting is invalid; the message starts with the device kind.
    #[error("{0}")]
    Device(String),
    /// Two devices share an id (given or defaulted).
    #[error("device id {0:?} is used twice")]
    DuplicateId(String),
    /// More virtio devices (the count given) than [`MAX_VIRTIO_DEVICES`].
    #[error("{0} virtio devices requested; at most {max} fit", max = MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
}

/// virtio-mmio windows available (one interrupt line each, GSI 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: DEFAULT_VCPUS,
            serial: SerialConfig::default(),
            boot_protocol: BootProtocol::default(),
            ram_backing: RamBacking::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            shm: Vec::new(),
            shm_windows: None,
        }
    }

    /// This configuration with its device lists replaced by `devices` (in the order the VM
    /// built them: disks, NICs, vsock), such as the devices' current backends after swaps.
    pub fn with_devices(mut self, devices: impl IntoIterator<Item = DeviceConfig>) -> Self {
        (self.disks, self.nets, self.vsock) = (Vec::new(), Vec::new(), None);
        for device in devices {
            match device {
                DeviceConfig::Disk(disk) => self.disks.push(disk),
                DeviceConfig::Net(net) => self.nets.push(net),
                DeviceConfig::Vsock(vsock) => self.vsock = Some(vsock),
            }
        }
        self
    }

    /// Device ids, with defaults (`diskN`, `netN`, `vsock0`) filled in, in device order.
    pub fn device_ids(&self) -> Vec<String> {
        let disks = self.disks.iter().enumerate().map(|(i, d)| d.id.clone().unwrap_or(format!("disk{i}")));
        let nets = self.nets.iter().enumerate().map(|(i, n)| n.id.clone().unwrap_or(format!("net{i}")));
        let vsock = self.vsock.iter().map(|v| v.id.clone().unwrap_or("vsock0".into()));
        disks.chain(nets).chain(vsock).collect()
    }

    /// Checks everything that can be checked without the hypervisor; `max_vcpus` is the
    /// host's limit when known.
    pub fn validate(&self, max_vcpus: Option<u32>) -> Result<(), ConfigError> {
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        self.validate_machine(max_vcpus)
    }

    /// The shared-memory windows the VM gets.
    pub fn shm_window_count(&self) -> u32 {
        self.shm_windows.unwrap_or(self.shm.len() as u32)
    }

    /// Everything [`validate`](Self::validate) checks but the kernel and initrd: what a VM
    /// restored from a snapshot (which boots nothing) must still get right.
    pub fn validate_machine(&self, max_vcpus: Option<u32>) -> Result<(), ConfigError> {
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::TooLittleMemory(self.mem_mib));
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::TooMuchMemory(self.mem_mib));
        }
        let max = max_vcpus.map_or(MAX_VCPUS, |m| m.min(MAX_VCPUS));
        if self.vcpus == 0 || self.vcpus > max {
            return Err(ConfigError::VcpuCount { got: self.vcpus, max });
        }
        for disk in &self.disks {
            disk.check().map_err(|e| ConfigError::Device(format!("disk: {e}")))?;
            if let Some(path) = &disk.path
                && std::fs::metadata(path).is_err()
            {
                return Err(ConfigError::Missing { what: "disk image", path: path.clone() });
            }
        }
        if self.shm_window_count() > MAX_SHM_WINDOWS || self.shm.len() as u32 > self.shm_window_count() {
            let message = format!(
                "shm: {} regions for {} windows (at most {MAX_SHM_WINDOWS} windows)",
                self.shm.len(),
                self.shm_window_count()
            );
            return Err(ConfigError::Device(message));
        }
        for shm in &self.shm {
            shm.check().map_err(|e| ConfigError::Device(format!("shm: {e}")))?;
        }
        for net in &self.nets {
            net.check().map_err(|e| ConfigError::Device(format!("net: {e}")))?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.check().map_err(|e| ConfigError::Device(format!("vsock: {e}")))?;
        }
        let ids = self.device_ids();
        if ids.len() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(ids.len()));
        }
        let mut seen = HashSet::new();
        if let Some(dup) = ids.iter().find(|id| !seen.insert(id.as_str())) {
            return Err(ConfigError::DuplicateId(dup.clone()));
        }
        Ok(())
    }
}

fn check_file(what: &'static str, path: &PathBuf) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Err(_) => Err(ConfigError::Missing { what, path: path.clone() }),
        Ok(m) if !m.is_file() => Err(ConfigError::NotAFile { what, path: path.clone() }),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn forty_thousand_mutated_configurations_are_read_or_refused_with_a_field() {
        let corpus: &[&[u8]] = &[
            br#"{"kernel": "/k", "mem_mib": 64, "vcpus": 2, "cmdline": "prog=idle"}"#,
            br#"{"kernel": "/k", "disks": [{"path": "/d.img", "engine": "io_uring", "readonly": true}], "nets": [{"unix": "/n.sock", "mac": "52:54:00:12:34:56", "mtu": 1500}]}"#,
            br#"{"kernel": "/k", "vsock": {"cid": 3, "socket": "/v.sock"}, "ram_backing": {"kind": "file", "path": "/ram"}, "shm": [{"socket": "/f.sock", "region": "r", "party": 1}], "shm_windows": 2}"#,
            br#"{"kernel": "/k", "disks": [{"nbd": "unix:/n.sock", "export": "e"}], "serial": "file:/s.log", "boot_protocol": "pvh"}"#,
        ];
        let mut m = crate::mutate::Mutator::new(0xc0f1);
        let (mut read, mut refused) = (0, 0);
        for i in 0..40_000 {
            let input = m.mutate(corpus[i % corpus.len()]);
            match json::from_slice::<VmConfig>(&input) {
                // Read: checking it never panics either.
                Ok(config) => {
                    read += 1;
                    let _ = config.validate_machine(Some(8));
                }
                Err(e) => {
                    refused += 1;
                    assert!(!e.to_string().is_empty());
                }
            }
        }
        assert!(read > 0 && refused > 0, "the mutations reach both sides: {read} read, {refused} refused");
    }

    use super::*;

    /// The example files the README points at are valid configurations.
    #[test]
    fn example_configs_are_valid() {
        let examples = [
            ("microguest.json", include_str!("../../../examples/microguest.json")),
            ("blk-stress.json", include_str!("../../../examples/blk-stress.json")),
            ("linux.json", include_str!("../../../examples/linux.json")),
        ];
        for (name, text) in examples {
            let mut config: VmConfig = serde_json::from_str(text).unwrap_or_else(|e| panic!("examples/{name}: {e}"));
            // The files they name are the user's to make: check everything else.
            for disk in std::mem::take(&mut config.disks) {
                disk.check().unwrap_or_else(|e| panic!("examples/{name}: {e}"));
            }
            config.validate_machine(Some(64)).unwrap_or_else(|e| panic!("examples/{name}: {e}"));
        }
        let linux: VmConfig = serde_json::from_str(examples[2].1).unwrap();
        assert_eq!(linux.device_ids(), ["root", "data", "net0", "vsock0"]);
    }

    #[test]
    fn json_defaults_and_unknown_keys() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "mem_mib": 64, "vcpus": 4, "serial": "file:/tmp/x"}"#).unwrap();
        assert_eq!((c.mem_mib, c.vcpus, c.serial), (64, 4, SerialConfig::File("/tmp/x".into())));
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "memory": 1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `memory`"), "{err}");
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "serial": "tty"}"#).unwrap_err();
        assert!(err.to_string().contains("expected stdout, none or file:PATH"), "{err}");
    }

    #[test]
    fn serial_round_trips() {
        for s in ["stdout", "none", "file:/var/log/c"] {
            assert_eq!(s.parse::<SerialConfig>().unwrap().to_string(), s);
        }
        assert!("file:".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let exe = std::env::current_exe().unwrap();
        let mut c = VmConfig::new(&exe);
        assert_eq!(c.validate(Some(8)), Ok(()));
        c.mem_mib = 1;
        assert_eq!(c.validate(None), Err(ConfigError::TooLittleMemory(1)));
        c.mem_mib = 64;
        c.vcpus = 9;
        assert_eq!(c.validate(Some(8)), Err(ConfigError::VcpuCount { got: 9, max: 8 }));
        c.vcpus = 0;
        assert!(c.validate(None).is_err());
        c.vcpus = 1;
        c.kernel = "/nonexistent/kernel".into();
        assert_eq!(c.validate(None).unwrap_err().to_string(), "kernel /nonexistent/kernel does not exist");
        c.kernel = std::env::temp_dir();
        assert!(matches!(c.validate(None), Err(ConfigError::NotAFile { .. })));
    }
}
