//! `vmm shadow`: wait for a primary (`vmm ctl replicate start --to ...`), keep its memory up
//! to date, and at its switchover become the VM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::anyhow;
use clap::Args;
use vmm::SerialConfig;
use vmm::api::ApiServer;
use vmm::replication::Endpoint;
use vmm::replication::shadow;

use crate::cli::Failure;
use crate::console::StopSignals;

#[derive(Args)]
pub struct ShadowArgs {
    /// Where to wait for the primary: unix:PATH or tcp:ADDR:PORT.
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_endpoint)]
    pub listen: Endpoint,
    /// Where the replicated memory and, at the switchover, the state go (created; must be
    /// empty) [default: a new directory under the system's temporary directory, removed at
    /// exit].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Serve the control API here once the VM runs on this shadow.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM's serial console once it runs here: stdout, none or file:PATH [default: stdout].
    #[arg(long, value_name = "DEST", value_parser = crate::cli::parse_serial)]
    pub serial: Option<SerialConfig>,
    /// Run without the seccomp filters (on by default, as for `vmm run`).
    #[arg(long)]
    pub no_seccomp: bool,
}

fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    s.parse()
}

/// Removes the shadow's own directory when it made it.
struct OwnDir(Option<PathBuf>);

impl Drop for OwnDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `vmm shadow`.
pub fn run(args: &ShadowArgs) -> Result<u8, Failure> {
    // The primary holds the disk images' locks until the switchover commits; the replication
    // protocol, not a lock, keeps the two from writing at once (the primary never writes after
    // freezing, the shadow never before activating).
    devices::blk::backend::lock::set_enabled(false);
    // Before any thread starts: they all inherit the control-plane filter, and the VM's vCPUs
    // and device loop narrow it when the switchover starts them.
    if !args.no_seccomp {
        vmm_sandbox::seccomp::enable(vmm_sandbox::Process::Shadow).map_err(|e| Failure::runtime(anyhow!(e)))?;
    }
    let (dir, _own) = match &args.dir {
        Some(dir) => (dir.clone(), OwnDir(None)),
        None => {
            let dir = std::env::temp_dir().join(format!("vmm-shadow-{}", std::process::id()));
            (dir.clone(), OwnDir(Some(dir)))
        }
    };
    let signals = StopSignals::catch().map_err(|e| Failure::runtime(anyhow!("cannot handle signals: {e}")))?;
    // Stopped while it waits or receives: nothing of it stays behind.
    let mut leftovers = vec![];
    if let Endpoint::Unix(path) = &args.listen {
        leftovers.push(path.clone());
    }
    if _own.0.is_some() {
        leftovers.push(dir.clone());
    }
    signals.remove_on_early_exit(leftovers);
    eprintln!("vmm shadow: waiting for a primary on {}", args.listen);
    let received = shadow::receive(&args.listen, &dir, |p| {
        log::info!("shadow: epoch {} applied ({} pages, {} bytes so far)", p.epochs, p.pages, p.bytes);
    })
    .map_err(|e| Failure::runtime(anyhow!(e)))?;
    eprintln!(
        "vmm shadow: switchover after {} epochs ({} pages); starting the VM",
        received.progress.epochs, received.progress.pages
    );
    let mut activated = received
        .activate(|builder| builder.serial(args.serial.clone().unwrap_or_default()))
        .map_err(|e| Failure::runtime(anyhow!(e)))?;
    eprintln!("vmm shadow: the VM runs here (restored in {} us)", activated.restore_us);
    for step in &activated.applied {
        eprintln!("vmm shadow: updated {step}");
    }
    let vm: Arc<vmm::Vm> = activated.vm.clone();
    let _api = match &args.api_sock {
        Some(path) => Some(ApiServer::start(path, vm.clone()).map_err(|e| Failure::bad_input(anyhow!(e)))?),
        None => None,
    };
    signals
        .stop(vm.clone(), args.api_sock.as_deref())
        .map_err(|e| Failure::runtime(anyhow!("cannot handle signals: {e}")))?;
    let exit = vm.wait();
    if activated.rolled_back() {
        eprintln!("vmm shadow: the primary rolled the switchover back; the VM runs there");
        return Ok(0);
    }
    if let vmm::VmExit::Crashed(crash) = &exit {
        return Err(Failure::runtime(anyhow!("{crash}")));
    }
    if let Some(signal) = crate::console::stopped_by_signal() {
        return Ok((128 + signal) as u8);
    }
    Ok(exit.process_status() as u8)
}
