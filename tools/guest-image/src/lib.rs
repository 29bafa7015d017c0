//! Building a Linux guest image (bzImage and initramfs) from Debian's packages.
//!
//! The development machines cannot boot Linux (their KVM emulates ring-0 code and rejects
//! SSE), so the Linux boot test runs only on hosts with VMX or SVM, from a kernel and an
//! initrd given in `VMM_TEST_LINUX_KERNEL` and `VMM_TEST_LINUX_INITRD`. This module makes
//! those two files the same way anywhere: Debian's cloud kernel (small, made for VMs) and
//! busybox-static, fetched with apt-get. The cloud kernel builds its virtio drivers as
//! modules, and the VMM describes its virtio-mmio devices through ACPI, which only the
//! `virtio_mmio` module binds; so the initramfs carries those modules and loads them.
#![warn(missing_docs)]

pub mod cpio;
pub mod debian;
pub mod initramfs;
pub mod modules;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use initramfs::READY_MARKER;
pub use modules::{ModuleError, ModuleIndex};

use initramfs::{Initramfs, InitramfsModule};

/// The modules the initramfs loads; their dependencies come along.
pub const DEFAULT_MODULES: &[&str] =
    &["virtio_mmio", "virtio_blk", "virtio_net", "vsock", "vmw_vsock_virtio_transport"];

/// Why a guest image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file or directory operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, as a verb: `read`, `write`, `create` or `remove`.
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external tool (apt-get, dpkg-deb, a decompressor) could not be started.
    #[error("cannot run {command}: {source} (the image tool needs Debian's apt-get and dpkg-deb)")]
    Spawn {
        /// The command line, or the tool's name.
        command: String,
        /// The error from starting it; `NotFound` when the tool is not installed.
        #[source]
        source: std::io::Error,
    },
    /// An external tool ran but exited with a failure status.
    #[error("`{command}` failed: {message}")]
    CommandFailed {
        /// The command line that failed.
        command: String,
        /// The last non-empty line of its stderr.
        message: String,
    },
    /// A package could not be downloaded, or did not hold what was expected.
    #[error("{0}")]
    Package(String),
    /// The kernel modules could not be indexed or ordered.
    #[error(transparent)]
    Module(#[from] ModuleError),
}

impl ImageError {
    fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        ImageError::Io { action, path: path.to_path_buf(), source }
    }
}

/// What to build, and from which packages.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Where `vmlinuz` and `initrd.cpio` go; created if missing.
    pub output_dir: PathBuf,
    /// Where packages are downloaded and unpacked; `<output_dir>/work` when `None`, which is
    /// removed once the image is built.
    pub work_dir: Option<PathBuf>,
    /// A kernel metapackage (resolved to the versioned package it depends on) or a versioned
    /// kernel package.
    pub kernel_package: String,
    /// A statically linked busybox (the initramfs has no C library).
    pub busybox_package: String,
    /// Modules to load, by name; dependencies are added, built-in ones skipped.
    pub modules: Vec<String>,
}

impl ImageOptions {
    /// Options that write into `output_dir` from Debian's cloud kernel and busybox-static,
    /// loading [`DEFAULT_MODULES`], with a temporary work directory.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            work_dir: None,
            kernel_package: "linux-image-cloud-amd64".into(),
            busybox_package: "busybox-static".into(),
            modules: DEFAULT_MODULES.iter().map(|m| m.to_string()).collect(),
        }
    }
}

/// A built image.
#[derive(Clone, Debug)]
pub struct LinuxImage {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The uncompressed newc initramfs.
    pub initrd: PathBuf,
    /// The kernel's release (`uname -r`), e.g. `6.1.0-48-cloud-amd64`.
    pub kernel_release: String,
    /// The versioned package the kernel came from.
    pub kernel_package: String,
    /// The modules `/init` loads, in order.
    pub modules: Vec<String>,
    /// Modules asked for that the kernel has built in.
    pub builtin: Vec<String>,
}

/// Downloads the packages, writes `vmlinuz` and `initrd.cpio` into `opts.output_dir`, and
/// reports each step through `progress`.
pub fn build_linux_image(opts: &ImageOptions, progress: &mut dyn FnMut(&str)) -> Result<LinuxImage, ImageError> {
    let out = &opts.output_dir;
    let work = opts.work_dir.clone().unwrap_or_else(|| out.join("work"));
    let debs = work.join("debs");
    for dir in [out, &debs] {
        std::fs::create_dir_all(dir).map_err(|e| ImageError::io("create", dir, e))?;
    }

    let kernel_package = resolve_kernel_package(&opts.kernel_package, &debs, progress)?;
    let release = debian::kernel_release(&kernel_package)
        .ok_or_else(|| {
            ImageError::Package(format!("cannot tell the kernel release from the package name {kernel_package}"))
        })?
        .to_string();
    progress(&format!("downloading {kernel_package}"));
    let deb = debian::download(&kernel_package, &debs, progress)?;
    let kernel_root = work.join("kernel");
    progress(&format!("unpacking {}", file_name(&deb)));
    debian::extract(&deb, &kernel_root)?;

    progress(&format!("downloading {}", opts.busybox_package));
    let deb = debian::download(&opts.busybox_package, &debs, progress)?;
    let busybox_root = work.join("busybox");
    debian::extract(&deb, &busybox_root)?;
    let busybox_path = busybox_root.join("bin/busybox");
    let busybox = std::fs::read(&busybox_path).map_err(|e| ImageError::io("read", &busybox_path, e))?;

    let vmlinuz = find_vmlinuz(&kernel_root, &release)?;
    let kernel = out.join("vmlinuz");
    std::fs::copy(&vmlinuz, &kernel).map_err(|e| ImageError::io("write", &kernel, e))?;
    progress(&format!("wrote {} (Linux {release})", kernel.display()));

    let modules_dir = kernel_root.join("lib/modules").join(&release);
    let builtin = builtin_modules(&modules_dir)?;
    let (wanted, skipped): (Vec<&str>, Vec<&str>) =
        opts.modules.iter().map(String::as_str).partition(|m| !builtin.contains(&m.replace('-', "_")));
    if !skipped.is_empty() {
        progress(&format!("built into the kernel: {}", skipped.join(", ")));
    }
    let (index, mut contents) = index_modules(&modules_dir, &wanted)?;
    let order = index.load_order(&wanted)?;
    // From a modules.dep, nothing has been read yet.
    for module in &order {
        if !contents.contains_key(&module.name) {
            let bytes = debian::read_decompressed(&modules_dir.join(&module.path))?;
            contents.insert(module.name.clone(), bytes);
        }
    }
    let modules = order
        .iter()
        .map(|module| InitramfsModule {
            name: &module.name,
            path: initramfs::module_path(&release, &module.path),
            contents: &contents[&module.name],
        })
        .collect();
    let names: Vec<String> = order.iter().map(|m| m.name.clone()).collect();
    progress(&format!("modules, in load order: {}", names.join(" ")));

    let initrd = out.join("initrd.cpio");
    let image = Initramfs {
        kernel_release: &release,
        busybox: &busybox,
        modules_dep: modules::render_modules_dep(&order, |m| initramfs::uncompressed(&m.path).to_string()),
        modules,
    };
    write_initrd(&initrd, &image).map_err(|e| ImageError::io("write", &initrd, e))?;
    progress(&format!("wrote {}", initrd.display()));

    if opts.work_dir.is_none() {
        std::fs::remove_dir_all(&work).map_err(|e| ImageError::io("remove", &work, e))?;
    }
    Ok(LinuxImage {
        kernel,
        initrd,
        kernel_release: release,
        kernel_package,
        modules: names,
        builtin: skipped.iter().map(|s| s.to_string()).collect(),
    })
}

fn write_initrd(path: &Path, image: &Initramfs) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let out = initramfs::write_initramfs(std::io::BufWriter::new(file), image)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// The versioned kernel package: `package` itself, or the one the metapackage depends on.
fn resolve_kernel_package(package: &str, debs: &Path, progress: &mut dyn FnMut(&str)) -> Result<String, ImageError> {
    if debian::is_versioned_kernel_package(package) {
        return Ok(package.to_string());
    }
    progress(&format!("downloading {package} to find the current kernel"));
    let meta = debian::download(package, debs, progress)?;
    let depends = debian::control_field(&meta, "Depends")?;
    debian::kernel_dependency(&depends).ok_or_else(|| {
        ImageError::Package(format!("{package} depends on no versioned linux-image package (Depends: {depends})"))
    })
}

/// `/boot/vmlinuz-<release>`, or the only `vmlinuz-*` there is.
fn find_vmlinuz(root: &Path, release: &str) -> Result<PathBuf, ImageError> {
    let boot = root.join("boot");
    let expected = boot.join(format!("vmlinuz-{release}"));
    if expected.is_file() {
        return Ok(expected);
    }
    let found: Vec<PathBuf> = std::fs::read_dir(&boot)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| file_name(p).starts_with("vmlinuz-"))
        .collect();
    match found.as_slice() {
        [only] => Ok(only.clone()),
        _ => Err(ImageError::Package(format!(
            "the kernel package has no {} ({} other vmlinuz files)",
            expected.strip_prefix(root).unwrap_or(&expected).display(),
            found.len()
        ))),
    }
}

/// Names of the modules listed in `modules.builtin` (none if the file is missing).
fn builtin_modules(modules_dir: &Path) -> Result<BTreeSet<String>, ImageError> {
    let path = modules_dir.join("modules.builtin");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().map(modules::module_name).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(ImageError::io("read", &path, e)),
    }
}

type ModuleContents = BTreeMap<String, Vec<u8>>;

/// The dependency index for `wanted`: from `modules.dep` when the tree has one, otherwise
/// from the modules' `.modinfo` (Debian ships no modules.dep; depmod makes it at install).
fn index_modules(modules_dir: &Path, wanted: &[&str]) -> Result<(ModuleIndex, ModuleContents), ImageError> {
    let dep_path = modules_dir.join("modules.dep");
    if dep_path.is_file() {
        let text = std::fs::read_to_string(&dep_path).map_err(|e| ImageError::io("read", &dep_path, e))?;
        return Ok((ModuleIndex::parse_modules_dep(&text)?, BTreeMap::new()));
    }
    let mut available = BTreeMap::new();
    collect_module_files(modules_dir, modules_dir, &mut available)?;
    ModuleIndex::from_modinfo(&available, wanted, |path| debian::read_decompressed(&modules_dir.join(path)))
}

/// Every `*.ko*` under `dir`, by module name, with its path relative to `root`.
fn collect_module_files(root: &Path, dir: &Path, into: &mut BTreeMap<String, String>) -> Result<(), ImageError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ImageError::io("read", dir, e))?;
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_module_files(root, &path, into)?;
        } else if is_module_file(&file_name(&path)) {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            let relative = relative.to_string_lossy().into_owned();
            into.entry(modules::module_name(&relative)).or_insert(relative);
        }
    }
    Ok(())
}

fn is_module_file(name: &str) -> bool {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|suffix| name.ends_with(suffix))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Downloads Debian's packages and builds the image: needs apt-get, dpkg-deb and the
    /// network, and takes a while, so it runs only when asked for
    /// (`cargo test -p vmm --lib image -- --ignored`).
    #[test]
    #[ignore = "downloads Debian packages"]
    fn builds_an_image_from_debian_packages() {
        let dir = std::env::temp_dir().join(format!("vmm-image-test-{}", std::process::id()));
        let mut lines = Vec::new();
        let image = build_linux_image(&ImageOptions::new(&dir), &mut |l| lines.push(l.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        let kernel = std::fs::read(&image.kernel).unwrap();
        assert_eq!(&kernel[0x202..0x206], b"HdrS", "a bzImage");
        let initrd = std::fs::read(&image.initrd).unwrap();
        assert_eq!(&initrd[..6], b"070701");
        assert!(initrd.windows(10).any(|w| w == b"TRAILER!!!"));
        for module in ["virtio_mmio", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport"] {
            assert!(
                image.modules.iter().any(|m| m == module) || image.builtin.iter().any(|m| m == module),
                "{module} missing from {:?}",
                image.modules
            );
        }
        assert!(!dir.join("work").exists(), "the work directory is removed");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!lines.is_empty());
    }

    #[test]
    fn module_files_are_found_by_name_and_builtins_are_read() {
        let dir = std::env::temp_dir().join(format!("vmm-image-tree-{}", std::process::id()));
        let drivers = dir.join("kernel/drivers/virtio");
        std::fs::create_dir_all(&drivers).unwrap();
        std::fs::write(drivers.join("virtio.ko"), b"").unwrap();
        std::fs::write(drivers.join("virtio-mem.ko.xz"), b"").unwrap();
        std::fs::write(dir.join("modules.builtin"), "kernel/drivers/block/loop.ko\n").unwrap();
        let mut found = BTreeMap::new();
        collect_module_files(&dir, &dir, &mut found).unwrap();
        assert_eq!(found["virtio"], "kernel/drivers/virtio/virtio.ko");
        assert_eq!(found["virtio_mem"], "kernel/drivers/virtio/virtio-mem.ko.xz");
        assert_eq!(found.len(), 2, "modules.builtin is not a module: {found:?}");
        assert_eq!(builtin_modules(&dir).unwrap(), BTreeSet::from(["loop".to_string()]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
