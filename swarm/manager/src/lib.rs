//! The swarm manager: a pipeline of per-layer VMs that requests move through by shared memory.
//!
//! [`Swarm::start`] reads a [`SwarmConfig`], serves a fabric of shared-memory regions (one per
//! VM, shared with the manager), starts one `vmm run` per layer instance, and runs the router
//! ([`router`]), the HTTP front end and the control API. See `docs/swarm.md`.

pub mod config;
mod control;
mod front;
mod instance;
pub mod router;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::thread::JoinHandle;

pub use config::{ConfigError, LayerConfig, SwarmConfig};
use swarm_fabric::FabricServer;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use front::RouterHandle;
use router::{Command, Router};

/// Why a swarm could not start.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The fabric's socket.
    #[error(transparent)]
    Fabric(#[from] swarm_fabric::FabricError),
    /// A socket or directory.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SwarmError {
    let what = what.into();
    move |source| SwarmError::Io { what, source }
}

/// Removes a socket file nothing answers on (left by a swarm that was killed); one that
/// answers belongs to a running swarm and is an error.
fn remove_stale_socket(path: &std::path::Path) -> Result<(), SwarmError> {
    if !path.exists() {
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io(format!("{} is in use by a running swarm", path.display()))(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "something answers on it",
        ))),
        Err(_) => std::fs::remove_file(path).map_err(io(format!("removing the stale socket {}", path.display()))),
    }
}

/// How long a library call waits for the router.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A running swarm; dropping it stops every VM.
pub struct Swarm {
    router: RouterHandle,
    thread: Option<JoinHandle<()>>,
    address: SocketAddr,
    control: PathBuf,
    /// Tells the front end and the control API to stop accepting.
    stop: Arc<AtomicBool>,
}

impl Swarm {
    /// Starts the swarm: `vmm` is the binary run for each VM, `kernel` the microguest.
    pub fn start(config: SwarmConfig, vmm: PathBuf, kernel: PathBuf) -> Result<Self, SwarmError> {
        config.check()?;
        std::fs::create_dir_all(&config.state_dir).map_err(io(format!("creating {}", config.state_dir.display())))?;
        let fabric_path = config.state_dir.join("fabric.sock");
        remove_stale_socket(&fabric_path)?;
        remove_stale_socket(&config.control)?;
        let fabric = FabricServer::bind(fabric_path)?;
        let listener = TcpListener::bind(&config.listen).map_err(io(format!("listening on {}", config.listen)))?;
        let address = listener.local_addr().map_err(io("reading the front end's address"))?;
        let control =
            UnixListener::bind(&config.control).map_err(io(format!("binding {}", config.control.display())))?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(io("creating an eventfd"))?);
        let (commands, receiver) = channel();
        let sleeping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let router = RouterHandle { commands, wake: wake.clone(), sleeping: sleeping.clone() };
        let control_path = config.control.clone();
        // A request and its packet header fill a slot at most.
        let max_request = config.slot_size as usize - 8 - swarm_ring::packet::HEADER_BYTES;
        let stop = Arc::new(AtomicBool::new(false));
        let mut core = Router::new(config, fabric, vmm, kernel);
        core.start_layers();
        let thread = std::thread::Builder::new()
            .name("swarm-router".into())
            .spawn(move || core.run(receiver, wake, sleeping))
            .map_err(io("starting the router"))?;
        // From here on a failure must stop the router (and its VMs): `swarm` does, when dropped.
        let swarm = Self { router: router.clone(), thread: Some(thread), address, control: control_path, stop };
        let front = {
            let (router, stop) = (router.clone(), swarm.stop.clone());
            std::thread::Builder::new()
                .name("swarm-front".into())
                .spawn(move || front::serve(listener, router, stop, max_request))
        };
        front.map_err(io("starting the front end"))?;
        let control = {
            let stop = swarm.stop.clone();
            std::thread::Builder::new()
                .name("swarm-control".into())
                .spawn(move || control::serve(control, router, stop))
        };
        control.map_err(io("starting the control API"))?;
        Ok(swarm)
    }

    /// Where the HTTP front end listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Layers, VMs and request counters, as `GET /swarm` answers; `None` if the router is gone.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (reply, answer) = channel();
        self.router.send(Command::Status { reply });
        answer.recv_timeout(ANSWER_TIMEOUT).ok()
    }

    /// Starts or drains VMs until `layer` has `instances`; the status after.
    pub fn scale(&self, layer: &str, instances: u32) -> Result<serde_json::Value, String> {
        let (reply, answer) = channel();
        self.router.send(Command::Scale { layer: layer.into(), instances, reply });
        answer.recv_timeout(ANSWER_TIMEOUT).map_err(|_| "the router did not answer".to_string())?
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.router.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The accepting threads wake on one more connection each, see the flag and end,
        // closing their listeners.
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.address);
        let _ = std::os::unix::net::UnixStream::connect(&self.control);
        let _ = std::fs::remove_file(&self.control);
    }
}
