//! The hand-over: a server that gives regions' files to `vmm` processes, and the client side.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{FabricError, MAX_PARTIES, Result, SharedRegion};

/// How long either side waits for the other's half of the exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line read.
const MAX_REQUEST: u64 = 512;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    region: String,
    party: u16,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parties: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

type Regions = Arc<Mutex<HashMap<String, Arc<SharedRegion>>>>;

/// Serves regions on a Unix socket until dropped (the socket file goes with it).
pub struct FabricServer {
    path: PathBuf,
    regions: Regions,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl FabricServer {
    /// Listens on `path` (created 0600; an existing file is refused, not replaced).
    pub fn bind(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if path.exists() {
            return Err(FabricError::io(
                format!("binding the fabric socket {}", path.display()),
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the path exists"),
            ));
        }
        // Bound under another name and renamed once private, so nobody connects to it early.
        let staging = path.with_extension(format!("staging-{}", std::process::id()));
        let _ = std::fs::remove_file(&staging);
        let bind_err = |e| FabricError::io(format!("binding the fabric socket {}", path.display()), e);
        let listener = UnixListener::bind(&staging).map_err(bind_err)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        rename_noreplace(&staging, &path).map_err(|e| {
            let _ = std::fs::remove_file(&staging);
            bind_err(e)
        })?;
        let regions = Regions::default();
        let stop =
            Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|e| FabricError::io("creating an eventfd", e))?);
        let thread = {
            let (regions, stop) = (regions.clone(), stop.clone());
            std::thread::Builder::new()
                .name("fabric".into())
                .spawn(move || serve(listener, regions, stop))
                .map_err(|e| FabricError::io("starting the fabric thread", e))?
        };
        Ok(Self { path, regions, stop, thread: Some(thread) })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Offers `region` to clients under its name (replacing one of the same name).
    pub fn add(&self, region: Arc<SharedRegion>) {
        let name = region.spec().name.clone();
        self.regions.lock().unwrap_or_else(|p| p.into_inner()).insert(name, region);
    }

    /// Stops offering region `name`; those attached keep their files.
    pub fn remove(&self, name: &str) -> Option<Arc<SharedRegion>> {
        self.regions.lock().unwrap_or_else(|p| p.into_inner()).remove(name)
    }

    /// Region `name`, if offered.
    pub fn get(&self, name: &str) -> Option<Arc<SharedRegion>> {
        self.regions.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }
}

impl Drop for FabricServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, regions: Regions, stop: Arc<EventFd>) {
    loop {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfd entries.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("fabric: poll failed: {}", std::io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            // One exchange, bounded by timeouts: served inline, a slow client delays the next
            // by at most EXCHANGE_TIMEOUT.
            Ok((stream, _)) => {
                if let Err(e) = hand_over(stream, &regions) {
                    log::warn!("fabric: a hand-over failed: {e}");
                }
            }
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin on the error.
                log::warn!("fabric: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

fn hand_over(stream: UnixStream, regions: &Regions) -> std::io::Result<()> {
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let refuse = |why: String| {
        let reply = serde_json::to_vec(&Reply { size: None, parties: None, error: Some(why) }).expect("plain data");
        (&stream).write_all(&reply)
    };
    let request: Request = match serde_json::from_str(line.trim_end()) {
        Ok(request) => request,
        Err(e) => return refuse(format!("not a request: {e}")),
    };
    let Some(region) = regions.lock().unwrap_or_else(|p| p.into_inner()).get(&request.region).cloned() else {
        return refuse(format!("no region {:?}", request.region));
    };
    let parties = region.spec().parties;
    if request.party >= parties {
        return refuse(format!("region {:?} has parties 0 to {}, not {}", request.region, parties - 1, request.party));
    }
    let reply = serde_json::to_vec(&Reply { size: Some(region.size()), parties: Some(parties), error: None })
        .expect("plain data");
    let mut fds: Vec<RawFd> = vec![region.memfd().as_raw_fd()];
    fds.extend(region.doorbells().iter().map(|d| d.as_raw_fd()));
    stream.send_with_fds(&[&reply[..]], &fds).map(|_| ()).map_err(std::io::Error::from)
}

/// Renames `from` to `to` unless `to` exists (checked by the kernel, not before).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid C strings; renameat2 only reads them.
    let done =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A region's files as handed over: the memfd and every party's doorbell.
#[derive(Debug)]
pub struct Attachment {
    /// The region's name.
    pub region: String,
    /// The party this attachment is for.
    pub party: u16,
    /// Parties in the region.
    pub parties: u16,
    /// The region's size in bytes.
    pub size: u64,
    /// The memfd.
    pub memfd: OwnedFd,
    /// Every party's doorbell, in party order.
    pub doorbells: Vec<EventFd>,
}

/// Asks the fabric server at `socket` for region `region`, as party `party`.
pub fn attach(socket: &Path, region: &str, party: u16) -> Result<Attachment> {
    let shown = socket.display().to_string();
    let io = |what: &str, e| FabricError::io(format!("{what} the fabric server at {shown}"), e);
    let stream = UnixStream::connect(socket).map_err(|e| io("connecting to", e))?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT)).map_err(|e| io("setting a timeout on", e))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT)).map_err(|e| io("setting a timeout on", e))?;
    let mut request = serde_json::to_vec(&Request { region: region.into(), party }).expect("plain data");
    request.push(b'\n');
    (&stream).write_all(&request).map_err(|e| io("writing to", e))?;
    let mut buf = [0u8; 1024];
    let mut raw = [-1 as RawFd; 1 + MAX_PARTIES as usize];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() }];
    // SAFETY: the iovec points at `buf`, which may take any bytes.
    let (len, count) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }.map_err(|e| io("reading from", e.into()))?;
    // SAFETY: the first `count` descriptors were just received and are ours to close.
    let mut received: Vec<OwnedFd> = raw[..count].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    // Received without MSG_CMSG_CLOEXEC: keep them from every process this one starts.
    for fd in &received {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let protocol = |why: String| FabricError::Protocol { socket: shown.clone(), why };
    let reply: Reply = serde_json::from_slice(&buf[..len]).map_err(|e| protocol(format!("not a reply: {e}")))?;
    if let Some(reason) = reply.error {
        return Err(FabricError::Refused { socket: shown, reason });
    }
    let (Some(size), Some(parties)) = (reply.size, reply.parties) else {
        return Err(protocol("a reply without size or parties".into()));
    };
    if !(2..=MAX_PARTIES).contains(&parties) || party >= parties || received.len() != 1 + usize::from(parties) {
        return Err(protocol(format!("{} files for {parties} parties", received.len())));
    }
    let doorbells = received.split_off(1).into_iter().map(|fd| {
        // SAFETY: an eventfd the server created, now owned by us.
        unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
    });
    let doorbells = doorbells.collect();
    let memfd = received.pop().expect("one left");
    // The size the server claims must be the file's: a mapping past the end would fault.
    // SAFETY: fstat on our descriptor into a zeroed struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(memfd.as_raw_fd(), &mut stat) } != 0 || (stat.st_size as u64) < size {
        return Err(protocol(format!("the memfd is smaller than the {size} bytes announced")));
    }
    Ok(Attachment { region: region.into(), party, parties, size, memfd, doorbells })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RegionSpec;

    fn socket_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("fabric-{tag}-{}-{:?}.sock", std::process::id(), std::thread::current().id()))
    }

    #[test]
    fn a_client_gets_the_memory_and_the_doorbells() {
        let path = socket_path("ok");
        let server = FabricServer::bind(&path).unwrap();
        let spec = RegionSpec { name: "r".into(), parties: 2, lanes: 2, slots: 8, slot_size: 64, hugetlb: false };
        let region = Arc::new(SharedRegion::create(spec).unwrap());
        server.add(region.clone());
        let got = attach(&path, "r", 1).unwrap();
        assert_eq!((got.party, got.parties, got.size), (1, 2, region.size()));
        // The same memory: what the server's mapping holds, the client's reads.
        let map = crate::region::map_shared(&got.memfd, got.size as usize).unwrap();
        // SAFETY: both mappings are `size` bytes; the header is the first 8.
        let magic = unsafe { std::slice::from_raw_parts(map, 8) };
        assert_eq!(magic, b"SWRMRING");
        // The same doorbell: a write by the client wakes the server's copy.
        got.doorbells[0].write(1).unwrap();
        assert_eq!(region.doorbell(0).unwrap().read().unwrap(), 1);
        // SAFETY: our mapping.
        unsafe { libc::munmap(map as *mut libc::c_void, got.size as usize) };
        drop(server);
        assert!(!path.exists(), "the socket goes with the server");
    }

    #[test]
    fn unknown_regions_and_parties_are_refused_by_name() {
        let path = socket_path("refuse");
        let server = FabricServer::bind(&path).unwrap();
        let spec = RegionSpec { name: "r".into(), parties: 2, lanes: 2, slots: 8, slot_size: 64, hugetlb: false };
        server.add(Arc::new(SharedRegion::create(spec).unwrap()));
        let err = attach(&path, "nope", 0).unwrap_err().to_string();
        assert!(err.contains("no region \"nope\""), "{err}");
        let err = attach(&path, "r", 2).unwrap_err().to_string();
        assert!(err.contains("parties 0 to 1"), "{err}");
        // Garbage from a client leaves the server serving.
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"\xff\xfe garbage\n").unwrap();
        assert!(attach(&path, "r", 0).is_ok());
        assert!(FabricServer::bind(&path).is_err(), "an existing socket is not replaced");
    }
}
