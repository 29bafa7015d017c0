//! `vmm swarm --config swarm.json`: runs a swarm (see the `swarm` crate and docs/swarm.md)
//! until SIGINT or SIGTERM, then stops every VM it started.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cli::Failure;

#[derive(Args)]
pub struct SwarmArgs {
    /// The swarm's configuration: layers, front end, control socket, state directory.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub fn run(args: &SwarmArgs) -> Result<u8, Failure> {
    let config = swarm::SwarmConfig::load(&args.config).map_err(|e| Failure::bad_input(anyhow!(e)))?;
    let vmm = std::env::current_exe().context("cannot find this vmm executable").map_err(Failure::runtime)?;
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot catch signals").map_err(Failure::runtime)?;
    // The layer VMs boot the bundled microguest.
    let kernel = std::env::temp_dir().join(format!("vmm-swarm-microguest-{}", std::process::id()));
    std::fs::write(&kernel, guest_agent::microguest())
        .with_context(|| format!("cannot write {}", kernel.display()))
        .map_err(Failure::runtime)?;
    let control = config.control.clone();
    let started = swarm::Swarm::start(config, vmm, kernel.clone());
    let swarm = match started {
        Ok(swarm) => swarm,
        Err(e) => {
            let _ = std::fs::remove_file(&kernel);
            return Err(Failure::runtime(anyhow!(e)));
        }
    };
    eprintln!("swarm: front end on http://{}, control API on {}", swarm.address(), control.display());
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    eprintln!("swarm: stopping");
    drop(swarm);
    let _ = std::fs::remove_file(&kernel);
    Ok(128 + signal as u8)
}
