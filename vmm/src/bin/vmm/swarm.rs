//! `vmm swarm`: runs a swarm (see the `swarm` crate and docs/swarm.md) until SIGINT or
//! SIGTERM, then stops every VM it started; and the small clients a script needs next to it.
//!
//! ```text
//! vmm swarm --config swarm.json                     run it
//! vmm swarm status --control PATH [--wait-ready]    layers, VMs, counters (JSON)
//! vmm swarm scale --control PATH LAYER N            start or drain VMs of a layer
//! vmm swarm tag --key KEY PATH                      the X-Auth tag a request for PATH needs
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cli::Failure;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SwarmArgs {
    /// The swarm's configuration: layers, front end, control socket, state directory.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<SwarmCommand>,
}

#[derive(Subcommand)]
pub enum SwarmCommand {
    /// Print the swarm's status: layers, VMs, request counters.
    Status {
        /// The swarm's control socket (`control` in its configuration).
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// First wait (up to --timeout) until the swarm answers and every layer has its VMs ready.
        #[arg(long)]
        wait_ready: bool,
        /// Seconds to wait with --wait-ready.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Start or drain VMs until LAYER has N (drained VMs finish what they hold first).
    Scale {
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        layer: String,
        instances: u32,
    },
    /// Print the X-Auth tag the auth layer expects for a request to PATH under KEY.
    Tag {
        #[arg(long)]
        key: String,
        path: String,
    },
}

pub fn run(args: &SwarmArgs) -> Result<u8, Failure> {
    match (&args.config, &args.command) {
        (Some(config), None) => serve(config),
        (None, Some(SwarmCommand::Status { control, wait_ready, timeout })) => {
            let status = match wait_ready {
                true => wait_ready_status(control, Duration::from_secs(*timeout)),
                false => call(control, "GET", "/swarm", None),
            };
            print_json(status)
        }
        (None, Some(SwarmCommand::Scale { control, layer, instances })) => {
            let body = serde_json::json!({ "instances": instances });
            print_json(call(control, "POST", &format!("/layers/{layer}/scale"), Some(body)))
        }
        (None, Some(SwarmCommand::Tag { key, path })) => {
            println!("{:016x}", swarm_ring::work::auth_tag(key.as_bytes(), path.as_bytes()));
            Ok(0)
        }
        _ => Err(Failure::bad_input(anyhow!("give --config FILE to run a swarm, or a subcommand (see --help)"))),
    }
}

fn print_json(result: anyhow::Result<serde_json::Value>) -> Result<u8, Failure> {
    let value = result.map_err(Failure::runtime)?;
    println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(0)
}

/// One request to the control socket; the JSON answer, or its error as the error.
fn call(
    control: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let mut stream =
        UnixStream::connect(control).with_context(|| format!("cannot reach the swarm at {}", control.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(stream, "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status: u16 = answer.get(9..12).and_then(|s| s.parse().ok()).context("a malformed answer")?;
    let json: serde_json::Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)).context("a malformed answer")?;
    if status >= 300 {
        bail!("{}", json["error"].as_str().unwrap_or("the swarm refused"));
    }
    Ok(json)
}

fn wait_ready_status(control: &Path, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = call(control, "GET", "/swarm", None)
            .ok()
            .filter(|s| s["layers"].as_array().is_some_and(|layers| layers.iter().all(|l| l["ready"] == l["target"])));
        if let Some(status) = ready {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!("the swarm at {} was not ready within {timeout:?}", control.display());
        }
        // Booting a VM takes tens of milliseconds; nothing announces it but the status.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn serve(path: &Path) -> Result<u8, Failure> {
    let config = swarm::SwarmConfig::load(path).map_err(|e| Failure::bad_input(anyhow!(e)))?;
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
