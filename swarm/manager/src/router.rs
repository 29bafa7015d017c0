//! The router: one thread that owns every layer VM's lanes, moves each request through the
//! layers (to the least loaded VM of the next layer that has the labels it needs), answers the
//! front end, notices dead or misbehaving VMs and retries what they held, and scales layers.
//!
//! Exactly once: a request is held by one VM at a time (`Instance::in_flight`); a result is
//! taken only from the VM holding it, for the layer it was sent to, so a late or forged copy
//! is dropped (and counted). When a VM dies, what it finished is still read from its lanes
//! (the manager maps them), and only the rest is sent again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use swarm_fabric::FabricServer;
use swarm_ring::RingError;
use swarm_ring::packet::{PacketHeader, PacketStatus};
use swarm_ring::status::{STATUS_BYTES, VmStatus};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SwarmConfig;
use crate::instance::{Instance, Launcher, VmState};

/// How often a request may be sent again after the VM holding it died.
const MAX_RETRIES: u32 = 3;
/// How long the router keeps looking before it sleeps: under load the next result is near,
/// and a sleep costs each VM a doorbell exit to wake it.
const SPIN: Duration = Duration::from_micros(30);
/// How often the router looks for VMs whose process ended.
const REAP_TICK: Duration = Duration::from_millis(5);
/// How long a request may take end to end: the front end gives up then too.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// A VM holding a request this long without answering is hung: it is removed and what it
/// held goes to another VM.
const HUNG: Duration = Duration::from_secs(10);
/// How long a VM may take to boot and report, or to finish what it holds once draining.
const BOOT_OR_DRAIN: Duration = Duration::from_secs(30);
/// After a VM failed to start, how long before the next attempt.
const START_BACKOFF: Duration = Duration::from_secs(1);
/// How often the policy looks at the load.
const POLICY_TICK: Duration = Duration::from_millis(250);

/// What the front end gets back.
pub enum Answer {
    /// The last layer's output: a whole HTTP response.
    Done(Vec<u8>),
    /// A refusal: status code and reason.
    Refused(u16, String),
}

/// What the router is asked to do.
pub enum Command {
    Submit { payload: Vec<u8>, needs: Vec<String>, reply: Sender<Answer> },
    Scale { layer: String, instances: u32, reply: Sender<Result<Value, String>> },
    Kill { vm: u16, reply: Sender<Result<(), String>> },
    Status { reply: Sender<Value> },
    Stop,
}

struct Request {
    layer: usize,
    payload: Vec<u8>,
    needs: Vec<String>,
    reply: Sender<Answer>,
    retries: u32,
    vm: Option<u16>,
    started: Instant,
    /// When the VM holding it got it.
    sent: Instant,
}

#[derive(Default)]
pub struct Counters {
    pub answered_ok: u64,
    pub answered_error: u64,
    pub retried: u64,
    pub duplicates_dropped: u64,
    pub vms_lost: u64,
    pub latency_us_sum: u64,
}

struct LayerState {
    target: u32,
    above: u32,
    below: u32,
    /// A VM of the layer failed to start: no other attempt before this.
    retry_start_after: Option<Instant>,
}

pub struct Router {
    config: SwarmConfig,
    fabric: FabricServer,
    vmm: PathBuf,
    kernel: PathBuf,
    instances: BTreeMap<u16, Instance>,
    requests: HashMap<u64, Request>,
    /// Per layer, requests waiting for a VM.
    queued: Vec<VecDeque<u64>>,
    layers: Vec<LayerState>,
    next_id: u64,
    next_vm: u16,
    counters: Counters,
    last_policy: Instant,
}

impl Router {
    pub fn new(config: SwarmConfig, fabric: FabricServer, vmm: PathBuf, kernel: PathBuf) -> Self {
        let layers = config
            .layers
            .iter()
            .map(|l| LayerState { target: l.instances, above: 0, below: 0, retry_start_after: None })
            .collect();
        let queued = vec![VecDeque::new(); config.layers.len()];
        Self {
            config,
            fabric,
            vmm,
            kernel,
            instances: BTreeMap::new(),
            requests: HashMap::new(),
            queued,
            layers,
            next_id: 1,
            next_vm: 1,
            counters: Counters::default(),
            last_policy: Instant::now(),
        }
    }

    /// Runs until `Stop`. Senders signal `wake` when they see `sleeping` set.
    pub fn run(mut self, commands: Receiver<Command>, wake: Arc<EventFd>, sleeping: Arc<AtomicBool>) {
        let (mut idle_since, mut last_reap) = (Instant::now(), Instant::now());
        let mut pending = None;
        loop {
            let mut busy = false;
            while let Some(command) = pending.take().or_else(|| commands.try_recv().ok()) {
                busy = true;
                if !self.command(command) {
                    return;
                }
            }
            busy |= self.collect();
            busy |= self.dispatch();
            if last_reap.elapsed() >= REAP_TICK {
                last_reap = Instant::now();
                self.reap();
            }
            if self.last_policy.elapsed() >= POLICY_TICK {
                self.last_policy = Instant::now();
                self.policy();
            }
            if busy {
                idle_since = Instant::now();
            } else if idle_since.elapsed() >= SPIN {
                // Idle for a while: sleep until a VM rings or a command comes (looking at the
                // channel once more after saying so, see RouterHandle::send).
                sleeping.store(true, Ordering::Relaxed);
                std::sync::atomic::fence(Ordering::SeqCst);
                pending = commands.try_recv().ok();
                if pending.is_none() {
                    self.sleep(&wake);
                }
                sleeping.store(false, Ordering::Relaxed);
                idle_since = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Sleeps until a VM rings, a command comes, or a few milliseconds pass (to reap).
    fn sleep(&mut self, wake: &EventFd) {
        let mut fds = vec![libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        for instance in self.instances.values_mut() {
            // Said before looking again: a VM publishing after this sees it and rings.
            if !instance.from_vm.prepare_sleep().unwrap_or(false) {
                for instance in self.instances.values_mut() {
                    instance.from_vm.woke();
                }
                return;
            }
            if let Some(doorbell) = instance.region.doorbell(0) {
                fds.push(libc::pollfd { fd: doorbell.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
        }
        // SAFETY: valid pollfd entries for descriptors that outlive the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5) };
        let _ = wake.read();
        for instance in self.instances.values_mut() {
            instance.from_vm.woke();
            if let Some(doorbell) = instance.region.doorbell(0) {
                let _ = doorbell.read();
            }
        }
    }

    fn command(&mut self, command: Command) -> bool {
        match command {
            Command::Submit { payload, needs, reply } => {
                if self.instances.is_empty() && self.layers.iter().all(|l| l.target == 0) {
                    let _ = reply.send(Answer::Refused(503, "no VMs".into()));
                    return true;
                }
                let id = self.next_id;
                self.next_id += 1;
                let now = Instant::now();
                let request =
                    Request { layer: 0, payload, needs, reply, retries: 0, vm: None, started: now, sent: now };
                self.requests.insert(id, request);
                self.queued[0].push_back(id);
            }
            Command::Scale { layer, instances, reply } => {
                let answer = match self.config.layers.iter().position(|l| l.name == layer) {
                    None => Err(format!("no layer {layer:?}")),
                    Some(_) if !(1..=16).contains(&instances) => Err("instances: 1 to 16".into()),
                    Some(index) => {
                        self.layers[index].target = instances;
                        self.converge(index);
                        Ok(self.status())
                    }
                };
                let _ = reply.send(answer);
            }
            Command::Kill { vm, reply } => {
                let answer = match self.instances.get_mut(&vm) {
                    Some(instance) => {
                        let _ = instance.child.kill();
                        Ok(())
                    }
                    None => Err(format!("no VM {vm}")),
                };
                let _ = reply.send(answer);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Stop => {
                for (_, request) in self.requests.drain() {
                    let _ = request.reply.send(Answer::Refused(503, "the swarm is stopping".into()));
                }
                return false;
            }
        }
        true
    }

    /// Reads every VM's results; true if any came.
    fn collect(&mut self) -> bool {
        let mut any = false;
        let mut faulty = Vec::new();
        let mut buf = vec![0u8; self.config.slot_size as usize];
        let ids: Vec<u16> = self.instances.keys().copied().collect();
        for vm in ids {
            if let Err(why) = self.read_status(vm) {
                log::warn!("swarm: vm{vm} {why}; removing it");
                faulty.push(vm);
                continue;
            }
            let lane_slots = self.instances.get(&vm).map_or(0, |i| i.from_vm.slots());
            for _ in 0..lane_slots {
                let read = self.instances.get_mut(&vm).map(|i| i.from_vm.read(&mut buf));
                match read {
                    Some(Ok(Some(len))) => {
                        any = true;
                        if !self.result(vm, &buf[..len]) {
                            faulty.push(vm);
                            break;
                        }
                    }
                    Some(Ok(None)) | None => break,
                    Some(Err(e)) => {
                        log::warn!("swarm: vm{vm} corrupted its lane ({e}); removing it");
                        faulty.push(vm);
                        break;
                    }
                }
            }
            if let Some(instance) = self.instances.get_mut(&vm) {
                instance.from_vm.release();
            }
        }
        for vm in faulty {
            self.lose(vm);
        }
        any
    }

    /// Reads `vm`'s status records (its control lane); the first makes it ready. A record
    /// that is not one, or that claims another VM, layer or affinity than it was given, is
    /// an error.
    fn read_status(&mut self, vm: u16) -> Result<(), String> {
        let Some(instance) = self.instances.get_mut(&vm) else { return Ok(()) };
        let mut record = [0u8; STATUS_BYTES];
        // At most a lane's worth per pass: a VM refilling it cannot keep the router here.
        for _ in 0..instance.status_from_vm.slots() {
            let read =
                instance.status_from_vm.pop(&mut record).map_err(|e| format!("corrupted its control lane ({e})"))?;
            let Some(len) = read else { break };
            let status = VmStatus::decode(&record[..len]).ok_or("wrote a malformed status record")?;
            if status.vm != vm || status.layers != 1 << instance.layer || status.affinity != instance.affinity {
                return Err(format!(
                    "reported itself as vm{} of layers {:#x} with affinity {:#x}",
                    status.vm, status.layers, status.affinity
                ));
            }
            if instance.state == VmState::Starting {
                instance.set_state(VmState::Ready);
                log::info!("swarm: vm{vm} ready (capacity {})", status.capacity);
            }
            instance.reported = Some(status);
        }
        Ok(())
    }

    /// One result from `vm`; false if it is garbage (the VM is then removed).
    fn result(&mut self, vm: u16, bytes: &[u8]) -> bool {
        let Ok((header, payload)) = PacketHeader::decode(bytes) else {
            log::warn!("swarm: vm{vm} wrote a malformed packet; removing it");
            return false;
        };
        let Some(instance) = self.instances.get_mut(&vm) else { return true };
        // Only the VM holding the request, for the layer it was sent to.
        let holds = instance.in_flight.contains(&header.request_id)
            && self.requests.get(&header.request_id).is_some_and(|r| r.vm == Some(vm) && r.layer == instance.layer);
        if !holds {
            self.counters.duplicates_dropped += 1;
            return true;
        }
        instance.in_flight.remove(&header.request_id);
        instance.served += 1;
        let mut request = self.requests.remove(&header.request_id).expect("checked");
        request.vm = None;
        match header.status {
            PacketStatus::Pending if request.layer + 1 < self.config.layers.len() => {
                request.layer += 1;
                request.payload = payload.to_vec();
                self.queued[request.layer].push_back(header.request_id);
                self.requests.insert(header.request_id, request);
            }
            PacketStatus::Pending | PacketStatus::Completed => self.answer(request, Answer::Done(payload.to_vec())),
            PacketStatus::Error | PacketStatus::InProgress => {
                let text = String::from_utf8_lossy(payload);
                let code = text.get(..3).and_then(|c| c.parse().ok()).filter(|c| (400..600).contains(c)).unwrap_or(502);
                let reason = text.get(4..).unwrap_or("refused").to_string();
                self.answer(request, Answer::Refused(code, reason));
            }
        }
        true
    }

    fn answer(&mut self, request: Request, answer: Answer) {
        match &answer {
            Answer::Done(_) => self.counters.answered_ok += 1,
            Answer::Refused(..) => self.counters.answered_error += 1,
        }
        self.counters.latency_us_sum += request.started.elapsed().as_micros() as u64;
        let _ = request.reply.send(answer);
    }

    /// Sends queued requests to VMs; true if any went. A request no VM can take now waits
    /// without holding up the others; one no VM of its layer could ever take is refused.
    fn dispatch(&mut self) -> bool {
        let mut any = false;
        // Every lane has the configured slots: one buffer serves every request.
        let mut buf = vec![0u8; self.config.slot_size as usize];
        for layer in 0..self.queued.len() {
            let mut woken = Vec::new();
            let mut waiting = VecDeque::new();
            while let Some(id) = self.queued[layer].pop_front() {
                let Some(request) = self.requests.get(&id) else { continue };
                // Only the labels this layer knows constrain it.
                let needs: Vec<String> =
                    request.needs.iter().filter(|n| self.config.layers[layer].labels.contains(n)).cloned().collect();
                let needs = self.config.affinity_bits(&needs);
                let vm = match pick(&mut self.instances, layer, needs) {
                    Ok(Some(vm)) => vm,
                    Ok(None) if self.could_ever_take(layer, needs) => {
                        waiting.push_back(id);
                        continue;
                    }
                    Ok(None) => {
                        let request = self.requests.remove(&id).expect("present");
                        let why = format!(
                            "no VM of layer {} has the labels this request needs",
                            self.config.layers[layer].name
                        );
                        self.answer(request, Answer::Refused(503, why));
                        continue;
                    }
                    Err(vm) => {
                        log::warn!("swarm: vm{vm} corrupted its request lane; removing it");
                        waiting.push_back(id);
                        self.lose(vm);
                        continue;
                    }
                };
                let request = self.requests.get_mut(&id).expect("present");
                let header = PacketHeader {
                    request_id: id,
                    next_vm: vm,
                    layer: layer as u16,
                    status: PacketStatus::InProgress,
                    payload_len: request.payload.len() as u32,
                };
                let instance = self.instances.get_mut(&vm).expect("picked");
                let cap = instance.to_vm.max_message().min(buf.len());
                let written =
                    header.encode(&request.payload, &mut buf[..cap]).map(|len| instance.to_vm.write(&buf[..len]));
                match written {
                    Some(Ok(())) => {
                        instance.in_flight.insert(id);
                        request.vm = Some(vm);
                        request.sent = Instant::now();
                        woken.push(vm);
                        any = true;
                    }
                    Some(Err(RingError::Full)) => waiting.push_back(id),
                    // Too long for a slot (the front end refuses most such requests; a layer's
                    // output can still grow past it).
                    None | Some(Err(_)) => {
                        let request = self.requests.remove(&id).expect("present");
                        self.answer(request, Answer::Refused(413, "the request does not fit a ring slot".into()));
                    }
                }
            }
            // Those that wait keep their order, ahead of any queued meanwhile.
            waiting.append(&mut self.queued[layer]);
            self.queued[layer] = waiting;
            woken.sort_unstable();
            woken.dedup();
            for vm in woken {
                if let Some(instance) = self.instances.get_mut(&vm) {
                    instance.to_vm.publish();
                    instance.wake();
                }
            }
        }
        any
    }

    /// Whether some VM of `layer`, ready or starting, has the affinity `needs`.
    fn could_ever_take(&self, layer: usize, needs: u32) -> bool {
        self.instances.values().any(|i| i.layer == layer && i.state != VmState::Draining && i.affinity & needs == needs)
    }

    /// Answers requests past their deadline (the front end has given up on them), and removes
    /// VMs that hold a request too long, do not finish booting, or do not finish draining.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> =
            self.requests.iter().filter(|(_, r)| now - r.started > REQUEST_DEADLINE).map(|(&id, _)| id).collect();
        for id in late {
            let request = self.requests.remove(&id).expect("listed");
            if let Some(instance) = request.vm.and_then(|vm| self.instances.get_mut(&vm)) {
                instance.in_flight.remove(&id);
            }
            self.answer(request, Answer::Refused(504, "no answer in time".into()));
        }
        let stuck: Vec<(u16, &'static str)> = self
            .instances
            .values()
            .filter_map(|i| {
                let hung = i.in_flight.iter().any(|id| self.requests.get(id).is_some_and(|r| now - r.sent > HUNG));
                let since = now - i.state_since;
                match i.state {
                    _ if hung => Some((i.id, "stopped answering")),
                    VmState::Starting if since > BOOT_OR_DRAIN => Some((i.id, "never reported ready")),
                    VmState::Draining if since > BOOT_OR_DRAIN => Some((i.id, "did not finish draining")),
                    _ => None,
                }
            })
            .collect();
        for (vm, why) in stuck {
            log::warn!("swarm: vm{vm} {why}; removing it");
            self.lose(vm);
        }
    }

    /// Notices VMs whose process ended, requests past their deadline, and VMs stuck.
    fn reap(&mut self) {
        self.expire();
        let dead: Vec<u16> = self
            .instances
            .iter_mut()
            .filter_map(|(&id, i)| matches!(i.child.try_wait(), Ok(Some(_))).then_some(id))
            .collect();
        for vm in dead {
            log::warn!("swarm: vm{vm} died; retrying what it held");
            // What it finished before dying is still in its lane.
            self.collect();
            self.lose(vm);
        }
        // Drained VMs are stopped.
        let drained: Vec<u16> = self
            .instances
            .iter()
            .filter(|(_, i)| i.state == VmState::Draining && i.in_flight.is_empty())
            .map(|(&id, _)| id)
            .collect();
        for vm in drained {
            if let Some(mut instance) = self.instances.remove(&vm) {
                instance.stop();
                self.fabric.remove(&format!("vm{vm}"));
                log::info!("swarm: vm{vm} drained and stopped");
            }
        }
    }

    /// Removes `vm` (dead, or writing what no worker writes); its requests go back to their layer's queue (or fail after retries).
    fn lose(&mut self, vm: u16) {
        let Some(mut instance) = self.instances.remove(&vm) else { return };
        self.counters.vms_lost += 1;
        instance.stop();
        self.fabric.remove(&format!("vm{vm}"));
        let layer = instance.layer;
        for id in instance.in_flight.drain() {
            let Some(request) = self.requests.get_mut(&id) else { continue };
            request.vm = None;
            request.retries += 1;
            if request.retries > MAX_RETRIES {
                let request = self.requests.remove(&id).expect("present");
                self.answer(request, Answer::Refused(503, "every VM that took it died".into()));
            } else {
                self.counters.retried += 1;
                self.queued[layer].push_front(id);
            }
        }
        self.converge(layer);
    }

    /// Starts or drains VMs of `layer` until it has its target.
    fn converge(&mut self, layer: usize) {
        let live = |s: &Self| s.instances.values().filter(|i| i.layer == layer && i.state != VmState::Draining).count();
        while live(self) < self.layers[layer].target as usize {
            if self.layers[layer].retry_start_after.is_some_and(|t| Instant::now() < t) {
                break;
            }
            // Ids wrap after 65535 starts: skip those still in use.
            let mut id = self.next_vm;
            while self.instances.contains_key(&id) || id == 0 {
                id = id.wrapping_add(1);
            }
            self.next_vm = id.wrapping_add(1);
            let config = &self.config.layers[layer];
            let labeled = self
                .instances
                .values()
                .filter(|i| i.layer == layer && i.state != VmState::Draining && !i.labels.is_empty())
                .count();
            let labels = match labeled < config.labeled.unwrap_or(u32::MAX) as usize {
                true => config.labels.clone(),
                false => Vec::new(),
            };
            let launcher =
                Launcher { config: &self.config, fabric: &self.fabric, vmm: &self.vmm, kernel: &self.kernel };
            match Instance::start(&launcher, id, layer, labels) {
                Ok(instance) => {
                    self.instances.insert(id, instance);
                }
                Err(e) => {
                    log::error!(
                        "swarm: cannot start a VM for layer {}: {e}; trying again in {START_BACKOFF:?}",
                        config.name
                    );
                    self.fabric.remove(&format!("vm{id}"));
                    self.layers[layer].retry_start_after = Some(Instant::now() + START_BACKOFF);
                    break;
                }
            }
        }
        while live(self) > self.layers[layer].target as usize {
            let victim = self
                .instances
                .values()
                .filter(|i| i.layer == layer && i.state != VmState::Draining)
                // Starting ones first, then the least loaded; labelled ones last, so requests
                // needing a label keep a VM that has it.
                .min_by_key(|i| (i.state == VmState::Ready, i.affinity != 0, i.in_flight.len()))
                .map(|i| i.id);
            let Some(victim) = victim else { break };
            if let Some(instance) = self.instances.get_mut(&victim) {
                instance.set_state(VmState::Draining);
                log::info!("swarm: draining vm{victim}");
            }
        }
    }

    /// Load per layer against the thresholds, with hysteresis (two ticks above to grow, eight
    /// below to shrink).
    fn policy(&mut self) {
        // Layers below their target (a VM lost, a start that failed) are topped up.
        for layer in 0..self.layers.len() {
            self.converge(layer);
        }
        if !self.config.autoscale {
            return;
        }
        for layer in 0..self.layers.len() {
            let ready = self.instances.values().filter(|i| i.layer == layer && i.state == VmState::Ready);
            let (count, held) = ready.fold((0usize, 0usize), |(c, h), i| (c + 1, h + i.in_flight.len()));
            if count == 0 {
                continue;
            }
            let load = (held + self.queued[layer].len()) as f64 / count as f64;
            let config = &self.config.layers[layer];
            let state = &mut self.layers[layer];
            state.above = if load > config.scale_up_load { state.above + 1 } else { 0 };
            state.below = if load < config.scale_down_load { state.below + 1 } else { 0 };
            if state.above >= 2 && state.target < config.max {
                state.target += 1;
                state.above = 0;
                log::info!("swarm: layer {} load {load:.1} per VM: scaling up to {}", config.name, state.target);
                self.converge(layer);
            } else if state.below >= 8 && state.target > config.min {
                state.target -= 1;
                state.below = 0;
                log::info!("swarm: layer {} load {load:.1} per VM: scaling down to {}", config.name, state.target);
                self.converge(layer);
            }
        }
    }

    fn status(&self) -> Value {
        let vms: Vec<Value> = self
            .instances
            .values()
            .map(|i| {
                let reported = i.reported.map(|r| {
                    json!({"load": r.load, "capacity": r.capacity, "served": r.served,
                                                          "affinity": r.affinity})
                });
                json!({"vm": i.id, "layer": self.config.layers[i.layer].name, "state": i.state.name(),
                       "pid": i.child.id(), "in_flight": i.in_flight.len(), "served": i.served, "labels": i.labels,
                       "reported": reported})
            })
            .collect();
        let layers: Vec<Value> = self
            .config
            .layers
            .iter()
            .enumerate()
            .map(|(n, l)| {
                let ready = self.instances.values().filter(|i| i.layer == n && i.state == VmState::Ready).count();
                json!({"name": l.name, "work": l.work, "target": self.layers[n].target, "ready": ready,
                       "queued": self.queued[n].len()})
            })
            .collect();
        let c = &self.counters;
        json!({
            "layers": layers,
            "vms": vms,
            "requests": {"in_flight": self.requests.len(), "answered_ok": c.answered_ok,
                         "answered_error": c.answered_error, "retried": c.retried,
                         "duplicates_dropped": c.duplicates_dropped, "vms_lost": c.vms_lost,
                         "latency_us_sum": c.latency_us_sum},
        })
    }

    /// Starts every layer's VMs.
    pub fn start_layers(&mut self) {
        for layer in 0..self.layers.len() {
            self.converge(layer);
        }
    }
}

/// The ready VM of `layer` whose reported affinity has the bits `needs`, holding fewer
/// requests than the capacity it reported, with room in its lane: the least loaded, then one
/// without affinity it was not asked for (keeping labelled VMs for those needing them).
/// `Err(vm)` names a VM whose lane indices are corrupt.
fn pick(instances: &mut BTreeMap<u16, Instance>, layer: usize, needs: u32) -> Result<Option<u16>, u16> {
    let mut best = None;
    for i in instances.values_mut().filter(|i| i.layer == layer && i.state == VmState::Ready) {
        let Some(reported) = i.reported else { continue };
        if reported.affinity & needs != needs || i.in_flight.len() >= reported.capacity as usize {
            continue;
        }
        match i.to_vm.free() {
            Ok(0) => continue,
            Ok(_) => {}
            Err(_) => return Err(i.id),
        }
        let spare = (reported.affinity & !needs).count_ones();
        let key = (i.in_flight.len(), spare, i.served, i.id);
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    }
    Ok(best.map(|(_, _, _, id)| id))
}
