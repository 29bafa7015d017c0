//! The initramfs: busybox, the virtio modules and an `/init` that loads them, shows what the
//! guest sees and reboots.
//!
//! The `/init` prints every step with the `VMM-LINUX-GUEST:` prefix so a test can find them
//! in the serial output, and prints [`READY_MARKER`] only when every module loaded. It ends
//! with `reboot -f`: on a kernel command line with `reboot=k` that resets through the i8042,
//! which ends the VMM with status 0.

use std::collections::BTreeSet;
use std::io::{self, Write};

use super::cpio::CpioWriter;

/// The line `/init` prints once every module has loaded, just before it reboots.
pub const READY_MARKER: &str = "VMM-LINUX-GUEST: ready";

/// The busybox applets `/init` uses, plus a few for poking around by hand.
const APPLETS: &[&str] = &[
    "sh", "mount", "umount", "insmod", "modprobe", "lsmod", "ls", "cat", "echo", "uname", "basename", "readlink",
    "reboot", "poweroff", "sleep", "dmesg", "mkdir", "grep",
];

/// A module as it goes into the initramfs.
pub struct InitramfsModule<'a> {
    /// The module's name, as `/init` reports it.
    pub name: &'a str,
    /// Absolute path inside the initramfs.
    pub path: String,
    /// The module's uncompressed bytes.
    pub contents: &'a [u8],
}

/// Everything the initramfs holds.
pub struct Initramfs<'a> {
    /// The kernel's release (`uname -r`), which names `/lib/modules/<release>/`.
    pub kernel_release: &'a str,
    /// The statically linked busybox binary, written as `/bin/busybox`.
    pub busybox: &'a [u8],
    /// In load order.
    pub modules: Vec<InitramfsModule<'a>>,
    /// Written as `/lib/modules/<release>/modules.dep` so `modprobe` works in the guest.
    pub modules_dep: String,
}

/// Where the module at `path` (relative to `/lib/modules/<release>/`, possibly compressed)
/// goes in the initramfs: the same place, without the compression suffix.
pub fn module_path(kernel_release: &str, path: &str) -> String {
    format!("/lib/modules/{kernel_release}/{}", uncompressed(path))
}

/// A module's path without its compression suffix, if it has one.
pub fn uncompressed(path: &str) -> &str {
    [".xz", ".zst", ".gz"].iter().find_map(|suffix| path.strip_suffix(suffix)).unwrap_or(path)
}

/// The `/init` script: mounts, loads `modules` (name, path) in order, lists the virtio
/// devices and partitions, prints the marker when everything loaded, and reboots.
pub fn init_script(kernel_release: &str, modules: &[(&str, &str)]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "#!/bin/sh
# Written by `vmm image` for Linux {kernel_release}: loads the virtio modules, shows what the
# guest sees, then reboots (with reboot=k on the command line, that ends the VMM cleanly).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo \"VMM-LINUX-GUEST: /init running on Linux $(uname -r)\"
failed=
load() {{
    if insmod \"$2\"; then
        echo \"VMM-LINUX-GUEST: loaded $1\"
    else
        echo \"VMM-LINUX-GUEST: cannot load $1\"
        failed=\"$failed $1\"
    fi
}}
"
    ));
    for (name, path) in modules {
        s.push_str(&format!("load {} {}\n", shell_quote(name), shell_quote(path)));
    }
    s.push_str(
        "echo \"VMM-LINUX-GUEST: virtio devices:\"
for dev in /sys/bus/virtio/devices/*; do
    if [ ! -e \"$dev\" ]; then
        echo \"    (none)\"
        break
    fi
    driver=none
    if [ -e \"$dev/driver\" ]; then
        driver=$(basename \"$(readlink \"$dev/driver\")\")
    fi
    echo \"    $(basename \"$dev\"): device id $(cat \"$dev/device\"), driver $driver\"
done
echo \"VMM-LINUX-GUEST: /proc/partitions:\"
cat /proc/partitions
if [ -n \"$failed\" ]; then
    echo \"VMM-LINUX-GUEST: not ready, modules that did not load:$failed\"
else
",
    );
    s.push_str(&format!("    echo \"{READY_MARKER}\"\nfi\n"));
    s.push_str(
        "reboot -f
# reboot -f does not return; if it did, init would exit, the kernel would panic and
# panic=-1 would reboot.
",
    );
    s
}

/// Quotes a word for the shell unless it is made of characters that need no quoting.
fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,=:".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Writes the initramfs as an uncompressed newc cpio archive.
pub fn write_initramfs<W: Write>(out: W, contents: &Initramfs) -> io::Result<W> {
    let mut tree = Tree { cpio: CpioWriter::new(out), dirs: BTreeSet::new() };
    for dir in ["/bin", "/dev", "/proc", "/sys", "/tmp", "/root"] {
        tree.dir(dir)?;
    }
    // The kernel opens /dev/console for init's stdin, stdout and stderr before init runs,
    // so before init can mount devtmpfs: without this node init has no console at all.
    tree.cpio.add_char_device("/dev/console", 0o600, 5, 1)?;
    tree.file("/bin/busybox", 0o755, contents.busybox)?;
    for applet in APPLETS {
        tree.cpio.add_symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    let order: Vec<(&str, &str)> = contents.modules.iter().map(|m| (m.name, m.path.as_str())).collect();
    tree.file("/init", 0o755, init_script(contents.kernel_release, &order).as_bytes())?;
    for module in &contents.modules {
        tree.file(&module.path, 0o644, module.contents)?;
    }
    tree.file(
        &format!("/lib/modules/{}/modules.dep", contents.kernel_release),
        0o644,
        contents.modules_dep.as_bytes(),
    )?;
    tree.cpio.finish()
}

/// A cpio archive that creates each file's parent directories before the file, as the
/// kernel's unpacker needs.
struct Tree<W: Write> {
    cpio: CpioWriter<W>,
    dirs: BTreeSet<String>,
}

impl<W: Write> Tree<W> {
    fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_end_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.cpio.add_dir(path, 0o755)?;
        self.dirs.insert(path.to_string());
        Ok(())
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.cpio.add_file(path, mode, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::HEADER_LEN;

    const MODULES: &[(&str, &str)] = &[
        ("virtio", "/lib/modules/6.1.0-48-cloud-amd64/kernel/drivers/virtio/virtio.ko"),
        ("virtio_mmio", "/lib/modules/6.1.0-48-cloud-amd64/kernel/drivers/virtio/virtio_mmio.ko"),
    ];

    #[test]
    fn init_mounts_then_loads_modules_in_order_then_reports_and_reboots() {
        let script = init_script("6.1.0-48-cloud-amd64", MODULES);
        assert!(script.starts_with("#!/bin/sh\n"));
        let at = |needle: &str| script.find(needle).unwrap_or_else(|| panic!("{needle:?} missing from:\n{script}"));
        let steps = [
            "mount -t proc proc /proc",
            "mount -t sysfs sysfs /sys",
            "mount -t devtmpfs devtmpfs /dev",
            "load virtio /lib/modules/6.1.0-48-cloud-amd64/kernel/drivers/virtio/virtio.ko\n",
            "load virtio_mmio /lib/modules/6.1.0-48-cloud-amd64/kernel/drivers/virtio/virtio_mmio.ko\n",
            "/sys/bus/virtio/devices/*",
            "cat /proc/partitions",
            "echo \"VMM-LINUX-GUEST: ready\"",
            "reboot -f",
        ];
        for pair in steps.windows(2) {
            assert!(at(pair[0]) < at(pair[1]), "{:?} before {:?}", pair[0], pair[1]);
        }
        // The marker is printed only when nothing failed.
        assert!(at("if [ -n \"$failed\" ]") < at(READY_MARKER));
        assert_eq!(script.matches(READY_MARKER).count(), 1);
    }

    #[test]
    fn init_with_no_modules_still_reports_and_reboots() {
        let script = init_script("6.1.0", &[]);
        assert!(!script.contains("\nload "));
        assert!(script.contains(READY_MARKER));
        assert!(script.contains("reboot -f"));
    }

    #[test]
    fn words_that_need_it_are_quoted() {
        assert_eq!(shell_quote("/lib/modules/6.1.0+deb/x.ko"), "/lib/modules/6.1.0+deb/x.ko");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn module_paths_lose_their_compression_suffix() {
        assert_eq!(
            module_path("6.12.1", "kernel/drivers/virtio/virtio.ko.xz"),
            "/lib/modules/6.12.1/kernel/drivers/virtio/virtio.ko"
        );
        assert_eq!(module_path("6.1.0", "kernel/a.ko"), "/lib/modules/6.1.0/kernel/a.ko");
    }

    /// The names of the entries of a newc archive, in order, with their modes.
    fn entries(archive: &[u8]) -> Vec<(String, u32)> {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            let field = |i: usize| {
                let hex = std::str::from_utf8(&archive[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
                u32::from_str_radix(hex, 16).unwrap() as usize
            };
            let (mode, size, name_len) = (field(1), field(6), field(11));
            let name = &archive[at + HEADER_LEN..at + HEADER_LEN + name_len - 1];
            let name = String::from_utf8(name.to_vec()).unwrap();
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode as u32));
            at = (at + HEADER_LEN + name_len).div_ceil(4) * 4;
            at = (at + size).div_ceil(4) * 4;
        }
    }

    #[test]
    fn the_archive_has_console_busybox_init_and_modules_after_their_directories() {
        let release = "6.1.0-48-cloud-amd64";
        let contents = Initramfs {
            kernel_release: release,
            busybox: b"\x7fELF busybox",
            modules: MODULES
                .iter()
                .map(|(name, path)| InitramfsModule { name, path: path.to_string(), contents: b"\x7fELF module" })
                .collect(),
            modules_dep: "kernel/drivers/virtio/virtio.ko:\n".into(),
        };
        let archive = write_initramfs(Vec::new(), &contents).unwrap();
        let entries = entries(&archive);
        let mode_of = |name: &str| {
            entries.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing: {entries:?}")).1
        };
        assert_eq!(mode_of("dev/console"), 0o020_600);
        assert_eq!(mode_of("bin/busybox"), 0o100_755);
        assert_eq!(mode_of("bin/sh"), 0o120_777);
        assert_eq!(mode_of("init"), 0o100_755);
        assert_eq!(mode_of("proc"), 0o040_755);
        assert_eq!(mode_of("lib/modules/6.1.0-48-cloud-amd64/modules.dep"), 0o100_644);
        // Every entry's parent directory comes before it.
        for (i, (name, _)) in entries.iter().enumerate() {
            if let Some((parent, _)) = name.rsplit_once('/') {
                let parent_at = entries.iter().position(|(n, _)| n == parent);
                assert!(parent_at.is_some_and(|p| p < i), "{parent} before {name}");
            }
        }
        let names: Vec<_> = entries.iter().map(|(n, _)| n.as_str()).collect();
        let unique: BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "no entry twice: {names:?}");
        assert!(names.contains(&"lib/modules/6.1.0-48-cloud-amd64/kernel/drivers/virtio/virtio_mmio.ko"));
    }
}
