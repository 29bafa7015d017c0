//! One layer VM: a `vmm run` process, the region it shares with the manager and the manager's
//! ends of its lanes (lane 0 requests in, lane 1 results out, lane 2 the VM's status records;
//! the manager is party 0, the VM party 1).

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use swarm_fabric::{FabricServer, RegionSpec, SharedRegion};
use swarm_ring::status::VmStatus;
use swarm_ring::{Consumer, Producer};

use crate::config::SwarmConfig;

/// Where a VM stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Booting: not announced yet.
    Starting,
    /// Taking requests.
    Ready,
    /// Finishing what it has, taking nothing new; stopped when done.
    Draining,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Draining => "draining",
        }
    }
}

pub struct Instance {
    pub id: u16,
    pub layer: usize,
    pub labels: Vec<String>,
    pub state: VmState,
    /// When it entered that state.
    pub state_since: std::time::Instant,
    pub region: Arc<SharedRegion>,
    pub to_vm: Producer,
    pub from_vm: Consumer,
    /// The VM's control lane: its `VmStatus` records.
    pub status_from_vm: Consumer,
    /// The affinity bits its labels give (what it must report).
    pub affinity: u32,
    /// What it last reported.
    pub reported: Option<VmStatus>,
    pub child: Child,
    /// Requests it holds.
    pub in_flight: HashSet<u64>,
    pub served: u64,
}

/// What starting a VM takes.
pub struct Launcher<'a> {
    pub config: &'a SwarmConfig,
    pub fabric: &'a FabricServer,
    /// The `vmm` executable.
    pub vmm: &'a Path,
    /// The microguest.
    pub kernel: &'a Path,
}

impl Instance {
    /// Creates the VM's region, offers it on the fabric and starts `vmm run` for it, serving
    /// layer `layer_index`.
    pub fn start(launcher: &Launcher, id: u16, layer_index: usize, labels: Vec<String>) -> Result<Self, String> {
        let Launcher { config, fabric, vmm, kernel } = *launcher;
        let layer = &config.layers[layer_index];
        let name = format!("vm{id}");
        let spec = RegionSpec {
            name: name.clone(),
            parties: 2,
            lanes: 3,
            slots: config.slots,
            slot_size: config.slot_size,
            hugetlb: false,
        };
        let region = Arc::new(SharedRegion::create(spec).map_err(|e| e.to_string())?);
        // SAFETY: the lanes are used by this Instance only, which holds `region` as long.
        let rings = unsafe { region.rings() };
        let lane = |i| rings.lane(i).map_err(|e| e.to_string());
        let to_vm = Producer::attach(lane(0)?).map_err(|e| e.to_string())?;
        let from_vm = Consumer::attach(lane(1)?).map_err(|e| e.to_string())?;
        let status_from_vm = Consumer::attach(lane(2)?).map_err(|e| e.to_string())?;
        let affinity = config.affinity_bits(&labels);
        fabric.add(region.clone());
        let work = layer.work.join("+");
        let cmdline =
            format!("prog=swarm-worker work={work} vm={id} layer={layer_index} affinity={affinity} key={}", config.key);
        let console = config.state_dir.join(format!("{name}.log"));
        let shm = format!("socket={},region={name},party=1", fabric.path().display());
        let mut command = Command::new(vmm);
        // SAFETY: only async-signal-safe prctl between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                // A manager that dies (even by SIGKILL) takes its VMs with it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .args(["run", "--kernel"])
            .arg(kernel)
            .args(["--mem-mib", &config.mem_mib.to_string(), "--cmdline", &cmdline, "--shm", &shm])
            .args(["--serial", &format!("file:{}", console.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", vmm.display()))?;
        log::info!("swarm: vm{id} (layer {}) started as process {}", layer.name, child.id());
        Ok(Self {
            id,
            layer: layer_index,
            labels,
            state: VmState::Starting,
            state_since: std::time::Instant::now(),
            region,
            to_vm,
            from_vm,
            status_from_vm,
            affinity,
            reported: None,
            child,
            in_flight: HashSet::new(),
            served: 0,
        })
    }

    pub fn set_state(&mut self, state: VmState) {
        self.state = state;
        self.state_since = std::time::Instant::now();
    }

    /// Rings the VM's doorbell if it sleeps.
    pub fn wake(&self) {
        if self.to_vm.consumer_sleeping()
            && let Some(doorbell) = self.region.doorbell(1)
        {
            let _ = doorbell.write(1);
        }
    }

    /// Stops the process and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
    }
}
