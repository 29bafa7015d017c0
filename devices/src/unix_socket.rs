//! Unix sockets the VMM listens on or connects to: created private from the start, replaced
//! only when stale, and connected to without ever blocking.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Removes the socket file at `path` if nobody listens on it (a previous run's); fails if
/// something answers, if it is not a socket, or if whether it is stale cannot be told (no
/// permission, a full backlog: a live server under load).
pub fn remove_if_stale(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !meta.file_type().is_socket() {
        let e = format!("{} exists and is not a socket", path.display());
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, e));
    }
    match connect_nonblocking(path) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path),
        Ok(_) => {
            let e = format!("{} is a live socket: something is listening on it", path.display());
            Err(io::Error::new(io::ErrorKind::AddrInUse, e))
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// Listens on `path`, reachable by its owner only from the first moment: the socket is bound
/// inside a fresh 0700 directory beside `path` (nobody else can connect to it there), made
/// 0600, then renamed into place, never over a file that appeared meanwhile. A stale socket at
/// `path` is replaced, a live one refused.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    remove_if_stale(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let private = parent.join(format!(".{}.{n}.sock", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staging = private.join("s");
    let placed = UnixListener::bind(&staging).and_then(|listener| {
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
        rename_noreplace(&staging, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&staging);
    let _ = std::fs::remove_dir(&private);
    placed.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Renames `from` to `to` unless `to` exists (the kernel checks, atomically).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid C strings that renameat2 only reads.
    let done =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to the Unix stream socket at `path` without ever waiting: the event loop calls
/// this for guest-initiated connections, and a host program that listens but never accepts
/// (its backlog full) would otherwise stall every device on the loop. A full backlog fails
/// with `WouldBlock`, like a refusal. The stream returned is non-blocking.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        let e =
            format!("{}: not a usable Unix socket path (at most {} bytes)", path.display(), addr.sun_path.len() - 1);
        return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: creates a new descriptor, owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` is within it.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len as libc::socklen_t) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "unix-socket-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_private_socket_is_0600_even_under_umask_000_and_leaves_nothing_behind() {
        let d = dir("private");
        let path = d.join("api.sock");
        // SAFETY: umask only changes this process's file-creation mask; restored below.
        let old = unsafe { libc::umask(0) };
        let listener = bind_private(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let _listener = listener.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["api.sock"], "no staging file is left");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let d = dir("stale");
        let path = d.join("s.sock");
        let live = UnixListener::bind(&path).unwrap();
        let err = bind_private(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(live);
        // The file stays behind its listener: stale now, so it is replaced.
        assert!(path.exists());
        let _ok = bind_private(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        assert_eq!(bind_private(&path).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let _ = std::fs::remove_dir_all(&d);
    }
}
