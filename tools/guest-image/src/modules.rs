//! Which kernel modules to load, and in what order.
//!
//! The dependencies come from `modules.dep` when the module tree has one (depmod's output:
//! `path: dep-path dep-path ...`, paths relative to `/lib/modules/<version>/`). Debian's
//! kernel packages ship none (depmod runs when the package is installed), so the same index
//! can also be built from each module's own `.modinfo` section, whose `depends=` field is
//! what depmod reads. Either way [`ModuleIndex::load_order`] puts every dependency before
//! the modules that need it, which is the order busybox `insmod` must follow.

use std::collections::{BTreeMap, BTreeSet};

/// Why the modules to load could not be indexed or ordered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    /// A module asked for, or one a module depends on, is not in the index.
    #[error("kernel module {name} is not in the kernel package{}", needed_by_suffix(.needed_by))]
    Missing {
        /// The missing module's name.
        name: String,
        /// The module that depends on it; `None` when it was asked for directly.
        needed_by: Option<String>,
    },
    /// The dependencies form a cycle through the named module.
    #[error("kernel modules depend on each other in a cycle through {0}")]
    Cycle(String),
    /// A line of `modules.dep` has no `:` or no path before it.
    #[error("modules.dep line {line}: expected \"path: dependencies\"")]
    BadDepLine {
        /// The line's number, counting from 1.
        line: usize,
    },
    /// A module file is not an ELF64 file with a readable `.modinfo` section.
    #[error("kernel module {name}: {reason}")]
    BadElf {
        /// The module's name.
        name: String,
        /// What is wrong with the file.
        reason: &'static str,
    },
}

fn needed_by_suffix(needed_by: &Option<String>) -> String {
    needed_by.as_ref().map(|m| format!(" (needed by {m})")).unwrap_or_default()
}

/// One module: its file, relative to `/lib/modules/<version>/`, and the modules it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// The name the kernel knows it by (see [`module_name`]).
    pub name: String,
    /// The module's file, relative to `/lib/modules/<version>/`, possibly compressed.
    pub path: String,
    /// The names of the modules it needs, as `modules.dep` or `.modinfo` lists them.
    pub deps: Vec<String>,
}

/// Modules by name.
#[derive(Clone, Debug, Default)]
pub struct ModuleIndex {
    modules: BTreeMap<String, ModuleInfo>,
}

/// The name the kernel knows a module file by: the file name without `.ko` (and any
/// compression suffix), with `-` read as `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.find(".ko").map_or(file, |i| &file[..i]);
    stem.replace('-', "_")
}

impl ModuleIndex {
    /// Parses depmod's `modules.dep`.
    pub fn parse_modules_dep(text: &str) -> Result<Self, ModuleError> {
        let mut index = Self::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or(ModuleError::BadDepLine { line: i + 1 })?;
            let path = path.trim();
            if path.is_empty() {
                return Err(ModuleError::BadDepLine { line: i + 1 });
            }
            index.insert(ModuleInfo {
                name: module_name(path),
                path: path.to_string(),
                deps: deps.split_whitespace().map(module_name).collect(),
            });
        }
        Ok(index)
    }

    /// Indexes `wanted` and everything they depend on, reading each module's `.modinfo`.
    /// `available` maps module names to paths; `read` returns a module's (uncompressed)
    /// bytes, which are handed back so the caller need not read them twice.
    pub fn from_modinfo<E: From<ModuleError>>(
        available: &BTreeMap<String, String>,
        wanted: &[&str],
        mut read: impl FnMut(&str) -> Result<Vec<u8>, E>,
    ) -> Result<(Self, BTreeMap<String, Vec<u8>>), E> {
        let mut index = Self::default();
        let mut contents = BTreeMap::new();
        let mut queue: Vec<(String, Option<String>)> = wanted.iter().map(|w| (w.replace('-', "_"), None)).collect();
        while let Some((name, needed_by)) = queue.pop() {
            if index.modules.contains_key(&name) {
                continue;
            }
            let path =
                available.get(&name).ok_or_else(|| ModuleError::Missing { name: name.clone(), needed_by })?.clone();
            let bytes = read(&path)?;
            let deps = modinfo_depends(&name, &bytes)?;
            queue.extend(deps.iter().map(|d| (d.clone(), Some(name.clone()))));
            contents.insert(name.clone(), bytes);
            index.insert(ModuleInfo { name, path, deps });
        }
        Ok((index, contents))
    }

    /// Adds a module, replacing any with the same name.
    pub fn insert(&mut self, info: ModuleInfo) {
        self.modules.insert(info.name.clone(), info);
    }

    /// The module called `name`, with `-` read as `_`.
    pub fn get(&self, name: &str) -> Option<&ModuleInfo> {
        self.modules.get(&name.replace('-', "_"))
    }

    /// `wanted` and their dependencies, each once, every module after the ones it needs;
    /// otherwise in the order asked for.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<&ModuleInfo>, ModuleError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut visiting = BTreeSet::new();
        for name in wanted {
            self.visit(name, None, &mut visiting, &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit<'a>(
        &'a self,
        name: &str,
        needed_by: Option<&str>,
        visiting: &mut BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<&'a ModuleInfo>,
    ) -> Result<(), ModuleError> {
        let module = self
            .get(name)
            .ok_or_else(|| ModuleError::Missing { name: name.to_string(), needed_by: needed_by.map(str::to_string) })?;
        if done.contains(&module.name) {
            return Ok(());
        }
        if !visiting.insert(module.name.clone()) {
            return Err(ModuleError::Cycle(module.name.clone()));
        }
        for dep in &module.deps {
            self.visit(dep, Some(&module.name), visiting, done, order)?;
        }
        visiting.remove(&module.name);
        done.insert(module.name.clone());
        order.push(module);
        Ok(())
    }
}

/// Renders a `modules.dep` for `modules` (in load order), with each module's path mapped by
/// `path`, so that `modprobe` works inside the guest too. depmod lists every dependency,
/// direct or not, the last to load first.
pub fn render_modules_dep(modules: &[&ModuleInfo], path: impl Fn(&ModuleInfo) -> String) -> String {
    let mut out = String::new();
    for (i, module) in modules.iter().enumerate() {
        out.push_str(&path(module));
        out.push(':');
        let mut needed = BTreeSet::new();
        collect_deps(modules, &module.name, &mut needed);
        for dep in modules[..i].iter().rev().filter(|m| needed.contains(&m.name)) {
            out.push(' ');
            out.push_str(&path(dep));
        }
        out.push('\n');
    }
    out
}

fn collect_deps(modules: &[&ModuleInfo], name: &str, into: &mut BTreeSet<String>) {
    if let Some(module) = modules.iter().find(|m| m.name == name) {
        for dep in &module.deps {
            if into.insert(dep.clone()) {
                collect_deps(modules, dep, into);
            }
        }
    }
}

/// The `depends=` field of a module's `.modinfo` section (empty when it needs nothing).
pub fn modinfo_depends(name: &str, elf: &[u8]) -> Result<Vec<String>, ModuleError> {
    let bad = |reason| ModuleError::BadElf { name: name.to_string(), reason };
    let modinfo = elf_section(elf, ".modinfo").map_err(bad)?;
    let depends = modinfo.split(|&b| b == 0).find_map(|field| field.strip_prefix(b"depends=")).unwrap_or_default();
    let depends = std::str::from_utf8(depends).map_err(|_| bad("depends= is not UTF-8"))?;
    Ok(depends.split(',').filter(|d| !d.is_empty()).map(|d| d.replace('-', "_")).collect())
}

/// The contents of the named section of a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<&'a [u8], &'static str> {
    const NOT_ELF64: &str = "not a little-endian 64-bit ELF file";
    const TRUNCATED: &str = "truncated ELF file";
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(NOT_ELF64);
    }
    let u16_at = |at: usize| -> Result<u64, &'static str> {
        let b = elf.get(at..at + 2).ok_or(TRUNCATED)?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as u64)
    };
    let u32_at = |at: usize| -> Result<u64, &'static str> {
        let b = elf.get(at..at + 4).ok_or(TRUNCATED)?;
        Ok(u32::from_le_bytes(b.try_into().unwrap()) as u64)
    };
    let u64_at = |at: usize| -> Result<u64, &'static str> {
        let b = elf.get(at..at + 8).ok_or(TRUNCATED)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap()))
    };
    let slice = |offset: u64, size: u64| -> Result<&'a [u8], &'static str> {
        let start = usize::try_from(offset).map_err(|_| TRUNCATED)?;
        let end = start.checked_add(usize::try_from(size).map_err(|_| TRUNCATED)?).ok_or(TRUNCATED)?;
        elf.get(start..end).ok_or(TRUNCATED)
    };
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3a)?;
    let shnum = u16_at(0x3c)?;
    let shstrndx = u16_at(0x3e)?;
    if shentsize < 64 || shstrndx >= shnum {
        return Err(NOT_ELF64);
    }
    let header =
        |i: u64| -> Result<usize, &'static str> { usize::try_from(shoff + i * shentsize).map_err(|_| TRUNCATED) };
    let strtab_header = header(shstrndx)?;
    let strtab = slice(u64_at(strtab_header + 24)?, u64_at(strtab_header + 32)?)?;
    for i in 0..shnum {
        let h = header(i)?;
        let name_at = usize::try_from(u32_at(h)?).map_err(|_| TRUNCATED)?;
        let name = strtab.get(name_at..).ok_or(TRUNCATED)?;
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        if name == wanted.as_bytes() {
            return slice(u64_at(h + 24)?, u64_at(h + 32)?);
        }
    }
    Err("no .modinfo section")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A modules.dep as depmod writes it: every dependency, direct or not, last-loaded first.
    const MODULES_DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vsock.ko
kernel/arch/x86/events/intel/intel-uncore.ko.xz:
";

    fn names(order: &[&ModuleInfo]) -> Vec<String> {
        order.iter().map(|m| m.name.clone()).collect()
    }

    fn position(order: &[String], name: &str) -> usize {
        order.iter().position(|n| n == name).unwrap()
    }

    #[test]
    fn module_names_drop_the_suffix_and_dashes() {
        assert_eq!(module_name("kernel/drivers/net/virtio_net.ko"), "virtio_net");
        assert_eq!(module_name("kernel/x/intel-uncore.ko.xz"), "intel_uncore");
        assert_eq!(module_name("failover.ko.zst"), "failover");
    }

    #[test]
    fn modules_dep_lines_become_modules_with_dependencies() {
        let index = ModuleIndex::parse_modules_dep(MODULES_DEP).unwrap();
        let net = index.get("virtio_net").unwrap();
        assert_eq!(net.path, "kernel/drivers/net/virtio_net.ko");
        assert_eq!(net.deps, ["net_failover", "failover", "virtio_ring", "virtio"]);
        assert!(index.get("virtio").unwrap().deps.is_empty());
        assert_eq!(index.get("intel-uncore").unwrap().path, "kernel/arch/x86/events/intel/intel-uncore.ko.xz");
        assert_eq!(
            ModuleIndex::parse_modules_dep("ok.ko:\nno colon here\n").unwrap_err(),
            ModuleError::BadDepLine { line: 2 }
        );
    }

    #[test]
    fn load_order_puts_dependencies_first_and_each_module_once() {
        let index = ModuleIndex::parse_modules_dep(MODULES_DEP).unwrap();
        let wanted = ["virtio_mmio", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport"];
        let order = names(&index.load_order(&wanted).unwrap());
        assert_eq!(order.len(), 10, "{order:?}");
        let unique: BTreeSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len(), "no duplicates: {order:?}");
        for module in &order {
            for dep in &index.get(module).unwrap().deps {
                assert!(position(&order, dep) < position(&order, module), "{dep} before {module}: {order:?}");
            }
        }
        assert!(position(&order, "virtio_mmio") < position(&order, "virtio_blk"));
        assert!(!order.contains(&"intel_uncore".to_string()));
    }

    #[test]
    fn load_order_names_the_missing_module_and_who_needs_it() {
        let index = ModuleIndex::parse_modules_dep(MODULES_DEP).unwrap();
        assert_eq!(
            index.load_order(&["virtio_gpu"]).unwrap_err(),
            ModuleError::Missing { name: "virtio_gpu".into(), needed_by: None }
        );
        let broken = ModuleIndex::parse_modules_dep("a.ko: b.ko\n").unwrap();
        let err = broken.load_order(&["a"]).unwrap_err();
        assert_eq!(err.to_string(), "kernel module b is not in the kernel package (needed by a)");
        let cycle = ModuleIndex::parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(cycle.load_order(&["a"]), Err(ModuleError::Cycle(_))));
    }

    #[test]
    fn rendered_modules_dep_lists_all_dependencies_last_loaded_first() {
        let index = ModuleIndex::parse_modules_dep(MODULES_DEP).unwrap();
        let order = index.load_order(&["virtio_net"]).unwrap();
        let text = render_modules_dep(&order, |m| m.path.clone());
        let net_line = text.lines().last().unwrap();
        assert_eq!(
            net_line,
            "kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio.ko \
             kernel/drivers/virtio/virtio_ring.ko kernel/drivers/net/net_failover.ko \
             kernel/net/core/failover.ko"
        );
        // Read back, it gives the same modules, still with virtio_net last.
        let reparsed = ModuleIndex::parse_modules_dep(&text).unwrap();
        let again = names(&reparsed.load_order(&["virtio_net"]).unwrap());
        assert_eq!(again.iter().collect::<BTreeSet<_>>(), names(&order).iter().collect::<BTreeSet<_>>());
        assert_eq!(again.last().unwrap(), "virtio_net");
    }

    /// A minimal ELF64 file with a section-name table and a `.modinfo` section.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let shstrtab_at = elf.len() as u64;
        elf.extend_from_slice(shstrtab);
        let modinfo_at = elf.len() as u64;
        elf.extend_from_slice(modinfo);
        let shoff = elf.len() as u64;
        elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        let section = |name: u32, offset: u64, size: u64| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&offset.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h
        };
        elf.extend(section(0, 0, 0));
        elf.extend(section(1, shstrtab_at, shstrtab.len() as u64));
        elf.extend(section(11, modinfo_at, modinfo.len() as u64));
        elf
    }

    #[test]
    fn modinfo_depends_are_read_from_the_elf_section() {
        let elf = elf_with_modinfo(b"license=GPL\0depends=virtio_ring,virtio,net-failover\0name=virtio_net\0\0");
        assert_eq!(modinfo_depends("virtio_net", &elf).unwrap(), ["virtio_ring", "virtio", "net_failover"]);
        let none = elf_with_modinfo(b"depends=\0name=failover\0");
        assert!(modinfo_depends("failover", &none).unwrap().is_empty());
        assert!(matches!(modinfo_depends("junk", b"not an elf file at all"), Err(ModuleError::BadElf { .. })));
        let mut truncated = elf_with_modinfo(b"depends=\0");
        // Cut inside the .modinfo section header, before its size field.
        truncated.truncate(truncated.len() - 40);
        assert!(modinfo_depends("cut", &truncated).is_err());
    }

    #[test]
    fn the_index_can_be_built_from_modinfo_alone() {
        let available: BTreeMap<String, String> = [
            ("virtio_blk", "kernel/virtio_blk.ko"),
            ("virtio", "kernel/virtio.ko"),
            ("virtio_ring", "kernel/virtio_ring.ko"),
            ("unused", "kernel/unused.ko"),
        ]
        .into_iter()
        .map(|(n, p)| (n.to_string(), p.to_string()))
        .collect();
        let mut reads = Vec::new();
        let (index, contents) = ModuleIndex::from_modinfo::<ModuleError>(&available, &["virtio_blk"], |path| {
            reads.push(path.to_string());
            Ok(elf_with_modinfo(match path {
                "kernel/virtio_blk.ko" => b"depends=virtio,virtio_ring\0",
                _ => b"depends=\0",
            }))
        })
        .unwrap();
        assert_eq!(reads.len(), 3, "only the closure is read: {reads:?}");
        assert_eq!(contents.len(), 3);
        let order = names(&index.load_order(&["virtio_blk"]).unwrap());
        assert_eq!(order.last().unwrap(), "virtio_blk");
        assert_eq!(order.len(), 3);

        let err = ModuleIndex::from_modinfo::<ModuleError>(&available, &["virtio_blk"], |_| {
            Ok(elf_with_modinfo(b"depends=virtio_gone\0"))
        })
        .unwrap_err();
        assert_eq!(err, ModuleError::Missing { name: "virtio_gone".into(), needed_by: Some("virtio_blk".into()) });
    }
}
