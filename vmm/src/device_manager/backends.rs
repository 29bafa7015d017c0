//! Opening device backends from their configuration: the one place that turns a `--disk`,
//! `--net` or `--vsock` description (at boot or in a swap request) into a live backend.

use devices::blk::backend::{LockedBackend, lock_image};
use devices::blk::{BlockBackend, FileBackend, NbdBackend, NbdTarget, UringBackend};
use devices::net::{NetBackend, TapBackend, UnixBackend};
use devices::vsock::UnixVsockBackend;

use super::DeviceError;
use crate::config::{BlockEngine, DiskConfig, NbdAddress, NetConfig, parse_mac};

fn failed(id: &str, reason: impl std::fmt::Display) -> DeviceError {
    DeviceError::Backend { id: id.to_string(), reason: reason.to_string() }
}

/// Opens a disk's backend with the configured engine.
pub fn open_disk(disk: &DiskConfig, id: &str) -> Result<Box<dyn BlockBackend>, DeviceError> {
    Ok(match (&disk.path, &disk.nbd) {
        (Some(path), _) => {
            // Locked first: an image another process writes is not opened at all.
            let lock = lock_image(path, disk.readonly).map_err(|e| failed(id, e))?;
            let backend: Box<dyn BlockBackend> = match disk.engine {
                BlockEngine::Sync => Box::new(FileBackend::open(path, disk.readonly).map_err(|e| failed(id, e))?),
                BlockEngine::IoUring => Box::new(UringBackend::open(path, disk.readonly).map_err(|e| failed(id, e))?),
            };
            Box::new(LockedBackend::new(backend, lock))
        }
        (None, Some(address)) => {
            let target = match address {
                NbdAddress::Tcp { host, port } => NbdTarget::Tcp { host: host.clone(), port: *port },
                NbdAddress::Unix { path } => NbdTarget::Unix { path: path.clone() },
            };
            Box::new(NbdBackend::connect(&target, disk.export.as_deref(), disk.readonly).map_err(|e| failed(id, e))?)
        }
        (None, None) => return Err(failed(id, "needs path= or nbd=")),
    })
}

/// Opens a NIC's backend.
pub fn open_net(net: &NetConfig, id: &str) -> Result<Box<dyn NetBackend>, DeviceError> {
    Ok(match (&net.tap, &net.unix) {
        (Some(tap), _) => {
            Box::new(TapBackend::open(tap).map_err(|e| failed(id, format!("cannot open tap {tap}: {e}")))?)
        }
        (None, Some(path)) => Box::new(
            UnixBackend::connect(path).map_err(|e| failed(id, format!("cannot connect to {}: {e}", path.display())))?,
        ),
        (None, None) => return Err(failed(id, "needs tap= or unix=")),
    })
}

/// The MAC a NIC gets: the configured one, or a random locally administered unicast address
/// in QEMU's customary 52:54:00 prefix.
pub fn nic_mac(net: &NetConfig, id: &str) -> Result<[u8; 6], DeviceError> {
    match &net.mac {
        Some(mac) => parse_mac(mac).map_err(|e| failed(id, e)),
        None => {
            let mut tail = [0u8; 3];
            // SAFETY: getrandom fills the buffer we pass; on failure the tail stays zero.
            unsafe { libc::getrandom(tail.as_mut_ptr().cast(), tail.len(), 0) };
            Ok([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]])
        }
    }
}

/// Listens on a hybrid-vsock socket.
pub fn open_vsock(socket: &std::path::Path, id: &str) -> Result<UnixVsockBackend, DeviceError> {
    UnixVsockBackend::bind(socket).map_err(|e| failed(id, format!("cannot listen on {}: {e}", socket.display())))
}
