//! Fetching and unpacking Debian packages with Debian's own tools.
//!
//! `apt-get download` fetches a package into the current directory without installing it
//! (no root needed, no dependencies pulled), `dpkg-deb -f` reads its control fields and
//! `dpkg-deb -x` unpacks it. Running the tools rather than reimplementing `ar`, `tar` and the
//! repository's signature checks keeps apt's verification of what is downloaded.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::ImageError;

/// Downloads `package` into `dir` and returns the `.deb`'s path. When the download fails
/// (most often: package lists that are missing or stale), runs `apt-get update` once and
/// tries again.
pub fn download(package: &str, dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
    // A `.deb` left from an earlier run may be an older version; keep only the new one.
    for stale in debs_of(package, dir)? {
        std::fs::remove_file(&stale).map_err(|e| ImageError::io("remove", &stale, e))?;
    }
    let fetch = || run(Command::new("apt-get").arg("download").arg(package).current_dir(dir));
    if let Err(first) = fetch() {
        progress(&format!("{first}; running apt-get update"));
        if let Err(update) = run(Command::new("apt-get").arg("update")) {
            // Most often: not root. The download's own error says what was missing.
            return Err(ImageError::Package(format!("{first} (and {update})")));
        }
        fetch()?;
    }
    let mut debs = debs_of(package, dir)?;
    match debs.len() {
        1 => Ok(debs.remove(0)),
        _ => Err(ImageError::Package(format!(
            "apt-get download {package} left {} .deb files in {}; expected one",
            debs.len(),
            dir.display()
        ))),
    }
}

/// The `.deb` files of `package` in `dir` (apt names them `NAME_VERSION_ARCH.deb`).
fn debs_of(package: &str, dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let prefix = format!("{package}_");
    let entries = std::fs::read_dir(dir).map_err(|e| ImageError::io("read", dir, e))?;
    let mut debs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io("read", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            debs.push(entry.path());
        }
    }
    Ok(debs)
}

/// A control field of a `.deb` (`dpkg-deb -f`), e.g. `Depends`.
pub fn control_field(deb: &Path, field: &str) -> Result<String, ImageError> {
    let out = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field))?;
    Ok(out.trim().to_string())
}

/// Unpacks a `.deb` into `dir`, replacing whatever was there.
pub fn extract(deb: &Path, dir: &Path) -> Result<(), ImageError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| ImageError::io("remove", dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| ImageError::io("create", dir, e))?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    Ok(())
}

/// True for a versioned kernel package (`linux-image-6.1.0-48-cloud-amd64`), as opposed to
/// a metapackage that only depends on the current one (`linux-image-cloud-amd64`).
pub fn is_versioned_kernel_package(name: &str) -> bool {
    name.strip_prefix("linux-image-").and_then(|rest| rest.chars().next()).is_some_and(|c| c.is_ascii_digit())
}

/// The versioned kernel package a metapackage's `Depends` field names, e.g.
/// `linux-image-6.1.0-48-cloud-amd64` from `linux-image-6.1.0-48-cloud-amd64 (= 6.1.172-1)`.
pub fn kernel_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|alternative| alternative.split_whitespace().next().unwrap_or_default())
        .map(|name| name.split(':').next().unwrap_or_default())
        .find(|name| is_versioned_kernel_package(name))
        .map(str::to_string)
}

/// The kernel release a versioned package installs (`uname -r`): the package name without
/// `linux-image-`, which is how Debian names `/boot/vmlinuz-<release>` and
/// `/lib/modules/<release>`.
pub fn kernel_release(package: &str) -> Option<&str> {
    package
        .strip_prefix("linux-image-")
        .filter(|_| is_versioned_kernel_package(package))
        .map(|r| r.strip_suffix("-unsigned").unwrap_or(r))
}

/// A file's contents, decompressed when its name ends in `.xz`, `.zst` or `.gz` (kernel
/// modules may be shipped compressed; busybox `insmod` loads only plain ones). The tool
/// is installed with apt-get when it is missing.
pub fn read_decompressed(path: &Path) -> Result<Vec<u8>, ImageError> {
    let (tool, package) = match path.extension().and_then(OsStr::to_str) {
        Some("xz") => ("xz", "xz-utils"),
        Some("zst") => ("zstd", "zstd"),
        Some("gz") => ("gzip", "gzip"),
        _ => return std::fs::read(path).map_err(|e| ImageError::io("read", path, e)),
    };
    let decompress = || {
        Command::new(tool)
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|source| ImageError::Spawn { command: tool.to_string(), source })
    };
    let out = match decompress() {
        Err(ImageError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", package]))?;
            decompress()?
        }
        other => other?,
    };
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command: format!("{tool} -dc {}", path.display()),
            message: last_line(&out.stderr),
        });
    }
    Ok(out.stdout)
}

/// Runs a command to completion and returns its stdout; a failure carries the last line of
/// its stderr.
fn run(command: &mut Command) -> Result<String, ImageError> {
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = command.output().map_err(|source| ImageError::Spawn { command: shown.clone(), source })?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed { command: shown, message: last_line(&out.stderr) });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last non-empty line of a tool's stderr, or a note that it said nothing.
fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("it printed no error")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metapackage_dependency_names_the_versioned_kernel() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-48-cloud-amd64 (= 6.1.172-1)").as_deref(),
            Some("linux-image-6.1.0-48-cloud-amd64")
        );
        assert_eq!(
            kernel_dependency(
                "linux-base (>= 4.3~), linux-image-6.12.57+deb13-cloud-amd64-unsigned | \
                 linux-image-6.12.57+deb13-cloud-amd64:amd64 (= 6.12.57-1)"
            )
            .as_deref(),
            Some("linux-image-6.12.57+deb13-cloud-amd64-unsigned")
        );
        assert_eq!(kernel_dependency("linux-image-cloud-amd64, busybox"), None);
        assert_eq!(kernel_dependency(""), None);
    }

    #[test]
    fn the_release_is_the_versioned_package_name_without_its_prefix() {
        assert_eq!(kernel_release("linux-image-6.1.0-48-cloud-amd64"), Some("6.1.0-48-cloud-amd64"));
        assert_eq!(kernel_release("linux-image-6.12.57+deb13-cloud-amd64-unsigned"), Some("6.12.57+deb13-cloud-amd64"));
        assert_eq!(kernel_release("linux-image-cloud-amd64"), None);
        assert_eq!(kernel_release("busybox-static"), None);
        assert!(is_versioned_kernel_package("linux-image-6.1.0-48-amd64"));
        assert!(!is_versioned_kernel_package("linux-image-amd64"));
    }

    #[test]
    fn plain_files_are_read_as_they_are_and_failures_name_the_command() {
        let dir = std::env::temp_dir().join(format!("vmm-image-debian-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("m.ko");
        std::fs::write(&plain, b"\x7fELF").unwrap();
        assert_eq!(read_decompressed(&plain).unwrap(), b"\x7fELF");
        let gz = dir.join("m.ko.gz");
        std::fs::write(&gz, b"not gzip").unwrap();
        let err = read_decompressed(&gz).unwrap_err().to_string();
        assert!(err.starts_with("`gzip -dc "), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = run(&mut Command::new("false")).unwrap_err().to_string();
        assert_eq!(err, "`false` failed: it printed no error");
    }
}
